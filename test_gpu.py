"""projkd's GPU paths on a real GPU: python3 -m pytest -v -m gpu test_gpu.py (make gpu-check runs
it).

Every test is marked `gpu` and skips itself, saying why, where CUDA is absent or there are fewer
GPUs than it needs, so CPU runs and CI pass (the CPU tests are test_projkd.py: make test). Each
drives the code a run uses (projkd.setup_run, train_step through run.step, CUDAGraphStep, the CLI,
teacher_cache's functions, torchrun), on small generated data with the smallest architectures: the
whole file aims at well under 3 minutes on one H100. Tolerances are stated where each is used, with
why; each test also checks that what it compares can differ.
"""
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import gpu_check
import models
import projkd
import teacher_cache

HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER, STUDENT, CLASSES = "resnet20", "resnet8", 10  # the smallest pair: seconds per run on a GPU
BATCH = 64  # the paper's CIFAR batch
# named: the tests run on a known GPU (test_device_cuda_and_auto... checks auto)
CUDA0, CUDA1 = "cuda:0", "cuda:1"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs CUDA, and torch {torch.__version__} sees no GPU; the CPU tests are "
           "test_projkd.py (make test)")]


def needs_gpus(n):
    have = torch.cuda.device_count()
    return pytest.mark.skipif(have < n, reason=f"needs {n} GPUs, this machine has {have}")


@pytest.fixture(scope="module", autouse=True)
def cublas_deterministic_config():
    """Set before any CUDA work, as --deterministic sets it: cuBLAS's workspace is sized once, when
    first used, so a deterministic test after a non-deterministic one still gets cuBLAS's
    deterministic configuration."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def first_gpu_current(cublas_deterministic_config):
    """A run on cuda:1 leaves it the current device; every test starts on cuda:0."""
    torch.cuda.set_device(0)
    yield
    torch.cuda.synchronize()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu")


@pytest.fixture(scope="module")
def teacher_ckpt(folder):
    """A randomly initialised teacher: the paths must reproduce whatever the teacher computes,
    trained or not, and random weights make each crop and flip give a different output (a trained
    one is closer to invariant)."""
    torch.manual_seed(0)
    path = folder / f"{TEACHER}.pt"
    torch.save(models.MODELS[TEACHER](num_classes=CLASSES).state_dict(), path)
    return str(path)


def config(folder, teacher_ckpt, name, **changes):
    """A pefd run of the small pair on generated data on cuda:0; one teacher cache file per data
    size and amp."""
    cfg = dict(teacher=TEACHER, student=STUDENT, method="pefd", teacher_ckpt=teacher_ckpt,
               dataset="synthetic",
               synthetic_size=20 * BATCH, synthetic_classes=CLASSES, batch_size=BATCH, epochs=1,
               device=CUDA0, progress_seconds=0, run_dir=str(folder / name))
    cfg.update(changes)
    cfg.setdefault("teacher_cache_file",
                   str(folder / f"t{cfg['synthetic_size']}-{cfg.get('amp', 'bf16')}.tcache"))
    return projkd.Config(**cfg)


def cli(cfg):
    """The command line of a Config: the tests that train whole runs go through projkd.main, as a
    user does."""
    args = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value == f.default:
            continue
        if f.type is bool:  # every flag's default is off
            args.append(flag)
        else:
            args += [flag, str(value)]
    return args


def floats(state):
    return {k: v.detach().double().cpu() for k, v in state.items() if v.is_floating_point()}


def update_gap(start, a, b):
    """How far apart two runs' updates of the same start are: |(a - start) - (b - start)| / |b -
    start| over all floating tensors. Relative to the update, not to the weights: a step that is
    skipped, repeated or wrong is a gap near 1 however small the learning rate."""
    da = torch.cat([(a[k] - start[k]).flatten() for k in start])
    db = torch.cat([(b[k] - start[k]).flatten() for k in start])
    return ((da - db).norm() / db.norm().clamp_min(1e-30)).item()


def loss_gap(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@contextlib.contextmanager
def determinism_alerts():
    """The ops torch warned about as having no deterministic CUDA implementation (--deterministic
    runs with warn_only=True): with none, bitwise equality is owed; with some, the test says which
    and uses a tolerance."""
    alerts = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield alerts
    alerts += sorted({str(w.message).splitlines()[0][:160] for w in caught if "deterministic"
                      in str(w.message)})


def assert_bitwise_or_explained(alerts, record_property, report, gaps, tolerance):
    """Bitwise when no op alerted; else within `tolerance` (fp32 reductions in another order),
    saying why.
    `report` is gpu_check.difference_report's (empty: bitwise equal): where the runs part and by how
    much per tensor, in the failure's message and, its first line, in the test's record (the
    gpu-check report), so that one GPU session tells noise from a defect."""
    if report:
        record_property("differences", report.splitlines()[0])
    if not alerts:
        summary, _, per_tensor = report.partition("\n")
        assert not report, (f"not bitwise equal ({summary}), and no op reported itself "
                            "nondeterministic "
                            f"(torch may warn once per process); gaps {gaps}\n{per_tensor}")
        return
    record_property("not bitwise because", "; ".join(alerts))
    assert max(gaps.values()) <= tolerance, (gaps, alerts, report)


# --- the CUDA graph against the eager step --------------------------------------------------------

def steps_of(cfg, n):
    """n steps of a fresh run of cfg on epoch 0's batches, as train_epoch takes them: the loss of
    each step, the device counter and the first conv's weight after each, the start and final
    weights, and the step itself."""
    run = projkd.setup_run(cfg)
    try:
        run.lr.fill_(projkd.lr_at(run.cfg, 0))
        run.feed.prepare_epoch(0)
        start = floats(run.student.state_dict())
        probe = next(run.student.parameters())
        losses, counters, probes = [], [], []
        for _ in range(n):
            run.sums.zero_()
            run.step()
            losses.append(run.sums.loss.item())
            counters.append(run.feed.next_step.item())
            probes.append(probe.detach().clone())
        return {"losses": losses, "counters": counters, "probes": probes, "start": start,
                "end": floats(run.student.state_dict()), "step": run.step}
    finally:
        run.feed.close()


def assert_the_graph_replayed(graphed, n):
    step = graphed["step"]
    assert isinstance(step, projkd.CUDAGraphStep), "the run did not get the graph step"
    assert step.failure is None and step.graph is not None, f"the capture failed: {step.failure}"
    assert graphed["counters"] == list(range(1, n + 1)), \
        "the device step counter did not advance once per step"
    # warm-up is 3 eager steps, step 4 is captured and replayed, every later one a replay: each
    # changed the weights
    for i in range(3, n - 1):
        assert not torch.equal(graphed["probes"][i],
                               graphed["probes"][i + 1]), f"replay {i + 2} changed nothing"


@pytest.mark.parametrize("cache", ["off", "on"])
def test_graph_step_is_bitwise_the_eager_step_in_fp32_deterministic(folder, teacher_ckpt,
                                                                    record_property, cache):
    """20 steps of the same batches; the live teacher runs inside the graph (cache off) or its rows
    are read."""
    n = 20
    with determinism_alerts() as alerts:
        runs = {graph: steps_of(config(folder, teacher_ckpt, f"fp32-{graph}-{cache}", amp="off",
                                       graph=graph,
                                       deterministic=True, teacher_cache=cache), n) for graph
                in ("off", "on")}
    eager, graphed = runs["off"], runs["on"]
    assert_the_graph_replayed(graphed, n)
    report = gpu_check.difference_report(eager["end"], graphed["end"], eager["losses"],
                                         graphed["losses"])
    gaps = {"loss": loss_gap(graphed["losses"], eager["losses"]),
            "update": update_gap(eager["start"], graphed["end"], eager["end"])}
    assert_bitwise_or_explained(alerts, record_property, report, gaps, tolerance=1e-3)


def test_graph_step_matches_the_eager_step_in_bf16(folder, teacher_ckpt):
    """bf16 autocast, cuDNN autotuned (not deterministic), the teacher cache on: as a default run on
    a GPU. Tolerance: bf16 keeps 8 significant bits and the two runs may pick other kernels, which
    round differently: losses within 1% per step, the 20 steps' update within 10% (a skipped or
    repeated replay is about 100%)."""
    n = 20
    runs = {graph: steps_of(config(folder, teacher_ckpt, f"bf16-{graph}", graph=graph), n)
            for graph in ("off", "on")}
    eager, graphed = runs["off"], runs["on"]
    assert_the_graph_replayed(graphed, n)
    assert all(math.isfinite(x) for x in eager["losses"] + graphed["losses"])
    assert loss_gap(graphed["losses"], eager["losses"]) <= 1e-2
    assert update_gap(eager["start"], graphed["end"], eager["end"]) <= 0.1


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_device_cuda_and_auto_train_on_the_gpu(folder, device, capsys):
    """What users pass: --device cuda (and auto, its default on a GPU) must reach the GPU and its
    graph."""
    cfg = config(folder, "", f"device-{device}", device=device, method="ce", teacher="")
    assert projkd.main(cli(cfg)) == 0, capsys.readouterr().err
    metrics = json.loads(open(os.path.join(cfg.run_dir, "metrics.json")).read())
    assert metrics["config"]["device"].startswith("cuda") and metrics["config"]["graph"] == "on"
    assert "training goes on eagerly" not in capsys.readouterr().out


# --- the teacher cache against the live teacher ---------------------------------------------------

@pytest.fixture(scope="module")
def cuda_cache(folder, teacher_ckpt):
    """The teacher's cache of 512 generated images, built on cuda:0 through the CLI as make builds
    one."""
    path = folder / "cli.tcache"
    args = ["cache", "--teacher", TEACHER, "--teacher-ckpt", teacher_ckpt, "--teacher-cache-file",
            str(path), "--dataset", "synthetic", "--synthetic-size", "512", "--synthetic-classes",
            str(CLASSES), "--device", CUDA0]
    assert projkd.main(args) == 0
    header = teacher_cache.read_cache_header(str(path))
    assert header["images"] == 512 and header["precision"] == "bf16"
    # built on the GPU, not the CPU
    assert header["device"] == projkd.device_name(torch.device(CUDA0))
    return teacher_cache.TeacherCache(str(path), header)


def fast_teacher(teacher_ckpt, device, amp="bf16"):
    """The teacher as a training run holds it on CUDA (setup_run, setup_teacher): channels_last,
    weights in the autocast dtype. Returns (teacher, its taps, the autocast context, the memory
    format)."""
    memory_format, amp_dtype, autocast = projkd.memory_format_and_autocast(amp, device)
    teacher = models.load_teacher(TEACHER, teacher_ckpt, CLASSES)
    teacher = teacher.to(device, memory_format=memory_format)
    return projkd.teacher_for_speed(teacher, amp_dtype, memory_format), autocast, memory_format


def synthetic_data(size, device):
    return projkd.load_data(projkd.Config(dataset="synthetic", synthetic_size=size,
                                          synthetic_classes=CLASSES), device)


@torch.no_grad()
def live_rows(teacher, autocast, memory_format, data, images, dy, dx, flip):
    """The live teacher's feature and logits of these views, exactly as train_step feeds it
    (normalize, layout)."""
    x = projkd.normalize(projkd.crop_flip(data.train_x[images], dy, dx, flip), data.mean, data.std)
    taps = projkd.Taps(teacher)
    try:
        with autocast:
            logits = teacher(x.contiguous(memory_format=memory_format))
    finally:
        taps.remove()
    return torch.cat([taps.feature, logits], dim=1).float()


def test_cached_rows_are_the_live_teachers_on_cuda_for_every_view(cuda_cache, teacher_ckpt):
    """16 images x all 162 views: each cached row is within bf16 rounding of the live teacher's row
    of its own view (1%: both are bf16 results, from kernels of other batch shapes), and nearer to
    it than to any other view's (neighbouring crops are 2-7% apart for this random teacher): a wrong
    view number or image cannot pass."""
    device = torch.device(CUDA0)
    projkd.setup_torch(device)
    data = synthetic_data(512, device)
    teacher, autocast, memory_format = fast_teacher(teacher_ckpt, device)
    images = torch.randperm(512, generator=torch.Generator().manual_seed(7))[:16]
    views = torch.arange(teacher_cache.CACHE_VIEWS)
    live = torch.stack([live_rows(teacher, autocast, memory_format, data, images.to(device),
                                  *teacher_cache.view_draws(v, 16, device))
                        for v in views.tolist()])  # view, image, feature and logits
    cached = torch.from_numpy(cuda_cache.rows(images.repeat(len(views)).numpy(),
                                              views.repeat_interleave(16).numpy())).view(torch.bfloat16)
    cached = cached.float().view(len(views), 16, -1).to(device)
    # cached view, live view, image
    distance = (cached[:, None] - live[None]).norm(dim=-1) / live[None].norm(dim=-1)
    own = distance.diagonal(dim1=0, dim2=1)  # image, view
    assert own.max().item() <= 1e-2, \
        f"cached rows off the live teacher's by up to {own.max().item():.3g}"
    nearest = distance.argmin(dim=1)  # per cached view and image: the live view it is nearest to
    assert torch.equal(nearest,
                       views.to(device)[:,
                                        None].expand_as(nearest)), "a cached row is another view's"


class RowRecorder:
    """Stands in for the cache file in teacher_cache._write_rows (the builder's own writer): keeps
    each array."""
    def __init__(self):
        self.arrays = []

    def write(self, array):
        self.arrays.append(np.array(array))


def test_reading_the_cache_file_gives_the_rows_its_build_wrote(folder, teacher_ckpt):
    """Built on CUDA by build_teacher_cache, read by TeacherCache.rows in shuffled order and whole:
    the same bits as the builder's writer produces for the same teacher, images and settings
    (deterministic kernels, same shapes)."""
    device = torch.device(CUDA0)
    projkd.setup_torch(device, deterministic=True)
    data = synthetic_data(256, device)
    teacher, autocast, memory_format = fast_teacher(teacher_ckpt, device)
    cfg = projkd.Config(teacher=TEACHER, teacher_ckpt=teacher_ckpt, amp="bf16")
    identity, path = teacher_cache.cache_identity(cfg, data), str(folder / "read-back.tcache")
    teacher_cache.build_teacher_cache(path, teacher, data.train_x, data.mean, data.std, autocast,
                                      memory_format, identity, batch_size=128)
    recorder, taps = RowRecorder(), projkd.Taps(teacher)
    try:
        with torch.inference_mode():  # as build_teacher_cache runs it
            feature_dim = projkd.classifier_of(teacher).in_features
            teacher_cache._write_rows(recorder, teacher, taps, data.train_x, data.mean, data.std,
                                      autocast, memory_format, 128, feature_dim)
    finally:
        taps.remove()
    written = np.concatenate(recorder.arrays)  # view after view, as the file lays them out
    assert written.shape == (teacher_cache.CACHE_VIEWS * 256, feature_dim + CLASSES)
    for share in (0.0, 1.0):  # from the file, then read whole into memory
        cache = teacher_cache.open_teacher_cache(path, identity, share)
        order = np.random.default_rng(int(share)).permutation(len(written))
        views, images = np.divmod(order, 256)
        assert np.array_equal(cache.rows(images, views), written[order])
    # distinct rows: a mix-up of rows would show
    assert len(np.unique(written[:256], axis=0)) == 256


def history_of(run_dir):
    return json.loads(open(os.path.join(run_dir, "metrics.json")).read())


def test_cached_and_live_runs_give_the_same_losses_on_cuda(folder, teacher_ckpt):
    """Two epochs each, --deterministic, the graph on in both. The teacher's outputs are bf16 either
    way (the cache's rows, or the live bf16 teacher); what differs is the kernels' batch shapes:
    losses within 1%."""
    metrics = {}
    for cache in ("on", "off"):
        cfg = config(folder, teacher_ckpt, f"cached-{cache}", epochs=2, deterministic=True,
                     teacher_cache=cache)
        assert projkd.main(cli(cfg)) == 0
        metrics[cache] = history_of(cfg.run_dir)
    assert metrics["on"]["config"]["teacher_cache"] == "on"
    assert metrics["off"]["config"]["teacher_cache"] == "off"
    for a, b in zip(metrics["on"]["history"], metrics["off"]["history"], strict=True):
        assert math.isfinite(a["train_loss"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-2)
        assert a["train_mda"] == pytest.approx(b["train_mda"], rel=1e-2)


# --- the resident feed against the CPU reference --------------------------------------------------

def reference_batch(train_x, plan, step, rank, local_batch):
    """This process's part of a global batch the plain way, on the CPU: each image zero-padded by 4,
    cropped at its corner, mirrored if drawn, as torchvision's RandomCrop(32, padding=4) +
    RandomHorizontalFlip do."""
    rows = range(step * BATCH + rank * local_batch, step * BATCH + (rank + 1) * local_batch)
    crops = []
    for i in rows:
        padded = torch.nn.functional.pad(train_x[plan.order[i]], (projkd.CROP_PADDING,) * 4)
        crop = padded[:, plan.dy[i]:plan.dy[i] + 32, plan.dx[i]:plan.dx[i] + 32]
        crops.append(crop.flip(-1) if plan.flip[i] else crop)
    return torch.stack(crops), plan.order[list(rows)]


def test_resident_feed_batches_equal_the_cpu_reference(cuda_cache):
    """Epochs 0 and 1, both halves of a 2-process global batch: images (crop, flip, order), labels,
    and the cached teacher rows, uploaded from pinned memory without blocking, all bitwise; the
    images in channels_last."""
    device, n, seed = torch.device(CUDA0), 512, 3
    cpu_data, gpu_data = synthetic_data(n, torch.device("cpu")), synthetic_data(n, device)
    assert torch.equal(cpu_data.train_x, gpu_data.train_x.cpu())
    for rank in (0, 1):
        feed = projkd.ResidentFeed(gpu_data, BATCH, BATCH // 2, rank, seed, epochs=2,
                                   cache=cuda_cache)
        try:
            for epoch in (0, 1):
                feed.prepare_epoch(epoch)
                plan = projkd.plan_epoch(seed, epoch, n, feed.steps_per_epoch * BATCH)
                views = teacher_cache.view_index(plan.dy, plan.dx, plan.flip).numpy()
                for step in range(feed.steps_per_epoch):
                    images, labels, teacher = feed.next_batch()
                    expected, order = reference_batch(cpu_data.train_x, plan, step, rank,
                                                      BATCH // 2)
                    assert images.is_contiguous(memory_format=torch.channels_last)
                    where = f"rank {rank} epoch {epoch} step {step}"
                    assert torch.equal(images.cpu(), expected), f"{where}: images"
                    assert torch.equal(labels.cpu(), cpu_data.train_y[order]), f"{where}: labels"
                    first = step * BATCH + rank * BATCH // 2
                    rows = cuda_cache.rows(order.numpy(), views[first:][:BATCH // 2])
                    cached = teacher.view(torch.int16).cpu().numpy()
                    assert np.array_equal(cached, rows), f"{where}: rows"
                assert feed.next_step.item() == feed.steps_per_epoch
        finally:
            feed.close()
    # epochs differ
    assert not torch.equal(*(projkd.plan_epoch(seed, e, n, n).order for e in (0, 1)))


# --- AMP: bf16 and fp16 ---------------------------------------------------------------------------

def amp_config(folder, teacher_ckpt, amp, **changes):
    return config(folder, teacher_ckpt, f"amp-{amp}", **{"amp": amp, "epochs": 4,
                                                         "synthetic_size": 2048,
                                                          "checkpoint_seconds": 0, **changes})


def amp_run(folder, teacher_ckpt, amp):
    cfg = amp_config(folder, teacher_ckpt, amp)
    assert projkd.main(cli(cfg)) == 0, f"the 4-epoch {amp} run failed"
    return cfg


# One fixture per precision: a failing fp16 run errs its own test alone, not bf16's or the
# evaluation's.
@pytest.fixture(scope="module")
def bf16_run(folder, teacher_ckpt):
    """A 4-epoch run in bf16 (the CUDA graph on), through the CLI."""
    return amp_run(folder, teacher_ckpt, "bf16")


@pytest.fixture(scope="module")
def fp16_run(folder, teacher_ckpt):
    """A 4-epoch run in fp16 (its gradient scaler: eager), through the CLI."""
    return amp_run(folder, teacher_ckpt, "fp16")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_bf16_and_fp16_train_with_finite_falling_losses(request, amp):
    metrics = history_of(request.getfixturevalue(f"{amp}_run").run_dir)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert metrics["config"]["amp"] == amp and len(losses) == 4
    # fp16's scaler runs eagerly
    assert metrics["config"]["graph"] == ("on" if amp == "bf16" else "off")
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    assert metrics["last_top1"] > 2 * 100 / CLASSES  # it learned: well above chance


def test_fp16_scaler_state_survives_a_resume(folder, teacher_ckpt, tmp_path):
    run_dir = str(tmp_path / "fp16")
    assert projkd.main(cli(amp_config(folder, teacher_ckpt, "fp16", run_dir=run_dir,
                                      epochs=2))) == 0
    saved = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["scaler"]
    fresh = torch.amp.GradScaler("cuda").state_dict()
    assert saved and saved != fresh, \
        "after 2 epochs the scaler should have moved from its initial state"
    cfg = amp_config(folder, teacher_ckpt, "fp16", run_dir=run_dir, epochs=3, resume=True)
    run = projkd.setup_run(cfg)
    try:
        assert run.scaler.is_enabled() and run.scaler.state_dict() == saved
    finally:
        run.feed.close()
    assert projkd.main(cli(cfg)) == 0
    metrics = history_of(run_dir)
    assert len(metrics["history"]) == 3 and math.isfinite(metrics["history"][-1]["train_loss"])


def test_a_bf16_run_resumes_with_fp16(folder, teacher_ckpt, tmp_path, capsys):
    """bf16's disabled scaler saved {}; the fp16 run that continues it starts a fresh, enabled
    one."""
    run_dir = str(tmp_path / "bf16-then-fp16")
    assert projkd.main(cli(amp_config(folder, teacher_ckpt, "bf16", run_dir=run_dir,
                                      epochs=2))) == 0
    assert torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["scaler"] == {}
    capsys.readouterr()
    cfg = amp_config(folder, teacher_ckpt, "fp16", run_dir=run_dir, epochs=3, resume=True)
    assert projkd.main(cli(cfg)) == 0
    assert f"resuming {run_dir} after epoch 2" in capsys.readouterr().out
    metrics = history_of(run_dir)
    assert metrics["config"]["amp"] == "fp16" and len(metrics["history"]) == 3
    assert math.isfinite(metrics["history"][-1]["train_loss"])
    # the scaler ran
    assert "scale" in torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["scaler"]


# --- resume across devices ------------------------------------------------------------------------

def test_a_cpu_run_resumes_on_cuda_with_fused_sgd_and_the_graph(folder, teacher_ckpt, tmp_path):
    run_dir = str(tmp_path / "cpu-then-cuda")
    on_cpu = config(folder, teacher_ckpt, "", device="cpu", synthetic_size=4 * BATCH,
                    run_dir=run_dir)
    assert projkd.main(cli(on_cpu)) == 0
    saved = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    assert saved["config"]["device"] == "cpu" and not saved["optimizer"]["param_groups"][0]["fused"]
    run = projkd.setup_run(dataclasses.replace(on_cpu, device=CUDA0, resume=True, epochs=2))
    try:
        assert run.start_epoch == 1
        assert all(g["fused"] is True and g["lr"] is run.lr for g in run.optimizer.param_groups)
        for p in run.student.parameters():
            buffer = run.optimizer.state[p]["momentum_buffer"]
            assert buffer.device == p.device == torch.device(CUDA0)
            assert buffer.stride() == p.stride()
        assert isinstance(run.step, projkd.CUDAGraphStep)
        stats = projkd.train_epoch(run, run.start_epoch)
        assert run.step.graph is not None and run.step.failure is None, run.step.failure
        assert run.feed.next_step.item() == run.feed.steps_per_epoch
        assert math.isfinite(stats["loss"])
    finally:
        run.feed.close()


def test_a_cuda_run_resumes_bit_identically_under_deterministic(folder, teacher_ckpt, tmp_path,
                                                                record_property):
    """fp32, --deterministic, the graph and the cache on: 2 epochs straight against 1 epoch, then
    --resume to 2. The resumed run warms up and captures again mid-run, so this also needs eager ==
    graph bitwise."""
    common = dict(amp="off", deterministic=True, synthetic_size=10 * BATCH)
    straight = config(folder, teacher_ckpt, "", run_dir=str(tmp_path / "straight"), epochs=2,
                      **common)
    resumed = dataclasses.replace(straight, run_dir=str(tmp_path / "resumed"))
    with determinism_alerts() as alerts:
        assert projkd.main(cli(straight)) == 0
        assert projkd.main(cli(dataclasses.replace(resumed, epochs=1))) == 0
        assert projkd.main(cli(dataclasses.replace(resumed, resume=True))) == 0
    a, b = (torch.load(os.path.join(c.run_dir, "model.pt"), weights_only=True) for c
            in (straight, resumed))
    la, lb = ([h["train_loss"] for h in history_of(c.run_dir)["history"]] for c
              in (straight, resumed))
    # relative to the weights: no start was kept
    zero = {k: torch.zeros_like(v) for k, v in floats(a).items()}
    report = gpu_check.difference_report(a, b, la, lb, unit="epoch")  # log.csv has losses per epoch
    gaps = {"loss": loss_gap(lb, la), "weights": update_gap(zero, floats(b), floats(a))}
    assert_bitwise_or_explained(alerts, record_property, report, gaps, tolerance=1e-4)


# --- evaluation -----------------------------------------------------------------------------------

def test_evaluate_on_cuda_in_channels_last_and_bf16_matches_cpu_fp32(bf16_run):
    """The bf16 run's model on 10,000 generated test images: top-1 within 0.1 points (10 images) of
    CPU float32."""
    cpu = torch.device("cpu")
    data = projkd.load_data(projkd.Config(dataset="synthetic", synthetic_size=40000,
                                          synthetic_classes=CLASSES), cpu)
    data = dataclasses.replace(data, train_x=None, train_y=None)
    state = torch.load(os.path.join(bf16_run.run_dir, "model.pt"), weights_only=True)
    model = models.MODELS[STUDENT](num_classes=CLASSES)
    model.load_state_dict(state)
    reference = projkd.evaluate(model, data, 1000, torch.contiguous_format)
    device = torch.device(CUDA0)
    memory_format, _, autocast = projkd.memory_format_and_autocast("bf16", device)
    on_gpu = dataclasses.replace(data, mean=data.mean.to(device), std=data.std.to(device),
                                 test_x=data.test_x.to(device), test_y=data.test_y.to(device))
    model = model.to(device, memory_format=memory_format)
    with autocast:
        result = projkd.evaluate(model, on_gpu, 1000, memory_format)
        with torch.no_grad():  # what ran: bf16 kernels on channels_last weights
            x = on_gpu.test_x[:2].float().contiguous(memory_format=memory_format)
            assert model.eval()(x).dtype == torch.bfloat16
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert result["images"] == reference["images"] == 10000
    assert reference["top1"] > 2 * 100 / CLASSES  # a trained model: its top-1 means something
    assert abs(result["top1"] - reference["top1"]) <= 0.1, (result, reference)


# --- two GPUs: --device cuda:1, and torchrun with NCCL --------------------------------------------

@needs_gpus(2)
def test_device_cuda1_trains_there_and_its_graph_records(folder, teacher_ckpt):
    """Everything on cuda:1, nothing new on cuda:0; the graph captured there replays (an empty
    capture, the step's kernels sent to another device, would have been caught by CUDAGraphStep and
    left a failure)."""
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)
    run = projkd.setup_run(config(folder, teacher_ckpt, "cuda1", device=CUDA1,
                                  teacher_cache_file=str(folder / "cuda1.tcache")))
    try:
        start = floats(run.student.state_dict())
        stats = projkd.train_epoch(run, 0)
        assert all(p.device == torch.device(CUDA1) for p in run.student.parameters())
        assert run.feed.images.device == run.lr.device == torch.device(CUDA1)
        assert isinstance(run.step, projkd.CUDAGraphStep)
        assert run.step.graph is not None and run.step.failure is None, run.step.failure
        assert run.feed.next_step.item() == run.feed.steps_per_epoch
        assert math.isfinite(stats["loss"])
        end = floats(run.student.state_dict())
        assert all(not torch.equal(start[k], end[k]) for k in start if "conv" in k)  # it trained
        assert torch.cuda.memory_allocated(0) == before, "the cuda:1 run allocated on cuda:0"
    finally:
        run.feed.close()


def torchrun(*args, nproc=2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", os.path.join(HERE, "projkd.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@needs_gpus(2)
def test_torchrun_nccl_on_two_gpus_equals_one_process_with_the_same_global_batch(
        folder, teacher_ckpt, tmp_path):
    """2 processes x 32 (--sync-bn: BatchNorm over the global 64, as one process has it) against 1
    process x 64; fp32. Tolerance: TF32 convolutions at batch 32 and 64 round differently and NCCL
    sums in its own order: losses within 0.5%, the 2 epochs' update within 5% (a process reading the
    other's half, or its own twice, is ~100%)."""
    common = dict(amp="off", epochs=2, synthetic_size=16 * BATCH,
                  teacher_cache_file=str(folder / "ddp.tcache"))
    two = config(folder, teacher_ckpt, "", run_dir=str(tmp_path / "two"), device="cuda",
                 sync_bn=True, **common)
    one = config(folder, teacher_ckpt, "", run_dir=str(tmp_path / "one"), device=CUDA0, **common)
    result = torchrun(*cli(two))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "processes: 2 x batch 32 = global batch 64" in result.stdout
    assert "the weights are the same in all 2 processes" in result.stdout
    assert projkd.main(cli(one)) == 0
    m2, m1 = history_of(two.run_dir), history_of(one.run_dir)
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert loss_gap([h["train_loss"] for h in m2["history"]],
                    [h["train_loss"] for h in m1["history"]]) <= 5e-3
    torch.manual_seed(1)  # the student's initial weights, as setup_run draws them for --seed 1
    start = floats(models.MODELS[STUDENT](num_classes=CLASSES).state_dict())
    w2, w1 = (floats(torch.load(os.path.join(c.run_dir, "model.pt"), weights_only=True)) for c
              in (two, one))
    assert update_gap({k: start[k] for k in w1}, w2, w1) <= 5e-2
    # the accuracy under torchrun is the whole test set's: one process evaluating model.pt gets it
    # again
    out = tmp_path / "eval.json"
    assert projkd.main(["eval", "--arch", STUDENT, "--ckpt", os.path.join(two.run_dir, "model.pt"),
                        "--dataset",
                        "synthetic", "--synthetic-size", str(16 * BATCH), "--synthetic-classes",
                        str(CLASSES), "--device", CUDA0, "--out", str(out)]) == 0
    single = json.loads(out.read_text())
    assert single["images"] == 16 * BATCH // 4 and single["world_size"] == 1
    one_image = 100 / single["images"]  # batches of other sizes can flip a near tie
    assert abs(single["top1"] - m2["last_top1"]) <= one_image + 1e-6


# --- torch.compile --------------------------------------------------------------------------------

def test_compile_runs_and_matches_eager(folder, teacher_ckpt):
    """8 steps (3 warm-up, the capture, 4 replays) compiled and eager, fp32, the teacher's rows from
    its cache (so only the student, projectors and loss compile: the smallest compile there is).
    Tolerance: inductor fuses and reorders float32 arithmetic, convolutions run in TF32 (10 bits):
    losses within 0.5%, the update within 5%."""
    n = 8
    runs = {c: steps_of(config(folder, teacher_ckpt, f"compile-{c}", amp="off", teacher_cache="on",
                               compile=c, synthetic_size=n * BATCH), n) for c in (False, True)}
    eager, compiled = runs[False], runs[True]
    assert all(math.isfinite(x) for x in compiled["losses"])
    assert loss_gap(compiled["losses"], eager["losses"]) <= 5e-3
    assert update_gap(eager["start"], compiled["end"], eager["end"]) <= 5e-2
    # last: a failed capture under compile still leaves the run eager
    assert_the_graph_replayed(compiled, n)
