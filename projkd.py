"""projkd: Improved Feature Distillation via Projector Ensemble (PEFD), with KD, SP and CRD-lite
baselines.

PEFD in one breath: the student's penultimate feature s goes through q independently initialised
projectors g_k(s) = ReLU(W_k s + b_k); their mean f(s) is pulled towards the teacher's penultimate
feature t by the direction-alignment loss MDA = 1 - mean_i cos(f(s_i), t_i), and the student
minimises CE + 25 * MDA. The projectors are thrown away after training, so the deployed student is
unchanged.

    python projkd.py --teacher vgg13 --student vgg8              # PEFD, the paper's CIFAR-100
    python projkd.py --teacher vgg13 --student vgg8 --method kd  # the same pair with a baseline
    python projkd.py --student vgg13 --method ce                 # a model alone (a teacher)
    torchrun --nproc_per_node=8 projkd.py --dataset imagenet --data-dir /data/imagenet \\
        --teacher resnet34 --student resnet18                    # ImageNet, the paper's protocol
    python projkd.py --dataset folder --data-dir DIR --teacher timm:NAME --teacher-ckpt T.pt \\
        --student timm:resnet18                                  # your own (docs/your-own.md)
    python projkd.py eval --arch vgg8 --ckpt runs/cifar100/vgg13-vgg8/pefd-seed1/model.pt
    python projkd.py --help                  # every option; subcommands: eval, cache, bench, ...

A run writes model.pt (the student's plain state_dict), metrics.json (resolved config, accuracies,
history, timing, versions), log.csv and last.pt (all that --resume needs) into its --run-dir.

Sections: 1 the method, 2 the baselines, 3 feature taps and the loss wiring, 4 config and CLI, 5
data, 6 the training loop (the loop itself: train, train_epoch, the step; then setting up a run,
the bookkeeping, logging and files), 7 evaluation, 8 entry points. Importing runs nothing, and
sections 1-3 need only torch: copied alone, this file's ProjectorEnsemble, mda_loss, kd_loss,
sp_loss, CRDLite and features_and_logits work on any classifier whose head is a final nn.Linear.
models.py is imported where it is used (copied alone, an architecture asks for it in one line); the
tools above this file (teacher_cache.py, bench.py, fetch.py) when their subcommand runs, and the
teacher cache when a run opens it.
"""
import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# 1. The method: q projectors from the student's feature width to the teacher's, averaged, and
#    the direction alignment of that mean with the teacher's feature. The whole objective is
#        loss = CE + alpha * mda_loss(projectors(s), t)    (alpha = 25; method_loss, section 3)

PROJECTOR_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "none": nn.Identity}

class ProjectorEnsemble(nn.Module):
    """q projectors from the student's feature width to the teacher's; forward returns their mean.

    Projector k is Linear(d_student, d_teacher) + act, then depth-1 further Linear(d_teacher,
    d_teacher) + act, each layer initialised as nn.Linear does it, the projectors built one after
    the other.
    """
    def __init__(self, d_student, d_teacher, q=3, act="relu", depth=1):
        super().__init__()
        if q < 1 or depth < 1:
            raise ValueError(f"ProjectorEnsemble needs q >= 1 and depth >= 1, got q={q}, "
                             f"depth={depth}")
        if act not in PROJECTOR_ACTIVATIONS:
            choices = ", ".join(PROJECTOR_ACTIVATIONS)
            raise ValueError(f"unknown projector activation {act!r}; choose from {choices}")
        widths = [d_student] + [d_teacher] * depth
        self.projectors = nn.ModuleList()
        for _ in range(q):
            layers = []
            for d_in, d_out in zip(widths, widths[1:]):
                layers += [nn.Linear(d_in, d_out), PROJECTOR_ACTIVATIONS[act]()]
            self.projectors.append(nn.Sequential(*layers))

    def forward(self, s):
        return torch.stack([projector(s) for projector in self.projectors]).mean(0)

def _unit(x, eps=1e-8):
    # Clamping the squared norm (not the norm) keeps the gradient finite at x = 0, where ReLU
    # outputs can be.
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp_min(eps * eps))

def mda_loss(projected_student, teacher_feature):
    """PEFD's modified direction alignment (paper eq. 5): 1 - mean_i cos(f(s_i), t_i), in
    float32."""
    f, t = projected_student.float(), teacher_feature.float()
    return 1 - (_unit(f) * _unit(t)).sum(-1).mean()

# --------------------------------------------------------------------------------------------------
# 2. The baselines, with RepDistiller's settings: KD, SP and CRD-lite. Every loss computes in
#    float32, whatever autocast produced upstream.

def kd_loss(student_logits, teacher_logits, T=4.0):
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * T * T

def sp_loss(student_map, teacher_map):
    """Similarity-preserving KD: row-normalised b x b Gram matrices of the flattened maps, ||G_t -
    G_s||_F^2 / b^2."""
    b = student_map.shape[0]

    def gram(m):
        a = m.float().reshape(b, -1)
        return F.normalize(a @ a.t(), dim=1)
    return (gram(teacher_map) - gram(student_map)).pow(2).sum() / (b * b)

def _gather_rows(x):
    """The rows of x from every process, in rank order (x itself when there is one process)."""
    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)

class CRDLite(nn.Module):
    """CRD's contrastive objective with a fixed-size queue of negatives instead of CRD's memory
    bank.

    As in CRD (Tian et al., 2020): both penultimate features are embedded by a Linear layer to `dim`
    and L2-normalised; each anchor is scored against one positive and `negatives` negatives as
    exp(v.u / T) / Z, Z being estimated once from the first batch; the NCE loss of CRD (eq. 18,
    uniform noise) is applied symmetrically, with the teacher's embedding as anchor against student
    keys and the student's against teacher keys, and the keys carry no gradient.
    How it differs from CRD:
      - negatives are the last `negatives` embeddings of earlier batches, kept in a FIFO queue per
        network (as in MoCo), not rows drawn at random from a bank holding one momentum-averaged row
        per training image; memory does not grow with the data set and no per-image index is needed;
      - the positive key is the other network's current embedding of the same image (detached), not
        that image's momentum-averaged bank row from earlier epochs;
      - the queue starts as random unit vectors (CRD's bank starts random too) and is full after
        negatives / batch_size steps.
    The NCE noise prior m * P_n and the data-set size in CRD's Z cancel, so neither appears here.
    Under torchrun every process enqueues the whole global batch (all-gathered) and Z is estimated
    from it, so the queues and Z are the same in every process and the same as one process with that
    batch.
    """
    def __init__(self, d_student, d_teacher, dim=128, negatives=16384, T=0.07):
        super().__init__()
        self.T = T
        self.embed_student = nn.Linear(d_student, dim)
        self.embed_teacher = nn.Linear(d_teacher, dim)
        self.register_buffer("queue_student", F.normalize(torch.randn(negatives, dim), dim=1))
        self.register_buffer("queue_teacher", F.normalize(torch.randn(negatives, dim), dim=1))
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))
        # log Z per anchor side; NaN until the first batch sets it (no host sync: torch.where, not
        # an if).
        self.register_buffer("log_z", torch.full((2,), float("nan")))
        # under torchrun: Z has been averaged over the processes once (later values are unused)
        self.z_reduced = False

    def _nce(self, anchor, positive, queue, side):
        scores = [(anchor * positive).sum(1, keepdim=True), anchor @ queue.t()]
        logits = torch.cat(scores, dim=1) / self.T
        first_log_z = torch.logsumexp(logits.detach().flatten(), 0) - math.log(logits.numel())
        # Z is a mean over equal shares of the global batch
        if _world_size() > 1 and not self.z_reduced:
            z = first_log_z.exp()
            dist.all_reduce(z)
            first_log_z = (z / _world_size()).log()
        log_z = torch.where(torch.isnan(self.log_z[side]), first_log_z, self.log_z[side])
        # log of P / (P + m * P_n) for the positive and of m * P_n / (P + m * P_n) for the
        # negatives, with P = exp(logit) / Z normalised so that m * P_n = m / N cancels N: written
        # with softplus for stability.
        log_ratio = logits - log_z - math.log(queue.shape[0])
        loss = F.softplus(-log_ratio[:, 0]) + F.softplus(log_ratio[:, 1:]).sum(1)
        return loss.mean(), log_z

    def forward(self, student_feature, teacher_feature):
        v_s = F.normalize(self.embed_student(student_feature.float()), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher_feature.float()), dim=1)
        # Snapshots: this step's backward needs the negatives as they were, and the queues below are
        # updated in place, because a CUDA graph replays reads and writes at fixed addresses.
        queue_student, queue_teacher = self.queue_student.clone(), self.queue_teacher.clone()
        loss_t, log_z_t = self._nce(v_t, v_s.detach(), queue_student, 0)
        loss_s, log_z_s = self._nce(v_s, v_t.detach(), queue_teacher, 1)
        if self.training:
            self.z_reduced = _world_size() > 1
            with torch.no_grad():
                keys_s, keys_t = _gather_rows(v_s.detach()), _gather_rows(v_t.detach())
                self.log_z.copy_(torch.stack([log_z_t, log_z_s]))
                batch = torch.arange(len(keys_s), device=v_s.device)
                slots = (self.queue_next + batch) % self.queue_student.shape[0]
                self.queue_student.index_copy_(0, slots, keys_s)
                self.queue_teacher.index_copy_(0, slots, keys_t)
                self.queue_next.copy_(slots[-1] + 1)
        return loss_t + loss_s

# --------------------------------------------------------------------------------------------------
# 3. Feature taps and the loss wiring: the pooled penultimate feature and the last-stage map are
#    read with hooks, so any classifier whose head is a final nn.Linear works without editing its
#    forward.

class Outputs(NamedTuple):
    """What the losses read from one network's forward pass."""
    feature: torch.Tensor  # the pooled penultimate vector, the classifier's input
    logits: torch.Tensor
    feature_map: Optional[torch.Tensor] = None  # the last stage's activation (method sp only)

def classifier_of(model):
    """The model's final nn.Linear, whose input is the penultimate feature."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to read the "
                         "penultimate feature from")
    return linears[-1]

class Taps:
    """Keeps, after each forward pass of `model`, the input of its final nn.Linear (`feature`) and,
    if `map_layer` names a submodule, that submodule's output (`feature_map`). remove() detaches the
    hooks."""
    def __init__(self, model, map_layer=None):
        self.feature = None
        self.feature_map = None
        self._hooks = [classifier_of(model).register_forward_pre_hook(self._keep_feature)]
        if map_layer is not None:
            layer = model.get_submodule(map_layer)
            self._hooks.append(layer.register_forward_hook(self._keep_feature_map))

    def _keep_feature(self, module, args):
        self.feature = args[0]

    def _keep_feature_map(self, module, args, output):
        self.feature_map = output

    def remove(self):
        for h in self._hooks:
            h.remove()

def features_and_logits(model, x):
    """(feature, logits) from one forward pass: feature is the pooled penultimate vector fed to the
    classifier."""
    taps = Taps(model)
    try:
        logits = model(x)
    finally:
        taps.remove()
    return taps.feature, logits

def build_loss_module(cfg, d_student, d_teacher):
    """The trained part of the method's loss, trained with the student and dropped after training:
    the projectors (pefd), CRD-lite's embeddings (crd); nn.Identity for the others."""
    if cfg.method == "pefd" and cfg.q > 0:
        return ProjectorEnsemble(d_student, d_teacher, q=cfg.q, act=cfg.proj_act,
                                 depth=cfg.proj_depth)
    if cfg.method == "pefd" and d_student != d_teacher:
        raise UserError(f"--q 0 (no projector) needs equal feature widths, but {cfg.student} has "
                        f"{d_student} and {cfg.teacher} {d_teacher}")
    if cfg.method == "crd":
        return CRDLite(d_student, d_teacher, dim=cfg.crd_dim, negatives=cfg.crd_negatives,
                       T=cfg.crd_T)
    return nn.Identity()

# Each method's distillation loss, as the logs name it (train_mda, ...); ce has none.
DISTILL_LOSS_NAMES = {"pefd": "mda", "kd": "kd", "sp": "sp", "crd": "crd"}

class Losses(NamedTuple):
    """One batch's objective, and for the logs its two parts before weighting."""
    total: torch.Tensor  # what backward runs on: ce_weight * ce + distill_weight * distill
    ce: torch.Tensor
    distill: torch.Tensor  # the method's own loss: MDA, KD, SP or CRD-lite; 0 for ce

class Distiller(nn.Module):
    """What training updates, as one module: the student, the loss module (projectors, CRD
    embeddings) and the method's loss. One module, so that DistributedDataParallel can wrap it
    whole. forward(x, labels, the teacher's Outputs) -> (Losses, the student's logits)."""
    def __init__(self, cfg, student, loss_module, autocast):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.loss_module = loss_module
        self.autocast = autocast
        self.taps = Taps(student, student.map_layer if cfg.method == "sp" else None)

    def forward(self, x, labels, teacher):
        with self.autocast:
            logits = self.student(x)
        student = Outputs(self.taps.feature, logits, self.taps.feature_map)
        return method_loss(self.cfg, self.loss_module, student, teacher, labels), logits

def method_loss(cfg, loss_module, student, teacher, labels):
    """The training objective of --method, in float32, as Losses. student and teacher are Outputs
    (teacher None for ce); loss_module is build_loss_module's."""
    ce = F.cross_entropy(student.logits.float(), labels)
    ce_weight = 1.0
    if cfg.method == "pefd":
        distill_weight = cfg.alpha
        distill = mda_loss(loss_module(student.feature.float()), teacher.feature)
    elif cfg.method == "kd":
        ce_weight = cfg.kd_ce_weight
        distill_weight = cfg.kd_weight
        distill = kd_loss(student.logits, teacher.logits, cfg.kd_T)
    elif cfg.method == "sp":
        distill_weight = cfg.sp_weight
        distill = sp_loss(student.feature_map, teacher.feature_map)
    elif cfg.method == "crd":
        distill_weight = cfg.crd_weight
        distill = loss_module(student.feature, teacher.feature)
    else:  # ce: the student alone
        distill_weight = 0.0
        distill = torch.zeros_like(ce)
    return Losses(ce_weight * ce + distill_weight * distill, ce, distill.float())

# --------------------------------------------------------------------------------------------------
# 4. Config and CLI: one dataclass, whose fields are the options (each with its help); None means
#    "the protocol of --dataset". argparse reads them; resolve_config turns parsed options into the
#    resolved config, in one place.

def option(default, help):
    """A dataclass field that is a command-line option: its default, and its line in --help."""
    return dataclasses.field(default=default, metadata={"help": help})

@dataclass
class Config:
    # what to train
    teacher: str = option("", "teacher architecture (a key of models.MODELS, or timm:NAME); unused "
                              "by --method ce")
    student: str = option("", "student architecture (a key of models.MODELS, or timm:NAME)")
    method: str = option("pefd", "pefd | kd | sp | crd | ce (ce: the student alone, e.g. to "
                                 "pretrain a teacher)")
    teacher_ckpt: str = option("", "teacher weights (ours, RepDistiller's, mdistiller's or "
                                   "torchvision's); default checkpoints/<dataset>/<teacher>.pt")
    teacher_weights: str = option("", "instead of a file, torchvision's ImageNet weights by name, "
                                      "e.g. IMAGENET1K_V1 (downloads: online only)")
    pretrained: bool = option(False, "start the trained model (--student) from timm's pretrained "
                                     "weights of its timm:NAME, with a new head where the class "
                                     "count differs (downloads once)")
    weights: str = option("", "start the trained model from this file instead: a timm or plain "
                              "state_dict, .safetensors or .pt (a new head where the class count "
                              "differs)")
    # data
    dataset: str = option("cifar100", "cifar100 | imagenet | folder (your own class folders: "
                                      "ImageNet's loader and protocol) | synthetic (small, "
                                      "generated, learnable: for smoke runs and tests)")
    data_dir: str = option("data", "cifar100: the folder holding cifar-100-python/; imagenet, "
                                   "folder: the folder holding train/<class>/ and val/<class>/")
    download: bool = option(False, "download CIFAR-100 with torchvision if it is not in --data-dir")
    synthetic_size: int = option(2048, "training images of --dataset synthetic; its test set is a "
                                       "quarter of that")
    synthetic_classes: int = option(10, "classes of --dataset synthetic")
    image_size: int = option(224, "imagenet, folder: the training crop, and the evaluation crop "
                                  "after resizing to 256/224 of it")
    workers: int = option(None, "imagenet, folder: loader processes per GPU; default: this "
                                "machine's CPUs over its GPUs in use")
    # optimisation: SGD with step decay, as in the paper and RepDistiller; None takes the dataset's
    # protocol
    epochs: int = option(None, "training epochs: 240 on CIFAR-100, 100 on ImageNet")
    batch_size: int = option(None, "global batch (all GPUs together): 64 on CIFAR-100, 256 on "
                                   "ImageNet; the last incomplete batch is dropped")
    lr: float = option(None, "0.05 on CIFAR-100 (0.01 for MobileNetV2/ShuffleV1/ShuffleV2 "
                             "students), 0.1 on ImageNet; never rescaled by batch size")
    lr_decay_epochs: str = option(None, "comma-separated epochs after which lr is multiplied by "
                                        "lr_decay_rate: 150,180,210 on CIFAR-100, 30,60,90 on "
                                        "ImageNet")
    lr_decay_rate: float = option(0.1, "factor applied at each of lr_decay_epochs")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(None, "on every trained parameter, projectors and CRD embeddings "
                                       "included: 5e-4 on CIFAR-100, 1e-4 on ImageNet")
    # PEFD (method pefd)
    alpha: float = option(25.0, "weight of the MDA loss: loss = CE + alpha * MDA")
    q: int = option(3, "number of projectors; 0 = none (MDA on the raw student feature; needs "
                       "equal widths)")
    proj_act: str = option("relu", "activation after each projector layer: relu | gelu | none")
    proj_depth: int = option(1, "Linear+activation layers per projector (the paper's \"deep "
                                "cascade\" when > 1)")
    # baselines, with RepDistiller's settings
    kd_T: float = option(4.0, "KD temperature")
    kd_weight: float = option(0.9, "method kd: loss = kd_ce_weight * CE + kd_weight * KD")
    kd_ce_weight: float = option(0.1, "method kd: weight of the cross-entropy term")
    sp_weight: float = option(3000.0, "method sp: loss = CE + sp_weight * SP")
    crd_weight: float = option(0.8, "method crd: loss = CE + crd_weight * CRD-lite")
    crd_dim: int = option(128, "CRD embedding width")
    crd_T: float = option(0.07, "CRD temperature")
    crd_negatives: int = option(16384, "CRD negatives per anchor (size of CRD-lite's queue)")
    # speed: neither changes what is computed beyond float rounding
    graph: str = option("auto", "capture the whole training step as one CUDA graph: auto (on for "
                                "one CUDA process on CIFAR-style data, amp bf16 or off) | on | off")
    teacher_cache: str = option("auto", "compute the teacher's outputs for all 162 crop/flip views "
                                        "of each image once and reuse them: auto (on CUDA for "
                                        "pefd/kd/crd on CIFAR-style data) | on | off")
    teacher_cache_file: str = option("", "the cache of --teacher-ckpt; default: that path with the "
                                         "suffix .tcache")
    teacher_cache_ram: float = option(0.25, "read the cache file whole into memory when it takes "
                                            "at most this share of the RAM")
    # running
    seed: int = option(1, "seeds initialisation, data order and augmentation")
    deterministic: bool = option(False, "bit-identical reruns (on CPU; on CUDA as far as cuDNN "
                                        "allows), slower")
    device: str = option("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N; under "
                                 "torchrun each process takes cuda:LOCAL_RANK")
    amp: str = option("bf16", "autocast on CUDA: bf16 | fp16 (with gradient scaling) | off; always "
                              "off on CPU")
    compile: bool = option(False, "torch.compile the student and teacher")
    sync_bn: bool = option(False, "under torchrun: the student's BatchNorm statistics over the "
                                  "global batch (SyncBatchNorm)")
    eval_batch_size: int = option(None, "batch size of the evaluation, per process: 1000 on "
                                        "CIFAR-100, 250 on ImageNet")
    checkpoint_seconds: float = option(60.0, "write last.pt once this long has passed since the "
                                             "last one, within an epoch too (and after the final "
                                             "epoch). SIGTERM or SIGUSR1 (Slurm's --signal) writes "
                                             "it and stops the run with status 128 + the signal "
                                             "(143, 138; Ctrl-C: 130)")
    progress_seconds: float = option(30.0, "within an epoch, print a progress line this often")
    run_dir: str = option("", "where the run's files go; default "
                              "runs/<dataset>/<teacher>-<student>/<method>-seed<seed>")
    resume: bool = option(False, "continue the run in --run-dir from its last.pt (starts fresh if "
                                 "there is none)")
    overwrite: bool = option(False, "start over even if --run-dir already holds a run")

# The paper's protocols (Section 4, "Training"; on CIFAR-100 they are RepDistiller's). A Config
# field left at None takes its dataset's value here; nothing of one dataset's protocol is ever
# applied to another.
CIFAR100_PROTOCOL = {"epochs": 240, "batch_size": 64, "lr": 0.05, "lr_decay_epochs": "150,180,210",
                     "weight_decay": 5e-4, "eval_batch_size": 1000}
PROTOCOLS = {"cifar100": CIFAR100_PROTOCOL, "synthetic": dict(CIFAR100_PROTOCOL),
             "imagenet": {"epochs": 100, "batch_size": 256, "lr": 0.1,
                          "lr_decay_epochs": "30,60,90", "weight_decay": 1e-4,
                          "eval_batch_size": 250}}
# your own class folders: ImageNet's protocol, a start for fine-tuning (docs/your-own.md)
PROTOCOLS["folder"] = dict(PROTOCOLS["imagenet"])
# class folders, read by DataLoader workers at --image-size
FOLDER_DATASETS = ("imagenet", "folder")
METHODS = ("pefd", "kd", "sp", "crd", "ce")
# those that need only the teacher's feature and logits, not its maps
CACHED_TEACHER_METHODS = ("pefd", "kd", "crd")
# small enough to live on the GPU as uint8, augmented there
RESIDENT_DATASETS = ("cifar100", "synthetic")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
SWITCHES = ("auto", "on", "off")
CHOICES = {"method": METHODS, "dataset": tuple(PROTOCOLS), "amp": tuple(AMP_DTYPES),
           "proj_act": tuple(PROJECTOR_ACTIVATIONS), "graph": SWITCHES, "teacher_cache": SWITCHES}
POSITIVE = ("epochs", "batch_size", "eval_batch_size", "proj_depth", "kd_T", "crd_T", "crd_dim",
            "crd_negatives", "synthetic_size", "image_size")
NON_NEGATIVE = ("lr", "momentum", "weight_decay", "alpha", "q", "kd_weight", "kd_ce_weight",
                "sp_weight", "crd_weight", "lr_decay_rate", "seed", "checkpoint_seconds",
                "progress_seconds", "workers", "teacher_cache_ram")
LOW_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")  # lr 0.01 in the paper and RepDistiller
# Fields that may differ when a run is resumed: they change where and how fast it runs, not what it
# computes. (run_dir: the folder is where last.pt is, however it is spelled or wherever it moved.)
RESUMABLE_CHANGES = ("epochs", "device", "amp", "compile", "deterministic", "data_dir", "download",
                     "eval_batch_size", "resume", "overwrite", "graph", "teacher_cache",
                     "teacher_cache_file", "teacher_cache_ram", "workers", "checkpoint_seconds",
                     "progress_seconds", "run_dir")

class UserError(Exception):
    """A problem the user can fix; main() prints it as one line and exits with status 2."""

def _flag(name):
    return "--" + name.replace("_", "-")

def _dashed(arg):
    """--kd_T=2 read as --kd-T=2: an option's name may be spelled with '_'; a value is left
    alone."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    return name.replace("_", "-") + eq + value

class OptionParser(argparse.ArgumentParser):
    """argparse whose errors are a UserError: main() prints them as one line."""
    def error(self, message):
        raise UserError(message)

def option_parser(schema, usage=None):
    """argparse of a dataclass's fields: --name VALUE, or --flag / --no-flag for a bool. An
    option not given is left out, so that the dataclass's own default holds (None: auto, resolved
    later)."""
    parser = OptionParser(prog="projkd.py", usage=usage, add_help=False, allow_abbrev=False)
    for f in dataclasses.fields(schema):
        text = f.metadata.get("help", "").replace("%", "%%")
        if f.type is bool:
            default = "on" if f.default else "off"
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{text} (default: {default})")
            continue
        default = "auto" if f.default is None else repr(f.default)
        parser.add_argument(_flag(f.name), type=f.type, metavar=f.type.__name__.upper(),
                            default=argparse.SUPPRESS, help=f"{text} (default: {default})")
    return parser

def parse_args(argv, schema=Config):
    """An instance of `schema` from options; names take '-' or '_'. Unknown or ill-typed options
    raise UserError (unknown ones with the closest option: argparse 3.11 suggests none)."""
    given, unknown = option_parser(schema).parse_known_args([_dashed(arg) for arg in argv])
    if unknown and not unknown[0].startswith("--"):
        raise UserError(f"unexpected argument {unknown[0]!r}: options look like --student vgg8 "
                        f"(see --help)")
    if unknown:
        name = unknown[0].partition("=")[0]
        flags = [_flag(f.name) for f in dataclasses.fields(schema)]
        close = difflib.get_close_matches(name, flags, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown option {name}{hint}; see --help")
    return schema(**vars(given))

def cli_help(schema, doc, usage):
    """The first paragraph of `doc`, then argparse's help of `schema` (for Config, also the
    architectures)."""
    width = min(shutil.get_terminal_size().columns, 120) - 1
    parser = option_parser(schema, usage)
    if schema is Config:
        with contextlib.suppress(UserError):  # copied alone, without models.py: no list of them
            models = models_module()
            cifar = [a for a in models.MODELS if a not in models.IMAGENET_ARCHS]
            parser.epilog = (f"architectures (--teacher, --student): CIFAR {', '.join(cifar)}; "
                             f"ImageNet {', '.join(models.IMAGENET_ARCHS)}; and any of timm's as "
                             f"timm:NAME (docs/your-own.md)")
    first_paragraph = doc.strip().split("\n\n")[0]
    return "\n".join([*textwrap.wrap(first_paragraph, width), "", parser.format_help()])

def options_of(name, own, shared):
    """A subcommand's options as one dataclass: the fields of `own` (a dataclass, or None), then the
    Config fields named in `shared`, with Config's defaults and help, so that each means the same as
    for training."""
    fields = [*(dataclasses.fields(own) if own else ()),
              *(f for f in dataclasses.fields(Config) if f.name in shared)]
    copied = [(f.name, f.type, option(f.default, f.metadata.get("help", ""))) for f in fields]
    return dataclasses.make_dataclass(name, copied)

def models_module():
    """models.py, the architectures, imported where it is used: this file copied alone imports
    anywhere, and says in one line what it lacks when an architecture is asked for."""
    try:
        import models
    except ModuleNotFoundError as e:
        if e.name != "models":
            raise
        raise UserError("the architectures are in models.py, which is needed beside projkd.py: "
                        "copy it there too") from None
    return models

def check_arch(arch, role, dataset, image_size=32):
    """One line where `arch` is no architecture, or not one for `dataset` (and, on class folders,
    for --image-size)."""
    models = models_module().MODELS
    imagenet = models_module().IMAGENET_ARCHS
    # any dataset and size: models.py says in one line if timm is missing or the name unknown
    if models_module().is_timm(arch):
        models_module().check_timm_name(arch)
        return
    if arch not in models:
        raise UserError(f"unknown architecture {arch!r} for --{role}; choose one of "
                        f"{', '.join(models)}")
    if dataset == "folder":
        check_folder_arch(arch, image_size)
        return
    if (arch in imagenet) != (dataset == "imagenet"):
        kind, other = ("a CIFAR (32x32)", "an ImageNet")  # a pair: what it is, what is needed
        if arch in imagenet:
            kind, other = ("an ImageNet", "a CIFAR")
        raise UserError(f"{arch} is {kind} architecture and --dataset {dataset} needs {other} one "
                        f"(ImageNet: {', '.join(imagenet)})")

def check_folder_arch(arch, image_size):
    """Your own class folders take ImageNet and timm architectures at any --image-size, the CIFAR
    zoo at 32 only."""
    if arch not in models_module().IMAGENET_ARCHS and image_size != 32:
        raise UserError(f"{arch} is a CIFAR (32x32) architecture and --image-size is {image_size}: "
                        f"pass --image-size 32, or take an ImageNet or timm:NAME architecture")

def input_size(cfg):
    """The side of the images the models see: 32 on CIFAR-style data, --image-size on class
    folders."""
    if cfg.dataset in FOLDER_DATASETS:
        return cfg.image_size
    return 32

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
    visible = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and dev.index is not None and dev.index >= visible:
        raise UserError(f"--device {name}, but {visible} CUDA device(s) are visible (cuda:0 to "
                        f"cuda:{visible - 1}); choose one of them, or check CUDA_VISIBLE_DEVICES")
    if dev.type == "cuda" and world_size > 1 and dev.index is not None:
        raise UserError(f"--device {name} does not go with torchrun, which gives each process its "
                        "own GPU (cuda:LOCAL_RANK); use --device cuda")
    if dev.type == "cuda" and world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= visible:
            raise UserError(f"torchrun started process {local_rank} on this machine, but {visible} "
                            f"CUDA device(s) are visible; start at most {visible} "
                            "(--nproc_per_node)")
        return torch.device("cuda", local_rank)
    # torch.cuda.set_device refuses a device without an index
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev

def check_roles(cfg, command):
    """The choices and the models a command needs: a student to train, a teacher unless --method ce
    (the cache needs a teacher and no student). Returns whether the teacher is needed."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UserError(f"unknown {_flag(name)} {getattr(cfg, name)!r}; choose "
                            f"{', '.join(choices)}")
    needs_teacher = command == "cache" or cfg.method != "ce"
    if command == "train" and not cfg.student:
        raise UserError("--student is required, e.g. --student vgg8 (see --help for the "
                        "architectures)")
    if command == "train":
        check_arch(cfg.student, "student", cfg.dataset, cfg.image_size)
    if needs_teacher and not cfg.teacher:
        raise UserError(f"--method {cfg.method} needs --teacher, e.g. --teacher vgg13 --student "
                        "vgg8"
                        if command == "train" else "the teacher cache needs --teacher, e.g. "
                                                   "--teacher vgg13")
    if needs_teacher:
        check_arch(cfg.teacher, "teacher", cfg.dataset, cfg.image_size)
    if cfg.teacher_weights and cfg.teacher_ckpt:
        raise UserError("--teacher-weights and --teacher-ckpt both name the teacher's weights; "
                        "pass one")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if cfg.pretrained and cfg.weights:
        raise UserError("--pretrained and --weights both name the trained model's start weights; "
                        "pass one")
    return needs_teacher

def with_protocol(cfg):
    """The options left at None from the dataset's protocol, then every number checked against its
    range. Returns (config, notes)."""
    notes = []
    protocol = PROTOCOLS[cfg.dataset]
    defaults = {k: v for k, v in protocol.items() if getattr(cfg, k) is None}
    if cfg.lr is None and cfg.student in LOW_LR_STUDENTS and cfg.dataset not in FOLDER_DATASETS:
        defaults["lr"] = 0.01
        notes.append(f"lr 0.01 (the paper's value for {cfg.student} students)")
    paper_batch = protocol["batch_size"]
    batch = cfg.batch_size or paper_batch
    if cfg.lr is None and batch != paper_batch:
        lr = defaults["lr"]
        notes.append(f"lr {lr} is the paper's for a global batch of {paper_batch} and is used "
                     f"unchanged at {batch} (the linear scaling rule would give "
                     f"{lr * batch / paper_batch:g}: pass --lr to use it)")
    cfg = dataclasses.replace(cfg, **defaults)
    if not re.fullmatch(r"[\s\d,]*", cfg.lr_decay_epochs):
        raise UserError(f"--lr-decay-epochs must be comma-separated integers >= 0, got "
                        f"{cfg.lr_decay_epochs!r}")
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(cfg, name)
        if value is None:
            continue
        if name in POSITIVE and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{_flag(name)} must be positive, got {value}")
        if name in NON_NEGATIVE and not (value >= 0 and math.isfinite(value)):
            raise UserError(f"{_flag(name)} must be a finite number >= 0, got {value}")
    if cfg.synthetic_classes < 2:
        raise UserError(f"--synthetic-classes must be at least 2, got {cfg.synthetic_classes}")
    return cfg, notes

def resolve_processes(cfg, world):
    """The device of this process, and the checks of the batch and SyncBatchNorm against the number
    of processes. Returns (device, notes)."""
    notes = []
    device = resolve_device(cfg.device, world)
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must divide by the "
                        f"{world} processes")
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA: SyncBatchNorm runs on GPUs only")
    if cfg.sync_bn and world == 1:
        notes.append("--sync-bn has no effect in a single process")
    return device, notes

def resolve_amp(amp, device):
    """--amp on this device: always off on the CPU. Returns (amp, notes)."""
    if device.type != "cpu":
        return amp, []
    if amp in (Config.amp, "off"):  # said only when asked for: --amp fp16
        return "off", []
    return "off", [f"amp off on CPU (--amp {amp} applies to CUDA)"]

def graph_blockers(device, world, resident, amp):
    """Why the whole-step CUDA graph cannot run here: [] where it can."""
    blockers = []
    if device.type != "cuda":
        blockers.append("it needs CUDA")
    if world > 1:
        blockers.append("it is single-process (under torchrun the eager step runs)")
    if not resident:
        blockers.append("it needs GPU-resident data (cifar100, synthetic)")
    if amp == "fp16":
        blockers.append("--amp fp16's gradient scaler runs eagerly; use --amp bf16")
    return blockers

def use_teacher_cache(cfg, command, device):
    """Whether the teacher's outputs come from its cache. The cache holds the teacher's feature and
    logits of CIFAR-style crops and flips: pefd, kd and crd on cifar100/synthetic; sp needs the
    teacher's maps, and ImageNet's crops are not enumerable."""
    resident = cfg.dataset in RESIDENT_DATASETS
    if command == "cache" and not resident:
        raise UserError("the teacher cache is for CIFAR-style data (cifar100, synthetic), not "
                        f"--dataset {cfg.dataset}")
    if command == "cache":
        return True
    cacheable = resident and cfg.method in CACHED_TEACHER_METHODS
    if cfg.teacher_cache == "on" and not cacheable:
        raise UserError("--teacher-cache on serves pefd, kd and crd on cifar100/synthetic, not "
                        f"--method {cfg.method} on --dataset {cfg.dataset}; use --teacher-cache "
                        "auto or off")
    if cfg.teacher_cache == "auto":
        return cacheable and device.type == "cuda"
    return cfg.teacher_cache == "on"

def resolve_graph(cfg, device, world, amp):
    """--graph on or off, from auto where nothing blocks it. Returns (graph, notes)."""
    blockers = graph_blockers(device, world, cfg.dataset in RESIDENT_DATASETS, amp)
    if cfg.graph == "on" and blockers:
        raise UserError(f"--graph on is not possible here: {blockers[0]}; use --graph auto or off")
    if cfg.graph == "off":
        return "off", []
    if blockers and device.type == "cuda":
        return "off", [f"CUDA graph off: {blockers[0]}"]
    if blockers:
        return "off", []
    return "on", []

def resolve_files(cfg, command, needs_teacher, cache):
    """The teacher's files and where the run goes, defaults filled in. Returns ({field: value},
    notes)."""
    notes = []
    if cfg.teacher and not needs_teacher:
        notes.append(f"--teacher {cfg.teacher} is not used by --method ce")
    teacher = cfg.teacher if needs_teacher else ""
    ckpt = cfg.teacher_ckpt
    if not ckpt and needs_teacher and not cfg.teacher_weights:
        ckpt = os.path.join("checkpoints", cfg.dataset, f"{path_name(cfg.teacher)}.pt")
    cache_file = cfg.teacher_cache_file
    if cache and not cache_file:
        cache_file = os.path.splitext(ckpt)[0] + ".tcache"
    run_dir = cfg.run_dir
    if command == "train" and not run_dir:
        run_dir = run_path(os.path.join("runs", cfg.dataset), teacher, cfg.student, cfg.method,
                           cfg.seed, q=cfg.q, proj_depth=cfg.proj_depth, proj_act=cfg.proj_act)
    files = {"teacher": teacher, "teacher_ckpt": ckpt, "teacher_cache_file": cache_file,
             "run_dir": run_dir}
    return files, notes

def resolve_config(cfg, command="train"):
    """Checks every option and fills in what depends on others, in steps that each return their
    value and their notes: the dataset's protocol, the processes and the device, the switches of
    speed, the files. Returns (resolved config, notes to print). command "cache": what building a
    teacher cache needs (a teacher, no student)."""
    needs_teacher = check_roles(cfg, command)
    cfg, protocol_notes = with_protocol(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, process_notes = resolve_processes(cfg, world)
    amp, amp_notes = resolve_amp(cfg.amp, device)
    graph, graph_notes = resolve_graph(cfg, device, world, amp)
    cache = use_teacher_cache(cfg, command, device)
    files, file_notes = resolve_files(cfg, command, needs_teacher, cache)
    workers = cfg.workers
    if cfg.dataset in FOLDER_DATASETS and workers is None:
        workers = default_workers()
    cfg = dataclasses.replace(cfg, device=str(device), amp=amp, graph=graph, workers=workers,
                              teacher_cache="on" if cache else "off", **files)
    return cfg, protocol_notes + process_notes + amp_notes + graph_notes + file_notes

def config_lines(given, cfg):
    """The resolved config as a readable block: each value that is not Config's default, and where
    it came from (an option given, the dataset's protocol, or resolved from the others and from
    auto)."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        asked = getattr(given, f.name)
        if value != f.default:
            source = "resolved"
            if asked == value:
                source = "given"
            elif asked is None and PROTOCOLS[cfg.dataset].get(f.name) == value:
                source = f"{cfg.dataset} protocol"
            lines.append(f"  {_flag(f.name):<22} {value!s:<36} {source}")
    return lines

def run_name(method, q=Config.q, proj_depth=Config.proj_depth, proj_act=Config.proj_act):
    """pefd, kd, ..., or pefd-q2, pefd-depth3, pefd-gelu: the method plus any projector setting off
    the paper's."""
    parts = [method]
    if method == "pefd" and q != Config.q:
        parts.append(f"q{q}")
    if method == "pefd" and proj_depth != Config.proj_depth:
        parts.append(f"depth{proj_depth}")
    if method == "pefd" and proj_act != Config.proj_act:
        parts.append(proj_act)
    return "-".join(parts)

def path_name(arch):
    """An architecture's name as a file or folder name: timm_resnet18 for timm:resnet18 (no colon,
    which Make and Windows cannot take in a path)."""
    return arch.replace(":", "_")

def run_path(runs, teacher, student, method, seed, **projector):
    """Where a run lives: <runs>/<teacher>-<student>/<name>-seed<N>, or <runs>/<student>/ce-seed<N>
    for a model trained alone (shared by every pair with that student, and also how teachers are
    trained)."""
    teacher = path_name(teacher)
    student = path_name(student)
    folder = student if method == "ce" else f"{teacher}-{student}"
    return os.path.join(runs, folder, f"{run_name(method, **projector)}-seed{seed}")

# --------------------------------------------------------------------------------------------------
# 5. Data: CIFAR-100 from the official pickles, a synthetic stand-in, and GPU-side augmentation;
#    ImageNet from class folders. The uint8 CIFAR-style sets live on the device and are cropped and
#    flipped there, a whole epoch at once, with no loader workers; ImageNet is decoded and augmented
#    by DataLoader workers.

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PADDING = 4

class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold dicts of numpy arrays and lists; refuse anything else a pickle could
    run."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        return super().find_class(module, name)

def _read_cifar_pickle(path):
    with open(path, "rb") as f:
        raw = _ArrayUnpickler(f, encoding="bytes").load()
    # Python 2 pickles: bytes keys
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(d["fine_labels"], dtype=np.int64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return torch.from_numpy(x.copy()), torch.from_numpy(y)

def load_cifar100(root, download=False):
    """(train_x, train_y, test_x, test_y) from root/cifar-100-python/{train,test}: x uint8 N x 3 x
    32 x 32, y int64. The pickles are read directly, without torchvision's md5 check of the archive
    (re-packed copies differ in file order and names, not in pixels); download=True fetches the
    official archive with torchvision if they are missing.
    """
    folder = os.path.join(root, "cifar-100-python")
    paths = [os.path.join(folder, split) for split in ("train", "test")]
    if download and not all(map(os.path.isfile, paths)):
        import torchvision
        archive = os.path.join(root, "cifar-100-python.tar.gz")
        had_root = os.path.exists(root)
        had_archive = os.path.exists(archive)
        try:
            for train in (True, False):
                torchvision.datasets.CIFAR100(root, train=train, download=True)
        except Exception as e:  # offline, a proxy, a full disk: all end the same way for the user
            if not had_root:  # leave nothing half-downloaded behind
                shutil.rmtree(root, ignore_errors=True)
            elif not had_archive and os.path.exists(archive):
                os.remove(archive)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"downloading CIFAR-100 into {root} failed ({reason}); put a copy of "
                            "cifar-100-python/ there by hand (README: CIFAR-100)") from None
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"CIFAR-100 not found: no {' or '.join(missing)}; pass --download, or "
                        "--data-dir pointing at a folder that holds cifar-100-python/{train,test} "
                        "(README: CIFAR-100)")
    try:
        return (*_read_cifar_pickle(paths[0]), *_read_cifar_pickle(paths[1]))
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"cannot read CIFAR-100 in {folder} ({e}); re-create it from the official "
                        "archive") from None

def make_synthetic(n_train, num_classes, seed=0):
    """A small learnable data set of CIFAR shape: each class is a smooth random colour pattern, each
    image a 32-pixel window of it at a random offset of up to 4 pixels, plus noise. Deterministic in
    its arguments."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    patterns = F.interpolate(coarse, size=36, mode="bilinear", align_corners=False) * 200 + 28

    def draw(n):
        y = torch.arange(n) % num_classes
        dy, dx = torch.randint(0, 5, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
        x = patterns[y[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        x = x + 25 * torch.randn(x.shape, generator=g)
        return x.clamp(0, 255).round().to(torch.uint8), y

    return (*draw(n_train), *draw(max(n_train // 4, num_classes)))

def load_imagenet(root, image_size=224, name="ImageNet", doc="docs/imagenet.md"):
    """(train_set, val_set): torchvision ImageFolders of root/train and root/val (one folder per
    class, the class folders' sorted names being the labels) yielding uint8 C x H x W tensors, with
    the paper's augmentation: RandomResizedCrop + horizontal flip for training, Resize(256/224 of
    the crop) + CenterCrop for evaluation. Normalisation is left to the GPU. name, doc: what the
    errors call the data set, and the page they point to."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder
    train_layout = os.path.join(root, "train", "<class>", "<image>")
    val_layout = os.path.join(root, "val", "<class>", "<image>")
    layout = f"{train_layout} and {val_layout} with the same class folders in both ({doc})"
    resize = round(image_size * 256 / 224)
    transforms = {
        "train": T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                            T.PILToTensor()]),
        "val": T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.PILToTensor()]),
    }
    sets = {}
    for split, transform in transforms.items():
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise UserError(f"{name} not found: no folder {folder}; --data-dir must hold "
                            f"{layout}")
        try:
            sets[split] = ImageFolder(folder, transform=transform)
        except (FileNotFoundError, OSError) as e:
            why = str(e).splitlines()[0]
            raise UserError(f"{folder} is not an image class folder ({why}); expected "
                            f"{layout}") from None
    if sets["train"].classes != sets["val"].classes:
        raise UserError(f"{root}: train/ has {len(sets['train'].classes)} class folders and val/ "
                        f"{len(sets['val'].classes)}, or they differ in name; expected {layout}")
    return sets["train"], sets["val"]

# the class-folder data sets by name: what their errors call them, the page they point to
FOLDER_NAMES = {"imagenet": ("ImageNet", "docs/imagenet.md"),
                "folder": ("--dataset folder", "docs/your-own.md")}

@dataclass
class Data:
    """A data set as training reads it: CIFAR-style sets as uint8/int64 tensors on the device
    (train_x ...), ImageNet as ImageFolders (train_set) and a loader of this process's shard of val/
    (val_loader); mean and std are (1, 3, 1, 1) tensors on the device."""
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    train_x: Optional[torch.Tensor] = None
    train_y: Optional[torch.Tensor] = None
    test_x: Optional[torch.Tensor] = None
    test_y: Optional[torch.Tensor] = None
    train_set: Optional[object] = None
    val_loader: Optional[object] = None

    @property
    def n_train(self):
        return len(self.train_x) if self.train_x is not None else len(self.train_set)

    def test_batches(self, batch_size):
        """(uint8 images, labels) of this process's share of the test (CIFAR) or validation
        (ImageNet) set, on the device; the shares of all processes cover the set once."""
        if self.test_x is None:
            device = self.mean.device
            return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                    for x, y in self.val_loader)
        n = len(self.test_x)
        lo = n * _rank() // _world_size()
        hi = n * (_rank() + 1) // _world_size()
        return ((self.test_x[i:min(i + batch_size, hi)], self.test_y[i:min(i + batch_size, hi)])
                for i in range(lo, hi, batch_size))

def load_data(cfg, device):
    """The data set of cfg.dataset for `device` (under torchrun, with this process's shard of
    ImageNet's val/)."""
    def channels(values):
        return torch.tensor(values, device=device).view(1, 3, 1, 1)

    if cfg.dataset in FOLDER_DATASETS:
        name, doc = FOLDER_NAMES[cfg.dataset]
        train_set, val_set = load_imagenet(cfg.data_dir, cfg.image_size, name, doc)
        # none twice
        shard = torch.utils.data.Subset(val_set, range(_rank(), len(val_set), _world_size()))
        val_loader = image_loader(shard, cfg.eval_batch_size, cfg.workers, device)
        return Data(len(train_set.classes), channels(IMAGENET_MEAN), channels(IMAGENET_STD),
                    train_set=train_set, val_loader=val_loader)
    if cfg.dataset == "cifar100":
        tensors = load_cifar100(cfg.data_dir, cfg.download)
        on_device = [t.to(device) for t in tensors]
        return Data(100, channels(CIFAR100_MEAN), channels(CIFAR100_STD), *on_device)
    tensors = make_synthetic(cfg.synthetic_size, cfg.synthetic_classes)
    mean = channels((0.5, 0.5, 0.5))
    std = channels((0.25, 0.25, 0.25))
    return Data(cfg.synthetic_classes, mean, std, *(t.to(device) for t in tensors))

def image_loader(dataset, batch_size, workers, device, sampler=None, drop_last=False):
    """A DataLoader of uint8 image batches: worker processes decode and augment, pinned memory for
    the copy."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       drop_last=drop_last,
                                       persistent_workers=workers > 0)

def normalize(images, mean, std):
    """uint8 N x 3 x H x W -> float32, standardised per channel; mean and std are (1, 3, 1, 1)
    tensors on the images' device, made once: building them per step would copy host -> device and
    wait for it."""
    return (images.float() / 255 - mean) / std

def augmentation_draws(n, generator, padding=CROP_PADDING):
    """One epoch's random crop offsets and flips, drawn on the CPU (the same numbers on every
    device)."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return dy, dx, flip

def crop_flip(images, dy, dx, flip, padding=CROP_PADDING):
    """Random crop with zero padding, then horizontal flip, for a whole batch in one gather. images:
    uint8 B x C x H x W; dy, dx in [0, 2*padding]: the crop's corner in the padded image, whose
    zeros are black pixels, exactly as torchvision's RandomCrop(32, padding=4)."""
    b, c, h, w = images.shape
    device = images.device
    rows = dy[:, None] + torch.arange(h, device=device)
    cols = dx[:, None] + torch.arange(w, device=device)
    # a mirrored crop is the crop read right to left
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=device)[:, None, None, None]
    chans = torch.arange(c, device=device)[None, :, None, None]
    padded = F.pad(images, (padding,) * 4)
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]

# --------------------------------------------------------------------------------------------------
# 6. The training loop, in the order it runs: train() sets up the run, then per epoch train_epoch,
#    whose step is train_step on the feed's next batch (eager, or replayed as one CUDA graph),
#    then evaluate and record_epoch; finish_run writes the results. Setting up a run comes next,
#    then the bookkeeping (the lock, resuming, check points, signals), then logging and files.

# --- the loop: train(), an epoch, a step ----------------------------------------------------------

def train(cfg):
    """Run one training (distillation, or the student alone for --method ce) and write its run
    directory. Returns the metrics dict that is also saved as metrics.json."""
    resolved, notes = resolve_config(cfg)
    lock = contextlib.nullcontext()
    if os.environ.get("RANK", "0") == "0":  # its --run-dir, locked before any data is read
        lock = run_dir_lock(resolved.run_dir)
    with labelled_log(resolved.run_dir), lock, StopSignals() as stop_signals:
        run = prepare_run(resolved, notes, given=cfg)
        run.stop_signals = stop_signals
        stop_signals.training = True  # from now on a signal stops the run at the next check point
        begin_segment(run)
        try:
            for epoch in range(run.start_epoch, resolved.epochs):
                # an epoch resumed within counts the seconds it had trained before its stop
                run.epoch_clock = time.time() - run.resumed_seconds
                run.resumed_seconds = 0.0
                stats = train_epoch(run, epoch)
                result = evaluate(run.student, run.data, resolved.eval_batch_size,
                                  run.memory_format)
                record_epoch(run, epoch, stats, result, time.time() - run.epoch_clock)
                if epoch + 1 < resolved.epochs:
                    save_or_stop(run, epoch + 1)
                else:
                    save_checkpoint(run, epoch + 1)  # always after the final epoch
            return finish_run(run)
        except WriteError as e:
            last = os.path.join(resolved.run_dir, "last.pt")
            if not os.path.isfile(last):
                raise
            raise WriteError(f"{e}; the last check point is kept in {last}: free space, then the "
                             f"same command with --resume continues from it") from None
        finally:
            run.feed.close()

def train_epoch(run, epoch):
    """One pass over the training set, or the rest of it after run.resumed_steps (whose sums
    restore_epoch_state brought back). Returns the epoch's mean losses, accuracy (%) and
    images/s."""
    cfg = run.cfg
    steps = run.feed.steps_per_epoch
    first = run.resumed_steps
    start = time.time()
    last_report = start
    every = max(1, steps // CHECKS_PER_EPOCH)  # the same steps on every process
    next_check = first + every
    last_check = (first, start)  # (step, time) of the last check point
    run.lr.fill_(lr_at(cfg, epoch))
    if first == 0:
        run.sums.zero_()
    run.feed.prepare_epoch(epoch, first)
    run.resumed_steps = 0
    for i in range(first + 1, steps + 1):
        run.step()
        if i == first + COST_STEPS and epoch == run.start_epoch and run.device.type == "cpu":
            note_cost_on_cpu(run, epoch, (time.time() - start) / COST_STEPS)
        if i != next_check or i == steps:  # the clock is read at check points only
            continue
        if cfg.progress_seconds and time.time() - last_report >= cfg.progress_seconds:
            last_report = time.time()
            log_progress(run, epoch, i, (time.time() - start) / (i - first))
        seconds_per_step = (time.time() - last_check[1]) / (i - last_check[0])
        seconds_per_step = save_or_stop(run, epoch, i, seconds_per_step)
        last_check = (i, time.time())
        next_check = i + every
        if run.world_size > 1:
            spacing = math.ceil(multiprocess_check_seconds(cfg) / seconds_per_step)
            next_check = i + max(every, spacing)
    totals = run.sums.totals(run.world_size)  # the epoch's one host sync for training metrics
    batches = steps * run.world_size
    loss = totals["loss"] / batches
    if not math.isfinite(loss):
        raise UserError(f"the training loss became {loss} in epoch {epoch + 1}; lower --lr or use "
                        f"--amp bf16")
    # BatchNorm statistics averaged: every process evaluates and saves one model
    if run.world_size > 1:
        for buffer in run.student.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= run.world_size
    return {"loss": loss, "ce": totals["ce"] / batches, "distill": totals["distill"] / batches,
            "acc": 100 * totals["correct"] / (steps * cfg.batch_size),
            "images_per_s": (steps - first) * cfg.batch_size / (time.time() - start)}

def note_cost_on_cpu(run, epoch, seconds_per_step):
    """In a CPU run's first lines, its time if over an hour: epochs x seconds per epoch, from its
    first steps."""
    per_epoch = seconds_per_step * run.feed.steps_per_epoch
    epochs = run.cfg.epochs - epoch
    if per_epoch * epochs > COST_NOTE_SECONDS:
        log(f"note: about {_duration(per_epoch * epochs)} on this CPU ({epochs} epochs x "
            f"{_duration(per_epoch)}, measured on its first {COST_STEPS} steps); faster: a GPU "
            f"(--device cuda), or --epochs 1 for a try")

def log_progress(run, epoch, step, seconds_per_step):
    """A progress line within an epoch: the mean loss so far (a host sync), speed and time left."""
    cfg = run.cfg
    steps = run.feed.steps_per_epoch
    left = seconds_per_step * (steps - step)
    run_left = left + seconds_per_step * steps * (cfg.epochs - epoch - 1)
    log(f"  epoch {epoch + 1} step {step}/{steps}  loss {run.sums.loss.item() / step:.4f}  "
        f"{cfg.batch_size / seconds_per_step:,.0f} img/s  epoch eta {_duration(left)}  "
        f"run eta {_duration(run_left)}")

class CUDAGraphStep:
    """Calls step() eagerly for a few warm-up steps, then captures it once as a CUDA graph and
    replays it: the whole step (forward, backward, optimizer, metric sums) becomes one launch
    instead of hundreds, which at batch 64 is what the GPU waits for. step() must read and write
    only tensors that outlive the graph and are updated in place, and advance the device counter
    `step_counter` by one. A capture that fails, or that did not record the step, is not trusted:
    the run goes on eagerly and says so, `failure` keeping the first reason."""
    def __init__(self, step, step_counter, warmup_steps=3):
        self.step = step
        self.step_counter = step_counter
        self.warmup_left = warmup_steps
        self.graph = None
        self.failure = None
        # A stream of this step's own, on the counter's device, for the warm-up and the capture:
        # torch's default capture stream is made once per process, on the device current at the
        # first capture, so a second run on another GPU in the same process would capture on the
        # first one's stream.
        self.stream = torch.cuda.Stream(device=step_counter.device)

    def _fail(self, why, step_done=False):
        self.graph = None
        self.failure = why
        log(f"warning: the CUDA graph of the training step failed ({why}); training goes on "
            "eagerly (--graph off skips the attempt)")
        if not step_done:
            self()

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        elif self.warmup_left > 0 or self.failure is not None:
            # Real training steps, run eagerly on a side stream as capture requires: they autotune
            # cuDNN, which the captured step then reuses.
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.step()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.warmup_left -= 1
        else:
            self.capture()

    def capture(self):
        """Captures the step, then replays it once: that replay is the step's first run. The counter
        is read three times (host syncs, once per run): a capture records the step without running
        it, so the counter must not move during the capture, and must move by exactly one in the
        replay. A counter that moved during the capture means the step's kernels went to another
        device or stream and ran there eagerly: the graph is empty, and this step is done."""
        graph = torch.cuda.CUDAGraph()
        before = self.step_counter.item()
        try:
            # thread_local: the epoch planner's thread may run Python meanwhile; it makes no CUDA
            # calls
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.step()
        # the root cause, not capture_end's complaint about the aborted capture
        except RuntimeError as e:
            while isinstance(e.__context__, RuntimeError):
                e = e.__context__
            return self._fail(str(e).splitlines()[0])
        after_capture = self.step_counter.item()
        if after_capture != before:
            return self._fail("the captured graph is empty: the step ran during the capture "
                              "instead of being recorded", step_done=True)
        graph.replay()
        if self.step_counter.item() != before + 1:
            return self._fail("the captured graph is empty: its replay did not run the step")
        self.graph = graph

def train_step(run):
    """One optimisation step on the feed's next batch of uint8 images, entirely on the device,
    without a host sync: the eager loop calls it, and the CUDA graph is a capture of it, so the two
    cannot drift apart. The teacher's outputs come from its cache (a part of the batch) or from the
    live teacher; --method ce has none."""
    images, labels, cached_teacher = run.feed.next_batch()
    x = normalize(images, run.data.mean, run.data.std).contiguous(memory_format=run.memory_format)
    teacher = None
    if cached_teacher is not None:  # the teacher's feature and logits, side by side
        widths = [cached_teacher.shape[1] - run.data.num_classes, run.data.num_classes]
        teacher = Outputs(*cached_teacher.split(widths, dim=1))
    elif run.live_teacher is not None:
        teacher = run.live_teacher(x)
    losses, logits = run.distiller(x, labels, teacher)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(losses.total).backward()
    # fused SGD: reads run.lr on the device, and a scaler's scale without a sync
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.sums.add(losses, logits, labels)

# --- the data feed: where each step's batch comes from --------------------------------------------

def lr_at(cfg, epoch):
    """Step decay: epoch counts from 0, so with milestone 150 the 151st epoch is the first at
    lr * rate."""
    milestones = [int(m) for m in cfg.lr_decay_epochs.split(",") if m.strip()]
    return cfg.lr * cfg.lr_decay_rate ** sum(epoch >= m for m in milestones)

class EpochPlan(NamedTuple):
    """An epoch's draws, made on the CPU: which image goes where, its crop and flip, and its cached
    teacher rows."""
    order: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    # int16 bit patterns of bfloat16, from the teacher cache
    teacher_rows: Optional[np.ndarray] = None

def plan_epoch(seed, epoch, n_train, n_used):
    """The epoch's permutation and augmentation, from a generator of (seed, epoch) alone: resuming
    after any epoch redraws exactly what an uninterrupted run draws. The last partial batch is
    dropped."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_train, generator=g)
    dy, dx, flip = augmentation_draws(n_train, g)
    return EpochPlan(order[:n_used], dy[:n_used], dx[:n_used], flip[:n_used])

class ResidentFeed:
    """CIFAR-style training data on the device. prepare_epoch(epoch, steps_done) shuffles, crops and
    flips the whole epoch at once into buffers allocated once and refilled in place (a CUDA graph
    keeps reading the same memory), with the epoch's cached teacher rows if there is a cache.
    next_batch() returns this process's part of global batch `next_step` (a device counter, set in
    place), read through an index computed on the device: on any number of processes."""
    def __init__(self, data, batch_size, local_batch, rank, seed, epochs, cache=None):
        n, c, h, w = data.train_x.shape
        device = data.train_x.device
        self.data = data
        self.batch_size = batch_size
        self.steps_per_epoch = n // batch_size
        n_used = self.steps_per_epoch * batch_size
        self.planner = None
        self.plan = functools.partial(plan_epoch, seed, n_train=n, n_used=n_used)
        if cache is not None:  # the next epoch's rows are read from disk while this one trains
            self.planner = cache.planner(seed, n, n_used, epochs)
            self.plan = self.planner.plan
        # NHWC: a gather of rows keeps the layout channels_last
        self.images = torch.empty(n_used, h, w, c, dtype=torch.uint8, device=device)
        self.labels = torch.empty(n_used, dtype=torch.long, device=device)
        self.teacher = None
        if cache is not None:
            width = cache.feature_dim + cache.num_classes
            self.teacher = torch.empty(n_used, width, dtype=torch.bfloat16, device=device)
        # the epoch's next step, advanced by the step itself
        self.next_step = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = rank * local_batch + torch.arange(local_batch, device=device)
        self.plan_wait = 0.0

    def prepare_epoch(self, epoch, steps_done=0):
        device = self.images.device
        start = time.time()
        plan = self.plan(epoch)
        self.plan_wait = time.time() - start  # the cache's rows can keep us waiting
        order = plan.order.to(device)
        images = crop_flip(self.data.train_x[order], plan.dy.to(device), plan.dx.to(device),
                           plan.flip.to(device))
        self.images.copy_(images.permute(0, 2, 3, 1))
        self.labels.copy_(self.data.train_y[order])
        if self.teacher is not None:
            self.planner.upload(plan.teacher_rows, self.teacher)
        self.next_step.fill_(steps_done)

    def next_batch(self):
        """(uint8 images N x C x H x W with channels_last strides, labels, cached teacher rows or
        None)."""
        idx = self.next_step * self.batch_size + self.offsets
        self.next_step += 1
        images = self.images.index_select(0, idx).permute(0, 3, 1, 2)
        teacher = None
        if self.teacher is not None:
            teacher = self.teacher[idx]
        return images, self.labels.index_select(0, idx), teacher

    def close(self):
        if self.planner is not None:
            self.planner.close()

class LoaderFeed:
    """ImageNet: DataLoader workers decode and augment; each process reads its shard
    (DistributedSampler). A resumed epoch skips, by index, the images its steps read; the workers'
    random state is not saved: resumed, a run draws other crops and flips than it would have."""
    def __init__(self, data_set, local_batch, workers, device, seed):
        self.device = device
        self.plan_wait = 0.0
        self.local_batch = local_batch
        self.sampler = torch.utils.data.distributed.DistributedSampler(
            data_set, num_replicas=_world_size(), rank=_rank(), shuffle=True, seed=seed,
            drop_last=True)
        self.order = []  # the loader's sampler: this epoch's shard, from the step it starts at
        self.loader = image_loader(data_set, local_batch, workers, device, self.order, True)
        self.steps_per_epoch = len(self.sampler) // local_batch

    def prepare_epoch(self, epoch, steps_done=0):
        self.sampler.set_epoch(epoch)
        self.order[:] = list(self.sampler)[steps_done * self.local_batch:]
        self.batches = iter(self.loader)

    def next_batch(self):
        images, labels = next(self.batches)
        images = images.to(self.device, non_blocking=True)
        return images, labels.to(self.device, non_blocking=True), None

    def close(self):
        pass

def build_feed(run, rank, cache):
    """The training batches: ResidentFeed for CIFAR-style data (with the teacher cache's rows, if
    any), LoaderFeed for ImageNet."""
    cfg = run.cfg
    local_batch = cfg.batch_size // run.world_size
    if run.data.train_x is None:
        return LoaderFeed(run.data.train_set, local_batch, cfg.workers, run.device, cfg.seed)
    return ResidentFeed(run.data, cfg.batch_size, local_batch, rank, cfg.seed, cfg.epochs, cache)

# --- the teacher and the step as train_epoch calls it ---------------------------------------------

class LiveTeacher:
    """The frozen teacher's forward pass: x -> its Outputs (feature, logits, and for sp its map),
    under autocast and without gradients; torch.compile'd with --compile."""
    def __init__(self, teacher, method, autocast, compile=False):
        self.taps = Taps(teacher, teacher.map_layer if method == "sp" else None)
        self.forward = teacher
        if compile:
            self.forward = torch.compile(teacher)
        self.autocast = autocast

    def __call__(self, x):
        # no_grad, not inference_mode: the losses save the teacher's outputs for backward, which
        # inference tensors refuse
        with torch.no_grad(), self.autocast:
            logits = self.forward(x)
        return Outputs(self.taps.feature, logits, self.taps.feature_map)

def build_step(run):
    """The step train_epoch calls: train_step on this run, replayed as one CUDA graph under
    --graph on (whose warm-up and capture are CUDAGraphStep's)."""
    step = functools.partial(train_step, run)
    if run.cfg.graph == "on":
        return CUDAGraphStep(step, run.feed.next_step)
    return step

# --- setting up a run: the device, the models, the optimizer, the feed and the step ---------------

class EpochSums:
    """What every step adds to within an epoch, on the device and without a host sync: the sums over
    its batches of their mean loss, CE and distillation loss, and the count of correct predictions.
    Updated in place, as a CUDA graph needs."""
    NAMES = ("loss", "ce", "distill", "correct")

    def __init__(self, device):
        self.loss = torch.zeros((), device=device)
        self.ce = torch.zeros((), device=device)
        self.distill = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)

    def add(self, losses, logits, labels):
        self.loss += losses.total.detach()
        self.ce += losses.ce.detach()
        self.distill += losses.distill.detach()
        self.correct += (logits.argmax(1) == labels).sum()

    def zero_(self):
        for name in self.NAMES:
            getattr(self, name).zero_()

    def totals(self, world_size):
        """{name: the sum over every process}, as numbers: a host sync."""
        sums = torch.stack([self.loss, self.ce, self.distill, self.correct.float()])
        if world_size > 1:
            dist.all_reduce(sums)
        return dict(zip(self.NAMES, sums.tolist()))

@dataclass
class Run:
    """One training run: made by prepare_run, advanced by train_epoch, written by save_checkpoint
    and finish_run."""
    cfg: Config  # resolved (resolve_config)
    device: torch.device
    world_size: int
    data: Data
    student: nn.Module  # the plain student: what model.pt holds
    loss_module: nn.Module  # projectors / CRD embeddings, dropped after training
    distiller: nn.Module  # student + loss_module + loss, wrapped by DDP or torch.compile when asked
    teacher: Optional[nn.Module]  # the frozen teacher (None for --method ce)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    # on the device: set each epoch in place, read by the fused optimizer (and graph)
    lr: torch.Tensor
    autocast: object
    memory_format: torch.memory_format
    sums: EpochSums
    # None when the teacher's outputs come from its cache
    live_teacher: Optional[LiveTeacher] = None
    feed: Optional[object] = None  # ResidentFeed or LoaderFeed: the training batches
    step: Optional[object] = None  # one training step (build_step): train_step, or its CUDA graph
    start_epoch: int = 0
    resumed_steps: int = 0  # the steps of start_epoch done before a stop within it
    resumed_seconds: float = 0.0  # and the seconds they took
    epoch_clock: float = 0.0  # when this epoch began (time.time()), less its resumed_seconds
    # the training sessions of this run before this one (last.pt's), and this one (begin_segment)
    segments: list = dataclasses.field(default_factory=list)
    segment: Optional[dict] = None
    segment_clock: float = 0.0  # when this session's training began (time.time())
    last_saved: float = dataclasses.field(default_factory=time.time)  # when last.pt was written
    stop_signals: Optional["StopSignals"] = None  # its signum: a signal that asked the run to stop
    history: list = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"top1": -1.0, "top5": -1.0, "epoch": 0})
    teacher_eval: Optional[dict] = None
    teacher_provenance: Optional[dict] = None  # where the teacher's weights came from
    student_start: Optional[dict] = None  # where the student's start weights came from

def setup_run(cfg):
    """A Run ready for its first step, from options as parsed: for tools and tests that drive the
    loop themselves (train() resolves, locks its folder, then calls prepare_run)."""
    resolved, notes = resolve_config(cfg)
    return prepare_run(resolved, notes, given=cfg)

def prepare_run(cfg, notes, given):
    """Everything a run needs, from its resolved config to the first step. notes: resolve_config's;
    given: the options as parsed, which the printed config tells apart from the resolved ones."""
    device = torch.device(cfg.device)
    rank, world = setup_torch(device, cfg.deterministic)
    checkpoint = checkpoint_to_resume(cfg)
    if cfg.method != "ce" and not cfg.teacher_weights:  # before the data, which takes a while
        models_module().require_teacher_file(cfg.teacher, cfg.teacher_ckpt)
    notes = list(notes)
    if world > 1 or cfg.dataset in FOLDER_DATASETS:
        notes.append(f"processes: {world} x batch {cfg.batch_size // world} = global batch "
                     f"{cfg.batch_size}; lr {cfg.lr} as given (never rescaled by batch size)")
    data = load_data(cfg, device)
    if data.n_train < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} exceeds the {data.n_train} training images")
    run, amp_dtype = build_run(cfg, device, world, data, resuming=checkpoint is not None)
    # after the data and the checkpoints are read: an error in them is the first line, with no
    # notes before it
    log("\n".join(["config (where not a default; all of it goes into metrics.json):",
                   *config_lines(given, cfg), *(f"note: {note}" for note in notes)]))
    if checkpoint is not None:
        restore(run, checkpoint)
    elif cfg.resume:
        log(f"note: nothing to resume in {cfg.run_dir}; starting fresh")
    cache = None
    if run.teacher is not None:
        cache = setup_teacher(run, amp_dtype)
    run.distiller = wrap_distiller(run.distiller, cfg, device, world)
    run.feed = build_feed(run, rank, cache)
    run.step = build_step(run)
    run.distiller.train()
    # stopped within an epoch: after DDP, which can give every process the buffers of process 0
    if checkpoint is not None and checkpoint["epoch_state"] is not None:
        restore_epoch_state(run, checkpoint["epoch_state"])
    return run

def build_run(cfg, device, world, data, resuming=False):
    """The Run: teacher, student, projectors and optimizer on the device; and the autocast dtype.
    resuming: last.pt will restore the student, whose start weights are not read again."""
    memory_format, amp_dtype, autocast = memory_format_and_autocast(cfg.amp, device)
    teacher = None
    if cfg.method != "ce":
        teacher = models_module().load_teacher(cfg.teacher, cfg.teacher_ckpt, data.num_classes,
                                               cfg.teacher_weights, input_size(cfg))
        teacher = teacher.to(device, memory_format=memory_format)
    torch.manual_seed(cfg.seed)  # after the teacher: every method gets the same initial student
    student, start = build_student(cfg, data.num_classes, resuming)
    if cfg.method == "sp":  # before any step: one line where a model has no last-stage map
        models_module().require_map_layer(student, cfg.student)
        models_module().require_map_layer(teacher, cfg.teacher)
    if cfg.sync_bn and world > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    d_teacher = 0
    if teacher is not None:
        d_teacher = classifier_of(teacher).in_features
    loss_module = build_loss_module(cfg, classifier_of(student).in_features, d_teacher).to(device)
    lr = torch.tensor(cfg.lr, device=device)
    student.to(device, memory_format=memory_format)
    parameters = [*student.parameters(), *loss_module.parameters()]
    optimizer = build_optimizer(cfg, parameters, lr, fused=device.type == "cuda")
    run = Run(cfg=cfg, device=device, world_size=world, data=data, student=student,
              loss_module=loss_module, distiller=Distiller(cfg, student, loss_module, autocast),
              teacher=teacher, optimizer=optimizer,
              scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16), lr=lr,
              autocast=autocast, memory_format=memory_format, sums=EpochSums(device),
              student_start=start)
    return run, amp_dtype

def build_student(cfg, num_classes, resuming):
    """The student and where its start weights came from: --seed's initialisation, timm's
    pretrained weights (--pretrained) or a file (--weights), with a new head where the class count
    differs. Resuming, last.pt holds its weights: nothing is downloaded or read, and the provenance
    comes back from last.pt."""
    pretrained = cfg.pretrained and not resuming
    student = models_module().build_model(cfg.student, num_classes, input_size(cfg), pretrained)
    start = {"how": f"initialised from --seed {cfg.seed}"}
    if pretrained:
        start = models_module().timm_provenance(student, cfg.student, num_classes)
    if cfg.weights and not resuming:
        start = models_module().load_start_weights(student, cfg.student, cfg.weights)
    if not resuming and (cfg.pretrained or cfg.weights):
        head = "its head"
        if start["new_head"]:
            head = "a new head"
        log(f"student {cfg.student} starts from {cfg.weights or start['how']} with {head}")
    return student, start

def build_optimizer(cfg, parameters, lr, fused):
    """SGD with momentum, its buffers made now (with_momentum_buffers). fused on CUDA: one kernel
    for all parameters, reading the lr tensor on the device, as the CUDA graph needs."""
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, fused=fused)
    with_momentum_buffers(optimizer)
    return optimizer

def with_momentum_buffers(optimizer):
    """Every parameter's momentum buffer made now, as zeros, where it has none. SGD makes them at
    its first step with empty_like, and fused SGD under a GradScaler writes nothing when that step
    overflows (routine at fp16's first scale, 2^16): the next step would read uninitialised memory.
    Zeros give the same first step (0.9 * 0 + g is g, with dampening 0), and the buffers exist
    before the CUDA graph is captured."""
    for group in optimizer.param_groups:
        if group["momentum"] == 0:  # SGD then reads no buffer
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                # in p's memory format (channels_last)
                state["momentum_buffer"] = torch.zeros_like(p)

def setup_teacher(run, amp_dtype):
    """The teacher's test accuracy (once per run, in float32, before its weights go to the autocast
    dtype), then the teacher made fast: weights in the autocast dtype, and either its output cache
    (returned) or its forward pass run live (run.live_teacher)."""
    cfg = run.cfg
    data = run.data
    run.teacher_provenance = teacher_provenance(cfg.teacher_ckpt, cfg.teacher_weights)
    if run.teacher_eval is None:
        images = "test images"
        if data.test_x is None:
            images = "validation images"
        log(f"evaluating the teacher {cfg.teacher} on the {images} (once per run) ...")
        run.teacher_eval = evaluate(run.teacher, data, cfg.eval_batch_size, run.memory_format)
        source = cfg.teacher_weights or cfg.teacher_ckpt
        log(f"teacher {cfg.teacher} from {source}: test top-1 {run.teacher_eval['top1']:.2f}% "
            f"top-5 {run.teacher_eval['top5']:.2f}%")
        near_chance = run.teacher_eval["top1"] < 2 * 100 / data.num_classes
        if near_chance and "MAKELEVEL" not in os.environ:  # under make, its evaluation step warns
            log(f"warning: the teacher is near chance ({100 / data.num_classes:.1f}%): is {source} "
                f"the right file?")
    teacher_for_speed(run.teacher, amp_dtype, run.memory_format)
    if cfg.teacher_cache == "on":
        import teacher_cache
        return teacher_cache.open_for_run(run)
    run.live_teacher = LiveTeacher(run.teacher, cfg.method, run.autocast, cfg.compile)
    return None

def teacher_for_speed(teacher, amp_dtype, memory_format):
    """The frozen teacher's convolution and linear weights stored in the autocast dtype (autocast
    would re-cast the float32 weights every step) and channels_last; BatchNorm stays float32, as
    autocast runs it."""
    for m in teacher.to(memory_format=memory_format).modules():
        if amp_dtype is not None and isinstance(m, (nn.Conv2d, nn.Linear)):
            m.to(amp_dtype)
    return teacher

def wrap_distiller(distiller, cfg, device, world):
    """The distiller as the step calls it: in DistributedDataParallel under torchrun, compiled with
    --compile."""
    if world > 1:
        distiller = wrap_ddp(distiller, device)
    if cfg.compile:
        distiller = torch.compile(distiller)
    return distiller

def wrap_ddp(module, device):
    """DistributedDataParallel around `module`. Buffers are averaged once per epoch (train_epoch)
    instead of broadcast from process 0 at every forward: CRD-lite's queues are the same everywhere
    and would move megabytes per step for nothing. (torch 2.14 deprecates broadcast_buffers for
    forward_sync_buffers; torch 2.11 has only broadcast_buffers.)"""
    ddp = nn.parallel.DistributedDataParallel
    no_sync = "broadcast_buffers"
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        no_sync = "forward_sync_buffers"
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index]
    return ddp(module, device_ids=device_ids, **{no_sync: False})

def memory_format_and_autocast(amp, device):
    """(memory format, autocast dtype or None, autocast context) of the models on `device` for
    --amp. The autocast cache is off: each weight is used once per step anyway, and a cache must not
    outlive a CUDA graph capture."""
    amp_dtype = AMP_DTYPES[amp]  # None on the CPU: resolve_config turned amp off there
    autocast = contextlib.nullcontext()
    if amp_dtype is not None:
        autocast = torch.autocast("cuda", dtype=amp_dtype, cache_enabled=False)
    memory_format = torch.contiguous_format
    if device.type == "cuda":
        memory_format = torch.channels_last
    return memory_format, amp_dtype, autocast

def setup_torch(device, deterministic=False):
    """Makes `device` the current CUDA device (streams and graphs are made on the current one,
    whatever tensors say), joins torchrun's process group when started by torchrun, and sets the
    backend switches. Returns (rank, world size). Deterministic mode is honest: no cudnn.benchmark
    behind it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if deterministic:
        # cuBLAS needs it for determinism
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # (the call imports torch._dynamo: seconds, so only when it changes something)
    if deterministic != torch.are_deterministic_algorithms_enabled():
        # warn_only: a CUDA op without a deterministic kernel is named in a warning instead of
        # ending the run
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # static shapes: kernels tuned on the first step serve every later one; float32 on TF32 cores
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return _rank(), world

def default_workers():
    """ImageNet loader processes per GPU: this machine's CPUs shared by the processes torchrun
    started on it."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

# --- the bookkeeping: the lock, resuming, the epoch's state, check points, signals ----------------

# check points per epoch (save_or_stop), where a run writes last.pt or stops
# A CPU run measured over its first 5 steps says so in its first lines if it will take over an hour.
COST_STEPS = 5
COST_NOTE_SECONDS = 3600
CHECKS_PER_EPOCH = 200
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)]

class Stopped(KeyboardInterrupt):
    """A run a signal stopped: at a check point, with last.pt written (kept), or during its set-up,
    before anything was written. Like Ctrl-C, it passes every `except Exception`; main() exits with
    128 + the signal's number, as a shell reports."""
    def __init__(self, signum, why, kept=True):
        super().__init__(signum, why)
        self.signum = signum
        self.why = why
        self.kept = kept

class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's --signal) for the whole of a run, set-up included. During the
    set-up (the data, the teacher's evaluation: a minute on a CPU) they stop the run at once: it has
    written nothing but its .lock, which run_dir_lock removes. Once training has begun they are only
    recorded (`signum`), and the next check point writes last.pt and stops. Only the main thread can
    take signal handlers: elsewhere (a test's thread) this does nothing."""
    def __init__(self):
        self.signum = None
        self.training = False
        self.previous = []

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = [(s, signal.signal(s, self.handle)) for s in STOP_SIGNALS]
        return self

    def handle(self, signum, frame):
        if not self.training:
            name = signal.Signals(signum).name
            raise Stopped(signum, f"{name}: stopped during set-up, before training "
                                  "began", kept=False)
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous:  # (None: a handler set outside Python)
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

@contextlib.contextmanager
def run_dir_lock(folder):
    """--run-dir, made if need be and held under an exclusive lock (its .lock file, open; POSIX
    only) while a run trains in it: a folder that cannot be written, or that another process trains
    in, is one line before any data is read, and a run that fails before writing anything leaves no
    folder behind."""
    made = []  # the folders this makes, outermost first
    parent = folder
    while parent and not os.path.isdir(parent):
        made.insert(0, parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(os.path.join(folder, ".lock"), "a+")
        with contextlib.suppress(ImportError):
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise UserError(f"{folder} is being trained by another process (pid "
                        f"{lock.read().strip() or '?'}); wait for it, or use another "
                        "--run-dir") from None
    except OSError as e:
        raise UserError(f"cannot write in --run-dir {folder} ({e.strerror or e}); choose "
                        "another") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        yield
    finally:
        os.remove(lock.name)
        lock.close()
        for made_here in reversed(made):  # only those the run left empty
            with contextlib.suppress(OSError):
                os.rmdir(made_here)

def checkpoint_to_resume(cfg):
    """The contents of --run-dir's last.pt when resuming, else None; refuses to touch a run it
    should not: other settings than RESUMABLE_CHANGES, or another teacher file by its sha256 (by
    path if last.pt has none)."""
    last_path = os.path.join(cfg.run_dir, "last.pt")
    run_files = [os.path.join(cfg.run_dir, f) for f in ("last.pt", "model.pt", "metrics.json")]
    if not cfg.resume and not cfg.overwrite and any(map(os.path.exists, run_files)):
        raise UserError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, "
                        "--overwrite to start over, or another --run-dir")
    if not (cfg.resume and os.path.isfile(last_path)):
        return None
    checkpoint = models_module().load_checkpoint_file(last_path, "resume checkpoint")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise UserError(f"{last_path} is not a projkd last.pt; delete it or use --overwrite")
    if "loss_module" not in checkpoint or "steps_done" not in checkpoint:
        raise UserError(f"{last_path} was written by an older projkd, whose projectors this one "
                        f"cannot load; use --overwrite to start over")
    saved = checkpoint["config"]
    sha = checkpoint.get("teacher_sha256")
    resumable = RESUMABLE_CHANGES + ("teacher_ckpt",) if sha else RESUMABLE_CHANGES
    diffs = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(cfg).items()
             if k not in resumable and saved.get(k) != v]
    if diffs:
        raise UserError(f"{cfg.run_dir} holds a run with other settings ({'; '.join(diffs)}); "
                        f"use another --run-dir, or --overwrite to start over")
    given_sha = sha  # the teacher by its content (a missing file is setup_run's to report)
    if sha and os.path.isfile(cfg.teacher_ckpt):
        given_sha = file_sha256(cfg.teacher_ckpt)
    if given_sha != sha:
        raise UserError(f"{cfg.run_dir} was trained with another teacher file (sha256 "
                        f"{sha[:12]}...) than {cfg.teacher_ckpt} (sha256 {given_sha[:12]}...): "
                        "pass that one as --teacher-ckpt, or --overwrite to start over")
    begun = checkpoint["epoch"]
    if checkpoint["steps_done"]:  # stopped within that epoch
        begun += 1
    if begun > cfg.epochs:
        raise UserError(f"{cfg.run_dir} has begun epoch {begun}, beyond --epochs {cfg.epochs}")
    return checkpoint

def restore(run, checkpoint):
    """The state of an interrupted run, from its last.pt, on whatever device this run has."""
    run.student.load_state_dict(checkpoint["student"])
    run.loss_module.load_state_dict(checkpoint["loss_module"])
    chosen = [{k: g[k] for k in ("fused", "foreach")} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    for group, settings in zip(run.optimizer.param_groups, chosen):
        # load_state_dict brings back the saved lr (a number: this run's is a device tensor) and the
        # saved fused/foreach (a CPU run's): SGD's per-parameter path would sync with the host per
        # parameter
        group.update(settings, lr=run.lr)
    # laid out like their parameters (channels_last on CUDA)
    for p, state in run.optimizer.state.items():
        if state.get("momentum_buffer") is not None:
            state["momentum_buffer"] = torch.empty_like(p).copy_(state["momentum_buffer"])
    with_momentum_buffers(run.optimizer)  # a last.pt saved before any step has none
    # a disabled GradScaler (bf16, off) saved {}, which an enabled one refuses to load
    if checkpoint["scaler"]:
        run.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if run.device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], run.device)
    run.start_epoch = checkpoint["epoch"]
    run.resumed_steps = checkpoint["steps_done"]
    # (a last.pt of an earlier projkd has neither: its sessions' time is not known)
    run.resumed_seconds = checkpoint.get("epoch_seconds", 0.0)
    run.segments = checkpoint.get("segments", [])
    run.best = checkpoint["best"]
    run.history = checkpoint["history"]
    run.teacher_eval = checkpoint["teacher_eval"]
    run.student_start = checkpoint.get("student_start", run.student_start)
    where = f"after epoch {run.start_epoch}"
    if run.resumed_steps:
        where = f"at step {run.resumed_steps + 1} of epoch {run.start_epoch + 1}"
    if run.data.train_x is None:  # LoaderFeed
        name = FOLDER_NAMES[run.cfg.dataset][0]
        where += f" ({name}: in the same order of images, with new random crops and flips)"
    saved_epochs = checkpoint["config"]["epochs"]
    if run.cfg.epochs != saved_epochs:
        where += f"; note: extending it from {saved_epochs} to {run.cfg.epochs} epochs"
    log(f"resuming {run.cfg.run_dir} {where}")

def epoch_state(run):
    """{name: tensor} of what each process accumulates within an epoch: its EpochSums, and its
    BatchNorm statistics (train_epoch averages those over the processes at the epoch's end)."""
    state = {name: getattr(run.sums, name) for name in EpochSums.NAMES}
    for name, buffer in run.student.named_buffers():
        if buffer.is_floating_point():
            state[f"student.{name}"] = buffer
    return state

def gathered_epoch_state(run):
    """{name: processes x values}: every process's epoch_state, for last.pt (under torchrun, one
    all_gather: a collective every process joins)."""
    state = epoch_state(run)
    flat = torch.cat([t.double().flatten() for t in state.values()])
    rows = _gather_rows(flat[None]).cpu()
    columns = rows.split([t.numel() for t in state.values()], dim=1)
    return dict(zip(state, columns))

def restore_epoch_state(run, saved):
    """This process's epoch_state from last.pt's, each tensor by its name, with one row per process
    of the stopped run. On another number of processes: the rows' mean, and the count of correct
    predictions shared out (the epoch's sums stay right)."""
    for name, tensor in epoch_state(run).items():
        rows = saved[name]
        values = rows.mean(0)
        if len(rows) == run.world_size:
            values = rows[_rank()]
        if name == "correct":
            values = values * (len(rows) / run.world_size)
        tensor.copy_(values.view_as(tensor))

def save_or_stop(run, epoch, steps_done=0, seconds_per_step=0.0):
    """After `steps_done` steps of `epoch`, the same on every process: last.pt once
    --checkpoint-seconds have passed, and the end of a run a signal asked to stop. Under torchrun:
    agreed by an all_reduce, which also agrees on the slowest process's `seconds_per_step` since the
    last check point; returned, it spaces the next one (train_epoch)."""
    save = time.time() - run.last_saved >= run.cfg.checkpoint_seconds
    stop = 0  # the signal's number
    if run.stop_signals is not None and run.stop_signals.signum is not None:
        stop = run.stop_signals.signum
    if run.world_size > 1:
        flags = torch.tensor([float(save), float(stop), seconds_per_step], dtype=torch.float64,
                             device=run.device)
        dist.all_reduce(flags, dist.ReduceOp.MAX)
        save_flag, stop_flag, seconds_per_step = flags.tolist()  # one host sync, not three
        save = bool(save_flag)
        stop = int(stop_flag)
    if save or stop:
        ended_by = None
        if stop:
            ended_by = signal.Signals(stop).name
        save_checkpoint(run, epoch, steps_done, ended_by)
    if stop:
        if run.world_size > 1:
            dist.barrier()  # process 0 has written last.pt before any process exits
        where = f"epoch {epoch}"
        if steps_done:
            where = f"step {steps_done} of epoch {epoch + 1}"
        raise Stopped(stop, f"{signal.Signals(stop).name}: stopped after {where}, kept in "
                            f"{os.path.join(run.cfg.run_dir, 'last.pt')}")
    return seconds_per_step

def multiprocess_check_seconds(cfg):
    """The least training time between two check points under torchrun: each is an all_reduce and a
    host sync, which every ~3rd step (CIFAR) would cost the GPUs their lead. A shorter
    --checkpoint-seconds (a test's 0) asks for more."""
    return min(1.0, cfg.checkpoint_seconds)

def save_checkpoint(run, epoch, steps_done=0, ended_by=None):
    """last.pt: everything to continue exactly after `steps_done` steps of `epoch` (0: before it),
    written by process 0; within an epoch, every process's epoch_state (under torchrun a collective
    gathers them) and the seconds the epoch has taken so far. ended_by: the signal that stops the
    run here, if one does."""
    epoch_state_rows = None
    epoch_seconds = 0.0
    if steps_done:
        epoch_state_rows = gathered_epoch_state(run)
        epoch_seconds = time.time() - run.epoch_clock
    run.last_saved = time.time()
    if _rank() != 0:
        return
    optimizer = run.optimizer.state_dict()
    for group in optimizer["param_groups"]:
        # a plain number in the file; restore() points it back at the device tensor
        group["lr"] = float(group["lr"])
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    checkpoint = {
        "config": dataclasses.asdict(run.cfg), "epoch": epoch, "steps_done": steps_done,
        "epoch_state": epoch_state_rows, "student": run.student.state_dict(),
        "loss_module": run.loss_module.state_dict(), "optimizer": optimizer,
        "scaler": run.scaler.state_dict(), "rng": rng, "best": run.best, "history": run.history,
        "teacher_eval": run.teacher_eval, "student_start": run.student_start,
        "epoch_seconds": epoch_seconds,
        "segments": segments_so_far(run, epoch, steps_done, ended_by),
        # the teacher file's identity, checked on resuming
        "teacher_sha256": (run.teacher_provenance or {}).get("sha256"),
    }
    save(checkpoint, os.path.join(run.cfg.run_dir, "last.pt"))

def begin_segment(run):
    """This session's record, from where it begins: a run resumed twice trained in three."""
    run.segment_clock = time.time()
    run.segment = {"began_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "from": {"epochs": run.start_epoch, "steps": run.resumed_steps}}

def segments_so_far(run, epoch, steps_done, ended_by):
    """The run's sessions, this one as far as `steps_done` steps of `epoch`: where each began and
    got to ({"epochs": done, "steps": of the next}), its seconds of training (and evaluation), and
    what ended it: "done", a signal's name, or None in a last.pt (a session listed with None was
    killed, interrupted or failed after that check point; the next session took its later steps
    again)."""
    if run.segment is None:  # a loop driven without train()
        return list(run.segments)
    this_session = {**run.segment, "to": {"epochs": epoch, "steps": steps_done},
                    "seconds": round(time.time() - run.segment_clock, 3), "ended_by": ended_by}
    return run.segments + [this_session]

def record_epoch(run, epoch, stats, result, seconds):
    """The epoch's line in the history (log.csv, written now) and in the log; the best top-1."""
    cfg = run.cfg
    if result["top1"] > run.best["top1"]:
        run.best = {"top1": result["top1"], "top5": result["top5"], "epoch": epoch + 1}
    distill_name = DISTILL_LOSS_NAMES.get(cfg.method)
    row = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch), "train_loss": round(stats["loss"], 6),
           "train_ce": round(stats["ce"], 6)}
    if distill_name:
        row[f"train_{distill_name}"] = round(stats["distill"], 6)
    row.update({"train_acc": round(stats["acc"], 4), "test_top1": round(result["top1"], 4),
                "test_top5": round(result["top5"], 4),
                "between_class_cosine": round(result["between_class_cosine"], 6),
                "seconds": round(seconds, 3), "images_per_s": round(stats["images_per_s"], 1),
                "plan_wait_s": round(run.feed.plan_wait, 3)})
    run.history.append(row)
    if _rank() == 0:
        save(run.history, os.path.join(cfg.run_dir, "log.csv"))
    this_session = run.history[run.start_epoch:]
    seconds_per_epoch = sum(e["seconds"] for e in this_session) / len(this_session)
    line = f"epoch {epoch + 1}/{cfg.epochs}  lr {row['lr']:.4g}  loss {row['train_loss']:.4f}"
    if distill_name:
        line += f" (ce {row['train_ce']:.4f}, {distill_name} {row[f'train_{distill_name}']:.4f})"
    line += (f"  train {row['train_acc']:.2f}%  test {row['test_top1']:.2f}% "
             f"(best {run.best['top1']:.2f}%)  {row['images_per_s']:,.0f} img/s  eta "
             f"{_duration(seconds_per_epoch * (cfg.epochs - epoch - 1))}")
    if cfg.teacher_cache == "on":
        line += f"  (waited {row['plan_wait_s']:.2f} s for cached teacher rows)"
    log(line)

def finish_run(run):
    """model.pt and metrics.json; returns the metrics. Under torchrun the processes first check,
    with a checksum each, that they ended with the same weights."""
    cfg = run.cfg
    history = run.history
    best = run.best
    last = history[-1]
    if run.world_size > 1:
        floats = [t for t in run.student.state_dict().values() if t.is_floating_point()]
        checksum = torch.stack([t.double().sum() for t in floats]).sum()
        sums = [torch.zeros(()).to(checksum) for _ in range(run.world_size)]
        dist.all_gather(sums, checksum)
        if any(s.item() != sums[0].item() for s in sums):
            raise RuntimeError(f"the {len(sums)} processes ended with different weights: "
                               f"{[s.item() for s in sums]}")
        log(f"the weights are the same in all {len(sums)} processes (checksum "
            f"{sums[0].item():.6f})")
    images_per_epoch = run.feed.steps_per_epoch * cfg.batch_size
    # every epoch's seconds, the part before a stop included: the sessions' training time
    wall_seconds = sum(h["seconds"] for h in history)
    segments = segments_so_far(run, cfg.epochs, 0, "done")
    train_seconds = sum(images_per_epoch / h["images_per_s"] for h in history)
    teacher = run.teacher_eval or {}
    metrics = {"config": dataclasses.asdict(cfg), "seed": cfg.seed, "last_top1": last["test_top1"],
               "last_top5": last["test_top5"], "best_top1": best["top1"], "best_top5": best["top5"],
               "best_epoch": best["epoch"], "between_class_cosine": last["between_class_cosine"],
               "teacher_top1": teacher.get("top1"), "teacher_top5": teacher.get("top5"),
               "epochs": cfg.epochs, "teacher_provenance": run.teacher_provenance,
               "student_start": run.student_start,
               "wall_seconds": round(wall_seconds, 1), "segments": segments,
               "images_per_s": round(images_per_epoch * len(history) / train_seconds, 1),
               "world_size": run.world_size, "device": device_name(run.device),
               "torch": torch.__version__, "code": code_version(), "history": history}
    if _rank() == 0:
        save(run.student.state_dict(), os.path.join(cfg.run_dir, "model.pt"))
        save(metrics, os.path.join(cfg.run_dir, "metrics.json"))
    took = _duration(wall_seconds)
    if len(segments) > 1:
        took += f" in {len(segments)} sessions"
    log(f"done: {cfg.student} ({cfg.method}) last top-1 {last['test_top1']:.2f}% top-5 "
        f"{last['test_top5']:.2f}%, best top-1 {best['top1']:.2f}% (epoch {best['epoch']}), "
        f"{took}, {metrics['images_per_s']:,.0f} img/s -> "
        f"{os.path.join(cfg.run_dir, 'model.pt')}")
    return metrics

# --- the processes, the log and the files ---------------------------------------------------------

def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

log_label = ""  # put before each line: set by labelled_log while a run trains

def log(*args):
    if _rank() == 0:  # under torchrun one process speaks
        text = " ".join(map(str, args))
        print("\n".join(log_label + line for line in text.split("\n")), flush=True)

@contextlib.contextmanager
def labelled_log(run_dir):
    """Under make, where several runs share a terminal, each line of this run starts with its short
    name."""
    global log_label
    log_label = ""
    if "MAKELEVEL" in os.environ:
        log_label = f"[{os.path.join(*os.path.abspath(run_dir).split(os.sep)[-2:])}] "
    try:
        yield
    finally:
        log_label = ""

class WriteError(UserError):
    """A file that could not be written (a full disk, a read-only folder); the file it replaces is
    kept."""

def atomic_write(path, write):
    """write(tmp_path), then rename: a killed process never leaves a half-written file under `path`,
    and a write that fails (a full disk, a read-only folder) is one line naming the file and leaves
    nothing behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or e}); free space or choose another "
                         "folder") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)

def save(obj, path):
    """obj written to `path` atomically: a str as text, to .json as JSON, to .csv from a list of
    dicts, else torch.save."""
    if path.endswith(".csv") and not isinstance(obj, str):
        out = io.StringIO()
        # a resumed old run has fewer
        columns = list(dict.fromkeys(k for row in obj for k in row)) or ["epoch"]
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(obj)
        obj = out.getvalue()
    elif path.endswith(".json") and not isinstance(obj, str):
        obj = json.dumps(obj, indent=1) + "\n"
    def write(tmp):  # through a Python file, whose failed writes raise OSError
        with open(tmp, "w" if isinstance(obj, str) else "wb") as f:
            if isinstance(obj, str):
                return f.write(obj)
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's writer, failing after an OSError (a full disk)
                while e.__context__ is not None and not isinstance(e, OSError):
                    e = e.__context__
                raise (e if isinstance(e, OSError) else OSError(str(e).splitlines()[0])) from None
    atomic_write(path, write)

def code_version():
    """The git commit of this file's checkout, '+dirty' if it has uncommitted changes; 'unknown'
    outside git."""
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__))]
    try:
        commit, dirty = (  # a pair: the commit and what differs from it
            subprocess.run(git + args, capture_output=True, text=True, timeout=10).stdout.strip()
            for args in (["rev-parse", "--short=12", "HEAD"], ["status", "--porcelain", "-uno"]))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return commit + "+dirty" if dirty else commit

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, threads: {torch.get_num_threads()})"

def _duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"

# --------------------------------------------------------------------------------------------------
# 7. Evaluation: top-1/top-5 and the between-class cosine (the paper's Figure 2) of a model on the
#    test set, and `projkd.py eval`, which evaluates a model file alone and records what it
#    evaluated: the file's sha256 and the test set's. The pipeline's tables read those records;
#    every run records its teacher's provenance.

@torch.no_grad()
def evaluate(model, data, batch_size, memory_format):
    """Top-1 and top-5 accuracy (%) on the test set and the between-class cosine of the penultimate
    features, in float32. Under torchrun each process evaluates its share and the counts are summed
    over processes, so the result equals one process evaluating the whole set."""
    was_training = model.training
    device = data.mean.device
    taps = Taps(model.eval())
    # top-1, top-5 on the device; images counted here
    hits = torch.zeros(2, device=device, dtype=torch.long)
    n = 0
    class_sums = torch.zeros(data.num_classes, classifier_of(model).in_features, device=device)
    try:
        for images, labels in data.test_batches(batch_size):
            x = normalize(images, data.mean, data.std).contiguous(memory_format=memory_format)
            logits = model(x).float()
            best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1_hits = (best5[:, 0] == labels).sum()
            top5_hits = (best5 == labels[:, None]).any(1).sum()
            hits += torch.stack([top1_hits, top5_hits])
            n += len(labels)
            class_sums.index_add_(0, labels, taps.feature.float())
    finally:
        taps.remove()
        model.train(was_training)
    counts = torch.cat([hits, torch.tensor([n], device=device)])  # one upload, not one per batch
    if _world_size() > 1:
        dist.all_reduce(counts)
        dist.all_reduce(class_sums)
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n,
            "between_class_cosine": between_class_cosine(class_sums), "images": n}

def between_class_cosine(class_sums):
    """Mean cosine similarity between the class-mean features of different classes (the paper's
    Figure 2). class_sums: num_classes x d sums (or means) of features per class; classes with no
    samples are skipped."""
    means = _unit(class_sums[class_sums.abs().sum(1) > 0].double())
    sim = means @ means.t()
    n = len(means)
    return ((sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)).item()

def file_sha256(path):
    """The identity of a model file: what runs, caches and evaluations record of the checkpoint they
    used."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

def teacher_provenance(ckpt, weights=""):
    """Where a teacher's weights came from, for the metrics.json of each run that uses it: the
    <arch>.json beside the checkpoint (written by fetch-teachers, fetch-weights or make's teacher
    training) if it describes this very file (same sha256), else the file's path and sha256 with a
    note that nothing records where it came from."""
    if weights:
        return {"how": f"torchvision's {weights} weights, by name"}
    sha = file_sha256(ckpt)
    record_path = os.path.splitext(ckpt)[0] + ".json"
    record = None
    with contextlib.suppress(OSError, ValueError):
        with open(record_path) as f:
            record = json.load(f)
    if not isinstance(record, dict):
        record = None
    # make wrote it: see its run
    if record and record.get("how") == "trained here" and "sha256" not in record:
        with contextlib.suppress(OSError, TypeError):
            record["sha256"] = file_sha256(os.path.join(record["run"], "model.pt"))
    if record and record.get("sha256") == sha:
        return {**record, "checkpoint": ckpt}
    if record:
        note = f"{record_path} describes another file"
    else:
        note = f"{record_path} does not exist"
    return {"how": "put in place by hand or trained "
                   "here", "checkpoint": ckpt, "sha256": sha, "note": note}

# what a test set depends on
DATA_OPTIONS = ("dataset", "synthetic_size", "synthetic_classes", "image_size")

@dataclass
class EvalOptions:
    arch: str = option("", "the checkpoint's architecture (a key of models.MODELS, or "
                           "timm:NAME)")
    ckpt: str = option("", "our model.pt, a RepDistiller/mdistiller checkpoint, a torchvision "
                           "weight file or any state_dict")
    out: str = option("", "the result as JSON; default: the checkpoint's path with the suffix "
                          ".eval.json")

EVAL_SHARED = DATA_OPTIONS + ("data_dir", "download", "workers", "eval_batch_size", "device")
EvalConfig = options_of("EvalConfig", EvalOptions, EVAL_SHARED)

def test_set_sha256(data):
    """What the evaluation saw, as one hash: the test images' pixels and labels (CIFAR-style), or
    ImageNet's validation files by name, size and label (hashing 50,000 decoded JPEGs would cost as
    much as evaluating)."""
    digest = hashlib.sha256()
    if data.test_x is not None:
        for t in (data.test_x, data.test_y):
            digest.update(t.cpu().contiguous().numpy().tobytes())
    else:
        # the whole set, not this process's shard
        for path, label in data.val_loader.dataset.dataset.samples:
            digest.update(f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)} "
                          f"{os.path.getsize(path)} {label}\n".encode())
    return digest.hexdigest()

def with_run_data_settings(ec):
    """`ec` with the data settings of the run that made the checkpoint (its metrics.json beside it),
    where --dataset and its sizes were left at their defaults: a run's model.pt is evaluated on the
    run's test set."""
    try:
        with open(os.path.join(os.path.dirname(ec.ckpt), "metrics.json")) as f:
            trained = json.load(f)["config"]
        taken = {k: trained[k] for k in DATA_OPTIONS
                 if getattr(ec, k) == getattr(Config, k) != trained[k]}
    except (OSError, ValueError, KeyError, TypeError):
        return ec  # no run beside it: a teacher, a file of one's own
    if taken:
        log(f"note: {', '.join(f'{k}={v}' for k, v in taken.items())} from the run's metrics.json")
    return dataclasses.replace(ec, **taken)

def evaluate_checkpoint(ec):
    """`projkd.py eval`: top-1/top-5 of a checkpoint on the test (CIFAR) or validation (ImageNet)
    set, in float32; under torchrun each process evaluates a shard. Prints the result and writes it
    as JSON, with the sha256 of the file and of the test set."""
    if not ec.arch or not ec.ckpt:
        raise UserError("eval needs --arch and --ckpt, e.g. eval --arch vgg8 --ckpt "
                        "runs/.../model.pt")
    if os.path.isdir(ec.ckpt):
        raise UserError(f"--ckpt {ec.ckpt} is a folder: pass the checkpoint file itself, e.g. "
                        f"{os.path.join(ec.ckpt, 'model.pt')}")
    if not os.path.isfile(ec.ckpt):
        raise UserError(f"no checkpoint at {ec.ckpt}")
    out = ec.out or os.path.splitext(ec.ckpt)[0] + ".eval.json"
    out_folder = os.path.dirname(out) or "."
    if not (os.path.isdir(out_folder) and os.access(out_folder, os.W_OK)):  # before evaluating
        raise UserError(f"cannot write --out {out}: {out_folder} is not a folder this user can "
                        f"write in; choose another --out")
    ec = with_run_data_settings(ec)
    if ec.dataset not in PROTOCOLS:
        raise UserError(f"unknown --dataset {ec.dataset!r}; choose {', '.join(PROTOCOLS)}")
    check_arch(ec.arch, "arch", ec.dataset, ec.image_size)
    device = resolve_device(ec.device, int(os.environ.get("WORLD_SIZE", "1")))
    _, world = setup_torch(device)
    batch_size = ec.eval_batch_size or PROTOCOLS[ec.dataset]["eval_batch_size"]
    workers = ec.workers
    if workers is None:
        workers = default_workers()
    ec = dataclasses.replace(ec, eval_batch_size=batch_size, workers=workers)
    data = load_data(ec, device)
    memory_format = memory_format_and_autocast("off", device)[0]
    state_dict = models_module().read_state_dict(ec.ckpt)
    model = models_module().frozen_model(ec.arch, state_dict, data.num_classes, ec.ckpt,
                                         image_size=input_size(ec))
    model = model.to(device, memory_format=memory_format)
    result = evaluate(model, data, ec.eval_batch_size, memory_format)
    record = {"arch": ec.arch, "ckpt": ec.ckpt, "sha256": file_sha256(ec.ckpt),
              **{k: getattr(ec, k) for k in DATA_OPTIONS}, **result,
              "test_set_sha256": test_set_sha256(data),
              "world_size": world, "device": device_name(device), "torch": torch.__version__}
    if _rank() == 0:
        save(record, out)
    log(f"{ec.arch} from {ec.ckpt} on {ec.dataset}: top-1 {result['top1']:.2f}% top-5 "
        f"{result['top5']:.2f}% ({result['images']} images) -> {out}")
    # in the pipeline: once per teacher, not once per student run
    if result["top1"] < 2 * 100 / data.num_classes:
        log(f"warning: {ec.ckpt} is near chance ({100 / data.num_classes:.1f}%): is it the right "
            "file, trained long enough?")
    return record

# --------------------------------------------------------------------------------------------------
# 8. Entry points: training (no subcommand), `projkd.py eval` and `download` are here; the teacher
#    cache, the bench and fetching weights are the tools above this file (teacher_cache.py,
#    bench.py, fetch.py), imported by name when their subcommand runs. Each takes its options from a
#    dataclass, as training does; those it shares with training mean the same.

DownloadConfig = options_of("DownloadConfig", None, ("dataset", "data_dir"))

def download_command(cfg):
    """`projkd.py download`: CIFAR-100 into --data-dir (torchvision's download of the official
    archive)."""
    if cfg.dataset == "folder":
        raise UserError(f"--dataset folder is your own images: arrange them as "
                        f"{cfg.data_dir}/train/<class>/ and {cfg.data_dir}/val/<class>/ "
                        f"(docs/your-own.md)")
    if cfg.dataset == "imagenet":
        raise UserError("ImageNet cannot be downloaded for you: get ILSVRC2012's train and val "
                        "images from image-net.org and arrange them as "
                        f"{cfg.data_dir}/train/<class>/ and "
                        f"{cfg.data_dir}/val/<class>/ (docs/imagenet.md)")
    if cfg.dataset == "cifar100":
        load_cifar100(cfg.data_dir, download=True)
        log(f"CIFAR-100 is in {os.path.join(cfg.data_dir, 'cifar-100-python')}")

# Subcommands: name -> (module, function, options dataclass, usage). No subcommand: training.
COMMANDS = {
    "eval": ("projkd", "evaluate_checkpoint", "EvalConfig",
             "python projkd.py eval --arch ARCH --ckpt PATH [--dataset ...]  (or under torchrun)"),
    "cache": ("teacher_cache", "cache_command", "CacheConfig",
              "python projkd.py cache --teacher ARCH [--teacher-ckpt PATH] [--dataset ...] "
              "[--teacher-cache-file F]  (every training option is accepted; those below change "
              "the cache)"),
    "bench": ("bench", "run_bench", "BenchConfig",
              "python projkd.py bench [--out-dir results] [--pairs \"vgg13:vgg8 ...\"]"),
    "fetch-weights": ("fetch", "fetch_weights", "WeightsConfig",
                      "python projkd.py fetch-weights --arch resnet34 [--out "
                      "checkpoints/imagenet/resnet34.pt]"),
    "fetch-teachers": ("fetch", "fetch_teachers", "TeachersConfig",
                       "python projkd.py fetch-teachers [--arch \"vgg13 ...\"] [--url URL|FILE] "
                       "[--ckpt BY_HAND.pth]"),
    "download": ("projkd", "download_command", "DownloadConfig", "python projkd.py download "
                                                                 "[--data-dir data]"),
}

def command_of(argv):
    """(the function to run, its options dataclass, the usage line, the options) for a command
    line."""
    usage = (f"python projkd.py [--option value ...]   (or a subcommand: {', '.join(COMMANDS)}; "
             f"SUBCOMMAND --help)")
    if not argv or argv[0].startswith("-"):
        return train, Config, usage, argv
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"unknown subcommand {argv[0]!r}; {hint}choose {', '.join(COMMANDS)}, or "
                        "none to train")
    module_name, function_name, schema_name, usage = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)  # a tool's module only when its subcommand runs
    return getattr(module, function_name), getattr(module, schema_name), usage, argv[1:]

def errors_to_report():
    """The exceptions main() prints as one line: ours, and models.py's (an architecture or its
    weights) where models.py is here."""
    try:
        return (UserError, models_module().ModelError)
    except UserError:  # this file copied alone
        return (UserError,)

def main(argv=None):
    """The exit status: 0 done; 2 a problem the user can fix, said in one line; 128 + a signal's
    number when one stopped the run (Ctrl-C 130; SIGTERM 143 and SIGUSR1 138 on Linux, after writing
    last.pt)."""
    if argv is None:
        argv = sys.argv[1:]
    command = train
    try:
        command, schema, usage, argv = command_of(argv)
        if "-h" in argv or "--help" in argv:
            print(cli_help(schema, __doc__, usage))
            return 0
        # parse_as: a schema whose --help shows a part of what it accepts (cache: every training
        # option, since one set of flags serves a run and its cache)
        command(parse_args(argv, getattr(schema, "parse_as", schema)))
    except errors_to_report() as e:
        # under torchrun every process meets the same error: say it once
        if os.environ.get("RANK", "0") == "0":
            print(f"projkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or Stopped by SIGTERM or SIGUSR1 after writing last.pt
        stop = e
        if not isinstance(e, Stopped):
            stop = Stopped(signal.SIGINT, "interrupted")
        if not stop.kept or "--resume" in argv or command is not train:
            again = "run the same command again"
        else:
            again = "continue with the same command plus --resume"
        if os.environ.get("RANK", "0") == "0":
            print(f"projkd: {stop.why}; {again}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    # The tools import this file as `projkd`: let them find this very module, not load a second copy
    # with classes of its own (a UserError raised there would not be ours).
    sys.modules["projkd"] = sys.modules[__name__]
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `projkd.py --help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
