"""The teacher-output cache of projkd (not part of the reference: projkd.py imports it only when a
cache is used).

A frozen teacher in eval mode is a fixed function of its input, and 4-pixel zero-padded crops with
flips give each training image exactly 9 x 9 x 2 = 162 views. So the teacher's feature and logits
for every view of every image are computed once per teacher checkpoint, stored in 16 bits on disk,
and each epoch reads back the row of the view each image drew, instead of running the teacher. The
file is keyed to everything its rows depend on; a cache built from anything else is rebuilt, never
used.

    python projkd.py cache --teacher vgg13 [--teacher-ckpt PATH] [--teacher-cache-file F]
                                                                               (make builds it)
"""
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from projkd import (
    CROP_PADDING,
    Config,
    Taps,
    UserError,
    atomic_write,
    classifier_of,
    crop_flip,
    device_name,
    file_sha256,
    input_size,
    load_data,
    log,
    memory_format_and_autocast,
    models_module,
    normalize,
    options_of,
    plan_epoch,
    resolve_config,
    setup_torch,
    teacher_for_speed,
)

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

def cache_identity(cfg, data):
    """Everything a cache's contents depend on, and its key: the teacher checkpoint's content (not
    its name), the training images, the normalisation and the precision the teacher runs at
    (--amp)."""
    identity = {"format": CACHE_FORMAT, "teacher": cfg.teacher,
                "checkpoint_sha256": file_sha256(cfg.teacher_ckpt),
                "images_sha256":
                    hashlib.sha256(data.train_x.cpu().contiguous().numpy()).hexdigest(),
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
    expected = CACHE_HEADER_BYTES + 2 * CACHE_VIEWS * header.get("images",
                                                                 0) * header.get("width", 0)
    return header if header.get("format") == CACHE_FORMAT and size == expected else None

def physical_memory():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class TeacherCache:
    """An open cache file: rows(images, views) gives, per image index and view number, the teacher's
    feature followed by its logits, as bfloat16 bit patterns (int16: numpy has no bfloat16).

    The rows are read in file order (offsets sorted, gathered, put back in the caller's order): on a
    cold page cache an epoch's 50,000 reads of a few KB then sweep the file once instead of seeking
    at random. A file that takes at most `ram_share` of this machine's memory is read whole on the
    first call and served from memory."""
    def __init__(self, path, header, ram_share=0.0):
        self.path, self.header, self.whole = path, header, None
        self.feature_dim, self.num_classes = header["feature_dim"], header["num_classes"]
        self.array = np.memmap(path, dtype=np.int16, mode="r", offset=CACHE_HEADER_BYTES,
                               shape=(CACHE_VIEWS * header["images"], header["width"]))
        self.read_whole = os.path.getsize(path) <= ram_share * physical_memory()

    def planner(self, seed, n_train, n_used, epochs):
        """The EpochPlanner of a training run that reads this cache."""
        return EpochPlanner(seed, n_train, n_used, self, epochs)

    def rows(self, images, views):
        if self.read_whole and self.whole is None:
            self.whole = np.array(self.array)  # one sequential read of the whole file
        views, images = np.asarray(views, dtype=np.int64), np.asarray(images, dtype=np.int64)
        flat = views * self.header["images"] + images
        order = np.argsort(flat, kind="stable")
        out = np.empty((len(flat), self.array.shape[1]), dtype=np.int16)
        out[order] = (self.whole if self.whole is not None else self.array)[flat[order]]
        return out

def _write_rows(f, teacher, taps, images, mean, std, autocast, memory_format, batch_size,
                feature_dim):
    """The teacher's rows of every view, view after view, into the open file f."""
    n, start, last_report = len(images), time.time(), time.time()
    rows = torch.empty(n, feature_dim + classifier_of(teacher).out_features, dtype=torch.bfloat16,
                       device=images.device)
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
        # numpy has no bfloat16; the bits are the same
        f.write(rows.view(torch.int16).cpu().numpy())
        if time.time() - last_report > 30:
            last_report = time.time()
            log(f"  teacher cache: view {v + 1}/{CACHE_VIEWS}, "
                f"{(v + 1) * n / (last_report - start):,.0f} images/s")

@torch.inference_mode()
def build_teacher_cache(path, teacher, images, mean, std, autocast, memory_format, identity,
                        batch_size):
    """Runs `teacher` (eval mode) on all 162 views of every image and writes the cache file at
    `path` atomically. The teacher runs exactly as in a training step: same normalisation, layout
    and autocast."""
    n, (c, h, w) = len(images), images.shape[1:]
    feature_dim = classifier_of(teacher).in_features
    num_classes = classifier_of(teacher).out_features
    width = feature_dim + num_classes
    need = CACHE_HEADER_BYTES + 2 * CACHE_VIEWS * n * width
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if shutil.disk_usage(folder).free < need * 1.02:
        raise UserError(f"the teacher cache needs {need / 1e9:.1f} GB in {folder}, which has "
                        f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free; use "
                        "--teacher-cache-file elsewhere "
                        f"or --teacher-cache off")
    log(f"building the teacher cache {path}: {CACHE_VIEWS} views x {n} images x {width} values, "
        f"{need / 1e9:.2f} GB")
    start, taps = time.time(), Taps(teacher)

    def write(tmp):
        with open(tmp, "wb") as f:
            # the header goes in last, once the build time is known
            f.write(b" " * CACHE_HEADER_BYTES)
            _write_rows(f, teacher, taps, images, mean, std, autocast, memory_format, batch_size,
                        feature_dim)
            header = {**identity, "images": n, "views": CACHE_VIEWS, "width": width,
                      "feature_dim": feature_dim,
                      "num_classes": num_classes, "dtype": "bfloat16", "image_shape": [c, h, w],
                      "layout": "view, image, feature then logits; view = (dy * 9 + dx) * 2 + flip",
                      "build_seconds": round(time.time() - start, 1),
                      "device": device_name(images.device), "torch": torch.__version__}
            encoded = json.dumps(header).encode()
            assert len(encoded) < CACHE_HEADER_BYTES, "the cache header outgrew its space"
            f.seek(0)
            f.write(encoded)

    try:
        atomic_write(path, write)
    finally:
        taps.remove()
    seconds = read_cache_header(path)["build_seconds"]
    log(f"built the teacher cache in {seconds:.0f} s "
        f"({CACHE_VIEWS * n / max(seconds, 1e-9):,.0f} images/s)")

def open_teacher_cache(path, identity, ram_share=0.0):
    """The cache at `path` if it was built from exactly this identity (key), else None."""
    header = read_cache_header(path)
    if header is None or header.get("key") != identity["key"]:
        return None
    return TeacherCache(path, header, ram_share)

def ensure_teacher_cache(path, identity, teacher, data, autocast, memory_format, batch_size,
                         ram_share=0.0):
    """The cache at `path` for `identity`, built first if there is none or it was built from
    something else. A lock on its folder makes concurrent runs of one teacher (or the processes of
    one torchrun) build it once: the others wait on the lock, saying so, then read it."""
    import fcntl  # POSIX only, like the lock
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    lock = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"process {os.getpid()} waits for another process to finish the teacher cache "
                  f"{path}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        cache = open_teacher_cache(path, identity, ram_share)
        if cache is None:
            if os.path.exists(path):
                log(f"note: {path} was built from another checkpoint, data set or precision; "
                    "rebuilding it")
            build_teacher_cache(path, teacher, data.train_x, data.mean, data.std, autocast,
                                memory_format, identity, batch_size)
            cache = open_teacher_cache(path, identity, ram_share)
        return cache
    finally:
        os.close(lock)  # and with it the lock

def plan_with_rows(seed, epoch, n_train, n_used, cache):
    """projkd.plan_epoch's draws, with the cached teacher rows of the views the images drew."""
    plan = plan_epoch(seed, epoch, n_train, n_used)
    return plan._replace(teacher_rows=cache.rows(plan.order.numpy(),
                                                 view_index(plan.dy, plan.dx, plan.flip).numpy()))

class EpochPlanner:
    """plan(epoch) returns that epoch's plan and starts the next one's in a background thread, which
    reads the teacher cache while the GPU trains. The thread touches no CUDA, so graph capture and
    replay are undisturbed. upload(rows, dest) copies an epoch's rows to the device from pinned
    memory, without blocking the host."""
    def __init__(self, seed, n_train, n_used, cache, epochs):
        self.seed, self.n_train, self.n_used = seed, n_train, n_used
        self.cache, self.epochs = cache, epochs
        self.pool, self.pending, self.pinned = ThreadPoolExecutor(max_workers=1), {}, None

    def _submit(self, epoch):
        return self.pool.submit(plan_with_rows, self.seed, epoch, self.n_train, self.n_used,
                                self.cache)

    def plan(self, epoch):
        future = self.pending.pop(epoch, None) or self._submit(epoch)
        if epoch + 1 < self.epochs:
            self.pending[epoch + 1] = self._submit(epoch + 1)
        return future.result()

    def upload(self, rows, dest):
        if dest.device.type != "cuda":
            return dest.copy_(torch.from_numpy(rows).view(torch.bfloat16))
        # once: pinning is slow. Reused safely: the last epoch's copy ended with its sync
        if self.pinned is None:
            self.pinned = torch.empty(rows.shape, dtype=torch.int16).pin_memory()
        self.pinned.numpy()[:] = rows
        dest.copy_(self.pinned.view(torch.bfloat16), non_blocking=True)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

def open_for_run(run):
    """The open teacher cache of a training run, built first if needed. Under torchrun every process
    takes the cache's file lock, so one builds it while the others wait on the lock, not in a
    collective whose timeout (NCCL's: 10 minutes) a long build would exceed; on nodes without a
    shared file system each node builds its own."""
    cfg, data = run.cfg, run.data
    # Each process that reads the file whole holds a copy of its own: the processes of this machine
    # share --teacher-cache-ram out among them (8 copies of vgg13's 9.9 GB would not fit where one
    # does).
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    ram_share = cfg.teacher_cache_ram / local_processes
    cache = ensure_teacher_cache(cfg.teacher_cache_file, cache_identity(cfg, data), run.teacher,
                                 data, run.autocast, run.memory_format, cfg.eval_batch_size,
                                 ram_share)
    whole = "; read whole into memory" if cache.read_whole else ""
    log(f"teacher cache: {cfg.teacher_cache_file} (built in "
        f"{cache.header['build_seconds']:.0f} s on {cache.header['device']}{whole})")
    return cache

# `projkd.py cache` takes every training option, so that one set of flags (make's EXTRA) serves a
# run and its teacher's cache; --help lists those that change the cache.
CacheConfig = options_of("CacheConfig", None, ("teacher", "teacher_ckpt", "teacher_cache_file",
                                               "dataset", "data_dir",
                                               "download", "synthetic_size", "synthetic_classes",
                                               "amp", "device", "eval_batch_size"))
CacheConfig.parse_as = Config

def cache_command(cfg):
    """`projkd.py cache`: the teacher cache of --teacher-ckpt for --dataset, built unless an
    identical one exists; its time stamp is renewed either way, so that make sees it as newer than
    the checkpoint."""
    cfg, notes = resolve_config(cfg, command="cache")
    for note in notes:
        log("note: " + note)
    device = torch.device(cfg.device)
    setup_torch(device, cfg.deterministic)
    data = load_data(cfg, device)
    memory_format, amp_dtype, autocast = memory_format_and_autocast(cfg.amp, device)
    # at the size the cache's images have (a timm teacher built for one size, as a ViT, needs it)
    teacher = models_module().load_teacher(cfg.teacher, cfg.teacher_ckpt, data.num_classes,
                                           image_size=input_size(cfg))
    teacher = teacher.to(device)
    teacher = teacher_for_speed(teacher, amp_dtype, memory_format)
    cache = ensure_teacher_cache(cfg.teacher_cache_file, cache_identity(cfg, data), teacher, data,
                                 autocast, memory_format, cfg.eval_batch_size)
    os.utime(cache.path)
    log(f"{cache.path}: the teacher cache of {cfg.teacher_ckpt}, up to date")
