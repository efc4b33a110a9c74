"""Collectives of synchronized BN over torch.distributed (gloo on CPU, NCCL on CUDA): the
layer between the statistics (:mod:`batchnorm._stats`) and the operator
(:mod:`batchnorm._operator`).

Each replica computes its local per-channel (count, mean, biased variance); one all_gather
per layer in the forward merges them exactly and stably (:func:`gather_stats`, with
:func:`batchnorm._stats.merge_stats`), and one collective in the backward sums the two
per-channel gradient sums of Section 3 (:func:`all_sum`). Waits on CPU collectives poll
rather than sleep (:data:`poll_ms`).
"""

from __future__ import annotations

import os
import time
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

from ._stats import merge_stats

__all__ = ["poll_ms", "run_collective", "resolve_group", "check_channels", "gather_stats", "sync_stats", "all_sum"]


def resolve_group(process_group):
    """The group whose global batch the statistics span: ``process_group`` or the world;
    None (local statistics) when no process group is initialized or the group has one
    process."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) == 1:
        return None
    return group


#: How long (milliseconds) a rank waiting for a CPU (gloo) collective polls it, yielding its
#: core, before it falls back to a blocking wait. Default from $BATCHNORM_SYNC_POLL_MS, else 20;
#: 0 always blocks. Why: a blocking wait puts the thread to sleep until gloo's worker thread
#: wakes it. On this project's 2-core machine, with one busy process per core, a step of
#: benchmarks/sync.py's net (6 waits) took 1.19 to 1.41 times local BN's with blocking waits
#: and 1.21 to 1.34 with polled ones in the same runs, polled faster in 8 of 9 runs
#: (records/benchmarks/sync/: run-1.md to run-8.md, no-pin-cores-1.md). Polling
#: without yielding was slower than blocking in an experiment: gloo's own threads need the
#: core.
def _poll_ms_from_env() -> float:
    raw = os.environ.get("BATCHNORM_SYNC_POLL_MS", "20")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"BATCHNORM_SYNC_POLL_MS must be a number of milliseconds (0 to always block), "
                         f"got {raw!r}") from None


poll_ms: float = _poll_ms_from_env()


_yield = getattr(os, "sched_yield", None) or (lambda: time.sleep(0))


def run_collective(fn, *args, cpu: bool, **kwargs) -> None:
    """Run the torch.distributed collective ``fn(*args, **kwargs)`` and return once it is
    complete. For CPU tensors (gloo) the call is issued asynchronously and polled for up to
    :data:`poll_ms`, then waited on as usual (errors and the group's timeout still surface
    through ``wait``). CUDA (NCCL) collectives and traced code block as before."""
    if not cpu or poll_ms <= 0 or torch.compiler.is_compiling():
        fn(*args, **kwargs)
        return
    work = fn(*args, async_op=True, **kwargs)
    deadline = time.perf_counter() + poll_ms * 1e-3
    while not work.is_completed() and time.perf_counter() < deadline:
        _yield()
    work.wait()


# The (owner, group) pairs whose ranks agreed on the channel count: owners are the modules
# (weakly held: a module that is freed leaves the set).
_checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_channels(owner, group, num_features: int, name: str, device) -> None:
    """On the first call per ``owner`` (a module, or None: every call) and group, compare
    the ranks' channel counts (one small all_gather), so that a mismatch is a clear error
    rather than a hang or garbage."""
    if owner is not None and group in _checked.get(owner, ()):
        return
    mine = torch.tensor([num_features], dtype=torch.long, device=device)
    theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    run_collective(dist.all_gather, theirs, mine, group=group, cpu=mine.device.type == "cpu")
    channels = [int(t) for t in theirs]
    if len(set(channels)) != 1:
        raise ValueError(f"{name}: ranks disagree on the number of channels: {channels} "
                         "(rank order); every rank must build the same model")
    if owner is not None:
        _checked.setdefault(owner, set()).add(group)


def gather_stats(local: Tensor, group):
    """Merge every rank's (3, C) float64 (count, mean, biased var) with one all_gather:
    the global (count, mean, biased var), each (1, C) float64.

    The wire format (shape and dtype) is the same on every code path, so ranks taking
    different paths (an empty batch, a layout the kernels do not read) still agree."""
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    run_collective(dist.all_gather, gathered, local, group=group, cpu=local.device.type == "cpu")
    parts = torch.stack(gathered)                                         # (W, 3, C)
    return merge_stats(parts[:, 0], parts[:, 1], parts[:, 2], dim=0)


def sync_stats(mean: Tensor, var: Tensor, count: Tensor, group, num_features: int, name: str, owner=None):
    """Global (mean, biased var, count) from each rank's local ones, with one all_gather
    (and, on the first call per module, the channel check of :func:`check_channels`)."""
    check_channels(owner, group, num_features, name, mean.device)
    # Why one collective: the three per-channel statistics travel together, in float64.
    local = torch.stack([count.reshape(-1), mean.reshape(-1), var.reshape(-1)]).to(torch.float64)  # (3, C)
    total, gmean, gvar = gather_stats(local, group)
    dt = mean.dtype
    return gmean.to(dt).view_as(mean), gvar.to(dt).view_as(var), total.to(count.dtype).view_as(count)


def all_sum(t: Tensor, group) -> Tensor:
    """The elementwise sum of ``t`` over the ranks of ``group``, identical on every rank,
    with one collective: an all_reduce for CUDA tensors; for CPU tensors an all_gather
    and a local sum in rank order, which made benchmarks/sync.py's step slightly faster
    than gloo's all_reduce did on these small per-channel tensors (an experiment on this
    project's machine: 1.27 against 1.31 times local BN, in the same run)."""
    if t.device.type != "cpu":
        run_collective(dist.all_reduce, t, group=group, cpu=False)
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    run_collective(dist.all_gather, parts, t.contiguous(), group=group, cpu=True)
    return torch.stack(parts).sum(dim=0)
