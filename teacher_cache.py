"""The teacher-output cache of projkd (not part of the reference: projkd.py imports it only when a cache is used).

A frozen teacher in eval mode is a fixed function of its input, and 4-pixel zero-padded crops with flips give
each training image exactly 9 x 9 x 2 = 162 views. So the teacher's feature and logits for every view of every
image are computed once per teacher checkpoint, stored in 16 bits on disk, and each epoch reads back the row of
the view each image drew, instead of running the teacher. The file is keyed to everything its rows depend on;
a cache built from anything else is rebuilt, never used.

    python projkd.py cache --teacher vgg13 [--teacher-ckpt PATH] [--teacher-cache-file F]   (make builds it)
"""
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from projkd import (CROP_PADDING, Config, Taps, UserError, atomic_write, classifier_of, crop_flip, device_name,
                    load_data, load_teacher, log, normalize, options_of, plan_epoch, precision, resolve_config,
                    setup_torch, teacher_for_speed)

CACHE_VIEWS = (2 * CROP_PADDING + 1) ** 2 * 2
CACHE_HEADER_BYTES = 4096  # a JSON header, space-padded; the rows follow
CACHE_FORMAT = "projkd-teacher-cache-1"


def view_index(dy, dx, flip, padding=CROP_PADDING):
    """The view number in [0, 162) of crop corner (dy, dx) and flip: the cache's first axis."""
    return (dy * (2 * padding + 1) + dx) * 2 + flip.long()


def view_draws(v, n, device, padding=CROP_PADDING):
    """(dy, dx, flip) of view v for n images, as crop_flip takes them: the inverse of view_index."""
    corner, flip = divmod(v, 2)
    dy, dx = divmod(corner, 2 * padding + 1)
    return (torch.full((n,), dy, device=device), torch.full((n,), dx, device=device),
            torch.full((n,), bool(flip), device=device))


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_identity(cfg, data):
    """Everything a cache's contents depend on, and its key: the teacher checkpoint's content (not its name),
    the training images, the normalisation and the precision the teacher runs at (--amp)."""
    identity = {"format": CACHE_FORMAT, "teacher": cfg.teacher, "checkpoint_sha256": file_sha256(cfg.teacher_ckpt),
                "images_sha256": hashlib.sha256(data.train_x.cpu().contiguous().numpy()).hexdigest(),
                "mean": [round(v, 6) for v in data.mean.flatten().tolist()],
                "std": [round(v, 6) for v in data.std.flatten().tolist()], "padding": CROP_PADDING,
                "precision": cfg.amp}
    identity["key"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return identity


def read_cache_header(path):
    """The header of the cache file at `path`, or None if there is no readable one."""
    try:
        with open(path, "rb") as f:
            header = json.loads(f.read(CACHE_HEADER_BYTES).decode())
        size = os.path.getsize(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    expected = CACHE_HEADER_BYTES + 2 * CACHE_VIEWS * header.get("images", 0) * header.get("width", 0)
    return header if header.get("format") == CACHE_FORMAT and size == expected else None


class TeacherCache:
    """An open cache file: rows(images, views) gives, per image index and view number, the teacher's
    feature followed by its logits, as bfloat16 bit patterns (int16: numpy has no bfloat16)."""

    def __init__(self, path, header):
        self.path, self.header = path, header
        self.feature_dim, self.num_classes = header["feature_dim"], header["num_classes"]
        self.array = np.memmap(path, dtype=np.int16, mode="r", offset=CACHE_HEADER_BYTES,
                               shape=(CACHE_VIEWS, header["images"], header["width"]))

    def rows(self, images, views):
        return self.array[np.asarray(views), np.asarray(images)]


def _write_rows(f, teacher, taps, images, mean, std, autocast, memory_format, batch_size, feature_dim):
    """The teacher's rows of every view, view after view, into the open file f."""
    n, start, last_report = len(images), time.time(), time.time()
    rows = torch.empty(n, feature_dim + classifier_of(teacher).out_features, dtype=torch.bfloat16, device=images.device)
    for v in range(CACHE_VIEWS):
        dy, dx, flip = view_draws(v, batch_size, images.device)
        for i in range(0, n, batch_size):
            batch = images[i:i + batch_size]
            k = len(batch)
            x = normalize(crop_flip(batch, dy[:k], dx[:k], flip[:k]), mean, std)
            with autocast:
                logits = teacher(x.contiguous(memory_format=memory_format))
            rows[i:i + k, :feature_dim] = taps.feature
            rows[i:i + k, feature_dim:] = logits
        f.write(rows.view(torch.int16).cpu().numpy())  # numpy has no bfloat16; the bits are the same
        if time.time() - last_report > 30:
            last_report = time.time()
            log(f"  teacher cache: view {v + 1}/{CACHE_VIEWS}, {(v + 1) * n / (last_report - start):,.0f} images/s")


@torch.inference_mode()
def build_teacher_cache(path, teacher, images, mean, std, autocast, memory_format, identity, batch_size):
    """Runs `teacher` (eval mode) on all 162 views of every image and writes the cache file at `path`
    atomically. The teacher runs exactly as in a training step: same normalisation, layout and autocast."""
    n, (c, h, w) = len(images), images.shape[1:]
    feature_dim, num_classes = classifier_of(teacher).in_features, classifier_of(teacher).out_features
    width = feature_dim + num_classes
    need = CACHE_HEADER_BYTES + 2 * CACHE_VIEWS * n * width
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if shutil.disk_usage(folder).free < need * 1.02:
        raise UserError(f"the teacher cache needs {need / 1e9:.1f} GB in {folder}, which has "
                        f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free; use --teacher-cache-file elsewhere "
                        f"or --teacher-cache off")
    log(f"building the teacher cache {path}: {CACHE_VIEWS} views x {n} images x {width} values, {need / 1e9:.2f} GB")
    start, taps = time.time(), Taps(teacher)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b" " * CACHE_HEADER_BYTES)  # the header goes in last, once the build time is known
            _write_rows(f, teacher, taps, images, mean, std, autocast, memory_format, batch_size, feature_dim)
            header = {**identity, "images": n, "views": CACHE_VIEWS, "width": width, "feature_dim": feature_dim,
                      "num_classes": num_classes, "dtype": "bfloat16", "image_shape": [c, h, w],
                      "layout": "view, image, feature then logits; view = (dy * 9 + dx) * 2 + flip",
                      "build_seconds": round(time.time() - start, 1), "device": device_name(images.device),
                      "torch": torch.__version__}
            encoded = json.dumps(header).encode()
            assert len(encoded) < CACHE_HEADER_BYTES, "the cache header outgrew its space"
            f.seek(0)
            f.write(encoded)

    try:
        atomic_write(path, write)
    finally:
        taps.remove()
    header = read_cache_header(path)
    log(f"built the teacher cache in {header['build_seconds']:.0f} s "
        f"({CACHE_VIEWS * n / max(header['build_seconds'], 1e-9):,.0f} images/s)")
    return TeacherCache(path, header)


def open_teacher_cache(path, identity):
    """The cache at `path` if it was built from exactly this identity (key), else None."""
    header = read_cache_header(path)
    if header is None or header.get("key") != identity["key"]:
        return None
    return TeacherCache(path, header)


def ensure_teacher_cache(path, identity, teacher, data, autocast, memory_format, batch_size):
    """The cache at `path` for `identity`, built first if there is none or it was built from something else.
    A lock on its folder makes concurrent runs of one teacher build it once: the others wait, then read it."""
    import fcntl  # POSIX only, like the lock

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = open_teacher_cache(path, identity)
        if cache is None:
            if os.path.exists(path):
                log(f"note: {path} was built from another checkpoint, data set or precision; rebuilding it")
            cache = build_teacher_cache(path, teacher, data.train_x, data.mean, data.std, autocast, memory_format,
                                        identity, batch_size)
        return cache
    finally:
        os.close(lock)  # and with it the lock


def plan_with_rows(seed, epoch, n_train, n_used, cache):
    """projkd.plan_epoch's draws, with the cached teacher rows of the views the images drew."""
    plan = plan_epoch(seed, epoch, n_train, n_used)
    return plan._replace(teacher_rows=cache.rows(plan.order.numpy(), view_index(plan.dy, plan.dx, plan.flip).numpy()))


class EpochPlanner:
    """plan(epoch) returns that epoch's plan and starts the next one's in a background thread, which reads the
    teacher cache while the GPU trains. The thread touches no CUDA, so graph capture and replay are undisturbed."""

    def __init__(self, seed, n_train, n_used, cache, epochs):
        self.seed, self.n_train, self.n_used, self.cache, self.epochs = seed, n_train, n_used, cache, epochs
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), {}

    def _submit(self, epoch):
        return self.pool.submit(plan_with_rows, self.seed, epoch, self.n_train, self.n_used, self.cache)

    def plan(self, epoch):
        future = self.pending.pop(epoch, None) or self._submit(epoch)
        if epoch + 1 < self.epochs:
            self.pending[epoch + 1] = self._submit(epoch + 1)
        return future.result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def open_for_run(run):
    """The open teacher cache of a training run, built first if needed; under torchrun process 0 builds it while
    the others wait."""
    cfg, data = run.cfg, run.data
    identity = cache_identity(cfg, data)
    if run.world_size == 1 or torch.distributed.get_rank() == 0:
        cache = ensure_teacher_cache(cfg.teacher_cache_file, identity, run.teacher, data, run.autocast,
                                     run.memory_format, cfg.eval_batch_size)
    if run.world_size > 1:
        torch.distributed.barrier()
        cache = open_teacher_cache(cfg.teacher_cache_file, identity)
    log(f"teacher cache: {cfg.teacher_cache_file} (built in {cache.header['build_seconds']:.0f} s on "
        f"{cache.header['device']})")
    return cache


# `projkd.py cache` takes every training option, so that one set of flags (make's EXTRA) serves a run and its
# teacher's cache; --help lists those that change the cache.
CacheConfig = options_of("CacheConfig", None, ("teacher", "teacher_ckpt", "teacher_cache_file", "dataset", "data_dir",
                                               "download", "synthetic_size", "synthetic_classes", "amp", "device",
                                               "eval_batch_size"))
CacheConfig.parse_as = Config


def cache_command(cfg):
    """`projkd.py cache`: the teacher cache of --teacher-ckpt for --dataset, built unless an identical one exists;
    its time stamp is renewed either way, so that make sees it as newer than the checkpoint."""
    cfg, notes = resolve_config(cfg, command="cache")
    for note in notes:
        log("note: " + note)
    device = torch.device(cfg.device)
    setup_torch(device, cfg.deterministic)
    data = load_data(cfg, device)
    memory_format, amp_dtype, autocast = precision(cfg.amp, device)
    teacher = teacher_for_speed(load_teacher(cfg.teacher, cfg.teacher_ckpt, data.num_classes).to(device),
                                amp_dtype, memory_format)
    cache = ensure_teacher_cache(cfg.teacher_cache_file, cache_identity(cfg, data), teacher, data, autocast,
                                 memory_format, cfg.eval_batch_size)
    os.utime(cache.path)
    log(f"{cache.path}: the teacher cache of {cfg.teacher_ckpt}, up to date")
