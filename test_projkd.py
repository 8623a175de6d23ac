"""Tests for projkd.py, the reference, in the order of its sections: the method, the baselines,
feature taps, config and CLI, data, the training loop, resume, distributed training, evaluation and
the entry points.
CPU only, seconds each: make test (or python -m pytest -q)."""
import contextlib
import csv
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
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
import projkd
import teacher_cache
from conftest import (
    HERE,
    SMALL_STUDENT,
    SMALL_TEACHER,
    imagenet_args,
    shutil_usage,
    small_run,
    synthetic_args,
    torchrun,
    write_cifar_pickles,
    write_image_folder,
)
from models import MODELS
from projkd import (
    CRDLite,
    ProjectorEnsemble,
    UserError,
    crop_flip,
    features_and_logits,
    kd_loss,
    load_cifar100,
    mda_loss,
    sp_loss,
)

# --- method: ProjectorEnsemble and mda_loss -------------------------------------------------------


def test_mda_loss_hand_computed():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    # cos = 1 and 1/sqrt(2): loss = 1 - (1 + 0.70710678) / 2
    assert mda_loss(f, t).item() == pytest.approx(1 - (1 + 2 ** -0.5) / 2, abs=1e-6)
    # directions only
    assert mda_loss(5 * f, 0.1 * t).item() == pytest.approx(mda_loss(f, t).item(), abs=1e-6)
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
    by_hand = torch.stack([ens.projectors[k](s) for k in range(3)]).mean(0)
    assert torch.allclose(out, by_hand, atol=1e-6)
    first = ens.projectors[0]
    assert len(first) == 2 * depth and isinstance(first[1], projkd.PROJECTOR_ACTIVATIONS[act])
    # independently initialised
    assert not torch.equal(first[0].weight, ens.projectors[1][0].weight)


def test_projector_ensemble_initialises_like_q_linear_stacks_built_in_a_row():
    torch.manual_seed(7)
    ens = ProjectorEnsemble(6, 4, q=2, depth=2)
    torch.manual_seed(7)
    stacks = [nn.Sequential(nn.Linear(6, 4), nn.ReLU(),
                            nn.Linear(4, 4), nn.ReLU()) for _ in range(2)]
    for k, stack in enumerate(stacks):
        for ours, theirs in zip(ens.projectors[k].state_dict().values(),
                                stack.state_dict().values()):
            assert torch.equal(ours, theirs)
    assert [tuple(p.shape) for p in ens.parameters()] == [(4, 6), (4,), (4, 4), (4,)] * 2


def stacked_forward(ensemble, s):
    """The forward of commit 066209a's ProjectorEnsemble, which held the q projectors' weights
    stacked: layer 1 of all of them as one matmul, each further layer one batched matmul."""
    linears = [[m for m in p if isinstance(m, nn.Linear)] for p in ensemble.projectors]
    q = len(linears)
    act = ensemble.projectors[0][1]
    first_weight = torch.stack([layers[0].weight for layers in linears])
    first_bias = torch.stack([layers[0].bias for layers in linears])
    h = F.linear(s, first_weight.flatten(0, 1), first_bias.flatten()).view(len(s), q, -1)
    h = act(h.transpose(0, 1))
    for depth in range(1, len(linears[0])):
        weight = torch.stack([layers[depth].weight for layers in linears])
        bias = torch.stack([layers[depth].bias for layers in linears])
        h = act(torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2)))
    return h.mean(0)


@pytest.mark.parametrize("depth", [1, 3])
def test_projector_ensemble_outputs_are_those_of_the_stacked_version(depth):
    """The same bits as the stacked version on this CPU (the bits themselves differ between CPUs,
    whose matmul kernels round differently: compared here, not against numbers from another)."""
    torch.manual_seed(0)
    ens = ProjectorEnsemble(6, 4, q=3, depth=depth)
    s = torch.randn(3, 6)
    assert torch.equal(ens(s), stacked_forward(ens, s))


def test_relu_projector_outputs_are_nonnegative_and_bad_arguments_fail():
    assert (ProjectorEnsemble(8, 5)(torch.randn(16, 8)) >= 0).all()
    with pytest.raises(ValueError):
        ProjectorEnsemble(8, 5, q=0)
    with pytest.raises(ValueError):
        ProjectorEnsemble(8, 5, act="tanh")


def test_gradients_reach_student_and_projectors_but_not_the_teacher():
    torch.manual_seed(0)
    cfg, _ = projkd.resolve_config(projkd.Config(teacher=SMALL_TEACHER,
                                                 student=SMALL_STUDENT, device="cpu"))
    student = MODELS[SMALL_STUDENT](num_classes=10)
    teacher = MODELS[SMALL_TEACHER](num_classes=10).eval().requires_grad_(False)
    projectors = projkd.build_loss_module(cfg, 64, 64)
    student_taps, teacher_taps = projkd.Taps(student), projkd.Taps(teacher)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    logits = student(x)
    with torch.no_grad():
        teacher_logits = teacher(x)
    loss, ce, mda = projkd.method_loss(cfg, projectors,
                                       projkd.Outputs(student_taps.feature, logits),
                                         projkd.Outputs(teacher_taps.feature, teacher_logits), y)
    # the terms the logs report: CE and MDA before weighting, loss = CE + 25 * MDA
    assert ce == F.cross_entropy(logits, y) and mda == mda_loss(projectors(student_taps.feature),
                                                               teacher_taps.feature)
    assert loss == ce + 25 * mda
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projectors.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher_taps.feature.requires_grad


# --- baselines: KD, SP, CRD-lite ------------------------------------------------------------------


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
    # Gram rows normalise to (1, 1)/sqrt(2)
    teacher = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    r = 2 ** -0.5
    expected = 2 * ((1 - r) ** 2 + r ** 2) / 4
    assert sp_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert sp_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # maps of different widths and spatial sizes compare fine: only the b x b similarities matter
    assert sp_loss(torch.randn(4, 8, 2, 2), torch.randn(4, 3, 4, 4)).shape == ()


def crd_reference_loss(anchor, positive, negatives, log_z, T, n_data=50000):
    """CRD's eq. 18 written as CRD writes it: P = exp(v.u/T) / Z with Z = exp(log_z) * n_data, noise
    1/n_data."""
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
        first_log_z = torch.exp(logits).mean().log().item()
        assert crd.log_z[side].item() == pytest.approx(first_log_z, rel=1e-5)
    expected = (crd_reference_loss(v_t, v_s, queue_s, crd.log_z[0].item(), crd.T)
                + crd_reference_loss(v_s, v_t, queue_t, crd.log_z[1].item(), crd.T))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert fs.grad.abs().sum() > 0 and crd.embed_student.weight.grad.abs().sum() > 0
    # the batch went into the queue slots 0..2, the pointer moved on and wraps around
    assert torch.allclose(crd.queue_student[:3], v_s)
    assert torch.equal(crd.queue_student[3:], queue_s[3:])
    assert crd.queue_next.item() == 3
    z_before = crd.log_z.clone()
    crd(torch.randn(3, 6), torch.randn(3, 10))
    # Z is fixed after the first batch
    assert crd.queue_next.item() == 1 and torch.equal(crd.log_z, z_before)


def test_crd_lite_updates_its_queues_in_place():
    crd = CRDLite(6, 10, dim=4, negatives=5, T=0.5)
    pointers = [b.data_ptr() for b in crd.buffers()]
    crd(torch.randn(3, 6), torch.randn(3, 10)).backward()
    assert [b.data_ptr() for b in crd.buffers()] == pointers


def test_crd_lite_under_torchrun_averages_z_only_while_it_is_unset(monkeypatch):
    """Only the first batch's Z is ever used: its all-reduce (one per side) happens on the first
    step, not every step."""
    reduced = []
    monkeypatch.setattr(projkd, "_world_size", lambda: 2)
    monkeypatch.setattr(projkd.dist, "all_reduce", lambda t: reduced.append(t.clone()))
    monkeypatch.setattr(projkd.dist, "all_gather", lambda parts, x: [p.copy_(x) for p in parts])
    crd = CRDLite(6, 10, dim=4, negatives=8, T=0.5)
    for _ in range(3):
        crd(torch.randn(3, 6), torch.randn(3, 10)).backward()
    # each step enqueues both processes' rows
    assert len(reduced) == 2 and int(crd.queue_next) == 3 * 3 * 2 % 8


def test_between_class_cosine_hand_computed():
    # the last class has no samples
    sums = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    # pairs: (0,1) 0, (0,2) 1/sqrt2, (1,2) 1/sqrt2
    assert projkd.between_class_cosine(sums) == pytest.approx(2 * 2 ** -0.5 / 3, rel=1e-9)


# --- feature taps and the loss wiring -------------------------------------------------------------


def test_features_and_logits_on_a_torchvision_model():
    import torchvision

    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    feature, logits = features_and_logits(model, x)
    assert feature.shape == (2, 512) and logits.shape == (2, 7)
    assert torch.allclose(model.fc(feature), logits, atol=1e-6)
    assert not model.fc._forward_pre_hooks  # the hook is gone afterwards


def test_projkd_copied_alone_imports_and_runs(tmp_path):
    """The pieces the docstring offers for copying work from projkd.py alone: no models.py beside
    it, and no fcntl, which Windows lacks."""
    shutil.copy(os.path.join(HERE, "projkd.py"), tmp_path)
    code = textwrap.dedent("""
        import sys
        import torch  # torch imports subprocess, which imports fcntl on POSIX: it is in sys.modules
        sys.modules["fcntl"] = None  # from here on `import fcntl` raises ImportError, as on Windows
        from projkd import CRDLite, ProjectorEnsemble, features_and_logits
        from projkd import kd_loss, mda_loss, sp_loss
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
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


def test_projkd_copied_alone_asks_for_models_py_in_one_line(tmp_path):
    shutil.copy(os.path.join(HERE, "projkd.py"), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "projkd.py", "--student", "vgg8", "--method", "ce"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == ("projkd: error: the architectures are in models.py, which is needed "
                             "beside "
                             "projkd.py: copy it there too\n")
    assert sorted(os.listdir(tmp_path)) == ["projkd.py"]
    help_alone = subprocess.run([sys.executable, "projkd.py", "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
    assert help_alone.returncode == 0 and "--student" in help_alone.stdout
    assert "architectures" not in help_alone.stdout


# --- config and CLI -------------------------------------------------------------------------------


def test_parse_args_types_flags_and_spellings():
    cfg = projkd.parse_args(["--student", "vgg8", "--epochs=3", "--kd-T", "2.5", "--proj_depth",
                             "2", "--deterministic", "--no-resume"])
    assert (cfg.student, cfg.epochs, cfg.kd_T, cfg.proj_depth, cfg.deterministic, cfg.resume) == \
        ("vgg8", 3, 2.5, 2, True, False)


@pytest.mark.parametrize("argv,message", [
    (["--studnet", "vgg8"], "unknown option --studnet (did you mean --student?)"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--epochs"], "argument --epochs: expected one argument"),
    (["vgg8"], "unexpected argument 'vgg8'"),
    (["--deterministic=maybe"], "argument --deterministic/--no-deterministic: ignored explicit "
                                "argument"),
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
    (["--student", "vgg8", "--method", "ce", "--lr-decay-epochs", "150;180"], "--lr-decay-epochs "
                                                                              "must be"),
    (["--student", "vgg8", "--teacher", "vgg13", "--proj-act", "tanh"], "unknown --proj-act "
                                                                        "'tanh'"),
    (["--student", "vgg8", "--method", "ce", "--graph", "on"], "--graph on is not possible here: "
                                                               "it needs CUDA"),
    (["--student", "vgg8", "--method", "ce", "--graph", "maybe"], "unknown --graph 'maybe'"),
    (["--student", "vgg8", "--teacher", "vgg13", "--method", "sp", "--teacher-cache", "on"],
     "--teacher-cache on serves pefd, kd and crd"),
    (["--student", "resnet18", "--method", "ce"], "resnet18 is an ImageNet architecture and "
                                                  "--dataset synthetic"),
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
    imagenet, notes = projkd.resolve_config(projkd.Config(student="resnet18", method="ce",
                                                          device="cpu",
                                                          dataset="imagenet", batch_size=512))
    mobile, _ = projkd.resolve_config(projkd.Config(student="MobileNetV2",
                                                    method="ce", device="cpu"))
    pick = ("epochs", "batch_size", "lr", "lr_decay_epochs", "weight_decay", "momentum")
    assert [getattr(cifar, k) for k in pick] == [240, 64, 0.05, "150,180,210", 5e-4, 0.9]
    assert [getattr(imagenet, k) for k in pick] == [100, 512, 0.1, "30,60,90", 1e-4, 0.9]
    assert mobile.lr == 0.01
    assert any("used unchanged at 512 (the linear scaling rule would give 0.2" in n for n in notes)
    explicit, _ = projkd.resolve_config(projkd.Config(student="resnet18", method="ce", device="cpu",
                                                      dataset="imagenet", epochs=3, lr=0.2,
                                                      weight_decay=0.0))
    assert (explicit.epochs, explicit.lr, explicit.weight_decay) == (3, 0.2, 0.0)


def test_help_lists_every_option_with_its_comment(capsys):
    assert projkd.main(["--help"]) == 0
    out = capsys.readouterr().out
    for f in projkd.dataclasses.fields(projkd.Config):
        assert "--" + f.name.replace("_", "-") in out
    assert "weight of the MDA loss" in out


def test_help_piped_into_head_ends_quietly():
    result = subprocess.run(f"{sys.executable} {os.path.join(HERE, 'projkd.py')} --help | head "
                            "-1", shell=True,
                            capture_output=True, text=True)
    assert result.stdout.startswith("projkd: Improved Feature Distillation") and result.stderr == ""


def test_the_cli_process_exits_nonzero_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "projkd.py"), "--student", "nope",
                             "--method", "ce"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("projkd: error: unknown architecture 'nope' for --student; "
                                     "choose one of "
                                     + ", ".join(MODELS))
    assert "Traceback" not in result.stderr and not os.listdir(tmp_path)


def test_importing_projkd_has_no_side_effects(tmp_path):
    # nor tables.py (projkd.py eval imports it): matplotlib is imported only for figures, models.py
    # where used
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import projkd, tables; "
            "print(sorted(os.listdir('.')), 'matplotlib' in sys.modules, 'models' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, HERE], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip() == "[] False False"


# --- data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_load_cifar100_reads_the_official_layout(tmp_path, bytes_keys):
    written = write_cifar_pickles(tmp_path, bytes_keys=bytes_keys)
    train_x, train_y, test_x, test_y = load_cifar100(str(tmp_path))
    assert train_x.shape == (200, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (100, 3, 32, 32) and test_y.dtype == torch.int64
    # pixel (c, h, w) of image i is data[i, c * 1024 + h * 32 + w]: channel-major rows, as in the
    # archive
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
    # every offset occurs
    assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8
    assert 0.45 < flip.float().mean() < 0.55
    images = torch.randint(1, 256, (3, 3, 32, 32), dtype=torch.uint8)  # no zero pixels of their own
    same = torch.tensor([4, 4, 4])
    no, yes = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    assert torch.equal(crop_flip(images, same, same, no), images)  # the centre crop is the image
    assert torch.equal(crop_flip(images, same, same, yes), images.flip(3))
    corner = crop_flip(images, torch.zeros(3, dtype=torch.long),
                       torch.zeros(3, dtype=torch.long), no)
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


# --- the training loop ----------------------------------------------------------------------------


def test_teacher_run_leaves_its_artifacts(synthetic_teacher):
    files = sorted(os.listdir(synthetic_teacher))
    assert files == ["last.pt", "log.csv", "metrics.json", "model.pt"]  # and no temporary leftovers
    metrics = json.loads((synthetic_teacher / "metrics.json").read_text())
    for key in ("config", "seed", "best_top1", "last_top1", "best_top5", "last_top5", "history",
                "wall_seconds", "images_per_s", "device", "torch", "code", "between_class_cosine"):
        assert key in metrics, key
    assert metrics["config"]["lr"] == 0.05 and metrics["config"]["student"] == SMALL_TEACHER
    assert len(metrics["history"]) == 3
    assert metrics["last_top1"] == metrics["history"][-1]["test_top1"]
    assert metrics["last_top1"] > 30  # learnable: 10 classes, chance is 10%
    rows = list(csv.DictReader(open(synthetic_teacher / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    state = torch.load(synthetic_teacher / "model.pt", weights_only=True)
    # plain state_dict, nothing else
    MODELS[SMALL_TEACHER](num_classes=10).load_state_dict(state, strict=True)


@pytest.mark.parametrize("method", ["pefd", "kd", "sp", "crd"])
def test_distillation_runs_end_to_end(tmp_path, synthetic_teacher, method, capsys):
    run_dir = tmp_path / method
    args = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT,
                          "--method", method, "--teacher-ckpt", str(synthetic_teacher / "model.pt"),
                          "--run-dir", str(run_dir),
                          # the teacher's data set
                          "--crd-negatives", "64", "--synthetic-size", "512")
    assert projkd.main(args) == 0
    out = capsys.readouterr().out
    teacher_top1 = json.loads((synthetic_teacher / "metrics.json").read_text())["last_top1"]
    # the teacher's accuracy is announced before distilling
    assert f"test top-1 {teacher_top1:.2f}%" in out
    state = torch.load(run_dir / "model.pt", weights_only=True)
    # no projectors or embeddings
    MODELS[SMALL_STUDENT](num_classes=10).load_state_dict(state, strict=True)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and (len(last["loss_module"]) > 0) == (method in ("pefd", "crd"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["teacher_top1"] == pytest.approx(teacher_top1)
    # each term of the loss, averaged over the epoch on the device, in the history, log.csv and the
    # epoch line
    row, term = metrics["history"][0], projkd.DISTILL_LOSS_NAMES[method]
    weights = {"pefd": (1, 25), "kd": (0.1, 0.9), "sp": (1, 3000), "crd": (1, 0.8)}[method]
    # log.csv rounds each number to 6 decimals: weighted, that rounding is the tolerance (sp's
    # weight is 3000)
    rounding = 0.5e-6 * (1 + weights[0] + weights[1])
    weighted = weights[0] * row["train_ce"] + weights[1] * row[f"train_{term}"]
    assert row["train_loss"] == pytest.approx(weighted, rel=1e-5, abs=rounding)
    logged = row[f"train_{term}"]
    assert next(csv.DictReader(open(run_dir / "log.csv")))[f"train_{term}"] == str(logged)
    assert f"loss {row['train_loss']:.4f} (ce {row['train_ce']:.4f}, {term} {logged:.4f})" in out


def test_lr_schedule_steps_after_the_milestones():
    cfg = projkd.Config(lr=0.05, lr_decay_epochs="150,180,210")
    lrs = [projkd.lr_at(cfg, e) for e in (0, 149, 150, 179, 180, 210, 239)]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005])


def test_resident_steps_read_the_planned_epoch_batch_by_batch(tmp_path):
    run = small_run(tmp_path, "--synthetic-size", "96")
    plan = run.feed.plan(0)
    run.feed.prepare_epoch(0)
    expected = crop_flip(run.data.train_x[plan.order], plan.dy, plan.dx, plan.flip)
    seen = [run.feed.next_batch() for _ in range(run.feed.steps_per_epoch)]
    assert run.feed.steps_per_epoch == 3 and run.feed.next_step.item() == 3
    for i, (images, labels, cached_teacher) in enumerate(seen):
        assert images.shape == (32, 3, 32, 32)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images, expected[32 * i:32 * (i + 1)])
        assert torch.equal(labels, run.data.train_y[plan.order[32 * i:32 * (i + 1)]])
        assert cached_teacher is None
    # under torchrun, process 1 of 2 takes the second half of every global batch
    run.feed.next_step.zero_()
    run.feed.offsets = 16 + torch.arange(16)
    seen = [run.feed.next_batch() for _ in range(2)]
    assert torch.equal(seen[0][0], expected[16:32]) and torch.equal(seen[1][0], expected[48:64])
    run.feed.close()


def test_the_step_reads_the_feeds_next_batch(tmp_path):
    """run.step is train_step on this run (build_step): each call takes the feed's next batch."""
    run = small_run(tmp_path, "--synthetic-size", "96")
    run.feed.prepare_epoch(0)
    run.step()
    run.step()
    assert run.feed.next_step.item() == 2 and run.sums.correct.item() > 0
    run.feed.close()


def test_epoch_buffers_are_refilled_in_place(tmp_path):
    """A CUDA graph replays fixed addresses: every tensor the step reads or writes must keep its
    storage."""
    run = small_run(tmp_path, "--synthetic-size", "96")
    tensors = [run.feed.images, run.feed.labels, run.feed.next_step, run.lr,
               *(getattr(run.sums, name) for name in projkd.EpochSums.NAMES)]
    before = [t.data_ptr() for t in tensors]
    for epoch in range(2):
        projkd.train_epoch(run, epoch)
    assert [t.data_ptr() for t in tensors] == before
    assert all(g["lr"] is run.lr for g in run.optimizer.param_groups)
    run.feed.close()


def test_progress_lines_within_an_epoch(tmp_path, capsys):
    assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce",
                                      "--progress-seconds", "1e-9",
                                      "--synthetic-size", "96", "--run-dir",
                                      str(tmp_path / "run"))) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("  epoch 1 step")]
    assert [line.split()[3] for line in lines] == ["1/3", "2/3"]
    assert all("img/s" in line and "epoch eta" in line and "run eta" in line for line in lines)


def test_the_config_is_a_block_of_what_is_not_default_and_lines_under_make_name_their_run(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAKELEVEL", "1")  # as under make, where several runs share the terminal
    assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--run-dir",
                                      str(tmp_path / "resnet8" / "ce-seed1"))) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(line.startswith("[resnet8/ce-seed1] ") for line in out)
    first_epoch = out.index(next(x for x in out if "epoch 1/1" in x))
    block = [line.split("] ", 1)[1].split() for line in out[1:first_epoch]]
    assert ["--student", "resnet8", "given"] in block
    assert ["--lr", "0.05", "synthetic", "protocol"] in block
    assert ["--graph", "off", "resolved"] in block
    assert not any(b[0] in ("--alpha", "--q", "--seed") for b in block)
    assert not any("amp off on CPU" in line for line in out)  # --amp was not asked for
    # ImageNet's loaders only: nothing to say on CIFAR-style data
    assert not any(b[0] == "--workers" for b in block)


def test_teacher_checkpoint_formats(tmp_path, synthetic_teacher):
    """RepDistiller's {'model': state_dict} with DataParallel's 'module.' prefixes loads like our
    model.pt."""
    state = torch.load(synthetic_teacher / "model.pt", weights_only=True)
    repdistiller_style = tmp_path / "ckpt_epoch_240.pth"
    prefixed = {"module." + k: v for k, v in state.items()}
    torch.save({"epoch": 240, "model": prefixed, "accuracy": 1.0},
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
def test_bad_teacher_checkpoints_fail_cleanly(tmp_path, synthetic_teacher, capsys,
                                              problem, message):
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
    # a whole module: needs unsafe unpickling
    torch.save({"model": MODELS[SMALL_TEACHER](num_classes=10)}, path)
    assert projkd.main(synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT,
                                      "--teacher-ckpt", str(path), "--run-dir",
                                      str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert (f"teacher checkpoint {path} is not a readable PyTorch checkpoint (it holds Python "
            "objects") in err
    assert err.count("\n") == 1 and "weights_only" not in err


def test_a_folder_given_as_teacher_checkpoint_is_named_as_a_folder(tmp_path, capsys):
    args = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--teacher-ckpt",
                          str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert projkd.main(args) == 2
    err = capsys.readouterr().err
    assert f"--teacher-ckpt {tmp_path} is a folder: pass the checkpoint file itself" in err
    assert err.count("\n") == 1 and "no teacher checkpoint" not in err


def test_a_bare_cuda_device_gets_the_index_that_set_device_needs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name in ("cuda", "auto"):
        assert projkd.resolve_device(name, 1) == torch.device("cuda", 0)
    assert projkd.resolve_device("cuda:1", 1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert projkd.resolve_device("cuda", 4) == torch.device("cuda", 3)


def test_a_gpu_beyond_the_visible_ones_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--run-dir",
                          str(tmp_path / "run"))
    assert projkd.main(args + ["--device", "cuda:2"]) == 2
    err = capsys.readouterr().err
    assert err == ("projkd: error: --device cuda:2, but 2 CUDA device(s) are visible (cuda:0 to "
                   "cuda:1); "
                   "choose one of them, or check CUDA_VISIBLE_DEVICES\n")
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun with more processes than GPUs
    with pytest.raises(projkd.UserError, match="process 2 on this machine, but 2 CUDA device"):
        projkd.resolve_device("cuda", 4)
    assert not (tmp_path / "run").exists()


def test_a_mistyped_subcommand_gets_a_did_you_mean(capsys):
    assert projkd.main(["evaluate", "--arch", "vgg8"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'evaluate'; did you mean eval?" in err and err.count("\n") == 1


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
    # /proc takes no new folders, whoever asks (as a read-only file system); --data-dir has no
    # CIFAR-100 either: the run directory's error must come first
    assert projkd.main(["--student", "vgg8", "--method", "ce", "--device", "cpu", "--data-dir",
                        "/nonexistent", "--run-dir", "/proc/projkd-test/run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("projkd: error: cannot write in --run-dir "
                          "/proc/projkd-test/run") and err.count("\n") == 1


def test_a_write_that_fails_mid_run_is_one_line_and_leaves_no_temporary_file(tmp_path,
                                                                             capsys, monkeypatch):
    real_open = open

    def disk_full(path, mode="r", *args, **kwargs):  # files open, and writing to a .csv fails
        if "w" in mode and ".csv" in str(path):
            real_open(path, mode).close()  # as a write cut short
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", disk_full)
    run_dir = tmp_path / "run"
    assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce",
                                      "--run-dir", str(run_dir))) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run_dir / 'log.csv'} (No space left on device)" in err
    assert err.count("\n") == 1
    assert not run_dir.exists() or not [f for f in os.listdir(run_dir) if ".tmp" in f]


def test_two_processes_cannot_train_into_one_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with projkd.run_dir_lock(str(run_dir)):  # as another process training there would hold it
        assert projkd.main(synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--run-dir",
                                          str(run_dir), "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} is being trained by another process (pid {os.getpid()})" in err
    assert err.count("\n") == 1
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
    assert projkd.main(imagenet_args(root, "--teacher", "resnet18", "--teacher-ckpt",
                                     str(tmp_path / "teacher.pt"),
                                     "--student", "resnet18", "--run-dir", str(run_dir))) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # ImageNet's protocol
    assert metrics["config"]["lr"] == 0.1 and metrics["config"]["weight_decay"] == 1e-4
    assert metrics["config"]["lr_decay_epochs"] == "30,60,90" and metrics["config"]["workers"] == 1
    MODELS["resnet18"](num_classes=3).load_state_dict(torch.load(run_dir / "model.pt",
                                                                 weights_only=True))
    eval_args = ["--dataset", "imagenet", "--data-dir", str(root), "--image-size", "32", "--device",
                 "cpu", "--workers", "0"]
    teacher_eval, student_eval = tmp_path / "teacher.eval.json", tmp_path / "student.eval.json"
    assert projkd.main(["eval", "--arch", "resnet18", "--ckpt", str(tmp_path / "teacher.pt"),
                        *eval_args, "--out", str(teacher_eval)]) == 0
    assert json.loads(teacher_eval.read_text())["top1"] == pytest.approx(metrics["teacher_top1"])
    # the accuracies recorded are the trained model's: its model.pt, evaluated alone, gives them
    # again
    assert projkd.main(["eval", "--arch", "resnet18", "--ckpt", str(run_dir / "model.pt"),
                        *eval_args, "--out", str(student_eval)]) == 0
    student = json.loads(student_eval.read_text())
    last = metrics["history"][-1]
    assert metrics["last_top1"] == last["test_top1"] == pytest.approx(student["top1"], abs=1e-3)
    assert metrics["last_top5"] == last["test_top5"] == pytest.approx(student["top5"], abs=1e-3)
    # 3 classes: the top 5 hold every class, so top-5 is 100 whatever the weights. A top-5 that can
    # miss is checked on 10 classes in test_distributed_top1_equals_one_process_evaluating_model_pt.
    assert metrics["last_top5"] == 100.0 >= metrics["last_top1"]


class FakeCUDA:
    """Stands in for torch.cuda in CUDAGraphStep's control flow: a 'capture' calls the step with
    `capturing` set (as a real capture records the work without doing it), and replay() calls it
    again for real. The step advances the counter `steps`, as the resident step does on the device.
    failure="raises": the capture fails as capture_end does after the step raised; "runs-eagerly":
    the step's kernels went to another device or stream, so they ran during the 'capture' and
    nothing was recorded (replays do nothing), which is what CUDA does with an empty graph;
    "replay-does-nothing": the capture recorded work, but not the step's counter. Streams record the
    device they were made on, and the capture the stream it was given."""

    def __init__(self, monkeypatch, failure=None):
        self.capturing, self.log, self.steps, fake = False, [], torch.zeros(()), self
        self.current, self.stream_devices, self.capture_streams = 0, [], []

        class Graph:
            def replay(self):
                if failure not in ("runs-eagerly", "replay-does-nothing"):
                    fake.step()

        @contextlib.contextmanager
        def graph(g, stream=None, capture_error_mode="global"):
            fake.capture_streams.append(stream)
            fake.capturing = failure != "runs-eagerly"
            try:
                try:
                    yield
                    if failure == "raises":
                        raise RuntimeError("operation not permitted when stream is capturing")
                finally:
                    fake.capturing = False
            # as torch does: capture_end's complaint, the cause in its context
            except RuntimeError as e:
                raise RuntimeError("CUDA error: operation failed due to a previous error during "
                                   "capture") from e

        class Stream:
            def __init__(self, device=None):
                index = fake.current if device is None else torch.device(device).index
                fake.stream_devices.append(index)

            def wait_stream(self, other):
                pass

        for name, value in (("Stream", Stream), ("current_stream", Stream), ("CUDAGraph", Graph),
                            ("graph", graph), ("stream", lambda s: contextlib.nullcontext()),
                            ("set_device",
                             lambda d: setattr(fake, "current", torch.device(d).index or 0))):
            monkeypatch.setattr(torch.cuda, name, value)

    def step(self):
        self.log.append("captured" if self.capturing else "ran")
        if not self.capturing:
            self.steps += 1


@pytest.mark.parametrize("failure", [None, "raises", "runs-eagerly", "replay-does-nothing"])
def test_cuda_graph_step_warms_up_captures_once_and_replays(monkeypatch, capsys, failure):
    fake = FakeCUDA(monkeypatch, failure)
    stepper = projkd.CUDAGraphStep(fake.step, fake.steps, warmup_steps=3)
    for _ in range(6):
        stepper()
    # six steps done, none skipped or done twice, one capture, on the step's own stream. Run
    # eagerly, the 'capture' was the fourth step itself.
    if failure == "runs-eagerly":
        assert fake.log == ["ran"] * 6
    else:
        assert fake.log == ["ran"] * 3 + ["captured"] + ["ran"] * 3
    assert fake.steps.item() == 6
    assert fake.capture_streams == [stepper.stream]
    assert (stepper.graph is None) == (failure is not None)
    if failure:  # the run goes on eagerly and says why: the first error, not capture_end's
        reason = {"raises": "operation not permitted when stream is capturing",
                  "runs-eagerly": "the captured graph is empty: the step ran during the capture",
                  "replay-does-nothing": "the captured graph is empty: its replay did not run the "
                                         "step"}
        out = capsys.readouterr().out
        assert stepper.failure.startswith(reason[failure])
        assert "goes on eagerly" in out and out.count("warning") == 1


def test_the_graph_stream_is_made_on_the_step_counters_device(monkeypatch):
    """--device cuda:1, and a second run on cuda:0 in the same process: each graph captures on a
    stream of its own device, never on one made for another (torch's shared default capture stream
    would be)."""
    fake = FakeCUDA(monkeypatch)
    projkd.setup_torch(torch.device("cuda", 1))
    for index in (1, 0):  # what CUDAGraphStep reads of its counter when it is made: its device
        projkd.CUDAGraphStep(fake.step, types.SimpleNamespace(device=torch.device("cuda", index)))
    assert fake.stream_devices == [1, 0]


def test_teacher_for_speed_keeps_batchnorm_in_float32():
    teacher = projkd.teacher_for_speed(MODELS["resnet8"](num_classes=10), torch.bfloat16,
                                       torch.contiguous_format)
    for m in teacher.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.weight.dtype == torch.bfloat16
        elif isinstance(m, nn.BatchNorm2d):
            assert m.weight.dtype == m.running_var.dtype == torch.float32


# --- resume ---------------------------------------------------------------------------------------


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, synthetic_teacher, capsys):
    common = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT,
                            "--deterministic",
                            "--teacher-ckpt", str(synthetic_teacher / "model.pt"), "--method",
                            "crd", "--crd-negatives", "64", "--lr-decay-epochs", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert projkd.main(common + ["--epochs", "2", "--run-dir", str(straight)]) == 0
    # as if killed after epoch 1
    assert projkd.main(common + ["--epochs", "1", "--run-dir", str(resumed)]) == 0
    os.remove(resumed / "model.pt")
    os.remove(resumed / "metrics.json")
    capsys.readouterr()
    assert projkd.main(common + ["--epochs", "2", "--run-dir", str(resumed), "--resume"]) == 0
    # a larger --epochs
    assert "after epoch 1; note: extending it from 1 to 2 epochs" in capsys.readouterr().out
    for name in ("model.pt", "last.pt"):
        a = torch.load(straight / name, weights_only=True)
        b = torch.load(resumed / name, weights_only=True)
        if name == "last.pt":  # projectors/embeddings, the CRD queue and the optimizer state too
            assert all(torch.equal(a["loss_module"][k],
                                   b["loss_module"][k]) for k in a["loss_module"])
            a, b = a["student"], b["student"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((resumed / "metrics.json").read_text())
    keys = ("epoch", "lr", "train_loss", "train_acc", "test_top1", "test_top5")
    def kept(history):
        return [{k: h[k] for k in keys} for h in history]
    assert kept(ma["history"]) == kept(mb["history"])


def test_resume_restores_into_this_runs_scaler_and_optimizer_settings(tmp_path):
    """A last.pt from a bf16 (or CPU) run resumed with --amp fp16 on CUDA: its disabled scaler saved
    {}, which an enabled GradScaler refuses; its optimizer groups say fused=False and its momentum
    buffers are contiguous, which would put a CUDA run on SGD's slow per-parameter path. The
    stand-ins: a CPU GradScaler, and the settings and channels_last layout a CUDA run would have."""
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
    assert all(g["fused"] is True and g["foreach"] is None and g["lr"] is run.lr
               for g in run.optimizer.param_groups)
    for p in run.student.parameters():
        assert run.optimizer.state[p]["momentum_buffer"].stride() == p.stride()
    assert run.start_epoch == 1
    saved.feed.close()
    run.feed.close()


# --- runs that survive: checkpoints within an epoch, signals, resume by identity, full disks ------

def survivor_args(run_dir, *extra):
    """Two epochs of 4 steps, last.pt at every check point (every step but an epoch's last, and
    between epochs)."""
    return synthetic_args("--student", SMALL_STUDENT, "--method", "ce", "--epochs", "2",
                          "--checkpoint-seconds", "0", "--run-dir", str(run_dir), *extra)


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
    assert all(ma[k] == mb[k] for k in ("last_top1", "last_top5", "best_top1",
                                        "between_class_cosine"))


# Python that runs projkd.main and sends its own process a signal when train_step is called for the
# AT-th time (under torchrun, in process RANK only): a kill at a known step, without polling.
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
    # the float sums of this process's runs
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = subprocess.run([sys.executable, signalled_script(tmp_path, "SIGKILL", at=7),
                             *survivor_args(run_dir)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert (last["epoch"], last["steps_done"]) == (1, 2)  # killed in the third step of epoch 2
    assert projkd.main(survivor_args(run_dir, "--resume")) == 0
    assert f"resuming {run_dir} at step 3 of epoch 2" in capsys.readouterr().out
    assert_same_run(straight_run, run_dir)
    # the killed session is listed as far as its last check point, with nothing that ended it
    killed_session, resumed = json.loads((run_dir / "metrics.json").read_text())["segments"]
    assert killed_session["to"] == resumed["from"] == {"epochs": 1, "steps": 2}
    assert (killed_session["ended_by"], resumed["ended_by"]) == (None, "done")


@pytest.mark.parametrize("name,at,status,kept",
                         [("SIGTERM", 7, 143, (1, 3)), ("SIGUSR1", 2, 138, (0, 2)),
                                                 ("SIGINT", 3, 130, (0, 2))])
def test_a_signal_within_an_epoch_stops_the_run_to_resume(tmp_path, straight_run, capsys,
                                                          monkeypatch, name, at, status, kept):
    """SIGTERM and Slurm's SIGUSR1 let the step finish, write last.pt and stop; Ctrl-C (SIGINT)
    stops at once and keeps what the last check point wrote, in the first epoch too: the run folder
    stays."""
    run_dir = tmp_path / "run"
    signum = getattr(signal, name)
    handlers = signal.getsignal(signal.SIGTERM)
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
    assert (last["epoch"], last["steps_done"]) == kept
    # no .lock, nothing temporary
    assert sorted(os.listdir(run_dir)) == ["last.pt", "log.csv"][:1 + epoch]
    assert signal.getsignal(signal.SIGTERM) == handlers  # the handlers are training's alone
    monkeypatch.setattr(projkd, "train_step", train_step)
    assert projkd.main(survivor_args(run_dir, "--resume")) == 0
    assert_same_run(straight_run, run_dir)


def test_a_resumed_run_counts_the_time_of_every_session_and_lists_them(tmp_path, monkeypatch,
                                                                       capsys):
    """wall_seconds and the done line sum every epoch's seconds, the part before a stop included,
    and metrics.json lists the sessions: where each began and got to, its seconds, what ended it."""
    run_dir = tmp_path / "run"
    calls, train_step = [], projkd.train_step

    def slow_step(*args):  # 0.3 s a step: the first session's time is known from below
        calls.append(1)
        time.sleep(0.3)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args)
    monkeypatch.setattr(projkd, "train_step", slow_step)
    assert projkd.main(survivor_args(run_dir)) == 143
    monkeypatch.setattr(projkd, "train_step", train_step)
    assert projkd.main(survivor_args(run_dir, "--resume")) == 0
    assert " in 2 sessions, " in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    first, second = metrics["segments"]
    assert (first["from"], first["to"]) == ({"epochs": 0, "steps": 0}, {"epochs": 1, "steps": 3})
    assert (second["from"], second["to"]) == (first["to"], {"epochs": 2, "steps": 0})
    assert (first["ended_by"], second["ended_by"]) == ("SIGTERM", "done")
    assert first["seconds"] >= 7 * 0.3
    stopped_epoch = metrics["history"][1]["seconds"]
    assert stopped_epoch >= 3 * 0.3 and stopped_epoch > second["seconds"]  # its three slow steps
    assert metrics["wall_seconds"] == pytest.approx(first["seconds"] + second["seconds"], abs=0.5)


def test_a_signal_to_one_of_two_processes_stops_both_at_one_step_and_resumes(
        ddp_run, synthetic_teacher, tmp_path):
    straight, _ = ddp_run
    run_dir = tmp_path / "run"
    script = signalled_script(tmp_path, "SIGUSR1", at=3, rank=1)  # process 1 alone gets the signal
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               script, *ddp_args(synthetic_teacher, run_dir)]
    stopped = subprocess.run(command, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    # process 0 says it: it stopped at process 1's step
    said = stopped.stdout + stopped.stderr
    assert "projkd: SIGUSR1: stopped after step 3 of epoch 1" in stopped.stderr, said
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert (last["epoch"], last["steps_done"], len(last["epoch_state"]["correct"])) == (0, 3, 2)
    assert sorted(os.listdir(run_dir)) == ["last.pt"]
    resumed = torchrun(*ddp_args(synthetic_teacher, run_dir, "--resume"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {run_dir} at step 4 of epoch 1" in resumed.stdout
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(run_dir / "model.pt", weights_only=True)
    # BatchNorm statistics too: each process kept its own
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_moved_run_resumes_and_knows_its_teacher_by_content(tmp_path, synthetic_teacher,
                                                              capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(synthetic_teacher / "model.pt", "teacher.pt")
    args = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--method", "kd")
    assert projkd.main(args + ["--teacher-ckpt", "teacher.pt", "--run-dir", "runs/a"]) == 0
    os.makedirs("moved")
    shutil.move("runs/a", "moved/b")
    shutil.copy("teacher.pt", "copy.pt")
    capsys.readouterr()
    # another spelling of another folder, and the same teacher at another path
    assert projkd.main(args + ["--teacher-ckpt", str(tmp_path / "copy.pt"), "--run-dir",
                               "./moved/b", "--resume", "--epochs", "2"]) == 0
    assert "resuming ./moved/b after epoch 1" in capsys.readouterr().out
    state = torch.load("teacher.pt", weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, "other.pt")
    assert projkd.main(args + ["--teacher-ckpt", "other.pt", "--run-dir", "moved/b", "--resume",
                               "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "another teacher file" in err and "--teacher-ckpt" in err and err.count("\n") == 1
    for teacher in ("teacher.pt", "other.pt"):  # both named
        assert f"sha256 {projkd.file_sha256(teacher)[:12]}" in err


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs: a disk that fills up (mounting one needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (mount needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(small_disk, capsys, monkeypatch):
    run_dir = small_disk / "run"
    assert projkd.main(survivor_args(run_dir)) == 2  # resnet8's last.pt takes 600 KB
    err = capsys.readouterr().err
    assert err == (f"projkd: error: cannot write {run_dir}/last.pt (No space left on device); "
                   "free space or choose another folder\n")
    assert os.listdir(small_disk) == []  # nothing was written: not even the run folder stays
    # the teacher cache, full while being built (past the check of free space)
    plenty = shutil_usage(total=10 ** 9, used=0, free=10 ** 9)
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: plenty)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 100)).eval()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    mean = torch.full((1, 3, 1, 1), 0.5)
    path = small_disk / "teacher.tcache"  # 162 views x 8 images x 104 values x 2 bytes: 270 KB
    with pytest.raises(UserError, match=re.escape(f"cannot write {path} (No space left on "
                                                  "device)")):
        teacher_cache.build_teacher_cache(str(path), teacher, images, mean, mean,
                                          contextlib.nullcontext(),
                                          torch.contiguous_format, {"key": "k"}, 8)
    assert os.listdir(small_disk) == []


@pytest.mark.parametrize("chained", [True, False])
def test_torch_saves_failure_is_one_line_with_its_cause(tmp_path, monkeypatch, chained):
    """torch.save raises a RuntimeError from its writer ('unexpected pos'), after the OSError if
    there was one."""
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


def test_the_imagenet_feed_resumes_an_epoch_at_its_step_in_the_same_order():
    images = torch.utils.data.TensorDataset(torch.arange(40), torch.arange(40))
    feed = projkd.LoaderFeed(images, 4, 0, torch.device("cpu"), seed=1)
    feed.prepare_epoch(3)
    whole = [feed.next_batch()[0] for _ in range(feed.steps_per_epoch)]
    feed.prepare_epoch(3, steps_done=6)
    rest = [feed.next_batch()[0] for _ in range(feed.steps_per_epoch - 6)]
    assert feed.steps_per_epoch == 10
    assert all(torch.equal(a, b) for a, b in zip(whole[6:], rest, strict=True))
    feed.prepare_epoch(4)
    assert not torch.equal(feed.next_batch()[0], whole[0])  # and each epoch has its own order


def test_a_resumed_epoch_refills_the_graphs_tensors_in_place(tmp_path):
    """A CUDA graph replays fixed addresses: resuming within an epoch sets the step counter and the
    epoch's sums in place, like the buffers (test_epoch_buffers_are_refilled_in_place)."""
    run = small_run(tmp_path, "--synthetic-size", "96")
    tensors = [run.feed.images, run.feed.labels, run.feed.next_step, run.lr,
               *(getattr(run.sums, name) for name in projkd.EpochSums.NAMES)]
    before = [t.data_ptr() for t in tensors]
    os.makedirs(run.cfg.run_dir)
    run.feed.prepare_epoch(0)
    run.step()
    run.step()
    sums = {name: t.clone() for name, t in projkd.epoch_state(run).items()}
    projkd.save_checkpoint(run, 0, steps_done=2)
    run.sums.zero_()
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    # by name: loss, ce, distill, correct, student.*
    assert set(checkpoint["epoch_state"]) == set(sums)
    projkd.restore(run, checkpoint)
    projkd.restore_epoch_state(run, checkpoint["epoch_state"])
    assert all(torch.equal(t, sums[name]) for name, t in projkd.epoch_state(run).items())
    assert run.resumed_steps == 2
    projkd.train_epoch(run, 0)  # its third and last step
    assert run.feed.next_step.item() == 3 and [t.data_ptr() for t in tensors] == before
    run.feed.close()


# --- distributed training (torchrun, gloo on the CPU) ---------------------------------------------


def ddp_args(synthetic_teacher, run_dir, *extra):
    return ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "32",
            "--epochs", "3", "--device",
            "cpu", "--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--method", "crd",
            "--crd-negatives", "64", "--teacher-ckpt", str(synthetic_teacher / "model.pt"),
            "--checkpoint-seconds", "0", "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_teacher):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun(*ddp_args(synthetic_teacher, run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


def test_two_processes_train_one_model(ddp_run):
    run_dir, out = ddp_run
    # checked by the processes themselves
    assert "the weights are the same in all 2 processes" in out
    assert "processes: 2 x batch 16 = global batch 32" in out
    assert out.count("epoch 2/3 ") == 1  # one process logs
    assert sorted(os.listdir(run_dir)) == ["last.pt", "log.csv", "metrics.json", "model.pt"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["history"]) == 3


def test_distributed_top1_equals_one_process_evaluating_model_pt(ddp_run, tmp_path):
    run_dir, _ = ddp_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    assert projkd.main(["eval", "--arch", SMALL_STUDENT, "--ckpt", str(run_dir / "model.pt"),
                        "--dataset", "synthetic",
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
    result = torchrun(*imagenet_args(root, "--student", "resnet18", "--method", "ce",
                                     "--run-dir", str(run_dir)))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert "the weights are the same in all 2 processes" in result.stdout
    out = tmp_path / "eval.json"
    assert projkd.main(["eval", "--arch", "resnet18", "--ckpt", str(run_dir / "model.pt"),
                        "--dataset", "imagenet",
                        "--data-dir", str(root), "--image-size", "32", "--device", "cpu",
                        "--out", str(out)]) == 0
    single = json.loads(out.read_text())
    assert single["images"] == 9 and single["top1"] == pytest.approx(metrics["last_top1"], abs=1e-3)


# --- evaluation and the entry points: projkd.py eval, each subcommand's help ----------------------


def test_eval_takes_the_runs_data_settings_from_its_metrics(synthetic_teacher, tmp_path, capsys):
    """eval of a run's model.pt without --dataset: the run's own test set (synthetic, 512 images),
    not the defaults."""
    metrics = json.loads((synthetic_teacher / "metrics.json").read_text())
    assert projkd.main(["eval", "--arch", SMALL_TEACHER, "--ckpt",
                        str(synthetic_teacher / "model.pt"),
                        "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert "note: dataset=synthetic, synthetic_size=512 from the run's metrics.json" in out
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["images"] == 128
    assert record["top1"] == pytest.approx(metrics["last_top1"], abs=1e-3)


def test_a_teacher_near_chance_is_warned_of_once_under_make_by_its_evaluation(tmp_path,
                                                                              capsys, monkeypatch):
    torch.manual_seed(0)
    fc = MODELS[SMALL_STUDENT](num_classes=10).state_dict()
    # a "teacher" that answers class 3 to everything: 10% on 10 balanced classes
    fc["fc.bias"][3] += 100.0
    torch.save(fc, tmp_path / "teacher.pt")
    # under make: the teacher's evaluation step warns, its runs do not
    monkeypatch.setenv("MAKELEVEL", "1")
    args = synthetic_args("--teacher", SMALL_STUDENT, "--student", SMALL_STUDENT, "--method", "kd",
                          "--teacher-ckpt", str(tmp_path / "teacher.pt"), "--run-dir",
                          str(tmp_path / "kd"))
    assert projkd.main(args) == 0
    assert "near chance" not in capsys.readouterr().out
    assert projkd.main(["eval", "--arch", SMALL_STUDENT, "--ckpt", str(tmp_path / "teacher.pt"),
                        "--dataset",
                        "synthetic", "--synthetic-size", "128", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # 3 of 32
    assert "top-1 9.38%" in out
    assert f"warning: {tmp_path / 'teacher.pt'} is near chance (10.0%)" in out


def test_subcommands_have_their_own_help(capsys):
    # subcommand: the options its help lists, and options of other commands that it must not list
    own = {
        "eval": ({"--arch", "--ckpt", "--out", "--dataset", "--data-dir", "--device"},
                 {"--alpha", "--student", "--method"}),
        "download": ({"--data-dir", "--dataset"}, {"--alpha", "--student"}),
        "cache": ({"--teacher", "--teacher-ckpt", "--teacher-cache-file", "--dataset"},
                  {"--alpha", "--student", "--kd-T", "--epochs"}),
        "bench": ({"--pairs", "--out-dir"}, set()),
        "fetch-teachers": ({"--arch", "--url", "--ckpt", "--out-dir", "--archive", "--dataset",
                            "--data-dir", "--device"},
                           {"--alpha", "--student", "--method"}),
    }
    assert set(own) <= set(projkd.COMMANDS)
    for command in projkd.COMMANDS:
        assert projkd.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"python projkd.py {command}" in out
        # each option's line starts with its name
        listed = set(re.findall(r"^\s+(--[\w-]+)", out, flags=re.M))
        wanted, foreign = own.get(command, (set(), set()))
        assert wanted <= listed, (command, sorted(wanted - listed))
        assert not foreign & listed, (command, sorted(foreign & listed))


def test_fused_sgd_after_an_overflowing_first_step_equals_plain_sgd():
    """fp16 on CUDA: fused SGD under a GradScaler. The first step overflows (routine at the scale
    2^16) and fused SGD skips it in its kernel; the momentum buffers must already hold zeros then,
    not the empty memory SGD would have made (deterministic mode fills empty memory with NaN, which
    shows it)."""
    cfg = projkd.Config(lr=0.1, momentum=0.9, weight_decay=5e-4)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        weights = {}
        for fused in (True, False):
            torch.manual_seed(0)
            w = nn.Parameter(torch.randn(4, 3))
            optimizer = projkd.build_optimizer(cfg, [w], torch.tensor(0.1), fused=fused)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
            for overflow in (True, False):
                optimizer.zero_grad(set_to_none=True)
                loss = (w * torch.arange(12.0).view(4, 3)).sum()
                if overflow:
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            weights[fused] = w.detach().clone()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert torch.isfinite(weights[True]).all()
    assert torch.equal(weights[True], weights[False])


@pytest.mark.parametrize("name,status", [("SIGTERM", 143), ("SIGUSR1", 138)])
def test_a_signal_during_set_up_stops_at_once_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                                 synthetic_teacher, name, status):
    """The teacher's evaluation (a minute on a CPU) is set-up: a signal then stops the run with the
    usual one line and status, and the run folder, made for its .lock, is gone."""
    evaluate = projkd.evaluate

    def signalled(*args):
        os.kill(os.getpid(), getattr(signal, name))
        return evaluate(*args)
    monkeypatch.setattr(projkd, "evaluate", signalled)
    run_dir = tmp_path / "runs" / "run"
    args = synthetic_args("--teacher", SMALL_TEACHER, "--student", SMALL_STUDENT, "--teacher-ckpt",
                          str(synthetic_teacher / "model.pt"), "--run-dir", str(run_dir))
    handlers = signal.getsignal(signal.SIGTERM)
    assert projkd.main(args) == status
    err = capsys.readouterr().err
    assert err == (f"projkd: {name}: stopped during set-up, before training began; run the same "
                   "command again\n")
    assert not (tmp_path / "runs").exists()
    assert signal.getsignal(signal.SIGTERM) == handlers


def test_check_points_under_torchrun_are_a_second_of_training_apart(tmp_path, monkeypatch):
    """Under torchrun every check point is an all_reduce and a host sync: at least a second of
    training apart (multiprocess_check_seconds), spaced alike on every process from the agreed
    (slowest) step time."""
    # 40 steps; 40 // 200: every step
    run = small_run(tmp_path, "--synthetic-size", "160", "--batch-size", "4")
    run.world_size = 2
    # one process: its own numbers
    monkeypatch.setattr(projkd.dist, "all_reduce", lambda t, op=None: None)
    save_or_stop = projkd.save_or_stop
    checks = []  # (step, seconds per step agreed there)

    def recorded(run, epoch, steps_done=0, seconds_per_step=0.0):
        checks.append((steps_done, save_or_stop(run, epoch, steps_done, seconds_per_step)))
        return checks[-1][1]
    monkeypatch.setattr(projkd, "save_or_stop", recorded)
    clock = [0.0]  # the run's clock: 1/8 s a step (exact in binary)
    monkeypatch.setattr(projkd, "time", types.SimpleNamespace(time=lambda: clock[0]))
    step = run.step

    def slow_step():
        clock[0] += 0.125
        step()
    run.step = slow_step
    projkd.train_epoch(run, 0)
    assert checks == [(1, 0.125), (9, 0.125), (17, 0.125), (25, 0.125), (33, 0.125)]
    run.feed.close()
