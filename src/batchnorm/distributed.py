"""Synchronized Batch Normalization over torch.distributed: gloo on CPU, NCCL on CUDA.

Each replica computes its local per-channel (count, mean, biased variance); one
all_gather per layer in the forward merges them exactly and stably (count-weighted mean
and M2, :func:`batchnorm.functional.merge_stats`), and one collective in the backward sums
the two per-channel gradient sums of Section 3. No collective runs in eval mode. The
collectives are :mod:`batchnorm._collectives`; waits on CPU collectives poll rather than
sleep (:data:`poll_ms`, settable here).
"""

from __future__ import annotations

import copy
import sys
import types
from typing import Optional

import torch
from torch import Tensor, nn

from . import _collectives
from ._collectives import all_sum, check_channels, gather_stats, run_collective, sync_stats
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormBase, added_behaviour
from .act import _BatchNormAct
from .renorm import _BatchRenorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "poll_ms", "sync_stats", "gather_stats", "check_channels",
           "all_sum", "run_collective"]


class _Module(types.ModuleType):
    """This module, with :data:`poll_ms` read from and written to the collectives layer."""

    @property
    def poll_ms(self) -> float:
        """How long (milliseconds) a rank waiting for a CPU (gloo) collective polls it, yielding
        its core, before it falls back to a blocking wait: :data:`batchnorm._collectives.poll_ms`
        (default $BATCHNORM_SYNC_POLL_MS, else 20; 0 always blocks)."""
        return _collectives.poll_ms

    @poll_ms.setter
    def poll_ms(self, value: float) -> None:
        _collectives.poll_ms = float(value)


sys.modules[__name__].__class__ = _Module


class SyncBatchNorm(_BatchNormBase):
    """Batch Normalization with statistics over the global batch of a process group.

    A subclass of torch.nn's ``_BatchNorm`` (what BN helpers look for), not of
    torch.nn.SyncBatchNorm: DistributedDataParallel refuses any module holding a
    torch.nn.SyncBatchNorm on CPU ("SyncBatchNorm layers only work with GPU modules"),
    which would forbid exactly what this class adds. ``SyncBatchNorm.convert_sync_batchnorm``
    is this module's :func:`convert_sync_batchnorm`, as torch's classmethod is torch's.

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

    Every rank must call the same synchronized layers in the same order, as running the
    same model does. Each forward's all_gather also carries the call's number on the process
    group and the layer's number (the order in which the process created its synchronized
    layers), so ranks that call different layers get a RuntimeError on every rank, before any
    running statistic changes, rather than statistics merged across layers (not checked in
    code that torch.compile traces).

    A rank whose peer died waits in its next collective until the process group's timeout:
    30 minutes by default (10 on NCCL). A training script should set one that fits its
    slowest step, e.g. ``torch.distributed.init_process_group(backend,
    timeout=datetime.timedelta(minutes=5))``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
            nonfinite: as :class:`batchnorm.BatchNorm1d`'s.
        process_group: the group whose global batch the statistics span; None: the world.

    Shape:
        Input: (N, C, *), N may differ between ranks (even 0 on some). Output: the input's.

    Example::

        >>> # in each process, after torch.distributed.init_process_group("gloo", ...)
        >>> model = convert_sync_batchnorm(model)  # doctest: +SKIP
        >>> y = SyncBatchNorm(64)(torch.randn(8, 64, 16, 16))
    """

    _ranks = (2, 3, 4, 5, 6, 7, 8)
    _name = "SyncBatchNorm"
    _plain_bn = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True, nonfinite: str = "warn") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, nonfinite=nonfinite)
        self.sync = True
        self.process_group = process_group
        _collectives.number_layer(self)  # the ranks' check that they call the same layer

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if isinstance(input, Tensor) and input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected an input of rank >= 2 (N, C, ...), got shape {tuple(input.shape)}")
        return self._forward(input, mask)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """:func:`batchnorm.distributed.convert_sync_batchnorm` (ours, not torch's: the layers
        made are this class, which runs on CPU too)."""
        return convert_sync_batchnorm(module, process_group)


_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_OURS = (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BN layer (torch.nn's or ours) by a synchronized one, copying parameters,
    buffers, requires_grad and train/eval mode; returns the converted module.

    Our Batch Renormalization layers keep their class and become synchronized (global r and
    d). A subclass that adds behaviour (extra methods, attributes or submodules, like timm's
    BatchNormAct2d) is refused with a ValueError rather than silently losing it.
    """

    def convert(m: nn.Module, name: str) -> nn.Module:
        if getattr(m, "virtual_batch_size", None) is not None:
            raise ValueError(f"convert_sync_batchnorm: {name or 'module'} ({type(m).__name__}) uses ghost batches "
                             f"(virtual_batch_size={m.virtual_batch_size}), which are per-replica chunks and do "
                             "not combine with synchronized statistics; drop one of the two")
        if isinstance(m, (_BatchRenorm, _BatchNormAct)):
            # Ours keep their class (renormalization, activation) and synchronize.
            why = added_behaviour(m) if type(m).__module__.split(".")[0] != "batchnorm" else None
            if why:
                raise ValueError(f"convert_sync_batchnorm: {name or 'module'} ({type(m).__name__}): {why}; "
                                 "converting would drop it")
            new = copy.deepcopy(m)
            new.sync = True
            new.process_group = process_group
            _collectives.number_layer(new)
            return new
        if isinstance(m, _TORCH_BN + _OURS) and not isinstance(m, (_BatchRenorm, _BatchNormAct)):
            why = added_behaviour(m)
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
