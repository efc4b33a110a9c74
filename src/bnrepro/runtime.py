"""What every experiment shares: atomic checkpoints, provenance, parallel runs, progress."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``:
    a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
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


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """torch.save ``state`` atomically."""
    import io
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def git_commit(path=None) -> str:
    """HEAD of the git checkout holding ``path`` (default: this package's), with "-dirty"
    if tracked files differ from it; "unknown" outside a checkout."""
    try:
        root = Path(path).resolve().parent if path is not None else Path(__file__).resolve().parents[2]
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
    import numpy
    cpu = cpu_name()
    return {
        "command": " ".join(["bnrepro"] + sys.argv[1:]) if Path(sys.argv[0]).name in ("bnrepro", "__main__.py")
        else " ".join(sys.argv),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores",
    }


# -- running several independent trainings with one progress bar ------------------------------

_QUEUE = None


def _init_worker(queue, threads: int) -> None:
    global _QUEUE
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
    import multiprocessing as mp
    import queue as queue_mod

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
            with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(q, threads)) as pool:
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


def distributed() -> "tuple[int, int]":
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) this initializes the default
    process group once: gloo on CPU, NCCL when CUDA is available. On CPU each local rank is
    first bound to its own share of the cores (:func:`bind_to_cores`;
    ``BNREPRO_BIND_CORES=0`` leaves placement to the scheduler)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if not cuda and os.environ.get("BNREPRO_BIND_CORES", "1") != "0":
            bind_to_cores(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm (batchnorm's, so it runs on CPU/gloo too) and DDP when distributed;
    the model itself otherwise."""
    rank, world = distributed()
    if world == 1:
        return model
    import batchnorm
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = batchnorm.convert_sync_batchnorm(model)
    # Buffers need no per-step broadcast: SyncBatchNorm's running statistics are global
    # already (the replicas start identical). torch 2.13 renamed the option.
    import inspect
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return DDP(model, forward_sync_buffers=False)
    return DDP(model, broadcast_buffers=False)
