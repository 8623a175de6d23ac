"""Tests for tables.py: the paper's Table 4, ablation and Table 1 layouts from hand-made runs,
mean ± std and n, 'missing' never 0, and the evaluated numbers with their footnotes."""
import csv
import json

import pytest

from conftest import IMAGENET_PAIRS, write_metrics


def test_tables_report_mean_std_n_and_missing_never_zero(tmp_path, capsys):
    import tables

    runs = tmp_path / "runs"
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed1", 70.0, best=71.0, teacher=74.5)
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed2", 72.0, best=72.5, teacher=74.5)
    for seed, acc in ((1, 69.0), (2, 70.0), (3, 71.0)):
        # the Student row: the student trained alone
        write_metrics(runs / "vgg8" / f"ce-seed{seed}", acc)
    write_metrics(runs / "other-vgg8" / "kd-seed1", 99.0)  # another pair's run must not leak in
    md = tmp_path / "out" / "t.md"
    csv_path = tmp_path / "out" / "t.csv"
    assert tables.main(["--runs", str(runs), "--pairs", "vgg13:vgg8",
                        "--out", f"{md} {csv_path}"]) == 0
    text = md.read_text()
    last = text.split("## ")[1]  # the last-epoch table comes first
    # sample std of 70 and 72; the paper beside
    assert "| PEFD | 71.00 ± 1.41 (n=2) | 74.35 ± 0.12 |" in last
    assert "| Student | 70.00 ± 1.00 (n=3) | 70.74 ± 0.31 |" in last
    assert "| Teacher | 74.50 | 74.64 |" in last
    assert "| KD | missing | 72.98 ± 0.19 |" in last and "| SP | missing |" in last
    assert "| PEFD | 71.75 ± 1.06 (n=2) |" in text.split("## ")[2]  # best epoch: 71 and 72.5
    rows = list(csv.DictReader(open(csv_path)))
    kd = next(r for r in rows if r["table"] == "last" and r["row"] == "KD")
    assert (kd["mean"], kd["std"], kd["n"], kd["paper_mean"]) == ("", "", "0", "72.98")
    pefd = next(r for r in rows if r["table"] == "last" and r["row"] == "PEFD")
    assert float(pefd["mean"]) == 71.0
    assert float(pefd["std"]) == pytest.approx(1.4142, abs=1e-4)
    assert pefd["n"] == "2"


def test_tables_take_last_numbers_from_each_model_file_evaluated_alone_and_mark_disagreements(
        tmp_path):
    import tables

    runs = tmp_path / "runs"
    teachers = tmp_path / "ckpt"
    pair_dir = runs / "vgg13-vgg8"
    write_metrics(pair_dir / "pefd-seed1", 70.0, teacher=74.5)  # model.pt evaluates as training did
    write_metrics(pair_dir / "pefd-seed2", 72.0, teacher=74.5, evaluated=71.5)  # model.pt differs
    write_metrics(pair_dir / "kd-seed1", 71.0, evaluated=71.015)  # within 0.02 points: rounding
    write_metrics(pair_dir / "sp-seed1", 73.0, evaluated=None)  # not evaluated yet
    teachers.mkdir()
    (teachers / "vgg13.eval.json").write_text(json.dumps({"top1": 74.9, "top5": 92.0}))
    md = tmp_path / "t.md"
    csv_path = tmp_path / "t.csv"
    assert tables.main(["--runs", str(runs), "--teachers", str(teachers), "--pairs", "vgg13:vgg8",
                        "--seeds", "1 2", "--out", f"{md} {csv_path}"]) == 0
    text = md.read_text()
    last, best = text.split("## ")[1:3]
    # the checkpoint's own evaluation, not the 74.5 its students saw
    assert "| Teacher | 74.90 | 74.64 |" in last
    # 70 and 71.5: what the files evaluate to, marked
    assert "| PEFD | 70.75 ± 1.06 (n=2) [^2] |" in last
    assert "| KD | 71.02 (n=1) | 72.98 ± 0.19 |" in last
    assert "| SP | 73.00 (n=1) [^1] |" in last
    # the best epoch is the training loop's (no file of it is kept)
    assert "| PEFD | 71.00 ± 1.41 (n=2) |" in best
    assert (f"[^2]: {runs}/vgg13-vgg8/pefd-seed2: model.pt evaluates to 71.50% top-1 alone, "
            "the training loop's last epoch measured 72.00%") in text
    assert (f"[^1]: {runs}/vgg13-vgg8/sp-seed1: the training loop's last epoch; "
            "model.pt not yet evaluated") in text
    rows = {(r["table"], r["row"]): r for r in csv.DictReader(open(csv_path))}
    assert "model.pt evaluates to 71.50%" in rows["last", "PEFD"]["notes"]
    assert rows["best", "PEFD"]["notes"] == ""


def test_ablation_table_finds_the_variant_runs(tmp_path):
    import tables

    runs = tmp_path / "runs"
    write_metrics(runs / "vgg13-vgg8" / "pefd-seed1", 74.0, cosine=0.2)
    write_metrics(runs / "vgg13-vgg8" / "pefd-q0-seed1", 73.0, cosine=0.4)
    write_metrics(runs / "vgg13-vgg8" / "pefd-depth3-seed1", 72.0)
    write_metrics(runs / "vgg13-vgg8" / "pefd-gelu-seed1", 74.5)
    out = tmp_path / "ablations.md"
    assert tables.main(["--kind", "ablations", "--runs", str(runs), "--pairs", "vgg13:vgg8",
                        "--seeds", "1", "--variants", "gelu q0 depth3 none",
                        "--out", str(out)]) == 0
    last, _, cosine = out.read_text().split("## ")[1:]
    labels = [line.split("|")[1].strip() for line in last.splitlines()
              if line.startswith("| ") and "→" not in line]
    # the paper's order
    assert labels == ["no projector", "q=3 (PEFD)", "depth 3", "GELU", "no activation"]
    assert "| no projector | 73.00 (n=1) | – |" in last
    assert "| GELU | 74.50 (n=1) | 74.39 ± 0.18 |" in last
    assert "| no activation | missing | 73.46 ± 0.42 |" in last
    assert "| no projector | 0.4000 (n=1) |" in cosine
    assert "| q=3 (PEFD) | 0.2000 (n=1) |" in cosine
    assert tables.main(["--kind", "ablations", "--variants", "q0 wide"]) == 2


def test_imagenet_table_is_table_1_with_our_numbers_beside_the_paper(tmp_path):
    import tables

    runs = tmp_path / "runs"
    for seed, top1, top5 in ((1, 71.0, 90.0), (2, 72.0, 91.0)):
        write_metrics(runs / "resnet34-resnet18" / f"pefd-seed{seed}", top1, best=top1 + 0.5,
                      teacher=73.3, top5=top5, teacher_top5=91.4)
    write_metrics(runs / "resnet18" / "ce-seed1", 69.5, top5=89.0)  # the Student row of (a) and (c)
    write_metrics(runs / "densenet201-mobilenet_v1" / "kd-seed1", 70.0, teacher=76.9, top5=89.9,
                  teacher_top5=93.4)
    md = tmp_path / "imagenet.md"
    csv_path = tmp_path / "imagenet.csv"
    assert tables.main(["--kind", "imagenet", "--runs", str(runs), "--pairs", IMAGENET_PAIRS,
                        "--methods", "pefd kd ce", "--seeds", "1 2",
                        "--out", f"{md} {csv_path}"]) == 0
    text = md.read_text()
    last, best = text.split("## ")[1:]
    assert ("| Pair | Accuracy | Student | paper | KD | paper | PEFD | paper "
            "| Teacher | paper |") in last
    assert ("| (a) resnet34 → resnet18 | Top-1 | 69.50 (n=1) | 69.75 | missing | 70.83 "
            "| 71.50 ± 0.71 (n=2) | 71.94 | 73.30 | 73.31 |") in last
    assert ("|  | Top-5 | 89.00 (n=1) | 89.07 | missing | 90.15 | 90.50 ± 0.71 (n=2) | 90.68 "
            "| 91.40 | 91.41 |") in last
    nothing = ("| (b) resnet50 → mobilenet_v1 | Top-1 | missing | 69.06 | missing | 70.65 "
               "| missing | 73.16 | missing |")
    assert nothing + " 76.13 |" in last  # nothing finished: missing, never 0
    # the same Student run as (a)
    assert ("| (c) densenet201 → resnet18 | Top-1 | 69.50 (n=1) | 69.75 | missing | 70.38 "
            "| missing | 72.29 | missing | 76.89 |") in last
    # (d), its Top-5 row
    assert ("|  | Top-5 | missing | 88.84 | 89.90 (n=1) | 89.93 | missing | 91.47 "
            "| 93.40 | 93.37 |") in last
    assert ("| (a) resnet34 → resnet18 | Top-1 | 69.50 (n=1) | 69.75 | missing | 70.83 "
            "| 72.00 ± 0.71 (n=2) |") in best
    assert "| 0.00" not in text and "SP" not in text
    assert "finished runs: 4" in text  # the shared Student run counted once
    rows = list(csv.DictReader(open(csv_path)))
    pefd = next(r for r in rows
                if r["table"] == "last-top5" and r["row"] == "PEFD" and r["teacher"] == "resnet34")
    assert (pefd["mean"], pefd["n"]) == ("90.5", "2")
    assert (pefd["paper_mean"], pefd["paper_std"]) == ("90.68", "")
    # SP and CRD-lite are columns when asked for, in the paper's order
    assert tables.main(["--kind", "imagenet", "--runs", str(runs), "--pairs", IMAGENET_PAIRS,
                        "--seeds", "1", "--out", str(md)]) == 0
    assert ("| Pair | Accuracy | Student | paper | KD | paper | SP | paper | CRD-lite | paper "
            "| PEFD | paper | Teacher | paper |") in md.read_text()
