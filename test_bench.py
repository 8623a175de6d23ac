"""Tests for bench.py: its tiny CPU version runs every loop it measures, and the GPU peaks it
computes MFU with."""
import json
import sys

import pytest
import torch

import projkd


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
    assert "| classic (DataLoader + PIL, fp32, .item() per step) |" in text
    assert "skipped: needs CUDA" in text
    # every row says how it ran; cuDNN's and cuBLAS's switches mean nothing on the CPU, so a CPU row
    # lists none
    assert all(row["flags"] == {} for row in pair["rows"] if row["images_per_s"])
    assert "| – (CPU) |" in text and "cudnn" not in text


def test_bench_rows_on_cuda_name_the_switches_they_ran_with(monkeypatch):
    import bench
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert bench.backend_flags(torch.device("cuda")) == {
        "cudnn_benchmark": True, "cudnn_deterministic": torch.backends.cudnn.deterministic,
                                                         "matmul_tf32": False,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32}
    assert bench.backend_flags(torch.device("cpu")) == {}


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                       ("NVIDIA GH200 480GB", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", None),
                                       ("NVIDIA L4", None)])
def test_bench_peak_of_each_gpu_and_none_for_a_mig_slice(monkeypatch, name, peak):
    import bench
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert bench.bf16_peak_flops(torch.device("cuda")) == peak


@pytest.mark.parametrize("package", ["Pillow", "torchvision"])
def test_bench_without_torchvision_or_pillow_is_one_line_and_writes_nothing(
        tmp_path, monkeypatch, capsys, package):
    # their imports fail, as where they are not installed (even if an earlier test imported them)
    modules = {"Pillow": ["PIL"], "torchvision": ["torchvision", "torchvision.transforms"]}[package]
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "results"
    assert projkd.main(["bench", "--device", "cpu", "--out-dir", str(out), "--steps", "1",
                        "--classic-steps", "1", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"projkd: error: bench's classic loop needs {package}, which ")
    assert err.count("\n") == 1
    assert f"pip install {package}" in err and "Traceback" not in err
    assert not out.exists()
