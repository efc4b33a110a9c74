"""Build, cache and load the fused CPU kernels of ``_kernels.c`` on first use.

The package installs with pip and needs no compiler at install time. The first training
step on CPU that can use the kernels compiles ``_kernels.c`` with the system C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``; a few seconds) into a cache directory
(``$BATCHNORM_CACHE``, else ``$XDG_CACHE_HOME/batchnorm``, else ``~/.cache/batchnorm``),
keyed by a hash of the source, the flags, the compiler and the CPU, and written
atomically. Without a compiler, or with ``BATCHNORM_KERNELS=0`` in the environment,
everything runs on torch operations instead; :func:`status` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels.c")
_FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared", "-pthread", "-std=c11"]
# Tried in order until one builds. OpenMP first: the kernels then share torch's own OpenMP
# runtime (see _kernels.c); without it (a compiler with no OpenMP) they fall back to a small
# pthread pool of their own. -march: $BATCHNORM_MARCH, default native (e.g. "x86-64-v3" for a
# cache shared by machines of one family); a compiler that rejects it builds without.
_MARCH = [f"-march={os.environ.get('BATCHNORM_MARCH', 'native')}"]
_VARIANTS = [_MARCH + ["-fopenmp"], _MARCH, ["-fopenmp"], []]
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_status: Optional[str] = None  # None: not tried yet


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> str:
    if os.environ.get("BATCHNORM_CACHE"):
        return os.environ["BATCHNORM_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "batchnorm")


def _build(cc: str) -> str:
    with open(_SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    errors = []
    for extra in _VARIANTS:
        flags = _FLAGS + extra
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_key().encode()])).hexdigest()[:16]
        directory = _cache_dir()
        target = os.path.join(directory, f"bnkernels-{key}.so")
        if os.path.exists(target):
            return target
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, _SOURCE, "-o", tmp, "-lm"], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: a concurrent builder or a crash never leaves half a library
                return target
            errors.append(f"{cc} {' '.join(extra)} failed: {proc.stderr.strip()[-1000:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suf in ("f32", "f64"):
        getattr(lib, f"bn_stats_{suf}").argtypes = [p, i64, i64, i64, i, p, p, i]
        getattr(lib, f"bn_stats_{suf}").restype = i
        getattr(lib, f"bn_affine_{suf}").argtypes = [p, p, i64, i64, i64, i, p, p, i]
        getattr(lib, f"bn_affine_{suf}").restype = None
        getattr(lib, f"bn_sums_{suf}").argtypes = [p, p, i64, i64, i64, i, p, p, p, i]
        getattr(lib, f"bn_sums_{suf}").restype = i
        getattr(lib, f"bn_dx_{suf}").argtypes = [p, p, p, i64, i64, i64, i, p, p, p, i]
        getattr(lib, f"bn_dx_{suf}").restype = None
        d = ctypes.c_double
        getattr(lib, f"bn_train_fwd_{suf}").argtypes = [p, p, i64, i64, i64, i, p, p, d, p, p, p, p, p, d, p,
                                                        p, p, d, d, p, i]
        getattr(lib, f"bn_train_fwd_{suf}").restype = i
        getattr(lib, f"bn_train_bwd_{suf}").argtypes = [p, p, p, i64, i64, i64, i, p, p, p, p, p, p, i]
        getattr(lib, f"bn_train_bwd_{suf}").restype = i
        getattr(lib, f"bn_masked_fwd_{suf}").argtypes = [p, p, p, i64, i64, i64, p, p, d, p, p, p, i]
        getattr(lib, f"bn_masked_fwd_{suf}").restype = i64
        getattr(lib, f"bn_masked_bwd_{suf}").argtypes = [p, p, p, p, i64, i64, i64, p, p, p, i64, p, p, i]
        getattr(lib, f"bn_masked_bwd_{suf}").restype = None
        getattr(lib, f"bn_update_running_{suf}").argtypes = [p, p, i64, i64, d, p, p, d, p, i]
        getattr(lib, f"bn_update_running_{suf}").restype = i


def kernels() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first call; None if unavailable."""
    global _lib, _status
    if _status is not None:
        return _lib
    with _lock:
        if _status is not None:
            return _lib
        if os.environ.get("BATCHNORM_KERNELS", "1") == "0":
            _status = "disabled by BATCHNORM_KERNELS=0"
            return None
        cc = _compiler()
        if cc is None:
            _status = "no C compiler found ($CC, cc, gcc, clang): using torch operations"
            return None
        try:
            lib = ctypes.CDLL(_build(cc))
            _declare(lib)
        except Exception as e:  # a broken toolchain must not break training: fall back
            _status = f"build failed, using torch operations: {e}"
            return None
        _lib = lib
        _status = "fused CPU kernels loaded"
        return _lib


def status() -> str:
    """Whether the fused CPU kernels are in use, and if not, why (builds them if needed)."""
    kernels()
    return str(_status)
