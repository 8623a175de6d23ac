"""Tests for what a newcomer meets first in projkd.py (issue 24): its messages, in the order a run
gives them, and what a run records about itself. Each runs the CLI on small generated data on the
CPU."""

import re

import pytest

import projkd
from conftest import SMALL_STUDENT, synthetic_args


def test_eval_of_a_folder_names_the_folder(tmp_path, capsys):
    assert projkd.main(["eval", "--arch", SMALL_STUDENT, "--ckpt", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"--ckpt {tmp_path} is a folder: pass the checkpoint file itself, e.g. {tmp_path}/model.pt"
        in err
    )
    assert len(err.strip().splitlines()) == 1


def test_eval_checks_out_is_writable_before_evaluating(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "model.pt"
    model = projkd.models_module().MODELS[SMALL_STUDENT](num_classes=10)
    projkd.torch.save(model.state_dict(), ckpt)
    evaluated = []
    monkeypatch.setattr(
        projkd, "load_data", lambda *a: evaluated.append(a)
    )  # the data is never read
    out = tmp_path / "missing" / "x.json"
    assert (
        projkd.main(
            [
                "eval",
                "--arch",
                SMALL_STUDENT,
                "--ckpt",
                str(ckpt),
                "--dataset",
                "synthetic",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        f"cannot write --out {out}: {out.parent} is not a folder" in err and "free space" not in err
    )
    assert not evaluated and not out.parent.exists()


def test_a_full_disk_mid_run_says_the_last_check_point_is_kept_and_resume_continues(
    tmp_path, capsys, monkeypatch
):
    real_open, csv_writes = open, []

    def disk_full_at_epoch_2(
        path, mode="r", *args, **kwargs
    ):  # log.csv after epoch 2: last.pt of epoch 1 is there
        if "w" in mode and ".csv" in str(path):
            csv_writes.append(path)
            if len(csv_writes) == 2:
                raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", disk_full_at_epoch_2)
    run_dir = tmp_path / "run"
    args = synthetic_args(
        "--student",
        SMALL_STUDENT,
        "--method",
        "ce",
        "--run-dir",
        str(run_dir),
        "--epochs",
        "2",
        "--checkpoint-seconds",
        "0",
    )
    assert projkd.main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"projkd: error: cannot write {run_dir / 'log.csv'} (No space left on device); free "
        f"space or choose another folder; the last check point is kept in "
        f"{run_dir / 'last.pt'}: free space, "
        f"then the same command with --resume continues from it\n"
    )
    monkeypatch.setattr("builtins.open", real_open)
    assert projkd.main(args + ["--resume"]) == 0  # as it says
    assert "resuming" in capsys.readouterr().out


@pytest.mark.parametrize("problem", ["batch", "data", "checkpoint"])
def test_argument_and_file_errors_come_before_the_config_block_and_its_notes(
    tmp_path, capsys, problem
):
    bad_teacher = tmp_path / "teacher.pt"
    bad_teacher.write_bytes(b"not a checkpoint")
    args = {
        "batch": synthetic_args(
            "--student", SMALL_STUDENT, "--method", "ce", "--batch-size", "100000"
        ),
        "data": [
            "--student",
            SMALL_STUDENT,
            "--method",
            "ce",
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path / "none"),
        ],
        "checkpoint": synthetic_args(
            "--teacher", "resnet20", "--teacher-ckpt", str(bad_teacher), "--student", SMALL_STUDENT
        ),
    }[problem]
    assert projkd.main(args + ["--run-dir", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert (
        "config (where not a default" not in out and "note:" not in out
    )  # no scaling-rule note, no config
    assert err.startswith("projkd: error: ") and err.count("\n") == 1


def untrained_teacher(tmp_path):
    path = tmp_path / "teacher.pt"
    projkd.torch.save(projkd.models_module().MODELS["resnet20"](num_classes=10).state_dict(), path)
    return path


def test_a_line_says_the_teacher_is_being_evaluated_before_its_result(tmp_path, capsys):
    args = synthetic_args(
        "--teacher",
        "resnet20",
        "--teacher-ckpt",
        str(untrained_teacher(tmp_path)),
        "--student",
        SMALL_STUDENT,
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert projkd.main(args) == 0
    out = capsys.readouterr().out
    evaluating = out.index("evaluating the teacher resnet20 on the test images (once per run) ...")
    assert evaluating < out.index("teacher resnet20 from ")


@pytest.mark.parametrize("over_an_hour", [False, True])
def test_a_cpu_run_over_an_hour_says_so_in_its_first_lines(
    tmp_path, capsys, monkeypatch, over_an_hour
):
    if over_an_hour:  # a few seconds here stand for the hour: the threshold is what is tried
        monkeypatch.setattr(projkd, "COST_NOTE_SECONDS", 0)
    args = [
        "--dataset",
        "synthetic",
        "--synthetic-size",
        "192",
        "--batch-size",
        "16",
        "--epochs",
        "2",  # 12 steps
        "--device",
        "cpu",
        "--student",
        SMALL_STUDENT,
        "--method",
        "ce",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    assert projkd.main(args) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "on this CPU" in line]
    if not over_an_hour:
        assert not notes
        return
    assert len(notes) == 1 and out.index(notes[0]) < out.index("epoch 1/2")
    assert re.fullmatch(
        r"note: about \dm\d\ds on this CPU \(2 epochs x \dm\d\ds, measured on its first 5 steps\); "
        r"faster: a GPU \(--device cuda\), or --epochs 1 for a try",
        notes[0],
    )
