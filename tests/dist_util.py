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


def _run_one(fn, rank, world, port, path, args=()):
    """One function on a fresh gloo process group (MASTER_PORT ``port``); its result, or its
    error and traceback, saved to ``path``, whatever happened."""
    import torch.distributed as dist
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": result}, path)
    except BaseException as exc:  # report to the parent, whatever happened
        torch.save({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}, path)


def _entry(fn, rank, world, port, outdir, args):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    _run_one(fn, rank, world, port, os.path.join(outdir, f"{rank}.pt"), args)


def _run_processes(rank_args, target, timeout: float):
    """Spawn one process per entry of ``rank_args`` running ``target(*entry)``, wait up to
    ``timeout`` s for each, kill what is still running; the processes, or TimeoutError."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=a) for a in rank_args]
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
    return procs


def run_ranks(fn, world: int = 2, args=(), timeout: float = 60.0):
    """Returns [result of rank 0, rank 1, ...]; raises if a rank failed or hung."""
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        procs = _run_processes([(fn, r, world, port, outdir, args) for r in range(world)], _entry, timeout)
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            results.append(torch.load(path, weights_only=True))
        return results


def _entry_each(fns, rank, world, ports, outdir):
    """Run each of ``fns`` in turn, each on a process group of its own (a fresh port),
    saving each one's result or error separately."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    for i, (fn, port) in enumerate(zip(fns, ports)):
        _run_one(fn, rank, world, port, os.path.join(outdir, f"{i}-{rank}.pt"))


def run_ranks_each(fns, world: int = 2, timeout: float = 120.0):
    """Like run_ranks for several functions, in one set of processes (one torch import per
    rank, not one per function): {fn: [result of rank 0, rank 1, ...]}, each function on a
    new process group, in order. A function that failed on a rank has {"error", "trace"}
    there, as with run_ranks; a hang of any one raises TimeoutError for all."""
    ports = []
    while len(ports) < len(fns):
        port = free_port()
        if port not in ports:
            ports.append(port)
    with tempfile.TemporaryDirectory() as outdir:
        procs = _run_processes([(list(fns), r, world, ports, outdir) for r in range(world)], _entry_each, timeout)
        out = {}
        for i, fn in enumerate(fns):
            results = []
            for r in range(world):
                path = os.path.join(outdir, f"{i}-{r}.pt")
                if not os.path.exists(path):
                    raise RuntimeError(f"rank {r} died without a result for {fn.__name__} "
                                       f"(exit code {procs[r].exitcode})")
                results.append(torch.load(path, weights_only=True))
            out[fn] = results
        return out
