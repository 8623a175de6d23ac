"""projkd: Improved Feature Distillation via Projector Ensemble (PEFD), with KD, SP and CRD-lite baselines.

PEFD in one breath: the student's penultimate feature s goes through q independently initialised
projectors g_k(s) = ReLU(W_k s + b_k); their mean f(s) is pulled towards the teacher's penultimate feature t
by the direction-alignment loss MDA = 1 - mean_i cos(f(s_i), t_i), and the student minimises
CE + 25 * MDA. The projectors are thrown away after training, so the deployed student is unchanged.

    python projkd.py --teacher vgg13 --student vgg8                  # PEFD, the paper's CIFAR-100 protocol
    python projkd.py --teacher vgg13 --student vgg8 --method kd      # the same pair with a baseline
    python projkd.py --student vgg13 --method ce                     # train a model alone (teacher pretraining)
    python projkd.py --dataset synthetic --student resnet20 --method ce --epochs 2   # a CPU smoke run
    torchrun --nproc_per_node=8 projkd.py --dataset imagenet --data-dir /data/imagenet \\
        --teacher resnet34 --student resnet18                        # ImageNet, the paper's protocol, 8 GPUs
    python projkd.py eval --arch vgg8 --ckpt runs/cifar100/vgg13-vgg8/pefd-seed1/model.pt   # a checkpoint alone
    python projkd.py cache --teacher vgg13                           # a teacher's output cache (make builds it)
    python projkd.py bench                                           # the classic KD loop against ours, images/s
    python projkd.py --help                                          # every option, its default and meaning

Each run writes into its --run-dir: model.pt (the trained student's plain state_dict, strict-loadable into
models.MODELS[arch]), metrics.json (resolved config, accuracies, per-epoch history, timing, versions),
log.csv, and last.pt (everything needed to --resume exactly).

Importing this file runs nothing; its pieces (ProjectorEnsemble, mda_loss, kd_loss, sp_loss, CRDLite,
features_and_logits, load_cifar100, load_imagenet) can be copied or called on their own.
"""
import contextlib
import csv
import dataclasses
import difflib
import fcntl
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models import IMAGENET_ARCHS, MODELS, TORCHVISION_WEIGHTS

# ---------------------------------------------------------------------------------------------------------
# Config: one dataclass; None means "the paper's protocol for --dataset". The CLI is generated from it.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # what to train
    teacher: str = ""  # teacher architecture (a key of models.MODELS); unused by --method ce
    student: str = ""  # student architecture (a key of models.MODELS)
    method: str = "pefd"  # pefd | kd | sp | crd | ce (ce: the student alone, e.g. to pretrain a teacher)
    teacher_ckpt: str = ""  # teacher weights (ours, RepDistiller's, mdistiller's or torchvision's); default checkpoints/<dataset>/<teacher>.pt
    teacher_weights: str = ""  # instead of a file, torchvision's ImageNet weights by name, e.g. IMAGENET1K_V1 (downloads: online only)
    # data
    dataset: str = "cifar100"  # cifar100 | imagenet | synthetic (small, generated, learnable: for smoke runs and tests)
    data_dir: str = "data"  # cifar100: the folder holding cifar-100-python/; imagenet: the folder holding train/ and val/
    download: bool = False  # download CIFAR-100 with torchvision if it is not in --data-dir
    synthetic_size: int = 2048  # training images of --dataset synthetic; its test set is a quarter of that
    synthetic_classes: int = 10  # classes of --dataset synthetic
    image_size: int = 224  # imagenet: the training crop, and the evaluation crop after resizing to 256/224 of it
    workers: int = None  # imagenet: loader processes per GPU; default: this machine's CPUs over its GPUs in use
    # optimisation: SGD with step decay, as in the paper and RepDistiller; None takes the dataset's protocol
    epochs: int = None  # training epochs: 240 on CIFAR-100, 100 on ImageNet
    batch_size: int = None  # global batch (all GPUs together): 64 on CIFAR-100, 256 on ImageNet; the last incomplete batch is dropped
    lr: float = None  # 0.05 on CIFAR-100 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students), 0.1 on ImageNet; never rescaled by batch size
    lr_decay_epochs: str = None  # comma-separated epochs after which lr is multiplied by lr_decay_rate: 150,180,210 on CIFAR-100, 30,60,90 on ImageNet
    lr_decay_rate: float = 0.1  # factor applied at each of lr_decay_epochs
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = None  # on every trained parameter, projectors and CRD embeddings included: 5e-4 on CIFAR-100, 1e-4 on ImageNet
    # PEFD (method pefd)
    alpha: float = 25.0  # weight of the MDA loss: loss = CE + alpha * MDA
    q: int = 3  # number of projectors; 0 = none (MDA on the raw student feature; needs equal widths)
    proj_act: str = "relu"  # activation after each projector layer: relu | gelu | none
    proj_depth: int = 1  # Linear+activation layers per projector (the paper's "deep cascade" when > 1)
    # baselines, with RepDistiller's settings
    kd_T: float = 4.0  # KD temperature
    kd_weight: float = 0.9  # method kd: loss = kd_ce_weight * CE + kd_weight * KD
    kd_ce_weight: float = 0.1  # method kd: weight of the cross-entropy term
    sp_weight: float = 3000.0  # method sp: loss = CE + sp_weight * SP
    crd_weight: float = 0.8  # method crd: loss = CE + crd_weight * CRD-lite
    crd_dim: int = 128  # CRD embedding width
    crd_T: float = 0.07  # CRD temperature
    crd_negatives: int = 16384  # CRD negatives per anchor (size of CRD-lite's queue)
    # speed: neither changes what is computed beyond float rounding
    graph: str = "auto"  # capture the whole training step as one CUDA graph: auto (on for one CUDA process on CIFAR-style data, amp bf16 or off) | on | off
    teacher_cache: str = "auto"  # compute the teacher's outputs for all 162 crop/flip views of each image once and reuse them: auto (on CUDA for pefd/kd/crd on CIFAR-style data) | on | off
    teacher_cache_file: str = ""  # the cache of --teacher-ckpt; default: that path with the suffix .tcache
    # running
    seed: int = 1  # seeds initialisation, data order and augmentation
    deterministic: bool = False  # bit-identical reruns (on CPU; on CUDA as far as cuDNN allows), slower
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N; under torchrun each process takes cuda:LOCAL_RANK
    amp: str = "bf16"  # autocast on CUDA: bf16 | fp16 (with gradient scaling) | off; always off on CPU
    compile: bool = False  # torch.compile the student and teacher
    sync_bn: bool = False  # under torchrun: the student's BatchNorm statistics over the global batch (SyncBatchNorm)
    eval_batch_size: int = None  # batch size of the evaluation, per process: 1000 on CIFAR-100, 250 on ImageNet
    checkpoint_seconds: float = 60.0  # write last.pt after an epoch once this long has passed since the last one (always after the final epoch)
    progress_seconds: float = 30.0  # within an epoch, print a progress line this often
    run_dir: str = ""  # where the run's files go; default runs/<dataset>/<teacher>-<student>/<method>-seed<seed>
    resume: bool = False  # continue the run in --run-dir from its last.pt (starts fresh if there is none)
    overwrite: bool = False  # start over even if --run-dir already holds a run


# The paper's protocols (Section 4, "Training"; on CIFAR-100 they are RepDistiller's). A Config field left at None
# takes its dataset's value here; nothing of one dataset's protocol is ever applied to another.
PROTOCOLS = {
    "cifar100": {"epochs": 240, "batch_size": 64, "lr": 0.05, "lr_decay_epochs": "150,180,210", "weight_decay": 5e-4,
                 "eval_batch_size": 1000},
    "imagenet": {"epochs": 100, "batch_size": 256, "lr": 0.1, "lr_decay_epochs": "30,60,90", "weight_decay": 1e-4,
                 "eval_batch_size": 250},
}
PROTOCOLS["synthetic"] = PROTOCOLS["cifar100"]
METHODS = ("pefd", "kd", "sp", "crd", "ce")
CACHED_TEACHER_METHODS = ("pefd", "kd", "crd")  # those that need only the teacher's feature and logits, not its maps
RESIDENT_DATASETS = ("cifar100", "synthetic")  # small enough to live on the GPU as uint8, augmented there
PROJECTOR_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "none": nn.Identity}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
SWITCHES = ("auto", "on", "off")
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # lr 0.01 in the paper and RepDistiller
# Fields that may differ when a run is resumed: they change where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = ("epochs", "device", "amp", "compile", "deterministic", "data_dir", "download", "eval_batch_size",
                     "resume", "overwrite", "graph", "teacher_cache", "teacher_cache_file", "workers",
                     "checkpoint_seconds", "progress_seconds")


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits with status 2."""


def _field_comments(schema):
    """Trailing comments of a config dataclass's fields, read from this file's source, for --help."""
    try:
        source = inspect.getsource(schema)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", source, flags=re.M))


def cli_help(schema, doc, usage):
    """The first paragraph of `doc`, the usage line, and every field of `schema` with its default and comment."""
    comments = _field_comments(schema)
    lines = [doc.strip().split("\n\n")[0], "", f"usage: {usage}", ""]
    for f in dataclasses.fields(schema):
        flag = "--" + f.name.replace("_", "-")
        default = "auto" if f.default is None else repr(f.default)
        kind = "flag" if f.type is bool else f"{f.type.__name__} = {default}"
        lines.append(f"  {flag:<22} {kind:<28} {comments.get(f.name, '')}")
    return "\n".join(lines)


def parse_args(argv, schema=Config):
    """--name value, --name=value, --flag, --no-flag; names use '-' or '_'. Unknown or ill-typed options raise UserError."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: options look like --student vgg8 (see --help)")
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields and fields[name[3:]].type is bool
        if negated:
            name = name[3:]
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
            raise UserError(f"unknown option --{name.replace('_', '-')}{hint}; see --help")
        ftype = fields[name].type
        if ftype is bool:
            if negated or not eq:
                values[name] = not negated
            elif value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                values[name] = value.lower() in ("1", "true", "yes", "on")
            else:
                flag = name.replace("_", "-")
                raise UserError(f"--{flag} is a flag: use --{flag} or --no-{flag}, not {value!r}")
        else:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UserError(f"--{name.replace('_', '-')} needs a value ({ftype.__name__})")
                value = argv[i]
            try:
                values[name] = ftype(value)
            except ValueError:
                raise UserError(f"--{name.replace('_', '-')} expects {ftype.__name__}, got {value!r}") from None
        i += 1
    return schema(**values)


# ---------------------------------------------------------------------------------------------------------
# Data: CIFAR-100 from the official pickles, a synthetic stand-in, and GPU-side augmentation; ImageNet from
# class folders. The uint8 CIFAR-style sets live on the device and are cropped and flipped there, a whole
# epoch at once, with no loader workers; ImageNet is decoded and augmented by DataLoader workers.
# ---------------------------------------------------------------------------------------------------------

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PADDING = 4


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold dicts of numpy arrays and lists; refuse anything else a pickle could run."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        return super().find_class(module, name)


def _read_cifar_pickle(path):
    with open(path, "rb") as f:
        raw = _ArrayUnpickler(f, encoding="bytes").load()
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(d["fine_labels"], dtype=np.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return torch.from_numpy(x.copy()), torch.from_numpy(y)


def load_cifar100(root, download=False):
    """(train_x, train_y, test_x, test_y) from root/cifar-100-python/{train,test}: x uint8 N x 3 x 32 x 32, y int64.

    Reads the pickles directly, without torchvision's md5 check of the archive (mirrors and re-packed copies
    differ in file order and names, not in pixels). download=True fetches the official archive with
    torchvision when the files are missing.
    """
    folder = os.path.join(root, "cifar-100-python")
    paths = [os.path.join(folder, split) for split in ("train", "test")]
    if download and not all(map(os.path.isfile, paths)):
        import torchvision

        archive = os.path.join(root, "cifar-100-python.tar.gz")
        had_root, had_archive = os.path.exists(root), os.path.exists(archive)
        try:
            for train in (True, False):
                torchvision.datasets.CIFAR100(root, train=train, download=True)
        except Exception as e:  # offline, a proxy, a full disk: all end the same way for the user
            if not had_root:  # leave nothing half-downloaded behind
                shutil.rmtree(root, ignore_errors=True)
            elif not had_archive and os.path.exists(archive):
                os.remove(archive)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"downloading CIFAR-100 into {root} failed ({reason}); put a copy of cifar-100-python/ "
                            f"there by hand (README: Getting CIFAR-100)") from None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"CIFAR-100 not found: no {' or '.join(missing)}; pass --download, or --data-dir pointing "
                        f"at a folder that holds cifar-100-python/{{train,test}} (README: Getting CIFAR-100)")
    try:
        train_x, train_y = _read_cifar_pickle(paths[0])
        test_x, test_y = _read_cifar_pickle(paths[1])
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read CIFAR-100 in {folder} ({e}); re-create it from the official archive") from None
    return train_x, train_y, test_x, test_y


def make_synthetic(n_train, num_classes, seed=0):
    """A small learnable data set of CIFAR shape: each class is a smooth random colour pattern, each image a
    32-pixel window of it at a random offset of up to 4 pixels, plus noise. Deterministic in its arguments."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=36, mode="bilinear",
                             align_corners=False) * 200 + 28

    def draw(n):
        y = torch.arange(n) % num_classes
        dy, dx = torch.randint(0, 5, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
        x = patterns[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        x = x + 25 * torch.randn(x.shape, generator=g)
        return x.clamp(0, 255).round().to(torch.uint8), y

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(max(n_train // 4, num_classes))
    return train_x, train_y, test_x, test_y


def load_imagenet(root, image_size=224):
    """(train_set, val_set): torchvision ImageFolders of root/train and root/val (one folder per class, the class
    folders' sorted names being the labels) yielding uint8 C x H x W tensors, with the paper's augmentation:
    RandomResizedCrop + horizontal flip for training, Resize(256/224 of the crop) + CenterCrop for evaluation.
    Normalisation is left to the GPU."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    layout = (f"{os.path.join(root, 'train', '<class>', '<image>')} and {os.path.join(root, 'val', '<class>', '<image>')}"
              f" with the same class folders in both (README: ImageNet)")
    sets = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserError(f"ImageNet not found: no folder {folder}; --data-dir must hold {layout}")
        try:
            sets[split] = ImageFolder(folder)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"{folder} is not an image class folder ({str(e).splitlines()[0]}); expected {layout}") \
                from None
    if sets["train"].classes != sets["val"].classes:
        raise UserError(f"{root}: train/ has {len(sets['train'].classes)} class folders and val/ "
                        f"{len(sets['val'].classes)}, or they differ in name; expected {layout}")
    sets["train"].transform = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    sets["val"].transform = T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size),
                                       T.PILToTensor()])
    return sets["train"], sets["val"]


@dataclass
class Data:
    """A data set as training reads it: CIFAR-style sets as uint8/int64 tensors on the device (train_x ...),
    ImageNet as ImageFolders (train_set, val_set); mean and std are (1, 3, 1, 1) tensors on the device."""
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    train_x: Optional[torch.Tensor] = None
    train_y: Optional[torch.Tensor] = None
    test_x: Optional[torch.Tensor] = None
    test_y: Optional[torch.Tensor] = None
    train_set: Optional[object] = None
    val_set: Optional[object] = None


def load_data(cfg, device):
    """The data set of cfg.dataset for `device`."""
    if cfg.dataset == "imagenet":
        train_set, val_set = load_imagenet(cfg.data_dir, cfg.image_size)
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return Data(len(train_set.classes), mean, std, train_set=train_set, val_set=val_set)
    if cfg.dataset == "cifar100":
        train_x, train_y, test_x, test_y = load_cifar100(cfg.data_dir, download=cfg.download)
        num_classes, mean, std = 100, CIFAR100_MEAN, CIFAR100_STD
    else:
        train_x, train_y, test_x, test_y = make_synthetic(cfg.synthetic_size, cfg.synthetic_classes)
        num_classes, mean, std = cfg.synthetic_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    return Data(num_classes, mean, std, *(t.to(device) for t in (train_x, train_y, test_x, test_y)))


def image_loader(dataset, batch_size, workers, device, sampler=None, drop_last=False):
    """A DataLoader of uint8 image batches: worker processes decode and augment, pinned memory for the copy."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=drop_last,
                                       persistent_workers=workers > 0)


def normalize(images, mean, std):
    """uint8 N x 3 x H x W -> float32, standardised per channel; mean and std are (1, 3, 1, 1) tensors on the
    images' device, made once: building them per step would copy host -> device and wait for it."""
    return (images.float() / 255 - mean) / std


def augmentation_draws(n, generator, padding=CROP_PADDING):
    """One epoch's random crop offsets and flips, drawn on the CPU (the same numbers on every device)."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return dy, dx, flip


def crop_flip(images, dy, dx, flip, padding=CROP_PADDING):
    """Random crop with zero padding, then horizontal flip, for a whole batch in one gather.

    images: uint8 B x C x H x W; dy, dx in [0, 2*padding]: the crop's top-left corner in the padded image.
    Zero padding of the uint8 image means black pixels, exactly as torchvision's RandomCrop(32, padding=4).
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a mirrored crop is the crop read right to left
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------------------------------------
# Losses and projectors: the method (ProjectorEnsemble + mda_loss) and the baselines (KD, SP, CRD-lite).
# Every loss computes in float32, whatever autocast produced upstream.
# ---------------------------------------------------------------------------------------------------------


class ProjectorEnsemble(nn.Module):
    """q projectors from the student's feature width to the teacher's; forward returns their mean.

    Projector k is Linear(d_student, d_teacher) + act, followed by depth-1 further Linear(d_teacher, d_teacher)
    + act layers. The q projectors run as one batched computation: layer l keeps the weights of all
    projectors stacked, weight[l][k] and bias[l][k] being projector k's (shape out x in, as in nn.Linear).
    projector(k) returns projector k as a plain nn.Sequential. Each projector is initialised as nn.Linear
    would be, one after the other, so the draws equal those of q nn.Sequential built in a row.
    """

    def __init__(self, d_student, d_teacher, q=3, act="relu", depth=1):
        super().__init__()
        if q < 1 or depth < 1:
            raise ValueError(f"ProjectorEnsemble needs q >= 1 and depth >= 1, got q={q}, depth={depth}")
        if act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(f"unknown projector activation {act!r}; choose from {', '.join(PROJECTOR_ACTIVATIONS)}")
        widths = [d_student] + [d_teacher] * depth
        self.q, self.act_name = q, act
        self.act = PROJECTOR_ACTIVATIONS[act]()
        self.weight = nn.ParameterList(nn.Parameter(torch.empty(q, o, i)) for i, o in zip(widths, widths[1:]))
        self.bias = nn.ParameterList(nn.Parameter(torch.empty(q, o)) for o in widths[1:])
        with torch.no_grad():
            for k in range(q):
                for w, b in zip(self.weight, self.bias):
                    layer = nn.Linear(w.shape[2], w.shape[1])  # nn.Linear's own init, in its own order
                    w[k].copy_(layer.weight)
                    b[k].copy_(layer.bias)

    def forward(self, s):
        q, b = self.q, s.shape[0]
        first_w, first_b = self.weight[0], self.bias[0]
        # The first layer of all q projectors is one matmul against the stacked weights.
        h = F.linear(s, first_w.flatten(0, 1), first_b.flatten()).view(b, q, -1).transpose(0, 1)
        h = self.act(h)
        for w, bias in zip(self.weight[1:], self.bias[1:]):
            h = self.act(torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2)))
        return h.mean(0)

    def projector(self, k):
        layers = []
        for w, b in zip(self.weight, self.bias):
            linear = nn.Linear(w.shape[2], w.shape[1])
            with torch.no_grad():
                linear.weight.copy_(w[k])
                linear.bias.copy_(b[k])
            layers += [linear, PROJECTOR_ACTIVATIONS[self.act_name]()]
        return nn.Sequential(*layers)


def _unit(x, eps=1e-8):
    # Clamping the squared norm (not the norm) keeps the gradient finite at x = 0, where ReLU outputs can be.
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(eps * eps))


def mda_loss(projected_student, teacher_feature):
    """PEFD's modified direction alignment (paper eq. 5): 1 - mean_i cos(f(s_i), t_i), in float32."""
    f, t = projected_student.float(), teacher_feature.float()
    return 1 - (_unit(f) * _unit(t)).sum(-1).mean()


def kd_loss(student_logits, teacher_logits, T=4.0):
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * T * T


def sp_loss(student_map, teacher_map):
    """Similarity-preserving KD: row-normalised b x b Gram matrices of the flattened maps, ||G_t - G_s||_F^2 / b^2."""
    b = student_map.shape[0]

    def gram(m):
        a = m.float().reshape(b, -1)
        return F.normalize(a @ a.t(), dim=1)

    return (gram(teacher_map) - gram(student_map)).pow(2).sum() / (b * b)


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class CRDLite(nn.Module):
    """CRD's contrastive objective with a fixed-size queue of negatives instead of CRD's memory bank.

    As in CRD (Tian et al., 2020): both penultimate features are embedded by a Linear layer to `dim` and
    L2-normalised; each anchor is scored against one positive and `negatives` negatives as exp(v.u / T) / Z,
    Z being estimated once from the first batch; the NCE loss of CRD (eq. 18, uniform noise) is applied
    symmetrically, with the teacher's embedding as anchor against student keys and the student's against
    teacher keys, and the keys carry no gradient.
    How it differs from CRD:
      - negatives are the last `negatives` embeddings of earlier batches, kept in a FIFO queue per network
        (as in MoCo), not rows drawn at random from a bank holding one momentum-averaged row per training
        image; memory does not grow with the data set and no per-image index is needed;
      - the positive key is the other network's current embedding of the same image (detached), not that
        image's momentum-averaged bank row from earlier epochs;
      - the queue starts as random unit vectors (CRD's bank starts random too) and is full after
        negatives / batch_size steps.
    The NCE noise prior m * P_n and the data-set size in CRD's Z cancel, so neither appears here.
    Under torchrun every process enqueues the whole global batch (all-gathered) and Z is estimated from it,
    so the queues and Z are the same in every process and the same as one process with that batch.
    """

    def __init__(self, d_student, d_teacher, dim=128, negatives=16384, T=0.07):
        super().__init__()
        self.T = T
        self.embed_student = nn.Linear(d_student, dim)
        self.embed_teacher = nn.Linear(d_teacher, dim)
        self.register_buffer("queue_student", F.normalize(torch.randn(negatives, dim), dim=1))
        self.register_buffer("queue_teacher", F.normalize(torch.randn(negatives, dim), dim=1))
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))
        # log Z per anchor side; NaN until the first batch sets it (no host sync: torch.where, not an if).
        self.register_buffer("log_z", torch.full((2,), float("nan")))

    def _nce(self, anchor, positive, queue, side):
        logits = torch.cat([(anchor * positive).sum(1, keepdim=True), anchor @ queue.t()], dim=1) / self.T
        first_log_z = torch.logsumexp(logits.detach().flatten(), 0) - math.log(logits.numel())
        if _world_size() > 1:  # Z is a mean over equal shares of the global batch: average it in exp space
            z = first_log_z.exp()
            dist.all_reduce(z)
            first_log_z = (z / _world_size()).log()
        log_z = torch.where(torch.isnan(self.log_z[side]), first_log_z, self.log_z[side])
        # log of P / (P + m * P_n) for the positive and of m * P_n / (P + m * P_n) for the negatives, with
        # P = exp(logit) / Z normalised so that m * P_n = m / N cancels N: written with softplus for stability.
        log_ratio = logits - log_z - math.log(queue.shape[0])
        loss = F.softplus(-log_ratio[:, 0]) + F.softplus(log_ratio[:, 1:]).sum(1)
        return loss.mean(), log_z

    def forward(self, student_feature, teacher_feature):
        v_s = F.normalize(self.embed_student(student_feature.float()), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher_feature.float()), dim=1)
        # Snapshots: this step's backward needs the negatives as they were, and the queues below are updated
        # in place, because a CUDA graph replays reads and writes at fixed addresses.
        queue_student, queue_teacher = self.queue_student.clone(), self.queue_teacher.clone()
        loss_t, log_z_t = self._nce(v_t, v_s.detach(), queue_student, 0)
        loss_s, log_z_s = self._nce(v_s, v_t.detach(), queue_teacher, 1)
        if self.training:
            with torch.no_grad():
                keys_s, keys_t = _gather_rows(v_s.detach()), _gather_rows(v_t.detach())
                self.log_z.copy_(torch.stack([log_z_t, log_z_s]))
                slots = (self.queue_next + torch.arange(len(keys_s), device=v_s.device)) % self.queue_student.shape[0]
                self.queue_student.index_copy_(0, slots, keys_s)
                self.queue_teacher.index_copy_(0, slots, keys_t)
                self.queue_next.copy_(slots[-1] + 1)
        return loss_t + loss_s


def _gather_rows(x):
    """The rows of x from every process, in rank order (x itself when there is one process)."""
    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def between_class_cosine(class_sums):
    """Mean cosine similarity between the class-mean features of different classes (the paper's Figure 2).
    class_sums: num_classes x d sums (or means) of features per class; classes with no samples are skipped."""
    present = class_sums.abs().sum(1) > 0
    means = _unit(class_sums[present].double())
    sim = means @ means.t()
    n = len(means)
    return ((sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)).item()


# ---------------------------------------------------------------------------------------------------------
# Feature taps: the pooled penultimate feature and the last-stage map, read with hooks, so any classifier
# whose head is a final nn.Linear works without editing its forward.
# ---------------------------------------------------------------------------------------------------------


class Outputs(NamedTuple):
    """What the losses read from one network's forward pass."""
    feature: torch.Tensor  # the pooled penultimate vector, the classifier's input
    logits: torch.Tensor
    map: Optional[torch.Tensor] = None  # the last stage's activation map (method sp only)


def classifier_of(model):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier to read the penultimate feature from")
    return linears[-1]


class Taps:
    """Keeps, after each forward pass of `model`, the input of its final nn.Linear (`feature`) and, if
    `map_layer` names a submodule, that submodule's output (`map`). remove() detaches the hooks."""

    def __init__(self, model, map_layer=None):
        self.feature = self.map = None
        self._hooks = [classifier_of(model).register_forward_pre_hook(self._keep_feature)]
        if map_layer is not None:
            self._hooks.append(model.get_submodule(map_layer).register_forward_hook(self._keep_map))

    def _keep_feature(self, module, args):
        self.feature = args[0]

    def _keep_map(self, module, args, output):
        self.map = output

    def remove(self):
        for h in self._hooks:
            h.remove()


def features_and_logits(model, x):
    """(feature, logits) from one forward pass: feature is the pooled penultimate vector fed to the classifier."""
    taps = Taps(model)
    try:
        logits = model(x)
    finally:
        taps.remove()
    return taps.feature, logits


def map_layer_of(model, arch):
    name = getattr(model, "map_layer", None)
    if name is None:
        raise UserError(f"--method sp needs the last-stage map of {arch}, but it has no `map_layer` attribute")
    return name


# ---------------------------------------------------------------------------------------------------------
# Teacher-output cache. A frozen teacher in eval mode is a fixed function of its input, and 4-pixel
# zero-padded crops with flips give each training image exactly 9 x 9 x 2 = 162 views. So the teacher's
# feature and logits for every view of every image are computed once per teacher checkpoint, stored in 16
# bits on disk, and each epoch reads back the row of the view each image drew, instead of running the teacher.
# ---------------------------------------------------------------------------------------------------------

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


def default_cache_file(teacher_ckpt):
    return os.path.splitext(teacher_ckpt)[0] + ".tcache"


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


@torch.inference_mode()
def build_teacher_cache(path, teacher, images, mean, std, autocast, memory_format, identity, batch_size):
    """Runs `teacher` (eval mode) on all 162 views of every image and writes the cache file at `path`
    atomically. The teacher runs exactly as in a training step: same normalisation, layout and autocast."""
    taps = Taps(teacher)
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
    log(f"building the teacher cache {path}: {CACHE_VIEWS} views x {n} images x {width} values, "
        f"{need / 1e9:.2f} GB")
    start = last_report = time.time()

    def write(tmp):
        nonlocal last_report
        with open(tmp, "wb") as f:
            f.write(b" " * CACHE_HEADER_BYTES)  # the header goes in last, once the build time is known
            rows = torch.empty(n, width, dtype=torch.bfloat16, device=images.device)
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
                    log(f"  teacher cache: view {v + 1}/{CACHE_VIEWS}, "
                        f"{(v + 1) * n / (last_report - start):,.0f} images/s")
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


# ---------------------------------------------------------------------------------------------------------
# Train / eval loop. train() reads top to bottom: setup_run; per epoch train_epoch (whose step is train_step),
# evaluate, record_epoch, save_checkpoint; then finish_run. On CUDA the step runs as one captured graph.
# ---------------------------------------------------------------------------------------------------------


def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def log(*args):
    """print, by one process only under torchrun."""
    if _rank() == 0:
        print(*args, flush=True)


def atomic_write(path, write):
    """write(tmp_path), then rename: a killed process never leaves a half-written file under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def save_json(obj, path):
    save_text(json.dumps(obj, indent=1) + "\n", path)


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_log_csv(history, path):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]) if history else ["epoch"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    save_text(out.getvalue(), path)


def code_version():
    """The git commit of this file's checkout, '+dirty' if it has uncommitted changes; 'unknown' outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def rng_states(device):
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def run_name(method, q=Config.q, proj_depth=Config.proj_depth, proj_act=Config.proj_act):
    """pefd, kd, ..., or pefd-q2, pefd-depth3, pefd-gelu: the method plus any projector setting off the paper's."""
    parts = [method]
    if method == "pefd":
        parts += [f"q{q}"] * (q != Config.q) + [f"depth{proj_depth}"] * (proj_depth != Config.proj_depth)
        parts += [proj_act] * (proj_act != Config.proj_act)
    return "-".join(parts)


def run_path(runs, teacher, student, method, seed, **projector):
    """Where a run lives: <runs>/<teacher>-<student>/<name>-seed<N>, or <runs>/<student>/ce-seed<N> for a model
    trained alone (shared by every pair with that student, and also how teachers are trained)."""
    folder = student if method == "ce" else f"{teacher}-{student}"
    return os.path.join(runs, folder, f"{run_name(method, **projector)}-seed{seed}")


def check_arch(arch, role, dataset):
    if arch not in MODELS:
        raise UserError(f"unknown architecture {arch!r} for --{role}; choose one of {', '.join(MODELS)}")
    if (arch in IMAGENET_ARCHS) != (dataset == "imagenet"):
        kind, other = ("an ImageNet", "a CIFAR") if arch in IMAGENET_ARCHS else ("a CIFAR (32x32)", "an ImageNet")
        raise UserError(f"{arch} is {kind} architecture and --dataset {dataset} needs {other} one "
                        f"(ImageNet: {', '.join(IMAGENET_ARCHS)})")


def resolve_device(name, world_size):
    """The torch.device for --device `name`; under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cuda", "cpu"):
        raise UserError(f"--device {name} is not supported; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} but no CUDA device is visible; use --device cpu")
    if dev.type == "cuda" and world_size > 1:
        if dev.index is not None:
            raise UserError(f"--device {name} does not go with torchrun, which gives each process its own GPU "
                            f"(cuda:LOCAL_RANK); use --device cuda")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def resolve_config(cfg, command="train"):
    """Check every option and fill in the defaults that depend on others. Returns (config, notes to print).
    command "cache" checks what building a teacher cache needs: a teacher, no student."""
    check_choices(cfg, command)
    notes = []
    protocol = protocol_values(cfg, notes)
    check_numbers(dataclasses.replace(cfg, **protocol))
    return dataclasses.replace(cfg, **protocol, **runtime_values(cfg, command, protocol["batch_size"]
                                                                 if cfg.batch_size is None else cfg.batch_size, notes)), notes


def check_choices(cfg, command):
    """The options that name things: method, dataset, architectures, and the switches."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.dataset not in PROTOCOLS:
        raise UserError(f"unknown --dataset {cfg.dataset!r}; choose cifar100, imagenet or synthetic")
    if command == "train":
        if not cfg.student:
            raise UserError("--student is required, e.g. --student vgg8 (architectures: " + ", ".join(MODELS) + ")")
        check_arch(cfg.student, "student", cfg.dataset)
    if command == "cache" or cfg.method != "ce":
        if not cfg.teacher:
            raise UserError(f"--method {cfg.method} needs --teacher, e.g. --teacher vgg13 --student vgg8"
                            if command == "train" else "the teacher cache needs --teacher, e.g. --teacher vgg13")
        check_arch(cfg.teacher, "teacher", cfg.dataset)
    for name, value, choices in (("amp", cfg.amp, AMP_DTYPES), ("proj-act", cfg.proj_act, PROJECTOR_ACTIVATIONS),
                                 ("graph", cfg.graph, SWITCHES), ("teacher-cache", cfg.teacher_cache, SWITCHES)):
        if value not in choices:
            raise UserError(f"unknown --{name} {value!r}; choose {', '.join(choices)}")
    if cfg.teacher_weights and cfg.teacher_ckpt:
        raise UserError("--teacher-weights and --teacher-ckpt both name the teacher's weights; pass one")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")


def protocol_values(cfg, notes):
    """The dataset's protocol for every option left at None."""
    protocol = PROTOCOLS[cfg.dataset]
    values = {k: v for k, v in protocol.items() if getattr(cfg, k) is None}
    if cfg.lr is None and cfg.student in LOW_LR_STUDENTS and cfg.dataset != "imagenet":
        values["lr"] = 0.01
        notes.append(f"lr 0.01 (the paper's value for {cfg.student} students)")
    batch = cfg.batch_size or protocol["batch_size"]
    if cfg.lr is None and batch != protocol["batch_size"]:
        lr = values["lr"]
        notes.append(f"lr {lr} is the paper's for a global batch of {protocol['batch_size']} and is used unchanged "
                     f"at {batch} (the linear scaling rule would give {lr * batch / protocol['batch_size']:g}: "
                     f"pass --lr to use it)")
    return values


def check_numbers(cfg):
    try:
        milestones = [int(e) for e in cfg.lr_decay_epochs.split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--lr-decay-epochs must be comma-separated integers, got {cfg.lr_decay_epochs!r}") from None
    if any(m < 0 for m in milestones):
        raise UserError(f"--lr-decay-epochs must be >= 0, got {cfg.lr_decay_epochs!r}")
    positive = ("epochs", "batch_size", "eval_batch_size", "proj_depth", "kd_T", "crd_T", "crd_dim", "crd_negatives",
                "synthetic_size", "image_size")
    non_negative = ("lr", "momentum", "weight_decay", "alpha", "q", "kd_weight", "kd_ce_weight", "sp_weight",
                    "crd_weight", "lr_decay_rate", "seed", "checkpoint_seconds", "progress_seconds", "workers")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in non_negative:
        v = getattr(cfg, name)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if cfg.synthetic_classes < 2:
        raise UserError(f"--synthetic-classes must be at least 2, got {cfg.synthetic_classes}")


def runtime_values(cfg, command, batch_size, notes):
    """What depends on where the run happens (device, processes, loader workers, graph, cache) and the paths
    derived from other options."""
    values = {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(cfg.device, world)
    values["device"] = str(dev)
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is the global batch and must divide by the {world} processes")
    if dev.type == "cpu" and cfg.amp != "off":
        values["amp"] = "off"
        notes.append(f"amp off on CPU (--amp {cfg.amp} applies to CUDA)")
    if cfg.sync_bn and world == 1:
        notes.append("--sync-bn has no effect in a single process")
    if cfg.sync_bn and world > 1 and dev.type != "cuda":
        raise UserError("--sync-bn needs CUDA: SyncBatchNorm runs on GPUs only")
    resident = cfg.dataset in RESIDENT_DATASETS
    if cfg.dataset == "imagenet" and cfg.workers is None:
        values["workers"] = default_workers()
    elif resident:
        values["workers"] = 0  # the data lives on the device: no loader
    values["graph"] = resolve_graph(cfg, dev, world, resident, values.get("amp", cfg.amp), notes)
    values["teacher_cache"] = resolve_teacher_cache(cfg, dev, resident, command)
    needs_teacher = command == "cache" or cfg.method != "ce"
    if needs_teacher and not cfg.teacher_ckpt and not cfg.teacher_weights:
        values["teacher_ckpt"] = os.path.join("checkpoints", cfg.dataset, f"{cfg.teacher}.pt")
    if values["teacher_cache"] == "on" and not cfg.teacher_cache_file:
        values["teacher_cache_file"] = default_cache_file(values.get("teacher_ckpt", cfg.teacher_ckpt))
    if not needs_teacher:
        if cfg.teacher:
            notes.append(f"--teacher {cfg.teacher} is not used by --method ce")
        values["teacher"] = ""
    if not cfg.run_dir and command == "train":
        values["run_dir"] = run_path(os.path.join("runs", cfg.dataset), values.get("teacher", cfg.teacher),
                                     cfg.student, cfg.method, cfg.seed, q=cfg.q, proj_depth=cfg.proj_depth,
                                     proj_act=cfg.proj_act)
    return values


def resolve_graph(cfg, dev, world, resident, amp, notes):
    """'on' or 'off': the whole step as one CUDA graph needs CUDA, one process, GPU-resident data and no
    gradient scaler (fp16's scaler steps on the host's say)."""
    obstacles = [why for why, blocks in (("it needs CUDA", dev.type != "cuda"),
                                         ("it is single-process (under torchrun the eager step runs)", world > 1),
                                         ("it needs GPU-resident data (cifar100, synthetic)", not resident),
                                         ("--amp fp16's gradient scaler runs eagerly; use --amp bf16", amp == "fp16"))
                 if blocks]
    if cfg.graph == "on" and obstacles:
        raise UserError(f"--graph on is not possible here: {obstacles[0]}; use --graph auto or off")
    if cfg.graph == "auto" and dev.type == "cuda" and obstacles:
        notes.append(f"CUDA graph off: {obstacles[0]}")
    return "on" if cfg.graph != "off" and not obstacles else "off"


def resolve_teacher_cache(cfg, dev, resident, command):
    """'on' or 'off': the cache holds the teacher's feature and logits of CIFAR-style crops and flips, so it serves
    pefd, kd and crd on cifar100/synthetic; sp needs the teacher's maps and ImageNet's crops are not enumerable."""
    if command == "cache":
        if not resident:
            raise UserError(f"the teacher cache is for CIFAR-style data (cifar100, synthetic), not --dataset {cfg.dataset}")
        return "on"
    applies = resident and cfg.method in CACHED_TEACHER_METHODS
    if cfg.teacher_cache == "on" and not applies:
        raise UserError(f"--teacher-cache on serves pefd, kd and crd on cifar100/synthetic, not --method {cfg.method} "
                        f"on --dataset {cfg.dataset}; use --teacher-cache auto or off")
    return "on" if applies and (cfg.teacher_cache == "on" or (cfg.teacher_cache == "auto" and dev.type == "cuda")) \
        else "off"


def compute_settings(cfg, device):
    """(memory format, autocast dtype or None, autocast context) of the models on `device`. The autocast cache is
    off: each weight is used once per step anyway, and a cache must not outlive a CUDA graph capture."""
    amp_dtype = AMP_DTYPES[cfg.amp]  # None on the CPU: resolve_config turned amp off there
    autocast = torch.autocast("cuda", dtype=amp_dtype, cache_enabled=False) if amp_dtype else contextlib.nullcontext()
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format, amp_dtype, autocast


def setup_torch(cfg):
    """Backend switches. Deterministic mode is honest: no cudnn.benchmark behind it."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    if cfg.deterministic != torch.are_deterministic_algorithms_enabled():  # the call imports torch._dynamo: seconds
        # warn_only: a CUDA op without a deterministic kernel is named in a warning instead of ending the run
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = cfg.deterministic
    # Static shapes: kernels autotuned on the first step are reused by every later one.
    torch.backends.cudnn.benchmark = not cfg.deterministic
    use_tf32()


def use_tf32():
    """float32 matmuls and convolutions on TF32 tensor cores (evaluation included)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def default_workers():
    """ImageNet loader processes per GPU: this machine's CPUs shared by the processes torchrun started on it."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_distributed(device):
    """Joins torchrun's process group (NCCL on CUDA, gloo on the CPU). Returns (rank, world size); (0, 1) when
    the process was not started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def load_checkpoint_file(path, what):
    """torch.load(path, weights_only=True), with one clear line for a file that is not a safe checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        why = ("it holds Python objects besides tensors and plain containers, which a safe load refuses"
               if "weights only" in str(e).lower() else "truncated, or not a PyTorch file")
        raise UserError(f"{what} {path} is not a readable PyTorch checkpoint ({why})") from None


# torchvision's published DenseNet files predate its module names: 'denselayer1.norm.1' is 'denselayer1.norm1' now.
_OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _normalise_keys(state_dict):
    # DataParallel/DDP save "module.", torch.compile "_orig_mod."; the weights are the same.
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        m = _OLD_DENSENET_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def read_state_dict(path, what="checkpoint"):
    """The state_dict in our model.pt, a RepDistiller/mdistiller checkpoint ({'model': ...}), a torchvision weight
    file or any plain state_dict, loaded with weights_only=True."""
    ckpt = load_checkpoint_file(path, what)
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError(f"{what} {path} holds no state_dict (expected a dict of tensors or {{'model': ...}})")
    return _normalise_keys(ckpt)


def frozen_model(arch, state, num_classes, source, what="checkpoint"):
    """MODELS[arch] with `state` loaded strictly, in eval mode and without gradients."""
    model = MODELS[arch](num_classes=num_classes)
    ours = model.state_dict()
    # Compared before loading: load_state_dict raises a bare RuntimeError on a shape mismatch, strict or not.
    # torchvision's published files have no BatchNorm num_batches_tracked; loading fills them in
    missing = [k for k in ours if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in ours]
    misshaped = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or unexpected or misshaped:
        raise UserError(f"{what} {source} does not fit {arch} with {num_classes} classes "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors, "
                        f"e.g. {(missing + unexpected + misshaped)[0]}); wrong architecture or file?")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def torchvision_state_dict(arch, weights_name, put_at):
    """torchvision's published `weights_name` weights of `arch`, downloaded into torch's hub cache (online only)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)[weights_name]
    except (ValueError, KeyError):
        raise UserError(f"torchvision publishes no weights {weights_name!r} for {arch} "
                        f"(it has them for {', '.join(TORCHVISION_WEIGHTS)}: e.g. IMAGENET1K_V1)") from None
    file, url = TORCHVISION_WEIGHTS.get(arch, (os.path.basename(weights.url), weights.url))
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # offline, a proxy, a bad download: all end the same way for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"downloading {url} failed ({reason}); get {file} from there by other means and put it "
                        f"at {put_at}") from None
    return _normalise_keys(state)


def load_teacher(arch, path, num_classes):
    """A frozen teacher from our model.pt, a RepDistiller/mdistiller checkpoint ({'model': ...}), a torchvision
    weight file or a plain state_dict."""
    require_teacher_file(arch, path)
    return frozen_model(arch, read_state_dict(path, "teacher checkpoint"), num_classes, path, "teacher checkpoint")


def require_teacher_file(arch, path):
    """One line saying where to get a teacher checkpoint that is not at `path`."""
    if not os.path.isfile(path):
        if arch in TORCHVISION_WEIGHTS:
            file, url = TORCHVISION_WEIGHTS[arch]
            raise UserError(f"no teacher checkpoint at {path}: get torchvision's {file} from {url} and put it there, "
                            f"or pass --teacher-weights IMAGENET1K_V1 when online (make imagenet-all fetches it)")
        raise UserError(f"no teacher checkpoint at {path}: pass --teacher-ckpt PATH (RepDistiller's "
                        f"{arch}_vanilla/ckpt_epoch_240.pth works), or train one: python projkd.py --student {arch} "
                        f"--method ce, then copy its model.pt there (make teachers does both)")


def teacher_for_speed(teacher, amp_dtype, memory_format):
    """The frozen teacher's convolution and linear weights stored in the autocast dtype (autocast would re-cast
    the float32 weights every step) and channels_last; BatchNorm stays float32, as autocast runs it."""
    teacher.to(memory_format=memory_format)
    if amp_dtype is not None:
        for m in teacher.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.to(amp_dtype)
    return teacher


def build_aux(cfg, d_student, d_teacher):
    """The modules trained alongside the student and dropped after training: projectors, CRD embeddings."""
    if cfg.method == "pefd":
        if cfg.q == 0:
            if d_student != d_teacher:
                raise UserError(f"--q 0 (no projector) needs equal feature widths, but {cfg.student} has "
                                f"{d_student} and {cfg.teacher} {d_teacher}")
            return nn.Identity()
        return ProjectorEnsemble(d_student, d_teacher, q=cfg.q, act=cfg.proj_act, depth=cfg.proj_depth)
    if cfg.method == "crd":
        return CRDLite(d_student, d_teacher, dim=cfg.crd_dim, negatives=cfg.crd_negatives, T=cfg.crd_T)
    return nn.Identity()


def method_loss(cfg, aux, student, teacher, labels):
    """The training objective of --method, in float32; student and teacher are Outputs (teacher None for ce)."""
    ce = F.cross_entropy(student.logits.float(), labels)
    if cfg.method == "ce":
        return ce
    if cfg.method == "pefd":
        return ce + cfg.alpha * mda_loss(aux(student.feature.float()), teacher.feature)
    if cfg.method == "kd":
        return cfg.kd_ce_weight * ce + cfg.kd_weight * kd_loss(student.logits, teacher.logits, cfg.kd_T)
    if cfg.method == "sp":
        return ce + cfg.sp_weight * sp_loss(student.map, teacher.map)
    if cfg.method == "crd":
        return ce + cfg.crd_weight * aux(student.feature, teacher.feature)
    raise AssertionError(cfg.method)


class Distiller(nn.Module):
    """What training updates, as one module: the student, the modules dropped after training (projectors, CRD
    embeddings) and the method's loss. One module, so that DistributedDataParallel can wrap it whole.
    forward(x, labels, teacher Outputs) -> (loss, student logits)."""

    def __init__(self, cfg, student, aux, autocast):
        super().__init__()
        self.cfg, self.student, self.aux, self.autocast = cfg, student, aux, autocast
        self.taps = Taps(student, map_layer_of(student, cfg.student) if cfg.method == "sp" else None)

    def forward(self, x, labels, teacher):
        with self.autocast:
            logits = self.student(x)
        student = Outputs(self.taps.feature, logits, self.taps.map)
        return method_loss(self.cfg, self.aux, student, teacher, labels), logits


def lr_at(cfg, epoch):
    """Step decay: epoch counts from 0, so with milestone 150 the 151st epoch is the first at lr * rate."""
    milestones = [int(e) for e in cfg.lr_decay_epochs.split(",") if e.strip()]
    return cfg.lr * cfg.lr_decay_rate ** sum(epoch >= m for m in milestones)


def epoch_generator(seed, epoch):
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


# --- GPU-resident epochs: planned on the CPU, augmented on the device, read by the step through an index ---


@dataclass
class EpochBuffers:
    """Device tensors that a GPU-resident epoch is written into, allocated once and refilled in place each epoch
    so that a captured CUDA graph keeps reading the right memory."""
    images: torch.Tensor  # used images x H x W x C uint8, the epoch's crops in order (NHWC: a row gather keeps channels_last)
    labels: torch.Tensor  # used images, int64
    teacher: Optional[torch.Tensor]  # used images x (feature + logits) bfloat16 from the teacher cache; None: live teacher
    step: torch.Tensor  # int64 scalar: the epoch's next step, advanced by the step itself
    offsets: torch.Tensor  # this process's positions within a global batch


@dataclass
class EpochPlan:
    """An epoch's draws, made on the CPU: which image goes where, its crop and flip, and its cached teacher rows."""
    order: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    teacher_rows: Optional[np.ndarray]  # int16 bit patterns of bfloat16, or None


def plan_epoch(seed, epoch, n_train, n_used, cache):
    g = epoch_generator(seed, epoch)
    order = torch.randperm(n_train, generator=g)
    dy, dx, flip = augmentation_draws(n_train, g)
    order, dy, dx, flip = order[:n_used], dy[:n_used], dx[:n_used], flip[:n_used]  # the last partial batch is dropped
    rows = cache.rows(order.numpy(), view_index(dy, dx, flip).numpy()) if cache is not None else None
    return EpochPlan(order, dy, dx, flip, rows)


class EpochPlanner:
    """plan(epoch) returns that epoch's plan and starts the next one's in a background thread, which reads the
    teacher cache while the GPU trains. The thread touches no CUDA, so graph capture and replay are undisturbed."""

    def __init__(self, seed, n_train, n_used, cache, epochs):
        self.seed, self.n_train, self.n_used, self.cache, self.epochs = seed, n_train, n_used, cache, epochs
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), {}

    def _submit(self, epoch):
        return self.pool.submit(plan_epoch, self.seed, epoch, self.n_train, self.n_used, self.cache)

    def plan(self, epoch):
        future = self.pending.pop(epoch, None) or self._submit(epoch)
        if epoch + 1 < self.epochs:
            self.pending[epoch + 1] = self._submit(epoch + 1)
        return future.result()

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def load_epoch(run, plan):
    """Shuffles, crops and flips the whole epoch at once on the device, in the models' memory format, into the
    epoch buffers; with the cache, uploads the epoch's teacher rows in one copy."""
    buffers, device = run.buffers, run.device
    order = plan.order.to(device)
    images = crop_flip(run.data.train_x[order], plan.dy.to(device), plan.dx.to(device), plan.flip.to(device))
    buffers.images.copy_(images.permute(0, 2, 3, 1))
    buffers.labels.copy_(run.data.train_y[order])
    if buffers.teacher is not None:
        buffers.teacher.copy_(torch.from_numpy(plan.teacher_rows).view(torch.bfloat16))
    buffers.step.zero_()


def resident_step(run):
    """One step on the GPU-resident epoch: this process's part of the next global batch, read through an index
    computed on the device, so the step is the same every time (and can be a CUDA graph)."""
    buffers = run.buffers
    idx = buffers.step * run.cfg.batch_size + buffers.offsets
    buffers.step += 1
    images = buffers.images.index_select(0, idx).permute(0, 3, 1, 2)  # N x C x H x W, channels_last strides
    cached = buffers.teacher.index_select(0, idx) if buffers.teacher is not None else None
    train_step(run, images, buffers.labels.index_select(0, idx), cached)


def teacher_outputs(run, x, cached_rows):
    """The teacher's Outputs for the normalised batch x: split from its cached rows, or from a live forward pass.
    no_grad rather than inference_mode: the losses save the teacher's outputs for backward, which inference
    tensors refuse."""
    if run.teacher is None:
        return None
    if cached_rows is not None:
        num_classes = run.data.num_classes
        feature, logits = cached_rows.split([cached_rows.shape[1] - num_classes, num_classes], dim=1)
        return Outputs(feature, logits)
    with torch.no_grad(), run.autocast:
        logits = run.teacher_forward(x)
    return Outputs(run.teacher_taps.feature, logits, run.teacher_taps.map)


def train_step(run, images, labels, cached_teacher=None):
    """One optimisation step on a batch of uint8 images, entirely on the device, without a host sync: the eager
    loop calls it, and the CUDA graph is a capture of it, so the two cannot drift apart."""
    x = normalize(images, run.data.mean, run.data.std).contiguous(memory_format=run.memory_format)
    teacher = teacher_outputs(run, x, cached_teacher)
    loss, logits = run.distiller(x, labels, teacher)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)  # fused SGD: reads run.lr on the device, and a scaler's scale without a sync
    run.scaler.update()
    run.loss_sum += loss.detach()
    run.correct += (logits.argmax(1) == labels).sum()


class CUDAGraphStep:
    """Calls step() eagerly for a few warm-up steps, then captures it once as a CUDA graph and replays it: the
    whole step (forward, backward, optimizer, metric sums) becomes one launch instead of hundreds of kernel
    launches, which at batch 64 is what the GPU waits for. step() must read its inputs from, and write its
    results into, tensors that outlive the graph and are only ever updated in place. If the capture fails, the
    run goes on eagerly and says so (`failure` keeps the reason)."""

    def __init__(self, step, warmup_steps=3):
        self.step, self.warmup_left, self.graph, self.failure = step, warmup_steps, None, None
        self.side_stream = torch.cuda.Stream()

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        elif self.warmup_left > 0 or self.failure is not None:
            # Real training steps, run eagerly on a side stream as capture requires: they autotune cuDNN and
            # create the optimizer's momentum buffers, which the captured step then updates in place.
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                self.step()
            torch.cuda.current_stream().wait_stream(self.side_stream)
            self.warmup_left -= 1
        else:
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: the epoch planner's thread may run Python meanwhile; it makes no CUDA calls
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.step()
            except RuntimeError as e:  # nothing ran during the failed capture: this step is still to do
                self.failure = str(e).splitlines()[0]
                log(f"warning: the CUDA graph capture of the training step failed ({self.failure}); training "
                    f"goes on eagerly (--graph off skips the attempt)")
                return self()
            self.graph = graph
            self.graph.replay()  # capture records the step without running it


@dataclass
class Run:
    """One training run: made by setup_run, advanced by train_epoch, written by save_checkpoint and finish_run."""
    cfg: Config
    device: torch.device
    world_size: int
    data: Data
    student: nn.Module  # the plain student: what model.pt holds
    aux: nn.Module  # projectors / CRD embeddings, dropped after training
    distiller: nn.Module  # student + aux + loss, wrapped by DDP or torch.compile when asked
    teacher: Optional[nn.Module]
    teacher_forward: Optional[object]  # the teacher, or its torch.compile
    teacher_taps: Optional[Taps]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr: torch.Tensor  # on the device: set each epoch in place, read by the fused optimizer (and the graph)
    autocast: object
    memory_format: torch.memory_format
    loss_sum: torch.Tensor  # the epoch's sums, accumulated on the device by every step
    correct: torch.Tensor
    steps_per_epoch: int = 0
    local_batch: int = 0
    cache: Optional[TeacherCache] = None
    buffers: Optional[EpochBuffers] = None  # GPU-resident data (CIFAR-style)
    planner: Optional[EpochPlanner] = None
    step: Optional[object] = None  # one GPU-resident step: resident_step, or its CUDA graph
    loader: Optional[object] = None  # ImageNet: the training DataLoader and its sampler
    sampler: Optional[object] = None
    val_loader: Optional[object] = None
    start_epoch: int = 0
    history: list = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"top1": -1.0, "top5": -1.0, "epoch": 0})
    teacher_eval: Optional[dict] = None


def checkpoint_to_resume(cfg):
    """The contents of --run-dir's last.pt when resuming, else None; refuses to touch a run it should not."""
    last_path = os.path.join(cfg.run_dir, "last.pt")
    if not cfg.resume and not cfg.overwrite and any(
            os.path.exists(os.path.join(cfg.run_dir, f)) for f in ("last.pt", "model.pt", "metrics.json")):
        raise UserError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, --overwrite to start "
                        f"over, or another --run-dir")
    if not (cfg.resume and os.path.isfile(last_path)):
        return None
    checkpoint = load_checkpoint_file(last_path, "resume checkpoint")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise UserError(f"{last_path} is not a projkd last.pt; delete it or use --overwrite")
    saved = checkpoint["config"]
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
             if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diffs:
        raise UserError(f"{cfg.run_dir} holds a run with other settings ({'; '.join(diffs)}); "
                        f"use another --run-dir, or --overwrite to start over")
    if checkpoint["epoch"] > cfg.epochs:
        raise UserError(f"{cfg.run_dir} has trained {checkpoint['epoch']} epochs already, more than --epochs {cfg.epochs}")
    return checkpoint


def setup_teacher(cfg, data, device, memory_format, amp_dtype):
    """(teacher, its test accuracy) for a distillation run; the accuracy is measured in float32 before the
    teacher's weights go to the autocast dtype."""
    if cfg.method == "ce":
        return None
    if cfg.teacher_weights:
        put_at = os.path.join("checkpoints", cfg.dataset, f"{cfg.teacher}.pt")
        state = torchvision_state_dict(cfg.teacher, cfg.teacher_weights, put_at)
        teacher = frozen_model(cfg.teacher, state, data.num_classes, cfg.teacher_weights, "torchvision weights")
    else:
        teacher = load_teacher(cfg.teacher, cfg.teacher_ckpt, data.num_classes)
    return teacher.to(device, memory_format=memory_format)


def setup_teacher_side(run, amp_dtype):
    """The teacher's test accuracy (once per run, in float32), then the teacher made fast: weights in the
    autocast dtype, and either its output cache or hooks for the live forward pass."""
    cfg, data, teacher = run.cfg, run.data, run.teacher
    if run.teacher_eval is None:
        run.teacher_eval = evaluate(teacher, test_batches_of(run), data.num_classes, data.mean, data.std,
                                    run.memory_format)
        source = cfg.teacher_weights or cfg.teacher_ckpt
        log(f"teacher {cfg.teacher} from {source}: test top-1 {run.teacher_eval['top1']:.2f}% "
            f"top-5 {run.teacher_eval['top5']:.2f}%")
        if run.teacher_eval["top1"] < 2 * 100 / data.num_classes:
            log(f"warning: the teacher is near chance ({100 / data.num_classes:.1f}%): is {source} the right file?")
    teacher_for_speed(teacher, amp_dtype, run.memory_format)
    if cfg.teacher_cache == "on":
        run.cache = setup_teacher_cache(run)
    else:
        run.teacher_taps = Taps(teacher, map_layer_of(teacher, cfg.teacher) if cfg.method == "sp" else None)
        run.teacher_forward = torch.compile(teacher) if cfg.compile else teacher


def setup_teacher_cache(run):
    """The open teacher cache of this run, built first if needed; under torchrun process 0 builds it while the
    others wait."""
    cfg, data = run.cfg, run.data
    identity = cache_identity(cfg, data)
    if _rank() == 0:
        cache = ensure_teacher_cache(cfg.teacher_cache_file, identity, run.teacher, data, run.autocast,
                                     run.memory_format, cfg.eval_batch_size)
    if run.world_size > 1:
        dist.barrier()
        cache = open_teacher_cache(cfg.teacher_cache_file, identity)
    log(f"teacher cache: {cfg.teacher_cache_file} (built in {cache.header['build_seconds']:.0f} s on "
        f"{cache.header['device']})")
    return cache


def restore(run, checkpoint):
    run.student.load_state_dict(checkpoint["student"])
    run.aux.load_state_dict(checkpoint["aux"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    for group in run.optimizer.param_groups:  # load_state_dict replaced the device lr tensor with the saved value
        group["lr"] = run.lr
    run.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"], run.device)
    run.start_epoch, run.best, run.history = checkpoint["epoch"], checkpoint["best"], checkpoint["history"]
    run.teacher_eval = checkpoint["teacher_eval"]


def setup_data_feed(run):
    """How the steps get their batches: GPU-resident epoch buffers (and the step, graphed on CUDA), or DataLoaders."""
    cfg, data, device, rank = run.cfg, run.data, run.device, _rank()
    run.local_batch = cfg.batch_size // run.world_size
    if data.train_x is None:
        run.sampler = torch.utils.data.distributed.DistributedSampler(
            data.train_set, num_replicas=run.world_size, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
        run.loader = image_loader(data.train_set, run.local_batch, cfg.workers, device, run.sampler, drop_last=True)
        run.steps_per_epoch = len(run.loader)
        return
    n_train = len(data.train_x)
    run.steps_per_epoch = n_train // cfg.batch_size
    n_used = run.steps_per_epoch * cfg.batch_size
    width = run.cache.feature_dim + run.cache.num_classes if run.cache is not None else 0
    run.buffers = EpochBuffers(
        images=torch.empty(n_used, *data.train_x.shape[2:], data.train_x.shape[1], dtype=torch.uint8, device=device),
        labels=torch.empty(n_used, dtype=torch.long, device=device),
        teacher=torch.empty(n_used, width, dtype=torch.bfloat16, device=device) if run.cache is not None else None,
        step=torch.zeros((), dtype=torch.long, device=device),
        offsets=rank * run.local_batch + torch.arange(run.local_batch, device=device))
    run.planner = EpochPlanner(cfg.seed, n_train, n_used, run.cache, cfg.epochs)
    run.step = (CUDAGraphStep(lambda: resident_step(run)) if cfg.graph == "on" else lambda: resident_step(run))


def setup_run(cfg):
    """Everything a run needs, from the resolved config to the first step: data, teacher (and its cache),
    student, projectors, optimizer, the state of an interrupted run, the data feed."""
    cfg, notes = resolve_config(cfg)
    device = torch.device(cfg.device)
    rank, world = init_distributed(device)
    setup_torch(cfg)
    checkpoint = checkpoint_to_resume(cfg)
    if cfg.method != "ce" and not cfg.teacher_weights:
        require_teacher_file(cfg.teacher, cfg.teacher_ckpt)  # before the data, which can take a while to read
    log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    for note in notes:
        log("note: " + note)
    if world > 1 or cfg.dataset == "imagenet":
        log(f"processes: {world} x batch {cfg.batch_size // world} = global batch {cfg.batch_size}; "
            f"lr {cfg.lr} as given (never rescaled by batch size)")

    data = load_data(cfg, device)
    n_train = len(data.train_x) if data.train_x is not None else len(data.train_set)
    if n_train < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training images")
    memory_format, amp_dtype, autocast = compute_settings(cfg, device)
    teacher = setup_teacher(cfg, data, device, memory_format, amp_dtype)
    torch.manual_seed(cfg.seed)  # here, after the teacher: the same seed gives every method the same initial student
    student = MODELS[cfg.student](num_classes=data.num_classes)
    if classifier_of(student).out_features != data.num_classes:
        raise UserError(f"{cfg.student} has {classifier_of(student).out_features} outputs for {data.num_classes} classes")
    if cfg.sync_bn and world > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    student.to(device, memory_format=memory_format)
    aux = build_aux(cfg, classifier_of(student).in_features,
                    classifier_of(teacher).in_features if teacher is not None else 0).to(device)
    lr = torch.tensor(cfg.lr, device=device)
    optimizer = torch.optim.SGD([*student.parameters(), *aux.parameters()], lr=lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    distiller = Distiller(cfg, student, aux, autocast)
    run = Run(cfg=cfg, device=device, world_size=world, data=data, student=student, aux=aux, distiller=distiller,
              teacher=teacher, teacher_forward=teacher, teacher_taps=None, optimizer=optimizer,
              scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16), lr=lr, autocast=autocast,
              memory_format=memory_format, loss_sum=torch.zeros((), device=device),
              correct=torch.zeros((), dtype=torch.long, device=device))
    if data.test_x is None:
        run.val_loader = val_loader_for(data, cfg.eval_batch_size, cfg.workers, device)
    if checkpoint is not None:
        restore(run, checkpoint)
        log(f"resuming {cfg.run_dir} after epoch {run.start_epoch}")
    elif cfg.resume:
        log(f"note: nothing to resume in {cfg.run_dir}; starting fresh")

    if teacher is not None:
        setup_teacher_side(run, amp_dtype)
    if world > 1:
        run.distiller = distributed(distiller, device)
    if cfg.compile:
        run.distiller = torch.compile(run.distiller)
    setup_data_feed(run)
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
    student.train()
    aux.train()
    return run


def distributed(module, device):
    """DistributedDataParallel around `module`. Buffers are averaged once per epoch (average_buffers) instead of
    broadcast from process 0 at every forward: CRD-lite's queues are the same everywhere and would move megabytes
    per step for nothing. (torch 2.14 renamed broadcast_buffers to forward_sync_buffers.)"""
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


def epoch_steps(run, epoch):
    """Runs the epoch's training steps, yielding after each."""
    if run.buffers is not None:
        load_epoch(run, run.planner.plan(epoch))
        for _ in range(run.steps_per_epoch):
            run.step()
            yield
    else:
        run.sampler.set_epoch(epoch)
        for images, labels in run.loader:
            train_step(run, images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True))
            yield


def train_epoch(run, epoch):
    """One pass over the training set. Returns its mean loss, accuracy (%), and images/s."""
    cfg = run.cfg
    start = last_report = time.time()
    run.lr.fill_(lr_at(cfg, epoch))
    run.loss_sum.zero_()
    run.correct.zero_()
    steps = run.steps_per_epoch
    for i, _ in enumerate(epoch_steps(run, epoch), 1):
        if cfg.progress_seconds and time.time() - last_report >= cfg.progress_seconds and i < steps:
            last_report = time.time()
            log_progress(run, epoch, i, start)
    sums = torch.stack([run.loss_sum.float(), run.correct.float()])
    if run.world_size > 1:
        dist.all_reduce(sums)
    loss_sum, correct = sums.tolist()  # the epoch's one host sync for training metrics
    train_loss = loss_sum / (steps * run.world_size)
    if not math.isfinite(train_loss):
        raise UserError(f"the training loss became {train_loss} in epoch {epoch + 1}; lower --lr or use --amp bf16")
    if run.world_size > 1:
        average_buffers(run.student)
    seconds = time.time() - start
    return {"loss": train_loss, "acc": 100 * correct / (steps * cfg.batch_size),
            "images_per_s": steps * cfg.batch_size / seconds}


def log_progress(run, epoch, step, start):
    """A line within a long epoch: step, images/s, loss so far, and when the epoch and the run should end."""
    cfg, steps = run.cfg, run.steps_per_epoch
    elapsed = time.time() - start
    loss = run.loss_sum.item() / step  # a host sync, once per progress line; this process's share of the batches
    per_step = elapsed / step
    epoch_left = per_step * (steps - step)
    log(f"  epoch {epoch + 1} step {step}/{steps}  loss {loss:.4f}  {step * cfg.batch_size / elapsed:,.0f} img/s  "
        f"epoch eta {_duration(epoch_left)}  run eta {_duration(epoch_left + per_step * steps * (cfg.epochs - epoch - 1))}")


def average_buffers(model):
    """BatchNorm running statistics (every floating buffer) averaged over the processes, so that all of them
    evaluate and save the same model."""
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= _world_size()


def test_batches(data, device, batch_size, val_loader=None):
    """(uint8 images, labels) of this process's share of the test/validation set, on the device: a slice of the
    resident test set, or the batches of a DataLoader over this process's shard of ImageNet's val/."""
    if data.test_x is None:
        for images, labels in val_loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        return
    n, rank, world = len(data.test_x), _rank(), _world_size()
    lo, hi = n * rank // world, n * (rank + 1) // world
    for i in range(lo, hi, batch_size):
        yield data.test_x[i:min(i + batch_size, hi)], data.test_y[i:min(i + batch_size, hi)]


def val_loader_for(data, batch_size, workers, device):
    """ImageNet: a DataLoader over this process's shard of val/ (every world_size-th image, none twice)."""
    shard = torch.utils.data.Subset(data.val_set, range(_rank(), len(data.val_set), _world_size()))
    return image_loader(shard, batch_size, workers, device)


@torch.no_grad()
def evaluate(model, batches, num_classes, mean, std, memory_format):
    """Top-1 and top-5 accuracy (%) and the between-class cosine of the penultimate features, in float32.
    Under torchrun each process evaluates its share and the counts are summed over processes, so the result
    equals one process evaluating the whole set."""
    was_training = model.training
    model.eval()
    taps = Taps(model)
    device = mean.device
    hits = torch.zeros(2, device=device, dtype=torch.long)  # top-1, top-5
    class_sums = torch.zeros(num_classes, classifier_of(model).in_features, device=device)
    n = 0
    try:
        for images, labels in batches:
            x = normalize(images, mean, std).contiguous(memory_format=memory_format)
            logits = model(x).float()
            best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits += torch.stack([(best5[:, 0] == labels).sum(), (best5 == labels[:, None]).any(1).sum()])
            class_sums.index_add_(0, labels, taps.feature.float())
            n += len(labels)
    finally:
        taps.remove()
        model.train(was_training)
    counts = torch.cat([hits, torch.tensor([n], device=device)])
    if _world_size() > 1:
        dist.all_reduce(counts)
        dist.all_reduce(class_sums)
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "between_class_cosine": between_class_cosine(class_sums),
            "images": int(n)}


def test_batches_of(run):
    return test_batches(run.data, run.device, run.cfg.eval_batch_size, run.val_loader)


def record_epoch(run, epoch, stats, result, seconds):
    cfg = run.cfg
    if result["top1"] > run.best["top1"]:
        run.best = {"top1": result["top1"], "top5": result["top5"], "epoch": epoch + 1}
    run.history.append({"epoch": epoch + 1, "lr": lr_at(cfg, epoch), "train_loss": round(stats["loss"], 6),
                        "train_acc": round(stats["acc"], 4), "test_top1": round(result["top1"], 4),
                        "test_top5": round(result["top5"], 4),
                        "between_class_cosine": round(result["between_class_cosine"], 6),
                        "seconds": round(seconds, 3), "images_per_s": round(stats["images_per_s"], 1)})
    if _rank() == 0:
        save_log_csv(run.history, os.path.join(cfg.run_dir, "log.csv"))
    h = run.history[-1]
    done_here = len(run.history) - run.start_epoch
    eta = sum(e["seconds"] for e in run.history[run.start_epoch:]) / done_here * (cfg.epochs - epoch - 1)
    log(f"epoch {epoch + 1}/{cfg.epochs}  lr {h['lr']:.4g}  loss {h['train_loss']:.4f}  train {h['train_acc']:.2f}%  "
        f"test {h['test_top1']:.2f}% (best {run.best['top1']:.2f}%)  {h['images_per_s']:,.0f} img/s  "
        f"eta {_duration(eta)}")


def save_checkpoint(run, epoch):
    """last.pt: everything to continue exactly after `epoch` (written by one process)."""
    if _rank() != 0:
        return
    optimizer = run.optimizer.state_dict()
    for group in optimizer["param_groups"]:
        group["lr"] = float(group["lr"])  # a plain number in the file; restore() points it back at the device tensor
    save_torch({"config": dataclasses.asdict(run.cfg), "epoch": epoch, "student": run.student.state_dict(),
                "aux": run.aux.state_dict(), "optimizer": optimizer, "scaler": run.scaler.state_dict(),
                "rng": rng_states(run.device), "best": run.best, "history": run.history,
                "teacher_eval": run.teacher_eval}, os.path.join(run.cfg.run_dir, "last.pt"))


def check_processes_agree(run):
    """Under torchrun, every process must end with the same weights; a checksum per process says whether they do."""
    checksum = torch.stack([t.double().sum() for t in run.student.state_dict().values() if t.is_floating_point()]).sum()
    sums = [torch.zeros_like(checksum) for _ in range(run.world_size)]
    dist.all_gather(sums, checksum)
    if any(s.item() != sums[0].item() for s in sums):
        raise RuntimeError(f"the {run.world_size} processes ended with different weights: {[s.item() for s in sums]}")
    log(f"the weights are the same in all {run.world_size} processes (checksum {sums[0].item():.6f})")


def finish_run(run):
    """model.pt and metrics.json; returns the metrics."""
    cfg, history, best = run.cfg, run.history, run.best
    if run.world_size > 1:
        check_processes_agree(run)
    last = history[-1]
    images_per_epoch = run.steps_per_epoch * cfg.batch_size
    train_seconds = sum(images_per_epoch / h["images_per_s"] for h in history)
    wall_seconds = sum(h["seconds"] for h in history)
    metrics = {
        "config": dataclasses.asdict(cfg), "seed": cfg.seed,
        "last_top1": last["test_top1"], "last_top5": last["test_top5"],
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "between_class_cosine": last["between_class_cosine"],
        "teacher_top1": run.teacher_eval["top1"] if run.teacher_eval else None,
        "teacher_top5": run.teacher_eval["top5"] if run.teacher_eval else None,
        "epochs": cfg.epochs, "wall_seconds": round(wall_seconds, 1),
        "images_per_s": round(images_per_epoch * len(history) / train_seconds, 1),
        "world_size": run.world_size, "device": device_name(run.device), "torch": torch.__version__,
        "code": code_version(), "history": history,
    }
    if _rank() == 0:
        save_torch(run.student.state_dict(), os.path.join(cfg.run_dir, "model.pt"))
        save_json(metrics, os.path.join(cfg.run_dir, "metrics.json"))
    log(f"done: {cfg.student} ({cfg.method}) last top-1 {last['test_top1']:.2f}% top-5 {last['test_top5']:.2f}%, "
        f"best top-1 {best['top1']:.2f}% (epoch {best['epoch']}), {_duration(wall_seconds)}, "
        f"{metrics['images_per_s']:,.0f} img/s -> {os.path.join(cfg.run_dir, 'model.pt')}")
    return metrics


def train(cfg):
    """Run one training (distillation, or the student alone for --method ce) and write its run directory.
    Returns the metrics dict that is also saved as metrics.json."""
    run = setup_run(cfg)
    try:
        last_saved = time.time()
        for epoch in range(run.start_epoch, run.cfg.epochs):
            start = time.time()
            stats = train_epoch(run, epoch)
            result = evaluate(run.student, test_batches_of(run), run.data.num_classes, run.data.mean,
                              run.data.std, run.memory_format)
            record_epoch(run, epoch, stats, result, time.time() - start)
            if epoch + 1 == run.cfg.epochs or time.time() - last_saved >= run.cfg.checkpoint_seconds:
                save_checkpoint(run, epoch + 1)
                last_saved = time.time()
        return finish_run(run)
    finally:
        if run.planner is not None:
            run.planner.close()


# ---------------------------------------------------------------------------------------------------------
# Other entry points: evaluate a checkpoint alone, build a teacher cache, fetch torchvision's weights,
# download CIFAR-100. Each reads its options from a dataclass, as training does.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    arch: str = ""  # the checkpoint's architecture (a key of models.MODELS)
    ckpt: str = ""  # our model.pt, a RepDistiller/mdistiller checkpoint, a torchvision weight file or any state_dict
    dataset: str = "cifar100"  # cifar100 (its test set) | imagenet (val/) | synthetic
    data_dir: str = "data"  # as for training
    download: bool = False  # download CIFAR-100 with torchvision if it is not in --data-dir
    synthetic_size: int = 2048  # as for training
    synthetic_classes: int = 10  # as for training
    image_size: int = 224  # imagenet: the evaluation crop, after resizing to 256/224 of it
    workers: int = None  # imagenet: loader processes; default: this machine's CPUs over its GPUs in use
    eval_batch_size: int = None  # per process: 1000 on CIFAR-100, 250 on ImageNet
    device: str = "auto"  # auto | cpu | cuda | cuda:N; under torchrun each process takes cuda:LOCAL_RANK
    out: str = ""  # the result as JSON; default: the checkpoint's path with the suffix .eval.json


def evaluate_checkpoint(ec):
    """Top-1/top-5 of a checkpoint on the test (CIFAR) or validation (ImageNet) set, in float32; under torchrun
    each process evaluates a shard. Prints the result and writes it as JSON."""
    if not ec.arch or not ec.ckpt:
        raise UserError("eval needs --arch and --ckpt, e.g. eval --arch vgg8 --ckpt runs/.../model.pt")
    if ec.dataset not in PROTOCOLS:
        raise UserError(f"unknown --dataset {ec.dataset!r}; choose cifar100, imagenet or synthetic")
    check_arch(ec.arch, "arch", ec.dataset)
    if not os.path.isfile(ec.ckpt):
        raise UserError(f"no checkpoint at {ec.ckpt}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(ec.device, world)
    init_distributed(device)
    batch = ec.eval_batch_size or PROTOCOLS[ec.dataset]["eval_batch_size"]
    workers = ec.workers if ec.workers is not None else default_workers()
    use_tf32()
    data = load_data(ec, device)
    state = read_state_dict(ec.ckpt)
    model = frozen_model(ec.arch, state, data.num_classes, ec.ckpt).to(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model.to(memory_format=memory_format)
    val_loader = val_loader_for(data, batch, workers, device) if data.test_x is None else None
    result = evaluate(model, test_batches(data, device, batch, val_loader), data.num_classes, data.mean, data.std,
                      memory_format)
    out = ec.out or os.path.splitext(ec.ckpt)[0] + ".eval.json"
    record = {"arch": ec.arch, "ckpt": ec.ckpt, "dataset": ec.dataset, "top1": result["top1"], "top5": result["top5"],
              "images": result["images"], "between_class_cosine": result["between_class_cosine"],
              "world_size": world, "device": device_name(device), "torch": torch.__version__}
    if _rank() == 0:
        save_json(record, out)
    log(f"{ec.arch} from {ec.ckpt} on {ec.dataset}: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
        f"({result['images']} images) -> {out}")
    return record


def build_cache_command(cfg):
    """`projkd.py cache`: the teacher cache of --teacher-ckpt for --dataset, built unless an identical one exists;
    its time stamp is renewed either way, so that make sees it as newer than the checkpoint."""
    cfg, notes = resolve_config(cfg, command="cache")
    for note in notes:
        log("note: " + note)
    device = torch.device(cfg.device)
    setup_torch(cfg)
    data = load_data(cfg, device)
    memory_format, amp_dtype, autocast = compute_settings(cfg, device)
    teacher = teacher_for_speed(load_teacher(cfg.teacher, cfg.teacher_ckpt, data.num_classes).to(device),
                                amp_dtype, memory_format)
    cache = ensure_teacher_cache(cfg.teacher_cache_file, cache_identity(cfg, data), teacher, data, autocast,
                                 memory_format, cfg.eval_batch_size)
    os.utime(cache.path)
    log(f"{cache.path}: the teacher cache of {cfg.teacher_ckpt}, up to date")


@dataclass
class WeightsConfig:
    arch: str = ""  # an architecture torchvision publishes ImageNet weights of: resnet18 | resnet34 | resnet50 | densenet201
    weights: str = "IMAGENET1K_V1"  # which of torchvision's weights (IMAGENET1K_V1: the paper's teachers)
    out: str = ""  # where the plain state_dict goes; default checkpoints/imagenet/<arch>.pt


def fetch_weights(wc):
    """`projkd.py fetch-weights`: torchvision's ImageNet weights of --arch as a plain state_dict file."""
    if wc.arch not in TORCHVISION_WEIGHTS:
        raise UserError(f"fetch-weights takes --arch {' | '.join(TORCHVISION_WEIGHTS)}, not {wc.arch!r}")
    out = wc.out or os.path.join("checkpoints", "imagenet", f"{wc.arch}.pt")
    state = torchvision_state_dict(wc.arch, wc.weights, out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_torch(state, out)
    log(f"torchvision's {wc.arch} {wc.weights} -> {out}")


def download_command(cfg):
    """`projkd.py download`: CIFAR-100 into --data-dir (torchvision's download of the official archive)."""
    if cfg.dataset == "imagenet":
        raise UserError(f"ImageNet cannot be downloaded for you: get ILSVRC2012's train and val images from "
                        f"image-net.org and arrange them as {cfg.data_dir}/train/<class>/ and {cfg.data_dir}/val/<class>/ "
                        f"(README: ImageNet)")
    if cfg.dataset == "cifar100":
        load_cifar100(cfg.data_dir, download=True)
        log(f"CIFAR-100 is in {os.path.join(cfg.data_dir, 'cifar-100-python')}")


# ---------------------------------------------------------------------------------------------------------
# Benchmark: images/s of the classic KD loop and of ours (eager and CUDA graph, live teacher and cached),
# same process, models and batch, after warm-up; and a check that the graphed step equals the eager one.
# ---------------------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, for model-FLOPs utilisation; the first
# name contained in the GPU's name applies.
BF16_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
                   "A100": 312e12}


@dataclass
class BenchConfig:
    pairs: str = "vgg13:vgg8 resnet32x4:resnet8x4"  # teacher:student pairs, each timed with PEFD; on the CPU: resnet20:resnet8
    batch_size: int = 64  # the paper's CIFAR-100 batch
    steps: int = None  # timed steps of each variant of our loop: 400 on CUDA, 3 on the CPU
    classic_steps: int = None  # timed steps of the classic loop: 150 on CUDA, 3 on the CPU
    warmup: int = None  # untimed steps before each timing: 30 on CUDA, 1 on the CPU
    workers: int = None  # DataLoader processes of the classic loop: min(8, CPUs), RepDistiller's default being 8
    check_steps: int = 200  # the graph-against-eager check: steps compared (CUDA only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "results"  # bench.json and bench.md go here


class _PILImages(torch.utils.data.Dataset):
    """uint8 CHW images as PIL images through a torchvision transform: how KD codebases read CIFAR."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def classic_loop_images_per_s(teacher_arch, student_arch, images, labels, bc, device):
    """PEFD trained as RepDistiller-style code does it: a DataLoader with worker processes doing per-sample PIL
    RandomCrop(32, padding=4) + flip + ToTensor + Normalize, float32 models, the default SGD, a blocking copy
    of each batch and .item() of the loss every step."""
    import torchvision.transforms as T

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    loader = torch.utils.data.DataLoader(_PILImages(images, labels, transform), batch_size=bc.batch_size,
                                         shuffle=True, num_workers=bc.workers, pin_memory=device.type == "cuda",
                                         drop_last=True)
    teacher = MODELS[teacher_arch](num_classes=100).to(device).eval()
    student = MODELS[student_arch](num_classes=100).to(device).train()
    projectors = ProjectorEnsemble(classifier_of(student).in_features, classifier_of(teacher).in_features).to(device)
    optimizer = torch.optim.SGD([*student.parameters(), *projectors.parameters()], lr=0.05, momentum=0.9,
                                weight_decay=5e-4)
    loss_total, start = 0.0, None
    for i, (x, y) in enumerate(loader):
        if i == bc.warmup:
            synchronize(device)
            start = time.time()
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            teacher_feature, _ = features_and_logits(teacher, x)
        student_feature, logits = features_and_logits(student, x)
        loss = F.cross_entropy(logits, y) + 25 * mda_loss(projectors(student_feature), teacher_feature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_total += loss.item()  # the per-step AverageMeter update: a host sync every step
        if i + 1 == bc.warmup + bc.classic_steps:
            break
    synchronize(device)
    return bc.classic_steps * bc.batch_size / (time.time() - start)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_run(teacher_arch, student_arch, teacher_ckpt, bc, device, folder, graph, cached, deterministic=False):
    """A PEFD Run of our loop on generated data (one epoch of warm-up + timed steps), built by setup_run like a
    real one. cached: the epoch's teacher rows are computed once up front, the per-step work of --teacher-cache
    (a real cache file would need every view of every image)."""
    steps = bc.warmup + max(bc.steps, bc.check_steps if deterministic else 0)
    cfg = Config(teacher=teacher_arch, student=student_arch, teacher_ckpt=teacher_ckpt, dataset="synthetic",
                 synthetic_size=steps * bc.batch_size, synthetic_classes=100, batch_size=bc.batch_size, epochs=1,
                 device=str(device), graph="on" if graph else "off", teacher_cache="off", progress_seconds=0,
                 deterministic=deterministic, run_dir=os.path.join(folder, f"run-{time.time_ns()}"))
    with contextlib.redirect_stdout(io.StringIO()):  # the bench prints its own table, not 8 run set-ups
        run = setup_run(cfg)
    run.lr.fill_(lr_at(run.cfg, 0))
    load_epoch(run, run.planner.plan(0))
    if cached:
        run.buffers.teacher = live_teacher_rows(run)
    return run


@torch.no_grad()
def live_teacher_rows(run):
    """The teacher's feature and logits for every image of the loaded epoch, as the cache would supply them."""
    rows = []
    for i in range(0, len(run.buffers.images), 1000):
        x = normalize(run.buffers.images[i:i + 1000].permute(0, 3, 1, 2), run.data.mean, run.data.std)
        teacher = teacher_outputs(run, x.contiguous(memory_format=run.memory_format), None)
        rows.append(torch.cat([teacher.feature, teacher.logits], dim=1).to(torch.bfloat16))
    return torch.cat(rows)


def our_loop_images_per_s(run, bc):
    for _ in range(bc.warmup):
        run.step()
    synchronize(run.device)
    start = time.time()
    for _ in range(bc.steps):
        run.step()
    run.loss_sum.item()  # waits for the last step
    return bc.steps * bc.batch_size / (time.time() - start)


def training_flops_per_image(teacher_arch, student_arch, with_teacher, batch=2):
    """FLOPs of one PEFD training step per image (student forward and backward, projectors, and the teacher's
    forward unless cached), counted by torch.utils.flop_counter on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    teacher = MODELS[teacher_arch](num_classes=100).eval()
    student = MODELS[student_arch](num_classes=100)
    projectors = ProjectorEnsemble(classifier_of(student).in_features, classifier_of(teacher).in_features)
    x = torch.randn(batch, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher_feature = features_and_logits(teacher, x)[0] if with_teacher else torch.randn(batch, 1)
        feature, logits = features_and_logits(student, x)
        loss = logits.logsumexp(1).mean() + projectors(feature).sum() + 0 * teacher_feature.sum()
        loss.backward()
    return counter.get_total_flops() / batch


def graph_check(teacher_arch, student_arch, teacher_ckpt, bc, device, folder):
    """From the same initial state and data, bc.check_steps steps eagerly and as a CUDA graph, both in
    deterministic mode: the per-step losses and the final weights must agree to bf16 tolerance."""
    losses, weights = {}, {}
    for graph in (False, True):
        run = bench_run(teacher_arch, student_arch, teacher_ckpt, bc, device, folder, graph, cached=False,
                        deterministic=True)
        losses[graph] = []
        for _ in range(bc.check_steps):
            run.loss_sum.zero_()
            run.step()
            losses[graph].append(run.loss_sum.item())
        weights[graph] = {k: v.double().cpu() for k, v in run.student.state_dict().items() if v.is_floating_point()}
        failure = getattr(run.step, "failure", None) if graph else None
        run.planner.close()
    eager, graphed = np.array(losses[False]), np.array(losses[True])
    loss_rel = float(np.max(np.abs(eager - graphed) / np.maximum(np.abs(eager), 1e-12)))
    weight_rel = max(float((weights[False][k] - weights[True][k]).abs().max() / weights[False][k].abs().max().clamp_min(1e-12))
                     for k in weights[False])
    tolerance = 1e-2  # bf16 has 8 significant bits
    return {"pair": f"{teacher_arch}:{student_arch}", "steps": bc.check_steps, "deterministic": True,
            "max_loss_rel_diff": loss_rel, "max_weight_rel_diff": weight_rel, "tolerance": tolerance,
            "bitwise_equal_losses": bool(np.array_equal(eager, graphed)), "capture_failure": failure,
            "passed": failure is None and loss_rel <= tolerance and weight_rel <= tolerance}


def bench_pair(teacher_arch, student_arch, bc, device, folder):
    teacher_ckpt = os.path.join(folder, f"{teacher_arch}.pt")
    torch.save(MODELS[teacher_arch](num_classes=100).state_dict(), teacher_ckpt)  # random weights: speed is the same
    n = (bc.warmup + bc.classic_steps) * bc.batch_size
    images, labels, _, _ = make_synthetic(n, 100)
    flops = {cached: training_flops_per_image(teacher_arch, student_arch, with_teacher=not cached)
             for cached in (False, True)}
    peak = bf16_peak_flops(device)
    rows = [{"loop": "classic (DataLoader + PIL, fp32, .item() per step)", "cached": False,
             "images_per_s": classic_loop_images_per_s(teacher_arch, student_arch, images, labels, bc, device)}]
    for graph in (False, True):
        for cached in (False, True):
            name = f"ours, {'CUDA graph' if graph else 'eager'}, teacher {'cached' if cached else 'live'}"
            if graph and device.type != "cuda":
                rows.append({"loop": name, "cached": cached, "images_per_s": None, "skipped": "needs CUDA"})
                continue
            run = bench_run(teacher_arch, student_arch, teacher_ckpt, bc, device, folder, graph, cached)
            speed = our_loop_images_per_s(run, bc)
            failure = getattr(run.step, "failure", None)
            rows.append({"loop": name, "cached": cached, "images_per_s": None if failure else speed,
                         **({"skipped": f"capture failed: {failure}"} if failure else {})})
            run.planner.close()
    classic = rows[0]["images_per_s"]
    for row in rows:
        speed = row["images_per_s"]
        row["vs_classic"] = speed / classic if speed else None
        row["flops_per_image"] = flops[row["cached"]]
        row["mfu"] = speed * flops[row["cached"]] / peak if speed and peak else None
    return {"teacher": teacher_arch, "student": student_arch, "rows": rows}


def bf16_peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_FLOPS.items() if key in name), None)


def run_bench(bc):
    """`projkd.py bench`: writes <out_dir>/bench.json and bench.md; a tiny version on the CPU."""
    device = resolve_device(bc.device, 1)
    cuda = device.type == "cuda"
    defaults = {"steps": 400 if cuda else 3, "classic_steps": 150 if cuda else 3, "warmup": 30 if cuda else 1,
                "workers": min(8, os.cpu_count() or 1), "pairs": bc.pairs if cuda else "resnet20:resnet8"}
    if bc.pairs != BenchConfig.pairs:
        defaults["pairs"] = bc.pairs
    bc = dataclasses.replace(bc, **{k: v for k, v in defaults.items() if getattr(bc, k) is None or k == "pairs"})
    pairs = [p.split(":") for p in bc.pairs.split()]
    for teacher_arch, student_arch in pairs:
        check_arch(teacher_arch, "teacher", "cifar100")
        check_arch(student_arch, "student", "cifar100")
    if bc.steps < 1 or bc.classic_steps < 1 or bc.warmup < (4 if cuda else 0):
        raise UserError("bench needs --steps and --classic-steps >= 1, and on CUDA --warmup >= 4 (the graph is "
                        "captured after 3 eager steps)")
    report = {"device": device_name(device), "torch": torch.__version__, "batch_size": bc.batch_size,
              "steps": bc.steps, "classic_steps": bc.classic_steps, "warmup": bc.warmup, "workers": bc.workers,
              "bf16_peak_flops": bf16_peak_flops(device), "code": code_version(), "pairs": []}
    with tempfile.TemporaryDirectory() as folder:
        for teacher_arch, student_arch in pairs:
            report["pairs"].append(bench_pair(teacher_arch, student_arch, bc, device, folder))
        if cuda:
            teacher_arch, student_arch = pairs[0]
            report["graph_check"] = graph_check(teacher_arch, student_arch, os.path.join(folder, f"{teacher_arch}.pt"),
                                                bc, device, folder)
    os.makedirs(bc.out_dir, exist_ok=True)
    save_json(report, os.path.join(bc.out_dir, "bench.json"))
    save_text(bench_markdown(report), os.path.join(bc.out_dir, "bench.md"))
    log(bench_markdown(report))
    if "graph_check" in report and not report["graph_check"]["passed"]:
        raise UserError(f"the CUDA-graph step disagrees with the eager step beyond bf16 tolerance: "
                        f"{report['graph_check']}")
    return report


def bench_markdown(report):
    peak = report["bf16_peak_flops"]
    mfu_note = (f" MFU: model FLOPs (torch.utils.flop_counter) x images/s over the GPU's dense bf16 peak "
                f"({peak / 1e12:.0f} TFLOP/s)." if peak else "")
    lines = [f"# projkd bench: {report['device']}, torch {report['torch']}", "",
             f"PEFD, batch {report['batch_size']}, generated CIFAR-shaped data, random weights; images/s over "
             f"{report['steps']} steps of our loop and {report['classic_steps']} of the classic one "
             f"({report['workers']} loader workers), after {report['warmup']} warm-up steps; all in one "
             f"process. 'teacher cached': the epoch's teacher rows are computed once before timing, as a cache file "
             f"supplies them each epoch; the step is the same.{mfu_note}", ""]
    for pair in report["pairs"]:
        lines += [f"## {pair['teacher']} → {pair['student']}", "",
                  "| loop | images/s | vs classic | GFLOPs/image | MFU |", "|---|---|---|---|---|"]
        for row in pair["rows"]:
            if row["images_per_s"] is None:
                lines.append(f"| {row['loop']} | skipped: {row['skipped']} | | | |")
                continue
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            lines.append(f"| {row['loop']} | {row['images_per_s']:,.0f} | {row['vs_classic']:.2f}x | "
                         f"{row['flops_per_image'] / 1e9:.3f} | {mfu} |")
        lines.append("")
    check = report.get("graph_check")
    if check:
        lines += ["## CUDA graph = eager", "",
                  f"{check['pair']}, {check['steps']} steps from the same state, deterministic mode: largest relative "
                  f"difference of a step's loss {check['max_loss_rel_diff']:.2e}, of a final weight "
                  f"{check['max_weight_rel_diff']:.2e} (tolerance {check['tolerance']}): "
                  f"{'passed' if check['passed'] else 'FAILED'}"
                  f"{' (the capture failed: ' + check['capture_failure'] + ')' if check['capture_failure'] else ''}"
                  f"{' (bitwise equal losses)' if check['bitwise_equal_losses'] else ''}.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

# Subcommands: name -> (options dataclass, what it does, usage). No subcommand: training.
COMMANDS = {
    "eval": (EvalConfig, evaluate_checkpoint, "evaluate a checkpoint alone",
             "python projkd.py eval --arch ARCH --ckpt PATH [--dataset ...]  (or under torchrun)"),
    "cache": (Config, build_cache_command, "build the teacher-output cache of a teacher checkpoint",
              "python projkd.py cache --teacher ARCH [--teacher-ckpt PATH] [--dataset ...] [--teacher-cache-file F]"),
    "bench": (BenchConfig, run_bench, "throughput of the classic KD loop against ours; results/bench.{json,md}",
              "python projkd.py bench [--out-dir results] [--pairs \"vgg13:vgg8 ...\"]"),
    "fetch-weights": (WeightsConfig, fetch_weights, "torchvision's ImageNet weights as a teacher checkpoint",
                      "python projkd.py fetch-weights --arch resnet34 [--out checkpoints/imagenet/resnet34.pt]"),
    "download": (Config, download_command, "download CIFAR-100 into --data-dir (needs internet)",
                 "python projkd.py download [--data-dir data]"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    schema, command, usage = Config, train, "python projkd.py [--option value ...]   (or a subcommand: " + \
        ", ".join(COMMANDS) + "; python projkd.py SUBCOMMAND --help)"
    if argv and argv[0] in COMMANDS:
        schema, command, _, usage = COMMANDS[argv[0]]
        argv = argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(cli_help(schema, __doc__, usage))
        return 0
    try:
        command(parse_args(argv, schema))
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process meets the same error: say it once
            print(f"projkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("projkd: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `projkd.py --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
