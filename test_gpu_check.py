"""CPU tests of make gpu-check's wiring (gpu_check.py, the Makefile's gpu-check): python3 -m pytest test_gpu_check.py

The report from hand-made results, the steps' recording, `make -n gpu-check`'s plan, and the refusal without
CUDA. The GPU checks themselves are test_gpu.py's, which skip here.
"""
import json
import os
import subprocess
import sys
import time

import pytest

import gpu_check
import projkd

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "gpu_check.py")
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # torch sees no GPU, on a GPU machine too


def write(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def write_json(path, obj):
    write(path, json.dumps(obj))


GPU_FACTS = {"budget_s": 480, "gpu": "NVIDIA H100 80GB HBM3", "gpus": 1, "gpu_memory_gib": 79.1,
             "compute_capability": "9.0", "driver": "580.1", "torch": "2.11.0+cu130", "cuda": "13.0",
             "cudnn": 91002, "python": "3.12.3", "code": "0123abcd", "date": "2026-12-02 18:00 UTC"}

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="test_gpu" name="test_graph_step_matches_the_eager_step_in_bf16" time="4.25" />
<testcase classname="test_gpu" name="test_a_cuda_run_resumes_bit_identically_under_deterministic" time="7.5">
<properties><property name="not bitwise because" value="index_add_cuda_ does not have a deterministic implementation"/>
</properties><failure message="AssertionError: gaps {'loss': 0.5}&#10;more">trace</failure></testcase>
<testcase classname="test_gpu" name="test_torchrun_nccl_on_two_gpus_equals_one_process" time="0.0">
<skipped type="pytest.skip" message="needs 2 GPUs, this machine has 1">test_gpu.py:500: skip</skipped></testcase>
</testsuite></testsuites>
"""


def step_record(name, status, seconds, command, started, tail=()):
    return {"name": name, "command": command, "status": status, "rc": 0 if status == "pass" else 1,
            "seconds": seconds, "reason": "" if status == "pass" else "exit status 1",
            "log": os.path.join(gpu_check.CHECK_DIR, f"{name}.log"), "tail": list(tail), "started": started}


def run_metrics(seconds, speeds, top1):
    history = [{"epoch": i + 1, "seconds": s, "images_per_s": v, "train_loss": 4.0 - i, "test_top1": t}
               for i, (s, v, t) in enumerate(zip(seconds, speeds, top1, strict=True))]
    return {"history": history, "images_per_s": sum(speeds) / len(speeds), "last_top1": top1[-1],
            "best_top1": max(top1), "teacher_top1": 1.02, "device": "NVIDIA H100 80GB HBM3",
            "teacher_provenance": {"how": "randomly initialised by gpu_check.py (seed 0): no teacher file was given"}}


def write_cache_file(path, build_seconds):
    """A valid teacher-cache file of 2 images of width 3 (teacher_cache's layout: header, then the rows)."""
    header = {"format": "projkd-teacher-cache-1", "images": 2, "width": 3, "views": 162, "build_seconds": build_seconds,
              "device": "NVIDIA H100 80GB HBM3"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode().ljust(4096))
        f.write(bytes(2 * 162 * 2 * 3))


def hand_made_check(tmp_path, tests_status="fail", fast_top1=(30.0, 41.5, 47.25)):
    """The files a whole check leaves, written by hand: the GPU, six steps, the tests' junit xml, a bench, a teacher
    cache and the two short runs (on synthetic data, with a random teacher)."""
    folder = gpu_check.CHECK_DIR
    write_json(os.path.join(folder, "start.json"), {**GPU_FACTS, "started": time.time() - 60})
    run = ["python3", "projkd.py", "--dataset", "synthetic", "--synthetic-size", "50000", "--data-dir", "/nodata"]
    steps = [("tests", tests_status, 95.0, ["python3", "-m", "pytest", "test_gpu.py"]),
             ("bench", "pass", 88.4, ["make", "bench"]),
             ("cache", "pass", 61.0, ["python3", "projkd.py", "cache", "--teacher-cache-file", "ckpt/vgg13.tcache"]),
             ("fast", "pass", 30.2, run + ["--teacher-cache", "on", "--graph", "on", "--run-dir", "runs/fast"]),
             ("plain", "pass", 41.7, run + ["--teacher-cache", "off", "--graph", "off", "--run-dir", "runs/plain"])]
    for i, (name, status, seconds, command) in enumerate(steps):  # written in another order than they ran
        write_json(gpu_check.record_path(name), step_record(name, status, seconds, command, time.time() - 50 + i,
                                                            tail=["last words"]))
    write(os.path.join(folder, "tests.xml"), JUNIT)
    write(gpu_check.BENCH_MD, "| loop | images/s |\n|---|---|\n| ours, CUDA graph, teacher cached | 61,234 |")
    write_json(gpu_check.BENCH_JSON, {"device": "NVIDIA H100 80GB HBM3", "pairs": []})
    write_cache_file("ckpt/vgg13.tcache", 55.5)
    write_json("runs/fast/metrics.json", run_metrics([9.5, 3.1, 3.0], [9000.0, 40000.0, 42000.0], fast_top1))
    write_json("runs/plain/metrics.json", run_metrics([12.0, 10.0, 10.0], [5000.0, 6000.0, 6100.0], [30.0, 41.0, 46.0]))


def test_report_of_hand_made_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hand_made_check(tmp_path)
    assert gpu_check.main(["report"]) == 1  # a test failed
    md = (tmp_path / gpu_check.REPORT_MD).read_text()
    report = json.loads((tmp_path / gpu_check.REPORT_JSON).read_text())
    assert md.startswith("# make gpu-check: NVIDIA H100 80GB HBM3\n")
    assert "torch 2.11.0+cu130, CUDA 13.0, cuDNN 91002" in md and "driver 580.1" in md
    assert "**Failed**: 6 checks passed, 2 failed, 1 skipped" in md  # 5 steps, the runs' agreement, 3 tests
    assert "| test test_graph_step_matches_the_eager_step_in_bf16 | pass | 4.2 |" in md  # 4.25 rounds to even
    assert ("| test test_a_cuda_run_resumes_bit_identically_under_deterministic | fail | 7.5 | AssertionError: gaps "
            "{'loss': 0.5}; not bitwise because: index_add_cuda_ does not have a deterministic implementation |") in md
    assert ("| test test_torchrun_nccl_on_two_gpus_equals_one_process | skip | 0.0 | needs 2 GPUs, this machine has "
            "1 |") in md
    assert "| step tests | fail | 95.0 | exit status 1; last line: last words |" in md
    assert "| ours, CUDA graph, teacher cached | 61,234 |" in md  # the bench table, as bench.md has it
    assert "**synthetic data** (50000 generated training images, 100 classes): there is no cifar-100-python/ in " \
           "/nodata" in md
    assert "Teacher: randomly initialised by gpu_check.py (seed 0): no teacher file was given" in md
    assert "Teacher cache: ckpt/vgg13.tcache, 0.0 GB, built in 56 s on NVIDIA H100 80GB HBM3." in md
    assert "| fast | on | on | 9.5, 3.1, 3.0 | 9,000, 40,000, 42,000 | 41,000 | 47.25 | 47.25 |" in md
    assert "| plain | off | off | 12.0, 10.0, 10.0 | 5,000, 6,000, 6,100 | 6,050 | 46.00 | 46.00 |" in md
    assert "fast trains 6.78x as many images per second as plain" in md
    assert "| runs fast and plain agree | pass |" in md and "1.25 points apart (tolerance 5)" in md
    # the JSON holds the same, as data
    assert report["gpu"]["gpu"] == "NVIDIA H100 80GB HBM3" and report["gpu"]["cuda"] == "13.0"
    assert not report["passed"] and report["failed"] == [
        "step tests", "test test_a_cuda_run_resumes_bit_identically_under_deterministic"]
    assert {c["check"]: c["result"] for c in report["checks"]}["test test_torchrun_nccl_on_two_gpus_equals_one_" \
                                                                  "process"] == "skip"
    fast = next(r for r in report["runs"] if r["name"] == "fast")
    assert [e["seconds"] for e in fast["epochs"]] == [9.5, 3.1, 3.0] and fast["steady_images_per_s"] == 41000.0
    assert fast["last_top1"] == 47.25 and fast["teacher_cache"] == "on" and fast["dataset"] == "synthetic"
    assert report["bench"]["report"]["device"] == "NVIDIA H100 80GB HBM3" and report["cache"]["build_seconds"] == 55.5
    assert "gpu-check: FAILED: step tests, test test_a_cuda_run" in capsys.readouterr().out


def test_report_passes_when_all_passed_and_fails_runs_too_far_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hand_made_check(tmp_path, tests_status="pass")
    write(os.path.join(gpu_check.CHECK_DIR, "tests.xml"), JUNIT.split("<testcase")[0] + "<testcase classname='t' "
          "name='test_ok' time='1'/></testsuite></testsuites>")
    assert gpu_check.main(["report"]) == 0
    assert "**Passed**: 7 checks passed, 0 failed, 0 skipped" in (tmp_path / gpu_check.REPORT_MD).read_text()
    hand_made_check(tmp_path, tests_status="pass", fast_top1=(30.0, 35.0, 38.0))  # 8 points below plain
    os.remove(os.path.join(gpu_check.CHECK_DIR, "tests.xml"))
    write(os.path.join(gpu_check.CHECK_DIR, "tests.log"), "")
    assert gpu_check.main(["report"]) == 1
    report = json.loads((tmp_path / gpu_check.REPORT_JSON).read_text())
    assert report["failed"] == ["runs fast and plain agree"]


def test_report_leaves_out_a_stale_bench_and_reads_a_cut_off_pytest_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hand_made_check(tmp_path)
    for path in (gpu_check.BENCH_MD, gpu_check.BENCH_JSON):  # from an earlier bench: older than this check
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    os.remove(os.path.join(gpu_check.CHECK_DIR, "tests.xml"))  # pytest was killed at its timeout: no xml
    write(os.path.join(gpu_check.CHECK_DIR, "tests.log"),
          "test_gpu.py::test_a PASSED                 [ 10%]\n"
          "test_gpu.py::test_b SKIPPED (needs 2 GPUs, this machine has 1) [ 20%]\n"
          "test_gpu.py::test_c FAILED                 [ 30%]\n")
    gpu_check.main(["report"])
    md = (tmp_path / gpu_check.REPORT_MD).read_text()
    assert "No bench table from this check" in md and "61,234" not in md
    assert "| test test_a | pass |  | (from the log: pytest did not finish) |" in md
    assert "| test test_b | skip |  | needs 2 GPUs, this machine has 1 (from the log: pytest did not finish) |" in md
    assert "| test test_c | fail |" in md


def test_a_step_records_failures_timeouts_and_unmet_needs_and_the_check_goes_on(tmp_path, monkeypatch, capsys):
    """Each step exits 0, whatever its command did, so that make runs the next one; its record says what happened."""
    monkeypatch.chdir(tmp_path)
    write_json(os.path.join(gpu_check.CHECK_DIR, "start.json"), {**GPU_FACTS, "started": time.time()})
    py = sys.executable

    def step(*args):
        assert gpu_check.main(["step", *args]) == 0
        return json.loads((tmp_path / gpu_check.record_path(args[0])).read_text())

    ok = step("ok", "--", py, "-c", "print('fine')")
    assert ok["status"] == "pass" and ok["tail"] == ["fine"] and ok["rc"] == 0
    assert "fine" in capsys.readouterr().out  # the command's output reaches the terminal as it comes
    bad = step("bad", "--", py, "-c", "import sys; print('broken'); sys.exit(3)")
    assert bad["status"] == "fail" and bad["rc"] == 3 and bad["reason"] == "exit status 3"
    assert (tmp_path / bad["log"]).read_text() == "broken\n"
    begin = time.time()
    slow = step("slow", "--timeout", "2", "--", py, "-c", "import time; print('started', flush=True); time.sleep(60)")
    assert slow["status"] == "timeout" and time.time() - begin < 30 and slow["tail"] == ["started"]
    skipped = step("after", "--needs", "ok,bad", "--", py, "-c", "open('ran', 'w')")
    assert skipped["status"] == "skip" and "needs step bad" in skipped["reason"] and not (tmp_path / "ran").exists()
    write_json(os.path.join(gpu_check.CHECK_DIR, "start.json"),
               {**GPU_FACTS, "started": time.time() - 1000, "budget_s": 480})
    late = step("late", "--", py, "-c", "open('ran', 'w')")
    assert late["status"] == "skip" and "budget was spent" in late["reason"] and not (tmp_path / "ran").exists()


def make_plan(*knobs):
    result = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", *knobs], cwd=HERE,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("have_cifar,have_teacher", [(False, False), (True, True)])
def test_make_plan_runs_the_steps_in_order_with_py_and_data_dir(tmp_path, have_cifar, have_teacher):
    data, teacher, py = tmp_path / "data", tmp_path / "vgg13.pth", "/opt/py/bin/python3"
    if have_cifar:
        write(str(data / "cifar-100-python" / "test"), "")
    if have_teacher:
        write(str(teacher), "")
    plan = make_plan(f"PY={py}", f"DATA_DIR={data}", f"GPU_CHECK_TEACHER={teacher}")
    steps = [line.split()[3] if " step " in line else line.split()[2] for line in plan]
    expected = ["start", "tests", "bench", *([] if have_teacher else ["teacher"]), "cache", "fast", "plain", "report"]
    assert steps == expected, plan
    assert all(line.startswith(f"{py} gpu_check.py ") for line in plan)
    tests, bench = plan[1], plan[2]
    assert tests.endswith(f"-- {py} -m pytest -v -rs -m gpu -o junit_family=legacy --junitxml "
                          "results/gpu-check/tests.xml test_gpu.py")
    assert bench.endswith(f"-- make bench PY={py} DEVICE=cuda:0 DEPS=")  # installs nothing on the GPU node
    ckpt = str(teacher) if have_teacher else "checkpoints/gpu-check/vgg13-random.pt"
    data_flags = (f"--dataset cifar100 --data-dir {data}" if have_cifar else
                  f"--dataset synthetic --synthetic-size 50000 --synthetic-classes 100 --data-dir {data}")
    cache, fast, plain = plan[-4:-1]
    assert f"-- {py} projkd.py cache --teacher vgg13 --teacher-ckpt {ckpt} --teacher-cache-file " \
           f"checkpoints/gpu-check/vgg13.tcache {data_flags} --device cuda:0" in cache
    run = f"-- {py} projkd.py {data_flags} --device cuda:0 --epochs 3 --teacher vgg13 --teacher-ckpt {ckpt} " \
          f"--student vgg8 --method pefd --seed 1 --overwrite "
    assert fast.endswith(run + "--teacher-cache on --teacher-cache-file checkpoints/gpu-check/vgg13.tcache "
                         "--graph on --run-dir runs/gpu-check/fast") and "--needs teacher,cache " in fast
    assert plain.endswith(run + "--teacher-cache off --graph off --run-dir runs/gpu-check/plain")
    assert make_plan(f"PY={py}", "DEVICE=cuda:1")[2].endswith(f"make bench PY={py} DEVICE=cuda:1 DEPS=")


def test_the_later_commands_refuse_without_the_first_ones_record(tmp_path, monkeypatch, capsys):
    """Run by hand on a machine without a GPU, they write nothing either."""
    monkeypatch.chdir(tmp_path)
    for args in (["step", "x", "--", "true"], ["report"]):
        assert gpu_check.main(args) == 2
        assert "run `make gpu-check`" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_make_gpu_check_without_cuda_runs_nothing_after_its_refusal():
    made = [os.path.join(HERE, p) for p in (gpu_check.CHECK_DIR, gpu_check.REPORT_MD, gpu_check.REPORT_JSON,
                                            gpu_check.RUNS_DIR)]
    before = {p: os.path.exists(p) and os.path.getmtime(p) for p in made}
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PY={sys.executable}"], cwd=HERE,
                            capture_output=True, text=True, env=NO_GPU, timeout=120)
    assert result.returncode != 0
    assert result.stdout.splitlines() == [f"{sys.executable} gpu_check.py start --budget 480"]  # nothing after it
    refusal = result.stderr.splitlines()[0]  # gpu_check's one line; make adds its own "Error 2" after it
    assert refusal.startswith("gpu-check: needs a CUDA GPU") and "`make test`" in refusal
    assert "Traceback" not in result.stderr
    assert {p: os.path.exists(p) and os.path.getmtime(p) for p in made} == before


def test_random_teacher_is_a_loadable_vgg13_whose_runs_say_how_it_was_made(tmp_path):
    import models
    out = str(tmp_path / "ckpt" / "vgg13-random.pt")
    assert gpu_check.main(["random-teacher", "--arch", "vgg13", "--classes", "100", "--out", out]) == 0
    assert models.load_teacher("vgg13", out, 100).classifier.out_features == 100
    assert projkd.teacher_provenance(out)["how"].startswith("randomly initialised by gpu_check.py")
    assert gpu_check.main(["random-teacher", "--arch", "vgg99", "--out", out]) == 2


def test_a_bitwise_comparison_says_where_the_runs_part_and_by_how_much():
    """test_gpu.py's fp32 bitwise tests on failure: the first step whose loss differs, and per tensor the
    largest absolute and relative difference; here from hand-made tensors (those tests skip without CUDA)."""
    import torch

    from test_gpu import assert_bitwise_or_explained
    reference = {"conv.weight": torch.tensor([1.0, 2.0, -4.0]), "bn.bias": torch.tensor([0.5, 0.0]),
                 "bn.num_batches_tracked": torch.tensor(7)}
    other = {"conv.weight": torch.tensor([1.0, 2.5, -4.0]), "bn.bias": torch.tensor([0.5, 1e-6]),
             "bn.num_batches_tracked": torch.tensor(7)}
    report = gpu_check.difference_report(reference, other, [2.0, 1.5, 1.25, 1.0], [2.0, 1.5, 1.3, 1.0])
    assert report.splitlines() == [
        "first step that differs: 3 (loss 1.25 against 1.3); 2 of 3 tensors differ, most bn.bias (largest "
        "absolute difference 1e-06, relative 1)",
        "  bn.bias: largest absolute difference 1e-06, relative 1",  # 0 against 1e-6: wholly off
        "  conv.weight: largest absolute difference 0.5, relative 0.2"]  # 2.5 against 2.0
    same = {k: v.clone() for k, v in reference.items()}
    assert gpu_check.difference_report(reference, same, [2.0, 1.5], [2.0, 1.5]) == ""
    assert gpu_check.difference_report(reference, same, [2.0, 1.5], [2.0, 1.75], unit="epoch") == \
        "first epoch that differs: 2 (loss 1.5 against 1.75); all 3 tensors are bitwise equal"
    assert gpu_check.difference_report(reference, other, [2.0], [2.0]).startswith("no step's loss differs; ")
    # the failure as pytest shows it, and as the gpu-check report's table has it (the first line)
    properties = []
    with pytest.raises(AssertionError) as failed:
        assert_bitwise_or_explained([], lambda *p: properties.append(p), report, {"loss": 0.04},
                                    tolerance=1e-3)
    message = str(failed.value)
    assert message.splitlines()[0].startswith("not bitwise equal (first step that differs: 3 (loss 1.25 "
                                              "against 1.3); 2 of 3 tensors differ, most bn.bias")
    assert "  conv.weight: largest absolute difference 0.5, relative 0.2" in message
    assert properties == [("differences", report.splitlines()[0])]
    assert_bitwise_or_explained([], lambda *p: None, "", {"loss": 0.0}, tolerance=1e-3)  # equal: passes
