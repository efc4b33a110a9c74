"""Collectives of synchronized BN over torch.distributed (gloo on CPU, NCCL on CUDA): the
layer between the statistics (:mod:`batchnorm._stats`) and the operator
(:mod:`batchnorm._operator`).

Each replica computes its local per-channel (count, mean, biased variance); one all_gather
per layer in the forward merges them exactly and stably (:func:`sync_stats`, with
:func:`batchnorm._stats.merge_stats`), and one collective in the backward sums the two
per-channel gradient sums of Section 3 (:func:`all_sum`). Waits on CPU collectives poll
rather than sleep (:data:`poll_ms`).

The forward's message also says which call it is (:func:`check_same_layer`): ranks that
call synchronized layers in different orders would otherwise merge the statistics of
different layers without any error.
"""

from __future__ import annotations

import itertools
import os
import time
import weakref

import torch
import torch.distributed as dist
from torch import Tensor

from ._stats import merge_stats

__all__ = ["poll_ms", "run_collective", "resolve_group", "check_channels", "number_layer", "check_same_layer",
           "gather_stats", "sync_stats", "all_sum"]


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


# -- which call: the layer identity in the forward's message ---------------------------------

# This process's synchronized layers are numbered in the order it creates them
# (:func:`number_layer`): ranks that build the same model number the same layer alike, with
# no communication. (The order of first calls would not do: ranks calling two layers in
# swapped order would number them swapped too, and agree.)
_layer_numbers = itertools.count(1)

# The synchronized calls this process has made per process group (weakly held groups: a
# destroyed group leaves; a new one counts from 0).
_calls: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def number_layer(module) -> int:
    """Give ``module`` this process's next synchronized-layer number (SyncBatchNorm and
    convert_sync_batchnorm call it when they make a layer; a synchronized layer without one
    gets it at its first synchronized call). Returns the number."""
    number = next(_layer_numbers)
    module._sync_layer = number
    return number


def _identity(group, owner, device) -> Tensor:
    """(call number on ``group``, layer number) of this synchronized call, as (2,) float64
    (exact integers); (-1, -1), checked by no rank, under torch.compile's tracing, where the
    Python counters would be baked into the graph as constants (a recompile per call) and
    the comparison needs a host read of the gathered values."""
    if torch.compiler.is_compiling():
        return torch.full((2,), -1.0, dtype=torch.float64, device=device)
    call = _calls.get(group, 0) + 1
    _calls[group] = call
    if owner is None:
        layer = -1  # a caller without a module: only the call numbers are compared
    else:
        layer = owner.__dict__.get("_sync_layer")
        if layer is None:
            layer = number_layer(owner)
    return torch.tensor((float(call), float(layer)), dtype=torch.float64, device=device)


def check_same_layer(ident: Tensor, group, name: str, owner=None) -> None:
    """Raise RuntimeError unless every rank of ``group`` sent the same (call number, layer
    number): ``ident`` (W, 2), the gathered identities in group rank order, the same on every
    rank, so every rank raises (naming the first rank that differs from the group's first).
    -1 (not known to that rank) matches anything. One host read of 2W numbers; no work per
    channel."""
    rows = ident.tolist()
    if rows.count(rows[0]) == len(rows):
        return
    first = rows[0]
    for r, row in enumerate(rows):
        calls_differ = row[0] != first[0] and min(row[0], first[0]) >= 0
        layers_differ = row[1] != first[1] and min(row[1], first[1]) >= 0
        if calls_differ or layers_differ:
            break
    else:
        return
    ranks = dist.get_process_group_ranks(group) if group is not None and dist.is_initialized() else range(len(rows))
    me, them = ranks[0], ranks[r]
    what = (f"rank {them} called a different synchronized layer than rank {me} at synchronized call #{int(first[0])}"
            if layers_differ else f"rank {them} is at synchronized call #{int(row[0])} where rank {me} is at "
            f"#{int(first[0])} (a rank made a training-mode call of a synchronized layer that another did not)")
    mine = f"; this process's layer #{owner.__dict__.get('_sync_layer')}: {owner!r}" if owner is not None else ""
    raise RuntimeError(
        f"{name}: {what} on this process group: rank {me} called its synchronized layer #{int(first[1])} "
        f"(call #{int(first[0])}), rank {them} its #{int(row[1])} (call #{int(row[0])}), so they would merge the "
        f"statistics of different layers; every rank must call the same synchronized layers in the same order "
        f"(layers are numbered in the order each process created them, calls in the order each process made "
        f"them){mine}")


def _all_gather(local: Tensor, group) -> Tensor:
    """Every rank's ``local`` stacked in group rank order: (W, *local.shape)."""
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    run_collective(dist.all_gather, gathered, local, group=group, cpu=local.device.type == "cpu")
    return torch.stack(gathered)


def gather_stats(local: Tensor, group):
    """Merge every rank's (3, C) float64 (count, mean, biased var) with one all_gather:
    the global (count, mean, biased var), each (1, C) float64. (No layer identity travels
    with it: :func:`sync_stats` adds one.)"""
    parts = _all_gather(local, group)                                    # (W, 3, C)
    return merge_stats(parts[:, 0], parts[:, 1], parts[:, 2], dim=0)


def sync_stats(mean: Tensor, var: Tensor, count: Tensor, group, num_features: int, name: str, owner=None):
    """Global (mean, biased var, count) from each rank's local ones, with one all_gather
    (and, on the first call per module, the channel check of :func:`check_channels`).

    The message is (3C + 2,) float64: count, mean and biased variance per channel, then this
    call's number on ``group`` and the layer's number (:func:`check_same_layer`, run on the
    gathered messages before anything is merged, so before any running statistic changes).
    Its shape and dtype are the same on every code path, so ranks taking different paths
    (an empty batch, a layout the kernels do not read) still agree."""
    check_channels(owner, group, num_features, name, mean.device)
    # Why one collective: the three per-channel statistics and the call's identity travel
    # together, in float64 (exact for the integers).
    # (torch.cat promotes all four to the identity's float64.)
    C = mean.numel()
    local = torch.cat((count.expand_as(mean).reshape(-1), mean.reshape(-1), var.reshape(-1),
                       _identity(group, owner, mean.device)))                               # (3C + 2,)
    parts = _all_gather(local, group)                                    # (W, 3C + 2) float64
    if not torch.compiler.is_compiling():  # see _identity
        check_same_layer(parts[:, 3 * C:], group, name, owner)
    stats = parts[:, :3 * C].view(-1, 3, C)                              # (W, 3, C)
    total, gmean, gvar = merge_stats(stats[:, 0], stats[:, 1], stats[:, 2], dim=0)
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
