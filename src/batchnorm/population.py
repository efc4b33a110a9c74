"""Population statistics (Algorithm 2, steps 7-10): exact averages over training batches."""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

import torch
from torch import nn

from . import _stats
from .functional import statistics_sinks
from .modules import _BatchNormBase

__all__ = ["population_statistics", "is_batchnorm"]


def is_batchnorm(module: nn.Module) -> bool:
    """True for this package's BN modules and torch.nn's (BatchNorm1d/2d/3d, SyncBatchNorm, Lazy*)."""
    return isinstance(module, (_BatchNormBase, nn.modules.batchnorm._BatchNorm))


def _default_forward(model: nn.Module, batch: Any):
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


class _TorchSink:
    """Forward pre-hook computing a torch.nn BN's batch statistics from its input."""

    def __init__(self, module: nn.Module) -> None:
        self.records: List = []
        self.module = module

    def __call__(self, module, args):
        x = args[0]
        with torch.no_grad():
            mean, var, count, _, _ = _stats.batch_stats(_stats.grouped_view(x, 1))
        self.records.append((mean.reshape(1, -1), _stats.unbiased(var, count).reshape(1, -1)))


@torch.no_grad()
def population_statistics(model: nn.Module, batches: Iterable[Any], *,
                          forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> nn.Module:
    """Set every BN layer's running statistics to population estimates (Algorithm 2, 7-10).

    For each BN layer: running_mean = E_B[mu_B] and running_var = E_B[m/(m-1) sigma2_B],
    plain averages over the given training mini-batches (not an EMA; m = values per channel
    in each mini-batch, so unequal batch sizes are each unbiased with their own m). Ghost
    batches and masks count as they do in training (each ghost chunk is one mini-batch).

    The batches run through the training network (Algorithm 2's N_tr^BN): BN layers use
    batch statistics, every other module is in eval mode (no dropout noise). Parameters
    and num_batches_tracked are not touched and every module's train/eval mode is restored.
    ``forward(model, batch)`` says how to run a batch (default: ``model(batch[0])`` for a
    tuple/list, else ``model(batch)``). Returns ``model``.
    """
    run = forward if forward is not None else _default_forward
    bns = [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]
    if not bns:
        raise ValueError("population_statistics: the model has no BatchNorm layer")
    for name, m in bns:
        if m.running_mean is None:
            raise ValueError(f"population_statistics: BN layer {name!r} has track_running_stats=False; "
                             "it has no running statistics to set")
    modes = {m: m.training for m in model.modules()}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for _, m in bns}
    frozen = {m: getattr(m, "frozen", False) for _, m in bns}
    sinks = {}
    hooks = []
    try:
        model.eval()
        for _, m in bns:
            m.train()
            if isinstance(m, _BatchNormBase):
                m.frozen = False
                sinks[m] = statistics_sinks[m] = []
            else:
                sink = _TorchSink(m)
                hooks.append(m.register_forward_pre_hook(sink))
                sinks[m] = sink.records
        n_batches = 0
        for batch in batches:
            run(model, batch)
            n_batches += 1
        if n_batches == 0:
            raise ValueError("population_statistics: got no batches")
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        for _, m in bns:
            rm, rv, nbt = saved[m]
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
            if isinstance(m, _BatchNormBase):
                statistics_sinks.pop(m, None)
                m.frozen = frozen[m]
    results = []
    for name, m in bns:
        records = sinks[m]
        if not records:
            raise ValueError(f"population_statistics: BN layer {name!r} saw no batch "
                             "(is it used in the model's forward?)")
        means = torch.cat([r[0] for r in records]).double()          # (batches, C)
        variances = torch.cat([r[1] for r in records]).double()      # (batches, C)
        if not (torch.isfinite(means).all() and torch.isfinite(variances).all()):
            raise ValueError(f"population_statistics: BN layer {name!r} saw non-finite statistics; "
                             "no running statistics were changed")
        results.append((m, means.mean(dim=0), variances.mean(dim=0)))
    # Only once every layer is known good does any buffer change.
    for m, mean, var in results:
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return model
