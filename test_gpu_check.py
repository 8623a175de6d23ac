"""CPU tests of make gpu-check's wiring (gpu_check.py, the Makefile's gpu-check): python3 -m pytest
test_gpu_check.py

The report from hand-made results, the steps' recording, `make -n gpu-check`'s plan, and the refusal
without CUDA. The GPU checks themselves are test_gpu.py's, which skip here.
"""
import json
import os
import shutil
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
             "compute_capability": "9.0", "driver": "580.1", "torch": "2.11.0+cu130",
             "cuda": "13.0",
             "cudnn": 91002, "python": "3.12.3", "code": "0123abcd", "date": "2026-12-02 18:00 UTC"}

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="test_gpu" name="test_graph_step_matches_the_eager_step_in_bf16" time="4.25"
 />
<testcase classname="test_gpu" name="test_a_cuda_run_resumes_bit_identically_under_deterministic"
 time="7.5"><properties><property name="not bitwise because"
 value="index_add_cuda_ does not have a deterministic implementation"/></properties>
<failure message="AssertionError: gaps {'loss': 0.5}&#10;more">trace</failure></testcase>
<testcase classname="test_gpu" name="test_torchrun_nccl_on_two_gpus_equals_one_process" time="0.0">
<skipped type="pytest.skip" message="needs 2 GPUs, this machine has 1">test_gpu.py:500: skip
</skipped></testcase>
</testsuite></testsuites>
"""


def step_record(name, status, seconds, command, started, tail=()):
    return {"name": name, "command": command, "status": status, "rc": 0 if status == "pass" else 1,
            "seconds": seconds, "reason": "" if status == "pass" else "exit status 1",
            "log": os.path.join(gpu_check.CHECK_DIR, f"{name}.log"), "tail": list(tail),
            "started": started}


def run_metrics(seconds, speeds, top1):
    history = [{"epoch": i + 1, "seconds": s, "images_per_s": v, "train_loss": 4.0 - i,
                "test_top1": t}
               for i, (s, v, t) in enumerate(zip(seconds, speeds, top1, strict=True))]
    return {"history": history, "images_per_s": sum(speeds) / len(speeds), "last_top1": top1[-1],
            "best_top1": max(top1), "teacher_top1": 1.02, "device": "NVIDIA H100 80GB HBM3",
            "teacher_provenance": {"how": "randomly initialised by gpu_check.py (seed 0): no "
                                          "teacher file was given"}}


def write_cache_file(path, build_seconds):
    """A valid teacher-cache file of 2 images of width 3 (teacher_cache's layout: header, then the
    rows)."""
    header = {"format": "projkd-teacher-cache-1", "images": 2, "width": 3, "views": 162,
              "build_seconds": build_seconds, "device": "NVIDIA H100 80GB HBM3"}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode().ljust(4096))
        f.write(bytes(2 * 162 * 2 * 3))


def hand_made_check(tmp_path, tests_status="fail", fast_top1=(30.0, 41.5, 47.25)):
    """The files a whole check leaves, written by hand: the GPU, six steps, the tests' junit xml, a
    bench, a teacher cache and the two short runs (on synthetic data, with a random teacher)."""
    folder = gpu_check.CHECK_DIR
    write_json(os.path.join(folder, "start.json"), {**GPU_FACTS, "started": time.time() - 60})
    run = ["python3", "projkd.py", "--dataset", "synthetic", "--synthetic-size", "50000",
           "--data-dir", "/nodata"]
    steps = [("tests", tests_status, 95.0, ["python3", "-m", "pytest", "test_gpu.py"]),
             ("bench", "pass", 88.4, ["make", "bench"]),
             ("cache", "pass", 61.0,
              ["python3", "projkd.py", "cache", "--teacher-cache-file", "ckpt/vgg13.tcache"]),
             ("fast", "pass", 30.2,
              run + ["--teacher-cache", "on", "--graph", "on", "--run-dir", "runs/fast"]),
             ("plain", "pass", 41.7,
              run + ["--teacher-cache", "off", "--graph", "off", "--run-dir", "runs/plain"])]
    # written in another order than they ran
    for i, (name, status, seconds, command) in enumerate(steps):
        write_json(gpu_check.record_path(name), step_record(name, status, seconds, command,
                                                            time.time() - 50 + i,
                                                            tail=["last words"]))
    write(os.path.join(folder, "tests.xml"), JUNIT)
    write(gpu_check.BENCH_MD,
          "| loop | images/s |\n|---|---|\n| ours, CUDA graph, teacher cached | 61,234 |")
    write_json(gpu_check.BENCH_JSON, {"device": "NVIDIA H100 80GB HBM3", "pairs": []})
    write_cache_file("ckpt/vgg13.tcache", 55.5)
    write_json("runs/fast/metrics.json",
               run_metrics([9.5, 3.1, 3.0], [9000.0, 40000.0, 42000.0], fast_top1))
    write_json("runs/plain/metrics.json",
               run_metrics([12.0, 10.0, 10.0], [5000.0, 6000.0, 6100.0], [30.0, 41.0, 46.0]))


def test_report_of_hand_made_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hand_made_check(tmp_path)
    assert gpu_check.main(["report"]) == 1  # a test failed
    md = (tmp_path / gpu_check.REPORT_MD).read_text()
    report = json.loads((tmp_path / gpu_check.REPORT_JSON).read_text())
    assert md.startswith("# make gpu-check: NVIDIA H100 80GB HBM3\n")
    assert "torch 2.11.0+cu130, CUDA 13.0, cuDNN 91002" in md and "driver 580.1" in md
    # 5 steps, the runs' agreement, 3 tests
    assert "**Failed**: 6 checks passed, 2 failed, 1 skipped" in md
    # 4.25 rounds to even
    assert "| test test_graph_step_matches_the_eager_step_in_bf16 | pass | 4.2 |" in md
    assert ("| test test_a_cuda_run_resumes_bit_identically_under_deterministic | fail | 7.5 | "
            "AssertionError: gaps "
            "{'loss': 0.5}; not bitwise because: index_add_cuda_ does not have a deterministic "
            "implementation |") in md
    assert ("| test test_torchrun_nccl_on_two_gpus_equals_one_process | skip | 0.0 | needs 2 GPUs, "
            "this machine has "
            "1 |") in md
    assert "| step tests | fail | 95.0 | exit status 1; last line: last words |" in md
    # the bench table, as bench.md has it
    assert "| ours, CUDA graph, teacher cached | 61,234 |" in md
    assert "**synthetic data** (50000 generated training images, 100 classes): there is no " \
           "cifar-100-python/ in /nodata" in md
    assert "Teacher: randomly initialised by gpu_check.py (seed 0): no teacher file was given" in md
    assert "Teacher cache: ckpt/vgg13.tcache, 0.0 GB, built in 56 s on NVIDIA H100 80GB HBM3." in md
    assert "| fast | on | on | 9.5, 3.1, 3.0 | 9,000, 40,000, 42,000 | 41,000 | 47.25 | 47.25 |" \
        in md
    assert "| plain | off | off | 12.0, 10.0, 10.0 | 5,000, 6,000, 6,100 | 6,050 | 46.00 | 46.00 " \
           "|" in md
    assert "fast trains 6.78x as many images per second as plain" in md
    assert "| runs fast and plain agree | pass |" in md and "1.25 points apart (tolerance 5)" in md
    # the JSON holds the same, as data
    assert report["gpu"]["gpu"] == "NVIDIA H100 80GB HBM3" and report["gpu"]["cuda"] == "13.0"
    assert not report["passed"] and report["failed"] == [
        "step tests", "test test_a_cuda_run_resumes_bit_identically_under_deterministic"]
    results = {c["check"]: c["result"] for c in report["checks"]}
    assert results["test test_torchrun_nccl_on_two_gpus_equals_one_process"] == "skip"
    fast = next(r for r in report["runs"] if r["name"] == "fast")
    assert [e["seconds"] for e in fast["epochs"]] == [9.5, 3.1, 3.0]
    assert fast["steady_images_per_s"] == 41000.0
    assert fast["last_top1"] == 47.25 and fast["teacher_cache"] == "on"
    assert fast["dataset"] == "synthetic"
    assert report["bench"]["report"]["device"] == "NVIDIA H100 80GB HBM3"
    assert report["cache"]["build_seconds"] == 55.5
    assert "gpu-check: FAILED: step tests, test test_a_cuda_run" in capsys.readouterr().out


def test_report_passes_when_all_passed_and_fails_runs_too_far_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hand_made_check(tmp_path, tests_status="pass")
    write(os.path.join(gpu_check.CHECK_DIR, "tests.xml"),
          JUNIT.split("<testcase")[0] + "<testcase classname='t' "
          "name='test_ok' time='1'/></testsuite></testsuites>")
    assert gpu_check.main(["report"]) == 0
    assert "**Passed**: 7 checks passed, 0 failed, 0 skipped" in (tmp_path
                                                                  / gpu_check.REPORT_MD).read_text()
    # 8 points below plain
    hand_made_check(tmp_path, tests_status="pass", fast_top1=(30.0, 35.0, 38.0))
    os.remove(os.path.join(gpu_check.CHECK_DIR, "tests.xml"))
    write(os.path.join(gpu_check.CHECK_DIR, "tests.log"), "")
    assert gpu_check.main(["report"]) == 1
    report = json.loads((tmp_path / gpu_check.REPORT_JSON).read_text())
    assert report["failed"] == ["runs fast and plain agree"]


def test_report_leaves_out_a_stale_bench_and_reads_a_cut_off_pytest_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hand_made_check(tmp_path)
    # from an earlier bench: older than this check
    for path in (gpu_check.BENCH_MD, gpu_check.BENCH_JSON):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    # pytest was killed at its timeout: no xml
    os.remove(os.path.join(gpu_check.CHECK_DIR, "tests.xml"))
    write(os.path.join(gpu_check.CHECK_DIR, "tests.log"),
          "test_gpu.py::test_a PASSED                 [ 10%]\n"
          "test_gpu.py::test_b SKIPPED (needs 2 GPUs, this machine has 1) [ 20%]\n"
          "test_gpu.py::test_c FAILED                 [ 30%]\n")
    gpu_check.main(["report"])
    md = (tmp_path / gpu_check.REPORT_MD).read_text()
    assert "No bench table from this check" in md and "61,234" not in md
    assert "| test test_a | pass |  | (from the log: pytest did not finish) |" in md
    assert "| test test_b | skip |  | needs 2 GPUs, this machine has 1 (from the log: pytest did " \
           "not finish) |" in md
    assert "| test test_c | fail |" in md


def test_a_step_records_failures_timeouts_and_unmet_needs_and_the_check_goes_on(
        tmp_path, monkeypatch, capsys):
    """Each step exits 0, whatever its command did, so that make runs the next one; its record says
    what happened."""
    monkeypatch.chdir(tmp_path)
    write_json(os.path.join(gpu_check.CHECK_DIR, "start.json"),
               {**GPU_FACTS, "started": time.time()})
    py = sys.executable

    def step(*args):
        assert gpu_check.main(["step", *args]) == 0
        return json.loads((tmp_path / gpu_check.record_path(args[0])).read_text())

    ok = step("ok", "--", py, "-c", "print('fine')")
    assert ok["status"] == "pass" and ok["tail"] == ["fine"] and ok["rc"] == 0
    # the command's output reaches the terminal as it comes
    assert "fine" in capsys.readouterr().out
    bad = step("bad", "--", py, "-c", "import sys; print('broken'); sys.exit(3)")
    assert bad["status"] == "fail" and bad["rc"] == 3 and bad["reason"] == "exit status 3"
    assert (tmp_path / bad["log"]).read_text() == "broken\n"
    begin = time.time()
    slow = step("slow", "--timeout", "2", "--", py, "-c",
                "import time; print('started', flush=True); time.sleep(60)")
    assert slow["status"] == "timeout" and time.time() - begin < 30 and slow["tail"] == ["started"]
    skipped = step("after", "--needs", "ok,bad", "--", py, "-c", "open('ran', 'w')")
    assert skipped["status"] == "skip" and "needs step bad" in skipped["reason"]
    assert not (tmp_path / "ran").exists()
    write_json(os.path.join(gpu_check.CHECK_DIR, "start.json"),
               {**GPU_FACTS, "started": time.time() - 1000, "budget_s": 480})
    late = step("late", "--", py, "-c", "open('ran', 'w')")
    assert late["status"] == "skip" and "budget was spent" in late["reason"]
    assert not (tmp_path / "ran").exists()


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
    expected = ["start", "tests", "bench", *([] if have_teacher else ["teacher"]), "cache", "fast",
                "plain", "report"]
    assert steps == expected, plan
    assert all(line.startswith(f"{py} gpu_check.py ") for line in plan)
    tests, bench = plan[1], plan[2]
    assert tests.endswith(f"-- {py} -m pytest -v -rs -m gpu -o junit_family=legacy --junitxml "
                          "results/gpu-check/tests.xml test_gpu.py")
    # installs nothing on the GPU node
    assert bench.endswith(f"-- make bench PY={py} DEVICE=cuda:0 DEPS=")
    ckpt = str(teacher) if have_teacher else "checkpoints/gpu-check/vgg13-random.pt"
    data_flags = f"--dataset cifar100 --data-dir {data}"
    if not have_cifar:
        data_flags = f"--dataset synthetic --synthetic-size 50000 --synthetic-classes 100 " \
                     f"--data-dir {data}"
    cache, fast, plain = plan[-4:-1]
    assert f"-- {py} projkd.py cache --teacher vgg13 --teacher-ckpt {ckpt} --teacher-cache-file " \
           f"checkpoints/gpu-check/vgg13.tcache {data_flags} --device cuda:0" in cache
    run = f"-- {py} projkd.py {data_flags} --device cuda:0 --epochs 3 --teacher vgg13 " \
          f"--teacher-ckpt {ckpt} --student vgg8 --method pefd --seed 1 --overwrite "
    assert fast.endswith(run + "--teacher-cache on --teacher-cache-file "
                         "checkpoints/gpu-check/vgg13.tcache --graph on "
                         "--run-dir runs/gpu-check/fast")
    assert "--needs teacher,cache " in fast
    assert plain.endswith(run + "--teacher-cache off --graph off --run-dir runs/gpu-check/plain")
    bench_on_cuda1 = make_plan(f"PY={py}", "DEVICE=cuda:1")[2]
    assert bench_on_cuda1.endswith(f"make bench PY={py} DEVICE=cuda:1 DEPS=")


def test_the_later_commands_refuse_without_the_first_ones_record(tmp_path, monkeypatch, capsys):
    """Run by hand on a machine without a GPU, they write nothing either."""
    monkeypatch.chdir(tmp_path)
    for args in (["step", "x", "--", "true"], ["report"]):
        assert gpu_check.main(args) == 2
        assert "run `make gpu-check`" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_make_gpu_check_without_cuda_runs_nothing_after_its_refusal():
    made = [os.path.join(HERE, p) for p in (gpu_check.CHECK_DIR, gpu_check.REPORT_MD,
                                            gpu_check.REPORT_JSON, gpu_check.RUNS_DIR)]
    before = {p: os.path.exists(p) and os.path.getmtime(p) for p in made}
    result = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PY={sys.executable}"],
                            cwd=HERE, capture_output=True, text=True, env=NO_GPU, timeout=120)
    assert result.returncode != 0
    # nothing after it
    assert result.stdout.splitlines() == [f"{sys.executable} gpu_check.py start --budget 480"]
    # gpu_check's one line; make adds its own "Error 2" after it
    refusal = result.stderr.splitlines()[0]
    assert refusal.startswith("gpu-check: needs a CUDA GPU") and "`make test`" in refusal
    assert "Traceback" not in result.stderr
    assert {p: os.path.exists(p) and os.path.getmtime(p) for p in made} == before


def test_random_teacher_is_a_loadable_vgg13_whose_runs_say_how_it_was_made(tmp_path):
    import models
    out = str(tmp_path / "ckpt" / "vgg13-random.pt")
    args = ["random-teacher", "--arch", "vgg13", "--classes", "100", "--out", out]
    assert gpu_check.main(args) == 0
    assert models.load_teacher("vgg13", out, 100).classifier.out_features == 100
    assert projkd.teacher_provenance(out)["how"].startswith("randomly initialised by gpu_check.py")
    assert gpu_check.main(["random-teacher", "--arch", "vgg99", "--out", out]) == 2


def test_a_bitwise_comparison_says_where_the_runs_part_and_by_how_much():
    """test_gpu.py's fp32 bitwise tests on failure: the first step whose loss differs, and per
    tensor the largest absolute and relative difference; here from hand-made tensors (those tests
    skip without CUDA)."""
    import torch

    from test_gpu import assert_bitwise_or_explained
    reference = {"conv.weight": torch.tensor([1.0, 2.0, -4.0]), "bn.bias": torch.tensor([0.5, 0.0]),
                 "bn.num_batches_tracked": torch.tensor(7)}
    other = {"conv.weight": torch.tensor([1.0, 2.5, -4.0]), "bn.bias": torch.tensor([0.5, 1e-6]),
             "bn.num_batches_tracked": torch.tensor(7)}
    report = gpu_check.difference_report(reference, other, [2.0, 1.5, 1.25, 1.0],
                                         [2.0, 1.5, 1.3, 1.0])
    assert report.splitlines() == [
        "first step that differs: 3 (loss 1.25 against 1.3); 2 of 3 tensors differ, most bn.bias "
        "(largest absolute difference 1e-06, relative 1)",
        "  bn.bias: largest absolute difference 1e-06, relative 1",  # 0 against 1e-6: wholly off
        "  conv.weight: largest absolute difference 0.5, relative 0.2"]  # 2.5 against 2.0
    same = {k: v.clone() for k, v in reference.items()}
    assert gpu_check.difference_report(reference, same, [2.0, 1.5], [2.0, 1.5]) == ""
    assert gpu_check.difference_report(reference, same, [2.0, 1.5], [2.0, 1.75], unit="epoch") == \
        "first epoch that differs: 2 (loss 1.5 against 1.75); all 3 tensors are bitwise equal"
    assert gpu_check.difference_report(reference, other, [2.0],
                                       [2.0]).startswith("no step's loss differs; ")
    # the failure as pytest shows it, and as the gpu-check report's table has it (the first line)
    properties = []
    with pytest.raises(AssertionError) as failed:
        assert_bitwise_or_explained([], lambda *p: properties.append(p), report, {"loss": 0.04},
                                    tolerance=1e-3)
    message = str(failed.value)
    assert message.splitlines()[0].startswith("not bitwise equal (first step that differs: 3 "
                                              "(loss 1.25 against 1.3); 2 of 3 tensors differ, "
                                              "most bn.bias")
    assert "  conv.weight: largest absolute difference 0.5, relative 0.2" in message
    assert properties == [("differences", report.splitlines()[0])]
    # equal: passes
    assert_bitwise_or_explained([], lambda *p: None, "", {"loss": 0.0}, tolerance=1e-3)


# --- the GPU preflight: gpu_check.py preflight and the Makefile's trainings waiting for it --------

PREFLIGHT_TESTS = list(gpu_check.PREFLIGHT_CHECKS.values())


def preflight_junit(failing=None, message="", skipped=None):
    """pytest's junit xml of the preflight's tests: each passes, but `failing` (with `message`) and
    `skipped`."""
    cases = []
    for test in PREFLIGHT_TESTS:
        outcome = ""
        if test == failing:
            outcome = f'<failure message="{message}">trace</failure>'
        if test == skipped:
            outcome = '<skipped type="pytest.skip" message="needs CUDA">skip</skipped>'
        cases.append(f'<testcase classname="test_gpu" name="{test}" time="2.5">{outcome}'
                     f'</testcase>')
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
            + "".join(cases) + "</testsuite></testsuites>")


@pytest.fixture
def stand_in_gpu(monkeypatch):
    """A CUDA GPU as gpu_check sees one, and pytest's run of the checks replaced by the junit xml
    that
    `results["xml"]` holds (None: pytest ran out of time and wrote none); `results["calls"]` counts
    runs."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    results = {"xml": preflight_junit(), "calls": 0}

    def run_command(command, timeout, log_path):
        results["calls"] += 1
        assert command[1:3] == ["-m", "pytest"] and timeout == 180
        assert [c.split("::")[1] for c in command if "::" in c] == PREFLIGHT_TESTS
        write(log_path, "")
        if results["xml"] is None:
            return None, 180.0, []
        write(command[command.index("--junitxml") + 1], results["xml"])
        return 0 if "<failure" not in results["xml"] else 1, 61.0, []
    monkeypatch.setattr(gpu_check, "run_command", run_command)
    return results


def test_preflight_passes_once_per_gpu_model_and_torch_version(tmp_path, monkeypatch, capsys,
                                                               stand_in_gpu):
    import torch
    monkeypatch.chdir(tmp_path)
    out = gpu_check.PREFLIGHT_JSON
    assert gpu_check.main(["preflight"]) == 0
    report = json.loads((tmp_path / out).read_text())
    assert report["status"] == "passed" and report["gpu"] == "NVIDIA H100 80GB HBM3"
    assert report["torch"] == torch.__version__
    assert [(c["check"], c["result"]) for c in report["checks"]] == [
        ("graph = eager", "pass"), ("cache = live", "pass"),
        ("bf16 losses finite and falling", "pass"), ("eval on CUDA = eval on CPU", "pass")]
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"gpu-preflight: passed on NVIDIA H100 80GB HBM3 with torch {torch.__version__} in 61 s: " \
        f"{out}"
    # the same GPU and torch
    assert gpu_check.main(["preflight"]) == 0 and stand_in_gpu["calls"] == 1
    said = capsys.readouterr().out
    assert said.startswith("gpu-preflight: passed on NVIDIA H100 80GB HBM3 with torch ")
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # another torch: checked again
    assert gpu_check.main(["preflight"]) == 0 and stand_in_gpu["calls"] == 2
    # another GPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_check.main(["preflight"]) == 0 and stand_in_gpu["calls"] == 3
    assert json.loads((tmp_path / out).read_text())["gpu"] == "NVIDIA H200"


@pytest.mark.parametrize("case", ["failure", "skipped", "missing", "timeout"])
def test_a_failed_preflight_check_is_one_line_naming_it_its_numbers_and_the_report(
        tmp_path, monkeypatch, capsys, stand_in_gpu, case):
    monkeypatch.chdir(tmp_path)
    graph_test = gpu_check.PREFLIGHT_CHECKS["graph = eager"]
    stand_in_gpu["xml"] = {
        "failure": preflight_junit(failing=graph_test,
                                   message="AssertionError: assert 0.034 &lt;= 0.01"),
        "skipped": preflight_junit(skipped=graph_test),
        "missing": preflight_junit().replace(f'name="{graph_test}"', 'name="test_renamed"'),
        "timeout": None}[case]
    assert gpu_check.main(["preflight"]) == 1
    err = capsys.readouterr().err
    why = {"failure": "AssertionError: assert 0.034 <= 0.01", "skipped": "needs CUDA",
           "missing": "did not run", "timeout": "did not run"}[case]
    assert err == (f"gpu-preflight: FAILED: graph = eager: {why} (report "
                   f"{gpu_check.PREFLIGHT_JSON}, log "
                   f"results/gpu-preflight/tests.log); PREFLIGHT=off trains without the check\n")
    report = json.loads((tmp_path / gpu_check.PREFLIGHT_JSON).read_text())  # kept, for the reader
    assert report["status"] == "failed" and report["checks"][0]["result"] == "fail"
    stand_in_gpu["xml"] = preflight_junit()
    # a failure is checked again
    assert gpu_check.main(["preflight"]) == 0 and stand_in_gpu["calls"] == 2


def test_preflight_off_records_the_skip_and_without_cuda_it_refuses_writing_nothing(
        tmp_path, monkeypatch, capsys):
    import torch
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["preflight"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-check: error: the preflight needs a CUDA GPU")
    assert err.count("\n") == 1
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytest" else find_spec(name, *a))
    assert gpu_check.main(["preflight"]) == 2  # a GPU node's python without pytest
    assert "pip install pytest" in capsys.readouterr().err and os.listdir(tmp_path) == []
    assert gpu_check.main(["preflight", "--off"]) == 0
    assert json.loads((tmp_path / gpu_check.PREFLIGHT_JSON).read_text())["status"] == "off"
    assert capsys.readouterr().out.startswith("gpu-preflight: off (PREFLIGHT=off)")


def fake_nvidia_smi(tmp_path, gpus):
    """A PATH whose nvidia-smi lists `gpus` (the Makefile asks it whether DEVICE=auto has a GPU)."""
    folder = tmp_path / f"bin-{len(gpus)}"
    folder.mkdir()
    listing = "".join(f"echo 'GPU {i}: {name}'; " for i, name in enumerate(gpus))
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{listing}exit 0\n")
    (folder / "nvidia-smi").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def pipeline_plan(*knobs, env=None):
    command = ["make", "--no-print-directory", "-n", "cifar-all", "SEEDS=1", "PY=py", "DEPS=",
               "DATA=", *knobs]
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_make_plan_trains_on_a_gpu_only_after_the_preflight(tmp_path):
    preflight = "py gpu_check.py preflight --timeout 180 --out results/gpu-preflight.json"
    for knobs, env in ((["DEVICE=cuda:0"], None), (["DEVICE=cuda"], None),
                       ([], fake_nvidia_smi(tmp_path, ["NVIDIA H100 80GB HBM3"]))):
        plan = pipeline_plan(*knobs, env=env)
        trainings = [i for i, line in enumerate(plan) if "projkd.py --dataset" in line]
        assert len(trainings) == 4 + 20 and plan.count(preflight) == 1, (knobs, plan[:3])
        assert plan.index(preflight) < min(trainings)  # every training waits for it
    launch = "srun -N1 -n1 --gres=gpu:1"
    # under LAUNCH, like every GPU command
    assert f"{launch} {preflight}" in pipeline_plan(f"LAUNCH={launch}")
    skipped = pipeline_plan("DEVICE=cuda:0", f"LAUNCH={launch}", "PREFLIGHT=off")
    # no GPU needed
    assert "py gpu_check.py preflight --off --out results/gpu-preflight.json" in skipped
    assert not any("preflight --timeout" in line for line in skipped)
    # on the CPU: none
    for knobs, env in ((["DEVICE=cpu"], None), ([], fake_nvidia_smi(tmp_path, []))):
        assert not any("preflight" in line for line in pipeline_plan(*knobs, env=env))


STAND_IN_PY = """#!/bin/sh
# Stands in for python: logs each command; the preflight exits with PREFLIGHT_STATUS.
echo "$*" >> {log}
case "$*" in *"gpu_check.py preflight"*) exit ${{PREFLIGHT_STATUS:-0}};; esac
"""


@pytest.mark.parametrize("status", [1, 0])
def test_a_failed_preflight_stops_the_pipeline_before_any_training(tmp_path, status):
    for name in ("Makefile", "params.mk"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    write(str(tmp_path / "checkpoints" / "cifar100" / "vgg13.pt"), "")  # a teacher: none to fetch
    python, log = tmp_path / "py", tmp_path / "calls.log"
    python.write_text(STAND_IN_PY.format(log=log))
    python.chmod(0o755)
    result = subprocess.run(["make", "--no-print-directory", "pair", "T=vgg13", "S=vgg8", "SEEDS=1",
                             "DEVICE=cuda:0", f"PY={python}", "DEPS=", "DATA=", "METHODS=pefd ce",
                             "TEACHER_CACHE=off"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PREFLIGHT_STATUS": str(status)})
    calls = log.read_text().splitlines()
    assert calls[0] == "gpu_check.py preflight --timeout 180 --out results/gpu-preflight.json"
    if status:
        assert result.returncode != 0 and calls == calls[:1]  # nothing trained
    else:
        assert [c.split("--run-dir ")[1].split()[0] for c in calls[1:]] == [
            "runs/cifar100/vgg8/ce-seed1", "runs/cifar100/vgg13-vgg8/pefd-seed1"]


@pytest.mark.parametrize("report,said", [
    (None, "; GPU preflight: none recorded"),
    ({"status": "off"},
     "; GPU preflight: off (PREFLIGHT=off: the GPU was not checked before the runs)"),
    ({"status": "passed", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"},
     "; GPU preflight: passed on NVIDIA H100 80GB HBM3 with torch 2.11.0")])
def test_the_tables_conditions_say_whether_the_gpu_was_checked_first(tmp_path, monkeypatch, report,
                                                                     said):
    import tables
    monkeypatch.chdir(tmp_path)
    if report is not None:
        write_json(gpu_check.PREFLIGHT_JSON, report)
    on_gpu = {"epochs": 240, "config": {"dataset": "cifar100", "device": "cuda:0"},
              "device": "NVIDIA H100", "torch": "2.11.0", "code": "abc"}
    on_cpu = {**on_gpu, "config": {"dataset": "cifar100", "device": "cpu"}, "device": "cpu"}
    assert tables.conditions([on_gpu, on_cpu]).endswith("finished runs: 2" + said)
    # runs on the CPU: nothing to say
    assert tables.conditions([on_cpu]).endswith("finished runs: 1")
