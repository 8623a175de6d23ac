"""Tests for teacher_cache.py: the teacher's outputs on every crop and flip, stored once, equal the
live teacher's; the file's identity, its lock and a disk too small for it."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch

import models
import projkd
import teacher_cache
from conftest import SMALL_STUDENT, shutil_usage
from models import MODELS
from projkd import (
    crop_flip,
    features_and_logits,
)


def test_view_numbers_cover_every_crop_and_flip_once():
    views = [teacher_cache.view_draws(v, 1, "cpu") for v in range(teacher_cache.CACHE_VIEWS)]
    assert teacher_cache.CACHE_VIEWS == 162
    assert [teacher_cache.view_index(*draws).item() for draws in views] == list(range(162))
    assert len({(dy.item(), dx.item(), f.item()) for dy, dx, f in views}) == 162


@pytest.fixture(scope="module")
def cache_teacher(tmp_path_factory):
    """A small teacher (random weights: the cache must reproduce whatever the teacher computes) and
    its cache on 32 synthetic images, built through the CLI."""
    folder = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    torch.save(MODELS["resnet8"](num_classes=10).state_dict(), folder / "resnet8.pt")
    args = ["cache", "--teacher", "resnet8", "--teacher-ckpt", str(folder / "resnet8.pt"),
            "--dataset", "synthetic", "--synthetic-size", "32", "--device", "cpu"]
    assert projkd.main(args) == 0
    return folder, args


def test_cached_teacher_outputs_equal_the_live_teacher(cache_teacher):
    folder, _ = cache_teacher
    header = teacher_cache.read_cache_header(str(folder / "resnet8.tcache"))
    assert (header["images"], header["views"], header["width"],
            header["dtype"]) == (32, 162, 64 + 10, "bfloat16")
    cache = teacher_cache.TeacherCache(str(folder / "resnet8.tcache"), header)
    teacher = models.load_teacher("resnet8", str(folder / "resnet8.pt"), 10)
    train_x = projkd.make_synthetic(32, 10)[0]
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 32, (40,), generator=g)
    dy, dx, flip = projkd.augmentation_draws(40, g)
    views = teacher_cache.view_index(dy, dx, flip).numpy()
    rows = torch.from_numpy(cache.rows(images.numpy(), views)).view(torch.bfloat16)
    x = projkd.normalize(crop_flip(train_x[images], dy, dx, flip), torch.full((1, 3, 1, 1), 0.5),
                         torch.full((1, 3, 1, 1), 0.25))
    with torch.no_grad():
        feature, logits = features_and_logits(teacher, x)
    live = torch.cat([feature, logits], dim=1)
    # the cache stores bfloat16: 8 significant bits
    assert torch.allclose(rows.float(), live, rtol=2 ** -8, atol=1e-6)
    assert torch.equal(rows, live.to(torch.bfloat16))


def test_a_cache_from_another_checkpoint_is_never_used(cache_teacher, capsys):
    folder, args = cache_teacher
    path = str(folder / "resnet8.tcache")
    built = teacher_cache.read_cache_header(path)
    assert projkd.main(args) == 0  # identical: kept, only its time stamp renewed
    assert "up to date" in capsys.readouterr().out
    assert teacher_cache.read_cache_header(path) == built
    torch.manual_seed(1)
    # same name below, new content
    torch.save(MODELS["resnet8"](num_classes=10).state_dict(), folder / "other.pt")
    os.replace(folder / "other.pt", folder / "resnet8.pt")
    assert projkd.main(args) == 0
    assert "rebuilding it" in capsys.readouterr().out
    rebuilt = teacher_cache.read_cache_header(path)
    assert rebuilt["checkpoint_sha256"] != built["checkpoint_sha256"]
    assert rebuilt["key"] != built["key"]
    # other images: rebuilt too
    assert projkd.main(args[:-2] + ["--synthetic-size", "48", "--device", "cpu"]) == 0
    assert teacher_cache.read_cache_header(path)["images"] == 48


def test_cached_and_live_runs_agree(tmp_path, cache_teacher):
    folder, _ = cache_teacher
    common = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "16", "--epochs",
              "2", "--device",
              "cpu", "--deterministic", "--teacher", "resnet8", "--student", SMALL_STUDENT,
              "--teacher-ckpt", str(folder / "resnet8.pt"), "--teacher-cache-file",
              str(tmp_path / "t.tcache")]
    for cache in ("on", "off"):
        assert projkd.main(common
                           + ["--teacher-cache", cache, "--run-dir", str(tmp_path / cache)]) == 0
    on, off = (json.loads((tmp_path / c / "metrics.json").read_text()) for c in ("on", "off"))
    assert on["config"]["teacher_cache"] == "on" and off["config"]["teacher_cache"] == "off"
    for a, b in zip(on["history"], off["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    # how long each epoch waited for its rows, in log.csv too
    assert all(h["plan_wait_s"] >= 0 for h in on["history"])
    wa, wb = (torch.load(tmp_path / c / "model.pt", weights_only=True) for c in ("on", "off"))
    # the cached teacher outputs are bfloat16-rounded: the weights drift apart by a fraction of a
    # percent
    va, vb = (torch.cat([w[k].flatten() for k in w if w[k].is_floating_point()]) for w in (wa, wb))
    assert (va - vb).norm() <= 3e-3 * va.norm()


def test_cache_rows_are_gathered_in_file_order_and_from_memory_when_the_file_fits(cache_teacher):
    folder, _ = cache_teacher
    path = str(folder / "resnet8.tcache")
    header = teacher_cache.read_cache_header(path)
    g, n = torch.Generator().manual_seed(5), header["images"]
    images = torch.randint(0, n, (500,), generator=g).numpy()
    views = torch.randint(0, 162, (500,), generator=g).numpy()
    on_disk, in_memory = (teacher_cache.TeacherCache(path, header, share) for share in (0.0, 1.0))
    direct = np.memmap(path, dtype=np.int16, mode="r", offset=teacher_cache.CACHE_HEADER_BYTES,
                       shape=(162, n, header["width"]))[views, images]  # the rows by plain indexing
    assert not on_disk.read_whole and in_memory.read_whole
    assert np.array_equal(on_disk.rows(images, views),
                          direct) and np.array_equal(in_memory.rows(images, views), direct)
    assert isinstance(in_memory.whole, np.ndarray) and not isinstance(in_memory.whole, np.memmap)


def test_the_processes_of_one_machine_share_the_memory_budget_of_the_cache(tmp_path, monkeypatch):
    """Under torchrun each of LOCAL_WORLD_SIZE processes would read its own copy: the file is read
    whole only if all the copies fit in --teacher-cache-ram of the memory."""
    import types
    teacher = MODELS["resnet8"](num_classes=10).eval()
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    cfg = projkd.Config(teacher="resnet8", teacher_ckpt=str(tmp_path / "t.pt"), amp="off",
                        dataset="synthetic", synthetic_size=8, teacher_cache_ram=0.25,
                        eval_batch_size=64, teacher_cache_file=str(tmp_path / "t.tcache"))
    run = types.SimpleNamespace(cfg=cfg, data=projkd.load_data(cfg, torch.device("cpu")),
                                teacher=teacher,
                                autocast=contextlib.nullcontext(),
                                memory_format=torch.contiguous_format)
    teacher_cache.open_for_run(run)  # builds it
    size = os.path.getsize(tmp_path / "t.tcache")
    monkeypatch.setattr(teacher_cache, "physical_memory", lambda: 8 * size)  # a quarter: 2 copies
    for processes, whole in (("1", True), ("2", True), ("3", False), ("8", False)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
        assert teacher_cache.open_for_run(run).read_whole == whole, processes


def test_processes_wait_for_a_cache_on_its_file_lock_and_say_so(tmp_path, capsys):
    """Under torchrun the processes that do not build the cache wait on its lock, never in a
    collective (NCCL's times out after 10 minutes): here the lock is held by another thread while
    the build waits."""
    import fcntl
    import threading
    teacher = MODELS["resnet8"](num_classes=10).eval()
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    data = projkd.load_data(projkd.Config(dataset="synthetic", synthetic_size=32),
                            torch.device("cpu"))
    identity = teacher_cache.cache_identity(projkd.Config(teacher="resnet8",
                                                          teacher_ckpt=str(tmp_path / "t.pt"),
                                                          amp="off"), data)
    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(1.0, os.close, [holder]).start()  # the other process finishes
    cache = teacher_cache.ensure_teacher_cache(str(tmp_path / "t.tcache"), identity, teacher,
                                               data, contextlib.nullcontext(),
                                               torch.contiguous_format, 64)
    assert "waits for another process to finish the teacher cache" in capsys.readouterr().out
    assert cache.header["key"] == identity["key"]


def test_a_disk_too_small_for_the_cache_is_one_line_and_no_file(tmp_path, capsys, monkeypatch):
    torch.save(MODELS["resnet8"](num_classes=10).state_dict(), tmp_path / "resnet8.pt")
    full = shutil_usage(total=10 ** 9, used=10 ** 9, free=1000)
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: full)
    assert projkd.main(["cache", "--teacher", "resnet8", "--teacher-ckpt",
                        str(tmp_path / "resnet8.pt"),
                        "--dataset", "synthetic", "--synthetic-size", "32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the teacher cache needs 0.0 GB" in err and "--teacher-cache off" in err
    assert err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["resnet8.pt"]
