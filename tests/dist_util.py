"""Run a function on N gloo processes on this CPU, with a timeout so a hang fails fast."""

import multiprocessing as mp
import os
import socket
import tempfile
import traceback

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, outdir, args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": result}, os.path.join(outdir, f"{rank}.pt"))
    except BaseException as exc:  # report to the parent, whatever happened
        torch.save({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()},
                   os.path.join(outdir, f"{rank}.pt"))


def run_ranks(fn, world: int = 2, args=(), timeout: float = 60.0):
    """Returns [result of rank 0, rank 1, ...]; raises if a rank failed or hung."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, outdir, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout} s (a hang)")
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            results.append(torch.load(path, weights_only=True))
        return results
