"""Synchronized Batch Normalization over torch.distributed: gloo on CPU, NCCL on CUDA.

Each replica computes its local per-channel (count, mean, biased variance); one
all_gather per layer in the forward merges them exactly and stably (count-weighted mean
and M2, :func:`batchnorm.functional.merge_stats`), and one all_reduce in the backward sums
the two per-channel gradient sums of Section 3. No collective runs in eval mode.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_stats"]


def sync_stats(mean: Tensor, var: Tensor, count: Tensor, group, num_features: int, name: str,
               module: Optional[nn.Module] = None):
    """Global (mean, biased var, count) from each rank's local ones, with one all_gather.

    On the first call per module the ranks also compare their channel counts (one extra
    small all_gather), so a mismatch is a clear error rather than a hang or garbage.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if module is not None and not getattr(module, "_sync_checked", False):
        mine = torch.tensor([num_features], dtype=torch.long, device=mean.device)
        theirs = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(theirs, mine, group=group)
        channels = [int(t) for t in theirs]
        if len(set(channels)) != 1:
            raise ValueError(f"{name}: ranks disagree on the number of channels: {channels} "
                             "(rank order); every rank must build the same model")
        module._sync_checked = True
    # Why one collective: the three per-channel statistics travel together.
    local = torch.stack([count.reshape(-1), mean.reshape(-1), var.reshape(-1)]).to(mean.dtype)  # (3, C)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    parts = torch.stack(gathered)                                         # (W, 3, C)
    total, gmean, gvar = F.merge_stats(parts[:, 0], parts[:, 1], parts[:, 2], dim=0)  # (1, C) each
    return gmean.view_as(mean), gvar.view_as(var), total.view_as(count)


class SyncBatchNorm(_BatchNormBase):
    """Batch Normalization with statistics over the global batch of a process group.

    Same arguments as torch.nn.SyncBatchNorm; accepts any input of rank >= 2 and works on
    CPU (gloo) as on CUDA (NCCL). With no initialized process group, or a group of one
    process, it is plain BatchNorm. Running statistics use the global count:
    running_var gets m/(m-1) * sigma2_B with m the values per channel over all ranks.
    ``forward(input, mask=None)`` accepts an (N, L) bool mask for (N, C, L) input.
    Conventions (momentum, eps, unbiased running_var, float32 statistics) as BatchNorm1d.
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
