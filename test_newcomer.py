"""Tests for what a newcomer meets first in projkd.py (issue 24): its messages, in the order a run gives them, and
what a run records about itself. Each runs the CLI on small generated data on the CPU."""
import json
import os

import pytest

import projkd
from conftest import SMALL_STUDENT, synthetic_args


def test_eval_of_a_folder_names_the_folder(tmp_path, capsys):
    assert projkd.main(["eval", "--arch", SMALL_STUDENT, "--ckpt", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--ckpt {tmp_path} is a folder: pass the checkpoint file itself, e.g. {tmp_path}/model.pt" in err
    assert len(err.strip().splitlines()) == 1


def test_eval_checks_out_is_writable_before_evaluating(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "model.pt"
    projkd.torch.save(projkd.zoo().MODELS[SMALL_STUDENT](num_classes=10).state_dict(), ckpt)
    evaluated = []
    monkeypatch.setattr(projkd, "load_data", lambda *a: evaluated.append(a))  # the data is never read
    out = tmp_path / "missing" / "x.json"
    assert projkd.main(["eval", "--arch", SMALL_STUDENT, "--ckpt", str(ckpt), "--dataset", "synthetic",
                        "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write --out {out}: {out.parent} is not a folder" in err and "free space" not in err
    assert not evaluated and not out.parent.exists()
