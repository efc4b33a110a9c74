"""Small image sets in the standard IDX format, written by the tests themselves, so that
the real loading code (bnrepro.data) runs on a machine that has no dataset installed."""

import dataclasses
import gzip
import struct
from pathlib import Path
from typing import Dict

import numpy as np

from bnrepro import data


def idx_bytes(arr: np.ndarray) -> bytes:
    """One IDX file: two zero bytes, the type code, the rank, big-endian sizes, the data."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write_dir(directory: Path, arrays: Dict[str, np.ndarray], gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for part, stem in data.FILES.items():
        raw = idx_bytes(arrays[part])
        if gz:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return directory


def learnable_arrays(n_train: int, n_test: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """28x28 uint8 images whose class (0..9) sets which horizontal band is bright, plus
    noise: a network can learn them in a few steps, as the smoke tests need."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 80, (n, 28, 28)).astype(np.int32)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 4 + 2 * c, :] += 170
        out[f"{split}_images"] = images.clip(0, 255).astype(np.uint8)
        out[f"{split}_labels"] = labels
    return out


def install_fake(monkeypatch, name: str, directory: Path, n_train: int = 768, n_test: int = 256) -> Path:
    """Write a small learnable set to ``directory`` and make ``name``'s spec expect exactly
    it (counts and checksums), for the duration of one test."""
    arrays = learnable_arrays(n_train, n_test)
    write_dir(directory, arrays)
    sha = {p: data.array_sha256(data._convert(p, a)) for p, a in arrays.items()}
    spec = dataclasses.replace(data.SPECS[name], sha256=sha, n_train=n_train, n_test=n_test, system_dir=None)
    monkeypatch.setitem(data.SPECS, name, spec)
    monkeypatch.setattr(data, "_TENSORS", {})
    return directory
