"""Result tables from run directories: the paper's Table 4 layout, its projector ablations, and its
Table 1 (ImageNet).

    # Table 4 (Teacher/Student/KD/SP/CRD-lite/PEFD); then the same numbers, one row per cell
    python tables.py --runs runs/cifar100 --out results/cifar100.md
    python tables.py --runs runs/cifar100 --out results/cifar100.csv
    # the projector ablations; then Table 1 (ImageNet)
    python tables.py --kind ablations --pairs "vgg13:vgg8 resnet32x4:resnet8x4" \
        --out results/ablations.md
    PAIRS="resnet34:resnet18 resnet50:mobilenet_v1 densenet201:resnet18 densenet201:mobilenet_v1"
    python tables.py --kind imagenet --runs runs/imagenet --methods "ce kd pefd" --seeds 1 \
        --pairs "$PAIRS" --out results/imagenet.md

    # a table and its PNG figures; then make bench's figure
    python tables.py --runs runs/cifar100 --out results/cifar100.md --figures results/figures
    python tables.py --kind bench --bench results/bench.json --figures results/figures

The Makefile calls these; run them by hand to see a table of whatever has finished so far. Each cell
is the mean ± sample std over the seeds whose run has finished, with n; a cell without any finished
run says "missing", never 0. Runs are found where projkd.py puts them by default (projkd.run_path).
With --figures the table's figures are drawn too (docs/protocol.md) and linked from its markdown;
they need matplotlib.

The numbers of the last epoch and the teacher row are those of `projkd.py eval`, each model file
evaluated alone.
"""
import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass

import figures
from projkd import Config, UserError, cli_help, option, parse_args, run_name, run_path, save


@dataclass
class TableConfig:
    runs: str = option("runs/cifar100", "the folder that holds the run directories (make's RUNS)")
    pairs: str = option("wrn_40_2:wrn_16_2 vgg13:vgg8 resnet32x4:resnet8x4 ResNet50:vgg8 "
                        "ResNet50:MobileNetV2", "teacher:student columns")
    methods: str = option("ce kd sp crd pefd", "rows of the main table (imagenet: columns), "
                                               "besides the teacher")
    variants: str = option("q0 q1 q2 q4 depth2 depth3 depth4 gelu none",
                           "ablation rows besides PEFD itself (make's ABLATION_VARIANTS)")
    seeds: str = option("1 2 3", "the seeds every cell should have")
    kind: str = option("main", "main (Table 4) | ablations (Figures 3-4, Table 5: projector "
                               "number, depth, activation) | imagenet (Table 1) | bench")
    teachers: str = option("", "the folder of the teacher checkpoints, whose <arch>.eval.json "
                               "give the teacher row (make's TEACHERS)")
    out: str = option("", "files to write, space-separated, each .md or .csv; empty prints "
                          "markdown")
    figures: str = option("", "folder for the figures (PNG, needs matplotlib), linked from the "
                              "markdown; empty: none")
    bench: str = option("results/bench.json", "--kind bench: projkd.py bench's report, drawn as "
                                              "<figures>/bench.png")


ROW_NAMES = {
    "teacher": "Teacher",
    "ce": "Student",
    "kd": "KD",
    "sp": "SP",
    "crd": "CRD-lite",
    "pefd": "PEFD",
}
# The paper's top-1 (%) as (mean, std); Table 4, and Table 5 for the activations. Its CRD is full
# CRD.
PAPER = {
    "wrn_40_2:wrn_16_2": {
        "teacher": (75.61, None), "ce": (73.22, 0.13), "kd": (74.92, 0.28), "sp": (73.83, 0.12),
        "crd": (75.48, 0.09), "pefd": (76.02, 0.10),
    },
    "vgg13:vgg8": {
        "teacher": (74.64, None), "ce": (70.74, 0.31), "kd": (72.98, 0.19), "sp": (72.68, 0.19),
        "crd": (73.94, 0.22), "pefd": (74.35, 0.12),
        "pefd-gelu": (74.39, 0.18), "pefd-none": (73.46, 0.42),
    },
    "resnet32x4:resnet8x4": {
        "teacher": (79.42, None), "ce": (72.93, 0.28), "kd": (73.33, 0.25), "sp": (72.94, 0.23),
        "crd": (75.51, 0.18), "pefd": (76.08, 0.33),
        "pefd-gelu": (76.32, 0.27), "pefd-none": (75.04, 0.37),
    },
    "ResNet50:vgg8": {
        "teacher": (79.34, None), "ce": (70.74, 0.31), "kd": (73.81, 0.13), "sp": (73.34, 0.34),
        "crd": (74.30, 0.14), "pefd": (74.58, 0.22),
    },
    "ResNet50:MobileNetV2": {
        "teacher": (79.34, None), "ce": (65.03, 0.09), "kd": (67.35, 0.32), "sp": (68.08, 0.38),
        "crd": (69.11, 0.28), "pefd": (69.81, 0.42),
    },
}


# The paper's Table 1 (ImageNet), copied row by row in its column order: Student, KD, SP, CRD, SRRL,
# CID, Ours (PEFD), Teacher. Single numbers, no std. Its CRD is full CRD; SRRL and CID are methods
# we do not run.
PAPER_IMAGENET_COLUMNS = ("ce", "kd", "sp", "crd", "srrl", "cid", "pefd", "teacher")
PAPER_IMAGENET = {
    "resnet34:resnet18": {"top1": (69.75, 70.83, 70.94, 70.85, 71.71, 71.86, 71.94, 73.31),
                          "top5": (89.07, 90.15, 89.83, 90.12, 90.58, 90.63, 90.68, 91.41)},
    "resnet50:mobilenet_v1": {"top1": (69.06, 70.65, 70.14, 71.03, 72.58, 72.25, 73.16, 76.13),
                              "top5": (88.84, 90.26, 89.64, 90.16, 91.05, 90.98, 91.24, 92.86)},
    "densenet201:resnet18": {"top1": (69.75, 70.38, 70.75, 70.87, 71.76, 71.99, 72.29, 76.89),
                             "top5": (89.07, 90.12, 90.01, 89.86, 90.80, 90.64, 90.99, 93.37)},
    "densenet201:mobilenet_v1": {"top1": (69.06, 69.98, 70.34, 70.82, 72.28, 71.90, 73.24, 76.89),
                                 "top5": (88.84, 89.93, 89.63, 90.09, 90.90, 90.97, 91.47, 93.37)},
}


def paper_imagenet(pair, metric, key):
    """The paper's Table 1 value as (mean, std=None), or None where it has none."""
    row = PAPER_IMAGENET.get(pair, {}).get(metric)
    return (dict(zip(PAPER_IMAGENET_COLUMNS, row))[key], None) if row else None


ACTIVATION_LABELS = {"relu": "ReLU", "gelu": "GELU", "none": "no activation"}


def ablation_rows(variants):
    """(label, projector options) per ablation row, in the paper's order: the number of projectors
    (q0 = none: MDA on the raw student feature), then depth, then activation. The words are
    run_name's: q2, depth3, gelu."""
    rows = [("q=3 (PEFD)", {}, (0, 3))]
    for word in variants.split():
        if re.fullmatch(r"q\d+", word):
            n = int(word[1:])
            rows.append(("no projector" if n == 0 else f"q={n}", {"q": n}, (0, n)))
        elif re.fullmatch(r"depth\d+", word):
            n = int(word[5:])
            rows.append((f"depth {n}", {"proj_depth": n}, (1, n)))
        elif word in ACTIVATION_LABELS:
            position = list(ACTIVATION_LABELS).index(word)
            rows.append((ACTIVATION_LABELS[word], {"proj_act": word}, (2, position)))
        else:
            raise UserError(f"unknown ablation variant {word!r}; use qN, depthN, gelu or none")
    return [(label, options) for label, options, _ in sorted(rows, key=lambda row: row[2])]


def summarize(values):
    """mean, sample std (None for fewer than 2 values) and n; mean None for no values: missing,
    never 0."""
    n = len(values)
    mean = sum(values) / n if n else None
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_metrics(run_dir):
    """A finished run's metrics.json (None while unfinished), with the evaluation of its exported
    model.pt alone (model.eval.json, made by the pipeline's eval step) as m["eval"], None until it
    exists."""
    metrics = read_json(os.path.join(run_dir, "metrics.json"))
    if metrics is not None:
        metrics.update(run_dir=run_dir, eval=read_json(os.path.join(run_dir, "model.eval.json")))
    return metrics


# A run is marked where |model.pt evaluated alone - the training loop's last epoch| is above this.
MISMATCH_POINTS = 0.02


def last_accuracy(m, metric, notes):
    """A run's last-epoch top-1 or top-5 (metric) as its model.pt evaluates alone, the file a user
    deploys. Where that evaluation differs from the training loop's own, or is missing (not yet
    made), `notes` says so."""
    trained = m[f"last_{metric}"]
    evaluated = (m["eval"] or {}).get(metric)
    if evaluated is None:
        notes.append(f"{m['run_dir']}: the training loop's last epoch; "
                     "model.pt not yet evaluated alone (make does)")
        return trained
    if abs(evaluated - trained) > MISMATCH_POINTS:
        shown = metric.replace("top", "top-")
        notes.append(f"{m['run_dir']}: model.pt evaluates to {evaluated:.2f}% {shown} alone, "
                     f"the training loop's last epoch measured {trained:.2f}%")
    return evaluated


def teacher_accuracy(tc, arch, runs, metric):
    """The teacher row: the checkpoint's own evaluation (<teachers>/<arch>.eval.json), else the
    accuracy the pair's students measured of it (one run is enough: they all read the same file)."""
    evaluated = read_json(os.path.join(tc.teachers, f"{arch}.eval.json")) if tc.teachers else None
    if evaluated is not None:
        return [evaluated[metric]]
    return [m[f"teacher_{metric}"] for m in runs if m.get(f"teacher_{metric}") is not None][:1]


def _pairs(tc):
    pairs = tc.pairs.split()
    bad = [p for p in pairs if p.count(":") != 1]
    if bad:
        raise UserError(
            f"--pairs takes teacher:student words, e.g. vgg13:vgg8; got {' '.join(bad)}"
        )
    return pairs


def table_rows(tc, pair):
    """(key, label, projector options, metrics of its finished runs) per row of a pair's main (or
    imagenet) or ablations table, in the paper's order; a run without metrics.json is unfinished and
    left out."""
    teacher, student = pair.split(":")
    if tc.kind == "ablations":
        rows = [(run_name("pefd", **variant), label, "pefd", variant)
                for label, variant in ablation_rows(tc.variants)]
    else:
        # ROW_NAMES, not --methods, gives the order: the paper's
        rows = [(r, ROW_NAMES[r], r, {}) for r in ROW_NAMES if r in tc.methods.split()]
    table = []
    for key, label, method, variant in rows:
        runs = []
        for seed in tc.seeds.split():
            metrics = read_metrics(run_path(tc.runs, teacher, student, method, seed, **variant))
            if metrics is not None:
                runs.append(metrics)
        table.append((key, label, variant, runs))
    return table


def collect(tc):
    """Every cell of the table as a row: (table, row, pair) with the summary of our runs and the
    paper's value."""
    cells = []
    found = []
    for pair in _pairs(tc):
        rows = table_rows(tc, pair)
        teacher = pair.split(":")[0]
        runs = {key: ms for key, _, _, ms in rows}
        pair_runs = [m for ms in runs.values() for m in ms]
        found += pair_runs
        if tc.kind == "main":
            teacher_top1 = teacher_accuracy(tc, teacher, pair_runs, "top1")
            for table in ("last", "best"):
                cells.append({
                    "table": table, "row": "Teacher", "pair": pair, **summarize(teacher_top1),
                    "paper": PAPER.get(pair, {}).get("teacher"), "notes": [],
                })
        for key, label, _, _ in rows:
            notes = []
            values = {"last": [last_accuracy(m, "top1", notes) for m in runs[key]],
                      "best": [m["best_top1"] for m in runs[key]],
                      "cosine": [m["between_class_cosine"] for m in runs[key]]}
            tables = ["last", "best"]
            if tc.kind == "ablations":
                tables.append("cosine")
            for table in tables:
                paper = PAPER.get(pair, {}).get(key) if table != "cosine" else None
                cells.append({
                    "table": table, "row": label, "pair": pair, **summarize(values[table]),
                    "paper": paper, "notes": notes if table == "last" else [],
                })
    return cells, found


def collect_imagenet(tc):
    """Every cell of the ImageNet table: per pair, the top-1 and top-5 of each method and of the
    teacher, at the last and at the best epoch, as rows of the same form as collect's; its table is
    last-top1, last-top5, best-top1, ..."""
    seeds = tc.seeds.split()
    # ROW_NAMES, not --methods, gives the order: the paper's columns
    methods = [r for r in ROW_NAMES if r != "teacher" and r in tc.methods.split()]
    cells = []
    # run directory -> metrics (None: unfinished), read once: a Student run serves two pairs
    read = {}
    for pair in _pairs(tc):
        teacher, student = pair.split(":")
        runs = {}
        for key in methods:
            dirs = [run_path(tc.runs, teacher, student, key, s) for s in seeds]
            read.update({d: read_metrics(d) for d in dirs if d not in read})
            runs[key] = [read[d] for d in dirs if read[d] is not None]
        pair_runs = [m for ms in runs.values() for m in ms]
        for table in ("last-top1", "last-top5", "best-top1", "best-top5"):
            when, metric = table.split("-")
            for key in methods:
                notes = []
                if when == "last":
                    values = [last_accuracy(m, metric, notes) for m in runs[key]]
                else:
                    values = [m[f"best_{metric}"] for m in runs[key]]
                cells.append({
                    "table": table, "row": ROW_NAMES[key], "pair": pair, **summarize(values),
                    "paper": paper_imagenet(pair, metric, key), "notes": notes,
                })
            teacher_acc = teacher_accuracy(tc, teacher, pair_runs, metric)
            cells.append({
                "table": table, "row": "Teacher", "pair": pair, **summarize(teacher_acc),
                "paper": paper_imagenet(pair, metric, "teacher"), "notes": [],
            })
    return cells, [m for m in read.values() if m is not None]


def _fmt(mean, std, n=None, digits=2):
    if mean is None:
        return "missing"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return text + (f" (n={n})" if n is not None else "")


def footnoted(text, cell, footnotes):
    """The cell's text with a mark of the footnote (numbered in order of appearance) that gives its
    notes."""
    if not cell["notes"]:
        return text
    note = "; ".join(cell["notes"])
    return f"{text} [^{footnotes.setdefault(note, len(footnotes) + 1)}]"


def footnote_lines(footnotes):
    lines = [f"[^{i}]: {note}" for note, i in footnotes.items()]
    if lines:
        lines.append("")
    return lines


def teachers_used(found):
    """Where the runs' teachers came from, from each run's teacher_provenance: e.g. 'vgg13 (fetched
    and verified, sha256 32a60b50f9ac), ResNet50 (trained here, ...)'; 'not recorded' for runs from
    before projkd recorded it."""
    teachers = set()
    for m in found:
        if m.get("config", {}).get("teacher"):
            p = m.get("teacher_provenance") or {"how": "not recorded"}
            sha = f", sha256 {p['sha256'][:12]}" if p.get("sha256") else ""
            teachers.add((m["config"]["teacher"], p["how"] + sha))
    ordered = sorted(teachers, key=lambda t: (t[0].lower(), t[1]))
    return ", ".join(f"{arch} ({how})" for arch, how in ordered) or "–"


PREFLIGHT_JSON = os.path.join("results", "gpu-preflight.json")  # gpu_check.py preflight's report


def preflight_condition(found, path=PREFLIGHT_JSON):
    """Whether the GPU was checked before the runs trained (make's preflight), for runs on CUDA
    only: '' when none ran there."""
    if not any(str(m.get("config", {}).get("device", "")).startswith("cuda") for m in found):
        return ""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return "; GPU preflight: none recorded"
    if report.get("status") == "off":
        return "; GPU preflight: off (PREFLIGHT=off: the GPU was not checked before the runs)"
    return (f"; GPU preflight: {report.get('status')} on {report.get('gpu')} "
            f"with torch {report.get('torch')}")


def conditions(found):
    """What the numbers were measured with, read from the runs themselves."""
    def values(get):
        return ", ".join(sorted({str(get(m)) for m in found})) or "–"
    return (f"epochs: {values(lambda m: m['epochs'])}; "
            f"dataset: {values(lambda m: m['config']['dataset'])}; "
            f"teachers: {teachers_used(found)}; "
            f"devices: {values(lambda m: m['device'])}; "
            f"processes per run: {values(lambda m: m.get('world_size', 1))}; "
            f"torch: {values(lambda m: m['torch'])}; "
            f"code: {values(lambda m: m['code'])}; "
            f"finished runs: {len(found)}{preflight_condition(found)}")


EVALUATED = ("Last-epoch numbers and the teacher row are each model file evaluated alone "
             "(`projkd.py eval`: model.pt, the teacher checkpoint); a footnote marks a run where "
             "that differs from the training loop's own last-epoch evaluation by more than "
             f"{MISMATCH_POINTS} points, or was not made yet.")

TITLES = {
    "last": "Top-1 accuracy (%) at the last epoch",
    "best": ("Top-1 accuracy (%) at the best epoch "
             "(chosen on the test set: optimistic, shown for comparison)"),
    "cosine": ("Between-class cosine similarity of the student's penultimate features "
               "(lower is more separable)"),
}


def render_markdown(tc, cells, found):
    pairs = _pairs(tc)
    heading = "Distillation results"
    sources = "Table 4"
    if tc.kind == "ablations":
        heading = "Projector ablations (PEFD)"
        sources = "Table 4, Table 5"
    legend = (f"Each cell: mean ± sample std over seeds {tc.seeds} (n = finished runs); "
              "'missing' = no finished run. "
              f"'paper' = the PEFD paper's value ({sources})")
    if tc.kind == "main" and "crd" in tc.methods.split():
        legend += "; its CRD row is full CRD, ours CRD-lite"
    lines = [f"# {heading}: `{tc.runs}`", "", legend + ". " + EVALUATED, "", conditions(found), ""]
    footnotes = {}
    for table in [t for t in ("last", "best", "cosine") if any(c["table"] == t for c in cells)]:
        with_paper = table != "cosine"
        lines += [f"## {TITLES[table]}", ""]
        paper_column = " | paper" if with_paper else ""
        header = ["", *(f"{p.replace(':', ' → ')}{paper_column}" for p in pairs)]
        lines.append("| " + " | ".join(header) + " |")
        columns_per_pair = 2 if with_paper else 1  # ours, and the paper's beside it
        lines.append("|" + "---|" * (1 + len(pairs) * columns_per_pair))
        labels = list(dict.fromkeys(c["row"] for c in cells if c["table"] == table))
        for label in labels:
            row = [label]
            for pair in pairs:
                c = next(c for c in cells
                         if c["table"] == table and c["row"] == label and c["pair"] == pair)
                digits = 4 if table == "cosine" else 2
                n = c["n"] if label != "Teacher" else None  # one checkpoint, not a run per seed
                row.append(footnoted(_fmt(c["mean"], c["std"], n, digits), c, footnotes))
                if with_paper:
                    row.append(_fmt(*c["paper"]) if c["paper"] else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines + footnote_lines(footnotes))


IMAGENET_TITLES = {
    "last": "Top-1 and top-5 accuracy (%) at the last epoch",
    "best": ("Top-1 and top-5 accuracy (%) at the best epoch "
             "(chosen on the validation set: optimistic, for comparison)"),
}


def render_imagenet(tc, cells, found):
    """The paper's Table 1 layout: a Top-1 and a Top-5 row per pair, a column (ours | paper) per
    method."""
    pairs = _pairs(tc)
    # Student, KD, SP, CRD-lite, PEFD, Teacher
    columns = list(dict.fromkeys(c["row"] for c in cells))
    legend = (f"Each cell: mean ± sample std over seeds {tc.seeds} (n = finished runs); "
              "'missing' = no finished run. "
              "'paper' = the PEFD paper's value (Table 1, one number per cell); "
              "its CRD column is full CRD, ours CRD-lite; "
              "its SRRL and CID columns are methods not run here. " + EVALUATED)
    lines = [f"# ImageNet distillation results: `{tc.runs}`", "", legend, "", conditions(found), ""]
    footnotes = {}
    for when in ("last", "best"):
        lines += [f"## {IMAGENET_TITLES[when]}", ""]
        header = " | ".join(f"{col} | paper" for col in columns)
        lines.append(f"| Pair | Accuracy | {header} |")
        lines.append("|" + "---|" * (2 + 2 * len(columns)))
        for pair in pairs:
            label = pair.replace(":", " → ")
            if pair in PAPER_IMAGENET:
                label = f"({'abcd'[list(PAPER_IMAGENET).index(pair)]}) {label}"
            for metric in ("top1", "top5"):
                table = f"{when}-{metric}"
                row = [label if metric == "top1" else "", f"Top-{metric[3:]}"]
                for col in columns:
                    c = next(c for c in cells
                             if c["table"] == table and c["row"] == col and c["pair"] == pair)
                    n = c["n"] if col != "Teacher" else None  # one checkpoint, not a run per seed
                    row.append(footnoted(_fmt(c["mean"], c["std"], n), c, footnotes))
                    row.append(_fmt(*c["paper"]) if c["paper"] else "–")
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines + footnote_lines(footnotes))


def render_csv(cells):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["table", "row", "teacher", "student", "mean", "std", "n",
                     "paper_mean", "paper_std", "notes"])
    for c in cells:
        teacher, student = c["pair"].split(":")
        paper = c["paper"] or (None, None)
        ours = ["" if v is None else round(v, 4) for v in (c["mean"], c["std"])]
        theirs = ["" if v is None else v for v in paper]
        notes = "; ".join(c["notes"])
        writer.writerow([c["table"], c["row"], teacher, student, *ours, c["n"], *theirs, notes])
    return out.getvalue()


def write_tables(tc):
    if tc.kind not in ("main", "ablations", "imagenet", "bench"):
        raise UserError(f"unknown --kind {tc.kind!r}; choose main, ablations, imagenet or bench")
    if tc.kind == "bench":
        return write_bench_figure(tc)
    bad = [path for path in tc.out.split() if not path.endswith((".md", ".csv"))]
    if bad:
        raise UserError(f"--out {bad[0]!r} must end in .md or .csv")
    if tc.kind == "imagenet":
        cells, found = collect_imagenet(tc)
    else:
        cells, found = collect(tc)
    drawn = []
    if tc.figures:
        drawn = write_figures(tc)  # before the tables, which link to them

    def markdown(folder):
        if tc.kind == "imagenet":
            text = render_imagenet(tc, cells, found)
        else:
            text = render_markdown(tc, cells, found)
        if drawn:
            text += "\n## Figures\n" + figure_links(drawn, folder)
        return text

    if not tc.out:
        print(markdown("."))
    for path in tc.out.split():
        text = render_csv(cells) if path.endswith(".csv") else markdown(os.path.dirname(path))
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save(text, path)
        missing = sum(c["n"] == 0 for c in cells)
        message = f"wrote {path} from {len(found)} finished runs"
        if missing:
            message += f"; {missing} cells missing"
        print(message)


# --- figures (PNG): what each of the tables' figures shows; figures.py draws it -------------------
# Each series is a pure function from run metrics (what the tests check against log.csv).

TEACHER_OF = {"test_top1": "top1", "test_top5": "top5"}  # the teacher's line in a curve panel


def epoch_series(runs, column):
    """[(epoch, mean, min, max)] of a history column over the runs whose epoch rows have it; []
    where none has."""
    values = {}
    for m in runs:
        for row in m.get("history", []):
            if row.get(column) is not None:
                values.setdefault(row["epoch"], []).append(row[column])
    return [(epoch, sum(v) / len(v), min(v), max(v)) for epoch, v in sorted(values.items())]


def curve_series(tc, pair, columns):
    """Per history column, the epoch_series of each table row (method) that has it; and the
    teacher's accuracy (None where no run measured it) for the columns that have a teacher."""
    rows = table_rows(tc, pair)
    series = {}
    for column in columns:
        series[column] = {}
        for _, label, _, runs in rows:
            points = epoch_series(runs, column)
            if points:
                series[column][label] = points
    all_runs = [m for *_, runs in rows for m in runs]
    teacher = {}
    for column in columns:
        if column in TEACHER_OF:  # the table's teacher row
            accuracy = teacher_accuracy(tc, pair.split(":")[0], all_runs, TEACHER_OF[column])
            teacher[column] = accuracy[0] if accuracy else None
    return series, teacher


def cosine_series(tc, pair):
    """Figure 2: [(row label, summary of the last epoch's between-class cosine)] per row with a
    finished run."""
    bars = []
    for _, label, _, runs in table_rows(tc, pair):
        summary = summarize([m["between_class_cosine"] for m in runs])
        if summary["n"]:
            bars.append((label, summary))
    return bars


def ablation_series(tc, pair, option):
    """Figures 3 (option q) and 4 (proj_depth): [(x, summary of last-epoch top-1)] for PEFD and each
    variant that changes only `option`, by x, where a run has finished; and the paper's PEFD
    (x, mean, std) or None."""
    default = getattr(Config, option)
    points = []
    for _, _, variant, runs in table_rows(tc, pair):
        summary = summarize([last_accuracy(m, "top1", []) for m in runs])
        if set(variant) <= {option} and summary["n"]:
            points.append((variant.get(option, default), summary))
    paper = PAPER.get(pair, {}).get("pefd")
    if paper:
        paper = (default, *paper)
    return sorted(points, key=lambda p: p[0]), paper


def bench_series(report):
    """Per pair of bench.json: [(loop, images/s, MFU, why skipped)], images/s and MFU None where not
    measured."""
    series = {}
    for p in report["pairs"]:
        rows = [(r["loop"], r["images_per_s"], r.get("mfu"), r.get("skipped")) for r in p["rows"]]
        series[f"{p['teacher']} → {p['student']}"] = rows
    return series


ABLATION_FIGURES = (  # option, file name, caption, x axis
    ("q", "q", "Figure 3: top-1 against the number of projectors", "projectors q (0: none)"),
    ("proj_depth", "depth", "Figure 4: top-1 against the projectors' depth",
     "layers per projector"),
)
COSINE_CAPTION = ("Figure 2: between-class cosine of the student's features at the last epoch "
                  "(lower: more separable)")


def write_figures(tc):
    """The figures of a main, imagenet or ablations table into tc.figures: [(path, caption)], for
    its markdown."""
    plt = figures.pyplot()
    pairs = _pairs(tc)
    drawn = []
    os.makedirs(tc.figures, exist_ok=True)
    if tc.kind == "ablations":
        for option, name, caption, xlabel in ABLATION_FIGURES:
            path = os.path.join(tc.figures, f"ablations-{name}.png")
            series = {p: ablation_series(tc, p, option) for p in pairs}
            figures.draw_ablation(plt, series, xlabel, caption, path)
            drawn.append((path, caption))
    else:
        drawn += write_curves(tc, plt, pairs)
    if tc.kind != "imagenet":
        name = "cosine.png"
        if tc.kind == "ablations":
            name = "ablations-cosine.png"
        path = os.path.join(tc.figures, name)
        bars = {p: cosine_series(tc, p) for p in pairs}
        figures.draw_bars(plt, bars, COSINE_CAPTION, "between-class cosine (mean ± std)", path)
        drawn.append((path, COSINE_CAPTION))
    print(f"wrote {len(drawn)} figures to {tc.figures}")
    return drawn


def write_curves(tc, plt, pairs):
    """Each pair's learning curves: test top-1 (and top-5 on ImageNet) and PEFD's MDA term against
    epoch."""
    columns = ["test_top1", "train_mda"]
    prefix = ""
    accuracy = "top-1"
    if tc.kind == "imagenet":  # results/figures holds CIFAR's and ImageNet's
        columns = ["test_top1", "test_top5", "train_mda"]
        prefix = "imagenet-"
        accuracy = "top-1 and top-5"
    drawn = []
    for pair in pairs:
        path = os.path.join(tc.figures, f"{prefix}{pair.replace(':', '-')}-curves.png")
        arrow = pair.replace(":", " → ")
        series, teacher = curve_series(tc, pair, columns)
        figures.draw_curves(plt, series, teacher, f"{arrow} (mean, min-max band over seeds)", path)
        caption = (f"{arrow}: test {accuracy} (%) of each method against epoch, mean over seeds "
                   "with their min-max band; PEFD's training MDA term where its runs logged it")
        drawn.append((path, caption))
    return drawn


def write_bench_figure(tc):
    """--kind bench: images/s and MFU of each loop of bench.json. Without matplotlib, one line and
    no figure: `make bench` runs on GPU machines whose python cannot install anything."""
    if not tc.figures:
        raise UserError("--kind bench draws a figure: give --figures DIR")
    try:
        with open(tc.bench) as f:
            report = json.load(f)
        series = bench_series(report)
        title = f"projkd bench: {report['device']}, torch {report['torch']}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {tc.bench} as projkd.py bench's report ({e!r}); "
                        "make bench writes it") from None
    try:
        plt = figures.pyplot()
    except UserError as e:
        print(f"tables: no bench figure: {e}")
        return
    os.makedirs(tc.figures, exist_ok=True)
    path = os.path.join(tc.figures, "bench.png")
    figures.draw_bench(plt, series, title, path)
    print(f"wrote {path}")


def figure_links(drawn, folder):
    """The figures as markdown images, linked relative to the markdown file's folder."""
    return "".join(f"\n![{what}]({os.path.relpath(path, folder or '.')})\n" for path, what in drawn)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(cli_help(TableConfig, __doc__, "python tables.py [--option value ...]"))
        return 0
    try:
        write_tables(parse_args(argv, TableConfig))
    except UserError as e:
        print(f"tables: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
