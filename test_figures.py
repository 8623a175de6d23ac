"""Tests for the figures (tables.py's series, drawn by figures.py): what each figure plots, checked
against the runs' log.csv, and the bench figure with and without matplotlib."""
import csv
import json
import os
import sys

import pytest

import figures
from conftest import decoded_pngs, epochs, linked_figures, write_log, write_metrics


def log_columns(*run_dirs, column):
    """Per epoch, the mean, min and max of a log.csv column over the runs: what a curve must
    plot."""
    values = [[float(row[column]) for row in csv.DictReader(open(os.path.join(d, "log.csv")))]
              for d in run_dirs]
    return [(e + 1, sum(v) / len(v), min(v), max(v)) for e, v in enumerate(zip(*values))]


def drawn_figures(monkeypatch):
    """What each figure drawn from now on shows, by file name: (its panels, the texts written in
    them)."""
    drawn = {}
    save = figures._save

    def record(plt, fig, path):
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        drawn[os.path.basename(path)] = (len(fig.axes), texts)
        save(plt, fig, path)
    monkeypatch.setattr(figures, "_save", record)
    return drawn


def test_curve_figures_plot_each_methods_log_csv_mean_and_band(tmp_path, monkeypatch):
    import tables

    runs = tmp_path / "runs"
    drawn = drawn_figures(monkeypatch)
    pefd = [runs / "vgg13-vgg8" / f"pefd-seed{s}" for s in (1, 2)]
    write_metrics(pefd[0], 30.0, teacher=74.5, cosine=0.2,
                  history=epochs([10, 20, 30], mda=[0.9, 0.5, 0.3]))
    write_metrics(pefd[1], 40.0, teacher=74.5, cosine=0.4,
                  history=epochs([14, 26, 40], mda=[0.7, 0.4, 0.2]))
    # unfinished: never plotted
    write_log(runs / "vgg13-vgg8" / "pefd-seed3", epochs([99, 99, 99], mda=[9, 9, 9]))
    # no train_mda
    write_metrics(runs / "vgg13-vgg8" / "kd-seed1", 33.0, teacher=74.5,
                  history=epochs([12, 22, 33]))
    write_metrics(runs / "vgg8" / "ce-seed1", 24.0, cosine=0.6, history=epochs([8, 16, 24]))
    # an older run alone
    write_metrics(runs / "wrn_40_2-wrn_16_2" / "kd-seed1", 50.0, history=epochs([50]))
    pairs = "vgg13:vgg8 wrn_40_2:wrn_16_2 resnet32x4:resnet8x4"
    md = tmp_path / "out" / "cifar100.md"
    folder = tmp_path / "out" / "figures"
    assert tables.main(["--runs", str(runs), "--pairs", pairs, "--out", str(md),
                        "--figures", str(folder)]) == 0
    tc = tables.TableConfig(runs=str(runs), pairs=pairs)
    series, teacher = tables.curve_series(tc, "vgg13:vgg8", ("test_top1", "train_mda"))
    assert list(series["test_top1"]) == ["Student", "KD", "PEFD"]
    assert list(series["train_mda"]) == ["PEFD"]
    # mean, min, max over seeds 1 and 2 only
    assert series["test_top1"]["PEFD"] == log_columns(*pefd, column="test_top1") == [
        (1, 12, 10, 14), (2, 23, 20, 26), (3, 35, 30, 40)]
    assert series["train_mda"]["PEFD"] == pytest.approx(log_columns(*pefd, column="train_mda"))
    kd_run = runs / "vgg13-vgg8" / "kd-seed1"
    assert series["test_top1"]["KD"] == log_columns(kd_run, column="test_top1")
    assert teacher == {"test_top1": 74.5}
    # SP, CRD: no bar
    assert tables.cosine_series(tc, "vgg13:vgg8") == [
        ("Student", {"mean": 0.6, "std": None, "n": 1}),
        ("KD", {"mean": 0.5, "std": None, "n": 1}),
        ("PEFD", {"mean": pytest.approx(0.3), "std": pytest.approx(0.1414, abs=1e-4), "n": 2}),
    ]
    no_runs = tables.curve_series(tc, "resnet32x4:resnet8x4", ("test_top1",))
    assert no_runs == ({"test_top1": {}}, {"test_top1": None})
    # every figure is linked from the table and decodes; the MDA panel only where a run logged the
    # term
    assert sorted(p.name for p in linked_figures(md)) == sorted(os.listdir(folder)) == [
        "cosine.png", "resnet32x4-resnet8x4-curves.png", "vgg13-vgg8-curves.png",
        "wrn_40_2-wrn_16_2-curves.png"]
    assert "](figures/vgg13-vgg8-curves.png)" in md.read_text().split("## Figures")[1]
    assert drawn["vgg13-vgg8-curves.png"] == (2, [])
    assert drawn["wrn_40_2-wrn_16_2-curves.png"] == (1, [])
    assert drawn["resnet32x4-resnet8x4-curves.png"] == (1, [figures.NO_RUNS])
    # a panel per pair; resnet32x4 → resnet8x4 has no run
    assert drawn["cosine.png"] == (3, [figures.NO_RUNS])
    # ImageNet: top-1 and top-5 against epoch per pair and method, in the same folder as CIFAR's
    run = runs / "resnet34-resnet18" / "pefd-seed1"
    write_metrics(run, 60.0, teacher=73.3, top5=85.0, teacher_top5=91.4,
                  history=epochs([50, 60], top5=[80, 85]))
    assert tables.main(["--kind", "imagenet", "--runs", str(runs), "--pairs", "resnet34:resnet18",
                        "--seeds", "1", "--out", str(tmp_path / "out" / "imagenet.md"),
                        "--figures", str(folder)]) == 0
    tc = tables.TableConfig(runs=str(runs), pairs="resnet34:resnet18", seeds="1", kind="imagenet")
    series, teacher = tables.curve_series(tc, "resnet34:resnet18", ("test_top1", "test_top5"))
    assert series["test_top5"] == {"PEFD": log_columns(run, column="test_top5")}
    assert teacher["test_top5"] == 91.4
    assert [p.name for p in linked_figures(tmp_path / "out" / "imagenet.md")] == [
        "imagenet-resnet34-resnet18-curves.png"]
    assert drawn["imagenet-resnet34-resnet18-curves.png"] == (2, [])


def test_ablation_figures_are_figures_3_and_4_beside_the_papers_pefd(tmp_path, monkeypatch):
    import tables

    runs = tmp_path / "runs"
    drawn = drawn_figures(monkeypatch)
    for name, top1s in (("pefd", (74.0, 75.0)), ("pefd-q0", (73.0,)), ("pefd-q2", (73.5, 74.5)),
                        ("pefd-depth2", (72.0,)), ("pefd-gelu", (76.0,))):
        for seed, top1 in enumerate(top1s, 1):
            write_metrics(runs / "vgg13-vgg8" / f"{name}-seed{seed}", top1, cosine=0.1 * seed,
                          history=epochs([top1]))
    # unfinished: no point, never 0
    write_log(runs / "vgg13-vgg8" / "pefd-q4-seed1", epochs([99.0]))
    pairs = "vgg13:vgg8 resnet32x4:resnet8x4"
    variants = "q0 q2 q4 depth2 depth3 gelu"
    md = tmp_path / "ablations.md"
    folder = tmp_path / "figures"
    assert tables.main(["--kind", "ablations", "--runs", str(runs), "--pairs", pairs,
                        "--variants", variants, "--seeds", "1 2", "--out", str(md),
                        "--figures", str(folder)]) == 0
    tc = tables.TableConfig(runs=str(runs), pairs=pairs, variants=variants, seeds="1 2",
                            kind="ablations")
    points, paper = tables.ablation_series(tc, "vgg13:vgg8", "q")
    assert [(x, s["mean"], s["n"]) for x, s in points] == [(0, 73.0, 1), (2, 74.0, 2), (3, 74.5, 2)]
    assert points[1][1]["std"] == pytest.approx(0.7071, abs=1e-4)
    assert paper == (3, 74.35, 0.12)  # Table 4's PEFD
    points, paper = tables.ablation_series(tc, "vgg13:vgg8", "proj_depth")
    assert [(x, s["mean"]) for x, s in points] == [(1, 74.5), (2, 72.0)]
    assert paper == (1, 74.35, 0.12)
    assert tables.ablation_series(tc, "resnet32x4:resnet8x4", "q") == ([], (3, 76.08, 0.33))
    # a pair the paper has no number for
    assert tables.ablation_series(tc, "resnet20:resnet8", "q") == ([], None)
    # Figure 2(b)'s bars, every finished row
    assert [label for label, _ in tables.cosine_series(tc, "vgg13:vgg8")] == [
        "no projector", "q=2", "q=3 (PEFD)", "depth 2", "GELU"]
    assert sorted(p.name for p in linked_figures(md)) == [
        "ablations-cosine.png", "ablations-depth.png", "ablations-q.png"]
    assert drawn["ablations-q.png"] == (2, [figures.NO_RUNS])
    assert drawn["ablations-depth.png"] == (2, [figures.NO_RUNS])


def test_bench_figure_and_a_python_without_matplotlib(tmp_path, monkeypatch, capsys):
    import tables

    report = {
        "device": "NVIDIA H200", "torch": "2.14.1", "batch_size": 64,
        "pairs": [{
            "teacher": "vgg13", "student": "vgg8",
            "rows": [
                {"loop": "classic", "cached": False, "images_per_s": 5000.0, "vs_classic": 1.0,
                 "mfu": 0.01},
                {"loop": "ours, CUDA graph, teacher live", "cached": False, "images_per_s": None,
                 "mfu": None, "skipped": "needs CUDA"},
                {"loop": "ours, CUDA graph, teacher cached", "cached": True,
                 "images_per_s": 60000.0, "mfu": None},
            ],
        }],
    }
    bench_json = tmp_path / "bench.json"
    folder = tmp_path / "figures"
    bench_json.write_text(json.dumps(report))
    assert tables.bench_series(report) == {"vgg13 → vgg8": [
        ("classic", 5000.0, 0.01, None),
        ("ours, CUDA graph, teacher live", None, None, "needs CUDA"),
        ("ours, CUDA graph, teacher cached", 60000.0, None, None),
    ]}
    bench = ["--kind", "bench", "--bench", str(bench_json), "--figures", str(folder)]
    assert tables.main(bench) == 0
    assert decoded_pngs(folder / "bench.png") and os.listdir(folder) == ["bench.png"]
    no_report = ["--kind", "bench", "--bench", str(tmp_path / "none.json"),
                 "--figures", str(folder)]
    assert tables.main(no_report) == 2
    # a failed write (a full disk) leaves neither a PNG nor its temporary file
    import matplotlib.figure
    def full_disk(self, path, **kwargs):
        open(path, "wb").write(b"half a PNG")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    os.remove(folder / "bench.png")
    capsys.readouterr()
    assert tables.main(bench) == 2 and os.listdir(folder) == []
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    # without matplotlib (`import matplotlib` raises ImportError): make bench (a GPU node's python)
    # skips its figure in one line; the tables stop in one line
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert tables.main(bench) == 0 and os.listdir(folder) == []
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "no bench figure" in out
    assert "pip install -r requirements.txt" in out and not err
    md = tmp_path / "out" / "cifar100.md"
    assert tables.main(["--runs", str(tmp_path), "--out", str(md), "--figures", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -r requirements.txt" in err
    assert not md.parent.exists()
