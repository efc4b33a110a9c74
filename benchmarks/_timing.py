"""Side-by-side timing: interleaved, median of many repeats, ratios in one process."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Sequence

import torch


def _per_call(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def compare(fns: Sequence[Callable[[], object]], min_time: float = 2e-3, repeats: int = 21,
            warmup: int = 3) -> List[float]:
    """Median seconds per call of each fn, measured interleaved so that machine noise hits
    all of them alike: each round runs every fn once, in an order that cycles through every
    rotation, forwards and backwards (A B C, C B A, B C A, A C B, ...): for two or three fns,
    over each 2k rounds, each fn follows each other one equally often (for more, only
    neighbours in the cycle follow one another). (With forwards and backwards alone the middle one
    of three always follows the third, and what one leaves behind, such as torch's OpenMP
    threads still spinning after its parallel kernels, slowed the next one: up to 15 % on
    small layers of a 2-core machine.)"""
    for fn in fns:
        for _ in range(warmup):
            fn()
    # Calls per measurement: enough that one measurement takes at least min_time.
    t = max(_per_call(fns[0], 1), 1e-7)
    n = max(1, int(min_time / t))
    samples: List[List[float]] = [[] for _ in fns]
    k = len(fns)
    for r in range(repeats):
        order = [(i + r // 2) % k for i in range(k)]
        for i in (order if r % 2 == 0 else reversed(order)):
            samples[i].append(_per_call(fns[i], n))
    return [statistics.median(s) for s in samples]


def commit() -> str:
    """The git commit of the batchnorm being timed ("-dirty" if its checkout has edits),
    plus the benchmarks' own commit where they come from another checkout (timing older
    kernels with their src/ first on PYTHONPATH)."""
    from bnrepro.runtime import git_commit
    ours = git_commit()  # the checkout that bnrepro, and batchnorm beside it, are imported from
    try:
        here = git_commit(__file__)
    except TypeError:  # that checkout's git_commit predates the path argument
        return f"{ours} (benchmarks from another checkout)"
    return ours if ours == here else f"{ours} (benchmarks at {here})"


def machine() -> str:
    """The CPU, torch's version and threads, the instruction set torch's CPU kernels
    dispatch to (``ATEN_CPU_CAPABILITY`` can lower it), the x86-64 level our kernels were
    built for (chosen at load time; ``BATCHNORM_MARCH`` overrides it) and the commit
    measured: every record under records/benchmarks/ starts with this line."""
    from batchnorm import _jit
    from bnrepro.runtime import cpu_name
    _jit.kernels()
    ours = _jit._info.get("level") or f"none ({_jit.status()})"
    return (f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, torch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}, ours {ours}; commit {commit()}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


PINNED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def pin_malloc() -> None:
    """Re-execute this script once with glibc's malloc thresholds pinned (see ops.py's
    docstring): freed tensors are then recycled instead of returned to the kernel and
    faulted in again, so timings compare kernels, not the allocator's heap state."""
    import os
    import sys
    if os.environ.get("GLIBC_TUNABLES") == PINNED_MALLOC or os.environ.get("BATCHNORM_BENCH_REEXEC"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=PINNED_MALLOC, BATCHNORM_BENCH_REEXEC="1")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


def bench_args(doc: str, argv=None):
    """The common command line of the benchmarks (--quick, --system-malloc); pins malloc
    unless asked not to. Returns (args, repeats)."""
    import argparse
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc behaviour")
    args = p.parse_args(argv)
    if not args.system_malloc:
        pin_malloc()
    return args, (7 if args.quick else 21)
