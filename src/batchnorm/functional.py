"""Pure functions of Batch Normalization: statistics, the transform, running-stat updates.

Every variant in this package (plain BN, ghost batches, masks, SyncBatchNorm, Batch
Renormalization, population statistics) computes its batch statistics with
:func:`batch_stats`, so a numerical fix made there lands everywhere at once.

Conventions (Ioffe & Szegedy 2015, with PyTorch's naming):

* ``momentum`` is the weight of the new batch: ``running = (1 - momentum) * running +
  momentum * batch``; ``momentum=None`` gives the cumulative average.
* Normalization uses the biased batch variance (Algorithm 1); ``running_var`` stores the
  unbiased one, ``m / (m - 1)`` times it, with ``m`` the values per channel (Algorithm 2).
* ``eps`` sits inside the square root: ``xhat = (x - mu) / sqrt(var + eps)``.
* Statistics are computed in float32 for float16/bfloat16 inputs (float64 for float64);
  the output has the input's dtype.
* A training batch whose statistics are not finite (NaN/Inf in the input) updates no
  running statistic.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._autograd import BatchNormTransform

__all__ = [
    "batch_norm",
    "batch_stats",
    "merge_stats",
    "stat_dtype",
    "update_running_stats",
    "check_input",
    "NonFiniteBatchWarning",
    "NonFiniteBatchError",
]


class NonFiniteBatchWarning(UserWarning):
    """A training batch had NaN/Inf statistics; running statistics were left unchanged."""


class NonFiniteBatchError(ValueError):
    """Raised instead of :class:`NonFiniteBatchWarning` when ``nonfinite="raise"``."""


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(input: Tensor, num_features: Optional[int], ranks: Sequence[int], name: str) -> None:
    """Raise a clear error, before any state changes, if ``input`` is not a valid BN input.

    ``ranks`` lists the accepted numbers of dimensions; ``num_features`` the channel count
    expected in dimension 1 (``None`` skips that check).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(input).__name__}")
    if not (input.is_floating_point()):
        raise TypeError(
            f"{name}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got dtype {input.dtype}"
        )
    if input.dim() not in ranks:
        shapes = " or ".join(_shape_words(r) for r in ranks)
        raise ValueError(f"{name}: expected {shapes} input, got a {input.dim()}-D input of shape {tuple(input.shape)}")
    if num_features is not None and input.size(1) != num_features:
        raise ValueError(
            f"{name}: expected {num_features} channels in dimension 1 (input of shape "
            f"(N, {num_features}, ...)), got shape {tuple(input.shape)}"
        )


def _shape_words(rank: int) -> str:
    letters = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
    return f"{rank}-D {letters.get(rank, '')}".strip()


def check_training_count(input: Tensor, count_per_channel: int, name: str) -> None:
    """Training needs a non-empty batch and at least two values per channel."""
    if input.size(0) == 0:
        raise ValueError(f"{name}: got an empty batch (shape {tuple(input.shape)}) in training mode; "
                         "batch statistics need at least one example")
    if count_per_channel <= 1:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(input.shape)} ({count_per_channel} value per channel); use eval() or a larger batch"
        )


def reduce_dims(ndim: int) -> Tuple[int, ...]:
    """Dimensions to reduce over for a grouped view ``(G, n, C, *spatial)``: all but 0 and 2."""
    return (1,) + tuple(range(3, ndim))


def batch_stats(x: Tensor, dims: Sequence[int], mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and count of ``x`` over ``dims`` (kept, size 1).

    mu_B = (1/m) sum_i x_i and sigma2_B = (1/m) sum_i (x_i - mu_B)^2 (Algorithm 1), with m the
    number of values (``mask`` true) per channel.

    Numerical choices: accumulation in float32 (float64 for float64 input); the variance is
    computed in a second pass over the centred values, never as E[x^2] - E[x]^2, so a
    large common offset does not cancel the variance away. ``mask`` is a 0/1 tensor broadcastable to ``x``.
    """
    dt = stat_dtype(x.dtype)
    xs = x if x.dtype == dt else x.to(dt)
    dims = tuple(dims)
    if xs.numel() == 0:  # an empty part (e.g. one rank's empty batch) contributes count 0
        shape = [1 if i in dims else s for i, s in enumerate(xs.shape)]
        zeros = xs.new_zeros(shape)
        return zeros, zeros.clone(), zeros.clone()
    if mask is None:
        count = 1
        for d in dims:
            count *= x.size(d)
        # Corrected two-pass algorithm (Chan, Golub & LeVeque): a first mean, then the mean
        # and mean square of the values centred on it; the small correction term makes the
        # mean exact to rounding even when float32 sums of large values are not. (torch's
        # Welford var_mean is as exact but 2-3 times slower on CPU for these layouts.)
        first = torch.sum(xs, dim=dims, keepdim=True) / count
        centred = xs - first
        correction = torch.sum(centred, dim=dims, keepdim=True) / count
        var = torch.sum(centred.square_(), dim=dims, keepdim=True) / count - correction.square()
        return first + correction, var.clamp_min_(0.0), torch.full_like(first, float(count))
    w = mask.to(dt)
    count = torch.sum(w.expand_as(xs), dim=dims, keepdim=True)
    safe = count.clamp_min(1.0)
    mean = torch.sum(xs * w, dim=dims, keepdim=True) / safe
    var = torch.sum(torch.square(xs - mean) * w, dim=dims, keepdim=True) / safe
    return mean, var, count


def merge_stats(counts: Tensor, means: Tensor, variances: Tensor, dim: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge per-part (count, mean, biased variance) along ``dim`` into the statistics of the union.

    Count-weighted mean, and M2 = sum_k [n_k var_k + n_k (mean_k - mean)^2] (Chan et al.):
    exact and stable, with no raw sum of squares. Parts with count 0 contribute nothing.
    """
    total = counts.sum(dim=dim, keepdim=True)
    safe = total.clamp_min(1.0)
    mean = (counts * means).sum(dim=dim, keepdim=True) / safe
    m2 = (counts * (variances + torch.square(means - mean))).sum(dim=dim, keepdim=True)
    return total, mean, m2 / safe


def unbiased(var: Tensor, count: Tensor) -> Tensor:
    """m/(m-1) * var (Algorithm 2, step 10)."""
    return var * count / (count - 1).clamp_min(1.0)


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
            _report_nonfinite(nonfinite, name)
            return False
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            factor = _factor(momentum, num_batches_tracked)
            if running_mean is not None:
                running_mean.lerp_(batch_mean.to(running_mean.dtype), factor)
            if running_var is not None:
                running_var.lerp_(batch_var_unbiased.to(running_var.dtype), factor)
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


def _factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> float:
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs a num_batches_tracked buffer")
    return 1.0 / float(num_batches_tracked.clamp_min(1))


def _report_nonfinite(nonfinite: str, name: str) -> None:
    msg = (f"{name}: the training batch has NaN or Inf statistics (non-finite or overflowing input); "
           "running statistics were not updated")
    if nonfinite == "raise":
        raise NonFiniteBatchError(msg)
    if nonfinite == "warn":
        warnings.warn(msg, NonFiniteBatchWarning, stacklevel=4)
    elif nonfinite != "ignore":
        raise ValueError(f"nonfinite must be 'warn', 'raise' or 'ignore', got {nonfinite!r}")


def grouped_view(x: Tensor, groups: int) -> Tensor:
    """View ``(N, C, *S)`` as ``(groups, N // groups, C, *S)``; works for any memory format."""
    return x.view((groups, x.size(0) // groups) + tuple(x.shape[1:]))


def transform(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    count: Tensor,
    mask: Optional[Tensor] = None,
    r: Optional[Tensor] = None,
    d: Optional[Tensor] = None,
    process_group=None,
) -> Tensor:
    """Training-mode BN transform of a grouped view ``x`` (G, n, C, *S) with the
    hand-written backward of Section 3 (see :mod:`batchnorm._autograd`).

    ``mean``/``invstd``/``count`` are the batch statistics of ``x`` (computed without
    autograd; the backward accounts for their dependence on ``x``). ``r``/``d`` are Batch
    Renormalization's corrections (constants). ``process_group``, if given, means the
    statistics are global over the group and the backward all-reduces its two sums.
    """
    return BatchNormTransform.apply(x, weight, bias, mean, invstd, count, mask, r, d, process_group)


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    impl: str = "auto",
    nonfinite: str = "warn",
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    """Batch Normalization, torch.nn.functional.batch_norm's signature.

    Training (Algorithm 1): y = weight * (x - mu_B) / sqrt(sigma2_B + eps) + bias with
    per-channel batch statistics over every dimension but 1 (per activation for (N, C) and
    (N, C, L); per feature map, m' = N*H*W values, for convolutions, Section 3.2), and the
    running buffers, if given, updated with mu_B and the unbiased m/(m-1) sigma2_B.
    Inference: the same map with the running statistics.

    ``impl``: "paper" always uses the hand-written autograd Function of this package;
    "native" uses torch's kernel; "auto" (default) uses torch's kernel, which computes the
    same function, since the plain transform has nothing extra to do. Either way a batch
    with non-finite statistics leaves the running buffers untouched (``nonfinite`` says
    whether to "warn", "raise" or "ignore"). ``momentum=None`` needs ``num_batches_tracked``.
    """
    check_input(input, running_mean.numel() if running_mean is not None else None, (2, 3, 4, 5), "batch_norm")
    if impl not in ("auto", "native", "paper"):
        raise ValueError(f"impl must be 'auto', 'native' or 'paper', got {impl!r}")
    C = input.size(1)
    for pname, p in (("weight", weight), ("bias", bias), ("running_var", running_var)):
        if p is not None and p.numel() != C:
            raise ValueError(f"batch_norm: {pname} has {p.numel()} elements, expected {C} (the input's channels)")
    if training:
        check_training_count(input, input.numel() // max(C, 1), "batch_norm")
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
    if momentum is None and training and running_mean is not None and num_batches_tracked is None:
        raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked")

    if not training:
        return _eval(input, running_mean, running_var, weight, bias, eps, impl)

    if impl == "paper":
        return _train_paper(input, running_mean, running_var, weight, bias, momentum, eps,
                            nonfinite, num_batches_tracked)
    return _train_native(input, running_mean, running_var, weight, bias, momentum, eps,
                         nonfinite, num_batches_tracked)


def _eval(input, running_mean, running_var, weight, bias, eps, impl):
    if impl != "paper":
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    scale, shift = affine_coefficients(running_mean, running_var, weight, bias, eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    dt = stat_dtype(input.dtype)
    return (input.to(dt) * scale.to(dt).view(shape) + shift.to(dt).view(shape)).to(input.dtype)


def affine_coefficients(running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                        bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """Inference BN as one affine map (Algorithm 2, step 11): y = scale * x + shift with
    scale = gamma / sqrt(Var[x] + eps) and shift = beta - scale * E[x]."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def _train_native(input, running_mean, running_var, weight, bias, momentum, eps, nonfinite, nbt):
    if running_mean is None:
        return torch.nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    factor = momentum if momentum is not None else 1.0 / (float(nbt) + 1.0)
    if torch.compiler.is_compiling():
        # No data-dependent branch under compile: update scratch copies and select.
        rm, rv = running_mean.clone(), running_var.clone()
        out = torch.nn.functional.batch_norm(input, rm, rv, weight, bias, True, factor, eps)
        finite = torch.isfinite(rm).all() & torch.isfinite(rv).all()
        with torch.no_grad():
            running_mean.copy_(torch.where(finite, rm, running_mean))
            running_var.copy_(torch.where(finite, rv, running_var))
            if nbt is not None:
                nbt.add_(finite.to(nbt.dtype))
        return out
    # torch's kernel updates the buffers in place. Keep a backup (one small op) and put it
    # back if the update is not finite, so a NaN/Inf batch cannot poison the statistics.
    backup = torch.stack((running_mean, running_var))                    # (2, C)
    out = torch.batch_norm(input, weight, bias, running_mean, running_var, True, factor, eps,
                           torch.backends.cudnn.enabled)
    if _var_finite(running_var):
        if nbt is not None:
            nbt.add_(1)  # buffers never require grad: no no_grad() needed (it costs microseconds)
    else:
        running_mean.copy_(backup[0])
        running_var.copy_(backup[1])
        _report_nonfinite(nonfinite, "batch_norm")
    return out


def _var_finite(running_var: Tensor) -> bool:
    """Whether a running-variance update stayed finite, with one reduction and one sync.

    Checking the variance suffices: a NaN or Inf anywhere in a channel makes its batch mean
    non-finite, and x - mean then makes its variance NaN or Inf as well; an overflowing
    variance is caught directly. A sum of finite variances overflows only if the variances
    themselves are near float32's limit, where the update is rejected too.
    """
    return math.isfinite(float(running_var.sum()))


def _train_paper(input, running_mean, running_var, weight, bias, momentum, eps, nonfinite, nbt):
    xv = grouped_view(input, 1)
    dims = reduce_dims(xv.dim())
    with torch.no_grad():
        mean, var, count = batch_stats(xv, dims)
        invstd = torch.rsqrt(var + eps)
    out = transform(xv, weight, bias, mean, invstd, count).view(input.shape)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, nbt, mean.reshape(-1), unbiased(var, count).reshape(-1),
                             momentum, nonfinite, "batch_norm")
    return out
