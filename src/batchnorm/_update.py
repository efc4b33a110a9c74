"""The running statistics (Algorithm 2's moving averages) and their NaN/Inf guard: the one
place that folds a batch's statistics into running_mean, running_var and
num_batches_tracked, on every path that does it in torch operations (the fused kernels
apply the same rule in C for the plain training step)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from ._errors import NonFiniteBatchError, NonFiniteBatchWarning

__all__ = ["update_running_stats", "unbiased", "report_nonfinite"]


def unbiased(var: Tensor, count) -> Tensor:
    """m/(m-1) * var (Algorithm 2, step 10); ``count`` the m of each statistic."""
    if isinstance(count, Tensor):
        return var * count / (count - 1).clamp_min(1.0)
    return var * (count / max(count - 1, 1))


def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    batch_mean: Tensor,
    batch_var_unbiased: Tensor,
    momentum: Optional[float],
    nonfinite: str = "warn",
    name: str = "batch_norm",
) -> bool:
    """Fold one batch's per-channel statistics (shape ``(C,)``) into the running buffers in place.

    running = (1 - momentum) * running + momentum * batch; ``momentum=None`` uses
    1 / num_batches_tracked (cumulative average). If any statistic is NaN/Inf nothing is
    changed (not even num_batches_tracked) and, by ``nonfinite``, a
    :class:`NonFiniteBatchWarning` is issued ("warn"), a :class:`NonFiniteBatchError` raised
    ("raise"), or nothing said ("ignore"). Returns whether the batch was accepted.
    """
    finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var_unbiased).all()
    if not torch.compiler.is_compiling():
        if not bool(finite):
            report_nonfinite(nonfinite, name)
            return False
        with torch.no_grad():
            # The counter last: the buffers' checks ran before (check_arguments).
            if momentum is not None:
                factor = float(momentum)
            elif num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs a num_batches_tracked buffer")
            else:
                factor = 1.0 / (float(num_batches_tracked) + 1.0)
            # Through .data, as torch's kernels update the buffers: without a version bump, so
            # a graph that saved them (torch's batch-norm node does) stays differentiable.
            if running_mean is not None:
                running_mean.data.lerp_(batch_mean.to(running_mean.dtype), factor)
            if running_var is not None:
                running_var.data.lerp_(batch_var_unbiased.to(running_var.dtype), factor)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
        return True
    # Under torch.compile: no data-dependent branch (it would break the graph); select instead.
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
        factor = _factor(momentum, num_batches_tracked)
        if running_mean is not None:
            running_mean.copy_(torch.where(finite, torch.lerp(running_mean, batch_mean.to(running_mean.dtype), factor), running_mean))
        if running_var is not None:
            running_var.copy_(torch.where(finite, torch.lerp(running_var, batch_var_unbiased.to(running_var.dtype), factor), running_var))
    return True


def _factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]):
    """The weight of the new batch: ``momentum``, or 1/num_batches_tracked (already counting
    this batch) for the cumulative average; a tensor under torch.compile (no host read)."""
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs a num_batches_tracked buffer")
    if torch.compiler.is_compiling():
        return 1.0 / num_batches_tracked.clamp_min(1).to(torch.float32)
    return 1.0 / float(num_batches_tracked.clamp_min(1))


def report_nonfinite(nonfinite: str, name: str) -> None:
    msg = (f"{name}: the training batch has NaN or Inf statistics (non-finite or overflowing input); "
           "running statistics were not updated")
    if nonfinite == "raise":
        raise NonFiniteBatchError(msg)
    if nonfinite == "warn":
        warnings.warn(msg, NonFiniteBatchWarning, stacklevel=4)
    elif nonfinite != "ignore":
        raise ValueError(f"nonfinite must be 'warn', 'raise' or 'ignore', got {nonfinite!r}")
