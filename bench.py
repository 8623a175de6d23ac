"""`python projkd.py bench` (`make bench`): training throughput of the classic KD loop against ours,
side by side.

Not part of the reference (as nanoGPT keeps bench.py beside train.py): images/s of the classic KD
loop and of ours (eager and CUDA graph, live teacher and cached), same process, models and batch,
after warm-up; FLOPs per image and MFU; and a check that the graphed step equals the eager one.
Writes <out_dir>/bench.json and bench.md.
"""
import contextlib
import dataclasses
import importlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models import MODELS
from projkd import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    Config,
    ProjectorEnsemble,
    UserError,
    check_arch,
    classifier_of,
    code_version,
    device_name,
    features_and_logits,
    log,
    lr_at,
    make_synthetic,
    mda_loss,
    normalize,
    option,
    resolve_device,
    save,
    setup_run,
)

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for model-FLOPs utilisation;
# the first name contained in the GPU's name applies.
BF16_PEAK_FLOPS = {"GH200": 989e12, "H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12,
                   "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12}

@dataclass
class BenchConfig:
    pairs: str = option("vgg13:vgg8 resnet32x4:resnet8x4",
                        "teacher:student pairs, each timed with PEFD; on the CPU: "
                        "resnet20:resnet8")
    batch_size: int = option(64, "the paper's CIFAR-100 batch")
    steps: int = option(None, "timed steps of each variant of our loop: 400 on CUDA, 3 on the CPU")
    classic_steps: int = option(None, "timed steps of the classic loop: 150 on CUDA, 3 on the CPU")
    warmup: int = option(None, "untimed steps before each timing: 30 on CUDA, 1 on the CPU")
    workers: int = option(None, "DataLoader processes of the classic loop: min(8, CPUs), "
                                "RepDistiller's default being 8")
    check_steps: int = option(200, "the graph-against-eager check: steps compared (CUDA only)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    out_dir: str = option("results", "bench.json and bench.md go here")

class _PILImages(torch.utils.data.Dataset):
    """uint8 CHW images as PIL images through a torchvision transform: how KD codebases read
    CIFAR."""
    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]

def classic_loop_images_per_s(teacher_arch, student_arch, images, labels, bc, device):
    """PEFD trained as RepDistiller-style code does it: a DataLoader with worker processes doing
    per-sample PIL RandomCrop(32, padding=4) + flip + ToTensor + Normalize, float32 models, the
    default SGD, a blocking copy of each batch and .item() of the loss every step."""
    import torchvision.transforms as T
    # Set here, whatever ran before: RepDistiller's train_student.py turns cudnn.benchmark on and
    # leaves TF32 at torch's defaults (convolutions on, matmuls off).
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    loader = torch.utils.data.DataLoader(_PILImages(images, labels, transform),
                                         batch_size=bc.batch_size,
                                         shuffle=True, num_workers=bc.workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    teacher = MODELS[teacher_arch](num_classes=100).to(device).eval()
    student = MODELS[student_arch](num_classes=100).to(device).train()
    projectors = ProjectorEnsemble(classifier_of(student).in_features,
                                   classifier_of(teacher).in_features).to(device)
    optimizer = torch.optim.SGD([*student.parameters(), *projectors.parameters()], lr=0.05,
                                momentum=0.9, weight_decay=5e-4)
    loss_total, start = 0.0, None
    for i, (x, y) in enumerate(loader):
        if i == bc.warmup:
            synchronize(device)
            start = time.time()
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            teacher_feature, _ = features_and_logits(teacher, x)
        student_feature, logits = features_and_logits(student, x)
        loss = F.cross_entropy(logits, y) + 25 * mda_loss(projectors(student_feature),
                                                          teacher_feature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_total += loss.item()  # the per-step AverageMeter update: a host sync every step
        if i + 1 == bc.warmup + bc.classic_steps:
            break
    synchronize(device)
    return bc.classic_steps * bc.batch_size / (time.time() - start)

def check_classic_loop_packages():
    """The classic loop reads images as KD codebases do, through torchvision's transforms on PIL
    images: without either package, one line saying what to install, before anything is measured or
    written."""
    for module, package in (("PIL", "Pillow"), ("torchvision.transforms", "torchvision")):
        try:
            importlib.import_module(module)
        except ImportError:
            matching = ""
            if package == "torchvision":
                matching = f" (the build for torch {torch.__version__})"
            raise UserError(f"bench's classic loop needs {package}, which {sys.executable} cannot "
                            f"import: pip install {package}{matching}, as requirements.txt lists it"
                            ) from None

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

def bench_run(teacher_arch, student_arch, teacher_ckpt, bc, device, folder, graph, cached,
              deterministic=False):
    """A PEFD Run of our loop on generated data (one epoch of warm-up + timed steps), built by
    setup_run like a real one. cached: the epoch's teacher rows are computed once up front, the
    per-step work of --teacher-cache (a real cache file would need every view of every image)."""
    steps = bc.warmup + max(bc.steps, bc.check_steps if deterministic else 0)
    cfg = Config(teacher=teacher_arch, student=student_arch, teacher_ckpt=teacher_ckpt,
                 dataset="synthetic",
                 synthetic_size=steps * bc.batch_size, synthetic_classes=100,
                 batch_size=bc.batch_size, epochs=1,
                 device=str(device), graph="on" if graph else "off", teacher_cache="off",
                 progress_seconds=0,
                 deterministic=deterministic, run_dir=os.path.join(folder, f"run-{time.time_ns()}"))
    # the bench prints its own table, not 8 run set-ups
    with contextlib.redirect_stdout(io.StringIO()):
        run = setup_run(cfg)
    run.lr.fill_(lr_at(run.cfg, 0))
    run.feed.prepare_epoch(0)
    if cached:
        run.feed.teacher = live_teacher_rows(run)
    return run

@torch.no_grad()
def live_teacher_rows(run):
    """The teacher's feature and logits for every image of the loaded epoch, as the cache would
    supply them."""
    rows = []
    for i in range(0, len(run.feed.images), 1000):
        x = normalize(run.feed.images[i:i + 1000].permute(0, 3, 1, 2), run.data.mean, run.data.std)
        teacher = run.live_teacher(x.contiguous(memory_format=run.memory_format))
        rows.append(torch.cat([teacher.feature, teacher.logits], dim=1).to(torch.bfloat16))
    return torch.cat(rows)

def our_loop_images_per_s(run, bc):
    for _ in range(bc.warmup):
        run.step()
    synchronize(run.device)
    start = time.time()
    for _ in range(bc.steps):
        run.step()
    run.sums.loss.item()  # waits for the last step
    return bc.steps * bc.batch_size / (time.time() - start)

def training_flops_per_image(teacher_arch, student_arch, with_teacher, batch=2):
    """FLOPs of one PEFD training step per image (student forward and backward, projectors, and the
    teacher's forward unless cached), counted by torch.utils.flop_counter on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode
    teacher = MODELS[teacher_arch](num_classes=100).eval()
    student = MODELS[student_arch](num_classes=100)
    projectors = ProjectorEnsemble(classifier_of(student).in_features,
                                   classifier_of(teacher).in_features)
    x = torch.randn(batch, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher_feature = features_and_logits(teacher,
                                                  x)[0] if with_teacher else torch.randn(batch, 1)
        feature, logits = features_and_logits(student, x)
        loss = logits.logsumexp(1).mean() + projectors(feature).sum() + 0 * teacher_feature.sum()
        loss.backward()
    return counter.get_total_flops() / batch

def graph_check(teacher_arch, student_arch, teacher_ckpt, bc, device, folder):
    """From the same initial state and data, bc.check_steps steps eagerly and as a CUDA graph, both
    in deterministic mode: the per-step losses and the final weights must agree to bf16
    tolerance."""
    losses, weights = {}, {}
    for graph in (False, True):
        run = bench_run(teacher_arch, student_arch, teacher_ckpt, bc, device, folder, graph,
                        cached=False, deterministic=True)
        losses[graph] = []
        for _ in range(bc.check_steps):
            run.sums.zero_()
            run.step()
            losses[graph].append(run.sums.loss.item())
        state = run.student.state_dict()
        weights[graph] = {k: v.double().cpu() for k, v in state.items() if v.is_floating_point()}
        failure = getattr(run.step, "failure", None) if graph else None
        run.feed.close()
    eager, graphed = np.array(losses[False]), np.array(losses[True])
    loss_rel = float(np.max(np.abs(eager - graphed) / np.maximum(np.abs(eager), 1e-12)))
    weight_rel = max(float((weights[False][k] - weights[True][k]).abs().max()
                           / weights[False][k].abs().max().clamp_min(1e-12))
                     for k in weights[False])
    tolerance = 1e-2  # bf16 has 8 significant bits
    return {"pair": f"{teacher_arch}:{student_arch}", "steps": bc.check_steps,
            "deterministic": True,
            "max_loss_rel_diff": loss_rel, "max_weight_rel_diff": weight_rel,
            "tolerance": tolerance,
            "bitwise_equal_losses": bool(np.array_equal(eager, graphed)),
            "capture_failure": failure,
            "passed": failure is None and loss_rel <= tolerance and weight_rel <= tolerance}

def bench_pair(teacher_arch, student_arch, bc, device, folder):
    teacher_ckpt = os.path.join(folder, f"{teacher_arch}.pt")
    # random weights: speed is the same
    torch.save(MODELS[teacher_arch](num_classes=100).state_dict(), teacher_ckpt)
    n = (bc.warmup + bc.classic_steps) * bc.batch_size
    images, labels, _, _ = make_synthetic(n, 100)
    flops = {cached: training_flops_per_image(teacher_arch, student_arch, with_teacher=not cached)
             for cached in (False, True)}
    peak = bf16_peak_flops(device)
    rows = [{"loop": "classic (DataLoader + PIL, fp32, .item() per step)", "cached": False,
             "images_per_s": classic_loop_images_per_s(teacher_arch, student_arch, images, labels,
                                                       bc, device),
             "flags": backend_flags(device)}]
    for graph in (False, True):
        for cached in (False, True):
            loop = "CUDA graph" if graph else "eager"
            name = f"ours, {loop}, teacher {'cached' if cached else 'live'}"
            if graph and device.type != "cuda":
                rows.append({"loop": name, "cached": cached, "images_per_s": None,
                             "skipped": "needs CUDA"})
                continue
            run = bench_run(teacher_arch, student_arch, teacher_ckpt, bc, device, folder, graph,
                            cached)
            speed = our_loop_images_per_s(run, bc)
            failure = getattr(run.step, "failure", None)
            row = {"loop": name, "cached": cached, "images_per_s": speed,
                   "flags": backend_flags(device)}
            if failure:
                row.update(images_per_s=None, skipped=f"capture failed: {failure}")
            rows.append(row)
            run.feed.close()
    classic = rows[0]["images_per_s"]
    for row in rows:
        speed = row["images_per_s"]
        row["vs_classic"] = speed / classic if speed else None
        row["flops_per_image"] = flops[row["cached"]]
        row["mfu"] = speed * flops[row["cached"]] / peak if speed and peak else None
    return {"teacher": teacher_arch, "student": student_arch, "rows": rows}

def bf16_peak_flops(device):
    """The GPU's dense bf16 peak, or None (unknown): a MIG slice has only a share of its GPU's
    SMs."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key,
                 peak in BF16_PEAK_FLOPS.items() if key in name and "MIG" not in name), None)

def backend_flags(device):
    """The switches that change a step's speed, as they are now: every row of the bench says what it
    ran with. They are cuDNN's and cuBLAS's, so a CPU row has none."""
    if device.type != "cuda":
        return {}
    return {"cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32}

def run_bench(bc):
    """`projkd.py bench`: writes <out_dir>/bench.json and bench.md; a tiny version on the CPU."""
    device = resolve_device(bc.device, 1)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # streams and graphs are made on the current device
    defaults = {"steps": 400 if cuda else 3, "classic_steps": 150 if cuda else 3,
                "warmup": 30 if cuda else 1,
                "workers": min(8, os.cpu_count() or 1),
                "pairs": bc.pairs if cuda else "resnet20:resnet8"}
    if bc.pairs != BenchConfig.pairs:
        defaults["pairs"] = bc.pairs
    bc = dataclasses.replace(bc,
                             **{k: v for k,
                                v in defaults.items() if getattr(bc, k) is None or k == "pairs"})
    pairs = [p.split(":") for p in bc.pairs.split()]
    check_classic_loop_packages()
    for teacher_arch, student_arch in pairs:
        check_arch(teacher_arch, "teacher", "cifar100")
        check_arch(student_arch, "student", "cifar100")
    if bc.steps < 1 or bc.classic_steps < 1 or bc.warmup < (4 if cuda else 0):
        raise UserError("bench needs --steps and --classic-steps >= 1, and on CUDA --warmup >= 4 "
                        "(the graph is "
                        "captured after 3 eager steps)")
    report = {"device": device_name(device), "torch": torch.__version__,
              "batch_size": bc.batch_size,
              "steps": bc.steps, "classic_steps": bc.classic_steps, "warmup": bc.warmup,
              "workers": bc.workers,
              "bf16_peak_flops": bf16_peak_flops(device), "code": code_version(), "pairs": []}
    with tempfile.TemporaryDirectory() as folder:
        for teacher_arch, student_arch in pairs:
            report["pairs"].append(bench_pair(teacher_arch, student_arch, bc, device, folder))
        if cuda:
            teacher_arch, student_arch = pairs[0]
            report["graph_check"] = graph_check(teacher_arch, student_arch,
                                                os.path.join(folder, f"{teacher_arch}.pt"),
                                                bc, device, folder)
    os.makedirs(bc.out_dir, exist_ok=True)
    save(report, os.path.join(bc.out_dir, "bench.json"))
    save(bench_markdown(report), os.path.join(bc.out_dir, "bench.md"))
    log(bench_markdown(report))
    if "graph_check" in report and not report["graph_check"]["passed"]:
        raise UserError(f"the CUDA-graph step disagrees with the eager step beyond bf16 tolerance: "
                        f"{report['graph_check']}")
    return report

def bench_markdown(report):
    peak = report["bf16_peak_flops"]
    mfu_note = " MFU: unknown peak for this device."
    if peak:
        mfu_note = (f" MFU: model FLOPs (torch.utils.flop_counter) x images/s over the GPU's "
                    f"dense bf16 peak ({peak / 1e12:.0f} TFLOP/s).")
    warmup = f"{report['warmup']} warm-up steps"
    if report["warmup"] == 1:
        warmup = "1 warm-up step"
    lines = [f"# projkd bench: {report['device']}, torch {report['torch']}", "",
             f"PEFD, batch {report['batch_size']}, generated CIFAR-shaped data, random weights; "
             f"images/s over {report['steps']} steps of our loop and {report['classic_steps']} of "
             f"the classic one ({report['workers']} loader workers), after {warmup}; all in one "
             f"process. 'teacher cached': the epoch's teacher rows are computed once before "
             f"timing, as a cache file supplies them each epoch; the step is the same."
             f"{mfu_note}", ""]
    for pair in report["pairs"]:
        lines += [f"## {pair['teacher']} → {pair['student']}", "",
                  "| loop | images/s | vs classic | GFLOPs/image | MFU | flags |",
                  "|---|---|---|---|---|---|"]
        for row in pair["rows"]:
            if row["images_per_s"] is None:
                lines.append(f"| {row['loop']} | skipped: {row['skipped']} | | | | |")
                continue
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            flags = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in row["flags"].items())
            flags = flags or "– (CPU)"
            lines.append(f"| {row['loop']} | {row['images_per_s']:,.0f} | "
                         f"{row['vs_classic']:.2f}x | {row['flops_per_image'] / 1e9:.3f} | {mfu} | "
                         f"{flags} |")
        lines.append("")
    check = report.get("graph_check")
    if check:
        capture = ""
        if check["capture_failure"]:
            capture = f" (the capture failed: {check['capture_failure']})"
        lines += ["## CUDA graph = eager", "",
                  f"{check['pair']}, {check['steps']} steps from the same state, deterministic "
                  f"mode: largest relative difference of a step's loss "
                  f"{check['max_loss_rel_diff']:.2e}, of a final weight "
                  f"{check['max_weight_rel_diff']:.2e} (tolerance {check['tolerance']}): "
                  f"{'passed' if check['passed'] else 'FAILED'}{capture}"
                  f"{' (bitwise equal losses)' if check['bitwise_equal_losses'] else ''}.", ""]
    return "\n".join(lines)
