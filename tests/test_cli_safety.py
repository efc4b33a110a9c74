"""bnrepro's safety and error contract: checkpoints that cannot run code or resume silently
when damaged, outputs checked before training, data sources that never fall back
silently, one-line errors with exit status 2, downloads that give up and try the next
mirror, workers that die with the CLI, results reused only for their own config, and
output files with the user's umask."""

import gzip
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bnrepro import data, runtime
from bnrepro.__main__ import main
from idx_util import install_fake, learnable_arrays, write_dir

REPO = Path(__file__).resolve().parents[1]
F1 = ["figure1", "--steps", "20", "--eval-every", "10", "--checkpoint-every", "10", "--seeds", "1",
      "--workers", "1", "--quiet"]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# -- checkpoints ------------------------------------------------------------------------------

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with_header(payload: bytes) -> bytes:
    import hashlib
    return runtime._CKPT_MAGIC + hashlib.sha256(payload).digest() + payload


def test_checkpoint_round_trip_and_mode(tmp_path):
    state = {"step": 3, "model": {"w": torch.randn(4)}, "generator": torch.Generator().get_state(),
             "config": {"lr": 0.5, "data_dir": None, "sizes": (1, 2)}, "loss": [0.1, float("nan")]}
    runtime.save_checkpoint(tmp_path / "c.pt", state)
    back = runtime.load_checkpoint(tmp_path / "c.pt")
    assert back["step"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert back["config"] == state["config"]


def test_crafted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"step": 1, "x": Evil(marker)}, buf)  # pickles the os.system call
    for name, raw in (("plain.pt", buf.getvalue()), ("signed.pt", _with_header(buf.getvalue()))):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(runtime.CheckpointError, match=f"checkpoint {tmp_path / name}: "):
            runtime.load_checkpoint(tmp_path / name)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("empty", "is empty"),
    ("truncated", "damaged"),
    ("flip", "damaged"),
    ("random", "not a bnrepro checkpoint"),
    ("foreign", "not a bnrepro checkpoint"),
    ("not-a-dict", "expected a dict"),
])
def test_damaged_checkpoint_is_one_line_error_naming_the_file(tmp_path, capsys, damage, message):
    out = tmp_path / "run"
    assert main(F1 + ["--out", str(out)]) == 0
    capsys.readouterr()
    ck = out / "checkpoints" / "baseline-seed0.pt"
    raw = ck.read_bytes()
    if damage == "empty":
        raw = b""
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        i = len(raw) - 100
        raw = raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1:]
    elif damage == "random":
        raw = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8).tobytes()
    elif damage == "foreign":
        buf = io.BytesIO()
        torch.save({"step": 10}, buf)
        raw = buf.getvalue()
    else:
        buf = io.BytesIO()
        torch.save([1, 2], buf)
        raw = _with_header(buf.getvalue())
    ck.write_bytes(raw)
    assert main(F1 + ["--out", str(out), "--resume"]) == 2
    one_line_error(capsys, str(ck), message)


def test_debug_flag_shows_the_traceback(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "baseline-seed0.pt").write_bytes(b"junk")
    with pytest.raises(runtime.CheckpointError):
        main(F1 + ["--out", str(out), "--resume", "--debug"])


# -- outputs, flags -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["file", "under-a-file", "pseudo-fs"])
def test_unwritable_out_is_refused_before_training(tmp_path, capsys, kind):
    f = tmp_path / "afile"
    f.write_text("x")
    out = {"file": f, "under-a-file": f / "sub", "pseudo-fs": Path("/proc/self/bnrepro-out")}[kind]
    t0 = time.perf_counter()
    assert main(F1 + ["--out", str(out)]) == 2
    assert time.perf_counter() - t0 < 10  # refused at once, not after training
    one_line_error(capsys, f"--out {out}")


def test_unwritable_out_directory_is_refused(tmp_path, capsys, monkeypatch):
    # root ignores mode bits, so simulate the kernel's refusal where the probe file is made
    import tempfile

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(F1 + ["--out", str(tmp_path / "ro")]) == 2
    one_line_error(capsys, "not a writable directory (Permission denied)")


def test_resume_without_a_run_directory(tmp_path, capsys):
    assert main(F1 + ["--out", str(tmp_path / "never"), "--resume"]) == 2
    one_line_error(capsys, "no such directory to resume from")


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--init-std", "inf"), ("--lr", "nan"),
                                         ("--init-std", "-inf")])
def test_non_finite_rates_are_refused(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["figure1", f"{flag}={value}"])
    assert exc.value.code == 2
    err = one_line_error(capsys, flag)
    assert "finite" in err or "> 0" in err


# -- data ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "empty", "a-file"])
def test_named_data_dir_never_falls_back(tmp_path, capsys, kind):
    d = tmp_path / "data"
    if kind == "empty":
        d.mkdir()
    elif kind == "a-file":
        d.write_text("x")
    assert main(F1 + ["--data-dir", str(d), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, f"data directory {d}")
    assert not (tmp_path / "o" / "metrics.json").exists()


def _spec_for(arrays, monkeypatch, name="tiny"):
    sha = {p: data.array_sha256(data._convert(p, a)) for p, a in arrays.items()}
    spec = data.Spec(name, ("http://127.0.0.1:1/",), sha, None, n_train=len(arrays["train_labels"]),
                     n_test=len(arrays["test_labels"]))
    monkeypatch.setitem(data.SPECS, name, spec)


@pytest.mark.parametrize("fault, file, message", [
    ("count", "train-images-idx3-ubyte.gz", "has shape (40, 28, 28), expected (50, 28, 28)"),
    ("label", "train-labels-idx1-ubyte.gz", "labels from 0 to 12, expected 0..9"),
    ("checksum", "t10k-images-idx3-ubyte.gz", "test_images checksum mismatch"),
    ("swapped", "train-images-idx3-ubyte.gz", "are the train and test files swapped?"),
])
def test_every_data_error_names_the_file(tmp_path, monkeypatch, fault, file, message):
    good = learnable_arrays(50, 20)
    _spec_for(good, monkeypatch)
    bad = dict(good)
    if fault == "count":
        bad["train_images"] = good["train_images"][:40]
    elif fault == "label":
        bad["train_labels"] = good["train_labels"].copy()
        bad["train_labels"][5] = 12
    elif fault == "checksum":
        bad["test_images"] = good["test_images"].copy()
        bad["test_images"][0, 0, 0] ^= 1
    else:
        bad["train_images"], bad["test_images"] = good["test_images"], good["train_images"]
        bad["train_labels"], bad["test_labels"] = good["test_labels"], good["train_labels"]
    d = write_dir(tmp_path / fault, bad)
    with pytest.raises(data.DataError) as exc:
        data.load("tiny", data_dir=str(d), allow_download=False)
    assert str(exc.value).startswith(str(d / file) + ": ") and message in str(exc.value)


def test_data_error_in_cli_is_one_line(tmp_path, monkeypatch, capsys):
    d = install_fake(monkeypatch, "fashion-mnist", tmp_path / "fm")
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x05abcde"))
    argv = ["inception", "--steps", "2", "--workers", "1", "--quiet", "--data-dir", str(d),
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    one_line_error(capsys, str(d / "t10k-labels-idx1-ubyte.gz"), "expected (256,)")


# -- downloads ----------------------------------------------------------------------------

@pytest.fixture
def faulty_server(tmp_path):
    """A server on 127.0.0.1 whose /die/ paths promise a body and drop the connection
    halfway, whose /trickle/ paths send a byte every 0.2 s, and whose /ok/ paths serve
    the files of the directory it returns."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            kind, _, name = self.path.strip("/").partition("/")
            path = root / name
            body = path.read_bytes() if path.is_file() else b""
            if kind == "ok" and body:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(max(len(body), 1000)))
            self.end_headers()
            if kind == "die":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            for _ in range(200):  # trickle
                try:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_dropped_transfer_tries_the_next_mirror(faulty_server, tmp_path, monkeypatch):
    root, url = faulty_server
    arrays = learnable_arrays(30, 10)
    _spec_for(arrays, monkeypatch)
    write_dir(root, arrays)
    ds = data.load("tiny", cache=tmp_path / "cache", base_urls=(url + "die/", url + "ok/"))
    np.testing.assert_array_equal(ds.train_images, arrays["train_images"])
    with pytest.raises(data.DataError, match="download failed .*closed after"):
        data.load("tiny", cache=tmp_path / "cache2", base_urls=(url + "die/",))


def test_trickling_server_hits_the_overall_deadline(faulty_server, tmp_path):
    root, url = faulty_server
    (root / "f.gz").write_bytes(b"x" * 10)
    t0 = time.perf_counter()
    with pytest.raises(data.DataError, match="longer than 1 s"):
        data.download(url + "trickle/f.gz", tmp_path / "f.gz", lambda d, n: None, timeout=5, deadline=1.0)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "f.gz").exists()


# -- workers -------------------------------------------------------------------------------

def _children(pid: int):
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids |= {int(k) for k in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_end_when_the_cli_is_killed(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    args = [sys.executable, "-m", "bnrepro", "figure1", "--steps", "1000000", "--seeds", "1", "--workers", "2",
            "--checkpoint-every", "50", "--quiet", "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ck = tmp_path / "o" / "checkpoints"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(list(ck.glob("*.pt"))) < 2:
            time.sleep(0.1)
        assert len(list(ck.glob("*.pt"))) == 2, "both workers should be training"
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 15
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers)
        stamps = {p: p.stat().st_mtime_ns for p in ck.glob("*.pt")}
        time.sleep(1.5)
        assert {p: p.stat().st_mtime_ns for p in ck.glob("*.pt")} == stamps  # nobody rewrites them
    finally:
        if proc.poll() is None:
            proc.kill()


# -- small-batch reuse, file modes ------------------------------------------------------------

def test_small_batch_reuses_results_only_of_the_same_config(tmp_path, fashion_dir):
    out = tmp_path / "sb"
    argv = ["small-batch", "--batch-sizes", "8", "--methods", "bn", "--seeds", "1", "--workers", "1",
            "--data-dir", str(fashion_dir), "--out", str(out), "--quiet"]
    assert main(argv + ["--epochs", "0.05"]) == 0
    first = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert main(argv + ["--epochs", "0.05", "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert again == first  # same config: the stored result, wall time included
    assert main(argv + ["--epochs", "0.1", "--resume"]) == 0
    longer = json.loads((out / "metrics.json").read_text())["runs"][0]
    assert longer["steps"] == int(0.1 * 768) // 8 != first["steps"]  # retrained for the new config


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        runtime.write_json(tmp_path / "m.json", {"a": 1})
        runtime.atomic_write_text(tmp_path / "r.md", "x")
    finally:
        os.umask(old)
    for name in ("m.json", "r.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


# -- records come from clean trees ----------------------------------------------------------

def test_records_refused_from_a_dirty_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "REPO", tmp_path)
    monkeypatch.setattr(runtime, "git_commit", lambda: "0123abc-dirty")
    out = tmp_path / "records" / "figure1"
    assert main(F1 + ["--out", str(out)]) == 2
    one_line_error(capsys, "uncommitted changes", "--allow-dirty")
    assert not (out / "metrics.json").exists()
    assert main(F1 + ["--out", str(tmp_path / "elsewhere")]) == 0  # outside records/: allowed
    assert main(F1 + ["--out", str(out), "--allow-dirty"]) == 0
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    assert prov["allow_dirty"] is True and prov["git_commit"] == "0123abc-dirty"
