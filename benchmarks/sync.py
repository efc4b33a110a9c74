"""Training-step time of a small BN conv net with SyncBatchNorm over local BN, both on 2
gloo processes on this CPU (DDP in both, so only the BN layers differ).

    python benchmarks/sync.py [--quick] [--no-pin-cores]

By default each rank is bound to its own core before gloo starts its threads, which then
share that core (os.sched_setaffinity; what CPU cluster launchers do for one rank per
core). Unbound, the collectives' latency had a longer tail in our measurements (the
scheduler can wake a rank's gloo thread on the other rank's core, behind that rank's
computation), and every synchronization point of the step pays it: --no-pin-cores
measures that case.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def net(norm):
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), norm(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), norm(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def worker(rank, world, port, repeats, batch, queue, pin=False):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import batchnorm as bn
    import batchnorm.distributed as bd

    torch.set_num_threads(1)
    if pin:
        # One core per rank, before gloo starts its threads (they inherit the affinity).
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    models = {"local": DDP(net(bn.BatchNorm2d)), "sync": DDP(net(bn.SyncBatchNorm))}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    default_poll = bd.poll_ms
    # The variants, each (model, poll_ms): the library's default, and blocking waits.
    variants = {"local": ("local", default_poll), "sync": ("sync", default_poll), "sync-blocking": ("sync", 0.0)}

    def step(k):
        opts[k].zero_grad(set_to_none=True)
        loss_fn(models[k](x), y).backward()
        opts[k].step()

    times = {k: [] for k in variants}
    for k in models:
        for _ in range(3):
            step(k)
    names = list(variants)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            model, bd.poll_ms = variants[k]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(5):
                step(model)
            times[k].append((time.perf_counter() - t0) / 5)
    bd.poll_ms = default_poll
    # The floor: one bare all_gather of a (3, 32) float tensor, as each SyncBatchNorm layer
    # does in its forward (its backward, on CPU, one all_gather of a (2, 32) tensor).
    t = torch.zeros(3, 32)
    out = [torch.empty_like(t) for _ in range(world)]
    lat = []
    for _ in range(repeats * 5):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather(out, t)
        lat.append(time.perf_counter() - t0)
    if rank == 0:
        res = {k: statistics.median(v) for k, v in times.items()}
        res["collective"] = statistics.median(lat)
        queue.put(res)
    dist.barrier()
    dist.destroy_process_group()
    _exit_quietly(queue)


def _exit_quietly(queue) -> None:
    """End a spawned rank without the interpreter's teardown: there, torch's gloo and store
    threads sometimes abort the process ("terminate called without an active exception",
    seen on this machine after the results were delivered). Flush the queue first."""
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def one_rank(port, repeats, batch, queue):
    """The synchronized path's own cost, without a partner to wait for: both nets in one
    process and a one-rank gloo group, SyncBatchNorm forced onto its collective path (a
    one-rank group normally makes it plain BN)."""
    import torch.distributed as dist

    import batchnorm as bn

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    world = dist.group.WORLD
    bn.SyncBatchNorm._process_group = lambda self: world  # measurement only: force the collective path
    torch.manual_seed(0)
    models = {"local": net(bn.BatchNorm2d), "sync": net(bn.SyncBatchNorm)}
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()
    times = {k: [] for k in models}
    for r in range(repeats):
        for k in (("local", "sync") if r % 2 == 0 else ("sync", "local")):
            t0 = time.perf_counter()
            for _ in range(5):
                models[k].zero_grad(set_to_none=True)
                loss_fn(models[k](x), y).backward()
            times[k].append((time.perf_counter() - t0) / 5)
    queue.put({k: statistics.median(v) for k, v in times.items()})
    dist.destroy_process_group()
    _exit_quietly(queue)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=32, help="examples per process")
    p.add_argument("--pin-cores", action=argparse.BooleanOptionalAction, default=True,
                   help="bind each rank (and its gloo threads) to its own core, as CPU cluster launchers do "
                        "(default; --no-pin-cores leaves placement to the scheduler)")
    args = p.parse_args(argv)
    from _timing import machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    repeats = 7 if args.quick else 21
    procs = [ctx.Process(target=worker, args=(r, 2, port, repeats, args.batch, q, args.pin_cores)) for r in range(2)]
    for pr in procs:
        pr.start()
    res = q.get(timeout=600)
    for pr in procs:
        pr.join()
    print(f"# benchmarks/sync.py: 2 gloo processes, 1 thread each, {args.batch} examples per process, "
          f"{'each bound to its own core' if args.pin_cores else 'not bound to cores'}; {machine()}")
    print("| BN layers | step ms (median) |\n|---|---|")
    print(f"| batchnorm.BatchNorm2d (local) | {res['local'] * 1e3:.2f} |")
    print(f"| batchnorm.SyncBatchNorm | {res['sync'] * 1e3:.2f} |")
    print(f"| batchnorm.SyncBatchNorm, blocking waits (poll_ms=0) | {res['sync-blocking'] * 1e3:.2f} |")
    print(f"\nratio sync / local: {res['sync'] / res['local']:.2f} (target <= 1.3); with blocking waits "
          f"{res['sync-blocking'] / res['local']:.2f}")
    print(f"one bare gloo all_gather of a (3, 32) tensor: {res['collective'] * 1e3:.3f} ms median; the net has "
          "3 BN layers, so 6 collectives per step")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pr = ctx.Process(target=one_rank, args=(port, repeats, args.batch, q))
    pr.start()
    one = q.get(timeout=600)
    pr.join()
    print(f"one process, one-rank group, collective path forced (no partner to wait for): local "
          f"{one['local'] * 1e3:.2f} ms, sync {one['sync'] * 1e3:.2f} ms, ratio {one['sync'] / one['local']:.2f} "
          "(forward+backward, no optimizer)")


if __name__ == "__main__":
    main()
