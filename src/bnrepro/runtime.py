"""What every experiment shares: atomic checkpoints, provenance, parallel runs, progress."""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import inspect
import io
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict

import numpy
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import batchnorm


class UsageError(Exception):
    """A problem the user can fix (a flag, a file, a directory): the CLI prints its message
    on one line and exits with status 2, without a traceback."""


class CheckpointError(UsageError):
    """A checkpoint file is missing, damaged, foreign or from another configuration."""


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells, else set and reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``:
    a crash leaves either the old file or the new one, never half of one. The file gets
    the mode any file the user creates gets (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_output_dir(out: Path, flag: str = "--out") -> Path:
    """Create ``out`` if needed and prove it writable, before any training starts; raise
    UsageError naming the flag, the path and the reason otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory (expected a directory to write results to)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".bnrepro-write-test-")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{flag} {out}: not a writable directory ({exc.strerror or exc})") from None
    return out


# A checkpoint file: this magic line, the SHA-256 of the payload (32 bytes), the payload
# (torch.save of plain containers and tensors). The hash catches any damage, the magic
# a foreign file, and the payload is read with weights_only=True, so a file someone hands
# you can hold data but never code.
_CKPT_MAGIC = b"BNREPRO-CHECKPOINT 1\n"


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` atomically as a checksummed checkpoint (see :func:`load_checkpoint`)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, _CKPT_MAGIC + hashlib.sha256(payload).digest() + payload)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise CheckpointError naming
    the file for anything else (empty, truncated, flipped bytes, another program's file)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({exc.strerror or exc})") from None
    head = len(_CKPT_MAGIC)
    if not raw.startswith(_CKPT_MAGIC):
        what = "is empty" if not raw else "is not a bnrepro checkpoint (no bnrepro header)"
        raise CheckpointError(f"checkpoint {path}: {what}; delete it or use another --out")
    digest, payload = raw[head:head + 32], raw[head + 32:]
    if len(digest) < 32 or hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: damaged (truncated or changed since it was written: "
                              "checksum mismatch); delete it or use another --out")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a payload it cannot read
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(state).__name__}, expected a dict of training state")
    return state


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


REPO = Path(__file__).resolve().parents[2]  # the checkout this package runs from (src layout)

# Set by the CLI for the provenance of what it writes: whether --allow-dirty was given.
RUN_FLAGS: Dict[str, Any] = {"allow_dirty": False}


def check_records_clean(out: Path, allow_dirty: bool) -> None:
    """Refuse to write into the repository's records/ from a tree with uncommitted changes
    (its results could not be traced to a commit) unless ``allow_dirty``."""
    records = (REPO / "records").resolve()
    target = Path(out).resolve()
    if target != records and records not in target.parents:
        return
    if git_commit().endswith("-dirty") and not allow_dirty:
        raise UsageError(f"--out {out}: writing into records/ from a tree with uncommitted changes; commit first "
                         "(records must name the commit that made them) or pass --allow-dirty")


def git_commit(path=None) -> str:
    """HEAD of the git checkout holding ``path`` (default: this package's), with "-dirty"
    if tracked files differ from it; "unknown" outside a checkout."""
    try:
        root = Path(path).resolve().parent if path is not None else REPO
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> Dict[str, Any]:
    """Versions and machine, for every record."""
    cpu = cpu_name()
    return {
        "command": " ".join(["bnrepro"] + sys.argv[1:]) if Path(sys.argv[0]).name in ("bnrepro", "__main__.py")
        else " ".join(sys.argv),
        "git_commit": git_commit(),
        "allow_dirty": bool(RUN_FLAGS["allow_dirty"]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores",
    }


# -- running several independent trainings with one progress bar ------------------------------

_QUEUE = None


def _exit_with_parent(parent: int) -> None:
    """End this worker when the process that started it ends, however it ends (SIGKILL
    included), so no orphan goes on training and rewriting checkpoints. Linux delivers
    SIGKILL at once through PR_SET_PDEATHSIG; everywhere a daemon thread also watches for
    the parent to change, once a second."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="bnrepro-parent-watch", daemon=True).start()


def _init_worker(queue, threads: int, parent: int) -> None:
    global _QUEUE
    _exit_with_parent(parent)
    _QUEUE = queue
    torch.set_num_threads(threads)


def report_progress(task_id: int, step: int, loss: float, acc) -> None:
    """Called by a training loop; reaches the parent's progress bar (or is dropped)."""
    if _QUEUE is not None:
        _QUEUE.put((task_id, step, loss, acc))


def _call(args):
    fn, task_id, task = args
    return task_id, fn(task_id, task)


def run_tasks(fn, tasks, workers: int, total_steps: int, desc: str, threads: int = 1, quiet: bool = False):
    """Run ``fn(task_id, task)`` for every task, in ``workers`` processes (spawned, one
    thread each), with one tqdm bar over all steps that shows the latest loss and test
    accuracy. Returns the results in task order."""

    from tqdm import tqdm

    global _QUEUE
    results = [None] * len(tasks)
    bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True, disable=quiet, mininterval=0.5)
    last = {}

    def handle(item):
        task_id, step, loss, acc = item
        prev_step, prev_acc = last.get(task_id, (0, None))
        bar.update(max(step - prev_step, 0))
        last[task_id] = (step, acc if acc is not None else prev_acc)
        post = {"run": task_id, "loss": f"{loss:.3f}"}
        if last[task_id][1] is not None:
            post["test_acc"] = f"{last[task_id][1]:.4f}"
        bar.set_postfix(post, refresh=False)

    def drain(q):
        while True:
            try:
                item = q.get_nowait()
            except queue_mod.Empty:
                return
            handle(item)

    class _Direct:
        put = staticmethod(handle)

    try:
        if workers <= 1 or len(tasks) == 1:
            _QUEUE = _Direct()
            for i, t in enumerate(tasks):
                results[i] = fn(i, t)
        else:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(q, threads, os.getpid())) as pool:
                pending = pool.imap_unordered(_call, [(fn, i, t) for i, t in enumerate(tasks)])
                done = 0
                while done < len(tasks):
                    try:
                        task_id, res = pending.next(timeout=0.5)
                        results[task_id] = res
                        done += 1
                    except mp.TimeoutError:
                        pass
                    drain(q)
                drain(q)
    finally:
        _QUEUE = None
        bar.close()
    return results


# -- data-parallel training under torchrun ---------------------------------------------------

def bind_to_cores(local_rank: int, local_world: int) -> "list[int]":
    """Give this process (local rank ``local_rank`` of ``local_world`` on this machine) its
    own share of the cores it may run on; returns the cores kept (all of them when there
    are fewer cores than ranks, or where the OS offers no affinity call).

    Why: with one rank per core and gloo, an unbound rank's communication threads can be
    woken on another rank's core, behind its computation, and every synchronization point
    (two per SyncBatchNorm layer per step) waits longer; benchmarks/sync.py measures it.
    Call it before the process group starts its threads, which inherit the binding.
    """
    if not hasattr(os, "sched_getaffinity"):
        return []
    cores = sorted(os.sched_getaffinity(0))
    if local_world <= 1 or len(cores) < local_world:
        return cores
    share = len(cores) // local_world
    mine = cores[local_rank * share:(local_rank + 1) * share]
    os.sched_setaffinity(0, set(mine))
    return mine


#: Seconds a rank waits in a collective before its process group gives up, unless
#: $BNREPRO_PG_TIMEOUT_S says otherwise. Why set one: a rank whose peer died waits in its
#: next collective until the timeout, 30 minutes by torch's default (10 on NCCL). In these
#: experiments a rank waits for its peers only while they load the data (before the first
#: collective) or while rank 0 writes a checkpoint; 300 s leaves room for both on a slow
#: machine.
PG_TIMEOUT_S = 300.0


def process_group_options(cuda: bool) -> Dict[str, Any]:
    """The keyword arguments :func:`distributed` gives torch.distributed.init_process_group:
    the backend (NCCL with CUDA, else gloo) and the timeout, ``$BNREPRO_PG_TIMEOUT_S``
    seconds (default :data:`PG_TIMEOUT_S`); a value that is not a positive number is a
    :class:`UsageError` naming the variable."""
    raw = os.environ.get("BNREPRO_PG_TIMEOUT_S", str(PG_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds < float("inf")):
        raise UsageError(f"BNREPRO_PG_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return {"backend": "nccl" if cuda else "gloo", "timeout": datetime.timedelta(seconds=seconds)}


def distributed() -> "tuple[int, int]":
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) this initializes the default
    process group once (:func:`process_group_options`: gloo on CPU, NCCL when CUDA is
    available; a timeout of ``$BNREPRO_PG_TIMEOUT_S`` seconds, default 300). On CPU each
    local rank is first bound to its own share of the cores (:func:`bind_to_cores`;
    ``BNREPRO_BIND_CORES=0`` leaves placement to the scheduler)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        options = process_group_options(cuda)  # checked before anything else is done
        if not cuda and os.environ.get("BNREPRO_BIND_CORES", "1") != "0":
            bind_to_cores(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        dist.init_process_group(**options)
    return dist.get_rank(), dist.get_world_size()


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm (batchnorm's, so it runs on CPU/gloo too) and DDP when distributed;
    the model itself otherwise."""
    rank, world = distributed()
    if world == 1:
        return model
    model = batchnorm.convert_sync_batchnorm(model)
    # Buffers need no per-step broadcast: SyncBatchNorm's running statistics are global
    # already (the replicas start identical). torch 2.13 renamed the option.
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, forward_sync_buffers=False)
    return DDP(model, broadcast_buffers=False)
