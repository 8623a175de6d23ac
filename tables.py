"""Result tables from run directories: the paper's Table 4 layout, its projector ablations, and its Table 1 (ImageNet).

    python tables.py --runs runs/cifar100 --out results/cifar100.md        # Teacher/Student/KD/SP/CRD-lite/PEFD
    python tables.py --runs runs/cifar100 --out results/cifar100.csv       # the same numbers, one row per cell
    python tables.py --kind ablations --pairs "vgg13:vgg8 resnet32x4:resnet8x4" --out results/ablations.md
    python tables.py --kind imagenet --runs runs/imagenet --methods "ce kd pefd" --seeds 1 --out results/imagenet.md \
        --pairs "resnet34:resnet18 resnet50:mobilenet_v1 densenet201:resnet18 densenet201:mobilenet_v1"

The Makefile calls these; run them by hand to see a table of whatever has finished so far. Each cell is the
mean ± sample std over the seeds whose run has finished, with n; a cell without any finished run says
"missing", never 0. Runs are found where projkd.py puts them by default (projkd.run_path).

Here too is `python projkd.py eval`, which evaluates a checkpoint alone and writes the JSON tables can read.
"""
import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from projkd import (PROTOCOLS, Config, UserError, _rank, check_arch, cli_help, default_workers, device_name,
                    evaluate, load_data, log, options_of, parse_args, precision, resolve_device, run_name, run_path,
                    save, setup_torch, zoo)


@dataclass
class TableConfig:
    runs: str = "runs/cifar100"  # the folder that holds the run directories (make's RUNS)
    pairs: str = "wrn_40_2:wrn_16_2 vgg13:vgg8 resnet32x4:resnet8x4 ResNet50:vgg8 ResNet50:MobileNetV2"  # teacher:student columns
    methods: str = "ce kd sp crd pefd"  # rows of the main table (imagenet: columns), besides the teacher
    variants: str = "q0 q1 q2 q4 depth2 depth3 depth4 gelu none"  # ablation rows besides PEFD itself (make's ABLATION_VARIANTS)
    seeds: str = "1 2 3"  # the seeds every cell should have
    kind: str = "main"  # main (Table 4) | ablations (Figures 3-4, Table 5: projector number, depth, activation) | imagenet (Table 1)
    out: str = ""  # files to write, space-separated, each .md or .csv; empty prints markdown


ROW_NAMES = {"teacher": "Teacher", "ce": "Student", "kd": "KD", "sp": "SP", "crd": "CRD-lite", "pefd": "PEFD"}
# The paper's top-1 (%) as (mean, std); Table 4, and Table 5 for the activations. Its CRD is full CRD.
PAPER = {
    "wrn_40_2:wrn_16_2": {"teacher": (75.61, None), "ce": (73.22, 0.13), "kd": (74.92, 0.28), "sp": (73.83, 0.12),
                          "crd": (75.48, 0.09), "pefd": (76.02, 0.10)},
    "vgg13:vgg8": {"teacher": (74.64, None), "ce": (70.74, 0.31), "kd": (72.98, 0.19), "sp": (72.68, 0.19),
                   "crd": (73.94, 0.22), "pefd": (74.35, 0.12), "pefd-gelu": (74.39, 0.18), "pefd-none": (73.46, 0.42)},
    "resnet32x4:resnet8x4": {"teacher": (79.42, None), "ce": (72.93, 0.28), "kd": (73.33, 0.25), "sp": (72.94, 0.23),
                             "crd": (75.51, 0.18), "pefd": (76.08, 0.33), "pefd-gelu": (76.32, 0.27),
                             "pefd-none": (75.04, 0.37)},
    "ResNet50:vgg8": {"teacher": (79.34, None), "ce": (70.74, 0.31), "kd": (73.81, 0.13), "sp": (73.34, 0.34),
                      "crd": (74.30, 0.14), "pefd": (74.58, 0.22)},
    "ResNet50:MobileNetV2": {"teacher": (79.34, None), "ce": (65.03, 0.09), "kd": (67.35, 0.32), "sp": (68.08, 0.38),
                             "crd": (69.11, 0.28), "pefd": (69.81, 0.42)},
}


# The paper's Table 1 (ImageNet), copied row by row in its column order: Student, KD, SP, CRD, SRRL, CID, Ours
# (PEFD), Teacher. Single numbers, no std. Its CRD is full CRD; SRRL and CID are methods we do not run.
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
    """(label, projector options) per ablation row, in the paper's order: the number of projectors (q0 = none:
    MDA on the raw student feature), then depth, then activation. The words are run_name's: q2, depth3, gelu."""
    rows = [("q=3 (PEFD)", {}, (0, 3))]
    for word in variants.split():
        if re.fullmatch(r"q\d+", word):
            n = int(word[1:])
            rows.append(("no projector" if n == 0 else f"q={n}", {"q": n}, (0, n)))
        elif re.fullmatch(r"depth\d+", word):
            n = int(word[5:])
            rows.append((f"depth {n}", {"proj_depth": n}, (1, n)))
        elif word in ACTIVATION_LABELS:
            rows.append((ACTIVATION_LABELS[word], {"proj_act": word}, (2, list(ACTIVATION_LABELS).index(word))))
        else:
            raise UserError(f"unknown ablation variant {word!r}; use qN, depthN, gelu or none")
    return [(label, options) for label, options, _ in sorted(rows, key=lambda row: row[2])]


def summarize(values):
    """mean, sample std (None for fewer than 2 values) and n; mean None for no values: missing, never 0."""
    n = len(values)
    mean = sum(values) / n if n else None
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pairs(tc):
    pairs = tc.pairs.split()
    bad = [p for p in pairs if p.count(":") != 1]
    if bad:
        raise UserError(f"--pairs takes teacher:student words, e.g. vgg13:vgg8; got {' '.join(bad)}")
    return pairs


def collect(tc):
    """Every cell of the table as a row: (table, row, pair) with the summary of our runs and the paper's value."""
    seeds = tc.seeds.split()
    cells, found = [], []
    for pair in _pairs(tc):
        teacher, student = pair.split(":")
        if tc.kind == "main":
            rows = [(r, ROW_NAMES[r], [run_path(tc.runs, teacher, student, r, s) for s in seeds])
                    for r in ROW_NAMES if r in tc.methods.split()]  # in the paper's row order
        else:
            rows = [(run_name("pefd", **variant), label, [run_path(tc.runs, teacher, student, "pefd", s, **variant)
                                                          for s in seeds]) for label, variant in ablation_rows(tc.variants)]
        runs = {key: [m for m in map(read_metrics, dirs) if m is not None] for key, _, dirs in rows}
        found += [m for ms in runs.values() for m in ms]
        if tc.kind == "main":
            # The teacher row is the checkpoint the pair's students were distilled from, as they measured it.
            teacher_top1 = [m["teacher_top1"] for ms in runs.values() for m in ms if m.get("teacher_top1") is not None]
            for table in ("last", "best"):
                cells.append({"table": table, "row": "Teacher", "pair": pair, **summarize(teacher_top1[:1]),
                              "paper": PAPER.get(pair, {}).get("teacher")})
        for key, label, _ in rows:
            for table, metric in [("last", "last_top1"), ("best", "best_top1")] + \
                    [("cosine", "between_class_cosine")] * (tc.kind == "ablations"):
                paper = PAPER.get(pair, {}).get(key) if table != "cosine" else None
                cells.append({"table": table, "row": label, "pair": pair,
                              **summarize([m[metric] for m in runs[key]]), "paper": paper})
    return cells, found


def collect_imagenet(tc):
    """Every cell of the ImageNet table: per pair, the top-1 and top-5 of each method and of the teacher, at the last
    and at the best epoch, as rows of the same form as collect's; its table is last-top1, last-top5, best-top1, ..."""
    seeds = tc.seeds.split()
    methods = [r for r in ROW_NAMES if r != "teacher" and r in tc.methods.split()]  # the paper's column order
    cells, read = [], {}  # run directory -> metrics (None: unfinished), read once: a Student run serves two pairs
    for pair in _pairs(tc):
        teacher, student = pair.split(":")
        runs = {}
        for key in methods:
            dirs = [run_path(tc.runs, teacher, student, key, s) for s in seeds]
            read.update({d: read_metrics(d) for d in dirs if d not in read})
            runs[key] = [read[d] for d in dirs if read[d] is not None]
        for table in ("last-top1", "last-top5", "best-top1", "best-top5"):
            when, metric = table.split("-")
            for key in methods:
                cells.append({"table": table, "row": ROW_NAMES[key], "pair": pair,
                              **summarize([m[f"{when}_{metric}"] for m in runs[key]]),
                              "paper": paper_imagenet(pair, metric, key)})
            # The teacher is the pretrained checkpoint the pair's students were distilled from, as they measured it.
            teacher_acc = [m[f"teacher_{metric}"] for ms in runs.values() for m in ms
                           if m.get(f"teacher_{metric}") is not None]
            cells.append({"table": table, "row": "Teacher", "pair": pair, **summarize(teacher_acc[:1]),
                          "paper": paper_imagenet(pair, metric, "teacher")})
    return cells, [m for m in read.values() if m is not None]


def _fmt(mean, std, n=None, digits=2):
    if mean is None:
        return "missing"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
    return text + (f" (n={n})" if n is not None else "")


def teachers_used(found):
    """Where the runs' teachers came from, from each run's teacher_provenance: e.g. 'vgg13 (fetched and verified,
    sha256 32a60b50f9ac), ResNet50 (trained here, ...)'; 'not recorded' for runs from before projkd recorded it."""
    teachers = set()
    for m in found:
        if m.get("config", {}).get("teacher"):
            p = m.get("teacher_provenance") or {"how": "not recorded"}
            teachers.add((m["config"]["teacher"], p["how"] + (f", sha256 {p['sha256'][:12]}" if p.get("sha256") else "")))
    return ", ".join(f"{arch} ({how})" for arch, how in sorted(teachers, key=lambda t: (t[0].lower(), t[1]))) or "–"


def conditions(found):
    """What the numbers were measured with, read from the runs themselves."""
    def values(get):
        return ", ".join(sorted({str(get(m)) for m in found})) or "–"
    return (f"epochs: {values(lambda m: m['epochs'])}; dataset: {values(lambda m: m['config']['dataset'])}; "
            f"teachers: {teachers_used(found)}; "
            f"devices: {values(lambda m: m['device'])}; processes per run: {values(lambda m: m.get('world_size', 1))}; "
            f"torch: {values(lambda m: m['torch'])}; "
            f"code: {values(lambda m: m['code'])}; finished runs: {len(found)}")


TITLES = {
    "last": "Top-1 accuracy (%) at the last epoch",
    "best": "Top-1 accuracy (%) at the best epoch (chosen on the test set: optimistic, shown for comparison)",
    "cosine": "Between-class cosine similarity of the student's penultimate features (lower is more separable)",
}


def render_markdown(tc, cells, found):
    pairs = _pairs(tc)
    heading = "Distillation results" if tc.kind == "main" else "Projector ablations (PEFD)"
    lines = [f"# {heading}: `{tc.runs}`", "",
             f"Each cell: mean ± sample std over seeds {tc.seeds} (n = finished runs); 'missing' = no finished run. "
             f"'paper' = the PEFD paper's value (Table 4{', Table 5' if tc.kind == 'ablations' else ''}); "
             "its CRD column is full CRD, ours CRD-lite.", "", conditions(found), ""]
    for table in [t for t in ("last", "best", "cosine") if any(c["table"] == t for c in cells)]:
        with_paper = table != "cosine"
        lines += [f"## {TITLES[table]}", ""]
        header = ["", *(f"{p.replace(':', ' → ')}{' | paper' if with_paper else ''}" for p in pairs)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * (1 + len(pairs) * (2 if with_paper else 1)))
        labels = list(dict.fromkeys(c["row"] for c in cells if c["table"] == table))
        for label in labels:
            row = [label]
            for pair in pairs:
                c = next(c for c in cells if c["table"] == table and c["row"] == label and c["pair"] == pair)
                digits = 4 if table == "cosine" else 2
                row.append(_fmt(c["mean"], c["std"], c["n"] if label != "Teacher" else None, digits))
                if with_paper:
                    row.append(_fmt(*c["paper"]) if c["paper"] else "–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


IMAGENET_TITLES = {
    "last": "Top-1 and top-5 accuracy (%) at the last epoch",
    "best": "Top-1 and top-5 accuracy (%) at the best epoch (chosen on the validation set: optimistic, for comparison)",
}


def render_imagenet(tc, cells, found):
    """The paper's Table 1 layout: a Top-1 and a Top-5 row per pair, a column (ours | paper) per method."""
    pairs = _pairs(tc)
    columns = list(dict.fromkeys(c["row"] for c in cells))  # Student, KD, SP, CRD-lite, PEFD, Teacher
    lines = [f"# ImageNet distillation results: `{tc.runs}`", "",
             f"Each cell: mean ± sample std over seeds {tc.seeds} (n = finished runs); 'missing' = no finished run. "
             "'paper' = the PEFD paper's value (Table 1, one number per cell); its CRD column is full CRD, ours "
             "CRD-lite; its SRRL and CID columns are methods not run here.", "", conditions(found), ""]
    for when in ("last", "best"):
        lines += [f"## {IMAGENET_TITLES[when]}", ""]
        lines.append("| Pair | Accuracy | " + " | ".join(f"{col} | paper" for col in columns) + " |")
        lines.append("|" + "---|" * (2 + 2 * len(columns)))
        for pair in pairs:
            label = pair.replace(":", " → ")
            if pair in PAPER_IMAGENET:
                label = f"({'abcd'[list(PAPER_IMAGENET).index(pair)]}) {label}"
            for metric in ("top1", "top5"):
                row = [label if metric == "top1" else "", f"Top-{metric[3:]}"]
                for col in columns:
                    c = next(c for c in cells if c["table"] == f"{when}-{metric}" and c["row"] == col
                             and c["pair"] == pair)
                    row.append(_fmt(c["mean"], c["std"], c["n"] if col != "Teacher" else None))
                    row.append(_fmt(*c["paper"]) if c["paper"] else "–")
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def render_csv(cells):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["table", "row", "teacher", "student", "mean", "std", "n", "paper_mean", "paper_std"])
    for c in cells:
        teacher, student = c["pair"].split(":")
        paper = c["paper"] or (None, None)
        writer.writerow([c["table"], c["row"], teacher, student, *("" if v is None else round(v, 4) for v in
                         (c["mean"], c["std"])), c["n"], *("" if v is None else v for v in paper)])
    return out.getvalue()


def write_tables(tc):
    if tc.kind not in ("main", "ablations", "imagenet"):
        raise UserError(f"unknown --kind {tc.kind!r}; choose main, ablations or imagenet")
    bad = [path for path in tc.out.split() if not path.endswith((".md", ".csv"))]
    if bad:
        raise UserError(f"--out {bad[0]!r} must end in .md or .csv")
    collect_cells, render = (collect_imagenet, render_imagenet) if tc.kind == "imagenet" else (collect, render_markdown)
    cells, found = collect_cells(tc)
    if not tc.out:
        print(render(tc, cells, found))
    for path in tc.out.split():
        text = render_csv(cells) if path.endswith(".csv") else render(tc, cells, found)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save(text, path)
        missing = sum(c["n"] == 0 for c in cells)
        print(f"wrote {path} from {len(found)} finished runs" + (f"; {missing} cells missing" if missing else ""))


# --- projkd.py eval: a checkpoint evaluated alone ---------------------------------------------------------------

DATA_OPTIONS = ("dataset", "synthetic_size", "synthetic_classes", "image_size")  # what a test set depends on


@dataclass
class EvalOptions:
    arch: str = ""  # the checkpoint's architecture (a key of models.MODELS)
    ckpt: str = ""  # our model.pt, a RepDistiller/mdistiller checkpoint, a torchvision weight file or any state_dict
    out: str = ""  # the result as JSON; default: the checkpoint's path with the suffix .eval.json


EvalConfig = options_of("EvalConfig", EvalOptions,
                        DATA_OPTIONS + ("data_dir", "download", "workers", "eval_batch_size", "device"))


def evaluate_checkpoint(ec):
    """Top-1/top-5 of a checkpoint on the test (CIFAR) or validation (ImageNet) set, in float32; under torchrun
    each process evaluates a shard. The data settings of the run that made it (its metrics.json beside it) are
    used where --dataset and its sizes were left at their defaults. Prints the result and writes it as JSON."""
    if not ec.arch or not ec.ckpt:
        raise UserError("eval needs --arch and --ckpt, e.g. eval --arch vgg8 --ckpt runs/.../model.pt")
    if not os.path.isfile(ec.ckpt):
        raise UserError(f"no checkpoint at {ec.ckpt}")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        with open(os.path.join(os.path.dirname(ec.ckpt), "metrics.json")) as f:
            trained = json.load(f)["config"]
        taken = {k: trained[k] for k in DATA_OPTIONS if getattr(ec, k) == getattr(Config, k) != trained[k]}
        ec = dataclasses.replace(ec, **taken)
        if taken:
            log(f"note: {', '.join(f'{k}={v}' for k, v in taken.items())} from the run's metrics.json")
    if ec.dataset not in PROTOCOLS:
        raise UserError(f"unknown --dataset {ec.dataset!r}; choose {', '.join(PROTOCOLS)}")
    check_arch(ec.arch, "arch", ec.dataset)
    device = resolve_device(ec.device, int(os.environ.get("WORLD_SIZE", "1")))
    _, world = setup_torch(device)
    ec = dataclasses.replace(ec, eval_batch_size=ec.eval_batch_size or PROTOCOLS[ec.dataset]["eval_batch_size"],
                             workers=default_workers() if ec.workers is None else ec.workers)
    data = load_data(ec, device)
    memory_format = precision("off", device)[0]
    model = zoo().frozen_model(ec.arch, zoo().read_state_dict(ec.ckpt), data.num_classes, ec.ckpt)
    result = evaluate(model.to(device, memory_format=memory_format), data, ec.eval_batch_size, memory_format)
    out = ec.out or os.path.splitext(ec.ckpt)[0] + ".eval.json"
    record = {"arch": ec.arch, "ckpt": ec.ckpt, **{k: getattr(ec, k) for k in DATA_OPTIONS}, **result,
              "world_size": world, "device": device_name(device), "torch": torch.__version__}
    if _rank() == 0:
        save(record, out)
    log(f"{ec.arch} from {ec.ckpt} on {ec.dataset}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
        f"({result['images']} images) -> {out}")
    return record


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
