"""Fixtures and helpers that several test files share: small CLI runs on synthetic data, a trained
teacher, small CIFAR and ImageNet folders in their real on-disk formats, torchrun and make, and
hand-made run results."""
import csv
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import projkd

HERE = os.path.dirname(os.path.abspath(__file__))
COMPAT = os.path.join(HERE, "testdata", "repdistiller")
# The two smallest architectures keep the end-to-end runs at a few seconds on two CPU cores.
SMALL_TEACHER, SMALL_STUDENT = "resnet20", "resnet8"
# The paper's four ImageNet pairs (its Table 1), as Make and tables.py take them.
IMAGENET_PAIRS = (
    "resnet34:resnet18 resnet50:mobilenet_v1 densenet201:resnet18 densenet201:mobilenet_v1"
)


@pytest.fixture(scope="session", autouse=True)
def not_under_make():
    """`make test` runs the suite under make, where a run labels its lines: every test starts
    outside make (those that want make's behaviour set MAKELEVEL themselves, or run make)."""
    level = os.environ.pop("MAKELEVEL", None)
    yield
    if level is not None:
        os.environ["MAKELEVEL"] = level


def synthetic_args(*extra):
    return ["--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "32",
            "--epochs", "1", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def synthetic_teacher(tmp_path_factory):
    """A small teacher trained with --method ce on synthetic data through the CLI."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "512", "--batch-size", "32",
            "--epochs", "3", "--device", "cpu", "--deterministic",
            "--student", SMALL_TEACHER, "--method", "ce", "--run-dir", str(run_dir)]
    assert projkd.main(args) == 0
    return run_dir


def small_run(tmp_path, *extra, **changes):
    """A Run set up exactly as training sets one up (synthetic data, CPU), without training it."""
    args = projkd.parse_args(synthetic_args("--student", SMALL_STUDENT, "--method", "ce",
                                            "--run-dir", str(tmp_path / "run"), *extra))
    return projkd.setup_run(projkd.dataclasses.replace(args, **changes))


def write_image_folder(root, classes=("ant", "bee", "cat"), train=4, val=2, seed=0):
    """A tiny ImageNet-style tree: root/{train,val}/<class>/*.JPEG, small JPEGs of odd sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(21, 70, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.JPEG")
    return root


def imagenet_args(root, *extra):
    return ["--dataset", "imagenet", "--data-dir", str(root), "--image-size", "32",
            "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--workers", "1", *extra]


def write_cifar_pickles(root, n_train=200, n_test=100, bytes_keys=True, seed=0):
    """A small data set in the official cifar-100-python layout (pickled dicts; the official archive
    was written by Python 2, so its keys read back as bytes)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [i % 100 for i in range(n)]
        d = {"data": data, "fine_labels": labels, "coarse_labels": [lab // 5 for lab in labels],
             "filenames": [f"img{i}.png" for i in range(n)], "batch_label": split}
        if bytes_keys:
            d = {k.encode(): v for k, v in d.items()}
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump(d, f, protocol=2)
        out[split] = (data, labels)
    return out


def torchrun(*args, nproc=2, background=False):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", os.path.join(HERE, "projkd.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def make(*args, cwd=HERE, env=None):
    return subprocess.run(["make", "--no-print-directory", *args],
                          capture_output=True, text=True, cwd=cwd, env=env)


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def write_metrics(run_dir, last, best=None, teacher=None, cosine=0.5, top5=None, best_top5=None,
                  teacher_top5=None, evaluated="same", history=()):
    """A finished run's metrics.json (with `history`, also as log.csv), and its model.eval.json
    saying model.pt evaluates to `evaluated` (top-1; "same": the training loop's `last`; None: no
    evaluation yet)."""
    os.makedirs(run_dir, exist_ok=True)
    metrics = {
        "last_top1": last,
        "best_top1": best if best is not None else last,
        "teacher_top1": teacher,
        "last_top5": top5,
        "best_top5": best_top5 if best_top5 is not None else top5,
        "teacher_top5": teacher_top5,
        "between_class_cosine": cosine,
        "epochs": 240, "device": "test", "torch": "x", "code": "abc",
        "config": {"dataset": "cifar100"},
        "history": write_log(run_dir, history),
    }
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    if evaluated is not None:
        with open(os.path.join(run_dir, "model.eval.json"), "w") as f:
            json.dump({"top1": last if evaluated == "same" else evaluated, "top5": top5}, f)


def write_log(run_dir, history):
    """A run's log.csv as projkd.py writes it, from epoch rows (a run without metrics.json is
    unfinished)."""
    os.makedirs(run_dir, exist_ok=True)
    if history:
        with open(os.path.join(run_dir, "log.csv"), "w") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(history)
    return list(history)


def epochs(top1, mda=None, top5=None):
    """Epoch rows as in metrics["history"]; train_mda only where given (runs from before it was
    logged have none)."""
    rows = []
    for e, a in enumerate(top1):
        row = {"epoch": e + 1, "train_loss": 1.0 / (e + 1), "test_top1": a,
               "test_top5": (top5 or top1)[e], "between_class_cosine": 0.3}
        if mda:
            row["train_mda"] = mda[e]
        rows.append(row)
    return rows


def decoded_pngs(*paths):
    """The paths, each checked to be a PNG that decodes."""
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
    return list(paths)


def linked_figures(md):
    """The figures a markdown file links to (relative links), each checked to be a PNG that
    decodes."""
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md.read_text())
    return decoded_pngs(*(md.parent / link for link in links))


def shutil_usage(**fields):
    import collections

    return collections.namedtuple("usage", fields)(**fields)
