"""Your own models and data: timm architectures (`timm:NAME`), start weights (--pretrained,
--weights), --dataset folder, and `make own`, on generated class folders with timm's tiny test
models at 32 pixels."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import models
import projkd
from conftest import HERE, make, write_image_folder

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402  (timm brings safetensors)

# timm's smallest models (a few hundred thousand parameters): a CNN, a ViT (tokens, no map) and an
# EfficientNet, whose map is the output of its head's conv + BN.
TEACHER, VIT, EFFNET = "timm:test_resnet", "timm:test_vit", "timm:test_efficientnet"
CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, and on a busy machine its spinning costs
    seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/<class>/ and val/<class>/ with 4 and 2 small JPEGs of odd sizes per class."""
    return write_image_folder(tmp_path_factory.mktemp("own") / "data", classes=CLASSES)


def folder_args(root, *extra):
    return ["--dataset", "folder", "--data-dir", str(root), "--image-size", "32",
            "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--workers", "0",
            "--crd-negatives", "16", *extra]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A timm:test_resnet state_dict for the three classes (its weights need not be trained: the
    tests check the wiring, not accuracy)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    torch.manual_seed(0)
    save_file(models.build_model(TEACHER, len(CLASSES), 32).state_dict(), str(path))
    return path


def train(tmp_path, root, *extra, name="run"):
    run_dir = tmp_path / name
    assert projkd.main(folder_args(root, "--run-dir", str(run_dir), *extra)) == 0
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("method,student",
                         [("pefd", VIT), ("kd", VIT), ("sp", EFFNET), ("crd", EFFNET)])
def test_every_method_trains_timm_models_on_class_folders(method, student, folder, teacher_file,
                                                          tmp_path):
    _, metrics = train(tmp_path, folder, "--teacher", TEACHER, "--teacher-ckpt", str(teacher_file),
                       "--student", student, "--method", method)
    epoch = metrics["history"][0]
    term = epoch[f"train_{projkd.DISTILL_LOSS_NAMES[method]}"]
    # the method's own term is wired, and the folder protocol is ImageNet's
    assert term > 0 and torch.isfinite(torch.tensor(epoch["train_loss"]))
    assert metrics["config"]["dataset"] == "folder" and metrics["config"]["lr"] == 0.1
    assert metrics["teacher_provenance"]["sha256"] == projkd.file_sha256(str(teacher_file))
    assert metrics["student_start"] == {"how": "initialised from --seed 1"}


def test_the_maps_sp_reads_are_what_forward_features_returns():
    for arch, layer in ((TEACHER, "layer4"), (EFFNET, "bn2"), (VIT, None)):
        model = models.build_model(arch, 3, 32).eval()
        assert model.map_layer == layer, arch
        x = torch.randn(2, 3, 32, 32)
        taps = projkd.Taps(model, model.map_layer)
        with torch.no_grad():
            logits = model(x)
            expected = model.forward_head(model.forward_features(x), pre_logits=True)
        taps.remove()
        # the pooled penultimate feature
        assert torch.allclose(taps.feature, expected, atol=1e-6), arch
        assert torch.allclose(projkd.classifier_of(model)(taps.feature), logits, atol=1e-6)
        if layer is not None:
            assert torch.equal(taps.feature_map, model.forward_features(x))


def test_resume_is_bit_identical_and_eval_gives_the_runs_last_accuracy(folder, teacher_file,
                                                                       tmp_path, capsys):
    # (no --deterministic: on the CPU the sums are the same anyway, and it imports torch._dynamo,
    # which takes seconds)
    pair = ["--teacher", TEACHER, "--teacher-ckpt", str(teacher_file), "--student", VIT]
    whole, metrics = train(tmp_path, folder, *pair, "--epochs", "2", name="whole")
    train(tmp_path, folder, *pair, name="halves")
    capsys.readouterr()
    halves, resumed = train(tmp_path, folder, *pair, "--epochs", "2", "--resume", name="halves")
    # the data set named as given, not as ImageNet
    assert (f"resuming {halves} after epoch 1 (--dataset folder: in the same order of images, "
            "with new random crops and flips)") in capsys.readouterr().out
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, halves))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == [dict(h, seconds=r["seconds"], images_per_s=r["images_per_s"],
                                       plan_wait_s=r["plan_wait_s"])
                                  for h, r in zip(metrics["history"], resumed["history"])]
    # the model file alone, its data settings from the run's metrics.json
    assert projkd.main(["eval", "--arch", VIT, "--ckpt", str(whole / "model.pt"),
                        "--data-dir", str(folder), "--device", "cpu", "--workers", "0"]) == 0
    evaluated = json.loads((whole / "model.eval.json").read_text())
    assert abs(evaluated["top1"] - metrics["last_top1"]) < 1e-3  # log.csv's rounding
    assert evaluated["images"] == 2 * len(CLASSES)


@pytest.mark.parametrize("suffix,classes", [(".safetensors", 1000), (".pt", 3)])
def test_weights_file_gives_exactly_its_weights_with_a_new_head(suffix, classes, folder, tmp_path):
    torch.manual_seed(5)
    source = models.build_model(VIT, classes, 32).state_dict()
    path = str(tmp_path / f"vit{suffix}")
    if suffix == ".pt":
        torch.save({"state_dict": source}, path)  # as timm's train.py saves (its args aside)
    else:
        save_file(source, path)
    cfg = projkd.parse_args(folder_args(folder, "--student", VIT, "--method", "ce",
                                        "--weights", path, "--run-dir", str(tmp_path / "run")))
    run = projkd.setup_run(cfg)
    state = run.student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("head."))
    assert state["head.weight"].shape == (3, 64)
    assert torch.equal(state["head.weight"], source["head.weight"]) == (classes == 3)
    assert run.student_start == {"how": "a weights file", "arch": VIT, "file": path,
                                 "sha256": projkd.file_sha256(path), "new_head": classes != 3}


def hub_stand_in(cache, arch, state):
    """timm's download of `arch`'s pretrained weights, as the Hugging Face cache keeps it: the
    stand-in where a download would be (with HF_HUB_OFFLINE the hub reads only this)."""
    name = models.build_model(arch, 3, 32).pretrained_cfg["hf_hub_id"]
    repo = os.path.join(cache, "models--" + name.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    os.makedirs(os.path.join(repo, "snapshots", "0"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write("0")
    save_file(state, os.path.join(repo, "snapshots", "0", "model.safetensors"))
    return os.path.join(repo, "snapshots", "0", "model.safetensors")


def test_pretrained_gives_timms_file_of_that_name_with_a_new_head(folder, tmp_path, monkeypatch):
    import huggingface_hub.constants

    torch.manual_seed(7)
    published = models.build_model(TEACHER, 1000, 32).state_dict()
    file = hub_stand_in(str(tmp_path / "hub"), TEACHER, published)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    run_dir, metrics = train(tmp_path, folder, "--student", TEACHER, "--method", "ce",
                             "--pretrained", "--lr", "0")
    state = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in published.items()
               if not k.startswith("fc.") and "running" not in k and "num_batches" not in k)
    assert state["fc.weight"].shape == (3, 96)
    start = metrics["student_start"]
    assert (start["tag"], start["hub"], start["new_head"]) == (
        "r160_in1k", "timm/test_resnet.r160_in1k", True)
    assert start["sha256"] == projkd.file_sha256(file)


def one_line_error(capsys, argv):
    assert projkd.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("projkd: error: "), err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--student", "timm:resnet19"], "timm has no model 'resnet19' (close matches: timm:resnet18"),
    (["--student", VIT, "--image-size", "8"], "timm:test_vit cannot take 8 x 8 images"),
    (["--student", "resnet8", "--image-size", "64"],
     "resnet8 is a CIFAR (32x32) architecture and --image-size"),
    (["--student", "resnet8", "--pretrained"],
     "--pretrained takes timm's weights, for timm: architectures"),
    (["--student", VIT, "--teacher", TEACHER, "--method", "sp"],
     "timm:test_vit has no last-stage C x H x W map"),
    (["--student", VIT, "--weights", "nowhere.pt"], "no weights file at nowhere.pt"),
])
def test_wrong_names_sizes_and_weights_are_one_line(extra, message, folder, teacher_file, tmp_path,
                                                    capsys):
    run_dir = tmp_path / "run"
    argv = folder_args(folder, "--run-dir", str(run_dir), "--method", "ce", *extra)
    if "--teacher" in extra:
        argv += ["--teacher-ckpt", str(teacher_file)]
    assert message in one_line_error(capsys, argv)
    assert not run_dir.exists()  # nothing half-written


def test_a_file_of_another_model_or_size_is_one_line(folder, tmp_path, capsys):
    path = tmp_path / "vit48.safetensors"
    save_file(models.build_model(VIT, 3, 48).state_dict(), str(path))  # another position embedding
    err = one_line_error(capsys, folder_args(folder, "--student", VIT, "--method", "ce",
                                             "--weights", str(path),
                                             "--run-dir", str(tmp_path / "run")))
    assert "does not fit timm:test_vit" in err and "pos_embed" in err
    err = one_line_error(capsys, ["eval", "--arch", TEACHER, "--ckpt", str(path),
                                  "--dataset", "folder", "--data-dir", str(folder),
                                  "--image-size", "32", "--device", "cpu"])
    assert "does not fit timm:test_resnet with 3 classes" in err


def test_offline_pretrained_and_missing_timm_are_one_line(folder, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    argv = folder_args(folder, "--student", TEACHER, "--method", "ce",
                       "--run-dir", str(tmp_path / "run"))
    err = one_line_error(capsys, argv + ["--pretrained"])
    assert "timm's pretrained weights for test_resnet could not be loaded" in err
    assert "--weights FILE" in err
    # `import timm` raises ImportError, as where it is not installed
    monkeypatch.setitem(sys.modules, "timm", None)
    err = one_line_error(capsys, argv)
    assert "timm:test_resnet needs timm, which is not installed: pip install timm" in err


def test_a_timm_teachers_cache_is_built_at_32_pixels_and_refused_on_class_folders(folder, tmp_path,
                                                                                  capsys):
    """The cache holds a teacher's outputs of CIFAR-style 32-pixel views: a ViT teacher, made for
    one size, is made for that one; class folders' random crops have no cache, said in one line."""
    path = tmp_path / "vit.safetensors"
    save_file(models.build_model(VIT, 10, 32).state_dict(), str(path))
    cache = tmp_path / "vit.tcache"
    assert projkd.main(["cache", "--teacher", VIT, "--teacher-ckpt", str(path),
                        "--dataset", "synthetic", "--synthetic-size", "32", "--device", "cpu",
                        "--teacher-cache-file", str(cache)]) == 0
    assert cache.is_file()
    err = one_line_error(capsys, ["cache", "--teacher", VIT, "--teacher-ckpt", str(path),
                                  "--dataset", "folder", "--data-dir", str(folder),
                                  "--image-size", "32", "--device", "cpu"])
    assert "the teacher cache is for CIFAR-style data (cifar100, synthetic)" in err


def test_projkd_and_models_copied_alone_train_and_tap_a_timm_model(folder, tmp_path):
    """Copied with models.py into an empty folder: a timm student trains on class folders, and the
    pieces offered for copying read its feature."""
    for name in ("projkd.py", "models.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path)
    code = textwrap.dedent(f"""
        import torch
        import projkd, models
        argv = ["--dataset", "folder", "--data-dir", {str(folder)!r}, "--image-size", "32",
                "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--workers", "0",
                "--student", "{VIT}", "--method", "ce"]
        assert projkd.main(argv) == 0
        model = models.build_model("{VIT}", 3, 32)
        feature, logits = projkd.features_and_logits(model, torch.randn(2, 3, 32, 32))
        projkd.mda_loss(projkd.ProjectorEnsemble(64, 96)(feature), torch.randn(2, 96)).backward()
        assert model.patch_embed.proj.weight.grad is not None
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
    assert (tmp_path / "runs" / "folder" / "timm_test_vit" / "ce-seed1" / "model.pt").exists()


# --- make own ------------------------------------------------------------------------------------


def own_knobs(root, folder, *extra):
    return [f"PY={sys.executable}", "DEPS=", f"DATA_DIR={folder}", f"TEACHER={TEACHER}",
            f"STUDENT={VIT}", "SEEDS=1", "DEVICE=cpu", "OWN_IMAGE_SIZE=32", f"OWN_RUNS={root}/runs",
            f"OWN_TEACHERS={root}/ckpt", f"OWN_RESULTS={root}/results",
            "TEACHER_EXTRA=--epochs 1 --batch-size 4 --workers 0",
            "OWN_EXTRA=--epochs 1 --batch-size 4 --workers 0", *extra]


def test_make_own_plans_every_run_evaluation_and_the_table(folder, tmp_path):
    plan = make("-n", "own", *own_knobs(tmp_path, folder, "SEEDS=1 2")).stdout.splitlines()
    trainings = [line for line in plan if "projkd.py --dataset folder" in line]
    assert len(trainings) == 1 + 2 * 3  # the teacher; PEFD, KD and the student alone for two seeds
    assert "--student timm:test_resnet --method ce --pretrained --seed 1" in trainings[0]
    runs = f"{tmp_path}/runs"
    kd_run = f"{runs}/timm_test_resnet-timm_test_vit/kd-seed2"
    assert any(f"--method kd  --seed 2 --run-dir {kd_run}" in t for t in trainings)
    assert sum("projkd.py eval" in line for line in plan) == 6 + 1  # each student, and the teacher
    assert plan[-1].startswith(f"{sys.executable} tables.py --kind main --runs {runs}")
    given = make("-n", "own", *own_knobs(tmp_path, folder, "TEACHER_CKPT=" + str(folder / "train")))
    assert "--method ce --pretrained" not in given.stdout  # a teacher given is used as it is
    usage = make("own", f"PY={sys.executable}", "DEPS=")
    assert usage.returncode == 2
    assert "usage: make own DATA_DIR=DIR TEACHER=timm:NAME" in usage.stderr


def test_make_own_runs_end_to_end_and_redoes_nothing(folder, tmp_path):
    """The whole chain with PEFD alone (the plan above has the other runs, made by the same rules),
    with the teacher's pretrained weights from a stand-in of the hub's cache."""
    torch.manual_seed(3)
    hub_stand_in(str(tmp_path / "hub"), TEACHER, models.build_model(TEACHER, 1000, 32).state_dict())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "OMP_NUM_THREADS": "1"}
    knobs = own_knobs(tmp_path, folder, "OWN_METHODS=pefd")
    first = make("-j2", "own", *knobs, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (tmp_path / "results" / "own.md").read_text()
    assert "| PEFD |" in table and "| Teacher |" in table
    assert "missing" not in table.split("## ")[1]
    assert "timm:test_resnet (trained here, sha256" in table
    figures = tmp_path / "results" / "figures"
    assert (figures / "timm_test_resnet-timm_test_vit-curves.png").is_file()
    teacher_run = tmp_path / "runs" / "timm_test_resnet" / "ce-seed1" / "metrics.json"
    teacher_run = json.loads(teacher_run.read_text())
    assert teacher_run["student_start"]["hub"] == "timm/test_resnet.r160_in1k"  # from the stand-in
    again = make("own", *knobs, env=env)
    # every target a file, all made
    assert again.returncode == 0 and "projkd.py" not in again.stdout
