"""Tests for projkd.py and models.py. CPU only, seconds each: python -m pytest -q

The sections follow projkd.py's: the method, the baselines, feature taps, the architectures (models.py), config and
CLI, data, the training loop, resume, distributed training, the teacher-output cache, the other entry points and
bench; then the Make pipeline and the result tables (tables.py)."""
import contextlib
import csv
import importlib.util
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import projkd
import teacher_cache
from models import IMAGENET_ARCHS, MODELS, TORCHVISION_WEIGHTS
from projkd import (CRDLite, ProjectorEnsemble, UserError, crop_flip, features_and_logits, kd_loss, load_cifar100,
                    mda_loss, sp_loss)

HERE = os.path.dirname(os.path.abspath(__file__))
COMPAT = os.path.join(HERE, "testdata", "repdistiller")
# The two smallest architectures keep the end-to-end runs at a few seconds on two CPU cores.
SMALL_TEACHER, SMALL_STUDENT = "resnet20", "resnet8"
# The paper's four ImageNet pairs (its Table 1), as Make and tables.py take them.
IMAGENET_PAIRS = "resnet34:resnet18 resnet50:mobilenet_v1 densenet201:resnet18 densenet201:mobilenet_v1"


@pytest.fixture(scope="session", autouse=True)
def not_under_make():
    """`make test` runs the suite under make, where a run labels its lines: every test starts outside make (those
    that want make's behaviour set MAKELEVEL themselves, or run make)."""
    level = os.environ.pop("MAKELEVEL", None)
    yield
    if level is not None:
        os.environ["MAKELEVEL"] = level


# Helpers that several sections use: small CLI runs on synthetic data, and a tiny ImageNet-style folder.

def synthetic_args(*extra):
    return ["--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "32", "--epochs", "1",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def synthetic_teacher(tmp_path_factory):
    """A small teacher trained with --method ce on synthetic data through the CLI."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    args = ["--dataset", "synthetic", "--synthetic-size", "512", "--batch-size", "32", "--epochs", "3",
            "--device", "cpu", "--deterministic", "--student", SMALL_TEACHER, "--method", "ce", "--run-dir", str(run_dir)]
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
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.JPEG")
    return root


def imagenet_args(root, *extra):
    return ["--dataset", "imagenet", "--data-dir", str(root), "--image-size", "32", "--batch-size", "4",
            "--epochs", "1", "--device", "cpu", "--workers", "1", *extra]


# --- method: ProjectorEnsemble and mda_loss ----------------------------------------------------------------------

def test_mda_loss_hand_computed():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    # cos = 1 and 1/sqrt(2): loss = 1 - (1 + 0.70710678) / 2
    assert mda_loss(f, t).item() == pytest.approx(1 - (1 + 2 ** -0.5) / 2, abs=1e-6)
    assert mda_loss(5 * f, 0.1 * t).item() == pytest.approx(mda_loss(f, t).item(), abs=1e-6)  # directions only
    assert mda_loss(-t, t).item() == pytest.approx(2.0, abs=1e-6)


def test_mda_loss_is_float32_and_finite_at_zero_vectors():
    f = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    loss = mda_loss(f, t)
    loss.backward()
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # cos 0 for the zero row, 1 for the other
    assert torch.isfinite(f.grad).all()
    assert mda_loss(f.detach().bfloat16(), t.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("act,depth", [("relu", 1), ("gelu", 2), ("none", 3)])
def test_projector_ensemble_is_the_mean_of_q_projectors(act, depth):
    torch.manual_seed(0)
    ens = ProjectorEnsemble(8, 5, q=3, act=act, depth=depth)
    s = torch.randn(4, 8)
    out = ens(s)
    assert out.shape == (4, 5)
    by_hand = torch.stack([ens.projector(k)(s) for k in range(3)]).mean(0)
    assert torch.allclose(out, by_hand, atol=1e-6)
    projectors = [ens.projector(k) for k in range(3)]
    assert len(projectors[0]) == 2 * depth and isinstance(projectors[0][1], projkd.PROJECTOR_ACTIVATIONS[act])
    assert not torch.equal(projectors[0][0].weight, projectors[1][0].weight)  # independently initialised


def test_projector_ensemble_initialises_like_q_linear_stacks_built_in_a_row():
    torch.manual_seed(7)
    ens = ProjectorEnsemble(6, 4, q=2, depth=2)
    torch.manual_seed(7)
    stacks = [nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()) for _ in range(2)]
    for k, stack in enumerate(stacks):
        for ours, theirs in zip(ens.projector(k).state_dict().values(), stack.state_dict().values()):
            assert torch.equal(ours, theirs)
    assert [tuple(p.shape) for p in ens.parameters()] == [(2, 4, 6), (2, 4, 4), (2, 4), (2, 4)]


def test_relu_projector_outputs_are_nonnegative_and_bad_arguments_fail():
    assert (ProjectorEnsemble(8, 5)(torch.randn(16, 8)) >= 0).all()
    with pytest.raises(ValueError):
        ProjectorEnsemble(8, 5, q=0)
    with pytest.raises(ValueError):
        ProjectorEnsemble(8, 5, act="tanh")


def test_gradients_reach_student_and_projectors_but_not_the_teacher():
    torch.manual_seed(0)
    cfg, _ = projkd.resolve_config(projkd.Config(teacher=SMALL_TEACHER, student=SMALL_STUDENT, device="cpu"))
    student = MODELS[SMALL_STUDENT](num_classes=10)
    teacher = MODELS[SMALL_TEACHER](num_classes=10).eval().requires_grad_(False)
    aux = projkd.build_aux(cfg, 64, 64)
    student_taps, teacher_taps = projkd.Taps(student), projkd.Taps(teacher)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits = student(x)
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss, (ce, mda) = projkd.method_loss(cfg, aux, projkd.Outputs(student_taps.feature, logits),
                                         projkd.Outputs(teacher_taps.feature, teacher_logits), y)
    # the terms the logs report: CE and MDA before weighting, loss = CE + 25 * MDA
    assert ce == F.cross_entropy(logits, y) and mda == mda_loss(aux(student_taps.feature), teacher_taps.feature)
    assert loss == ce + 25 * mda
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher_taps.feature.requires_grad


# --- baselines: KD, SP, CRD-lite ---------------------------------------------------------------------------------

def test_kd_loss_hand_computed():
    T = 2.0
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[T * math.log(3.0), 0.0]])  # softmax(t / T) = (0.75, 0.25)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher, T=T).item() == pytest.approx(kl * T * T, rel=1e-5)
    # averaged over the batch: a second, perfectly matched row halves it
    both = kd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), T=T)
    assert both.item() == pytest.approx(kl * T * T / 2, rel=1e-5)


def test_sp_loss_hand_computed():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 1, 2)  # Gram = I
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 2)  # Gram rows normalise to (1, 1)/sqrt(2)
    r = 2 ** -0.5
    expected = 2 * ((1 - r) ** 2 + r ** 2) / 4
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert sp_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # maps of different widths and spatial sizes compare fine: only the b x b similarities matter
    assert sp_loss(torch.randn(4, 8, 2, 2), torch.randn(4, 3, 4, 4)).shape == ()


def crd_reference_loss(anchor, positive, negatives, log_z, T, n_data=50000):
    """CRD's eq. 18 written as CRD writes it: P = exp(v.u/T) / Z with Z = exp(log_z) * n_data, noise 1/n_data."""
    m = negatives.shape[0]
    p_pos = torch.exp((anchor * positive).sum(1) / T) / (math.exp(log_z) * n_data)
    p_neg = torch.exp(anchor @ negatives.t() / T) / (math.exp(log_z) * n_data)
    pn = 1.0 / n_data
    log_d1 = torch.log(p_pos / (p_pos + m * pn))
    log_d0 = torch.log(m * pn / (p_neg + m * pn))
    return -(log_d1.sum() + log_d0.sum()) / anchor.shape[0]


def test_crd_lite_matches_crd_nce_and_updates_its_queue():
    torch.manual_seed(0)
    crd = CRDLite(6, 10, dim=4, negatives=5, T=0.5)
    queue_s, queue_t = crd.queue_student.clone(), crd.queue_teacher.clone()
    fs, ft = torch.randn(3, 6, requires_grad=True), torch.randn(3, 10)
    loss = crd(fs, ft)
    v_s = F.normalize(crd.embed_student(fs), dim=1).detach()
    v_t = F.normalize(crd.embed_teacher(ft), dim=1).detach()
    # Z is CRD's: the mean of exp(logit) over the first batch's scores, per anchor side
    for side, (anchor, pos, queue) in enumerate([(v_t, v_s, queue_s), (v_s, v_t, queue_t)]):
        logits = torch.cat([(anchor * pos).sum(1, keepdim=True), anchor @ queue.t()], 1) / crd.T
        assert crd.log_z[side].item() == pytest.approx(torch.exp(logits).mean().log().item(), rel=1e-5)
    expected = (crd_reference_loss(v_t, v_s, queue_s, crd.log_z[0].item(), crd.T)
                + crd_reference_loss(v_s, v_t, queue_t, crd.log_z[1].item(), crd.T))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert fs.grad.abs().sum() > 0 and crd.embed_student.weight.grad.abs().sum() > 0
    # the batch went into the queue slots 0..2, the pointer moved on and wraps around
    assert torch.allclose(crd.queue_student[:3], v_s) and torch.equal(crd.queue_student[3:], queue_s[3:])
    assert crd.queue_next.item() == 3
    z_before = crd.log_z.clone()
    crd(torch.randn(3, 6), torch.randn(3, 10))
    assert crd.queue_next.item() == 1 and torch.equal(crd.log_z, z_before)  # Z is fixed after the first batch


def test_crd_lite_updates_its_queues_in_place():
    crd = CRDLite(6, 10, dim=4, negatives=5, T=0.5)
    pointers = [b.data_ptr() for b in crd.buffers()]
    crd(torch.randn(3, 6), torch.randn(3, 10)).backward()
    assert [b.data_ptr() for b in crd.buffers()] == pointers


def test_crd_lite_under_torchrun_averages_z_only_while_it_is_unset(monkeypatch):
    """Only the first batch's Z is ever used: its all-reduce (one per side) happens on the first step, not every step."""
    reduced = []
    monkeypatch.setattr(projkd, "_world_size", lambda: 2)
    monkeypatch.setattr(projkd.dist, "all_reduce", lambda t: reduced.append(t.clone()))
    monkeypatch.setattr(projkd.dist, "all_gather", lambda parts, x: [p.copy_(x) for p in parts])
    crd = CRDLite(6, 10, dim=4, negatives=8, T=0.5)
    for _ in range(3):
        crd(torch.randn(3, 6), torch.randn(3, 10)).backward()
    assert len(reduced) == 2 and int(crd.queue_next) == 3 * 3 * 2 % 8  # each step enqueues both processes' rows


def test_between_class_cosine_hand_computed():
    sums = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])  # the last class has no samples
    # pairs: (0,1) 0, (0,2) 1/sqrt2, (1,2) 1/sqrt2
    assert projkd.between_class_cosine(sums) == pytest.approx(2 * 2 ** -0.5 / 3, rel=1e-9)


# --- feature taps and the loss wiring ----------------------------------------------------------------------------

def test_features_and_logits_on_a_torchvision_model():
    import torchvision

    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    feature, logits = features_and_logits(model, x)
    assert feature.shape == (2, 512) and logits.shape == (2, 7)
    assert torch.allclose(model.fc(feature), logits, atol=1e-6)
    assert not model.fc._forward_pre_hooks  # the hook is gone afterwards


def test_projkd_copied_alone_imports_and_runs(tmp_path):
    """The pieces the docstring offers for copying work from projkd.py alone: no models.py beside it, and no
    fcntl, which Windows lacks."""
    shutil.copy(os.path.join(HERE, "projkd.py"), tmp_path)
    code = textwrap.dedent("""
        import sys
        import torch  # torch imports subprocess, which imports fcntl on POSIX: it is in sys.modules
        sys.modules["fcntl"] = None  # so from here on `import fcntl` raises ImportError, as on Windows
        from projkd import CRDLite, ProjectorEnsemble, features_and_logits, kd_loss, mda_loss, sp_loss
        assert "models" not in sys.modules
        class Net(torch.nn.Module):  # a user's own model, from no zoo: conv, pooling, a classifier
            def __init__(self):
                super().__init__()
                self.conv1, self.fc = torch.nn.Conv2d(3, 512, 3), torch.nn.Linear(512, 10)
            def forward(self, x):
                return self.fc(self.conv1(x).relu().mean((2, 3)))
        model = Net()
        feature, logits = features_and_logits(model, torch.randn(4, 3, 32, 32))
        assert feature.shape == (4, 512), feature.shape
        mda_loss(ProjectorEnsemble(512, 256)(feature), torch.randn(4, 256)).backward()
        assert model.conv1.weight.grad is not None
        assert torch.isfinite(kd_loss(logits, torch.randn(4, 10)))
        assert torch.isfinite(sp_loss(torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)))
        assert torch.isfinite(CRDLite(512, 256, negatives=64)(feature, torch.randn(4, 256)))
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


# --- models.py: the architectures --------------------------------------------------------------------------------

def _fill():
    spec = importlib.util.spec_from_file_location("compat_fill", os.path.join(COMPAT, "fill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fill


@pytest.fixture(scope="module")
def compat():
    with open(os.path.join(COMPAT, "repdistiller_spec.json")) as f:
        spec = json.load(f)
    ref = torch.load(os.path.join(COMPAT, "repdistiller_ref_seed1.pt"), weights_only=True)
    return spec, ref["ref"], _fill()


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", json.load(open(os.path.join(COMPAT, "repdistiller_spec.json"))))
def test_architecture_matches_the_repdistiller_zoo(arch, compat):
    spec, ref, fill = compat
    model = MODELS[arch](num_classes=100)
    ours = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    assert ours == spec[arch]  # names, order, shapes, dtypes
    sd = fill(spec[arch], 1)
    sd.update(ref[arch]["bn_buffers"])
    model.load_state_dict(sd, strict=True)
    model.eval()
    taps = projkd.Taps(model, model.map_layer)
    with torch.no_grad():
        logits = model(ref[arch]["input"])
    taps.remove()
    assert _rel_err(logits, ref[arch]["logits"]) < 1e-4
    assert _rel_err(taps.feature, ref[arch]["pooled"]) < 1e-4
    assert _rel_err(taps.map, ref[arch]["map"]) < 1e-4


def test_every_architecture_takes_num_classes_and_channels_last():
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for arch, build in MODELS.items():
        model = build(num_classes=10).to(memory_format=torch.channels_last)
        feature, logits = features_and_logits(model, x)
        assert logits.shape == (2, 10), arch
        assert feature.shape == (2, projkd.classifier_of(model).in_features), arch


# Feature width (the classifier's in_features, also the map's channels) of each ImageNet architecture.
IMAGENET_WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "densenet201": 1920, "mobilenet_v1": 1024}


# The PEFD authors' MobileNet (github.com/chenyd7/PEFD, models/MobileNet.py) as (key, shape): its start, the
# model1/model2 boundary and its end. Their checkpoints load only if ours has exactly these names.
MOBILENET_V1_KEYS = {
    "head": [("model1.0.0.weight", (32, 3, 3, 3)), ("model1.0.1.weight", (32,)), ("model1.0.1.bias", (32,)),
             ("model1.0.1.running_mean", (32,)), ("model1.0.1.running_var", (32,)),
             ("model1.0.1.num_batches_tracked", ()), ("model1.1.0.weight", (32, 1, 3, 3))],
    "boundary": [("model1.11.4.num_batches_tracked", ()), ("model2.0.0.weight", (512, 1, 3, 3))],
    "tail": [("model2.1.3.weight", (1024, 1024, 1, 1)), ("model2.1.4.weight", (1024,)), ("model2.1.4.bias", (1024,)),
             ("model2.1.4.running_mean", (1024,)), ("model2.1.4.running_var", (1024,)),
             ("model2.1.4.num_batches_tracked", ()), ("fc.weight", (1000, 1024)), ("fc.bias", (1000,))],
}


def test_mobilenet_v1_has_the_published_size_and_the_pefd_key_layout():
    model = MODELS["mobilenet_v1"](num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976  # Howard et al. 2017: 4.2M
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(layout) == 164  # stem conv + BN (6), 13 blocks of 2 convs + 2 BNs (12 each), fc (2)
    assert layout[:7] == MOBILENET_V1_KEYS["head"] and layout[-8:] == MOBILENET_V1_KEYS["tail"]
    i = layout.index(MOBILENET_V1_KEYS["boundary"][1])
    assert layout[i - 1:i + 1] == MOBILENET_V1_KEYS["boundary"]


def test_mobilenet_v1_logits_feature_and_map_at_224_and_64():
    model = MODELS["mobilenet_v1"](num_classes=1000).eval()
    for size, side in ((224, 7), (64, 2)):  # total stride 32
        maps = []
        hook = model.get_submodule(model.map_layer).register_forward_hook(lambda m, args, out: maps.append(out))
        with torch.no_grad():
            feature, logits = features_and_logits(model, torch.randn(2, 3, size, size))
        hook.remove()
        assert logits.shape == (2, 1000) and feature.shape == (2, 1024)
        assert torch.allclose(projkd.classifier_of(model)(feature), logits, atol=1e-5)
        assert maps[0].shape == (2, 1024, side, side)
        assert torch.allclose(maps[0].mean((2, 3)), feature, atol=1e-6)


def test_imagenet_archs_name_models_and_their_torchvision_files():
    import torchvision

    assert len(set(IMAGENET_ARCHS)) == len(IMAGENET_ARCHS) == 5 and set(IMAGENET_ARCHS) == set(IMAGENET_WIDTHS)
    assert set(IMAGENET_ARCHS) <= set(MODELS)
    with open(os.path.join(COMPAT, "repdistiller_spec.json")) as f:
        assert not set(json.load(f)) & set(IMAGENET_ARCHS)  # RepDistiller's zoo is CIFAR
    assert set(TORCHVISION_WEIGHTS) == set(IMAGENET_ARCHS) - {"mobilenet_v1"}
    for arch, (file, url) in TORCHVISION_WEIGHTS.items():
        assert url == torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url and url.endswith("/" + file)


@pytest.mark.parametrize("arch", list(IMAGENET_WIDTHS))
def test_imagenet_architecture_classifies_and_taps_feature_and_map(arch):
    model = MODELS[arch](num_classes=10).eval()
    width = IMAGENET_WIDTHS[arch]
    assert projkd.classifier_of(model).in_features == width
    taps = projkd.Taps(model, model.map_layer)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    taps.remove()
    assert logits.shape == (2, 10) and taps.feature.shape == (2, width)
    assert taps.map.shape[:2] == (2, width)
    # The map is the one pooled into the feature. For densenet201 that holds only because torchvision's forward
    # applies its final ReLU in place, to the very tensor the features.norm5 hook kept.
    assert torch.allclose(taps.map.mean((2, 3)), taps.feature, atol=1e-6)


def test_torchvision_densenet_files_load_with_their_old_names():
    state = MODELS["densenet201"](num_classes=10).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}  # as torchvision's published file has them
    assert any(".norm.1." in k for k in old)
    model = models.frozen_model("densenet201", models.normalise_keys(old), 10, "densenet201-c1103571.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if k in old or "norm1" in k)


# --- config and CLI ----------------------------------------------------------------------------------------------

def test_parse_args_types_flags_and_spellings():
    cfg = projkd.parse_args(["--student", "vgg8", "--epochs=3", "--kd-T", "2.5", "--proj_depth", "2",
                             "--deterministic", "--no-resume"])
    assert (cfg.student, cfg.epochs, cfg.kd_T, cfg.proj_depth, cfg.deterministic, cfg.resume) == \
        ("vgg8", 3, 2.5, 2, True, False)


@pytest.mark.parametrize("argv,message", [
    (["--studnet", "vgg8"], "unknown option --studnet (did you mean --student?)"),
    (["--epochs", "ten"], "--epochs expects int, got 'ten'"),
    (["--epochs"], "--epochs needs a value"),
    (["vgg8"], "unexpected argument 'vgg8'"),
    (["--deterministic=maybe"], "is a flag"),
])
def test_parse_args_errors(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        projkd.parse_args(argv)


@pytest.mark.parametrize("argv,message", [
    (["--student", "vgg99", "--method", "ce"], "unknown architecture 'vgg99' for --student"),
    (["--student", "vgg8", "--method", "fitnet"], "unknown --method 'fitnet'"),
    (["--student", "vgg8"], "--method pefd needs --teacher"),
    (["--student", "vgg8", "--method", "ce", "--epochs", "0"], "--epochs must be positive"),
    (["--student", "vgg8", "--method", "ce", "--lr", "-1"], "--lr must be a finite number >= 0"),
    (["--student", "vgg8", "--method", "ce", "--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--student", "vgg8", "--method", "ce", "--amp", "fp8"], "unknown --amp 'fp8'"),
    (["--student", "vgg8", "--method", "ce", "--lr-decay-epochs", "150;180"], "--lr-decay-epochs must be"),
    (["--student", "vgg8", "--teacher", "vgg13", "--proj-act", "tanh"], "unknown --proj-act 'tanh'"),
    (["--student", "vgg8", "--method", "ce", "--graph", "on"], "--graph on is not possible here: it needs CUDA"),
    (["--student", "vgg8", "--method", "ce", "--graph", "maybe"], "unknown --graph 'maybe'"),
    (["--student", "vgg8", "--teacher", "vgg13", "--method", "sp", "--teacher-cache", "on"],
     "--teacher-cache on serves pefd, kd and crd"),
    (["--student", "resnet18", "--method", "ce"], "resnet18 is an ImageNet architecture and --dataset synthetic"),
    (["--student", "vgg8", "--method", "ce", "--batch-size", "31", "--dataset", "imagenet"],
     "vgg8 is a CIFAR (32x32) architecture and --dataset imagenet"),
    (["--student", "vgg8", "--method", "ce", "--dataset", "mnist"], "unknown --dataset 'mnist'"),
])
def test_cli_rejects_bad_input_with_one_line_and_status_2(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    assert projkd.main(synthetic_args("--run-dir", str(run_dir), *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("projkd: error: ") and message in err and err.count("\n") == 1
    assert not run_dir.exists()


def test_protocols_per_dataset_and_explicit_values_win():
    cifar, _ = projkd.resolve_config(projkd.Config(student="vgg8", method="ce", device="cpu"))
    imagenet, notes = projkd.resolve_config(projkd.Config(student="resnet18", method="ce", device="cpu",
                                                          dataset="imagenet", batch_size=512))
    mobile, _ = projkd.resolve_config(projkd.Config(student="MobileNetV2", method="ce", device="cpu"))
    pick = ("epochs", "batch_size", "lr", "lr_decay_epochs", "weight_decay", "momentum")
    assert [getattr(cifar, k) for k in pick] == [240, 64, 0.05, "150,180,210", 5e-4, 0.9]
    assert [getattr(imagenet, k) for k in pick] == [100, 512, 0.1, "30,60,90", 1e-4, 0.9]
    assert mobile.lr == 0.01
    assert any("used unchanged at 512 (the linear scaling rule would give 0.2" in n for n in notes)
    explicit, _ = projkd.resolve_config(projkd.Config(student="resnet18", method="ce", device="cpu",
                                                      dataset="imagenet", epochs=3, lr=0.2, weight_decay=0.0))
    assert (explicit.epochs, explicit.lr, explicit.weight_decay) == (3, 0.2, 0.0)


def test_help_lists_every_option_with_its_comment(capsys):
    assert projkd.main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in projkd.dataclasses.fields(projkd.Config):
        assert "--" + f.name.replace("_", "-") in out
    assert "weight of the MDA loss" in out


def test_help_piped_into_head_ends_quietly():
    result = subprocess.run(f"{sys.executable} {os.path.join(HERE, 'projkd.py')} --help | head -1", shell=True,
                            capture_output=True, text=True)
    assert result.stdout.startswith("projkd: Improved Feature Distillation") and result.stderr == ""


def test_the_cli_process_exits_nonzero_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "projkd.py"), "--student", "nope", "--method", "ce"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("projkd: error: unknown architecture 'nope' for --student; choose one of "
                                     + ", ".join(MODELS))
    assert "Traceback" not in result.stderr and not os.listdir(tmp_path)


def test_importing_projkd_has_no_side_effects(tmp_path):
    # nor tables.py (projkd.py eval imports it): matplotlib is imported only for figures, models.py where used
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import projkd, tables; "
            "print(sorted(os.listdir('.')), 'matplotlib' in sys.modules, 'models' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, HERE], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "[] False False" and result.stderr == ""


# --- data --------------------------------------------------------------------------------------------------------

def write_cifar_pickles(root, n_train=200, n_test=100, bytes_keys=True, seed=0):
    """A small data set in the official cifar-100-python layout (pickled dicts; the official archive was
    written by Python 2, so its keys read back as bytes)."""
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


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_load_cifar100_reads_the_official_layout(tmp_path, bytes_keys):
    written = write_cifar_pickles(tmp_path, bytes_keys=bytes_keys)
    train_x, train_y, test_x, test_y = load_cifar100(str(tmp_path))
    assert train_x.shape == (200, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (100, 3, 32, 32) and test_y.dtype == torch.int64
    # pixel (c, h, w) of image i is data[i, c * 1024 + h * 32 + w]: channel-major rows, as in the archive
    data, labels = written["train"]
    assert train_x[5, 1, 2, 3].item() == data[5, 1 * 1024 + 2 * 32 + 3]
    assert train_y.tolist() == labels


def test_load_cifar100_missing_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "cifar-100-python")):
        load_cifar100(str(tmp_path))


def test_load_cifar100_refuses_pickles_that_run_code(tmp_path):
    write_cifar_pickles(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(UserError, match="unexpected object"):
        load_cifar100(str(tmp_path))


def test_crop_flip_offsets_padding_and_flips():
    g = torch.Generator().manual_seed(0)
    dy, dx, flip = projkd.augmentation_draws(10000, g)
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8  # every offset occurs
    assert 0.45 < flip.float().mean() < 0.55
    images = torch.randint(1, 256, (3, 3, 32, 32), dtype=torch.uint8)  # no zero pixels of their own
    same = torch.tensor([4, 4, 4])
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    assert torch.equal(crop_flip(images, same, same, no), images)  # the centre crop is the image
    assert torch.equal(crop_flip(images, same, same, yes), images.flip(3))
    corner = crop_flip(images, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), no)
    assert (corner[:, :, :4, :] == 0).all() and (corner[:, :, :, :4] == 0).all()  # zero padding
    assert torch.equal(corner[:, :, 4:, 4:], images[:, :, :28, :28])
    # against a per-image reference: pad, slice, flip
    dy, dx, flip = projkd.augmentation_draws(3, g)
    out = crop_flip(images, dy, dx, flip)
    for i in range(3):
        ref = F.pad(images[i], (4, 4, 4, 4))[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], ref.flip(2) if flip[i] else ref)


def test_synthetic_data_is_deterministic_and_balanced():
    a = projkd.make_synthetic(200, 10)
    b = projkd.make_synthetic(200, 10)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0].shape == (200, 3, 32, 32) and a[0].dtype == torch.uint8
    assert torch.bincount(a[1]).tolist() == [20] * 10


@pytest.mark.parametrize("layout,message", [
    ("missing", "ImageNet not found: no folder"),
    ("no_classes", "is not an image class folder"),
    ("other_classes", "or they differ in name"),
])
def test_imagenet_layout_errors_name_the_folder(tmp_path, capsys, layout, message):
    root = tmp_path / "imagenet"
    if layout == "no_classes":
        os.makedirs(root / "train")
        os.makedirs(root / "val")
    elif layout == "other_classes":
        write_image_folder(root, train=1, val=1)
        os.rename(root / "val" / "cat", root / "val" / "dog")
    assert projkd.main(imagenet_args(root, "--student", "resnet18", "--method", "ce",
                                     "--run-dir", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert message in err and str(root) in err and "<class>" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# --- the training loop -------------------------------------------------------------------------------------------

def test_teacher_run_leaves_its_artifacts(synthetic_teacher):
    files = sorted(os.listdir(synthetic_teacher))
    assert files == ["last.pt", "log.csv", "metrics.json", "model.pt"]  # and no temporary leftovers
    metrics = json.loads((synthetic_teacher / "metrics.json").read_text())
    for key in ("config", "seed", "best_top1", "last_top1", "best_top5", "last_top5", "history", "wall_seconds",
                "images_per_s", "device", "torch", "code", "between_class_cosine"):
        assert key in metrics, key
    assert metrics["config"]["lr"] == 0.05 and metrics["config"]["student"] == SMALL_TEACHER
    assert len(metrics["history"]) == 3 and metrics["last_top1"] == metrics["history"][-1]["test_top1"]
    assert metrics["last_top1"] > 30  # learnable: 10 classes, chance is 10%
    rows = list(csv.DictReader(open(synthetic_teacher / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    state = torch.load(synthetic_teacher / "model.pt", weights_only=True)
    MODELS[SMALL_TEACHER](num_classes=10).load_state_dict(state, strict=True)  # plain state_dict, nothing else


@pytest.mark.parametrize("method", ["pefd", "kd", "sp", "crd"])
def test_distillation_runs_end_to_end(tmp_path, synthetic_teacher, method, capsys):
    run_dir = tmp_path / method
    args = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--method", method,
                          "--teacher-ckpt", str(synthetic_teacher / "model.pt"), "--run-dir", str(run_dir),
                          "--crd-negatives", "64", "--synthetic-size", "512")  # the teacher's data set
    assert projkd.main(args) == 0
    out = capsys.readouterr().out
    teacher_top1 = json.loads((synthetic_teacher / "metrics.json").read_text())["last_top1"]
    assert f"test top-1 {teacher_top1:.2f}%" in out  # the teacher's accuracy is announced before distilling
    state = torch.load(run_dir / "model.pt", weights_only=True)
    MODELS[SMALL_STUDENT](num_classes=10).load_state_dict(state, strict=True)  # no projectors or embeddings
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and (len(last["aux"]) > 0) == (method in ("pefd", "crd"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["teacher_top1"] == pytest.approx(teacher_top1)
    # each term of the loss, averaged over the epoch on the device, in the history, log.csv and the epoch line
    row, term = metrics["history"][0], projkd.LOSS_TERMS[method]
    weights = {"pefd": (1, 25), "kd": (0.1, 0.9), "sp": (1, 3000), "crd": (1, 0.8)}[method]
    assert row["train_loss"] == pytest.approx(weights[0] * row["train_ce"] + weights[1] * row[f"train_{term}"], rel=1e-4)
    assert next(csv.DictReader(open(run_dir / "log.csv")))[f"train_{term}"] == str(row[f"train_{term}"])
    assert f"loss {row['train_loss']:.4f} (ce {row['train_ce']:.4f}, {term} {row[f'train_{term}']:.4f})" in out


def test_lr_schedule_steps_after_the_milestones():
    cfg = projkd.Config(lr=0.05, lr_decay_epochs="150,180,210")
    lrs = [projkd.lr_at(cfg, e) for e in (0, 149, 150, 179, 180, 210, 239)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005])


def test_resident_steps_read_the_planned_epoch_batch_by_batch(tmp_path, monkeypatch):
    run = small_run(tmp_path, "--synthetic-size", "96")
    plan = run.feed.plan(0)
    run.feed.load(0)
    expected = crop_flip(run.data.train_x[plan.order], plan.dy, plan.dx, plan.flip)
    seen = []
    monkeypatch.setattr(projkd, "train_step", lambda run, images, labels, cached: seen.append((images, labels)))
    for _ in range(run.feed.steps_per_epoch):
        run.step()
    assert run.feed.steps_per_epoch == 3 and len(seen) == 3
    for i, (images, labels) in enumerate(seen):
        assert images.shape == (32, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, expected[32 * i:32 * (i + 1)])
        assert torch.equal(labels, run.data.train_y[plan.order[32 * i:32 * (i + 1)]])
    # under torchrun, process 1 of 2 takes the second half of every global batch
    run.feed.step.zero_()
    run.feed.offsets = 16 + torch.arange(16)
    seen.clear()
    run.step()
    run.step()
    assert torch.equal(seen[0][0], expected[16:32]) and torch.equal(seen[1][0], expected[48:64])
    run.feed.close()


def test_epoch_buffers_are_refilled_in_place(tmp_path):
    """A CUDA graph replays fixed addresses: every tensor the step reads or writes must keep its storage."""
    run = small_run(tmp_path, "--synthetic-size", "96")
    tensors = [run.feed.images, run.feed.labels, run.feed.step, run.lr, run.loss_sum, run.correct]
    before = [t.data_ptr() for t in tensors]
    for epoch in range(2):
        projkd.train_epoch(run, epoch)
    assert [t.data_ptr() for t in tensors] == before
    assert all(g["lr"] is run.lr for g in run.optimizer.param_groups)
    run.feed.close()


def test_progress_lines_within_an_epoch(tmp_path, capsys):
    assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--progress-seconds", "1e-9",
                                      "--synthetic-size", "96", "--run-dir", str(tmp_path / "run"))) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  epoch 1 step")]
    assert [line.split()[3] for line in lines] == ["1/3", "2/3"]
    assert all("img/s" in line and "epoch eta" in line and "run eta" in line for line in lines)


def test_the_config_is_a_block_of_what_is_not_default_and_lines_under_make_name_their_run(tmp_path, capsys,
                                                                                            monkeypatch):
    monkeypatch.setenv("MAKELEVEL", "1")  # as under make, where several runs share the terminal
    assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--run-dir",
                                      str(tmp_path / "resnet8" / "ce-seed1"))) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(line.startswith("[resnet8/ce-seed1] ") for line in out)
    block = [line.split("] ", 1)[1].split() for line in out[1:out.index(next(x for x in out if "epoch 1/1" in x))]]
    assert ["--student", "resnet8", "given"] in block and ["--lr", "0.05", "synthetic", "protocol"] in block
    assert ["--graph", "off", "resolved"] in block and not any(b[0] in ("--alpha", "--q", "--seed") for b in block)
    assert not any("amp off on CPU" in line for line in out)  # --amp was not asked for


def test_teacher_checkpoint_formats(tmp_path, synthetic_teacher):
    """RepDistiller's {'model': state_dict} with DataParallel's 'module.' prefixes loads like our model.pt."""
    state = torch.load(synthetic_teacher / "model.pt", weights_only=True)
    repdistiller_style = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": {"module." + k: v for k, v in state.items()}, "accuracy": 1.0},
               repdistiller_style)
    teacher = models.load_teacher(SMALL_TEACHER, str(repdistiller_style), 10)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("problem,message", [
    ("missing", "no teacher checkpoint at"),
    ("corrupt", "is not a readable PyTorch checkpoint (truncated, or not a PyTorch file)"),
    ("wrong_arch", "does not fit resnet20 with 10 classes"),
    ("wrong_classes", "2 mis-shaped tensors, e.g. fc.weight"),
    ("not_a_state_dict", "holds no state_dict"),
])
def test_bad_teacher_checkpoints_fail_cleanly(tmp_path, synthetic_teacher, capsys, problem, message):
    path = tmp_path / "teacher.pt"
    if problem == "corrupt":
        path.write_bytes((synthetic_teacher / "model.pt").read_bytes()[:1000])
    elif problem == "wrong_arch":
        torch.save(MODELS["resnet8"](num_classes=10).state_dict(), path)
    elif problem == "wrong_classes":  # e.g. a 100-class RepDistiller teacher on 10-class data
        state = MODELS[SMALL_TEACHER](num_classes=100).state_dict()
        torch.save({"model": state}, path)
    elif problem == "not_a_state_dict":
        torch.save({"model": [1, 2, 3]}, path)
    run_dir = tmp_path / "run"
    args = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT,
                          "--teacher-ckpt", str(path), "--run-dir", str(run_dir))
    assert projkd.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (run_dir / "model.pt").exists()


def test_a_pickle_that_is_not_a_safe_checkpoint_is_one_line(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    torch.save({"model": MODELS[SMALL_TEACHER](num_classes=10)}, path)  # a whole module: needs unsafe unpickling
    assert projkd.main(synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT,
                                      "--teacher-ckpt", str(path), "--run-dir", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert f"teacher checkpoint {path} is not a readable PyTorch checkpoint (it holds Python objects" in err
    assert err.count("\n") == 1 and "weights_only" not in err


def test_default_teacher_location_is_named_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert projkd.main(synthetic_args("--teacher", "vgg13", "--student", "vgg8")) == 2
    err = capsys.readouterr().err
    assert os.path.join("checkpoints", "synthetic", "vgg13.pt") in err and "--method ce" in err
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_is_not_overwritten_silently(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--run-dir", str(run_dir))
    assert projkd.main(args) == 0
    assert projkd.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert projkd.main(args + ["--resume", "--method", "kd", "--teacher", SMALL_TEACHER]) == 2
    assert "holds a run with other settings (teacher" in capsys.readouterr().err


def test_a_run_dir_that_cannot_be_written_is_one_line_before_any_data_is_read(capsys):
    # /proc takes no new folders, whoever asks (as a read-only file system); --data-dir has no CIFAR-100 either:
    # the run directory's error must come first
    assert projkd.main(["--student", "vgg8", "--method", "ce", "--device", "cpu", "--data-dir", "/nonexistent",
                        "--run-dir", "/proc/projkd-test/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("projkd: error: cannot write in --run-dir /proc/projkd-test/run") and err.count("\n") == 1


def test_a_write_that_fails_mid_run_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    real_open = open

    def disk_full(path, mode="r", *args, **kwargs):  # files open, and writing to a .csv fails
        if "w" in mode and ".csv" in str(path):
            real_open(path, mode).close()  # as a write cut short
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", disk_full)
    run_dir = tmp_path / "run"
    assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--run-dir", str(run_dir))) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run_dir / 'log.csv'} (No space left on device)" in err and err.count("\n") == 1
    assert not run_dir.exists() or not [f for f in os.listdir(run_dir) if ".tmp" in f]


def test_two_processes_cannot_train_into_one_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with projkd.run_dir_lock(str(run_dir)):  # as another process training there would hold it
        assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--run-dir", str(run_dir),
                                          "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} is being trained by another process (pid {os.getpid()})" in err and err.count("\n") == 1
    assert not run_dir.exists()  # the holder made it, and left it empty


@pytest.mark.parametrize("resume", [False, True])
def test_ctrl_c_says_how_to_continue(capsys, monkeypatch, resume):
    def interrupted(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(projkd, "train", interrupted)
    args = ["--student", "vgg8"] + ["--resume"] * resume
    assert projkd.main(args) == 130
    err = capsys.readouterr().err
    assert ("run the same command again" in err) == resume and ("plus --resume" in err) != resume


def test_imagenet_class_folders_train_a_torchvision_model(tmp_path):
    root = write_image_folder(tmp_path / "imagenet")
    torch.manual_seed(0)
    torch.save(MODELS["resnet18"](num_classes=3).state_dict(), tmp_path / "teacher.pt")
    run_dir = tmp_path / "run"
    assert projkd.main(imagenet_args(root, "--teacher", "resnet18", "--teacher-ckpt", str(tmp_path / "teacher.pt"),
                                     "--student", "resnet18", "--run-dir", str(run_dir))) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["lr"] == 0.1 and metrics["config"]["weight_decay"] == 1e-4  # ImageNet's protocol
    assert metrics["config"]["lr_decay_epochs"] == "30,60,90" and metrics["config"]["workers"] == 1
    MODELS["resnet18"](num_classes=3).load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    eval_args = ["--dataset", "imagenet", "--data-dir", str(root), "--image-size", "32", "--device", "cpu",
                 "--workers", "0"]
    teacher_eval, student_eval = tmp_path / "teacher.eval.json", tmp_path / "student.eval.json"
    assert projkd.main(["eval", "--arch", "resnet18", "--ckpt", str(tmp_path / "teacher.pt"), *eval_args,
                        "--out", str(teacher_eval)]) == 0
    assert json.loads(teacher_eval.read_text())["top1"] == pytest.approx(metrics["teacher_top1"])
    # the accuracies recorded are the trained model's: its model.pt, evaluated alone, gives them again
    assert projkd.main(["eval", "--arch", "resnet18", "--ckpt", str(run_dir / "model.pt"), *eval_args,
                        "--out", str(student_eval)]) == 0
    student = json.loads(student_eval.read_text())
    assert metrics["last_top1"] == metrics["history"][-1]["test_top1"] == pytest.approx(student["top1"], abs=1e-3)
    assert metrics["last_top5"] == metrics["history"][-1]["test_top5"] == pytest.approx(student["top5"], abs=1e-3)
    # 3 classes: the top 5 hold every class, so top-5 is 100 whatever the weights. A top-5 that can miss is
    # checked on 10 classes in test_distributed_top1_equals_one_process_evaluating_model_pt.
    assert metrics["last_top5"] == 100.0 >= metrics["last_top1"]


class FakeCUDA:
    """Stands in for torch.cuda in CUDAGraphStep's control flow: a 'capture' calls the step with `capturing` set
    (as a real capture records the work without doing it), and replay() calls it again for real. The step
    advances the counter `steps`, as the resident step does on the device. failure="raises": the capture fails
    as capture_end does after the step raised; "empty": the capture records nothing (the step's kernels went to
    another device), so replays do nothing. Streams record the device that was current when they were made."""

    def __init__(self, monkeypatch, failure=None):
        self.capturing, self.log, self.steps, fake = False, [], torch.zeros(()), self
        self.current, self.stream_devices = 0, []

        class Graph:
            def replay(self):
                if failure != "empty":
                    fake.step()

        @contextlib.contextmanager
        def graph(g, capture_error_mode="global"):
            fake.capturing = True
            try:
                try:
                    yield
                    if failure == "raises":
                        raise RuntimeError("operation not permitted when stream is capturing")
                finally:
                    fake.capturing = False
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        class Stream:
            def __init__(self):
                fake.stream_devices.append(fake.current)

            def wait_stream(self, other):
                pass

        for name, value in (("Stream", Stream), ("current_stream", Stream), ("CUDAGraph", Graph), ("graph", graph),
                            ("stream", lambda s: contextlib.nullcontext()),
                            ("set_device", lambda d: setattr(fake, "current", torch.device(d).index or 0))):
            monkeypatch.setattr(torch.cuda, name, value)

    def step(self):
        self.log.append("captured" if self.capturing else "ran")
        if not self.capturing:
            self.steps += 1


@pytest.mark.parametrize("failure", [None, "raises", "empty"])
def test_cuda_graph_step_warms_up_captures_once_and_replays(monkeypatch, capsys, failure):
    fake = FakeCUDA(monkeypatch, failure)
    stepper = projkd.CUDAGraphStep(fake.step, fake.steps, warmup_steps=3)
    for _ in range(6):
        stepper()
    # six steps done, none skipped, one capture; an empty graph's replay ran nothing, so that step ran eagerly
    assert fake.log == ["ran"] * 3 + ["captured"] + ["ran"] * 3 and fake.steps.item() == 6
    assert (stepper.graph is None) == (failure is not None)
    if failure:  # the run goes on eagerly and says why: the first error, not capture_end's
        reason = {"raises": "operation not permitted when stream is capturing", "empty": "the captured graph is empty"}
        out = capsys.readouterr().out
        assert stepper.failure.startswith(reason[failure]) and "goes on eagerly" in out and out.count("warning") == 1


def test_the_graph_side_stream_is_made_on_the_runs_device(monkeypatch):
    """--device cuda:1: the device becomes current before any stream is made, so the capture records the step's
    kernels (made on cuda:0, the side stream and the capture would record nothing)."""
    fake = FakeCUDA(monkeypatch)
    projkd.setup_torch(torch.device("cuda", 1))
    projkd.CUDAGraphStep(fake.step, fake.steps)
    assert fake.stream_devices == [1]


def test_teacher_for_speed_keeps_batchnorm_in_float32():
    teacher = projkd.teacher_for_speed(MODELS["resnet8"](num_classes=10), torch.bfloat16, torch.contiguous_format)
    for m in teacher.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.weight.dtype == torch.bfloat16
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.dtype == m.running_var.dtype == torch.float32


# --- resume ------------------------------------------------------------------------------------------------------

def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, synthetic_teacher, capsys):
    common = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--deterministic",
                            "--teacher-ckpt", str(synthetic_teacher / "model.pt"), "--method", "crd",
                            "--crd-negatives", "64", "--lr-decay-epochs", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert projkd.main(common + ["--epochs", "2", "--run-dir", str(straight)]) == 0
    assert projkd.main(common + ["--epochs", "1", "--run-dir", str(resumed)]) == 0  # as if killed after epoch 1
    os.remove(resumed / "model.pt")
    os.remove(resumed / "metrics.json")
    capsys.readouterr()
    assert projkd.main(common + ["--epochs", "2", "--run-dir", str(resumed), "--resume"]) == 0
    assert "after epoch 1; note: extending it from 1 to 2 epochs" in capsys.readouterr().out  # a larger --epochs
    for name in ("model.pt", "last.pt"):
        a = torch.load(straight / name, weights_only=True)
        b = torch.load(resumed / name, weights_only=True)
        if name == "last.pt":  # projectors/embeddings, the CRD queue and the optimizer state too
            assert all(torch.equal(a["aux"][k], b["aux"][k]) for k in a["aux"])
            a, b = a["student"], b["student"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    keys = ("epoch", "lr", "train_loss", "train_acc", "test_top1", "test_top5")
    assert [{k: h[k] for k in keys} for h in ma["history"]] == [{k: h[k] for k in keys} for h in mb["history"]]


def test_resume_restores_into_this_runs_scaler_and_optimizer_settings(tmp_path):
    """A last.pt from a bf16 (or CPU) run resumed with --amp fp16 on CUDA: its disabled scaler saved {}, which an
    enabled GradScaler refuses; its optimizer groups say fused=False and its momentum buffers are contiguous,
    which would put a CUDA run on SGD's slow per-parameter path. The stand-ins: a CPU GradScaler, and the
    settings and channels_last layout a CUDA run would have."""
    saved = small_run(tmp_path / "a")
    os.makedirs(saved.cfg.run_dir)
    projkd.train_epoch(saved, 0)
    projkd.save_checkpoint(saved, 1)
    checkpoint = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=True)
    assert checkpoint["scaler"] == {} and not checkpoint["optimizer"]["param_groups"][0]["fused"]
    run = small_run(tmp_path / "b", "--resume")
    run.scaler = torch.amp.GradScaler("cpu")  # enabled, as --amp fp16's
    run.student.to(memory_format=torch.channels_last)
    for group in run.optimizer.param_groups:
        group.update(fused=True, foreach=None)
    projkd.restore(run, checkpoint)
    assert all(g["fused"] is True and g["foreach"] is None and g["lr"] is run.lr for g in run.optimizer.param_groups)
    for p in run.student.parameters():
        assert run.optimizer.state[p]["momentum_buffer"].stride() == p.stride()
    assert run.start_epoch == 1
    saved.feed.close()
    run.feed.close()


# --- distributed training (torchrun, gloo on the CPU) ------------------------------------------------------------

def torchrun(*args, nproc=2, background=False):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(HERE, "projkd.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def ddp_args(synthetic_teacher, run_dir, *extra):
    return ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "32", "--epochs", "3", "--device",
            "cpu", "--deterministic", "--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--method", "crd",
            "--crd-negatives", "64", "--teacher-ckpt", str(synthetic_teacher / "model.pt"), "--checkpoint-seconds", "0",
            "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_teacher):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(*ddp_args(synthetic_teacher, run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


def test_two_processes_train_one_model(ddp_run):
    run_dir, out = ddp_run
    assert "the weights are the same in all 2 processes" in out  # checked by the processes themselves
    assert "processes: 2 x batch 16 = global batch 32" in out
    assert out.count("epoch 2/3 ") == 1  # one process logs
    assert sorted(os.listdir(run_dir)) == ["last.pt", "log.csv", "metrics.json", "model.pt"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["history"]) == 3


def test_distributed_top1_equals_one_process_evaluating_model_pt(ddp_run, tmp_path):
    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    assert projkd.main(["eval", "--arch", SMALL_STUDENT, "--ckpt", str(run_dir / "model.pt"), "--dataset", "synthetic",
                        "--synthetic-size", "256", "--device", "cpu", "--out", str(out)]) == 0
    single = json.loads(out.read_text())
    assert single["images"] == 64 and single["world_size"] == 1
    assert single["top1"] == pytest.approx(metrics["last_top1"], abs=1e-3)
    assert single["top5"] == pytest.approx(metrics["last_top5"], abs=1e-3)


def test_only_process_zero_writes(tmp_path, monkeypatch):
    run = small_run(tmp_path)
    projkd.train_epoch(run, 0)
    monkeypatch.setattr(projkd, "_rank", lambda: 1)
    projkd.save_checkpoint(run, 1)
    run.history.append({"epoch": 1, "test_top1": 0.0, "test_top5": 0.0, "between_class_cosine": 0.0,
                        "seconds": 1.0, "images_per_s": 1.0})
    projkd.finish_run(run)
    assert not (tmp_path / "run").exists()
    run.feed.close()


def test_imagenet_under_two_processes(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", val=3)
    run_dir = tmp_path / "run"
    result = torchrun(*imagenet_args(root, "--student", "resnet18", "--method", "ce", "--run-dir", str(run_dir)))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "the weights are the same in all 2 processes" in result.stdout
    out = tmp_path / "eval.json"
    assert projkd.main(["eval", "--arch", "resnet18", "--ckpt", str(run_dir / "model.pt"), "--dataset", "imagenet",
                        "--data-dir", str(root), "--image-size", "32", "--device", "cpu", "--out", str(out)]) == 0
    single = json.loads(out.read_text())
    assert single["images"] == 9 and single["top1"] == pytest.approx(metrics["last_top1"], abs=1e-3)


# --- the teacher-output cache ------------------------------------------------------------------------------------

def test_view_numbers_cover_every_crop_and_flip_once():
    views = [teacher_cache.view_draws(v, 1, "cpu") for v in range(teacher_cache.CACHE_VIEWS)]
    assert teacher_cache.CACHE_VIEWS == 162
    assert [teacher_cache.view_index(*draws).item() for draws in views] == list(range(162))
    assert len({(dy.item(), dx.item(), f.item()) for dy, dx, f in views}) == 162


@pytest.fixture(scope="module")
def cache_teacher(tmp_path_factory):
    """A small teacher (random weights: the cache must reproduce whatever the teacher computes) and its cache
    on 32 synthetic images, built through the CLI."""
    folder = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    torch.save(MODELS["resnet8"](num_classes=10).state_dict(), folder / "resnet8.pt")
    args = ["cache", "--teacher", "resnet8", "--teacher-ckpt", str(folder / "resnet8.pt"), "--dataset", "synthetic",
            "--synthetic-size", "32", "--device", "cpu"]
    assert projkd.main(args) == 0
    return folder, args


def test_cached_teacher_outputs_equal_the_live_teacher(cache_teacher):
    folder, _ = cache_teacher
    header = teacher_cache.read_cache_header(str(folder / "resnet8.tcache"))
    assert (header["images"], header["views"], header["width"], header["dtype"]) == (32, 162, 64 + 10, "bfloat16")
    cache = teacher_cache.TeacherCache(str(folder / "resnet8.tcache"), header)
    teacher = models.load_teacher("resnet8", str(folder / "resnet8.pt"), 10)
    train_x = projkd.make_synthetic(32, 10)[0]
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 32, (40,), generator=g)
    dy, dx, flip = projkd.augmentation_draws(40, g)
    rows = torch.from_numpy(cache.rows(images.numpy(), teacher_cache.view_index(dy, dx, flip).numpy())).view(torch.bfloat16)
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
    assert "up to date" in capsys.readouterr().out and teacher_cache.read_cache_header(path) == built
    torch.manual_seed(1)
    torch.save(MODELS["resnet8"](num_classes=10).state_dict(), folder / "other.pt")  # same name below, new content
    os.replace(folder / "other.pt", folder / "resnet8.pt")
    assert projkd.main(args) == 0
    assert "rebuilding it" in capsys.readouterr().out
    rebuilt = teacher_cache.read_cache_header(path)
    assert rebuilt["checkpoint_sha256"] != built["checkpoint_sha256"] and rebuilt["key"] != built["key"]
    assert projkd.main(args[:-2] + ["--synthetic-size", "48", "--device", "cpu"]) == 0  # other images: rebuilt too
    assert teacher_cache.read_cache_header(path)["images"] == 48


def test_cached_and_live_runs_agree(tmp_path, cache_teacher):
    folder, _ = cache_teacher
    common = ["--dataset", "synthetic", "--synthetic-size", "32", "--batch-size", "16", "--epochs", "2", "--device",
              "cpu", "--deterministic", "--teacher", "resnet8", "--student", SMALL_STUDENT,
              "--teacher-ckpt", str(folder / "resnet8.pt"), "--teacher-cache-file", str(tmp_path / "t.tcache")]
    for cache in ("on", "off"):
        assert projkd.main(common + ["--teacher-cache", cache, "--run-dir", str(tmp_path / cache)]) == 0
    on, off = (json.loads((tmp_path / c / "metrics.json").read_text()) for c in ("on", "off"))
    assert on["config"]["teacher_cache"] == "on" and off["config"]["teacher_cache"] == "off"
    for a, b in zip(on["history"], off["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert all(h["plan_wait_s"] >= 0 for h in on["history"])  # how long each epoch waited for its rows, in log.csv too
    wa, wb = (torch.load(tmp_path / c / "model.pt", weights_only=True) for c in ("on", "off"))
    # the cached teacher outputs are bfloat16-rounded: the weights drift apart by a fraction of a percent
    va, vb = (torch.cat([w[k].flatten() for k in w if w[k].is_floating_point()]) for w in (wa, wb))
    assert (va - vb).norm() <= 3e-3 * va.norm()


def test_cache_rows_are_gathered_in_file_order_and_from_memory_when_the_file_fits(cache_teacher):
    folder, _ = cache_teacher
    path = str(folder / "resnet8.tcache")
    header = teacher_cache.read_cache_header(path)
    g, n = torch.Generator().manual_seed(5), header["images"]
    images, views = torch.randint(0, n, (500,), generator=g).numpy(), torch.randint(0, 162, (500,), generator=g).numpy()
    on_disk, in_memory = (teacher_cache.TeacherCache(path, header, share) for share in (0.0, 1.0))
    direct = np.memmap(path, dtype=np.int16, mode="r", offset=teacher_cache.CACHE_HEADER_BYTES,
                       shape=(162, n, header["width"]))[views, images]  # the rows by plain indexing
    assert not on_disk.read_whole and in_memory.read_whole
    assert np.array_equal(on_disk.rows(images, views), direct) and np.array_equal(in_memory.rows(images, views), direct)
    assert isinstance(in_memory.whole, np.ndarray) and not isinstance(in_memory.whole, np.memmap)


def test_processes_wait_for_a_cache_on_its_file_lock_and_say_so(tmp_path, capsys):
    """Under torchrun the processes that do not build the cache wait on its lock, never in a collective (NCCL's
    times out after 10 minutes): here the lock is held by another thread while the build waits."""
    import fcntl
    import threading
    teacher = MODELS["resnet8"](num_classes=10).eval()
    torch.save(teacher.state_dict(), tmp_path / "t.pt")
    data = projkd.load_data(projkd.Config(dataset="synthetic", synthetic_size=32), torch.device("cpu"))
    identity = teacher_cache.cache_identity(projkd.Config(teacher="resnet8", teacher_ckpt=str(tmp_path / "t.pt"),
                                                          amp="off"), data)
    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(1.0, os.close, [holder]).start()  # the other process finishes
    cache = teacher_cache.ensure_teacher_cache(str(tmp_path / "t.tcache"), identity, teacher, data,
                                               contextlib.nullcontext(), torch.contiguous_format, 64)
    assert "waits for another process to finish the teacher cache" in capsys.readouterr().out
    assert cache.header["key"] == identity["key"]


def shutil_usage(**fields):
    import collections

    return collections.namedtuple("usage", fields)(**fields)


def test_a_disk_too_small_for_the_cache_is_one_line_and_no_file(tmp_path, capsys, monkeypatch):
    torch.save(MODELS["resnet8"](num_classes=10).state_dict(), tmp_path / "resnet8.pt")
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: shutil_usage(total=10 ** 9, used=10 ** 9, free=1000))
    assert projkd.main(["cache", "--teacher", "resnet8", "--teacher-ckpt", str(tmp_path / "resnet8.pt"),
                        "--dataset", "synthetic", "--synthetic-size", "32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the teacher cache needs 0.0 GB" in err and "--teacher-cache off" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["resnet8.pt"]


# --- other entry points: fetch-weights, download, each subcommand's help -----------------------------------------

def test_eval_takes_the_runs_data_settings_from_its_metrics(synthetic_teacher, tmp_path, capsys):
    """eval of a run's model.pt without --dataset: the run's own test set (synthetic, 512 images), not the defaults."""
    metrics = json.loads((synthetic_teacher / "metrics.json").read_text())
    assert projkd.main(["eval", "--arch", SMALL_TEACHER, "--ckpt", str(synthetic_teacher / "model.pt"),
                        "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    assert "note: dataset=synthetic, synthetic_size=512 from the run's metrics.json" in capsys.readouterr().out
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["images"] == 128 and record["top1"] == pytest.approx(metrics["last_top1"], abs=1e-3)


def test_a_teacher_near_chance_is_warned_of_once_under_make_by_its_evaluation(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    fc = MODELS[SMALL_STUDENT](num_classes=10).state_dict()
    fc["fc.bias"][3] += 100.0  # a "teacher" that answers class 3 to everything: 10% on 10 balanced classes
    torch.save(fc, tmp_path / "teacher.pt")
    monkeypatch.setenv("MAKELEVEL", "1")  # under make: the teacher's evaluation step warns, its runs do not
    args = synthetic_args("--teacher", SMALL_STUDENT, "--student", SMALL_STUDENT, "--method", "kd",
                          "--teacher-ckpt", str(tmp_path / "teacher.pt"), "--run-dir", str(tmp_path / "kd"))
    assert projkd.main(args) == 0
    assert "near chance" not in capsys.readouterr().out
    assert projkd.main(["eval", "--arch", SMALL_STUDENT, "--ckpt", str(tmp_path / "teacher.pt"), "--dataset",
                        "synthetic", "--synthetic-size", "128", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "top-1 9.38%" in out and f"warning: {tmp_path / 'teacher.pt'} is near chance (10.0%)" in out  # 3 of 32


def test_torchvision_weights_offline_name_the_file(tmp_path, capsys, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    out = tmp_path / "resnet34.pt"
    assert projkd.main(["fetch-weights", "--arch", "resnet34", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "resnet34-b627a593.pth" in err and str(out) in err and err.count("\n") == 1 and not out.exists()
    assert projkd.main(["fetch-weights", "--arch", "mobilenet_v1"]) == 2
    assert "fetch-weights takes --arch resnet18 | resnet34" in capsys.readouterr().err
    assert projkd.main(imagenet_args(tmp_path, "--teacher", "resnet34", "--student", "resnet18",
                                     "--run-dir", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert "no teacher checkpoint at checkpoints/imagenet/resnet34.pt: get torchvision's resnet34-b627a593.pth" in err


def test_download_without_internet_is_one_line_from_make(tmp_path):
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}  # offline, surely
    result = subprocess.run(["make", "--no-print-directory", "cifar-all", f"DATA_DIR={tmp_path}/data", "DEPS=",
                             f"PY={sys.executable}"], capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"projkd: error: downloading CIFAR-100 into {tmp_path}/data failed" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing half-downloaded left behind


TEACHER_ARGS = ["--dataset", "synthetic", "--synthetic-size", "128", "--device", "cpu"]  # 32 test images


@pytest.fixture(scope="module")
def teachers_archive(tmp_path_factory):
    """cifar_teachers.tar in mdistiller's layout, of small generated checkpoints in RepDistiller's format (a dict
    whose 'model' is the state_dict), for 10 classes; and the bytes of resnet8's member."""
    folder = tmp_path_factory.mktemp("archive")
    for arch in ("resnet8", "resnet14"):
        torch.manual_seed(0)
        member = folder / "cifar_teachers" / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
        member.parent.mkdir(parents=True)
        torch.save({"epoch": 240, "model": MODELS[arch](num_classes=10).state_dict(), "best_acc": torch.tensor(9.5)},
                   member)
    import tarfile
    with tarfile.open(folder / "cifar_teachers.tar", "w") as tar:
        tar.add(folder / "cifar_teachers", "cifar_teachers")
    member = (folder / "cifar_teachers" / "resnet8_vanilla" / "ckpt_epoch_240.pth").read_bytes()
    return folder / "cifar_teachers.tar", member


@pytest.fixture
def teachers_server(teachers_archive, monkeypatch):
    """The archive on an HTTP server at 127.0.0.1 that answers Range requests (206), as GitHub's does; `cut` responses
    stop half-way through the body they announced. Yields (url, state): state['ranges'] lists each request's Range."""
    import http.server
    import threading

    payload, state = teachers_archive[0].read_bytes(), {"ranges": [], "cut": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked = self.headers.get("Range")
            state["ranges"].append(asked)
            start = int(asked[len("bytes="):-1]) if asked else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            self.end_headers()
            body = payload[start:]
            if state["cut"]:
                state["cut"] -= 1
                body = body[:len(body) // 2]
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/cifar_teachers.tar", state
    server.shutdown()
    server.server_close()


def measured_top1(tmp_path, arch, ckpt):
    assert projkd.main(["eval", "--arch", arch, "--ckpt", str(ckpt), "--out", str(tmp_path / "m.json"), *TEACHER_ARGS]) == 0
    return json.loads((tmp_path / "m.json").read_text())["top1"]


def test_fetch_teachers_installs_only_a_verified_teacher_and_resumes_a_cut_download(
        tmp_path, teachers_archive, teachers_server, monkeypatch, capsys):
    import hashlib
    import tables

    url, state = teachers_server
    member = teachers_archive[1]
    (tmp_path / "resnet8.pth").write_bytes(member)
    top1 = measured_top1(tmp_path, "resnet8", tmp_path / "resnet8.pth")
    monkeypatch.setattr(models, "PUBLISHED_TEACHERS", {"resnet8": top1 + 0.1, "resnet14": top1 + 30})
    out, archive = tmp_path / "ckpt", tmp_path / "dl" / "cifar_teachers.tar"
    fetch = ["fetch-teachers", "--url", url, "--out-dir", str(out), "--archive", str(archive), *TEACHER_ARGS]
    capsys.readouterr()
    # the connection closes half-way: one line, nothing installed, the bytes that came kept for the rerun
    state["cut"] = 1
    assert projkd.main([*fetch, "--arch", "resnet8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"projkd: error: downloading {url} failed (the connection closed after " in err
    assert f"MB that arrived are kept in {archive}.part: the same command resumes" in err
    assert not out.exists() or os.listdir(out) == []
    half = os.path.getsize(f"{archive}.part")
    assert 0 < half < teachers_archive[0].stat().st_size and not archive.exists()
    # the rerun asks for the rest, checks the teacher and installs it with its provenance; resnet14 stays in the tar
    assert projkd.main([*fetch, "--arch", "resnet8"]) == 0
    assert state["ranges"] == [None, f"bytes={half}-"]
    assert archive.read_bytes() == teachers_archive[0].read_bytes()
    assert sorted(os.listdir(out)) == ["resnet8.json", "resnet8.pt"]  # no temporary file left either
    assert (out / "resnet8.pt").read_bytes() == member  # the archive's file, byte for byte
    record = json.loads((out / "resnet8.json").read_text())
    assert record["sha256"] == hashlib.sha256(member).hexdigest() and record["how"] == "fetched and verified"
    assert (record["source"], record["member"]) == (url, "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth")
    assert (record["top1"], record["published_top1"], record["evaluation"]["images"]) == (top1, top1 + 0.1, 32)
    assert "verified ->" in capsys.readouterr().out
    # a teacher whose accuracy is not the published one: refused with both numbers, the archive reused, not fetched
    assert projkd.main([*fetch, "--arch", "resnet8 resnet14"]) == 2
    captured = capsys.readouterr()
    assert f"resnet8: {out / 'resnet8.pt'} is in place, kept as it is (fetched and verified)" in captured.out
    assert captured.err.count("\n") == 1 and (f"resnet14 from {url} (cifar_teachers/resnet14_vanilla/ckpt_epoch_240"
                                              f".pth) tests at top-1 ") in captured.err
    assert f"but RepDistiller's resnet14 has {top1 + 30:.2f}%: more than 0.1 points apart, so it is not " \
           f"installed at {out / 'resnet14.pt'}" in captured.err
    assert sorted(os.listdir(out)) == ["resnet8.json", "resnet8.pt"] and len(state["ranges"]) == 2
    # a run with the fetched teacher carries its provenance, and so does the table's conditions line
    run_dir = tmp_path / "runs" / "resnet8-resnet8" / "kd-seed1"
    assert projkd.main(synthetic_args("--teacher", "resnet8", "--teacher-ckpt", str(out / "resnet8.pt"), "--student",
                                      "resnet8", "--method", "kd", "--run-dir", str(run_dir))) == 0
    provenance = json.loads((run_dir / "metrics.json").read_text())["teacher_provenance"]
    assert provenance == {**record, "checkpoint": str(out / "resnet8.pt")}
    assert tables.main(["--runs", str(tmp_path / "runs"), "--pairs", "resnet8:resnet8", "--seeds", "1",
                        "--out", str(tmp_path / "t.md")]) == 0
    assert f"teachers: resnet8 (fetched and verified, sha256 {record['sha256'][:12]});" in (tmp_path / "t.md").read_text()


def test_fetch_teachers_offline_and_by_hand(tmp_path, teachers_archive, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on: as offline as it gets, at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/cifar_teachers.tar"
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    out, archive = tmp_path / "ckpt", tmp_path / "dl" / "cifar_teachers.tar"
    assert projkd.main(["fetch-teachers", "--arch", "vgg13", "--url", closed, "--out-dir", str(out), "--archive",
                        str(archive)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"downloading {closed} failed (" in err and f"get cifar_teachers.tar from there by other means and put " \
        f"it at {archive} (or pass --url PATH), or train the teachers here (make TEACHERS_FROM=train)" in err
    assert not out.exists() and not os.path.exists(f"{archive}.part")
    # a checkpoint copied in by hand: the same check, by one command; then checked again where it lies
    mine = tmp_path / "my_resnet8.pth"
    mine.write_bytes(teachers_archive[1])
    top1 = measured_top1(tmp_path, "resnet8", mine)
    hand = ["fetch-teachers", "--arch", "resnet8", "--out-dir", str(out), *TEACHER_ARGS]
    monkeypatch.setattr(models, "PUBLISHED_TEACHERS", {"resnet8": top1 - 0.11})
    assert projkd.main([*hand, "--ckpt", str(mine)]) == 2
    assert "copy it into place unchecked to use it anyway" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(models, "PUBLISHED_TEACHERS", {"resnet8": top1 - 0.1})
    assert projkd.main([*hand, "--ckpt", str(mine)]) == 0
    record = json.loads((out / "resnet8.json").read_text())
    assert (record["how"], record["source"], record["member"]) == ("copied in by hand, verified", str(mine), None)
    assert models.teacher_provenance(str(out / "resnet8.pt"))["how"] == "copied in by hand, verified"
    assert projkd.main([*hand, "--ckpt", str(mine)]) == 2  # never over an installed one
    assert f"{out / 'resnet8.pt'} exists already: delete it first" in capsys.readouterr().err
    monkeypatch.setattr(models, "PUBLISHED_TEACHERS", {"resnet8": top1 + 0.11})
    assert projkd.main([*hand, "--ckpt", str(out / "resnet8.pt")]) == 2
    err = capsys.readouterr().err
    assert f"tests at top-1 {top1:.2f}% on synthetic, but RepDistiller's resnet8 has {top1 + 0.11:.2f}%" in err
    assert "so it is not recorded as verified" in err and err.count("\n") == 1
    # without a record that describes it, a teacher's provenance is its path and sha256, and says so
    (out / "resnet8.pt").write_bytes(teachers_archive[1] + b"\0")
    provenance = models.teacher_provenance(str(out / "resnet8.pt"))
    assert provenance["how"] == "put in place by hand or trained here" and "describes another file" in provenance["note"]
    assert provenance["sha256"] == models.file_sha256(out / "resnet8.pt")


def test_fetch_weights_records_its_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "torchvision_state_dict", lambda arch, weights, put_at: {"w": torch.zeros(2)})
    assert projkd.main(["fetch-weights", "--arch", "resnet34", "--out", str(tmp_path / "resnet34.pt")]) == 0
    provenance = models.teacher_provenance(str(tmp_path / "resnet34.pt"))
    assert provenance["how"] == "fetched from torchvision (IMAGENET1K_V1, hash-checked)"
    assert provenance["sha256"] == models.file_sha256(tmp_path / "resnet34.pt")


@pytest.mark.parametrize("top1,published,ok", [
    (100 * 7551 / 10000, 75.61, True), (100 * 7571 / 10000, 75.61, True), (75.61, 75.61, True),  # 10 images either way
    (100 * 7550 / 10000, 75.61, False), (100 * 7572 / 10000, 75.61, False),  # 11 images
    (100 * 7027 / 10000, 74.31, False)])  # RepDistiller #29: the resnet110 that tested at 70.27%
def test_a_teacher_matches_its_published_top1_within_a_tenth_of_a_point(top1, published, ok):
    assert models.matches_published(top1, published) is ok


def test_subcommands_have_their_own_help(capsys):
    own = {  # subcommand: the options its help lists, and options of other commands that it must not list
        "eval": ({"--arch", "--ckpt", "--out", "--dataset", "--data-dir", "--device"},
                 {"--alpha", "--student", "--method"}),
        "download": ({"--data-dir", "--dataset"}, {"--alpha", "--student"}),
        "cache": ({"--teacher", "--teacher-ckpt", "--teacher-cache-file", "--dataset"},
                  {"--alpha", "--student", "--kd-T", "--epochs"}),
        "bench": ({"--pairs", "--out-dir"}, set()),
        "fetch-teachers": ({"--arch", "--url", "--ckpt", "--out-dir", "--archive", "--dataset", "--data-dir", "--device"},
                           {"--alpha", "--student", "--method"}),
    }
    assert set(own) <= set(projkd.COMMANDS)
    for command in projkd.COMMANDS:
        assert projkd.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"python projkd.py {command}" in out
        listed = set(re.findall(r"^\s+(--[\w-]+)", out, flags=re.M))  # each option's line starts with its name
        wanted, foreign = own.get(command, (set(), set()))
        assert wanted <= listed, (command, sorted(wanted - listed))
        assert not foreign & listed, (command, sorted(foreign & listed))


# --- bench -------------------------------------------------------------------------------------------------------

def test_bench_runs_its_tiny_cpu_version(tmp_path):
    assert projkd.main(["bench", "--device", "cpu", "--out-dir", str(tmp_path), "--steps", "2",
                        "--classic-steps", "2", "--workers", "1"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    (pair,) = report["pairs"]
    assert (pair["teacher"], pair["student"]) == ("resnet20", "resnet8")
    speeds = {row["loop"]: row["images_per_s"] for row in pair["rows"]}
    assert len(speeds) == 5 and all(v > 0 for k, v in speeds.items() if "graph" not in k)
    assert all(v is None for k, v in speeds.items() if "graph" in k)  # needs CUDA
    flops = {row["cached"]: row["flops_per_image"] for row in pair["rows"]}
    assert 0 < flops[True] < flops[False]  # the cache saves the teacher's forward pass
    text = (tmp_path / "bench.md").read_text()
    assert "| classic (DataLoader + PIL, fp32, .item() per step) |" in text and "skipped: needs CUDA" in text
    # every row says how it ran: the classic loop as RepDistiller runs (cudnn.benchmark on, matmuls without TF32),
    # ours as setup_run sets it up, whatever ran before
    flags = {row["loop"]: row["flags"] for row in pair["rows"] if row["images_per_s"]}
    assert flags["classic (DataLoader + PIL, fp32, .item() per step)"] == {
        "cudnn_benchmark": True, "cudnn_deterministic": False, "matmul_tf32": False, "cudnn_tf32": True}
    assert all(f["matmul_tf32"] and f["cudnn_benchmark"] for loop, f in flags.items() if loop.startswith("ours"))
    assert "cudnn_benchmark on, cudnn_deterministic off, matmul_tf32 off, cudnn_tf32 on |" in text


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                       ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None), ("NVIDIA L4", None)])
def test_bench_peak_of_each_gpu_and_none_for_a_mig_slice(monkeypatch, name, peak):
    import bench
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.bf16_peak_flops(torch.device("cuda")) == peak


# --- the Make pipeline -------------------------------------------------------------------------------------------

def make(*args, cwd=HERE, env=None):
    return subprocess.run(["make", "--no-print-directory", *args], capture_output=True, text=True, cwd=cwd, env=env)


def path_with_nvidia_smi(folder, listing="GPU 0: NVIDIA H200 (UUID: GPU-0)"):
    """The environment with a stand-in nvidia-smi first on PATH, listing `listing` (empty: no GPU)."""
    fake = folder / "bin" / "nvidia-smi"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(f"#!/bin/sh\necho '{listing}'\n")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}


@pytest.mark.parametrize("teachers_from", ["fetch", "train"])
def test_make_plan_for_cifar_all_gets_each_teacher_once(tmp_path, teachers_from):
    knobs = [] if teachers_from == "fetch" else ["TEACHERS_FROM=train"]  # fetch: the default
    plan = make("-n", "cifar-all", "DEPS=", "DATA=", f"PY={sys.executable}", *knobs, env=path_with_nvidia_smi(tmp_path)).stdout
    commands = [line for line in plan.splitlines() if "projkd.py --dataset" in line]  # trainings, not teacher caches
    fetched = [c for c in plan.splitlines() if "projkd.py fetch-teachers " in c]
    copied = [c for c in plan.splitlines() if c.startswith("cp runs/cifar100/")]
    teachers = ["ResNet50", "resnet32x4", "vgg13", "wrn_40_2"]
    if teachers_from == "fetch":
        assert not copied and sorted(c.split("--arch ")[1].split()[0] for c in fetched) == teachers
        assert f"{sys.executable} projkd.py fetch-teachers --arch vgg13 --url {models.TEACHERS_URL} --out-dir " \
               "checkpoints/cifar100 --dataset cifar100 --data-dir data --device auto" in fetched
    else:
        assert not fetched and sorted(t.split("/")[2] for t in copied) == teachers
    alone = [c for c in commands if "--method ce" in c]
    distill = [c for c in commands if "--method ce" not in c]
    # 4 teachers when trained; 4 students x 3 seeds (vgg8's Student runs serve two pairs)
    assert len(alone) == 4 * (teachers_from == "train") + 4 * 3
    assert len(distill) == 5 * 4 * 3  # 5 pairs x (pefd kd sp crd) x 3 seeds
    assert len(set(commands)) == len(commands)
    # DEVICE=auto on a machine with a GPU: each teacher's output cache is built once (test_make_plan_teacher_cache_...)
    caches = [c for c in plan.splitlines() if "projkd.py cache " in c]
    assert sorted(c.split("--teacher ")[1].split()[0] for c in caches) == ["ResNet50", "resnet32x4", "vgg13", "wrn_40_2"]
    # every parameter of the pipeline is spelled out in the echoed command
    one = next(c for c in distill if "--run-dir runs/cifar100/vgg13-vgg8/pefd-seed2" in c)
    for flag in ("--dataset cifar100", "--data-dir data", "--device auto", "--epochs 240", "--teacher vgg13",
                 "--teacher-ckpt checkpoints/cifar100/vgg13.pt", "--teacher-cache on",
                 "--teacher-cache-file checkpoints/cifar100/vgg13.tcache", "--student vgg8", "--method pefd", "--seed 2",
                 "--resume"):
        assert flag in one
    assert plan.count("tables.py") == 1
    assert '--out "results/cifar100.md results/cifar100.csv" --figures results/figures' in plan
    # the evaluation step: each run's model.pt and each teacher checkpoint evaluated alone, once, before the tables
    evals = [c.split("--ckpt ")[1].split()[0] for c in plan.splitlines() if " projkd.py eval " in c]
    runs = [c.split("--run-dir ")[1].split()[0] for c in commands]
    teacher_runs = [f"runs/cifar100/{t}/ce-seed1" for t in teachers]  # when trained, their copies are evaluated
    assert sorted(evals) == sorted([f"{r}/model.pt" for r in runs if r not in teacher_runs] +
                                   [f"checkpoints/cifar100/{t}.pt" for t in teachers])
    assert len(evals) == 12 + 60 + 4 and plan.index(" projkd.py eval ") < plan.index("tables.py")


def test_make_plan_for_ablations_and_short_runs():
    plan = make("-n", "ablations", "DEPS=", "DATA=", "EPOCHS=2", "SEEDS=1", f"PY={sys.executable}").stdout
    runs = [line for line in plan.splitlines() if "projkd.py --dataset" in line and "--teacher " in line]
    assert len(runs) == 2 * 10  # 2 pairs x (PEFD + 9 variants)
    assert any("--q 0 " in r and "pefd-q0-seed1" in r for r in runs)
    assert any("--proj-depth 4 " in r for r in runs) and any("--proj-act none " in r for r in runs)
    assert all("runs/cifar100-e2/" in r and "checkpoints/cifar100-e2/" in r for r in runs)  # apart from real runs
    # the paper's teachers whatever the students' EPOCHS, fetched into the trial's own folder (not trained for 2 epochs)
    fetched = [line for line in plan.splitlines() if "projkd.py fetch-teachers " in line]
    assert sorted(f.split("--arch ")[1].split()[0] for f in fetched) == ["resnet32x4", "vgg13"]
    assert all("--out-dir checkpoints/cifar100-e2 " in f for f in fetched)
    assert not any("--method ce" in line for line in plan.splitlines())
    assert "--out results/cifar100-e2/ablations.md --figures results/cifar100-e2/figures" in plan


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A small real pipeline, `make -j2 cifar-all` on synthetic data: a teacher, its PEFD student and the Student
    row, every command that computes started through a stand-in launcher that logs it (as srun would run it)."""
    root = tmp_path_factory.mktemp("pipeline")
    launcher, log = root / "launch", root / "launched.log"
    launcher.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec "$@"\n')
    launcher.chmod(0o755)
    knobs = [f"PY={sys.executable}", "DEPS=", "DATASET=synthetic", "EPOCHS=1", "SEEDS=1", "DEVICE=cpu",
             "PAIRS=resnet20:resnet8", "METHODS=pefd ce", f"RUNS={root}/runs", f"TEACHERS={root}/ckpt",
             f"RESULTS={root}/results", "EXTRA=--synthetic-size 256 --batch-size 32",
             "EVAL_EXTRA=--synthetic-size 256", f"LAUNCH={launcher}"]
    first = make("-j2", "cifar-all", *knobs)  # the student's two runs side by side, after the teacher
    assert first.returncode == 0, first.stderr
    return root, knobs, first, log


def test_make_pipeline_trains_evaluates_and_tabulates_through_the_launcher(pipeline):
    root, knobs, first, log = pipeline
    assert (root / "ckpt" / "resnet20.pt").exists()
    table = (root / "results" / "synthetic.md").read_text()
    metrics = json.loads((root / "runs" / "resnet20-resnet8" / "pefd-seed1" / "metrics.json").read_text())
    assert metrics["teacher_provenance"]["how"] == "trained here"  # make's record, checked against the run's model.pt
    assert f"teachers: resnet20 (trained here, sha256 {metrics['teacher_provenance']['sha256'][:12]});" in table
    assert "| PEFD |" in table and "(n=1)" in table and "missing" not in table.split("## ")[1]
    computing = [line.split() for line in first.stdout.splitlines() if "projkd.py" in line]
    assert len(computing) == 3 + 3  # trainings (teacher, PEFD, Student), evaluations (their model files)
    assert all(c[:3] == [str(root / "launch"), sys.executable, "projkd.py"] for c in computing)
    assert sorted(line.split() for line in log.read_text().splitlines()) == sorted(c[1:] for c in computing)
    assert any(line.startswith(f"{sys.executable} tables.py ") for line in first.stdout.splitlines())  # not launched
    # its figures, linked from the table; a curve is the run's log.csv
    import tables
    assert sorted(p.name for p in linked_figures(root / "results" / "synthetic.md")) == [
        "cosine.png", "resnet20-resnet8-curves.png"]
    tc = tables.TableConfig(runs=f"{root}/runs", pairs="resnet20:resnet8", methods="pefd ce", seeds="1")
    curves, _ = tables.curve_series(tc, "resnet20:resnet8", ("test_top1",))
    log_csv = root / "runs" / "resnet20-resnet8" / "pefd-seed1" / "log.csv"
    assert [mean for _, mean, _, _ in curves["test_top1"]["PEFD"]] == [
        float(row["test_top1"]) for row in csv.DictReader(open(log_csv))]
    assert list(curves["test_top1"]) == ["Student", "PEFD"]


def test_make_pipeline_evaluates_every_model_from_its_file(pipeline, tmp_path):
    import tables

    root, knobs, first, _ = pipeline
    evals = [line for line in first.stdout.splitlines() if " projkd.py eval " in line]
    assert sorted(e.split("--ckpt ")[1].split()[0] for e in evals) == sorted(
        [f"{root}/ckpt/resnet20.pt", f"{root}/runs/resnet8/ce-seed1/model.pt",
         f"{root}/runs/resnet20-resnet8/pefd-seed1/model.pt"])
    for run in ("resnet8/ce-seed1", "resnet20-resnet8/pefd-seed1"):
        metrics = json.loads((root / "runs" / run / "metrics.json").read_text())
        evaluated = json.loads((root / "runs" / run / "model.eval.json").read_text())
        assert evaluated["top1"] == pytest.approx(metrics["last_top1"], abs=1e-4)  # log rounding only
        assert evaluated["images"] == 64 and evaluated["synthetic_size"] == 256  # from the run's metrics.json
        assert evaluated["sha256"] == models.file_sha256(root / "runs" / run / "model.pt")
    teacher = json.loads((root / "ckpt" / "resnet20.eval.json").read_text())
    assert teacher["test_set_sha256"] == evaluated["test_set_sha256"]  # the same 64 test images, via EVAL_EXTRA
    assert f"| Teacher | {teacher['top1']:.2f} |" in (root / "results" / "synthetic.md").read_text()
    assert "[^" not in (root / "results" / "synthetic.md").read_text()  # no disagreement to mark
    # a model.pt changed after training (in a copy): its evaluation and the table's footnote show it
    copy = tmp_path / "runs" / "resnet20-resnet8" / "pefd-seed1"
    shutil.copytree(root / "runs" / "resnet20-resnet8" / "pefd-seed1", copy)
    state = torch.load(copy / "model.pt", weights_only=True)
    state["fc.bias"][0] += 100.0  # every test image now goes to class 0, which 7 of the 64 are
    torch.save(state, copy / "model.pt")
    assert projkd.main(["eval", "--arch", "resnet8", "--ckpt", str(copy / "model.pt")]) == 0
    assert json.loads((copy / "model.eval.json").read_text())["top1"] == 100 * 7 / 64
    assert tables.main(["--runs", str(tmp_path / "runs"), "--pairs", "resnet20:resnet8", "--methods", "pefd",
                        "--seeds", "1", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| PEFD | 10.94 (n=1) [^1] |" in text
    assert f"[^1]: {copy}: model.pt evaluates to 10.94% top-1 alone, the training loop's last epoch measured " \
           f"{metrics['last_top1']:.2f}%" in text


def test_make_pipeline_redoes_nothing_and_continues_an_interrupted_run(pipeline):
    root, knobs, _, log = pipeline
    assert make("-q", "cifar-all", *knobs).returncode == 0  # up to date: nothing would run or evaluate again
    # an interrupted run (last.pt but no metrics.json) is continued and evaluated again, and nothing else is redone
    pefd = root / "runs" / "resnet20-resnet8" / "pefd-seed1"
    os.remove(pefd / "metrics.json")
    again = make("cifar-all", *knobs)
    assert again.returncode == 0, again.stderr
    assert [line.split()[3] for line in again.stdout.splitlines() if " projkd.py" in line] == ["--dataset", "eval"]
    assert f"resuming {pefd} after epoch 1" in again.stdout


def plan_lines(*args):
    return make("-n", *args, "DEPS=", "DATA=", f"PY={sys.executable}").stdout.splitlines()


def test_make_plan_for_imagenet_all():
    plan = plan_lines("imagenet-all")
    trainings = [line for line in plan if "projkd.py --dataset" in line]
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=1 projkd.py"
    assert all(t.startswith(f"{torchrun} --dataset imagenet --data-dir data/imagenet --device auto --epochs 100 ")
               for t in trainings)
    expected = [f"{p.replace(':', '-')}/{m}-seed1" for p in IMAGENET_PAIRS.split() for m in ("pefd", "kd")]
    expected += ["resnet18/ce-seed1", "mobilenet_v1/ce-seed1"]  # the Student rows, each shared by two pairs
    assert sorted(t.split("--run-dir ")[1].split()[0] for t in trainings) == sorted(f"runs/imagenet/{e}" for e in expected)
    assert all(f"--teacher-ckpt checkpoints/imagenet/{t.split('--teacher ')[1].split()[0]}.pt " in t
               for t in trainings if "--method ce" not in t)
    assert sorted(line for line in plan if "fetch-weights" in line) == sorted(
        f"{sys.executable} projkd.py fetch-weights --arch {a} --out checkpoints/imagenet/{a}.pt"
        for a in ("densenet201", "resnet34", "resnet50"))
    assert not any("tcache" in line for line in plan)  # never on ImageNet
    assert f'{sys.executable} tables.py --kind imagenet --runs runs/imagenet --teachers checkpoints/imagenet --pairs ' \
           f'"{IMAGENET_PAIRS}" --methods "pefd kd ce" --seeds "1" --out "results/imagenet.md results/imagenet.csv" ' \
           '--figures results/figures' in plan
    # each finished model evaluated alone, once: 10 runs and 3 teachers, on one GPU, without torchrun
    evals = [line for line in plan if " projkd.py eval " in line]
    assert sorted(e.split("--ckpt ")[1].split()[0] for e in evals) == sorted(
        [f"runs/imagenet/{e}/model.pt" for e in expected] +
        [f"checkpoints/imagenet/{a}.pt" for a in ("densenet201", "resnet34", "resnet50")])
    assert all(e.startswith(f"{sys.executable} projkd.py eval --arch ") and "--dataset imagenet --data-dir "
               "data/imagenet --device auto" in e for e in evals)
    # more GPUs per run, seeds and a short trial, which gets folders of its own but the same pretrained teachers
    plan = plan_lines("imagenet-all", "NPROC=8", "IMAGENET_SEEDS=1 2", "IMAGENET_EPOCHS=2")
    trainings = [line for line in plan if "projkd.py --dataset" in line]
    assert len(trainings) == 2 * 10 and all("--nproc_per_node=8 projkd.py" in t for t in trainings)
    assert all("--run-dir runs/imagenet-e2/" in t and "--epochs 2 " in t for t in trainings)
    assert len([line for line in plan if "fetch-weights" in line and "checkpoints/imagenet/" in line]) == 3
    assert any("--out \"results/imagenet-e2/imagenet.md results/imagenet-e2/imagenet.csv\"" in line for line in plan)
    # one pair alone: its runs and its teacher, then the whole table from whatever has finished
    plan = plan_lines("imagenet-r34-r18")
    assert sorted(line.split("--run-dir ")[1].split()[0] for line in plan if "projkd.py --dataset" in line) == [
        "runs/imagenet/resnet18/ce-seed1", "runs/imagenet/resnet34-resnet18/kd-seed1",
        "runs/imagenet/resnet34-resnet18/pefd-seed1"]
    assert [line.split("--arch ")[1].split()[0] for line in plan if "fetch-weights" in line] == ["resnet34"]
    assert any(f'tables.py --kind imagenet --runs runs/imagenet --teachers checkpoints/imagenet --pairs "{IMAGENET_PAIRS}"'
               in line for line in plan)


def test_make_plan_launch_prefixes_exactly_what_computes(tmp_path):
    launch = "srun -N1 -n1 --gres=gpu:1"
    plan = plan_lines("cifar-all", f"LAUNCH={launch}")
    launched = [line for line in plan if line.startswith(launch + " ")]
    assert launched == [line for line in plan if any(f"projkd.py {c}" in line for c in ("--dataset", "cache", "eval"))]
    assert len(launched) == 12 + 60 + 4 + 76  # models alone, distillations, teacher caches, evaluations
    assert any(line.startswith(f"{sys.executable} tables.py ") for line in plan)  # the tables run here
    assert any(line.startswith(f"{sys.executable} projkd.py fetch-teachers ") for line in plan)  # it needs internet
    plan = plan_lines("imagenet-all", f"LAUNCH={launch}", "NPROC=4")
    launched = [line for line in plan if line.startswith(launch + " ")]
    assert len(launched) == 10 + 13 and all(
        line.startswith(f"{launch} {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=4 ")
        for line in launched if " eval " not in line)  # the evaluations: one process, one GPU
    assert any(line.startswith(f"{sys.executable} projkd.py fetch-weights ") for line in plan)
    assert plan_lines("bench", f"LAUNCH={launch}")[-2:] == [  # its figure is drawn here, as the tables are
        f"{launch} {sys.executable} projkd.py bench --device auto --out-dir results",
        f"{sys.executable} tables.py --kind bench --bench results/bench.json --figures results/figures"]
    # the download (it needs the login node's internet) is not launched; one command, without a traceback offline
    plan = make("-n", "cifar-all", f"LAUNCH={launch}", f"DATA_DIR={tmp_path}", "DEPS=", f"PY={sys.executable}").stdout
    assert f"{sys.executable} projkd.py download --dataset cifar100 --data-dir {tmp_path}" in plan.splitlines()


STAND_IN_PYTHON = """#!{python}
# Stands in for python in Make tests: logs its arguments, writes the files the real command would, empty.
import os, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
def touch(path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    open(path, "w").close()
def value(flag):
    return args[args.index(flag) + 1]
if "--run-dir" in args:
    touch(os.path.join(value("--run-dir"), "model.pt"))
    touch(os.path.join(value("--run-dir"), "metrics.json"))
elif "cache" in args:
    touch(value("--teacher-cache-file"))
elif "eval" in args:
    touch(os.path.splitext(value("--ckpt"))[0] + ".eval.json")
elif "fetch-teachers" in args:
    touch(os.path.join(value("--out-dir"), value("--arch") + ".pt"))
else:  # fetch-weights --out PATH, tables.py --out "PATH ..."
    for path in value("--out").split():
        touch(path)
"""


def stand_in_python(tmp_path):
    python, log = tmp_path / "python", tmp_path / "calls.log"
    python.write_text(STAND_IN_PYTHON.format(python=sys.executable, log=str(log)))
    python.chmod(0o755)
    return python, log


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_make_plan_teacher_cache_only_for_pefd_kd_crd_on_a_gpu():
    plan = plan_lines("cifar-all", "SEEDS=1", "DEVICE=cuda")
    caches = [line for line in plan if "projkd.py cache " in line]
    assert len(caches) == 4  # one per teacher, each shared by its pairs (ResNet50 has two)
    for cache in caches:
        t = cache.split("--teacher ")[1].split()[0]
        assert cache == (f"{sys.executable} projkd.py cache --teacher {t} --teacher-ckpt checkpoints/cifar100/{t}.pt "
                         f"--teacher-cache-file checkpoints/cifar100/{t}.tcache --dataset cifar100 --data-dir data "
                         "--device cuda ")
    runs = [line for line in plan if "projkd.py --dataset" in line and "--teacher " in line]
    assert len(runs) == 5 * 4
    for run in runs:
        t, method = run.split("--teacher ")[1].split()[0], run.split("--method ")[1].split()[0]
        flags = f"--teacher-cache on --teacher-cache-file checkpoints/cifar100/{t}.tcache "
        assert (flags in run) == (method in ("pefd", "kd", "crd")), run
        cache = next(c for c in caches if f"--teacher {t} " in c)
        assert plan.index(cache) < plan.index(run)  # built before any run that reads it
    on_cpu = plan_lines("pair", "T=vgg13", "S=vgg8", "SEEDS=1", "TEACHER_CACHE=on", "DEVICE=cpu")
    assert "--teacher-cache on " in on_cpu[-1] and any("projkd.py cache " in line for line in on_cpu)  # asked for
    for knobs in (["DEVICE=cpu"], ["TEACHER_CACHE=off"]):  # auto: a CPU would take hours to build it
        assert not any("tcache" in line for line in plan_lines("cifar-all", "ablations", "SEEDS=1", *knobs))


def test_git_ignores_what_the_readme_has_users_make():
    made = [".venv/bin/python", "data/cifar-100-python/train", "runs/x/metrics.json", "results/x.md",
            "checkpoints/cifar100/vgg13.pt", ".deps-installed"]
    ignored = subprocess.run(["git", "check-ignore", *made], cwd=HERE, capture_output=True, text=True).stdout.split()
    assert ignored == made


def test_make_device_auto_plans_teacher_caches_only_where_a_gpu_is_visible(tmp_path):
    """DEVICE=auto (the default) means the CPU where nvidia-smi lists no GPU: no cache builds planned there."""
    for listing in ("", "GPU 0: NVIDIA H200 (UUID: GPU-0)"):
        env = path_with_nvidia_smi(tmp_path, listing)
        plan = make("-n", "pair", "T=vgg13", "S=vgg8", "SEEDS=1", "DEPS=", "DATA=", f"PY={sys.executable}", env=env)
        assert ("projkd.py cache " in plan.stdout) == bool(listing), plan.stdout


def test_make_builds_each_teacher_cache_once_and_only_when_a_run_needs_it(tmp_path):
    python, log = stand_in_python(tmp_path)
    knobs = [f"PY={python}", "DEPS=", "DATASET=synthetic", "DEVICE=cuda", "PAIRS=resnet20:resnet8 resnet20:resnet14",
             "SEEDS=1 2", f"RUNS={tmp_path}/runs", f"TEACHERS={tmp_path}/ckpt", f"RESULTS={tmp_path}/results"]
    first = make("-j4", "cifar-all", *knobs)
    assert first.returncode == 0, first.stderr
    log_lines = calls(log)
    cache = [i for i, c in enumerate(log_lines) if c.startswith("projkd.py cache ")]
    assert len(cache) == 1 and f"--teacher-cache-file {tmp_path}/ckpt/resnet20.tcache " in log_lines[cache[0]] + " "
    readers = [i for i, c in enumerate(log_lines) if "--teacher-cache-file" in c and "--run-dir" in c]
    assert len(readers) == 2 * 3 * 2 and min(readers) > cache[0]  # 2 pairs x (pefd kd crd) x 2 seeds, after the cache
    assert make("cifar-all", *knobs).returncode == 0 and len(calls(log)) == len(log_lines)  # up to date
    # the cache file is only needed while a run is to be done: deleting it redoes nothing, a run to redo rebuilds it
    os.remove(tmp_path / "ckpt" / "resnet20.tcache")
    assert make("cifar-all", *knobs).returncode == 0 and len(calls(log)) == len(log_lines)
    os.remove(tmp_path / "runs" / "resnet20-resnet8" / "kd-seed2" / "metrics.json")
    assert make("cifar-all", *knobs).returncode == 0
    redone = calls(log)[len(log_lines):]
    assert len(redone) == 4 and redone[0].startswith("projkd.py cache ") and redone[3].startswith("tables.py ")
    assert f"--run-dir {tmp_path}/runs/resnet20-resnet8/kd-seed2 " in redone[1]
    assert f"eval --arch resnet8 --ckpt {tmp_path}/runs/resnet20-resnet8/kd-seed2/model.pt " in redone[2]
    # a new teacher checkpoint: its cache is rebuilt once, before all its distillation runs are redone
    os.utime(tmp_path / "ckpt" / "resnet20.pt", (time.time() + 10,) * 2)
    before = len(calls(log))
    assert make("-j4", "cifar-all", *knobs).returncode == 0
    redone = calls(log)[before:]
    cache = [i for i, c in enumerate(redone) if c.startswith("projkd.py cache ")]
    runs = [i for i, c in enumerate(redone) if c.startswith("projkd.py --dataset")]
    readers = [i for i in runs if "--teacher-cache-file" in redone[i]]
    assert len(cache) == 1 and len(runs) == 2 * 4 * 2 and redone[-1].startswith("tables.py ")  # 2 pairs x 4 x 2
    assert len([c for c in redone if c.startswith("projkd.py eval ")]) == 1 + 2 * 4 * 2  # the teacher's, the runs'
    assert len(readers) == 2 * 3 * 2 and cache[0] < min(readers)  # sp runs need no cache: -j may start them first


def test_make_fetches_the_archives_teachers_and_trains_the_others(tmp_path):
    python, log = stand_in_python(tmp_path)
    knobs = [f"PY={python}", "DEPS=", "DATA=", "PAIRS=vgg13:vgg8 resnet20:resnet8", "METHODS=kd ce", "SEEDS=1",
             f"RUNS={tmp_path}/runs", f"RESULTS={tmp_path}/results"]
    assert make("cifar-all", *knobs, f"TEACHERS={tmp_path}/ckpt").returncode == 0
    done = calls(log)
    assert [c.split("--arch ")[1].split()[0] for c in done if c.startswith("projkd.py fetch-teachers ")] == ["vgg13"]
    trained = [c for c in done if "--method ce" in c and "--student resnet20 " in c]  # not in the archive: trained
    assert len(trained) == 1 and not any("--student vgg13 " in c for c in done)
    assert json.loads((tmp_path / "ckpt" / "resnet20.json").read_text()) == {
        "how": "trained here", "run": f"{tmp_path}/runs/resnet20/ce-seed1"}
    assert make("cifar-all", *knobs, f"TEACHERS={tmp_path}/ckpt").returncode == 0 and calls(log) == done
    # TEACHERS_FROM=train trains vgg13 too; a checkpoint in place is used as it is, whatever TEACHERS_FROM says
    os.makedirs(tmp_path / "other")
    shutil.copy(tmp_path / "ckpt" / "resnet20.pt", tmp_path / "other" / "resnet20.pt")
    assert make("cifar-all", *knobs, f"TEACHERS={tmp_path}/other", "TEACHERS_FROM=train").returncode == 0
    again = calls(log)[len(done):]
    assert not any("fetch-teachers" in c for c in again) and not any("--student resnet20 " in c for c in again)
    assert any("--method ce" in c and "--student vgg13 " in c for c in again)


def test_make_and_models_name_the_same_archive():
    makefile, params = (open(os.path.join(HERE, f)).read() for f in ("Makefile", "params.mk"))
    assert re.search(r"^ARCHIVE_TEACHERS := (.*)$", makefile, re.M)[1].split() == list(models.PUBLISHED_TEACHERS)
    assert re.search(r"^TEACHERS_URL \?= (.*)$", params, re.M)[1] == models.TEACHERS_URL


def test_make_imagenet_all_with_stand_in_commands_redoes_nothing(tmp_path):
    python, log = stand_in_python(tmp_path)
    knobs = [f"PY={python}", "DEPS=", f"IMAGENET_DIR={tmp_path}/imagenet", f"RUNS={tmp_path}/runs",
             f"TEACHERS={tmp_path}/ckpt", f"RESULTS={tmp_path}/results"]
    missing = make("imagenet-all", *knobs)
    assert missing.returncode != 0 and f"no ImageNet in {tmp_path}/imagenet/" in missing.stderr and not calls(log)
    os.makedirs(tmp_path / "imagenet" / "val")
    first = make("-j4", "imagenet-all", *knobs)
    assert first.returncode == 0, first.stderr
    done = calls(log)
    assert sorted(c.split()[0] for c in done) == ["-m"] * 10 + ["projkd.py"] * (3 + 13) + ["tables.py"]
    assert (tmp_path / "results" / "imagenet.md").exists() and (tmp_path / "ckpt" / "resnet34.pt").exists()
    assert make("imagenet-all", *knobs).returncode == 0 and calls(log) == done


def test_the_readme_example_runs():
    readme = open(os.path.join(HERE, "README.md")).read()
    example = readme.split("## PEFD in your own code")[1].split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    projectors = namespace["projectors"]
    assert all(p.grad is not None for p in projectors.parameters())  # the example's step trained them


# --- result tables (tables.py) -----------------------------------------------------------------------------------

def write_metrics(run_dir, last, best=None, teacher=None, cosine=0.5, top5=None, best_top5=None, teacher_top5=None,
                  evaluated="same", history=()):
    """A finished run's metrics.json (with `history`, also as log.csv), and its model.eval.json saying model.pt
    evaluates to `evaluated` (top-1; "same": the training loop's `last`; None: no evaluation yet)."""
    os.makedirs(run_dir, exist_ok=True)
    metrics = {"last_top1": last, "best_top1": best if best is not None else last, "teacher_top1": teacher,
               "last_top5": top5, "best_top5": best_top5 if best_top5 is not None else top5, "teacher_top5": teacher_top5,
               "between_class_cosine": cosine, "epochs": 240, "device": "test", "torch": "x", "code": "abc",
               "config": {"dataset": "cifar100"}, "history": write_log(run_dir, history)}
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    if evaluated is not None:
        with open(os.path.join(run_dir, "model.eval.json"), "w") as f:
            json.dump({"top1": last if evaluated == "same" else evaluated, "top5": top5}, f)


def write_log(run_dir, history):
    """A run's log.csv as projkd.py writes it, from epoch rows (a run without metrics.json: unfinished)."""
    os.makedirs(run_dir, exist_ok=True)
    if history:
        with open(os.path.join(run_dir, "log.csv"), "w") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(history)
    return list(history)


def epochs(top1, mda=None, top5=None):
    """Epoch rows as in metrics["history"]; train_mda only where given (runs from before it was logged have none)."""
    return [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "test_top1": a, "test_top5": (top5 or top1)[e],
             "between_class_cosine": 0.3, **({"train_mda": mda[e]} if mda else {})} for e, a in enumerate(top1)]


def log_columns(*run_dirs, column):
    """Per epoch, the mean, min and max of a log.csv column over the runs: what a curve must plot."""
    values = [[float(row[column]) for row in csv.DictReader(open(os.path.join(d, "log.csv")))] for d in run_dirs]
    return [(e + 1, sum(v) / len(v), min(v), max(v)) for e, v in enumerate(zip(*values))]


def drawn_figures(monkeypatch):
    """What each figure drawn from now on shows, by file name: (its panels, the texts written in them)."""
    import tables

    drawn, save = {}, tables._save
    def record(plt, fig, path):
        drawn[os.path.basename(path)] = (len(fig.axes), [t.get_text() for ax in fig.axes for t in ax.texts])
        save(plt, fig, path)
    monkeypatch.setattr(tables, "_save", record)
    return drawn


def decoded_pngs(*paths):
    """The paths, each checked to be a PNG that decodes."""
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
    return list(paths)


def linked_figures(md):
    """The figures a markdown file links to (relative links), each checked to be a PNG that decodes."""
    return decoded_pngs(*(md.parent / link for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md.read_text())))


def test_tables_report_mean_std_n_and_missing_never_zero(tmp_path, capsys):
    import tables

    runs = tmp_path / "runs"
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed1", 70.0, best=71.0, teacher=74.5)
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed2", 72.0, best=72.5, teacher=74.5)
    for seed, acc in ((1, 69.0), (2, 70.0), (3, 71.0)):
        write_metrics(runs / "vgg8" / f"ce-seed{seed}", acc)  # the Student row: the student trained alone
    write_metrics(runs / "other-vgg8" / "kd-seed1", 99.0)  # another pair's run must not leak in
    md, csv_path = tmp_path / "out" / "t.md", tmp_path / "out" / "t.csv"
    assert tables.main(["--runs", str(runs), "--pairs", "vgg13:vgg8", "--out", f"{md} {csv_path}"]) == 0
    text = md.read_text()
    last = text.split("## ")[1]  # the last-epoch table comes first
    assert "| PEFD | 71.00 ± 1.41 (n=2) | 74.35 ± 0.12 |" in last  # sample std of 70 and 72; the paper beside
    assert "| Student | 70.00 ± 1.00 (n=3) | 70.74 ± 0.31 |" in last
    assert "| Teacher | 74.50 | 74.64 |" in last
    assert "| KD | missing | 72.98 ± 0.19 |" in last and "| SP | missing |" in last
    assert "| PEFD | 71.75 ± 1.06 (n=2) |" in text.split("## ")[2]  # best epoch: 71 and 72.5
    rows = list(csv.DictReader(open(csv_path)))
    kd = next(r for r in rows if r["table"] == "last" and r["row"] == "KD")
    assert (kd["mean"], kd["std"], kd["n"], kd["paper_mean"]) == ("", "", "0", "72.98")
    pefd = next(r for r in rows if r["table"] == "last" and r["row"] == "PEFD")
    assert (float(pefd["mean"]), float(pefd["std"]), pefd["n"]) == (71.0, pytest.approx(1.4142, abs=1e-4), "2")


def test_tables_take_last_numbers_from_each_model_file_evaluated_alone_and_mark_disagreements(tmp_path):
    import tables

    runs, teachers = tmp_path / "runs", tmp_path / "ckpt"
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed1", 70.0, teacher=74.5)  # model.pt evaluates as training did
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed2", 72.0, teacher=74.5, evaluated=71.5)  # model.pt differs
    write_metrics(runs / "vgg13-vgg8" / "kd-seed1", 71.0, evaluated=71.015)  # within 0.02 points: float rounding
    write_metrics(runs / "vgg13-vgg8" / "sp-seed1", 73.0, evaluated=None)  # not evaluated yet
    teachers.mkdir()
    (teachers / "vgg13.eval.json").write_text(json.dumps({"top1": 74.9, "top5": 92.0}))
    md, csv_path = tmp_path / "t.md", tmp_path / "t.csv"
    assert tables.main(["--runs", str(runs), "--teachers", str(teachers), "--pairs", "vgg13:vgg8", "--seeds", "1 2",
                        "--out", f"{md} {csv_path}"]) == 0
    text = md.read_text()
    last, best = text.split("## ")[1:3]
    assert "| Teacher | 74.90 | 74.64 |" in last  # the checkpoint's own evaluation, not the 74.5 its students saw
    assert "| PEFD | 70.75 ± 1.06 (n=2) [^2] |" in last  # 70 and 71.5: what the files evaluate to, marked
    assert "| KD | 71.02 (n=1) | 72.98 ± 0.19 |" in last and "| SP | 73.00 (n=1) [^1] |" in last
    assert "| PEFD | 71.00 ± 1.41 (n=2) |" in best  # the best epoch is the training loop's (no file of it is kept)
    assert f"[^2]: {runs}/vgg13-vgg8/pefd-seed2: model.pt evaluates to 71.50% top-1 alone, the training loop's last " \
           "epoch measured 72.00%" in text
    assert f"[^1]: {runs}/vgg13-vgg8/sp-seed1: the training loop's last epoch; model.pt not yet evaluated" in text
    rows = {(r["table"], r["row"]): r for r in csv.DictReader(open(csv_path))}
    assert "model.pt evaluates to 71.50%" in rows["last", "PEFD"]["notes"] and rows["best", "PEFD"]["notes"] == ""


def test_ablation_table_finds_the_variant_runs(tmp_path):
    import tables

    runs = tmp_path / "runs"
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed1", 74.0, cosine=0.2)
    write_metrics(runs / "vgg13-vgg8" / "pefd-q0-seed1", 73.0, cosine=0.4)
    write_metrics(runs / "vgg13-vgg8" / "pefd-depth3-seed1", 72.0)
    write_metrics(runs / "vgg13-vgg8" / "pefd-gelu-seed1", 74.5)
    out = tmp_path / "ablations.md"
    assert tables.main(["--kind", "ablations", "--runs", str(runs), "--pairs", "vgg13:vgg8", "--seeds", "1",
                        "--variants", "gelu q0 depth3 none", "--out", str(out)]) == 0
    last, _, cosine = out.read_text().split("## ")[1:]
    labels = [line.split("|")[1].strip() for line in last.splitlines() if line.startswith("| ") and "→" not in line]
    assert labels == ["no projector", "q=3 (PEFD)", "depth 3", "GELU", "no activation"]  # the paper's order
    assert "| no projector | 73.00 (n=1) | – |" in last and "| GELU | 74.50 (n=1) | 74.39 ± 0.18 |" in last
    assert "| no activation | missing | 73.46 ± 0.42 |" in last
    assert "| no projector | 0.4000 (n=1) |" in cosine and "| q=3 (PEFD) | 0.2000 (n=1) |" in cosine
    assert tables.main(["--kind", "ablations", "--variants", "q0 wide"]) == 2


def test_imagenet_table_is_table_1_with_our_numbers_beside_the_paper(tmp_path):
    import tables

    runs = tmp_path / "runs"
    for seed, top1, top5 in ((1, 71.0, 90.0), (2, 72.0, 91.0)):
        write_metrics(runs / "resnet34-resnet18" / f"pefd-seed{seed}", top1, best=top1 + 0.5, teacher=73.3, top5=top5,
                      teacher_top5=91.4)
    write_metrics(runs / "resnet18" / "ce-seed1", 69.5, top5=89.0)  # the Student row of (a) and (c)
    write_metrics(runs / "densenet201-mobilenet_v1" / "kd-seed1", 70.0, teacher=76.9, top5=89.9, teacher_top5=93.4)
    md, csv_path = tmp_path / "imagenet.md", tmp_path / "imagenet.csv"
    assert tables.main(["--kind", "imagenet", "--runs", str(runs), "--pairs", IMAGENET_PAIRS, "--methods", "pefd kd ce",
                        "--seeds", "1 2", "--out", f"{md} {csv_path}"]) == 0
    text = md.read_text()
    last, best = text.split("## ")[1:]
    assert "| Pair | Accuracy | Student | paper | KD | paper | PEFD | paper | Teacher | paper |" in last
    assert ("| (a) resnet34 → resnet18 | Top-1 | 69.50 (n=1) | 69.75 | missing | 70.83 | 71.50 ± 0.71 (n=2) | 71.94 "
            "| 73.30 | 73.31 |") in last
    assert "|  | Top-5 | 89.00 (n=1) | 89.07 | missing | 90.15 | 90.50 ± 0.71 (n=2) | 90.68 | 91.40 | 91.41 |" in last
    assert "| (b) resnet50 → mobilenet_v1 | Top-1 | missing | 69.06 | missing | 70.65 | missing | 73.16 | missing | 76.13 |" \
        in last  # nothing finished: missing, never 0
    assert ("| (c) densenet201 → resnet18 | Top-1 | 69.50 (n=1) | 69.75 | missing | 70.38 | missing | 72.29 | missing "
            "| 76.89 |") in last  # the same Student run as (a)
    assert "|  | Top-5 | missing | 88.84 | 89.90 (n=1) | 89.93 | missing | 91.47 | 93.40 | 93.37 |" in last  # (d)
    assert "| (a) resnet34 → resnet18 | Top-1 | 69.50 (n=1) | 69.75 | missing | 70.83 | 72.00 ± 0.71 (n=2) |" in best
    assert "| 0.00" not in text and "SP" not in text
    assert "finished runs: 4" in text  # the shared Student run counted once
    rows = list(csv.DictReader(open(csv_path)))
    pefd = next(r for r in rows if r["table"] == "last-top5" and r["row"] == "PEFD" and r["teacher"] == "resnet34")
    assert (pefd["mean"], pefd["n"], pefd["paper_mean"], pefd["paper_std"]) == ("90.5", "2", "90.68", "")
    # SP and CRD-lite are columns when asked for, in the paper's order
    assert tables.main(["--kind", "imagenet", "--runs", str(runs), "--pairs", IMAGENET_PAIRS, "--seeds", "1",
                        "--out", str(md)]) == 0
    assert ("| Pair | Accuracy | Student | paper | KD | paper | SP | paper | CRD-lite | paper | PEFD | paper | Teacher "
            "| paper |") in md.read_text()


def test_curve_figures_plot_each_methods_log_csv_mean_and_band(tmp_path, monkeypatch):
    import tables

    runs, drawn = tmp_path / "runs", drawn_figures(monkeypatch)
    pefd = [runs / "vgg13-vgg8" / f"pefd-seed{s}" for s in (1, 2)]
    write_metrics(pefd[0], 30.0, teacher=74.5, cosine=0.2, history=epochs([10, 20, 30], mda=[0.9, 0.5, 0.3]))
    write_metrics(pefd[1], 40.0, teacher=74.5, cosine=0.4, history=epochs([14, 26, 40], mda=[0.7, 0.4, 0.2]))
    write_log(runs / "vgg13-vgg8" / "pefd-seed3", epochs([99, 99, 99], mda=[9, 9, 9]))  # unfinished: never plotted
    write_metrics(runs / "vgg13-vgg8" / "kd-seed1", 33.0, teacher=74.5, history=epochs([12, 22, 33]))  # no train_mda
    write_metrics(runs / "vgg8" / "ce-seed1", 24.0, cosine=0.6, history=epochs([8, 16, 24]))
    write_metrics(runs / "wrn_40_2-wrn_16_2" / "kd-seed1", 50.0, history=epochs([50]))  # an older run alone
    pairs = "vgg13:vgg8 wrn_40_2:wrn_16_2 resnet32x4:resnet8x4"
    md, figures = tmp_path / "out" / "cifar100.md", tmp_path / "out" / "figures"
    assert tables.main(["--runs", str(runs), "--pairs", pairs, "--out", str(md), "--figures", str(figures)]) == 0
    tc = tables.TableConfig(runs=str(runs), pairs=pairs)
    series, teacher = tables.curve_series(tc, "vgg13:vgg8", ("test_top1", "train_mda"))
    assert list(series["test_top1"]) == ["Student", "KD", "PEFD"] and list(series["train_mda"]) == ["PEFD"]
    assert series["test_top1"]["PEFD"] == log_columns(*pefd, column="test_top1") == [
        (1, 12, 10, 14), (2, 23, 20, 26), (3, 35, 30, 40)]  # mean, min, max over seeds 1 and 2 only
    assert series["train_mda"]["PEFD"] == pytest.approx(log_columns(*pefd, column="train_mda"))
    assert series["test_top1"]["KD"] == log_columns(runs / "vgg13-vgg8" / "kd-seed1", column="test_top1")
    assert teacher == {"test_top1": 74.5}
    assert tables.cosine_series(tc, "vgg13:vgg8") == [
        ("Student", {"mean": 0.6, "std": None, "n": 1}), ("KD", {"mean": 0.5, "std": None, "n": 1}),
        ("PEFD", {"mean": pytest.approx(0.3), "std": pytest.approx(0.1414, abs=1e-4), "n": 2})]  # SP, CRD: no bar
    assert tables.curve_series(tc, "resnet32x4:resnet8x4", ("test_top1",)) == ({"test_top1": {}}, {"test_top1": None})
    # every figure is linked from the table and decodes; the MDA panel only where a run logged the term
    assert sorted(p.name for p in linked_figures(md)) == sorted(os.listdir(figures)) == [
        "cosine.png", "resnet32x4-resnet8x4-curves.png", "vgg13-vgg8-curves.png", "wrn_40_2-wrn_16_2-curves.png"]
    assert "](figures/vgg13-vgg8-curves.png)" in md.read_text().split("## Figures")[1]
    assert drawn["vgg13-vgg8-curves.png"] == (2, []) and drawn["wrn_40_2-wrn_16_2-curves.png"] == (1, [])
    assert drawn["resnet32x4-resnet8x4-curves.png"] == (1, [tables.NO_RUNS])
    assert drawn["cosine.png"] == (3, [tables.NO_RUNS])  # a panel per pair; resnet32x4 → resnet8x4 has no run
    # ImageNet: top-1 and top-5 against epoch per pair and method, in the same folder as CIFAR's
    run = runs / "resnet34-resnet18" / "pefd-seed1"
    write_metrics(run, 60.0, teacher=73.3, top5=85.0, teacher_top5=91.4, history=epochs([50, 60], top5=[80, 85]))
    assert tables.main(["--kind", "imagenet", "--runs", str(runs), "--pairs", "resnet34:resnet18", "--seeds", "1",
                        "--out", str(tmp_path / "out" / "imagenet.md"), "--figures", str(figures)]) == 0
    tc = tables.TableConfig(runs=str(runs), pairs="resnet34:resnet18", seeds="1", kind="imagenet")
    series, teacher = tables.curve_series(tc, "resnet34:resnet18", ("test_top1", "test_top5"))
    assert series["test_top5"] == {"PEFD": log_columns(run, column="test_top5")} and teacher["test_top5"] == 91.4
    assert [p.name for p in linked_figures(tmp_path / "out" / "imagenet.md")] == [
        "imagenet-resnet34-resnet18-curves.png"]
    assert drawn["imagenet-resnet34-resnet18-curves.png"] == (2, [])


def test_ablation_figures_are_figures_3_and_4_beside_the_papers_pefd(tmp_path, monkeypatch):
    import tables

    runs, drawn = tmp_path / "runs", drawn_figures(monkeypatch)
    for name, top1s in (("pefd", (74.0, 75.0)), ("pefd-q0", (73.0,)), ("pefd-q2", (73.5, 74.5)),
                        ("pefd-depth2", (72.0,)), ("pefd-gelu", (76.0,))):
        for seed, top1 in enumerate(top1s, 1):
            write_metrics(runs / "vgg13-vgg8" / f"{name}-seed{seed}", top1, cosine=0.1 * seed, history=epochs([top1]))
    write_log(runs / "vgg13-vgg8" / "pefd-q4-seed1", epochs([99.0]))  # unfinished: no point, never 0
    pairs, variants = "vgg13:vgg8 resnet32x4:resnet8x4", "q0 q2 q4 depth2 depth3 gelu"
    md, figures = tmp_path / "ablations.md", tmp_path / "figures"
    assert tables.main(["--kind", "ablations", "--runs", str(runs), "--pairs", pairs, "--variants", variants,
                        "--seeds", "1 2", "--out", str(md), "--figures", str(figures)]) == 0
    tc = tables.TableConfig(runs=str(runs), pairs=pairs, variants=variants, seeds="1 2", kind="ablations")
    points, paper = tables.ablation_series(tc, "vgg13:vgg8", "q")
    assert [(x, s["mean"], s["n"]) for x, s in points] == [(0, 73.0, 1), (2, 74.0, 2), (3, 74.5, 2)]
    assert points[1][1]["std"] == pytest.approx(0.7071, abs=1e-4) and paper == (3, 74.35, 0.12)  # Table 4's PEFD
    points, paper = tables.ablation_series(tc, "vgg13:vgg8", "proj_depth")
    assert [(x, s["mean"]) for x, s in points] == [(1, 74.5), (2, 72.0)] and paper == (1, 74.35, 0.12)
    assert tables.ablation_series(tc, "resnet32x4:resnet8x4", "q") == ([], (3, 76.08, 0.33))
    assert tables.ablation_series(tc, "resnet20:resnet8", "q") == ([], None)  # a pair the paper has no number for
    assert [label for label, _ in tables.cosine_series(tc, "vgg13:vgg8")] == [
        "no projector", "q=2", "q=3 (PEFD)", "depth 2", "GELU"]  # Figure 2(b)'s bars, every finished row
    assert sorted(p.name for p in linked_figures(md)) == [
        "ablations-cosine.png", "ablations-depth.png", "ablations-q.png"]
    assert drawn["ablations-q.png"] == (2, [tables.NO_RUNS]) and drawn["ablations-depth.png"] == (2, [tables.NO_RUNS])


def test_bench_figure_and_a_python_without_matplotlib(tmp_path, monkeypatch, capsys):
    import tables

    report = {"device": "NVIDIA H200", "torch": "2.14.1", "batch_size": 64, "pairs": [{"teacher": "vgg13",
              "student": "vgg8", "rows": [
                  {"loop": "classic", "cached": False, "images_per_s": 5000.0, "vs_classic": 1.0, "mfu": 0.01},
                  {"loop": "ours, CUDA graph, teacher live", "cached": False, "images_per_s": None, "mfu": None,
                   "skipped": "needs CUDA"},
                  {"loop": "ours, CUDA graph, teacher cached", "cached": True, "images_per_s": 60000.0, "mfu": None}]}]}
    bench_json, figures = tmp_path / "bench.json", tmp_path / "figures"
    bench_json.write_text(json.dumps(report))
    assert tables.bench_series(report) == {"vgg13 → vgg8": [
        ("classic", 5000.0, 0.01, None), ("ours, CUDA graph, teacher live", None, None, "needs CUDA"),
        ("ours, CUDA graph, teacher cached", 60000.0, None, None)]}
    bench = ["--kind", "bench", "--bench", str(bench_json), "--figures", str(figures)]
    assert tables.main(bench) == 0 and decoded_pngs(figures / "bench.png") and os.listdir(figures) == ["bench.png"]
    assert tables.main(["--kind", "bench", "--bench", str(tmp_path / "none.json"), "--figures", str(figures)]) == 2
    # a failed write (a full disk) leaves neither a PNG nor its temporary file
    import matplotlib.figure
    def full_disk(self, path, **kwargs):
        open(path, "wb").write(b"half a PNG")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    os.remove(figures / "bench.png")
    capsys.readouterr()
    assert tables.main(bench) == 2 and os.listdir(figures) == []
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    # without matplotlib: make bench (a GPU node's python) skips its figure in one line; the tables stop in one line
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert tables.main(bench) == 0 and os.listdir(figures) == []
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "no bench figure" in out and "pip install -r requirements.txt" in out and not err
    md = tmp_path / "out" / "cifar100.md"
    assert tables.main(["--runs", str(tmp_path), "--out", str(md), "--figures", str(figures)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -r requirements.txt" in err and not md.parent.exists()
    # (that importing tables.py, as projkd.py eval does, imports no matplotlib: test_importing_projkd_has_no_side_effects)


# --- runs that survive (issue 19) --------------------------------------------------------------------------------

def survivor_args(run_dir, *extra):
    """Two epochs of 4 steps, last.pt at every check point (every step but an epoch's last, and between epochs)."""
    return synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--epochs", "2", "--checkpoint-seconds", "0",
                          "--run-dir", str(run_dir), *extra)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert projkd.main(survivor_args(run_dir)) == 0
    return run_dir


TIMINGS = ("seconds", "images_per_s", "plan_wait_s")


def assert_same_run(a, b):
    """The same weights, and the same numbers in log.csv and metrics.json but for the timings."""
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    la, lb = (list(csv.DictReader(open(d / "log.csv"))) for d in (a, b))
    for rows_a, rows_b in ((ma["history"], mb["history"]), (la, lb)):
        assert [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows_a] == \
            [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows_b]
    assert all(ma[k] == mb[k] for k in ("last_top1", "last_top5", "best_top1", "between_class_cosine"))


# Python that runs projkd.main and sends its own process a signal when train_step is called for the AT-th time
# (under torchrun, in process RANK only): a kill at a known step, without polling.
SIGNALLED = """import os, signal, sys
sys.path.insert(0, {here!r})
import projkd
calls, train_step = [], projkd.train_step
def step(*args):
    calls.append(1)
    if len(calls) == {at} and os.environ.get("RANK", "0") == "{rank}":
        os.kill(os.getpid(), signal.{name})
    return train_step(*args)
projkd.train_step = step
sys.exit(projkd.main(sys.argv[1:]))
"""


def signalled_script(tmp_path, name, at, rank=0):
    script = tmp_path / f"{name.lower()}.py"
    script.write_text(SIGNALLED.format(here=HERE, at=at, rank=rank, name=name))
    return str(script)


def test_a_run_killed_within_an_epoch_resumes_bit_identical(tmp_path, straight_run, capsys):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the float sums of this process's runs
    killed = subprocess.run([sys.executable, signalled_script(tmp_path, "SIGKILL", at=7), *survivor_args(run_dir)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 2)  # killed in the third step of epoch 2
    assert projkd.main(survivor_args(run_dir, "--resume")) == 0
    assert f"resuming {run_dir} at step 3 of epoch 2" in capsys.readouterr().out
    assert_same_run(straight_run, run_dir)


@pytest.mark.parametrize("name,at,status,kept", [("SIGTERM", 7, 143, (1, 3)), ("SIGUSR1", 2, 138, (0, 2)),
                                                 ("SIGINT", 3, 130, (0, 2))])
def test_a_signal_within_an_epoch_stops_the_run_to_resume(tmp_path, straight_run, capsys, monkeypatch, name, at,
                                                          status, kept):
    """SIGTERM and Slurm's SIGUSR1 let the step finish, write last.pt and stop; Ctrl-C (SIGINT) stops at once and
    keeps what the last check point wrote, in the first epoch too: the run folder stays."""
    run_dir, signum, handlers = tmp_path / "run", getattr(signal, name), signal.getsignal(signal.SIGTERM)
    calls, train_step = [], projkd.train_step

    def step(*args):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return train_step(*args)
    monkeypatch.setattr(projkd, "train_step", step)
    assert projkd.main(survivor_args(run_dir)) == status
    err = capsys.readouterr().err
    epoch, steps = kept
    why = "interrupted" if name == "SIGINT" else \
        f"{name}: stopped after step {steps} of epoch {epoch + 1}, kept in {run_dir / 'last.pt'}"
    assert err == f"projkd: {why}; continue with the same command plus --resume\n"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == kept
    assert sorted(os.listdir(run_dir)) == ["last.pt", "log.csv"][:1 + epoch]  # no .lock, nothing temporary
    assert signal.getsignal(signal.SIGTERM) == handlers  # the handlers are training's alone
    monkeypatch.setattr(projkd, "train_step", train_step)
    assert projkd.main(survivor_args(run_dir, "--resume")) == 0
    assert_same_run(straight_run, run_dir)


def test_a_signal_to_one_of_two_processes_stops_both_at_one_step_and_resumes(ddp_run, synthetic_teacher, tmp_path):
    straight, _ = ddp_run
    run_dir = tmp_path / "run"
    script = signalled_script(tmp_path, "SIGUSR1", at=3, rank=1)  # process 1 alone gets the signal
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
               *ddp_args(synthetic_teacher, run_dir)]
    stopped = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             timeout=300)
    # process 0 says it: it stopped at process 1's step
    assert "projkd: SIGUSR1: stopped after step 3 of epoch 1" in stopped.stderr, stopped.stdout + stopped.stderr
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"], len(last["epoch_rows"])) == (0, 3, 2)
    assert sorted(os.listdir(run_dir)) == ["last.pt"]
    resumed = torchrun(*ddp_args(synthetic_teacher, run_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {run_dir} at step 4 of epoch 1" in resumed.stdout
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm statistics too: each process kept its own


def test_a_moved_run_resumes_and_knows_its_teacher_by_content(tmp_path, synthetic_teacher, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(synthetic_teacher / "model.pt", "teacher.pt")
    args = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--method", "kd")
    assert projkd.main(args + ["--teacher-ckpt", "teacher.pt", "--run-dir", "runs/a"]) == 0
    os.makedirs("moved")
    shutil.move("runs/a", "moved/b")
    shutil.copy("teacher.pt", "copy.pt")
    capsys.readouterr()
    # another spelling of another folder, and the same teacher at another path
    assert projkd.main(args + ["--teacher-ckpt", str(tmp_path / "copy.pt"), "--run-dir", "./moved/b", "--resume",
                               "--epochs", "2"]) == 0
    assert "resuming ./moved/b after epoch 1" in capsys.readouterr().out
    state = torch.load("teacher.pt", weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, "other.pt")
    assert projkd.main(args + ["--teacher-ckpt", "other.pt", "--run-dir", "moved/b", "--resume", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "another teacher file" in err and "--teacher-ckpt" in err and err.count("\n") == 1
    for teacher in ("teacher.pt", "other.pt"):  # both named
        assert f"sha256 {models.file_sha256(teacher)[:12]}" in err


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a disk that fills up (mounting one needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (mount needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(small_disk, capsys, monkeypatch):
    run_dir = small_disk / "run"
    assert projkd.main(survivor_args(run_dir)) == 2  # resnet8's last.pt takes 600 KB
    err = capsys.readouterr().err
    assert err == f"projkd: error: cannot write {run_dir}/last.pt (No space left on device); free space or choose " \
                  "another folder\n"
    assert os.listdir(small_disk) == []  # nothing was written: not even the run folder stays
    # the teacher cache, full while being built (past the check of free space)
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: shutil_usage(total=10 ** 9, used=0,
                                                                                          free=10 ** 9))
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 100)).eval()
    images, mean = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.full((1, 3, 1, 1), 0.5)
    path = small_disk / "teacher.tcache"  # 162 views x 8 images x 104 values x 2 bytes: 270 KB
    with pytest.raises(UserError, match=re.escape(f"cannot write {path} (No space left on device)")):
        teacher_cache.build_teacher_cache(str(path), teacher, images, mean, mean, contextlib.nullcontext(),
                                          torch.contiguous_format, {"key": "k"}, 8)
    assert os.listdir(small_disk) == []


@pytest.mark.parametrize("chained", [True, False])
def test_torch_saves_failure_is_one_line_with_its_cause(tmp_path, monkeypatch, chained):
    """torch.save raises a RuntimeError from its writer ('unexpected pos'), after the OSError if there was one."""
    torch_error = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 17"

    def failing(obj, f):
        f.write(b"half a checkpoint")
        try:
            if chained:
                raise OSError(28, "No space left on device")
        finally:
            raise RuntimeError(torch_error)
    monkeypatch.setattr(torch, "save", failing)
    path = tmp_path / "last.pt"
    cause = "No space left on device" if chained else torch_error
    with pytest.raises(UserError, match=re.escape(f"cannot write {path} ({cause}); free space")):
        projkd.save({"epoch": 1}, str(path))
    assert os.listdir(tmp_path) == []


STAND_IN_INTERPRETER = """#!/bin/sh
# Stands in for python in the Makefile's install step: says its path as sys.executable would, logs the rest.
if [ "$1" = "-c" ]; then echo "$0"; exit 0; fi
echo "$0 $*" >> {log}
"""


def test_make_installs_into_each_interpreter_once_and_not_past_a_touched_marker(tmp_path):
    for name in ("Makefile", "params.mk", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    log, pythons = tmp_path / "calls.log", []
    for name in ("system", "venv", "own-torch"):
        python = tmp_path / name / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(STAND_IN_INTERPRETER.format(log=log))
        python.chmod(0o755)
        pythons.append(python)
    system, venv, own_torch = pythons

    def make_test(python):
        log.write_text("")
        assert make("test", f"PY={python}", cwd=tmp_path).returncode == 0
        return calls(log)
    install, tests = "-m pip install -r requirements.txt -r requirements-dev.txt", "-m pytest -q test_projkd.py"
    assert make_test(system) == [f"{system} {install}", f"{system} {tests}"]
    assert make_test(system) == [f"{system} {tests}"]
    assert make_test(venv) == [f"{venv} {install}", f"{venv} {tests}"]  # a new interpreter gets its own install
    os.utime(tmp_path / "requirements-dev.txt", (time.time() + 5, time.time() + 5))
    assert make_test(venv) == [f"{venv} {install}", f"{venv} {tests}"]  # and new requirements
    (tmp_path / ".deps-installed").touch()  # use it as it is
    assert make_test(own_torch) == [f"{own_torch} {tests}"]


def test_the_imagenet_feed_resumes_an_epoch_at_its_step_in_the_same_order():
    images = torch.utils.data.TensorDataset(torch.arange(40), torch.arange(40))
    feed = projkd.LoaderFeed(images, 4, 0, torch.device("cpu"), seed=1)
    feed.load(3)
    whole = [feed.next_batch()[0] for _ in range(feed.steps_per_epoch)]
    feed.load(3, step=6)
    rest = [feed.next_batch()[0] for _ in range(feed.steps_per_epoch - 6)]
    assert feed.steps_per_epoch == 10 and all(torch.equal(a, b) for a, b in zip(whole[6:], rest, strict=True))
    feed.load(4)
    assert not torch.equal(feed.next_batch()[0], whole[0])  # and each epoch has its own order


def test_a_resumed_epoch_refills_the_graphs_tensors_in_place(tmp_path):
    """A CUDA graph replays fixed addresses: resuming within an epoch sets the step counter and the epoch's sums
    in place, like the buffers (test_epoch_buffers_are_refilled_in_place)."""
    run = small_run(tmp_path, "--synthetic-size", "96")
    tensors = [run.feed.images, run.feed.labels, run.feed.step, run.lr, run.loss_sum, run.correct]
    before = [t.data_ptr() for t in tensors]
    os.makedirs(run.cfg.run_dir)
    run.feed.load(0)
    run.step()
    run.step()
    sums = [run.loss_sum.clone(), run.correct.clone()]
    projkd.save_checkpoint(run, 0, step=2)
    run.loss_sum.zero_()
    run.correct.zero_()
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    projkd.restore(run, checkpoint)
    projkd.restore_epoch_tensors(run, checkpoint["epoch_rows"])
    assert torch.equal(run.loss_sum, sums[0]) and torch.equal(run.correct, sums[1]) and run.start_step == 2
    projkd.train_epoch(run, 0)  # its third and last step
    assert run.feed.step.item() == 3 and [t.data_ptr() for t in tensors] == before
    run.feed.close()
