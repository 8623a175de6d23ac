"""Tests for the Make pipeline (Makefile, params.mk): its plans (make -n), and a small real pipeline
on generated data that trains, evaluates and tabulates through the launcher, redoes nothing and
continues an interrupted run."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import fetch
import projkd
from conftest import HERE, IMAGENET_PAIRS, calls, linked_figures, make


def test_download_without_internet_is_one_line_from_make(tmp_path):
    # offline, surely
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    result = subprocess.run(["make", "--no-print-directory", "cifar-all",
                             f"DATA_DIR={tmp_path}/data", "DEPS=", f"PY={sys.executable}",
                             "PLAN_COST="],
                            capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"projkd: error: downloading CIFAR-100 into {tmp_path}/data failed" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing half-downloaded left behind


def path_with_nvidia_smi(folder, listing="GPU 0: NVIDIA H200 (UUID: GPU-0)"):
    """The environment with a stand-in nvidia-smi first on PATH, listing `listing` (empty: no
    GPU)."""
    fake = folder / "bin" / "nvidia-smi"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!/bin/sh\necho '{listing}'\n")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}


@pytest.mark.parametrize("teachers_from", ["fetch", "train"])
def test_make_plan_for_cifar_all_gets_each_teacher_once(tmp_path, teachers_from):
    knobs = [] if teachers_from == "fetch" else ["TEACHERS_FROM=train"]  # fetch: the default
    env = path_with_nvidia_smi(tmp_path)
    plan = make("-n", "cifar-all", "DEPS=", "DATA=", f"PY={sys.executable}", *knobs,
                env=env).stdout
    # trainings, not teacher caches
    commands = [line for line in plan.splitlines() if "projkd.py --dataset" in line]
    fetched = [c for c in plan.splitlines() if "projkd.py fetch-teachers " in c]
    copied = [c for c in plan.splitlines() if c.startswith("cp runs/cifar100/")]
    teachers = ["ResNet50", "resnet32x4", "vgg13", "wrn_40_2"]
    if teachers_from == "fetch":
        assert not copied
        assert sorted(c.split("--arch ")[1].split()[0] for c in fetched) == teachers
        vgg13 = (f"{sys.executable} projkd.py fetch-teachers --arch vgg13 "
                 f"--url {fetch.TEACHERS_URL} --out-dir checkpoints/cifar100 --dataset cifar100 "
                 "--data-dir data --device auto")
        assert vgg13 in fetched
    else:
        assert not fetched and sorted(t.split("/")[2] for t in copied) == teachers
    alone = [c for c in commands if "--method ce" in c]
    distill = [c for c in commands if "--method ce" not in c]
    # 4 teachers when trained; 4 students x 3 seeds (vgg8's Student runs serve two pairs)
    assert len(alone) == 4 * (teachers_from == "train") + 4 * 3
    assert len(distill) == 5 * 4 * 3  # 5 pairs x (pefd kd sp crd) x 3 seeds
    assert len(set(commands)) == len(commands)
    # DEVICE=auto on a machine with a GPU: each teacher's output cache is built once
    # (test_make_plan_teacher_cache_...)
    caches = [c for c in plan.splitlines() if "projkd.py cache " in c]
    cached = sorted(c.split("--teacher ")[1].split()[0] for c in caches)
    assert cached == ["ResNet50", "resnet32x4", "vgg13", "wrn_40_2"]
    # every parameter of the pipeline is spelled out in the echoed command
    one = next(c for c in distill if "--run-dir runs/cifar100/vgg13-vgg8/pefd-seed2" in c)
    for flag in ("--dataset cifar100", "--data-dir data", "--device auto", "--epochs 240",
                 "--teacher vgg13", "--teacher-ckpt checkpoints/cifar100/vgg13.pt",
                 "--teacher-cache on", "--teacher-cache-file checkpoints/cifar100/vgg13.tcache",
                 "--student vgg8", "--method pefd", "--seed 2", "--resume"):
        assert flag in one
    assert plan.count("tables.py") == 1
    assert '--out "results/cifar100.md results/cifar100.csv" --figures results/figures' in plan
    # the evaluation step: each run's model.pt and each teacher checkpoint evaluated alone, once,
    # before the tables
    evals = [c.split("--ckpt ")[1].split()[0] for c in plan.splitlines() if " projkd.py eval " in c]
    runs = [c.split("--run-dir ")[1].split()[0] for c in commands]
    # when trained, their copies are evaluated
    teacher_runs = [f"runs/cifar100/{t}/ce-seed1" for t in teachers]
    assert sorted(evals) == sorted([f"{r}/model.pt" for r in runs if r not in teacher_runs] +
                                   [f"checkpoints/cifar100/{t}.pt" for t in teachers])
    assert len(evals) == 12 + 60 + 4 and plan.index(" projkd.py eval ") < plan.index("tables.py")


def test_make_plan_for_ablations_and_short_runs():
    plan = make("-n", "ablations", "DEPS=", "DATA=", "EPOCHS=2", "SEEDS=1",
                f"PY={sys.executable}").stdout
    runs = [line for line in plan.splitlines()
            if "projkd.py --dataset" in line and "--teacher " in line]
    assert len(runs) == 2 * 10  # 2 pairs x (PEFD + 9 variants)
    assert any("--q 0 " in r and "pefd-q0-seed1" in r for r in runs)
    assert any("--proj-depth 4 " in r for r in runs) and any("--proj-act none " in r for r in runs)
    # apart from real runs
    assert all("runs/cifar100-e2/" in r and "checkpoints/cifar100-e2/" in r for r in runs)
    # the paper's teachers whatever the students' EPOCHS, fetched into the trial's own folder (not
    # trained for 2 epochs)
    fetched = [line for line in plan.splitlines() if "projkd.py fetch-teachers " in line]
    assert sorted(f.split("--arch ")[1].split()[0] for f in fetched) == ["resnet32x4", "vgg13"]
    assert all("--out-dir checkpoints/cifar100-e2 " in f for f in fetched)
    assert not any("--method ce" in line for line in plan.splitlines())
    assert "--out results/cifar100-e2/ablations.md --figures results/cifar100-e2/figures" in plan


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A small real pipeline, `make -j2 cifar-all` on synthetic data: a teacher, its PEFD student
    and the Student row, every command that computes started through a stand-in launcher that logs
    it (as srun would run it)."""
    root = tmp_path_factory.mktemp("pipeline")
    launcher, log = root / "launch", root / "launched.log"
    launcher.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec "$@"\n')
    launcher.chmod(0o755)
    knobs = [f"PY={sys.executable}", "DEPS=", "DATASET=synthetic", "EPOCHS=1", "SEEDS=1",
             "DEVICE=cpu", "PAIRS=resnet20:resnet8", "METHODS=pefd ce", f"RUNS={root}/runs",
             f"TEACHERS={root}/ckpt", f"RESULTS={root}/results",
             "EXTRA=--synthetic-size 256 --batch-size 32", "EVAL_EXTRA=--synthetic-size 256",
             f"LAUNCH={launcher}"]
    # the student's two runs side by side, after the teacher
    first = make("-j2", "cifar-all", *knobs)
    assert first.returncode == 0, first.stderr
    return root, knobs, first, log


def test_make_pipeline_trains_evaluates_and_tabulates_through_the_launcher(pipeline):
    root, knobs, first, log = pipeline
    assert (root / "ckpt" / "resnet20.pt").exists()
    table = (root / "results" / "synthetic.md").read_text()
    run_dir = root / "runs" / "resnet20-resnet8" / "pefd-seed1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # make's record, checked against the run's model.pt
    provenance = metrics["teacher_provenance"]
    assert provenance["how"] == "trained here"
    assert f"teachers: resnet20 (trained here, sha256 {provenance['sha256'][:12]});" in table
    assert "| PEFD |" in table and "(n=1)" in table and "missing" not in table.split("## ")[1]
    computing = [line.split() for line in first.stdout.splitlines() if "projkd.py" in line]
    # trainings (teacher, PEFD, Student), evaluations (their model files)
    assert len(computing) == 3 + 3
    assert all(c[:3] == [str(root / "launch"), sys.executable, "projkd.py"] for c in computing)
    launched = sorted(line.split() for line in log.read_text().splitlines())
    assert launched == sorted(c[1:] for c in computing)
    # not launched
    output = first.stdout.splitlines()
    assert any(line.startswith(f"{sys.executable} tables.py ") for line in output)
    # its figures, linked from the table; a curve is the run's log.csv
    import tables
    assert sorted(p.name for p in linked_figures(root / "results" / "synthetic.md")) == [
        "cosine.png", "resnet20-resnet8-curves.png"]
    tc = tables.TableConfig(runs=f"{root}/runs", pairs="resnet20:resnet8", methods="pefd ce",
                            seeds="1")
    curves, _ = tables.curve_series(tc, "resnet20:resnet8", ("test_top1",))
    log_csv = root / "runs" / "resnet20-resnet8" / "pefd-seed1" / "log.csv"
    assert [mean for _, mean, _, _ in curves["test_top1"]["PEFD"]] == [
        float(row["test_top1"]) for row in csv.DictReader(open(log_csv))]
    assert list(curves["test_top1"]) == ["Student", "PEFD"]


def test_make_pipeline_evaluates_every_model_from_its_file(pipeline, tmp_path):
    import tables

    root, knobs, first, _ = pipeline
    evals = [line for line in first.stdout.splitlines() if " projkd.py eval " in line]
    assert sorted(e.split("--ckpt ")[1].split()[0] for e in evals) == sorted(
        [f"{root}/ckpt/resnet20.pt", f"{root}/runs/resnet8/ce-seed1/model.pt",
         f"{root}/runs/resnet20-resnet8/pefd-seed1/model.pt"])
    for run in ("resnet8/ce-seed1", "resnet20-resnet8/pefd-seed1"):
        metrics = json.loads((root / "runs" / run / "metrics.json").read_text())
        evaluated = json.loads((root / "runs" / run / "model.eval.json").read_text())
        # log rounding only
        assert evaluated["top1"] == pytest.approx(metrics["last_top1"], abs=1e-4)
        # from the run's metrics.json
        assert evaluated["images"] == 64 and evaluated["synthetic_size"] == 256
        assert evaluated["sha256"] == projkd.file_sha256(root / "runs" / run / "model.pt")
    teacher = json.loads((root / "ckpt" / "resnet20.eval.json").read_text())
    # the same 64 test images, via EVAL_EXTRA
    assert teacher["test_set_sha256"] == evaluated["test_set_sha256"]
    assert f"| Teacher | {teacher['top1']:.2f} |" in (root / "results" / "synthetic.md").read_text()
    assert "[^" not in (root / "results" / "synthetic.md").read_text()  # no disagreement to mark
    # a model.pt changed after training (in a copy): its evaluation and the table's footnote show it
    copy = tmp_path / "runs" / "resnet20-resnet8" / "pefd-seed1"
    shutil.copytree(root / "runs" / "resnet20-resnet8" / "pefd-seed1", copy)
    state = torch.load(copy / "model.pt", weights_only=True)
    state["fc.bias"][0] += 100.0  # every test image now goes to class 0, which 7 of the 64 are
    torch.save(state, copy / "model.pt")
    assert projkd.main(["eval", "--arch", "resnet8", "--ckpt", str(copy / "model.pt")]) == 0
    assert json.loads((copy / "model.eval.json").read_text())["top1"] == 100 * 7 / 64
    assert tables.main(["--runs", str(tmp_path / "runs"), "--pairs", "resnet20:resnet8",
                        "--methods", "pefd", "--seeds", "1", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| PEFD | 10.94 (n=1) [^1] |" in text
    assert (f"[^1]: {copy}: model.pt evaluates to 10.94% top-1 alone, the training loop's last "
            f"epoch measured {metrics['last_top1']:.2f}%") in text


def test_make_pipeline_redoes_nothing_and_continues_an_interrupted_run(pipeline):
    root, knobs, _, log = pipeline
    # up to date: nothing would run or evaluate again
    assert make("-q", "cifar-all", *knobs).returncode == 0
    # an interrupted run (last.pt but no metrics.json) is continued and evaluated again, and nothing
    # else is redone
    pefd = root / "runs" / "resnet20-resnet8" / "pefd-seed1"
    os.remove(pefd / "metrics.json")
    again = make("cifar-all", *knobs)
    assert again.returncode == 0, again.stderr
    commands = [line.split()[3] for line in again.stdout.splitlines() if " projkd.py" in line]
    assert commands == ["--dataset", "eval"]
    assert f"resuming {pefd} after epoch 1" in again.stdout


def plan_lines(*args):
    return make("-n", *args, "DEPS=", "DATA=", f"PY={sys.executable}").stdout.splitlines()


def test_make_plan_for_imagenet_all():
    plan = plan_lines("imagenet-all")
    trainings = [line for line in plan if "projkd.py --dataset" in line]
    torchrun = f"{sys.executable} torchrun_signals.py --standalone --nproc_per_node=1 projkd.py"
    start = f"{torchrun} --dataset imagenet --data-dir data/imagenet --device auto --epochs 100 "
    assert all(t.startswith(start) for t in trainings)
    expected = [f"{p.replace(':', '-')}/{m}-seed1"
                for p in IMAGENET_PAIRS.split() for m in ("pefd", "kd")]
    # the Student rows, each shared by two pairs
    expected += ["resnet18/ce-seed1", "mobilenet_v1/ce-seed1"]
    run_dirs = sorted(t.split("--run-dir ")[1].split()[0] for t in trainings)
    assert run_dirs == sorted(f"runs/imagenet/{e}" for e in expected)
    assert all(f"--teacher-ckpt checkpoints/imagenet/{t.split('--teacher ')[1].split()[0]}.pt " in t
               for t in trainings if "--method ce" not in t)
    assert sorted(line for line in plan if "fetch-weights" in line) == sorted(
        f"{sys.executable} projkd.py fetch-weights --arch {a} --out checkpoints/imagenet/{a}.pt"
        for a in ("densenet201", "resnet34", "resnet50"))
    assert not any("tcache" in line for line in plan)  # never on ImageNet
    assert (f'{sys.executable} tables.py --kind imagenet --runs runs/imagenet '
            f'--teachers checkpoints/imagenet --pairs "{IMAGENET_PAIRS}" --methods "pefd kd ce" '
            '--seeds "1" --out "results/imagenet.md results/imagenet.csv" '
            '--figures results/figures') in plan
    # each finished model evaluated alone, once: 10 runs and 3 teachers, on one GPU, without
    # torchrun
    evals = [line for line in plan if " projkd.py eval " in line]
    assert sorted(e.split("--ckpt ")[1].split()[0] for e in evals) == sorted(
        [f"runs/imagenet/{e}/model.pt" for e in expected] +
        [f"checkpoints/imagenet/{a}.pt" for a in ("densenet201", "resnet34", "resnet50")])
    assert all(e.startswith(f"{sys.executable} projkd.py eval --arch ")
               and "--dataset imagenet --data-dir data/imagenet --device auto" in e for e in evals)
    # more GPUs per run, seeds and a short trial, which gets folders of its own but the same
    # pretrained teachers
    plan = plan_lines("imagenet-all", "NPROC=8", "IMAGENET_SEEDS=1 2", "IMAGENET_EPOCHS=2")
    trainings = [line for line in plan if "projkd.py --dataset" in line]
    assert len(trainings) == 2 * 10 and all("--nproc_per_node=8 projkd.py" in t for t in trainings)
    assert all("--run-dir runs/imagenet-e2/" in t and "--epochs 2 " in t for t in trainings)
    fetches = [line for line in plan if "fetch-weights" in line and "checkpoints/imagenet/" in line]
    assert len(fetches) == 3
    out = '--out "results/imagenet-e2/imagenet.md results/imagenet-e2/imagenet.csv"'
    assert any(out in line for line in plan)
    # one pair alone: its runs and its teacher, then the whole table from whatever has finished
    plan = plan_lines("imagenet-r34-r18")
    run_dirs = [line.split("--run-dir ")[1].split()[0]
                for line in plan if "projkd.py --dataset" in line]
    assert sorted(run_dirs) == ["runs/imagenet/resnet18/ce-seed1",
                                "runs/imagenet/resnet34-resnet18/kd-seed1",
                                "runs/imagenet/resnet34-resnet18/pefd-seed1"]
    fetched = [line.split("--arch ")[1].split()[0] for line in plan if "fetch-weights" in line]
    assert fetched == ["resnet34"]
    tables = (f'tables.py --kind imagenet --runs runs/imagenet --teachers checkpoints/imagenet '
              f'--pairs "{IMAGENET_PAIRS}"')
    assert any(tables in line for line in plan)


def test_make_plan_launch_prefixes_exactly_what_computes(tmp_path):
    launch = "srun -N1 -n1 --gres=gpu:1"
    plan = plan_lines("cifar-all", f"LAUNCH={launch}")
    launched = [line for line in plan if line.startswith(launch + " ")]
    computes = ("projkd.py --dataset", "projkd.py cache", "projkd.py eval",
                "gpu_check.py preflight")
    assert launched == [line for line in plan if any(c in line for c in computes)]
    # the GPU preflight, models alone, distillations, caches, evaluations
    assert len(launched) == 1 + 12 + 60 + 4 + 76
    # the tables run here
    assert any(line.startswith(f"{sys.executable} tables.py ") for line in plan)
    # it needs internet
    assert any(line.startswith(f"{sys.executable} projkd.py fetch-teachers ") for line in plan)
    plan = plan_lines("imagenet-all", f"LAUNCH={launch}", "NPROC=4")
    launched = [line for line in plan if line.startswith(launch + " ")]
    torchrun = f"{launch} {sys.executable} torchrun_signals.py --standalone --nproc_per_node=4 "
    # evaluations: 1 GPU
    trainings = [line for line in launched if " eval " not in line and " preflight " not in line]
    assert len(launched) == 1 + 10 + 13 and all(line.startswith(torchrun) for line in trainings)
    assert any(line.startswith(f"{sys.executable} projkd.py fetch-weights ") for line in plan)
    # its figure is drawn here, as the tables are
    assert plan_lines("bench", f"LAUNCH={launch}")[-2:] == [
        f"{launch} {sys.executable} projkd.py bench --device auto --out-dir results",
        f"{sys.executable} tables.py --kind bench --bench results/bench.json "
        "--figures results/figures"]
    # the download (it needs the login node's internet) is not launched; one command, without a
    # traceback offline
    plan = make("-n", "cifar-all", f"LAUNCH={launch}", f"DATA_DIR={tmp_path}", "DEPS=",
                f"PY={sys.executable}").stdout
    download = f"{sys.executable} projkd.py download --dataset cifar100 --data-dir {tmp_path}"
    assert download in plan.splitlines()


STAND_IN_PYTHON = """#!{python}
# Stands in for python in Make tests: logs its arguments, writes the files the real command would,
# empty.
import os, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
def touch(path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    open(path, "w").close()
def value(flag):
    return args[args.index(flag) + 1]
if args[0] == "plan_cost.py":
    pass
elif "fetch-teachers" in args and os.environ.get("OFFLINE"):
    sys.exit("projkd: error: offline: put vgg13's ckpt_epoch_240.pth at "
             + value("--out-dir") + "/vgg13.pt")
elif "--run-dir" in args:
    touch(os.path.join(value("--run-dir"), "model.pt"))
    touch(os.path.join(value("--run-dir"), "metrics.json"))
elif "cache" in args:
    touch(value("--teacher-cache-file"))
elif "eval" in args:
    touch(os.path.splitext(value("--ckpt"))[0] + ".eval.json")
elif "fetch-teachers" in args:
    touch(os.path.join(value("--out-dir"), value("--arch") + ".pt"))
else:  # fetch-weights --out PATH, tables.py --out "PATH ..."
    for path in value("--out").split():
        touch(path)
"""


def stand_in_python(tmp_path):
    python, log = tmp_path / "python", tmp_path / "calls.log"
    python.write_text(STAND_IN_PYTHON.format(python=sys.executable, log=str(log)))
    python.chmod(0o755)
    return python, log


def test_make_plan_teacher_cache_only_for_pefd_kd_crd_on_a_gpu():
    plan = plan_lines("cifar-all", "SEEDS=1", "DEVICE=cuda")
    caches = [line for line in plan if "projkd.py cache " in line]
    assert len(caches) == 4  # one per teacher, each shared by its pairs (ResNet50 has two)
    for cache in caches:
        t = cache.split("--teacher ")[1].split()[0]
        assert cache == (f"{sys.executable} projkd.py cache --teacher {t} "
                         f"--teacher-ckpt checkpoints/cifar100/{t}.pt "
                         f"--teacher-cache-file checkpoints/cifar100/{t}.tcache --dataset cifar100 "
                         "--data-dir data --device cuda ")
    runs = [line for line in plan if "projkd.py --dataset" in line and "--teacher " in line]
    assert len(runs) == 5 * 4
    for run in runs:
        t, method = run.split("--teacher ")[1].split()[0], run.split("--method ")[1].split()[0]
        flags = f"--teacher-cache on --teacher-cache-file checkpoints/cifar100/{t}.tcache "
        assert (flags in run) == (method in ("pefd", "kd", "crd")), run
        cache = next(c for c in caches if f"--teacher {t} " in c)
        assert plan.index(cache) < plan.index(run)  # built before any run that reads it
    on_cpu = plan_lines("pair", "T=vgg13", "S=vgg8", "SEEDS=1", "TEACHER_CACHE=on", "DEVICE=cpu")
    # asked for
    assert "--teacher-cache on " in on_cpu[-1]
    assert any("projkd.py cache " in line for line in on_cpu)
    # auto: a CPU would take hours to build it
    for knobs in (["DEVICE=cpu"], ["TEACHER_CACHE=off"]):
        plan = plan_lines("cifar-all", "ablations", "SEEDS=1", *knobs)
        assert not any("tcache" in line for line in plan)


def test_git_ignores_what_the_readme_has_users_make():
    made = [".venv/bin/python", ".venv-cpu/bin/python", "data/cifar-100-python/train",
            "runs/x/metrics.json", "results/x.md", "checkpoints/cifar100/vgg13.pt",
            ".deps-installed"]
    ignored = subprocess.run(["git", "check-ignore", *made], cwd=HERE, capture_output=True,
                             text=True).stdout.split()
    assert ignored == made


def test_make_device_auto_plans_teacher_caches_only_where_a_gpu_is_visible(tmp_path):
    """DEVICE=auto (the default) means the CPU where nvidia-smi lists no GPU: no cache builds
    planned there."""
    for listing in ("", "GPU 0: NVIDIA H200 (UUID: GPU-0)"):
        env = path_with_nvidia_smi(tmp_path, listing)
        plan = make("-n", "pair", "T=vgg13", "S=vgg8", "SEEDS=1", "DEPS=", "DATA=",
                    f"PY={sys.executable}", env=env)
        assert ("projkd.py cache " in plan.stdout) == bool(listing), plan.stdout


def test_make_builds_each_teacher_cache_once_and_only_when_a_run_needs_it(tmp_path):
    python, log = stand_in_python(tmp_path)
    # PREFLIGHT_GPU= : without the GPU preflight, which every make on a GPU runs (test_gpu_check.py)
    knobs = [f"PY={python}", "DEPS=", "DATASET=synthetic", "DEVICE=cuda",
             "PAIRS=resnet20:resnet8 resnet20:resnet14", "SEEDS=1 2", f"RUNS={tmp_path}/runs",
             f"TEACHERS={tmp_path}/ckpt", f"RESULTS={tmp_path}/results", "PREFLIGHT_GPU="]
    first = make("-j4", "cifar-all", *knobs)
    assert first.returncode == 0, first.stderr
    log_lines = calls(log)
    cache = [i for i, c in enumerate(log_lines) if c.startswith("projkd.py cache ")]
    assert len(cache) == 1
    assert f"--teacher-cache-file {tmp_path}/ckpt/resnet20.tcache " in log_lines[cache[0]] + " "
    readers = [i for i, c in enumerate(log_lines)
               if "--teacher-cache-file" in c and "--run-dir" in c]
    # 2 pairs x (pefd kd crd) x 2 seeds, after the cache
    assert len(readers) == 2 * 3 * 2 and min(readers) > cache[0]
    # up to date
    assert make("cifar-all", *knobs).returncode == 0 and len(calls(log)) == len(log_lines)
    # the cache file is only needed while a run is to be done: deleting it redoes nothing, a run to
    # redo rebuilds it
    os.remove(tmp_path / "ckpt" / "resnet20.tcache")
    assert make("cifar-all", *knobs).returncode == 0 and len(calls(log)) == len(log_lines)
    os.remove(tmp_path / "runs" / "resnet20-resnet8" / "kd-seed2" / "metrics.json")
    assert make("cifar-all", *knobs).returncode == 0
    redone = calls(log)[len(log_lines):]
    assert len(redone) == 4
    assert redone[0].startswith("projkd.py cache ") and redone[3].startswith("tables.py ")
    assert f"--run-dir {tmp_path}/runs/resnet20-resnet8/kd-seed2 " in redone[1]
    evaluation = f"eval --arch resnet8 --ckpt {tmp_path}/runs/resnet20-resnet8/kd-seed2/model.pt "
    assert evaluation in redone[2]
    # a new teacher checkpoint: its cache is rebuilt once, before all its distillation runs are
    # redone
    os.utime(tmp_path / "ckpt" / "resnet20.pt", (time.time() + 10,) * 2)
    before = len(calls(log))
    assert make("-j4", "cifar-all", *knobs).returncode == 0
    redone = calls(log)[before:]
    cache = [i for i, c in enumerate(redone) if c.startswith("projkd.py cache ")]
    runs = [i for i, c in enumerate(redone) if c.startswith("projkd.py --dataset")]
    readers = [i for i in runs if "--teacher-cache-file" in redone[i]]
    # 2 pairs x 4 x 2
    assert len(cache) == 1 and len(runs) == 2 * 4 * 2 and redone[-1].startswith("tables.py ")
    # the teacher's, the runs'
    assert len([c for c in redone if c.startswith("projkd.py eval ")]) == 1 + 2 * 4 * 2
    # sp runs need no cache: -j may start them first
    assert len(readers) == 2 * 3 * 2 and cache[0] < min(readers)


def test_make_fetches_the_archives_teachers_and_trains_the_others(tmp_path):
    python, log = stand_in_python(tmp_path)
    knobs = [f"PY={python}", "DEPS=", "DATA=", "PAIRS=vgg13:vgg8 resnet20:resnet8",
             "METHODS=kd ce", "SEEDS=1", f"RUNS={tmp_path}/runs", f"RESULTS={tmp_path}/results"]
    assert make("cifar-all", *knobs, f"TEACHERS={tmp_path}/ckpt").returncode == 0
    done = calls(log)
    fetched = [c.split("--arch ")[1].split()[0]
               for c in done if c.startswith("projkd.py fetch-teachers ")]
    assert fetched == ["vgg13"]
    # not in the archive: trained
    trained = [c for c in done if "--method ce" in c and "--student resnet20 " in c]
    assert len(trained) == 1 and not any("--student vgg13 " in c for c in done)
    assert json.loads((tmp_path / "ckpt" / "resnet20.json").read_text()) == {
        "how": "trained here", "run": f"{tmp_path}/runs/resnet20/ce-seed1"}
    assert make("cifar-all", *knobs, f"TEACHERS={tmp_path}/ckpt").returncode == 0
    assert calls(log) == done
    # TEACHERS_FROM=train trains vgg13 too; a checkpoint in place is used as it is, whatever
    # TEACHERS_FROM says
    os.makedirs(tmp_path / "other")
    shutil.copy(tmp_path / "ckpt" / "resnet20.pt", tmp_path / "other" / "resnet20.pt")
    other = make("cifar-all", *knobs, f"TEACHERS={tmp_path}/other", "TEACHERS_FROM=train")
    assert other.returncode == 0
    again = calls(log)[len(done):]
    assert not any("fetch-teachers" in c for c in again)
    assert not any("--student resnet20 " in c for c in again)
    assert any("--method ce" in c and "--student vgg13 " in c for c in again)


def test_make_and_fetch_name_the_same_archive():
    makefile = open(os.path.join(HERE, "Makefile")).read()
    archive_teachers = re.search(r"^ARCHIVE_TEACHERS := (.*)$", makefile, re.M)[1].split()
    assert archive_teachers == list(fetch.PUBLISHED_TEACHERS)
    fetches = [line for line in plan_lines("fetch-teachers") if "projkd.py fetch-teachers " in line]
    assert len(fetches) == 4 and all(f"--url {fetch.TEACHERS_URL} " in f for f in fetches)


@pytest.mark.parametrize("name", ["Makefile", "params.mk", "own.mk"])
def test_make_files_keep_to_100_columns(name):
    lines = open(os.path.join(HERE, name)).read().splitlines()
    # a recipe's tab shows as 8 columns
    wide = [i + 1 for i, line in enumerate(lines) if len(line.expandtabs(8)) > 100]
    assert wide == [], f"{name}: lines over 100 columns"


def test_make_imagenet_all_with_stand_in_commands_redoes_nothing(tmp_path):
    python, log = stand_in_python(tmp_path)
    knobs = [f"PY={python}", "DEPS=", f"IMAGENET_DIR={tmp_path}/imagenet", f"RUNS={tmp_path}/runs",
             f"TEACHERS={tmp_path}/ckpt", f"RESULTS={tmp_path}/results"]
    missing = make("imagenet-all", *knobs)
    assert missing.returncode != 0 and f"no ImageNet in {tmp_path}/imagenet/" in missing.stderr
    assert not calls(log)
    os.makedirs(tmp_path / "imagenet" / "val")
    first = make("-j4", "imagenet-all", *knobs)
    assert first.returncode == 0, first.stderr
    done = calls(log)
    assert sorted(c.split()[0] for c in done) == ["projkd.py"] * (3 + 13) + ["tables.py"] + \
        ["torchrun_signals.py"] * 10
    assert (tmp_path / "results" / "imagenet.md").exists()
    assert (tmp_path / "ckpt" / "resnet34.pt").exists()
    assert make("imagenet-all", *knobs).returncode == 0 and calls(log) == done


def test_the_readme_example_runs():
    readme = open(os.path.join(HERE, "README.md")).read()
    example = readme.split("## PEFD in your own code")[1].split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    projectors = namespace["projectors"]
    # the example's step trained them
    assert all(p.grad is not None for p in projectors.parameters())


STAND_IN_INTERPRETER = """#!/bin/sh
# Stands in for python in the Makefile's install step: says its path as sys.executable would, logs
# the rest.
if [ "$1" = "-c" ]; then echo "$0"; exit 0; fi
echo "$0 $*" >> {log}
"""


def test_make_installs_into_each_interpreter_once_and_not_past_a_touched_marker(tmp_path):
    for name in ("Makefile", "params.mk", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    log, pythons = tmp_path / "calls.log", []
    for name in ("system", "venv", "own-torch"):
        python = tmp_path / name / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(STAND_IN_INTERPRETER.format(log=log))
        python.chmod(0o755)
        pythons.append(python)
    system, venv, own_torch = pythons

    def make_test(python):
        log.write_text("")
        assert make("test", f"PY={python}", cwd=tmp_path).returncode == 0
        return calls(log)
    install = "-m pip install -r requirements.txt -r requirements-dev.txt"
    lint, tests = "-m ruff check .", "-m pytest -q"
    assert make_test(system) == [f"{system} {install}", f"{system} {lint}", f"{system} {tests}"]
    assert make_test(system) == [f"{system} {lint}", f"{system} {tests}"]
    # a new interpreter gets its own install
    assert make_test(venv) == [f"{venv} {install}", f"{venv} {lint}", f"{venv} {tests}"]
    os.utime(tmp_path / "requirements-dev.txt", (time.time() + 5, time.time() + 5))
    # and new requirements
    assert make_test(venv) == [f"{venv} {install}", f"{venv} {lint}", f"{venv} {tests}"]
    (tmp_path / ".deps-installed").touch()  # use it as it is
    assert make_test(own_torch) == [f"{own_torch} {lint}", f"{own_torch} {tests}"]


def stand_in_python3(folder, log):
    """A PATH whose python3 makes a venv of stand-in interpreters (STAND_IN_INTERPRETER), as
    `python3 -m venv`."""
    venv_python = STAND_IN_INTERPRETER.format(log=log).replace("\\", "\\\\")
    fake = folder / "bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(f"""#!/bin/sh
echo "python3 $*" >> {log}
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin" && cat > "$3/bin/python" <<'END'
{venv_python}END
  chmod +x "$3/bin/python"
fi
""")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}


def test_make_with_no_py_makes_a_venv_once_and_uses_it(tmp_path):
    for name in ("Makefile", "params.mk", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    log = tmp_path / "calls.log"
    env = stand_in_python3(tmp_path, log)
    venv = ".venv/bin/python"
    install = "-m pip install -r requirements.txt -r requirements-dev.txt"
    assert make("test", cwd=tmp_path, env=env).returncode == 0
    assert [c.replace(str(tmp_path) + "/", "") for c in calls(log)] == [
        "python3 -m venv .venv", f"{venv} {install}", f"{venv} -m ruff check .",
        f"{venv} -m pytest -q"]
    log.write_text("")
    # made once: the venv and its install are kept
    assert make("test", cwd=tmp_path, env=env).returncode == 0
    assert [c.replace(str(tmp_path) + "/", "") for c in calls(log)] == [
        f"{venv} -m ruff check .", f"{venv} -m pytest -q"]
    log.write_text("")
    (tmp_path / ".deps-installed").touch()  # use python3 as it is: no venv, no install
    assert make("test", cwd=tmp_path, env=env).returncode == 0
    assert calls(log) == ["python3 -m ruff check .", "python3 -m pytest -q"]


def test_make_cifar_all_says_its_cost_and_fails_on_a_missing_teacher_before_any_training(tmp_path):
    python, log = stand_in_python(tmp_path)
    (tmp_path / "data" / "cifar-100-python").mkdir(parents=True)
    (tmp_path / "data" / "cifar-100-python" / "test").touch()
    knobs = [f"PY={python}", "DEPS=", f"DATA_DIR={tmp_path}/data",
             "PAIRS=vgg13:vgg8 resnet20:resnet8", "METHODS=pefd ce", "SEEDS=1",
             f"RUNS={tmp_path}/runs", f"TEACHERS={tmp_path}/ckpt", f"RESULTS={tmp_path}/results"]
    offline = make("-j4", "cifar-all", *knobs, env={**os.environ, "OFFLINE": "1"})
    assert offline.returncode != 0 and "projkd: error: offline: put vgg13's" in offline.stderr
    done = calls(log)
    # the cost first, of every run to do
    assert done[0].startswith("plan_cost.py --device auto --epochs 240 ")
    runs = ("vgg8/ce-seed1", "resnet8/ce-seed1", "vgg13-vgg8/pefd-seed1",
            "resnet20-resnet8/pefd-seed1")
    assert sorted(done[0].split()[5:]) == sorted(f"{tmp_path}/runs/{r}/metrics.json" for r in runs)
    # no training began
    assert [c.split()[0] for c in done[1:]] == ["projkd.py"] and "fetch-teachers" in done[1]
    # online, the fetched teacher comes before every run, the cost is said once and not again when
    # all is done
    assert make("-j4", "cifar-all", *knobs).returncode == 0
    again = calls(log)[len(done):]
    fetch = next(i for i, c in enumerate(again) if "fetch-teachers" in c)
    assert fetch < min(i for i, c in enumerate(again) if "--run-dir" in c)
    before = len(calls(log))
    assert make("cifar-all", *knobs).returncode == 0 and len(calls(log)) == before


def test_make_smoke_says_when_it_is_up_to_date(tmp_path):
    python, log = stand_in_python(tmp_path)
    for name in ("Makefile", "params.mk"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    first = make("smoke", f"PY={python}", "DEPS=", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "smoke: the whole chain ran." in first.stdout and "up to date" not in first.stdout
    again = make("smoke", f"PY={python}", "DEPS=", cwd=tmp_path)
    assert again.returncode == 0 and "smoke: up to date, nothing ran" in again.stdout
    assert "the whole chain ran" not in again.stdout
