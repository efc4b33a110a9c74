"""Synchronized Batch Normalization over torch.distributed: gloo on CPU, NCCL on CUDA.

Each replica computes its local per-channel (count, mean, biased variance); one
all_gather per layer in the forward merges them exactly and stably (count-weighted mean
and M2, :func:`batchnorm.functional.merge_stats`), and one collective in the backward sums
the two per-channel gradient sums of Section 3 (:func:`all_sum`). No collective runs in
eval mode. Waits on CPU collectives poll rather than sleep (:data:`poll_ms`).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._autograd import _NO_SYNC_SPECIAL, _special
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_stats", "gather_stats", "check_channels", "all_sum",
           "run_collective", "FusedSyncBatchNorm"]

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


def check_channels(module: Optional[nn.Module], group, num_features: int, name: str, device) -> None:
    """On the first call per module, compare the ranks' channel counts (one small
    all_gather), so that a mismatch is a clear error rather than a hang or garbage."""
    import torch.distributed as dist

    if module is not None and getattr(module, "_sync_checked", False):
        return
    mine = torch.tensor([num_features], dtype=torch.long, device=device)
    theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    run_collective(dist.all_gather, theirs, mine, group=group, cpu=mine.device.type == "cpu")
    channels = [int(t) for t in theirs]
    if len(set(channels)) != 1:
        raise ValueError(f"{name}: ranks disagree on the number of channels: {channels} "
                         "(rank order); every rank must build the same model")
    if module is not None:
        module._sync_checked = True


def gather_stats(local: Tensor, group):
    """Merge every rank's (3, C) float64 (count, mean, biased var) with one all_gather:
    the global (count, mean, biased var), each (1, C) float64.

    The wire format (shape and dtype) is the same on every code path, so ranks taking
    different paths (an empty batch, a layout the kernels do not read) still agree."""
    import torch.distributed as dist

    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    run_collective(dist.all_gather, gathered, local, group=group, cpu=local.device.type == "cpu")
    parts = torch.stack(gathered)                                         # (W, 3, C)
    return F.merge_stats(parts[:, 0], parts[:, 1], parts[:, 2], dim=0)


def sync_stats(mean: Tensor, var: Tensor, count: Tensor, group, num_features: int, name: str,
               module: Optional[nn.Module] = None):
    """Global (mean, biased var, count) from each rank's local ones, with one all_gather
    (and, on the first call per module, the channel check of :func:`check_channels`)."""
    check_channels(module, group, num_features, name, mean.device)
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
    import torch.distributed as dist

    if t.device.type != "cpu":
        run_collective(dist.all_reduce, t, group=group, cpu=False)
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    run_collective(dist.all_gather, parts, t.contiguous(), group=group, cpu=True)
    return torch.stack(parts).sum(dim=0)


class FusedSyncBatchNorm(torch.autograd.Function):
    """SyncBatchNorm's training step on the fused CPU kernels (plain BN, one statistics
    group, no mask): local statistics in one kernel pass, one all_gather of the (3, C)
    float64 (count, mean, biased var) and their merge, the output in one pass; backward:
    the local gradient sums in one pass, one all_gather of the (2, C) float64 (sum dy,
    sum dy * xhat), dx in one pass. The same wire format and mathematics as the generic
    path (:class:`batchnorm._autograd.BatchNormTransform`) with far fewer small tensor
    operations. ``result`` receives mean and invstd in ``x``'s dtype, the biased variance in
    float64 and the global count."""

    @staticmethod
    def forward(ctx, x, weight, bias, lay, eps, group, name, result):
        from . import _fused

        n, c, s, _ = lay
        local = torch.empty(3, c, dtype=torch.float64)
        local[0].fill_(n * s)
        _fused.stats(x, lay, out=local[1:])
        total, gmean, gvar = gather_stats(local, group)                    # (1, C) float64 each
        m = int(total[0, 0]) if c else 0
        F.check_training_count(x, m, name)                                 # before any state changes
        invstd = torch.rsqrt(gvar + eps)
        scale = invstd if weight is None else invstd * weight.detach()
        shift = -gmean * scale
        if bias is not None:
            shift = shift + bias.detach()
        y = torch.empty_like(x)
        _fused.affine(x, lay, scale, shift, y)
        mean32, invstd32 = gmean.reshape(-1).to(x.dtype), invstd.reshape(-1).to(x.dtype)
        ctx.save_for_backward(x, weight, mean32, invstd32)
        ctx.lay, ctx.group, ctx.count = lay, group, m
        ctx.has_bias = bias is not None
        result.extend((mean32, invstd32, gvar.reshape(-1), m))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        from . import _fused

        x, weight, mean, invstd = ctx.saved_tensors
        if _special(grad_out):
            raise NotImplementedError(_NO_SYNC_SPECIAL)
        lay = ctx.lay
        need = ctx.needs_input_grad
        dy = grad_out
        if dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)                             # the kernels read both alike
        sum_dy, sum_dy_xmu = _fused.sums(dy, x, lay, mean, raw=True)        # rows of one (2, C) float64
        local = torch.stack((sum_dy, sum_dy_xmu * invstd.double()))       # (sum dy, sum dy * xhat)
        grad_weight = grad_bias = None
        if weight is not None and need[1]:
            grad_weight = local[1].to(weight.dtype)
        if ctx.has_bias and need[2]:
            grad_bias = local[0].to(weight.dtype if weight is not None else x.dtype)
        grad_x = None
        if need[0]:
            # The statistics were global, so the two sums they feed back must be too.
            g_dy, g_dy_xhat = all_sum(local, ctx.group)
            inv = invstd.double()
            k = inv if weight is None else inv * weight.detach()
            a = k * g_dy / ctx.count
            b = k * g_dy_xhat * inv / ctx.count
            # dL/dx = k dy - b (x - mu_B) - a (Section 3), as one pass.
            grad_x = torch.empty_like(x)
            _fused.grad_input(dy, x, lay, k, -b, b * mean - a, grad_x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNormBase):
    """Batch Normalization with statistics over the global batch of a process group.

    Same arguments as torch.nn.SyncBatchNorm; accepts any input of rank >= 2 and works on
    CPU (gloo) as on CUDA (NCCL). With no initialized process group, or a group of one
    process, it is plain BatchNorm. Running statistics use the global count:
    running_var gets m/(m-1) * sigma2_B with m the values per channel over all ranks.
    ``forward(input, mask=None)`` accepts an (N, L) bool mask for (N, C, L) input.
    Conventions (momentum, eps, unbiased running_var, float32 statistics) as BatchNorm1d.

    On CPU a rank waiting for the others polls the collective, yielding its core, for up to
    :data:`batchnorm.distributed.poll_ms` milliseconds (default 20, or
    ``$BATCHNORM_SYNC_POLL_MS``) before it sleeps on it as usual; set 0 to always sleep
    (e.g. when ranks share cores with other busy work).
    """

    _ranks = (2, 3, 4, 5, 6, 7, 8)
    _name = "SyncBatchNorm"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True, nonfinite: str = "warn") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, nonfinite=nonfinite)
        self.sync = True
        self.process_group = process_group

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(input, Tensor) and input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected an input of rank >= 2 (N, C, ...), got shape {tuple(input.shape)}")
        return self._forward(input, mask)


_NOTHING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
            "__firstlineno__", "__static_attributes__", "__parameters__", "__orig_bases__"}
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_OURS = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


def _adds_behaviour(module: nn.Module, bases) -> Optional[str]:
    """Name what a subclass adds beyond its known BN base, or None if it adds nothing."""
    for klass in type(module).__mro__:
        if klass in bases or klass in (nn.Module, object) or klass.__module__.startswith(("torch.", "batchnorm.")):
            break
        extra = sorted(set(vars(klass)) - _NOTHING)
        if extra:
            return f"class {klass.__name__} defines {', '.join(extra)}"
    children = list(module.named_children())
    if children:
        return f"it has submodules {', '.join(n for n, _ in children)}"
    return None


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BN layer (torch.nn's or ours) by a synchronized one, copying parameters,
    buffers, requires_grad and train/eval mode; returns the converted module.

    Our Batch Renormalization layers keep their class and become synchronized (global r and
    d). A subclass that adds behaviour (extra methods, attributes or submodules, like timm's
    BatchNormAct2d) is refused with a ValueError rather than silently losing it.
    """
    from .renorm import _BatchRenorm

    def convert(m: nn.Module, name: str) -> nn.Module:
        if getattr(m, "virtual_batch_size", None) is not None:
            raise ValueError(f"convert_sync_batchnorm: {name or 'module'} ({type(m).__name__}) uses ghost batches "
                             f"(virtual_batch_size={m.virtual_batch_size}), which are per-replica chunks and do "
                             "not combine with synchronized statistics; drop one of the two")
        if isinstance(m, _BatchRenorm):
            why = _adds_behaviour(m, (_BatchRenorm,) + tuple(_BatchRenorm.__subclasses__()))
            if why:
                raise ValueError(f"convert_sync_batchnorm: {name or 'module'} ({type(m).__name__}): {why}; "
                                 "converting would drop it")
            new = copy.deepcopy(m)
            new.sync = True
            new.process_group = process_group
            return new
        if isinstance(m, _TORCH_BN + _OURS) and not isinstance(m, _BatchRenorm):
            why = _adds_behaviour(m, _TORCH_BN + _OURS)
            if why:
                raise ValueError(f"convert_sync_batchnorm: {name or 'module'} ({type(m).__name__}): {why}; "
                                 "converting would drop it")
            new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                process_group, bias=getattr(m, "bias", None) is not None or not m.affine,
                                nonfinite=getattr(m, "nonfinite", "warn"))
            with torch.no_grad():
                if m.affine:
                    new.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
                if m.bias is not None:
                    new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
                if m.track_running_stats:
                    new.running_mean = m.running_mean.detach().clone()
                    new.running_var = m.running_var.detach().clone()
                    new.num_batches_tracked = m.num_batches_tracked.detach().clone()
            new.frozen = getattr(m, "frozen", False)
            new.train(m.training)
            return new
        for child_name, child in m.named_children():
            setattr(m, child_name, convert(child, f"{name}.{child_name}" if name else child_name))
        return m

    return convert(module, "")
