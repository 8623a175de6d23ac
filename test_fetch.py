"""Tests for fetch.py: fetch-teachers against a local HTTP server (a cut download resumed, a
refusal, offline, by hand) and fetch-weights' offline line and provenance."""
import json
import os

import pytest
import torch

import fetch
import projkd
from conftest import imagenet_args, synthetic_args
from models import MODELS


def test_torchvision_weights_offline_name_the_file(tmp_path, capsys, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    out = tmp_path / "resnet34.pt"
    assert projkd.main(["fetch-weights", "--arch", "resnet34", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "resnet34-b627a593.pth" in err and str(out) in err
    assert err.count("\n") == 1 and not out.exists()
    assert projkd.main(["fetch-weights", "--arch", "mobilenet_v1"]) == 2
    assert "fetch-weights takes --arch resnet18 | resnet34" in capsys.readouterr().err
    assert projkd.main(imagenet_args(tmp_path, "--teacher", "resnet34", "--student", "resnet18",
                                     "--run-dir", str(tmp_path / "run"))) == 2
    err = capsys.readouterr().err
    assert ("no teacher checkpoint at checkpoints/imagenet/resnet34.pt: "
            "get torchvision's resnet34-b627a593.pth") in err


# --synthetic-size 128: 32 test images
TEACHER_ARGS = ["--dataset", "synthetic", "--synthetic-size", "128", "--device", "cpu"]


def measured_top1(tmp_path, arch, ckpt):
    out = tmp_path / "m.json"
    args = ["eval", "--arch", arch, "--ckpt", str(ckpt), "--out", str(out), *TEACHER_ARGS]
    assert projkd.main(args) == 0
    return json.loads(out.read_text())["top1"]


@pytest.fixture(scope="module")
def teachers_archive(tmp_path_factory):
    """cifar_teachers.tar in mdistiller's layout, of small generated checkpoints in RepDistiller's
    format (a dict whose 'model' is the state_dict), for 10 classes; and the bytes of resnet8's
    member."""
    folder = tmp_path_factory.mktemp("archive")
    for arch in ("resnet8", "resnet14"):
        torch.manual_seed(0)
        member = folder / "cifar_teachers" / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
        member.parent.mkdir(parents=True)
        model = MODELS[arch](num_classes=10)
        checkpoint = {"epoch": 240, "model": model.state_dict(), "best_acc": torch.tensor(9.5)}
        torch.save(checkpoint, member)
    import tarfile
    with tarfile.open(folder / "cifar_teachers.tar", "w") as tar:
        tar.add(folder / "cifar_teachers", "cifar_teachers")
    member = (folder / "cifar_teachers" / "resnet8_vanilla" / "ckpt_epoch_240.pth").read_bytes()
    return folder / "cifar_teachers.tar", member


@pytest.fixture
def teachers_server(teachers_archive, monkeypatch):
    """The archive on an HTTP server at 127.0.0.1 that answers Range requests (206), as GitHub's
    does; `cut` responses stop half-way through the body they announced. Yields (url, state):
    state['ranges'] lists each request's Range."""
    import http.server
    import threading

    payload = teachers_archive[0].read_bytes()
    state = {"ranges": [], "cut": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked = self.headers.get("Range")
            state["ranges"].append(asked)
            start = int(asked[len("bytes="):-1]) if asked else 0
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(payload) - start))
            if start:
                self.send_header("Content-Range",
                                 f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            self.end_headers()
            body = payload[start:]
            if state["cut"]:
                state["cut"] -= 1
                body = body[:len(body) // 2]
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    # a proxy named in the environment would stand between urllib and 127.0.0.1
    proxies = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
    for proxy in proxies:
        monkeypatch.delenv(proxy, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/cifar_teachers.tar", state
    server.shutdown()
    server.server_close()


def test_fetch_teachers_installs_only_a_verified_teacher_and_resumes_a_cut_download(
        tmp_path, teachers_archive, teachers_server, monkeypatch, capsys):
    import hashlib

    import tables

    url, state = teachers_server
    member = teachers_archive[1]
    (tmp_path / "resnet8.pth").write_bytes(member)
    top1 = measured_top1(tmp_path, "resnet8", tmp_path / "resnet8.pth")
    monkeypatch.setattr(fetch, "PUBLISHED_TEACHERS", {"resnet8": top1 + 0.1, "resnet14": top1 + 30})
    out = tmp_path / "ckpt"
    archive = tmp_path / "dl" / "cifar_teachers.tar"
    command = ["fetch-teachers", "--url", url, "--out-dir", str(out), "--archive", str(archive),
               *TEACHER_ARGS]
    capsys.readouterr()
    # the connection closes half-way: one line, nothing installed, the bytes that came kept for the
    # rerun
    state["cut"] = 1
    assert projkd.main([*command, "--arch", "resnet8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"projkd: error: downloading {url} failed (the connection closed after " in err
    assert f"MB that arrived are kept in {archive}.part: the same command resumes" in err
    assert not out.exists() or os.listdir(out) == []
    half = os.path.getsize(f"{archive}.part")
    assert 0 < half < teachers_archive[0].stat().st_size and not archive.exists()
    # the rerun asks for the rest, checks the teacher and installs it with its provenance; resnet14
    # stays in the tar
    assert projkd.main([*command, "--arch", "resnet8"]) == 0
    assert state["ranges"] == [None, f"bytes={half}-"]
    assert archive.read_bytes() == teachers_archive[0].read_bytes()
    # no temporary file left either
    assert sorted(os.listdir(out)) == ["resnet8.json", "resnet8.pt"]
    assert (out / "resnet8.pt").read_bytes() == member  # the archive's file, byte for byte
    record = json.loads((out / "resnet8.json").read_text())
    assert record["sha256"] == hashlib.sha256(member).hexdigest()
    assert record["how"] == "fetched and verified"
    assert record["source"] == url
    assert record["member"] == "cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth"
    assert (record["top1"], record["published_top1"]) == (top1, top1 + 0.1)
    assert record["evaluation"]["images"] == 32
    assert "verified ->" in capsys.readouterr().out
    # a teacher whose accuracy is not the published one: refused with both numbers, the archive
    # reused, not fetched
    assert projkd.main([*command, "--arch", "resnet8 resnet14"]) == 2
    captured = capsys.readouterr()
    kept = f"resnet8: {out / 'resnet8.pt'} is in place, kept as it is (fetched and verified)"
    assert kept in captured.out
    assert captured.err.count("\n") == 1
    assert (f"resnet14 from {url} (cifar_teachers/resnet14_vanilla/ckpt_epoch_240.pth) "
            "tests at top-1 ") in captured.err
    assert (f"but RepDistiller's resnet14 has {top1 + 30:.2f}%: more than 0.1 points apart, "
            f"so it is not installed at {out / 'resnet14.pt'}") in captured.err
    assert sorted(os.listdir(out)) == ["resnet8.json", "resnet8.pt"] and len(state["ranges"]) == 2
    # a run with the fetched teacher carries its provenance, and so does the table's conditions line
    run_dir = tmp_path / "runs" / "resnet8-resnet8" / "kd-seed1"
    args = synthetic_args("--teacher", "resnet8", "--teacher-ckpt", str(out / "resnet8.pt"),
                          "--student", "resnet8", "--method", "kd", "--run-dir", str(run_dir))
    assert projkd.main(args) == 0
    provenance = json.loads((run_dir / "metrics.json").read_text())["teacher_provenance"]
    assert provenance == {**record, "checkpoint": str(out / "resnet8.pt")}
    assert tables.main(["--runs", str(tmp_path / "runs"), "--pairs", "resnet8:resnet8",
                        "--seeds", "1", "--out", str(tmp_path / "t.md")]) == 0
    conditions = (tmp_path / "t.md").read_text()
    sha = record["sha256"][:12]
    assert f"teachers: resnet8 (fetched and verified, sha256 {sha});" in conditions


def test_fetch_teachers_offline_and_by_hand(tmp_path, teachers_archive, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on: as offline as it gets, at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/cifar_teachers.tar"
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    out = tmp_path / "ckpt"
    archive = tmp_path / "dl" / "cifar_teachers.tar"
    assert projkd.main(["fetch-teachers", "--arch", "vgg13", "--url", closed,
                        "--out-dir", str(out), "--archive", str(archive)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"downloading {closed} failed (" in err
    assert (f"get cifar_teachers.tar from there by other means and put it at {archive} "
            "(or pass --url PATH), or train the teachers here (make TEACHERS_FROM=train)") in err
    assert not out.exists() and not os.path.exists(f"{archive}.part")
    # nothing arrived: no record of where it would have come from
    assert not os.path.exists(f"{archive}.source")
    # a checkpoint copied in by hand: the same check, by one command; then checked again where it
    # lies
    mine = tmp_path / "my_resnet8.pth"
    mine.write_bytes(teachers_archive[1])
    top1 = measured_top1(tmp_path, "resnet8", mine)
    hand = ["fetch-teachers", "--arch", "resnet8", "--out-dir", str(out), *TEACHER_ARGS]
    monkeypatch.setattr(fetch, "PUBLISHED_TEACHERS", {"resnet8": top1 - 0.11})
    assert projkd.main([*hand, "--ckpt", str(mine)]) == 2
    assert "copy it into place unchecked to use it anyway" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(fetch, "PUBLISHED_TEACHERS", {"resnet8": top1 - 0.1})
    assert projkd.main([*hand, "--ckpt", str(mine)]) == 0
    record = json.loads((out / "resnet8.json").read_text())
    assert record["how"] == "copied in by hand, verified"
    assert (record["source"], record["member"]) == (str(mine), None)
    how = projkd.teacher_provenance(str(out / "resnet8.pt"))["how"]
    assert how == "copied in by hand, verified"
    assert projkd.main([*hand, "--ckpt", str(mine)]) == 2  # never over an installed one
    assert f"{out / 'resnet8.pt'} exists already: delete it first" in capsys.readouterr().err
    monkeypatch.setattr(fetch, "PUBLISHED_TEACHERS", {"resnet8": top1 + 0.11})
    assert projkd.main([*hand, "--ckpt", str(out / "resnet8.pt")]) == 2
    err = capsys.readouterr().err
    assert (f"tests at top-1 {top1:.2f}% on synthetic, "
            f"but RepDistiller's resnet8 has {top1 + 0.11:.2f}%") in err
    assert "so it is not recorded as verified" in err and err.count("\n") == 1
    # without a record that describes it, a teacher's provenance is its path and sha256, and says so
    (out / "resnet8.pt").write_bytes(teachers_archive[1] + b"\0")
    provenance = projkd.teacher_provenance(str(out / "resnet8.pt"))
    assert provenance["how"] == "put in place by hand or trained here"
    assert "describes another file" in provenance["note"]
    assert provenance["sha256"] == projkd.file_sha256(out / "resnet8.pt")


def test_fetch_weights_records_its_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "torchvision_state_dict",
                        lambda arch, weights, put_at: {"w": torch.zeros(2)})
    out = tmp_path / "resnet34.pt"
    assert projkd.main(["fetch-weights", "--arch", "resnet34", "--out", str(out)]) == 0
    provenance = projkd.teacher_provenance(str(out))
    assert provenance["how"] == "fetched from torchvision (IMAGENET1K_V1, hash-checked)"
    assert provenance["sha256"] == projkd.file_sha256(out)


@pytest.mark.parametrize("top1,published,ok", [
    # 10 images either way
    (100 * 7551 / 10000, 75.61, True), (100 * 7571 / 10000, 75.61, True), (75.61, 75.61, True),
    # 11 images
    (100 * 7550 / 10000, 75.61, False), (100 * 7572 / 10000, 75.61, False),
    # RepDistiller #29: the resnet110 that tested at 70.27%
    (100 * 7027 / 10000, 74.31, False),
])
def test_a_teacher_matches_its_published_top1_within_a_tenth_of_a_point(top1, published, ok):
    assert fetch.matches_published(top1, published) is ok
