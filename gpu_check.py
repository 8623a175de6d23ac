"""`make gpu-check`: projkd's GPU paths checked on one GPU, in one prepared command
(docs/gpu-check.md).

Not part of the reference: a tool above projkd.py, as bench.py is. Make runs it one step at a time,
so that `make -n gpu-check` prints every command in full:

    python3 gpu_check.py start [--budget 480]   # refuses without CUDA; records the GPU, torch, CUDA
    python3 gpu_check.py step NAME [--timeout S] [--needs A,B] -- COMMAND ...
                                                # runs it, times it out, records it
    python3 gpu_check.py random-teacher --arch vgg13 --classes 100 --out PATH
                                                # when no teacher file is given
    python3 gpu_check.py report                 # results/gpu-check.md, .json; 1 if a check failed
    python3 gpu_check.py preflight [--off]      # make's GPU preflight: results/gpu-preflight.json

A step that fails or runs out of time is recorded and the check goes on; the budget (8 minutes: a
15-minute GPU lease can run the check and rerun it once) caps every step's timeout by what is left
of it.
"""
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import torch

import models
from projkd import UserError, cli_help, code_version, file_sha256, option, parse_args, save
from teacher_cache import read_cache_header

# the steps' records, logs and the tests' junit xml
CHECK_DIR = os.path.join("results", "gpu-check")
REPORT_MD, REPORT_JSON = os.path.join("results",
                                      "gpu-check.md"), os.path.join("results", "gpu-check.json")
# the short runs; the teacher cache stays (checkpoints/gpu-check)
RUNS_DIR = os.path.join("runs", "gpu-check")
BENCH_JSON, BENCH_MD = os.path.join("results", "bench.json"), os.path.join("results", "bench.md")
REPORT_RESERVE_S = 10  # of the budget, kept for the report
TAIL_LINES = 15  # of a step's output, kept in its record
# A fast run and a plain one with the same seed, data and draws differ only by rounding (bf16
# teacher rows, other kernels); over a few epochs that moves top-1 by about a point. Further apart,
# one of the two paths is wrong.
RUNS_TOP1_TOLERANCE = 5.0


@dataclass
class StartOptions:
    budget: float = option(480.0, "seconds the whole check may take: 8 minutes on one H100/H200")


@dataclass
class StepOptions:
    timeout: float = option(120.0, "seconds this step may take (less if the check's budget has "
                                   "less left)")
    needs: str = option("", "comma-separated steps that must have passed, if they ran (else this "
                            "one is skipped)")


@dataclass
class TeacherOptions:
    arch: str = option("vgg13", "the teacher architecture (a key of models.MODELS)")
    classes: int = option(100, "its number of classes")
    seed: int = option(0, "seeds its random initialisation")
    out: str = option("", "where its state_dict goes; a <out>.json beside it says how it was made")


def record_path(name):
    return os.path.join(CHECK_DIR, f"step-{name}.json")


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(obj, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save(obj, path)  # atomic; a failed write is one line


# --- start: the GPU, or one line saying there is none ---------------------------------------------

def no_gpu_line():
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"gpu-check: needs a CUDA GPU and torch {torch.__version__} ({build}) sees none; the "
            "CPU tests are "
            f"`make test`")


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def start(opts):
    """Refuses without CUDA, writing nothing; else clears the last check's records and runs and
    records the GPU."""
    if not torch.cuda.is_available():
        raise UserError(no_gpu_line())
    for old in (CHECK_DIR, RUNS_DIR):
        shutil.rmtree(old, ignore_errors=True)
    for old in (REPORT_MD, REPORT_JSON):
        if os.path.exists(old):
            os.remove(old)
    props = torch.cuda.get_device_properties(0)
    facts = {"started": time.time(), "budget_s": opts.budget, "gpu": props.name,
             "gpus": torch.cuda.device_count(),
             "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
             "compute_capability": f"{props.major}.{props.minor}", "driver": driver_version(),
             "torch": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0],
             "code": code_version(),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    write_json(facts, os.path.join(CHECK_DIR, "start.json"))
    print(f"gpu-check: {facts['gpus']} x {facts['gpu']}, torch {facts['torch']}, CUDA "
          f"{facts['cuda']}; "
          f"budget {opts.budget:.0f} s")


def started():
    facts = read_json(os.path.join(CHECK_DIR, "start.json"))
    if facts is None:
        raise UserError(f"no {os.path.join(CHECK_DIR, 'start.json')}: run `make gpu-check`, whose "
                        "first command "
                        f"(gpu_check.py start) checks for a GPU")
    return facts


# --- step: one command, timed out, recorded -------------------------------------------------------

def unmet_needs(needs):
    """Why a step cannot run: a step it needs that ran and did not pass (one that did not run is no
    obstacle)."""
    for name in filter(None, (n.strip() for n in needs.split(","))):
        record = read_json(record_path(name))
        if record is not None and record["status"] != "pass":
            return f"it needs step {name}, which did not pass ({record['status']})"
    return None


def run_command(command, timeout, log_path):
    """(exit status or None if it ran out of time, seconds, last lines): the command's output goes
    to the terminal and to log_path as it comes. Its own process group, so that a timeout ends all
    it started."""
    begin, tail = time.time(), []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)

        def pump():
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                tail.append(line.rstrip("\n"))
                del tail[:-TAIL_LINES]
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        reader.join(timeout=10)
    return rc, time.time() - begin, list(tail)


def step(opts, name, command):
    """Runs `command` as the check's step `name` and records it; exits 0 whatever it did, so the
    check goes on."""
    facts = started()
    if not re.fullmatch(r"[\w.-]+", name or ""):
        raise UserError(f"a step needs a name of letters, digits, '.', '_' or '-', got {name!r}")
    if not command:
        raise UserError("a step needs a command after --, e.g. step bench -- make bench")
    left = facts["started"] + facts["budget_s"] - REPORT_RESERVE_S - time.time()
    record = {"name": name, "command": command, "status": "skip", "rc": None, "seconds": 0.0,
              "reason": "",
              "log": os.path.join(CHECK_DIR, f"{name}.log"), "tail": [], "started": time.time()}
    why_not = unmet_needs(opts.needs)
    if why_not is None and left < 5:
        why_not = f"the check's {facts['budget_s']:.0f} s budget was spent before this step"
    if why_not is not None:
        record["reason"] = why_not
        print(f"gpu-check: step {name} skipped: {why_not}")
    else:
        timeout = min(opts.timeout, left)
        print(f"gpu-check: step {name} (at most {timeout:.0f} s): {' '.join(command)}", flush=True)
        rc, seconds, tail = run_command(command, timeout, record["log"])
        status = "timeout" if rc is None else "pass" if rc == 0 else "fail"
        reason = {"timeout": f"ran out of its {timeout:.0f} s", "fail": f"exit status {rc}",
                  "pass": ""}[status]
        record.update(status=status, rc=rc, seconds=round(seconds, 1), reason=reason, tail=tail)
        print(f"gpu-check: step {name}: {status} in {seconds:.0f} "
              f"s{f' ({reason})' if reason else ''}")
    write_json(record, record_path(name))


# --- random-teacher: a teacher file when none is given --------------------------------------------

def random_teacher(opts):
    """A randomly initialised teacher, so that the short runs time the real pair without a trained
    checkpoint."""
    if opts.arch not in models.MODELS or not opts.out:
        raise UserError(f"random-teacher needs --arch (one of {', '.join(models.MODELS)}) and "
                        f"--out PATH")
    torch.manual_seed(opts.seed)
    os.makedirs(os.path.dirname(opts.out) or ".", exist_ok=True)
    torch.save(models.MODELS[opts.arch](num_classes=opts.classes).state_dict(), opts.out)
    how = {"how": f"randomly initialised by gpu_check.py (seed {opts.seed}): no teacher file was "
                  f"given", "sha256": file_sha256(opts.out)}
    write_json(how, os.path.splitext(opts.out)[0] + ".json")  # read by projkd.teacher_provenance
    print(f"gpu-check: {opts.out}: a randomly initialised {opts.arch} ({opts.classes} classes)")


# --- differences: how far apart two results are that should be bitwise equal ----------------------

def tensor_differences(reference, other):
    """Per tensor of `reference` (a name -> tensor dict) that `other` does not equal bitwise: its
    name, largest absolute difference and largest relative one (to the larger magnitude of the two
    values), largest relative first."""
    rows = []
    for name, a in reference.items():
        b = other[name]
        if torch.equal(a, b):
            continue
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        gap = (a - b).abs()
        relative = gap / torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
        rows.append((name, gap.max().item(), relative.max().item()))
    return sorted(rows, key=lambda row: -row[2])


def first_difference(reference, other):
    """The index of the first value (a step's loss, an epoch's) that differs, or None."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    if len(reference) != len(other):
        return min(len(reference), len(other))
    return None


def difference_report(reference, other, reference_losses, other_losses, unit="step"):
    """What a failed bitwise comparison says: a first line with the first `unit` whose loss differs
    and the tensor furthest off, then one line per tensor that differs. Empty when both are bitwise
    equal."""
    first = first_difference(reference_losses, other_losses)
    tensors = tensor_differences(reference, other)
    if first is None and not tensors:
        return ""
    summary = [f"no {unit}'s loss differs"]
    if first is not None:
        losses = [values[first] if first < len(values) else "none"
                  for values in (reference_losses, other_losses)]
        summary = [f"first {unit} that differs: {first + 1} (loss {losses[0]!r} against "
                   f"{losses[1]!r})"]
    if tensors:
        name, gap, relative = tensors[0]
        summary.append(f"{len(tensors)} of {len(reference)} tensors differ, most {name} (largest "
                       f"absolute difference {gap:.3g}, relative {relative:.3g})")
    else:
        summary.append(f"all {len(reference)} tensors are bitwise equal")
    lines = ["; ".join(summary)]
    for name, gap, relative in tensors:
        lines.append(f"  {name}: largest absolute difference {gap:.3g}, relative {relative:.3g}")
    return "\n".join(lines)


# --- report: results/gpu-check.md and .json -------------------------------------------------------

def flag_value(command, flag):
    """The value after `flag` in a recorded command (the steps' commands are the record of what
    ran)."""
    return command[command.index(flag) + 1] if flag in command[:-1] else None


def test_results(xml_path, log_path):
    """One row per gpu test from pytest's junit xml; without one (pytest was cut off), from its -v
    log lines."""
    rows = []
    try:
        suite = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        suite = None
    for case in suite.iter("testcase") if suite is not None else ():
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        result = {"failure": "fail", "error": "fail",
                  "skipped": "skip"}.get(getattr(outcome, "tag", ""), "pass")
        detail = (outcome.get("message") or "").splitlines()[0] if outcome is not None else ""
        notes = [f"{p.get('name')}: {p.get('value')}" for p in case.iter("property")]
        rows.append({"check": f"test {case.get('name')}", "result": result,
                     "seconds": round(float(case.get("time") or 0), 1),
                     "detail": "; ".join(part for part in [detail, *notes] if part)})
    if suite is not None or not os.path.exists(log_path):
        return rows
    outcomes = {"PASSED": "pass", "FAILED": "fail", "ERROR": "fail", "SKIPPED": "skip"}
    with open(log_path, errors="replace") as f:
        for line in f:
            m = re.match(r"^\S+\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED)(?: \((.*)\))?", line)
            if m:
                rows.append({"check": f"test {m.group(1)}", "result": outcomes[m.group(2)],
                             "seconds": None,
                             "detail": " ".join(filter(None,
                                                       (m.group(3),
                                                        "(from the log: pytest did not finish)")))})
    return rows


def step_rows(records):
    labels = {"pass": "pass", "fail": "fail", "timeout": "fail", "skip": "skip"}
    rows = []
    for r in records:
        last = f"last line: {r['tail'][-1]}" if r["status"] != "pass" and r["tail"] else ""
        rows.append({"check": f"step {r['name']}", "result": labels[r["status"]],
                     "seconds": r["seconds"],
                     "detail": "; ".join(part for part in (r["reason"], last) if part)})
    return rows


def run_summary(record):
    """A short run's numbers from its metrics.json: per-epoch seconds and images/s, top-1, what it
    ran with."""
    command, run_dir = record["command"], flag_value(record["command"], "--run-dir")
    metrics = read_json(os.path.join(run_dir, "metrics.json"))
    summary = {"name": record["name"], "run_dir": run_dir,
               "dataset": flag_value(command, "--dataset"),
               "data_dir": flag_value(command, "--data-dir"),
               "synthetic_size": flag_value(command, "--synthetic-size"),
               "teacher_cache": flag_value(command, "--teacher-cache"),
               "graph": flag_value(command, "--graph"), "finished": metrics is not None}
    if metrics is None:
        return summary
    history = metrics["history"]
    later = history[1:] or history  # the first epoch also warms up: autotuning, the graph's capture
    summary.update(
        epochs=[{"epoch": h["epoch"], "seconds": h["seconds"], "images_per_s": h["images_per_s"],
                 "train_loss": h["train_loss"], "test_top1": h["test_top1"]} for h in history],
        steady_images_per_s=round(sum(h["images_per_s"] for h in later) / len(later), 1),
        images_per_s=metrics["images_per_s"], last_top1=metrics["last_top1"],
                   best_top1=metrics["best_top1"],
        teacher_top1=metrics["teacher_top1"],
                   teacher=(metrics.get("teacher_provenance") or {}).get("how"),
        device=metrics["device"])
    return summary


def cache_summary(record):
    path = flag_value(record["command"], "--teacher-cache-file")
    header = read_cache_header(path) if path else None
    if header is None:
        return {"file": path, "built": False}
    return {"file": path, "built": True, "build_seconds": header["build_seconds"],
            "images": header["images"],
            "views": header["views"], "gigabytes": round(os.path.getsize(path) / 1e9, 3),
            "device": header["device"],
            "built_by_this_check": record["seconds"] >= header["build_seconds"]}


def fresh(path, since):
    return os.path.exists(path) and os.path.getmtime(path) >= since


def runs_agree_row(runs):
    done = [r for r in runs if r["finished"]]
    if len(done) < 2:
        return []
    gap = abs(done[0]["last_top1"] - done[1]["last_top1"])
    return [{"check": f"runs {done[0]['name']} and {done[1]['name']} agree", "result":
             "pass" if gap <= RUNS_TOP1_TOLERANCE else "fail", "seconds": None,
             "detail": f"last top-1 {gap:.2f} points apart (tolerance {RUNS_TOP1_TOLERANCE:g})"}]


def collect(folder=CHECK_DIR):
    """Everything the report says, from the files the check's steps left."""
    facts = started()
    records = sorted(filter(None, (read_json(os.path.join(folder, f)) for f in os.listdir(folder)
                                   if f.startswith("step-"))), key=lambda r: r["started"])
    by_name = {r["name"]: r for r in records}
    runs = [run_summary(r) for r in records if "--run-dir" in r["command"] and "projkd.py"
            in " ".join(r["command"])]
    checks = step_rows(records) + runs_agree_row(runs)
    if "tests" in by_name:
        checks += test_results(os.path.join(folder, "tests.xml"), by_name["tests"]["log"])
    bench = {"table": None, "report": None}
    if fresh(BENCH_JSON, facts["started"]) and fresh(BENCH_MD, facts["started"]):
        bench = {"table": open(BENCH_MD).read().strip(), "report": read_json(BENCH_JSON)}
    cache = cache_summary(by_name["cache"]) if "cache" in by_name else None
    failed = [c["check"] for c in checks if c["result"] == "fail"]
    return {"gpu": {k: v for k, v in facts.items() if k not in ("started", "budget_s")},
            "budget_s": facts["budget_s"], "seconds": round(sum(r["seconds"] for r in records), 1),
            "passed": not failed, "failed": failed, "checks": checks, "bench": bench, "runs": runs,
            "cache": cache}


def data_line(run):
    if run["dataset"] == "cifar100":
        return f"CIFAR-100 from {run['data_dir']}"
    return (f"**synthetic data** ({run['synthetic_size']} generated training images, 100 classes): "
            "there is no "
            f"cifar-100-python/ in {run['data_dir']}, so these are not CIFAR-100's numbers")


def runs_markdown(runs, cache):
    lines = ["## The short runs: vgg13 -> vgg8, PEFD", ""]
    if not runs:
        return lines + ["No run was recorded.", ""]
    first = next((r for r in runs if r["finished"]), runs[0])
    lines += [f"Data: {data_line(first)}.", ""]
    if first["finished"]:
        lines += [f"Teacher: {first['teacher']} (its test top-1 {first['teacher_top1']:.2f}%).", ""]
    if cache and cache["built"]:
        earlier = "" if cache["built_by_this_check"] else " (by an earlier check)"
        lines += [f"Teacher cache: {cache['file']}, {cache['gigabytes']:.1f} GB, built in "
                  f"{cache['build_seconds']:.0f} s on {cache['device']}{earlier}.", ""]
    lines += ["| run | teacher cache | CUDA graph | seconds per epoch | images/s per epoch | "
              "images/s after the first epoch | last top-1 | best top-1 |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if not r["finished"]:
            lines.append(f"| {r['name']} | {r['teacher_cache']} | {r['graph']} | did not finish "
                         f"| | | | |")
            continue
        seconds = ", ".join(f"{e['seconds']:.1f}" for e in r["epochs"])
        speeds = ", ".join(f"{e['images_per_s']:,.0f}" for e in r["epochs"])
        lines.append(f"| {r['name']} | {r['teacher_cache']} | {r['graph']} | {seconds} | "
                     f"{speeds} | {r['steady_images_per_s']:,.0f} | {r['last_top1']:.2f} | "
                     f"{r['best_top1']:.2f} |")
    done = [r for r in runs if r["finished"]]
    if len(done) == 2 and done[1]["steady_images_per_s"]:
        ratio = done[0]["steady_images_per_s"] / done[1]["steady_images_per_s"]
        lines += ["", f"{done[0]['name']} trains {ratio:.2f}x as many images per second as "
                      f"{done[1]['name']} (epochs after the first)."]
    return lines + [""]


def render_markdown(report):
    gpu = report["gpu"]
    counts = {k: sum(c["result"] == k for c in report["checks"]) for k in ("pass", "fail", "skip")}
    lines = [f"# make gpu-check: {gpu['gpu']}", "",
             f"{gpu['date']}: {gpu['gpus']} x {gpu['gpu']} ({gpu['gpu_memory_gib']} GiB, compute "
             f"capability {gpu['compute_capability']}, driver {gpu['driver'] or 'unknown'}); "
             f"torch {gpu['torch']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}, Python "
             f"{gpu['python']}; code {gpu['code']}.", "",
             f"**{'Passed' if report['passed'] else 'Failed'}**: {counts['pass']} checks passed, "
             f"{counts['fail']} failed, {counts['skip']} skipped; the steps took "
             f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             "## Checks", "", "| check | result | seconds | detail |", "|---|---|---|---|"]
    for c in report["checks"]:
        seconds = "" if c["seconds"] is None else f"{c['seconds']:.1f}"
        detail = c["detail"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c['check']} | {c['result']} | {seconds} | {detail} |")
    lines += ["", "## Bench (make bench: results/bench.md)", ""]
    lines += [report["bench"]["table"]
              or "No bench table from this check: the bench step did not write one.", ""]
    return "\n".join(lines + runs_markdown(report["runs"], report["cache"]))


def write_report(report, md_path=REPORT_MD, json_path=REPORT_JSON):
    os.makedirs(os.path.dirname(md_path) or ".", exist_ok=True)
    with open(md_path, "w") as f:
        f.write(render_markdown(report) + "\n")
    write_json(report, json_path)


def report_command(_opts):
    """Writes the report; exit status 1 if any check failed (every step has already run)."""
    report = collect()
    write_report(report)
    print("\n".join(line for line in render_markdown(report).splitlines() if line.startswith("| ")
                    and " | " in line and not line.startswith("| run ")))
    verdict = "passed"
    if not report["passed"]:
        verdict = "FAILED: " + ", ".join(report["failed"])
    print(f"gpu-check: {verdict} -> {REPORT_MD}, {REPORT_JSON}")
    return 0 if report["passed"] else 1


# --- preflight: the checks that guard the default path, before a pipeline spends GPU-hours --------

PREFLIGHT_JSON = os.path.join("results", "gpu-preflight.json")
# The checks and the test_gpu.py tests that make each: the default path of a run on a GPU (the CUDA
# graph, the teacher cache, bf16 autocast, evaluation in bf16 and channels_last). The tests say
# their tolerances.
PREFLIGHT_CHECKS = {
    "graph = eager": "test_graph_step_matches_the_eager_step_in_bf16",
    "cache = live": "test_cached_rows_are_the_live_teachers_on_cuda_for_every_view",
    "bf16 losses finite and falling": "test_bf16_and_fp16_train_with_finite_falling_losses[bf16]",
    "eval on CUDA = eval on CPU":
        "test_evaluate_on_cuda_in_channels_last_and_bf16_matches_cpu_fp32",
}


@dataclass
class PreflightOptions:
    out: str = option(PREFLIGHT_JSON, "the report: made once per GPU model and torch version")
    timeout: float = option(180.0, "seconds the checks may take")
    off: bool = option(False, "PREFLIGHT=off: record that the checks were skipped, and check "
                              "nothing")


def preflight_verdicts(rows):
    """One row per check from the test rows (test_results): a check passes only if its test ran and
    passed; a skipped one proved nothing."""
    by_test = {row["check"].removeprefix("test "): row for row in rows}
    verdicts = []
    for check, test in PREFLIGHT_CHECKS.items():
        row = by_test.get(test, {"result": "fail", "seconds": None, "detail": "did not run"})
        result = "pass" if row["result"] == "pass" else "fail"
        detail = row["detail"] or ("" if result == "pass" else "skipped")
        verdicts.append({"check": check, "test": test, "result": result, "seconds": row["seconds"],
                         "detail": detail})
    return verdicts


def preflight_command(opts):
    """Runs the preflight checks through pytest, unless opts.out already holds a passed report of
    this GPU model and torch version; writes opts.out either way. Exit status 1 and one line if a
    check failed."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if opts.off:
        off = {"status": "off", "torch": torch.__version__, "code": code_version(), "date": now}
        write_json(off, opts.out)
        print(f"gpu-preflight: off (PREFLIGHT=off): the GPU is not checked before the trainings; "
              f"the tables' conditions say so ({opts.out})")
        return 0
    if not torch.cuda.is_available():
        raise UserError(f"the preflight needs a CUDA GPU and torch {torch.__version__} sees none: "
                        f"run it through LAUNCH on a GPU node, or train with DEVICE=cpu (no "
                        f"preflight)")
    if importlib.util.find_spec("pytest") is None:
        raise UserError("the preflight runs test_gpu.py's checks with pytest, which "
                        f"{sys.executable} cannot "
                        f"import: pip install pytest (requirements.txt lists it), or PREFLIGHT=off")
    gpu = torch.cuda.get_device_name(0)
    earlier = read_json(opts.out) or {}
    if earlier.get("status") == "passed" and (earlier.get("gpu"), earlier.get("torch")) == \
            (gpu, torch.__version__):
        print(f"gpu-preflight: passed on {gpu} with torch {torch.__version__} ({earlier['date']}): "
              f"{opts.out}")
        return 0
    folder = os.path.join(os.path.dirname(opts.out) or ".", "gpu-preflight")
    os.makedirs(folder, exist_ok=True)
    xml, log_path = os.path.join(folder, "tests.xml"), os.path.join(folder, "tests.log")
    if os.path.exists(xml):
        os.remove(xml)  # an earlier preflight's
    test_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_gpu.py")
    command = [sys.executable, "-m", "pytest", "-v", "-rs", "-m", "gpu", "-o",
               "junit_family=legacy",
               "--junitxml", xml, *(f"{test_file}::{test}" for test in PREFLIGHT_CHECKS.values())]
    print(f"gpu-preflight: checking {gpu} with torch {torch.__version__} (at most "
          f"{opts.timeout:.0f} s): "
          f"{', '.join(PREFLIGHT_CHECKS)}", flush=True)
    rc, seconds, _ = run_command(command, opts.timeout, log_path)
    checks = preflight_verdicts(test_results(xml, log_path))
    failed = [c for c in checks if c["result"] != "pass"]
    if rc is None:
        failed = failed or [{"check": "time",
                             "detail": f"the checks ran out of their {opts.timeout:.0f} s"}]
    report = {"status": "failed" if failed else "passed", "gpu": gpu, "torch": torch.__version__,
              "cuda": torch.version.cuda, "code": code_version(), "seconds": round(seconds, 1),
              "date": now, "checks": checks, "log": log_path}
    write_json(report, opts.out)
    if failed:
        first = failed[0]
        print(f"gpu-preflight: FAILED: {first['check']}: {first['detail']} (report {opts.out}, log "
              f"{log_path}); PREFLIGHT=off trains without the check", file=sys.stderr)
        return 1
    print(f"gpu-preflight: passed on {gpu} with torch {torch.__version__} in {seconds:.0f} s: "
          f"{opts.out}")
    return 0


@dataclass
class NoOptions:
    pass


COMMANDS = {"start": (start, StartOptions), "random-teacher": (random_teacher, TeacherOptions),
            "report": (report_command, NoOptions),
            "preflight": (preflight_command, PreflightOptions)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    names = ", ".join([*COMMANDS, "step"])
    try:
        if not argv or argv[0] not in (*COMMANDS, "step"):
            raise UserError(f"usage: gpu_check.py COMMAND [options], COMMAND one of {names} (make "
                            "gpu-check runs "
                            f"them in order)")
        schema = StepOptions if argv[0] == "step" else COMMANDS[argv[0]][1]
        options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
        if "-h" in options or "--help" in options:
            usage = f"python3 gpu_check.py {argv[0]} [options]"
            if argv[0] == "step":
                usage = "python3 gpu_check.py step NAME [options] -- COMMAND ..."
            print(cli_help(schema, __doc__, usage))
            return 0
        if argv[0] == "step":
            rest = argv[2:]
            split = rest.index("--") if "--" in rest else len(rest)
            step(parse_args(rest[:split], StepOptions), argv[1] if len(argv) > 1 else "",
                 rest[split + 1:])
            return 0
        command = COMMANDS[argv[0]][0]
        return command(parse_args(argv[1:], schema)) or 0
    except UserError as e:
        line = str(e) if str(e).startswith("gpu-check:") else f"gpu-check: error: {e}"
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
