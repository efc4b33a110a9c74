"""Build, cache and load the fused CPU kernels of ``_kernels.c`` on first use.

The package installs with pip and needs no compiler at install time. The first training
step on CPU that can use the kernels compiles ``_kernels.c`` (a few seconds) into a cache;
later processes load it from there. With ``BATCHNORM_KERNELS=0``, without a usable
compiler, or when anything below fails, everything runs on torch operations instead, and
:func:`status` says which file was loaded, or why none was.

Instruction set, chosen when loading: on x86-64 the kernels are built for the best
micro-architecture level this CPU supports (``x86-64-v4``: AVX-512, ``x86-64-v3``: AVX2 and
FMA, ``x86-64-v2``, ``x86-64``; read from /proc/cpuinfo), one cached library per level, so
the key carries no CPU flags and machines of several generations can share a cache; only
the level a CPU needs is compiled. ``BATCHNORM_MARCH`` overrides the choice: a level (one
this CPU lacks is refused, and the status says so), ``native`` (exactly this CPU: its flags
then join the key) or any other ``-march`` value, passed on unchecked. Elsewhere the
compiler's default target is used. The status names the level and what the loaded binary
says it carries (AVX-512, AVX2+FMA or portable loops; OpenMP or its own thread pool).

Compiler: ``$CC``, split as a shell would split it (``CC='ccache gcc'``; an optimization
level in it, ``CC='gcc -O0'``, replaces our ``-O3``; our other flags follow its words). A
``$CC`` naming no program on PATH turns the kernels off, and the status names it: it is
never replaced by another compiler. Without ``$CC``: the first of cc, gcc, clang. The whole
build (compiler runs, and waiting for another process that is building the same file) has
``$BATCHNORM_CC_TIMEOUT`` seconds (default 120); past that the compiler and its children are
killed and training goes on with torch operations.

Cache: the root is ``$BATCHNORM_CACHE``, else ``$XDG_CACHE_HOME/batchnorm``, else
``~/.cache/batchnorm``; each user's files live in ``<root>/u<uid>/`` (mode 0700), so a root
made world-writable and sticky (1777, as /tmp) can serve several users. A build is
``bnkernels-<key>.so`` (mode 0755; the key hashes the source, the compiler command, its
flags and its version) beside ``bnkernels-<key>.so.sha256``, the SHA-256 of its content
in ``sha256sum`` format, written when it was built. Anyone can compute a key, so the name
proves nothing: a cached file is loaded only when it, its record and their directory are
owned by this user or root and not writable by group or others, and its content matches the
record. Everything is checked on open file descriptors and the library is loaded through
the descriptor it was hashed from (``/proc/self/fd``), before any of it is mapped: a
truncated library can kill the process with SIGBUS when mapped, a planted one runs its
constructors. A file failing a check is rebuilt; a directory failing one (another owner, a
symlink, no permission) is not used: the kernels are then built in a private temporary
directory and not cached. A build works in its own temporary directory inside the cache
(also the compiler's TMPDIR), removed on every way out that the process lives through
(failure, timeout, exception); one left by a killed process is removed by the next build
once it is older than 10 minutes (or than the timeout plus a minute, if that is longer).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no build lock (concurrent first runs then build twice)
    fcntl = None  # type: ignore[assignment]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels.c")
# (-fno-math-errno: the kernels never read errno, and with it sqrt cannot vectorize)
_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared", "-pthread", "-std=c11"]
# Tried in order after the instruction-set flags, until one builds. OpenMP first: the kernels
# then share torch's own OpenMP runtime (see _kernels.c); without it (a compiler with no
# OpenMP) they fall back to a small pthread pool of their own.
_VARIANTS = [["-fopenmp"], []]
# The x86-64 micro-architecture levels (the psABI's), best first: the flags each is built
# with, and the /proc/cpuinfo flags it needs beyond the level below. The kernels have
# AVX-512 (v4), AVX2+FMA (v3) and portable code paths. v4 keeps auto-vectorized loops at
# 256 bits as gcc's tuning for AVX-512 servers does (the build then matches -march=native's
# on them); the hand-written AVX-512 paths are unaffected.
_X86_LEVELS = [
    ("x86-64-v4", ["-march=x86-64-v4", "-mprefer-vector-width=256"],
     ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    ("x86-64-v3", ["-march=x86-64-v3"], ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")),
    ("x86-64-v2", ["-march=x86-64-v2"], ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")),
    ("x86-64", ["-march=x86-64"], ()),
]
_TIMEOUT = 120.0  # seconds, default of $BATCHNORM_CC_TIMEOUT
_STALE = 600.0  # seconds after which a build's temporary directory counts as abandoned
_MAX_SIZE = 64 << 20  # bytes: no build comes near this; a larger "cached" file is not hashed
_PREFIX = "bnkernels-"
_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_status: Optional[str] = None  # None: not tried yet
_info: Dict[str, object] = {}  # what was loaded (path, how, notes) or why not (error)
_fd_names: set = set()  # /proc/self/fd numbers handed to dlopen (see _dlopen)


class _Fallback(Exception):
    """The kernels cannot be used; the message is the status."""


class _Untrusted(Exception):
    """A file or directory that must not be loaded from; the message says why."""


class _Candidate(NamedTuple):
    """One way to build the kernels: its instruction-set level, its flags beyond _FLAGS, and
    the file it is cached as."""
    level: str
    flags: List[str]
    key: str
    name: str


# ---- the compiler -------------------------------------------------------------------------

def _compiler_command() -> List[str]:
    """``$CC`` split as a shell would (its program resolved on PATH), else cc, gcc or clang."""
    cc = os.environ.get("CC", "")
    if cc.strip():
        try:
            words = shlex.split(cc)
        except ValueError as e:
            raise _Fallback(f"CC={cc!r} cannot be split into a command ({e}): using torch operations") from None
        path = shutil.which(words[0])
        if path is None:
            raise _Fallback(f"CC={cc!r}: {words[0]!r} is not a program on PATH (CC is never replaced by another "
                            "compiler): using torch operations")
        return [path, *words[1:]]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    raise _Fallback("no C compiler found (CC is not set; no cc, gcc or clang on PATH): using torch operations")


def _compiler() -> Optional[str]:
    """The compiler program the kernels are built with, None when there is none."""
    try:
        return _compiler_command()[0]
    except _Fallback:
        return None


def _timeout() -> Tuple[float, List[str]]:
    """Seconds the whole build may take ($BATCHNORM_CC_TIMEOUT), and a note if it was invalid."""
    raw = os.environ.get("BATCHNORM_CC_TIMEOUT", "").strip()
    if not raw:
        return _TIMEOUT, []
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        return _TIMEOUT, [f"BATCHNORM_CC_TIMEOUT={raw!r} is not a positive number of seconds: used {_TIMEOUT:g}"]
    return value, []


def _run(argv: List[str], deadline: float, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a compiler command in a process group of its own; past ``deadline`` (a
    time.monotonic() value) kill the whole group (the driver and its cc1, as, ld), which
    also closes the pipes they hold, and raise _Fallback."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Fallback(_timed_out(argv))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=left)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise _Fallback(_timed_out(argv)) from None
    except BaseException:  # KeyboardInterrupt included: no compiler outlives the call
        _kill(proc)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _timed_out(argv: List[str]) -> str:
    seconds = _timeout()[0]
    return (f"build failed, using torch operations: the compiler timed out after {seconds:g} s "
            f"(BATCHNORM_CC_TIMEOUT): {shlex.join(argv[:1] + [a for a in argv[1:] if a.startswith('-')])}")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is ours: its leader is not reaped yet
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:  # a process that left the group holds a pipe: let it
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()
        proc.wait()


def _flags(cc: List[str]) -> List[str]:
    """Our flags after CC's words: an optimization level given in CC replaces ours."""
    if any(w.startswith("-O") for w in cc[1:]):
        return [f for f in _FLAGS if not f.startswith("-O")]
    return list(_FLAGS)


def _key(*parts: str) -> str:
    h = hashlib.sha256()
    with open(_SOURCE, "rb") as f:
        h.update(f.read())
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


def _cpu_flags() -> Optional[List[str]]:
    """This CPU's feature flags as Linux lists them, None when they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return None


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _levels() -> Tuple[List[Tuple[str, List[str]]], List[str], str]:
    """The instruction-set levels to build for, best first ((name, flags); the ones after
    the first are for a compiler that rejects it), notes for the status, and what of the
    CPU joins the cache key (nothing, except for BATCHNORM_MARCH=native).

    By default the best x86-64 level this CPU supports (elsewhere the compiler's default).
    BATCHNORM_MARCH picks one: a level is checked against the CPU (refused, with the reason
    in the status, if the CPU lacks it), "native" builds for exactly this CPU, anything else
    goes to -march= unchecked. Whatever is asked for is built or fails, never replaced."""
    want = os.environ.get("BATCHNORM_MARCH", "").strip()
    auto: List[Tuple[str, List[str]]] = [] if _is_x86_64() else [("compiler default", [])]
    missing: Dict[str, List[str]] = {}  # level -> the CPU flags it needs that this CPU lacks
    if _is_x86_64():
        have, needed = _cpu_flags(), []
        for name, flags, extra in reversed(_X86_LEVELS):  # lowest first: each needs those below
            needed += extra
            if have is None:
                lacking = ["(none of its features could be read)"] if needed else []
            else:
                lacking = [f for f in needed if f not in have]
            if lacking:
                missing[name] = lacking
            else:
                auto.insert(0, (name, flags))
    if not want:
        return auto, [], ""
    if want == "native":
        return [("native", ["-march=native"])], ["BATCHNORM_MARCH=native: built for this CPU only"], \
            " ".join(_cpu_flags() or [platform.processor() or platform.machine()])
    levels = {name: flags for name, flags, _ in _X86_LEVELS} if _is_x86_64() else {}
    if want in levels:
        if want in missing:
            return auto, [f"BATCHNORM_MARCH={want} refused, this CPU lacks {' '.join(missing[want][:6])}: "
                          f"built for {auto[0][0]} instead"], ""
        return [(want, levels[want])], [f"level set by BATCHNORM_MARCH={want}"], ""
    return [(f"-march={want}", [f"-march={want}"])], \
        [f"BATCHNORM_MARCH={want} passed to the compiler as given, not checked against this CPU"], ""


def _candidates(cc: List[str], version: str) -> Tuple[List[_Candidate], List[str]]:
    """The builds to try, best first, and notes on the instruction-set choice."""
    levels, notes, cpu = _levels()
    out = []
    for level, isa in levels:
        for extra in _VARIANTS:
            flags = isa + extra
            key = _key("\0".join(cc), "\0".join(_flags(cc) + flags), version, platform.machine(), cpu)
            out.append(_Candidate(level, flags, key, f"{_PREFIX}{key}.so"))
    return out, notes


# ---- trust --------------------------------------------------------------------------------

def _uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


def _check_owner_mode(st: os.stat_result, what: str) -> None:
    uid = _uid()
    if st.st_uid not in (uid, 0):
        raise _Untrusted(f"{what} is owned by uid {st.st_uid}, neither you (uid {uid}) nor root")
    if st.st_mode & 0o022:
        raise _Untrusted(f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def _open_file(dfd: int, name: str) -> int:
    """An fd for regular file ``name`` in directory ``dfd``, owned by us or root and not
    writable by others (symlinks and FIFOs are not followed or waited on)."""
    try:
        fd = os.open(name, _READ, dir_fd=dfd)
    except FileNotFoundError:
        raise  # no such file: not a reason to distrust anything
    except OSError as e:
        raise _Untrusted(f"{name} cannot be opened safely ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Untrusted(f"{name} is not a regular file")
        _check_owner_mode(st, name)
        if st.st_size > _MAX_SIZE:
            raise _Untrusted(f"{name} is larger than any build ({st.st_size} bytes)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def _recorded_hash(dfd: int, name: str) -> str:
    """The SHA-256 recorded for cached file ``name`` when it was built."""
    try:
        fd = _open_file(dfd, name + ".sha256")
    except FileNotFoundError:
        raise _Untrusted("it has no hash record (.sha256)") from None
    try:
        words = os.read(fd, 4096).decode("ascii", "replace").split()
    finally:
        os.close(fd)
    if len(words) != 2 or words[1] != name or len(words[0]) != 64:
        raise _Untrusted("its hash record is malformed")
    return words[0].lower()


def _open_verified(dfd: int, name: str) -> Optional[int]:
    """An fd for cached file ``name`` that may be loaded, None when there is none; raises
    _Untrusted when there is one that must not be."""
    try:
        fd = _open_file(dfd, name)
    except FileNotFoundError:
        return None
    try:
        if _sha256(fd) != _recorded_hash(dfd, name):
            raise _Untrusted("its content does not match the SHA-256 recorded when it was built "
                             "(truncated or modified)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_dir(path: str, check: bool = True) -> int:
    """An fd for directory ``path`` (not a symlink), owned by us (or root) and not writable
    by others unless ``check`` is False."""
    try:
        fd = os.open(path, _DIR)
    except OSError as e:
        raise _Untrusted(f"{path} cannot be opened as a directory ({e.strerror})") from None
    try:
        if check:
            _check_owner_mode(os.fstat(fd), path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _cache_root() -> str:
    if os.environ.get("BATCHNORM_CACHE"):
        return os.environ["BATCHNORM_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "batchnorm")


def _user_dir() -> str:
    return os.path.join(_cache_root(), f"u{_uid()}")


def _open_user_dir(notes: List[str]) -> Tuple[int, bool]:
    """(fd of <root>/u<uid>, created 0700 if missing; whether the files in it may be trusted).
    One of ours that others could write to is closed to them, and its files are rebuilt."""
    path = _user_dir()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise _Untrusted(f"{path} cannot be created ({e.strerror})") from None
    fd = _open_dir(path, check=False)
    try:
        st = os.fstat(fd)
        try:
            _check_owner_mode(st, path)
            return fd, True
        except _Untrusted:
            if st.st_uid != _uid():
                raise
        os.fchmod(fd, 0o700)
        notes.append(f"{path} was writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                     "made private, its files rebuilt")
        return fd, False
    except BaseException:
        os.close(fd)
        raise


# ---- build and load -----------------------------------------------------------------------

def _remove(dfd: int, name: str) -> None:
    """Remove ``name`` (a file, or a directory and everything in it) from directory ``dfd``."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(name, _DIR, dir_fd=dfd)
            try:
                for entry in list(os.scandir(sub)):
                    _remove(sub, entry.name)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def _sweep(dfd: int) -> None:
    """Remove temporary build directories that a killed process left behind."""
    now = time.time()
    for entry in list(os.scandir(dfd)):
        if entry.name.startswith(_PREFIX) and entry.name.endswith(".tmp"):
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            if age > max(_STALE, _timeout()[0] + 60):
                _remove(dfd, entry.name)


def _lock_dir(dfd: int, deadline: float, where: str) -> None:
    """Hold an exclusive lock on the cache directory (released when ``dfd`` is closed), so
    that processes starting together (one per GPU, say) compile once."""
    if fcntl is None:
        return
    while True:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise _Fallback(f"build failed, using torch operations: another process was still building the "
                                f"kernels in {where} after {_timeout()[0]:g} s (BATCHNORM_CC_TIMEOUT)") from None
            time.sleep(0.05)


# ---- the C interface ----------------------------------------------------------------------
# One ctypes mirror per argument struct of _kernels.c (same fields, same order, same types;
# `void *` pointers as c_void_p, which take an address or None). _declare checks each against
# the layout the library reports before anything is called.

_P, _I64, _I32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double
_SHAPE = [("n", _I64), ("c", _I64), ("s", _I64)]
_LAYOUT_THREADS = [("cl", _I32), ("nt", _I32)]


class StatsArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("mean", _P), ("var", _P), *_SHAPE, *_LAYOUT_THREADS]


class AffineArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("y", _P), ("scale", _P), ("shift", _P), *_SHAPE, *_LAYOUT_THREADS]


class SumsArgs(ctypes.Structure):
    _fields_ = [("dy", _P), ("x", _P), ("mean", _P), ("sum_dy", _P), ("sum_dy_xmu", _P), *_SHAPE, *_LAYOUT_THREADS]


class DxArgs(ctypes.Structure):
    _fields_ = [("dy", _P), ("x", _P), ("dx", _P), ("alpha", _P), ("beta", _P), ("gamma", _P), *_SHAPE,
                *_LAYOUT_THREADS]


class TrainFwdArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("y", _P), ("weight", _P), ("bias", _P), ("stats", _P), ("ren_mean", _P),
                ("ren_var", _P), ("rd", _P), ("update", _P), *_SHAPE, ("eps", _F64), ("var_scale", _F64),
                ("r_max", _F64), ("d_max", _F64), *_LAYOUT_THREADS]


class TrainBwdArgs(ctypes.Structure):
    _fields_ = [("dy", _P), ("x", _P), ("dx", _P), ("weight", _P), ("stats", _P), ("rd", _P), ("dweight", _P),
                ("dbias", _P), *_SHAPE, *_LAYOUT_THREADS]


class CheckStatsArgs(ctypes.Structure):
    _fields_ = [("mean", _P), ("invstd", _P), ("c", _I64), ("m", _I64), ("threshold", _F64), ("unit", _F64)]


class LerpArgs(ctypes.Structure):
    _fields_ = [("a", _P), ("b", _P), ("ta", _P), ("tb", _P), ("counter", _P), ("c", _I64), ("w", _F64)]


class MaskedFwdArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("mask", _P), ("y", _P), ("weight", _P), ("bias", _P), ("stats", _P), ("n", _I64),
                ("c", _I64), ("l", _I64), ("eps", _F64), ("nt", _I32)]


class MaskedBwdArgs(ctypes.Structure):
    _fields_ = [("dy", _P), ("x", _P), ("mask", _P), ("dx", _P), ("weight", _P), ("stats", _P), ("dweight", _P),
                ("dbias", _P), ("n", _I64), ("c", _I64), ("l", _I64), ("count", _I64), ("nt", _I32)]


class ActFwdArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("r", _P), ("y", _P), ("mask", _P), ("scale", _P), ("shift", _P), *_SHAPE,
                ("slope", _F64), ("act_alpha", _F64), ("act", _I32), *_LAYOUT_THREADS]


class ActTrainFwdArgs(ctypes.Structure):
    _fields_ = [("x", _P), ("r", _P), ("y", _P), ("mask", _P), ("weight", _P), ("bias", _P), ("stats", _P),
                ("coef", _P), ("update", _P), *_SHAPE, ("eps", _F64), ("var_scale", _F64), ("slope", _F64),
                ("act_alpha", _F64), ("act", _I32), *_LAYOUT_THREADS]


class ActTrainBwdArgs(ctypes.Structure):
    _fields_ = [("dy", _P), ("x", _P), ("mask", _P), ("r", _P), ("coef", _P), ("stats", _P), ("weight", _P),
                ("dx", _P), ("dz", _P), ("dweight", _P), ("dbias", _P), *_SHAPE, ("slope", _F64),
                ("act_alpha", _F64), ("act", _I32), *_LAYOUT_THREADS]


class ActSumsArgs(ctypes.Structure):
    _fields_ = [("dy", _P), ("v", _P), ("mask", _P), ("r", _P), ("scale", _P), ("shift", _P), ("mu", _P),
                ("sum_dz", _P), ("sum_dzu", _P), ("dz", _P), *_SHAPE, ("slope", _F64), ("act_alpha", _F64),
                ("act", _I32), ("output", _I32), *_LAYOUT_THREADS]


class ActDxArgs(ctypes.Structure):
    _fields_ = [("dy", _P), ("v", _P), ("mask", _P), ("r", _P), ("scale", _P), ("shift", _P), ("alpha", _P),
                ("beta", _P), ("gamma", _P), ("dx", _P), ("dz", _P), *_SHAPE, ("slope", _F64), ("act_alpha", _F64),
                ("act", _I32), ("output", _I32), *_LAYOUT_THREADS]


# Each entry point bn_<kind>_f32 / bn_<kind>_f64: its argument struct and its return type.
ENTRY_POINTS = {
    "stats": (StatsArgs, ctypes.c_int),
    "affine": (AffineArgs, None),
    "sums": (SumsArgs, ctypes.c_int),
    "dx": (DxArgs, None),
    "train_fwd": (TrainFwdArgs, ctypes.c_int),
    "train_bwd": (TrainBwdArgs, ctypes.c_int),
    "check_stats": (CheckStatsArgs, ctypes.c_int),
    "lerp": (LerpArgs, None),
    "masked_fwd": (MaskedFwdArgs, _I64),
    "masked_bwd": (MaskedBwdArgs, None),
    "act_fwd": (ActFwdArgs, None),
    "act_train_fwd": (ActTrainFwdArgs, ctypes.c_int),
    "act_train_bwd": (ActTrainBwdArgs, ctypes.c_int),
    "act_sums": (ActSumsArgs, ctypes.c_int),
    "act_dx": (ActDxArgs, ctypes.c_int),
}


def _layout(struct) -> List[int]:
    """sizeof, then (offset, size) of each field: what bn_args_layout reports for its twin."""
    out = [ctypes.sizeof(struct)]
    for name, _ in struct._fields_:
        field = getattr(struct, name)
        out += [field.offset, field.size]
    return out


def _torch_gelu_inf_nan() -> bool:
    """torch's float gelu(+inf) on the CPU: NaN from its AVX-512 kernel, +inf from its AVX2
    one; the fused gelu gives what torch gives here. Asked once, at import, on the CPU with
    no mode active (True, the AVX-512 answer, if asking fails)."""
    try:
        with torch._C._DisableTorchDispatch(), torch._C.DisableTorchFunction():
            big = torch.full((64,), float("inf"), device="cpu")
            return bool(torch.nn.functional.gelu(big).isnan().any())
    except Exception:
        return True


_TORCH_GELU_INF_NAN = _torch_gelu_inf_nan()


def _declare(lib: ctypes.CDLL) -> None:
    """Declare the entry points' signatures, after checking that every argument struct has the
    layout the library was compiled with (a mismatch would have the kernels read arguments
    from the wrong bytes): raises _Fallback naming the first that differs (the source and this
    file disagree, which no rebuild mends)."""
    lib.bn_build_info.argtypes = []
    lib.bn_build_info.restype = ctypes.c_char_p
    lib.bn_args_layout.argtypes = [ctypes.c_char_p, ctypes.POINTER(_I64), _I64]
    lib.bn_args_layout.restype = _I64
    lib.bn_set_torch_gelu_inf_nan.argtypes = [ctypes.c_int32]
    lib.bn_set_torch_gelu_inf_nan.restype = None
    lib.bn_set_torch_gelu_inf_nan(int(_TORCH_GELU_INF_NAN))
    for kind, (struct, restype) in ENTRY_POINTS.items():
        want = _layout(struct)
        got = (_I64 * len(want))()
        count = lib.bn_args_layout(kind.encode(), got, len(want))
        if count != len(want) or list(got) != want:
            raise _Fallback(f"kernels not used: the argument struct of bn_{kind} in _kernels.c does not match "
                            f"its mirror {struct.__name__} in batchnorm._jit (layout {list(got)[:max(count, 0)]}, "
                            f"expected {want}): using torch operations")
        for suf in ("f32", "f64"):
            fn = getattr(lib, f"bn_{kind}_{suf}")
            fn.argtypes = [ctypes.POINTER(struct)]
            fn.restype = restype


def _dlopen(fd: int, path: str) -> ctypes.CDLL:
    """Load the library open at ``fd`` (found at ``path``) through /proc/self/fd, so that what
    is mapped is exactly the file that was checked, whatever happens to ``path`` meanwhile."""
    if not os.path.isdir("/proc/self/fd"):  # not Linux: by path, which must still be that file
        if not os.path.samestat(os.stat(path), os.fstat(fd)):
            raise _Untrusted(f"{path} changed while it was being loaded")
        lib = ctypes.CDLL(path)
    else:
        # The dynamic loader hands back the library it loaded before under the same name, so
        # each load goes through an fd number that no earlier load used.
        dup = -1
        if fd in _fd_names and fcntl is not None:
            dup = fcntl.fcntl(fd, getattr(fcntl, "F_DUPFD_CLOEXEC", fcntl.F_DUPFD), max(_fd_names) + 1)
        try:
            number = dup if dup >= 0 else fd
            _fd_names.add(number)
            lib = ctypes.CDLL(f"/proc/self/fd/{number}")
        finally:
            if dup >= 0:
                os.close(dup)
    _declare(lib)
    return lib


def _build(dfd: int, dirpath: str, cc: List[str], cand: _Candidate, deadline: float) -> ctypes.CDLL:
    """Compile ``cand`` in a temporary directory inside ``dfd``, move it and its hash record
    into place, load it; the temporary directory is removed on every way out."""
    work = tempfile.mkdtemp(prefix=f"{_PREFIX}{cand.key}.", suffix=".tmp", dir=dirpath)
    name = os.path.basename(work)
    wfd = fd = -1
    try:
        # Everything that is read back goes through descriptors opened from dfd, so a path
        # that was redirected meanwhile cannot substitute a file (the compiler would write
        # into the other directory and the build fail).
        wfd = os.open(name, _DIR, dir_fd=dfd)
        _check_owner_mode(os.fstat(wfd), work)
        argv = [*cc, *_flags(cc), *cand.flags, _SOURCE, "-o", os.path.join(work, "out.so"), "-lm"]
        proc = _run(argv, deadline, env=dict(os.environ, TMPDIR=work))
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cc)} {' '.join(cand.flags)} failed: {proc.stderr.strip()[-1000:]}")
        try:
            fd = os.open("out.so", _READ, dir_fd=wfd)
        except FileNotFoundError:
            raise RuntimeError(f"{shlex.join(cc)} {' '.join(cand.flags)} reported success but wrote no "
                               "library") from None
        os.fchmod(fd, 0o755)
        digest = _sha256(fd)
        rfd = os.open("out.sha256", os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644,
                      dir_fd=wfd)
        try:
            os.fchmod(rfd, 0o644)
            os.write(rfd, f"{digest}  {cand.name}\n".encode())
        finally:
            os.close(rfd)
        # Library first, record second: a crash in between leaves a pair that fails the check.
        os.replace("out.so", cand.name, src_dir_fd=wfd, dst_dir_fd=dfd)
        os.replace("out.sha256", cand.name + ".sha256", src_dir_fd=wfd, dst_dir_fd=dfd)
        return _dlopen(fd, os.path.join(dirpath, cand.name))
    finally:
        for f in (fd, wfd):
            if f >= 0:
                os.close(f)
        _remove(dfd, name)


def _load_from(dfd: int, dirpath: str, trusted: bool, cc: List[str], cands: List[_Candidate], deadline: float,
               notes: List[str]) -> Tuple[ctypes.CDLL, _Candidate, str]:
    """The first candidate that is cached and verified in ``dfd`` or builds there: (library,
    candidate, "cached" or "built")."""
    rejected = set()

    def cached(cand: _Candidate, final: bool = True) -> Optional[ctypes.CDLL]:
        # final=False: a look before taking the lock, whose verdict may be stale by the time
        # the lock is held (another process halfway through replacing the pair, say)
        if not trusted or cand.name in rejected:
            return None
        try:
            fd = _open_verified(dfd, cand.name)
        except _Untrusted as e:
            if final:
                rejected.add(cand.name)
                notes.append(f"cached {cand.name} not trusted, rebuilt: {e}")
            return None
        if fd is None:
            return None
        try:
            return _dlopen(fd, os.path.join(dirpath, cand.name))
        except (OSError, AttributeError, _Untrusted) as e:  # verified yet unloadable: build it again
            if final:
                rejected.add(cand.name)
                notes.append(f"cached {cand.name} could not be loaded, rebuilt: {e}")
            return None
        finally:
            os.close(fd)

    lib = cached(cands[0], final=False)
    if lib is not None:
        return lib, cands[0], "cached"
    _lock_dir(dfd, deadline, dirpath)
    _sweep(dfd)
    errors = []
    for i, cand in enumerate(cands):
        lib = cached(cand)  # the first one again too: another process may have built it meanwhile
        if lib is not None:
            return lib, cand, "cached"
        try:
            return _build(dfd, dirpath, cc, cand, deadline), cand, "built"
        except (RuntimeError, OSError) as e:
            errors.append(str(e))
            if i + 1 < len(cands):
                notes.append(f"{' '.join(cand.flags) or 'the plain build'} failed: {str(e)[-300:]}")
    raise _Fallback("build failed, using torch operations: " + "; ".join(errors))


def _plan(deadline: Optional[float] = None) -> Tuple[List[str], List[_Candidate], List[str]]:
    """The compiler command, the builds to try (best first) and notes on the choice."""
    cc = _compiler_command()
    proc = _run([*cc, "--version"], time.monotonic() + _timeout()[0] if deadline is None else deadline)
    return (cc, *_candidates(cc, proc.stdout + proc.stderr + str(proc.returncode)))


def _load() -> Tuple[ctypes.CDLL, Dict[str, object]]:
    timeout, notes = _timeout()
    deadline = time.monotonic() + timeout
    cc, cands, isa_notes = _plan(deadline)
    notes += isa_notes
    try:
        dfd, trusted = _open_user_dir(notes)
        dirpath = _user_dir()
        private = False
    except _Untrusted as e:
        # Not cached: build where nobody else can write, load, and remove it.
        notes.append(f"cache not used ({e}): built in a private temporary directory")
        dirpath = tempfile.mkdtemp(prefix="batchnorm-")
        dfd, trusted, private = _open_dir(dirpath), False, True
    try:
        lib, cand, how = _load_from(dfd, dirpath, trusted, cc, cands, deadline, notes)
    finally:
        if private:
            for entry in list(os.scandir(dfd)):
                _remove(dfd, entry.name)
        os.close(dfd)
        if private:
            os.rmdir(dirpath)
    path = os.path.join(dirpath, cand.name)
    return lib, {"path": path, "how": "built, not cached" if private else how, "level": cand.level,
                 "flags": cand.flags, "isa": lib.bn_build_info().decode(), "compiler": cc, "notes": notes}


def kernels() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, building it on first call; None if unavailable."""
    global _lib, _status, _info
    if _status is not None:
        return _lib
    with _lock:
        if _status is not None:
            return _lib
        if os.environ.get("BATCHNORM_KERNELS", "1") == "0":
            _status = "disabled by BATCHNORM_KERNELS=0"
            return None
        try:
            lib, info = _load()
        except _Fallback as e:
            _info, _status = {"error": str(e)}, str(e)
            return None
        except Exception as e:  # a broken toolchain or file system must not break training: fall back
            _info = {"error": f"build failed, using torch operations: {type(e).__name__}: {e}"}
            _status = str(_info["error"])
            return None
        _lib, _info = lib, info
        how = {"cached": "from the cache, SHA-256 verified", "built": "built now"}.get(str(info["how"]), info["how"])
        notes = "".join(f"; {n}" for n in info["notes"])  # type: ignore[union-attr]
        _status = f"fused CPU kernels loaded: {info['path']} ({info['level']}: {info['isa']}; {how}){notes}"
        return _lib


def status() -> str:
    """Whether the fused CPU kernels are in use, and if not, why (builds them if needed)."""
    kernels()
    return str(_status)
