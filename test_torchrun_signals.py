"""Tests for torchrun_signals.py: a signal sent to torchrun's own pid reaches every worker, which
stop at one step, write last.pt and exit 138/143; the launcher exits with their status, and the
resumed run equals an uninterrupted one. Two processes with gloo on the CPU."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import torchrun_signals
from conftest import SMALL_STUDENT

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCHER = os.path.join(HERE, "torchrun_signals.py")

# projkd.main, in a worker that sends torchrun (its parent) SIGUSR1 and then SIGTERM when process 1
# starts its third step: Slurm's warning and the time limit's end, to torchrun's pid, mid-epoch.
# That worker then waits (at most a minute) until both have come back to it through the launcher,
# so that the test does not depend on how fast the rest of the epoch is.
SIGNALS_TO_TORCHRUN = """import os, signal, sys, time
sys.path.insert(0, {here!r})
import projkd
calls, received = [], []
train_step, handle = projkd.train_step, projkd.StopSignals.handle
def handle_and_note(self, signum, frame):
    received.append(signum)
    return handle(self, signum, frame)
def step(*args):
    calls.append(1)
    if len(calls) == 3 and os.environ["RANK"] == "1":
        os.kill(os.getppid(), signal.SIGUSR1)
        os.kill(os.getppid(), signal.SIGTERM)
        waited_until = time.time() + 60
        while len(received) < 2 and time.time() < waited_until:
            time.sleep(0.01)
    return train_step(*args)
projkd.train_step = step
projkd.StopSignals.handle = handle_and_note
sys.exit(projkd.main(sys.argv[1:]))
"""


def run_args(run_dir, *extra):
    return ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "32",
            "--epochs", "1", "--device", "cpu", "--student", SMALL_STUDENT, "--method", "ce",
            "--checkpoint-seconds", "0", "--run-dir", str(run_dir), *extra]


def launch(script, *args):
    command = [sys.executable, LAUNCHER, "--standalone", "--nproc_per_node=2", script, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_signals_to_torchrun_reach_every_worker_and_the_resumed_run_equals_a_straight_one(tmp_path):
    projkd_py = os.path.join(HERE, "projkd.py")
    straight = launch(projkd_py, *run_args(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stdout + straight.stderr
    script = tmp_path / "signals.py"
    script.write_text(SIGNALS_TO_TORCHRUN.format(here=HERE))
    run_dir = tmp_path / "run"
    stopped = launch(str(script), *run_args(run_dir))
    out = stopped.stdout + stopped.stderr
    # both workers stopped at one check point; whichever signal they had seen last names the status
    assert stopped.returncode in (128 + signal.SIGUSR1, 128 + signal.SIGTERM), out
    assert "stopped after step" in stopped.stderr and "Traceback" not in out, out
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["steps_done"] >= 3, out
    assert len(last["epoch_state"]["loss"]) == 2  # both processes' sums
    assert sorted(os.listdir(run_dir)) == ["last.pt"]  # no .lock
    resumed = launch(projkd_py, *run_args(run_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {run_dir} at step {last['steps_done'] + 1} of epoch 1" in resumed.stdout
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (tmp_path / "straight", run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    timings = ("seconds", "images_per_s", "plan_wait_s")
    ha, hb = (json.loads((d / "metrics.json").read_text())["history"]
              for d in (tmp_path / "straight", run_dir))
    assert [{k: v for k, v in h.items() if k not in timings} for h in ha] == \
        [{k: v for k, v in h.items() if k not in timings} for h in hb]


def test_the_launcher_exits_with_the_status_of_the_worker_that_failed_first():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def failure(rank, exitcode, at):
        failed = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file="")
        failed.timestamp = at
        return failed
    stopped = ChildFailedError("projkd.py", {0: failure(0, 138, at=2), 1: failure(1, -15, at=1)})
    assert torchrun_signals.exit_status(stopped) == 143  # process 1 went first, ended by SIGTERM
    refused = ChildFailedError("projkd.py", {0: failure(0, 2, at=1)})
    assert torchrun_signals.exit_status(refused) == 2


def test_children_are_the_processes_this_one_started():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in torchrun_signals.children(os.getpid())
        assert os.getpid() not in torchrun_signals.children(os.getpid())
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_before_any_worker_started_ends_the_launcher_as_it_would_have(signum):
    """Without workers to pass it on to, the signal does what it does by default: it stops."""
    relay_alone = (f"import os, signal, sys, time; sys.path.insert(0, {HERE!r}); "
                   f"import torchrun_signals; signal.signal({signum}, torchrun_signals.relay); "
                   f"os.kill(os.getpid(), {signum}); time.sleep(30)")
    begin = time.time()
    result = subprocess.run([sys.executable, "-c", relay_alone], capture_output=True, timeout=60)
    assert result.returncode == -signum and time.time() - begin < 30
