"""projkd: Improved Feature Distillation via Projector Ensemble (PEFD), with KD, SP and CRD-lite baselines.

PEFD in one breath: the student's penultimate feature s goes through q independently initialised
projectors g_k(s) = ReLU(W_k s + b_k); their mean f(s) is pulled towards the teacher's penultimate feature t
by the direction-alignment loss MDA = 1 - mean_i cos(f(s_i), t_i), and the student minimises
CE + 25 * MDA. The projectors are thrown away after training, so the deployed student is unchanged.

    python projkd.py --teacher vgg13 --student vgg8                  # PEFD, the paper's CIFAR-100 protocol
    python projkd.py --teacher vgg13 --student vgg8 --method kd      # the same pair with a baseline
    python projkd.py --student vgg13 --method ce                     # train a model alone (teacher pretraining)
    python projkd.py --dataset synthetic --student resnet20 --method ce --epochs 2   # a CPU smoke run
    python projkd.py --help                                          # every option, its default and meaning

Each run writes into its --run-dir: model.pt (the trained student's plain state_dict, strict-loadable into
models.MODELS[arch]), metrics.json (resolved config, accuracies, per-epoch history, timing, versions),
log.csv, and last.pt (everything needed to --resume exactly).

Importing this file runs nothing; its pieces (ProjectorEnsemble, mda_loss, kd_loss, sp_loss, CRDLite,
features_and_logits, load_cifar100) can be copied or called on their own.
"""
import csv
import dataclasses
import difflib
import inspect
import io
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import MODELS

# ---------------------------------------------------------------------------------------------------------
# Config: one dataclass, the paper's CIFAR-100 protocol as defaults. The CLI is generated from it.
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # what to train
    teacher: str = ""  # teacher architecture (a key of models.MODELS); unused by --method ce
    student: str = ""  # student architecture (a key of models.MODELS)
    method: str = "pefd"  # pefd | kd | sp | crd | ce (ce: the student alone, e.g. to pretrain a teacher)
    teacher_ckpt: str = ""  # teacher weights (ours, RepDistiller's or mdistiller's); default checkpoints/<dataset>/<teacher>.pt
    # data
    dataset: str = "cifar100"  # cifar100 | synthetic (small, generated, learnable: for smoke runs and tests)
    data_dir: str = "data"  # folder that holds cifar-100-python/ (the official archive's layout)
    download: bool = False  # download CIFAR-100 with torchvision if it is not in --data-dir
    synthetic_size: int = 2048  # training images of --dataset synthetic; its test set is a quarter of that
    synthetic_classes: int = 10  # classes of --dataset synthetic
    # optimisation: SGD with step decay, as in the paper and RepDistiller
    epochs: int = 240  # training epochs
    batch_size: int = 64  # training batch; the last incomplete batch of an epoch is dropped (static shapes)
    lr: float = 0.0  # learning rate; 0 means the paper's: 0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students
    lr_decay_epochs: str = "150,180,210"  # comma-separated epochs after which lr is multiplied by lr_decay_rate
    lr_decay_rate: float = 0.1  # factor applied at each of lr_decay_epochs
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # on every trained parameter, projectors and CRD embeddings included
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
    # running
    seed: int = 1  # seeds initialisation, data order and augmentation
    deterministic: bool = False  # bit-identical reruns (on CPU; on CUDA as far as cuDNN allows), slower
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    amp: str = "bf16"  # autocast on CUDA: bf16 | fp16 (with gradient scaling) | off; always off on CPU
    compile: bool = False  # torch.compile the student and teacher
    eval_batch_size: int = 1000  # batch size of the test-set evaluation
    run_dir: str = ""  # where the run's files go; default runs/<dataset>/<teacher>-<student>/<method>-seed<seed>
    resume: bool = False  # continue the run in --run-dir from its last.pt (starts fresh if there is none)
    overwrite: bool = False  # start over even if --run-dir already holds a run


METHODS = ("pefd", "kd", "sp", "crd", "ce")
PROJECTOR_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "none": nn.Identity}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # lr 0.01 in the paper and RepDistiller
# Fields that may differ when a run is resumed: they change where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = ("epochs", "device", "amp", "compile", "deterministic", "data_dir", "download", "eval_batch_size",
                     "resume", "overwrite")


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
        kind = "flag" if f.type is bool else f"{f.type.__name__} = {f.default!r}"
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
# Data: CIFAR-100 from the official pickles, a synthetic stand-in, and GPU-side augmentation.
# The uint8 data set lives on the device; crop and flip happen there in batches, no loader workers.
# ---------------------------------------------------------------------------------------------------------

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
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

        try:
            for train in (True, False):
                torchvision.datasets.CIFAR100(root, train=train, download=True)
        except Exception as e:  # offline, a proxy, a full disk: all end the same way for the user
            raise UserError(f"downloading CIFAR-100 into {root} failed ({e}); put a copy of cifar-100-python/ "
                            f"there by hand") from None
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
        log_z = torch.where(torch.isnan(self.log_z[side]), first_log_z, self.log_z[side])
        # log of P / (P + m * P_n) for the positive and of m * P_n / (P + m * P_n) for the negatives, with
        # P = exp(logit) / Z normalised so that m * P_n = m / N cancels N: written with softplus for stability.
        log_ratio = logits - log_z - math.log(queue.shape[0])
        loss = F.softplus(-log_ratio[:, 0]) + F.softplus(log_ratio[:, 1:]).sum(1)
        return loss.mean(), log_z

    def forward(self, student_feature, teacher_feature):
        v_s = F.normalize(self.embed_student(student_feature.float()), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher_feature.float()), dim=1)
        loss_t, log_z_t = self._nce(v_t, v_s.detach(), self.queue_student, 0)
        loss_s, log_z_s = self._nce(v_s, v_t.detach(), self.queue_teacher, 1)
        if self.training:
            with torch.no_grad():
                self.log_z.copy_(torch.stack([log_z_t, log_z_s]))
                slots = (self.queue_next + torch.arange(len(v_s), device=v_s.device)) % self.queue_student.shape[0]
                # Out of place: the old queues are still needed by this step's backward pass.
                self.queue_student = self.queue_student.index_copy(0, slots, v_s.detach())
                self.queue_teacher = self.queue_teacher.index_copy(0, slots, v_t.detach())
                self.queue_next.copy_(slots[-1] + 1)
        return loss_t + loss_s


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
# Train / eval loop
# ---------------------------------------------------------------------------------------------------------


def log(*args):
    print(*args, flush=True)


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


def resolve_config(cfg):
    """Check every option and fill in the defaults that depend on others. Returns (config, notes to print)."""
    notes = []
    if cfg.method not in METHODS:
        raise UserError(f"unknown --method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if not cfg.student:
        raise UserError("--student is required, e.g. --student vgg8 (architectures: " + ", ".join(MODELS) + ")")
    needs_teacher = cfg.method != "ce"
    for role in ("student", "teacher") if needs_teacher else ("student",):
        arch = getattr(cfg, role)
        if not arch:
            raise UserError(f"--method {cfg.method} needs --teacher, e.g. --teacher vgg13 --student vgg8")
        if arch not in MODELS:
            raise UserError(f"unknown architecture {arch!r} for --{role}; choose one of {', '.join(MODELS)}")
    if cfg.dataset not in ("cifar100", "synthetic"):
        raise UserError(f"unknown --dataset {cfg.dataset!r}; choose cifar100 or synthetic")
    if cfg.amp not in AMP_DTYPES:
        raise UserError(f"unknown --amp {cfg.amp!r}; choose bf16, fp16 or off")
    if cfg.proj_act not in PROJECTOR_ACTIVATIONS:
        raise UserError(f"unknown --proj-act {cfg.proj_act!r}; choose relu, gelu or none")
    try:
        milestones = [int(e) for e in cfg.lr_decay_epochs.split(",") if e.strip()]
    except ValueError:
        raise UserError(f"--lr-decay-epochs must be comma-separated integers, got {cfg.lr_decay_epochs!r}") from None
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch_size,
                "proj_depth": cfg.proj_depth, "kd_T": cfg.kd_T, "crd_T": cfg.crd_T, "crd_dim": cfg.crd_dim,
                "crd_negatives": cfg.crd_negatives, "synthetic_size": cfg.synthetic_size}
    non_negative = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "alpha": cfg.alpha,
                    "q": cfg.q, "kd_weight": cfg.kd_weight, "kd_ce_weight": cfg.kd_ce_weight,
                    "sp_weight": cfg.sp_weight, "crd_weight": cfg.crd_weight, "lr_decay_rate": cfg.lr_decay_rate,
                    "seed": cfg.seed}
    for name, v in positive.items():
        if not v > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
    for name, v in non_negative.items():
        if not (v >= 0 and math.isfinite(v)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if cfg.synthetic_classes < 2:
        raise UserError(f"--synthetic-classes must be at least 2, got {cfg.synthetic_classes}")
    if any(m < 0 for m in milestones):
        raise UserError(f"--lr-decay-epochs must be >= 0, got {cfg.lr_decay_epochs!r}")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")

    changes = {}
    if cfg.lr == 0:
        changes["lr"] = 0.01 if cfg.student in LOW_LR_STUDENTS else 0.05
        why = f" (the paper's value for {cfg.student} students)" if cfg.student in LOW_LR_STUDENTS else ""
        notes.append(f"lr {changes['lr']}{why}")
    if cfg.device == "auto":
        changes["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    device = changes.get("device", cfg.device)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} but no CUDA device is visible; use --device cpu")
    if dev.type not in ("cuda", "cpu"):
        raise UserError(f"--device {device} is not supported; use cpu or cuda")
    if dev.type == "cpu" and cfg.amp != "off":
        changes["amp"] = "off"
        notes.append(f"amp off on CPU (--amp {cfg.amp} applies to CUDA)")
    if needs_teacher and not cfg.teacher_ckpt:
        changes["teacher_ckpt"] = os.path.join("checkpoints", cfg.dataset, f"{cfg.teacher}.pt")
    if not needs_teacher:
        if cfg.teacher:
            notes.append(f"--teacher {cfg.teacher} is not used by --method ce")
        changes["teacher"] = ""
    if not cfg.run_dir:
        changes["run_dir"] = run_path(os.path.join("runs", cfg.dataset), cfg.teacher, cfg.student, cfg.method,
                                      cfg.seed, q=cfg.q, proj_depth=cfg.proj_depth, proj_act=cfg.proj_act)
    return dataclasses.replace(cfg, **changes), notes


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
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def load_data(cfg, device):
    """The data set as uint8/int64 tensors on `device`, its class count, and its channel mean and std."""
    if cfg.dataset == "cifar100":
        train_x, train_y, test_x, test_y = load_cifar100(cfg.data_dir, download=cfg.download)
        num_classes, mean, std = 100, CIFAR100_MEAN, CIFAR100_STD
    else:
        train_x, train_y, test_x, test_y = make_synthetic(cfg.synthetic_size, cfg.synthetic_classes)
        num_classes, mean, std = cfg.synthetic_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    if len(train_x) < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {len(train_x)} training images")
    data = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    return {k: v.to(device) for k, v in data.items()}, num_classes, mean, std


def _strip_prefixes(state_dict):
    # DataParallel/DDP save "module.", torch.compile "_orig_mod."; the weights are the same.
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_teacher(arch, path, num_classes):
    """A frozen teacher from our model.pt, a RepDistiller/mdistiller checkpoint ({'model': ...}) or a plain state_dict."""
    if not os.path.isfile(path):
        raise UserError(f"no teacher checkpoint at {path}: pass --teacher-ckpt PATH (RepDistiller's "
                        f"{arch}_vanilla/ckpt_epoch_240.pth works), or train one: python projkd.py --student {arch} "
                        f"--method ce, then copy its model.pt there (make teachers does both)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise UserError(f"cannot read teacher checkpoint {path}: {str(e).splitlines()[0]}") from None
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(torch.is_tensor(v) for v in ckpt.values()):
        raise UserError(f"teacher checkpoint {path} holds no state_dict (expected a dict of tensors or {{'model': ...}})")
    model = MODELS[arch](num_classes=num_classes)
    ours, theirs = model.state_dict(), _strip_prefixes(ckpt)
    # Compared before loading: load_state_dict raises a bare RuntimeError on a shape mismatch, strict or not.
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    misshaped = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or unexpected or misshaped:
        raise UserError(f"teacher checkpoint {path} does not fit {arch} with {num_classes} classes "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors, "
                        f"e.g. {(missing + unexpected + misshaped)[0]}); wrong --teacher or --teacher-ckpt?")
    model.load_state_dict(theirs, strict=True)
    model.eval().requires_grad_(False)
    return model


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


def method_loss(cfg, aux, student_taps, student_logits, teacher_taps, teacher_logits, labels):
    """The training objective of --method, in float32."""
    ce = F.cross_entropy(student_logits.float(), labels)
    if cfg.method == "ce":
        return ce
    if cfg.method == "pefd":
        return ce + cfg.alpha * mda_loss(aux(student_taps.feature.float()), teacher_taps.feature)
    if cfg.method == "kd":
        return cfg.kd_ce_weight * ce + cfg.kd_weight * kd_loss(student_logits, teacher_logits, cfg.kd_T)
    if cfg.method == "sp":
        return ce + cfg.sp_weight * sp_loss(student_taps.map, teacher_taps.map)
    if cfg.method == "crd":
        return ce + cfg.crd_weight * aux(student_taps.feature, teacher_taps.feature)
    raise AssertionError(cfg.method)


def lr_at(cfg, epoch):
    """Step decay: epoch counts from 0, so with milestone 150 the 151st epoch is the first at lr * rate."""
    milestones = [int(e) for e in cfg.lr_decay_epochs.split(",") if e.strip()]
    return cfg.lr * cfg.lr_decay_rate ** sum(epoch >= m for m in milestones)


def epoch_generator(seed, epoch):
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def evaluate(model, images, labels, num_classes, mean, std, batch_size, memory_format):
    """Top-1 and top-5 accuracy (%) and the between-class cosine of the penultimate features, in float32."""
    was_training = model.training
    model.eval()
    taps = Taps(model)
    top1 = torch.zeros((), device=images.device)
    top5 = torch.zeros((), device=images.device)
    class_sums = None
    try:
        for i in range(0, len(images), batch_size):
            x = normalize(images[i:i + batch_size], mean, std).contiguous(memory_format=memory_format)
            y = labels[i:i + batch_size]
            logits = model(x).float()
            best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (best5[:, 0] == y).sum()
            top5 += (best5 == y[:, None]).any(1).sum()
            feature = taps.feature.float()
            if class_sums is None:
                class_sums = torch.zeros(num_classes, feature.shape[1], device=images.device)
            class_sums.index_add_(0, y, feature)
    finally:
        taps.remove()
        model.train(was_training)
    n = len(images)
    return {"top1": 100 * top1.item() / n, "top5": 100 * top5.item() / n,
            "between_class_cosine": between_class_cosine(class_sums)}


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


def check_resumable(saved, cfg, run_dir):
    current = dataclasses.asdict(cfg)
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
             if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diffs:
        raise UserError(f"{run_dir} holds a run with other settings ({'; '.join(diffs)}); "
                        f"use another --run-dir, or --overwrite to start over")


def train(cfg):
    """Run one training (distillation, or the student alone for --method ce) and write its run directory.
    Returns the metrics dict that is also saved as metrics.json."""
    cfg, notes = resolve_config(cfg)
    device = torch.device(cfg.device)
    setup_torch(cfg)
    run_dir = cfg.run_dir
    last_path = os.path.join(run_dir, "last.pt")
    if not cfg.resume and not cfg.overwrite and any(
            os.path.exists(os.path.join(run_dir, f)) for f in ("last.pt", "model.pt", "metrics.json")):
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to start "
                        f"over, or another --run-dir")
    checkpoint = None
    if cfg.resume and os.path.isfile(last_path):
        try:
            checkpoint = torch.load(last_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {last_path} to resume ({str(e).splitlines()[0]}); "
                            f"delete it or use --overwrite") from None
        check_resumable(checkpoint["config"], cfg, run_dir)
        if checkpoint["epoch"] > cfg.epochs:
            raise UserError(f"{run_dir} has trained {checkpoint['epoch']} epochs already, more than --epochs {cfg.epochs}")

    log("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    for note in notes:
        log("note: " + note)

    data, num_classes, mean, std = load_data(cfg, device)
    teacher = None
    if cfg.method != "ce":
        teacher = load_teacher(cfg.teacher, cfg.teacher_ckpt, num_classes).to(device)
    torch.manual_seed(cfg.seed)  # here, after the teacher: the same seed gives every method the same initial student
    student = MODELS[cfg.student](num_classes=num_classes).to(device)
    aux = build_aux(cfg, classifier_of(student).in_features,
                    classifier_of(teacher).in_features if teacher is not None else 0).to(device)
    if classifier_of(student).out_features != num_classes:
        raise UserError(f"{cfg.student} has {classifier_of(student).out_features} outputs for {num_classes} classes")
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    student.to(memory_format=memory_format)
    if teacher is not None:
        teacher.to(memory_format=memory_format)

    params = list(student.parameters()) + list(aux.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                fused=device.type == "cuda")  # fused: no host sync, even with a grad scaler
    amp_dtype = AMP_DTYPES[cfg.amp]  # None on the CPU: resolve_config turned amp off there
    autocast = torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    start_epoch, best, history = 0, {"top1": -1.0, "top5": -1.0, "epoch": 0}, []
    teacher_eval = None
    if checkpoint is not None:
        student.load_state_dict(checkpoint["student"])
        aux.load_state_dict(checkpoint["aux"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_states(checkpoint["rng"], device)
        start_epoch, best, history = checkpoint["epoch"], checkpoint["best"], checkpoint["history"]
        teacher_eval = checkpoint["teacher_eval"]
        log(f"resuming {run_dir} after epoch {start_epoch}")
    elif cfg.resume:
        log(f"note: nothing to resume in {run_dir}; starting fresh")

    eval_args = (data["test_x"], data["test_y"], num_classes, mean, std, cfg.eval_batch_size, memory_format)
    if teacher is not None and teacher_eval is None:
        teacher_eval = evaluate(teacher, *eval_args)
        log(f"teacher {cfg.teacher} from {cfg.teacher_ckpt}: test top-1 {teacher_eval['top1']:.2f}% "
            f"top-5 {teacher_eval['top5']:.2f}%")
        if teacher_eval["top1"] < 2 * 100 / num_classes:
            log(f"warning: the teacher is near chance ({100 / num_classes:.1f}%): is --teacher-ckpt the right file?")
    os.makedirs(run_dir, exist_ok=True)

    student_taps = Taps(student, map_layer_of(student, cfg.student) if cfg.method == "sp" else None)
    teacher_taps = Taps(teacher, map_layer_of(teacher, cfg.teacher) if cfg.method == "sp" else None) \
        if teacher is not None else None
    student_forward = torch.compile(student) if cfg.compile else student
    teacher_forward = (torch.compile(teacher) if cfg.compile else teacher) if teacher is not None else None

    def train_step(images, labels):
        x = normalize(images, mean, std)  # elementwise: keeps the images' channels_last layout
        with autocast:
            logits = student_forward(x)
            teacher_logits = None
            if teacher_forward is not None:
                with torch.no_grad():
                    teacher_logits = teacher_forward(x)
        loss = method_loss(cfg, aux, student_taps, logits, teacher_taps, teacher_logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach(), (logits.argmax(1) == labels).sum()

    n_train = len(data["train_x"])
    steps = n_train // cfg.batch_size
    student.train()
    aux.train()
    run_start = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        lr = lr_at(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The whole epoch is shuffled, cropped and flipped at once, in the memory format the models use: a
        # step then only slices its batch, with no gather and no layout copy of its own.
        g = epoch_generator(cfg.seed, epoch)
        order = torch.randperm(n_train, generator=g).to(device)
        dy, dx, flip = (t.to(device) for t in augmentation_draws(n_train, g))
        epoch_images = crop_flip(data["train_x"][order], dy, dx, flip).contiguous(memory_format=memory_format)
        epoch_labels = data["train_y"][order]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for step in range(steps):
            batch = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            loss, n_correct = train_step(epoch_images[batch], epoch_labels[batch])
            loss_sum += loss
            correct += n_correct
        train_loss = loss_sum.item() / steps  # the epoch's one host sync for training metrics
        if not math.isfinite(train_loss):
            raise UserError(f"the training loss became {train_loss} in epoch {epoch + 1}; lower --lr or use --amp bf16")
        train_seconds = time.time() - t0
        result = evaluate(student, *eval_args)
        if result["top1"] > best["top1"]:
            best = {"top1": result["top1"], "top5": result["top5"], "epoch": epoch + 1}
        seconds = time.time() - t0
        history.append({"epoch": epoch + 1, "lr": lr, "train_loss": round(train_loss, 6),
                        "train_acc": round(100 * correct.item() / (steps * cfg.batch_size), 4),
                        "test_top1": round(result["top1"], 4), "test_top5": round(result["top5"], 4),
                        "between_class_cosine": round(result["between_class_cosine"], 6),
                        "seconds": round(seconds, 3),
                        "images_per_s": round(steps * cfg.batch_size / train_seconds, 1)})
        save_torch({"config": dataclasses.asdict(cfg), "epoch": epoch + 1, "student": student.state_dict(),
                    "aux": aux.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "rng": rng_states(device), "best": best, "history": history, "teacher_eval": teacher_eval},
                   last_path)
        save_log_csv(history, os.path.join(run_dir, "log.csv"))
        h = history[-1]
        done_this_run = epoch + 1 - start_epoch
        eta = (time.time() - run_start) / done_this_run * (cfg.epochs - epoch - 1)
        log(f"epoch {epoch + 1}/{cfg.epochs}  lr {lr:.4g}  loss {h['train_loss']:.4f}  train {h['train_acc']:.2f}%  "
            f"test {h['test_top1']:.2f}% (best {best['top1']:.2f}%)  {h['images_per_s']:,.0f} img/s  "
            f"eta {_duration(eta)}")
    student_taps.remove()
    if teacher_taps is not None:
        teacher_taps.remove()

    last = history[-1]
    images_per_epoch = steps * cfg.batch_size
    train_seconds = sum(images_per_epoch / h["images_per_s"] for h in history)
    wall_seconds = sum(h["seconds"] for h in history)
    metrics = {
        "config": dataclasses.asdict(cfg), "seed": cfg.seed,
        "last_top1": last["test_top1"], "last_top5": last["test_top5"],
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "between_class_cosine": last["between_class_cosine"],
        "teacher_top1": teacher_eval["top1"] if teacher_eval else None,
        "teacher_top5": teacher_eval["top5"] if teacher_eval else None,
        "epochs": cfg.epochs, "wall_seconds": round(wall_seconds, 1),
        "images_per_s": round(images_per_epoch * len(history) / train_seconds, 1),
        "device": device_name(device), "torch": torch.__version__,
        "code": code_version(), "history": history,
    }
    save_torch(student.state_dict(), os.path.join(run_dir, "model.pt"))
    save_json(metrics, os.path.join(run_dir, "metrics.json"))
    log(f"done: {cfg.student} ({cfg.method}) last top-1 {last['test_top1']:.2f}% top-5 {last['test_top5']:.2f}%, "
        f"best top-1 {best['top1']:.2f}% (epoch {best['epoch']}), {_duration(wall_seconds)}, "
        f"{metrics['images_per_s']:,.0f} img/s -> {os.path.join(run_dir, 'model.pt')}")
    return metrics


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(cli_help(Config, __doc__, "python projkd.py [--option value ...]"))
        return 0
    try:
        train(parse_args(argv))
    except UserError as e:
        print(f"projkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("projkd: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
