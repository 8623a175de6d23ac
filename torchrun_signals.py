"""torchrun that passes SIGUSR1 and SIGTERM on to every worker and waits for them to stop.

Not part of the reference: a launcher, used where the pipeline runs torchrun (the ImageNet rules)
and in docs/many-gpus.md's Slurm script. It takes torchrun's own arguments:

    python3 torchrun_signals.py --standalone --nproc_per_node=8 projkd.py ... --resume

Why not torchrun itself: torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT, so Slurm's
`--signal=USR1@180` kills it while its workers are still writing last.pt. Newer torch versions
have `--signals-to-handle`, but torchrun still takes a forwarded signal as its own end: it kills
every worker that has not exited 30 s later. Here the signal only asks: each worker (projkd.py)
goes on to its next check point, where all of them agree to stop, writes its part of last.pt and
exits with 128 + the signal (138 for SIGUSR1, 143 for SIGTERM); this launcher then exits with
the same status. The same on every torch version: torchrun's agent runs in a thread of its own,
where torch installs no signal handlers, and this process's main thread relays the signals.
Linux only (the workers are found in /proc).
"""
import logging
import os
import signal
import sys
import threading

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

# The signals torchrun forwards, and Slurm's --signal: each is passed on to the workers as it is.
RELAYED = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1]


def children(pid):
    """The pids of the processes whose parent is `pid`: torchrun's workers, for this process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # it exited meanwhile
            continue
        parent = stat.rsplit(")", 1)[1].split()[1]  # the name in parentheses may hold spaces
        if int(parent) == pid:
            found.append(int(entry))
    return found


def relay(signum, frame):
    workers = children(os.getpid())
    if not workers:  # none started yet, or all gone: the signal does what it would have done
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


class NoThreadWarning(logging.Filter):
    """Drops torch's warning that it installs no signal handlers off the main thread: that is
    the point here."""
    def filter(self, record):
        return "child thread" not in record.getMessage()


def exit_status(error):
    """The status of the worker that failed first: its exit code, or 128 + the signal that
    ended it."""
    _, failure = error.get_first_failure()
    if failure.exitcode < 0:
        return 128 - failure.exitcode
    return failure.exitcode


def main(argv=None):
    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(NoThreadWarning())
    outcome = {}

    def launch():
        try:
            torchrun.run(args)
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    agent = threading.Thread(target=launch, name="torchrun", daemon=True)
    for signum in RELAYED:
        signal.signal(signum, relay)
    agent.start()
    # A signal may be delivered to any thread; Python runs its handler (relay) in the main thread,
    # but only once that thread runs again: a plain join() could sleep through it until the
    # workers have ended. Waking every 0.1 s relays each signal within 0.1 s.
    while agent.is_alive():
        agent.join(timeout=0.1)
    error = outcome.get("error")
    if isinstance(error, ChildFailedError):
        return exit_status(error)
    if error is not None:
        raise error
    return 0


if __name__ == "__main__":
    sys.exit(main())
