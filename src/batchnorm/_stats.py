"""Statistics: the one place where a batch's statistics are computed, checked and folded
into the running buffers (the layer above the kernel backends, :mod:`batchnorm._fused`
and :mod:`batchnorm._reference`).

* :func:`batch_stats`: per-group, per-channel mean, biased variance and count of a grouped
  view (G, n, C, *S), for plain BN (G = 1), ghost batches (G > 1) and masks; the cross-rank
  merge of synchronized BN is :func:`merge_stats`.
* :func:`unbiased`: Algorithm 2's m/(m-1) factor.
* :func:`update_running_stats`: the one running-statistics update (momentum or cumulative
  average, the NaN/Inf guard, num_batches_tracked), with :func:`momentum_factor`.
* :func:`offset_risk` / :data:`OFFSET_RISK`: when naive float sums of a channel could have
  rounded its statistics away (a large common offset), the one test every method uses.
* :func:`renorm_rd` (Batch Renormalization's r and d) and :func:`affine_coefficients`
  (inference BN as one affine map).
* The argument checks every path runs before any state changes: :func:`check_input`,
  :func:`check_arguments`, :func:`check_counter`, :func:`check_training_count`.

Conventions (Ioffe & Szegedy 2015, PyTorch's naming): ``momentum`` is the weight of the
new batch; normalization uses the biased batch variance, running_var stores the unbiased
one; ``eps`` sits inside the square root; statistics are computed in float32 for
float16/bfloat16 input (float64 for float64).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _fused, _reference
from ._errors import MismatchError, NonFiniteBatchError, NonFiniteBatchWarning
from ._reference import channel, reduce_dims, stat_dtype

__all__ = [
    "OFFSET_RISK", "affine_coefficients", "batch_stats", "check_arguments", "check_counter", "check_input",
    "check_training_count", "grouped_view", "merge_stats", "momentum_factor", "offset_risk", "reduce_dims",
    "prepare_update", "renorm_rd", "report_nonfinite", "stat_dtype", "unbiased", "update_running_stats",
]

_HALF = (torch.float16, torch.bfloat16)

# -- the risk test ----------------------------------------------------------------------------

#: A channel whose naive float sums could be off by more than this fraction of a standard
#: deviation is "at risk": sqrt(m) * u * |mean| / std > OFFSET_RISK, u the unit roundoff of
#: the input's dtype and m the values per channel (the error bound of a sum of m values,
#: relative to what it is compared with). Methods whose sums are naive (torch's CPU
#: statistics kernel) recompute such a batch on shifted values.
OFFSET_RISK = 1e-3


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def offset_risk(mean: Tensor, invstd: Tensor, m: int, dtype: torch.dtype) -> Tensor:
    """Whether any channel is at risk (:data:`OFFSET_RISK`), as a 0-d bool tensor; ``invstd``
    is 1/std (eps included or not: it only makes the test stricter)."""
    return (mean.abs() * invstd * (math.sqrt(m) * unit_roundoff(dtype)) > OFFSET_RISK).any()


def check_kernel_stats(mean: Tensor, invstd: Tensor, m: int, check_offset: bool = True) -> int:
    """The batch statistics (mean, invstd) of ``m`` values per channel from torch's kernel:
    0 fine, 1 not finite (NaN/Inf, or an overflowing variance), 2 at offset risk (only with
    ``check_offset``). One kernel call (:func:`batchnorm._fused.check_stats`, the same test
    as :func:`offset_risk`) or a few torch operations."""
    threshold = OFFSET_RISK if check_offset else 0.0
    code = _fused.check_stats(mean, invstd, m, threshold, unit_roundoff(mean.dtype))
    if code is not None:
        return code
    with torch.no_grad():
        finite = torch.isfinite(mean).all() & torch.isfinite(invstd).all() & (invstd > 0).all()
        ok, risk = torch.stack((finite, offset_risk(mean, invstd, m, mean.dtype))).tolist()
    if not ok:
        return 1
    return 2 if check_offset and risk else 0


# -- batch statistics ---------------------------------------------------------------------------

def grouped_view(x: Tensor, groups: int) -> Tensor:
    """View ``(N, C, *S)`` as ``(groups, N // groups, C, *S)``; works for any memory format."""
    return x.view((groups, x.size(0) // groups) + tuple(x.shape[1:]))


def batch_stats(xv: Tensor, mask: Optional[Tensor] = None, *, method: str = "auto", keep_work: bool = False):
    """Per-group, per-channel mean, biased variance and count of the grouped view ``xv``
    (G, n, C, *S), each (G, 1, C, 1, ...) in :func:`stat_dtype`: mu_B = (1/m) sum_i x_i and
    sigma2_B = (1/m) sum_i (x_i - mu_B)^2 (Algorithm 1), m the values per channel (where
    ``mask``, (G, n, 1, L) bool or 0/1, is true). Returns (mean, var, count, work, center):
    ``work``/``center``, where the method leaves them (``keep_work``), are a private buffer
    x - center of ``xv``'s shape and memory format and its per-channel center, which the
    transform may overwrite with its output; else None.

    ``method``: "reference": torch operations that every autograd mode can differentiate
    (:func:`batchnorm._reference.moments`); "kernels": the fused C kernels' statistics
    where they read the layout (shifted sums in double, one read), else "auto"'s torch
    methods; "auto": torch operations chosen by layout, never E[x^2] - E[x]^2 of raw values:

    * NCHW-contiguous with spatial size >= 32: a first mean from row sums, then the centred
      values, their sum (a correction to the mean) and their per-row Euclidean norms.
    * channels-innermost, one group, CPU: torch's fused statistics kernel, whose float sums
      are naive; a channel at :func:`offset_risk` is recomputed on x minus one sample.
    * anything else, masks, and under torch.compile: the corrected two-pass algorithm.
    """
    dt = stat_dtype(xv.dtype)
    if method == "reference":
        xs = xv if xv.dtype == dt else xv.to(dt)
        mean, var, count = _reference.moments(xs, mask)
        return mean, var, count, None, None
    dims = reduce_dims(xv.dim())
    if xv.numel() == 0:  # an empty part (e.g. one rank's empty batch) contributes count 0
        shape = [1 if i in dims else s for i, s in enumerate(xv.shape)]
        zeros = xv.new_zeros(shape, dtype=dt)
        return zeros, zeros.clone(), zeros.clone(), None, None
    if mask is not None:
        # Positions outside the mask are left out with a select, not a product with 0/1,
        # so that even NaN there does not reach the statistics (as in the fused kernels).
        valid = mask if mask.dtype == torch.bool else mask != 0
        xs = xv if xv.dtype == dt else xv.to(dt)
        count = torch.sum(valid.to(dt).expand_as(xs), dim=dims, keepdim=True)
        safe = count.clamp_min(1.0)
        mean = torch.sum(torch.where(valid, xs, 0.0), dim=dims, keepdim=True) / safe
        var = torch.sum(torch.where(valid, torch.square(xs - mean), 0.0), dim=dims, keepdim=True) / safe
        return mean, var, count, None, None
    count = xv[0].numel() // xv.size(2)
    shape = (xv.size(0), 1, xv.size(2)) + (1,) * (xv.dim() - 3)
    lay = _fused.layout(xv[0]) if method == "kernels" and type(xv) is torch.Tensor else None
    if lay is not None and not torch.compiler.is_compiling():
        if xv.size(0) == 1:  # (one group: no stack)
            mean, var = (t.view(shape) for t in _fused.stats(xv[0], lay))
        else:
            parts = [_fused.stats(xv[g], lay) for g in range(xv.size(0))]
            mean = torch.stack([p[0] for p in parts]).view(shape)
            var = torch.stack([p[1] for p in parts]).view(shape)
        return mean, var, torch.full_like(mean, float(count)), None, None
    spatial = xv[0, 0, 0].numel()
    if torch.compiler.is_compiling():
        mean, var, work, center = _two_pass(xv, dims, count, dt)  # no data-dependent branch
    elif xv.dim() >= 4 and spatial >= 32 and xv.is_contiguous():
        mean, var, work, center = _rows(xv, count, dt)
    elif xv.size(0) == 1 and xv.dtype == dt and xv.stride(2) == 1 and xv.device.type == "cpu":
        mean, var, work, center = _channels_last(xv, count)
    else:
        mean, var, work, center = _two_pass(xv, dims, count, dt)
    if not keep_work:
        work = center = None
    mean, var = mean.view(shape), var.view(shape)
    return mean, var, torch.full_like(mean, float(count)), work, center


def _rows(x: Tensor, count: int, dt: torch.dtype):
    G, n, C = x.shape[:3]
    xs = x if x.dtype == dt else x.to(dt)
    xv = xs.view(G, n, C, -1)                                            # (G, n, C, S)
    shape = (G, 1, C) + (1,) * (x.dim() - 3)
    center = (xv.sum(3).sum(1) / count).view(shape)                      # first mean
    # x - center in x's own shape: the transform may return this buffer as its output, and
    # an output that is a view of it could not be modified in place.
    work = xs - center
    wv = work.view(G, n, C, -1)
    delta = wv.sum(3).sum(1) / count                                     # (G, C)
    sq = torch.linalg.vector_norm(wv, dim=3).square_().sum(1) / count    # (G, C)
    var = (sq - delta * delta).clamp_min_(0.0)
    return center.view(G, C) + delta, var, work, center


def _channels_last(x: Tensor, count: int):
    x0 = x[0]                                                            # (N, C, *S)
    C = x0.size(1)
    shape = (1, 1, C) + (1,) * (x.dim() - 3)
    mean, var = torch.batch_norm_update_stats(x0, None, None, 0.0)       # biased var
    if not bool(offset_risk(mean, var.rsqrt(), count, x.dtype)):
        return mean, var, None, None
    # Shift by one sample per channel: the naive sums then see values of the order of the
    # spread, and x - sample is exact in floating point for values close together.
    center = x0[(0, slice(None)) + (0,) * (x0.dim() - 2)].reshape(shape)
    work = x - center
    delta, var = torch.batch_norm_update_stats(work[0], None, None, 0.0)
    return center.reshape(-1) + delta, var, work, center


def _two_pass(x: Tensor, dims, count: int, dt: torch.dtype):
    # Corrected two-pass algorithm (Chan, Golub & LeVeque): a first mean, then the mean and
    # mean square of the values centred on it; the small correction term makes the mean
    # exact to rounding even when float32 sums of large values are not.
    xs = x if x.dtype == dt else x.to(dt)
    first = torch.sum(xs, dim=dims, keepdim=True) / count
    centred = xs - first
    correction = torch.sum(centred, dim=dims, keepdim=True) / count
    var = torch.sum(centred.square_(), dim=dims, keepdim=True) / count - correction.square()
    return first + correction, var.clamp_min_(0.0), None, None


def merge_stats(counts: Tensor, means: Tensor, variances: Tensor, dim: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge per-part (count, mean, biased variance) along ``dim`` into the statistics of the
    union: the count-weighted mean and M2 = sum_k [n_k var_k + n_k (mean_k - mean)^2] (Chan
    et al.), exact and stable, with no raw sum of squares. Parts with count 0 add nothing."""
    total = counts.sum(dim=dim, keepdim=True)
    safe = total.clamp_min(1.0)
    mean = (counts * means).sum(dim=dim, keepdim=True) / safe
    m2 = (counts * (variances + torch.square(means - mean))).sum(dim=dim, keepdim=True)
    return total, mean, m2 / safe


def unbiased(var: Tensor, count) -> Tensor:
    """m/(m-1) * var (Algorithm 2, step 10); ``count`` the m of each statistic."""
    if isinstance(count, Tensor):
        return var * count / (count - 1).clamp_min(1.0)
    return var * (count / (count - 1 if count > 1 else 1))


def renorm_rd(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor, r_max, d_max, eps: float):
    """Batch Renormalization's corrections (Ioffe 2017) for batch statistics of shape
    (G, 1, C, 1..): r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B -
    running_mean) / sigma, -d_max, d_max), sigma_B = sqrt(sigma2_B + eps), sigma =
    sqrt(running_var + eps). ``r_max``/``d_max``: floats, or 0-d tensors (graph capture).
    The fused kernels compute the same in C (:func:`batchnorm._fused.train_forward`)."""
    nd = mean.dim()
    rm = channel(running_mean.to(mean.dtype), nd)
    sigma = torch.sqrt(channel(running_var.to(mean.dtype), nd) + eps)
    r = torch.clamp(torch.sqrt(var + eps) / sigma, 1.0 / r_max, r_max)
    d = torch.clamp((mean - rm) / sigma, -d_max, d_max)
    return r.to(mean.dtype), d.to(mean.dtype)


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


# -- the running update ---------------------------------------------------------------------------

def momentum_factor(momentum: Optional[float], num_batches_tracked: Optional[Tensor]):
    """The weight of the new batch: ``momentum``, or 1 / (num_batches_tracked + 1) (the
    cumulative average, counting this batch) for ``momentum=None``; a tensor under
    torch.compile (no host read)."""
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs a num_batches_tracked buffer")
    if torch.compiler.is_compiling():
        return 1.0 / (num_batches_tracked.to(torch.float32) + 1.0)
    return 1.0 / (float(num_batches_tracked) + 1.0)


def prepare_update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                   momentum: Optional[float], dtype: torch.dtype, c: int):
    """:func:`update_running_stats` for a training forward on the fused kernels, prepared
    before the step: the buffers checked for the kernel's in-place update
    (:func:`batchnorm._fused.running_target`) and this step's weight
    (:func:`momentum_factor`). Given as the forward kernel's statistics block, the target
    receives the batch statistics, and the kernel applies the update (the same arithmetic as
    :func:`batchnorm._fused.lerp_`) exactly when they are all finite: the guard; then
    :func:`update_running_stats` with ``target`` reports a rejected batch. None where the
    kernels cannot update these buffers in place (then the update follows the step)."""
    target = _fused.running_target(running_mean, running_var, num_batches_tracked, dtype, c)
    if target is not None:
        target.args.w = momentum_factor(momentum, num_batches_tracked)
    return target


def update_running_stats(
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    batch_mean: Optional[Tensor],
    batch_var_unbiased: Optional[Tensor],
    momentum: Optional[float],
    nonfinite: str = "warn",
    name: str = "batch_norm",
    finite: Optional[bool] = None,
    *,
    stats: Optional[Tensor] = None,
    target=None,
) -> bool:
    """Fold one batch's per-channel statistics (shape ``(C,)``) into the running buffers in
    place: running = (1 - f) * running + f * batch, f = :func:`momentum_factor`; then
    num_batches_tracked += 1. If any statistic is NaN/Inf (``finite``: already known, or
    None to test here) nothing changes, not even num_batches_tracked, and, by
    ``nonfinite``, a :class:`NonFiniteBatchWarning` is issued ("warn"), a
    :class:`NonFiniteBatchError` raised ("raise") or nothing said ("ignore"). Returns
    whether the batch was accepted. The buffers were checked by :func:`check_arguments`.

    ``stats``: instead of ``batch_mean`` and ``batch_var_unbiased`` (then None), the
    operator's statistics of one group, a contiguous block of rows mean, invstd, unbiased
    variance of C each, read in place (no row views: on the kernels the whole update is one
    C call, :func:`batchnorm._fused.lerp_`). ``target``: this update as :func:`prepare_update`
    prepared it before the step; if ``stats`` is its block, the forward kernel that wrote
    them has applied it exactly when they are all finite (``finite``), and only a rejected
    batch is left to report here, unless the buffers had been replaced before the kernel ran
    (``target.args.c`` 0: then the update runs here, on the buffers as they are)."""
    if target is not None and stats is target.stats and target.args.c:
        if finite:
            return True
        report_nonfinite(nonfinite, name)
        return False
    if stats is not None and (finite is None or torch.compiler.is_compiling()):
        batch_mean, _, batch_var_unbiased = stats.reshape(3, -1).unbind()
        stats = None
    if torch.compiler.is_compiling():
        # No data-dependent branch under torch.compile (it would break the graph): a select.
        ok = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var_unbiased).all()
        with torch.no_grad():
            factor = momentum_factor(momentum, num_batches_tracked)
            if running_mean is not None:
                running_mean.copy_(torch.where(ok, torch.lerp(running_mean, batch_mean.to(running_mean.dtype),
                                                              factor), running_mean))
                running_var.copy_(torch.where(ok, torch.lerp(running_var, batch_var_unbiased.to(running_var.dtype),
                                                             factor), running_var))
            if num_batches_tracked is not None:
                num_batches_tracked.add_(ok.to(num_batches_tracked.dtype))
        return True
    if finite is None:
        finite = all_finite(batch_mean, batch_var_unbiased)
    if not finite:
        report_nonfinite(nonfinite, name)
        return False
    factor = momentum_factor(momentum, num_batches_tracked)
    # Through .data (or the data pointers), as torch's kernels update the buffers: without a
    # version bump, so a graph that saved them (torch's batch-norm node does) stays
    # differentiable.
    if stats is not None:
        if running_mean is not None and _fused.lerp_(running_mean, running_var, stats, (0, 2), factor,
                                                      num_batches_tracked):
            return True
        batch_mean, _, batch_var_unbiased = stats.reshape(3, -1).unbind()
    if running_mean is not None:
        dt = running_mean.dtype
        targets = (batch_mean if batch_mean.dtype == dt else batch_mean.to(dt),
                   batch_var_unbiased if batch_var_unbiased.dtype == dt else batch_var_unbiased.to(dt))
        if running_var.dtype == dt and running_mean.device == running_var.device == targets[0].device:
            torch._foreach_lerp_((running_mean.data, running_var.data), targets, factor)  # one dispatch for both
        else:
            running_mean.data.lerp_(targets[0], factor)
            running_var.data.lerp_(targets[1].to(running_var.dtype), factor)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return True


def all_finite(*tensors: Tensor) -> bool:
    """Whether every value of the tensors is finite: the largest magnitude of each is (max
    propagates NaN), two small reductions per tensor where torch.isfinite(t).all() takes
    several operations (a quarter of the time on (512,) statistics)."""
    return all(t.numel() == 0 or math.isfinite(float(t.abs().max())) for t in tensors)


def report_nonfinite(nonfinite: str, name: str) -> None:
    msg = (f"{name}: the training batch has NaN or Inf statistics (non-finite or overflowing input); "
           "running statistics were not updated")
    if nonfinite == "raise":
        raise NonFiniteBatchError(msg)
    if nonfinite == "warn":
        warnings.warn(msg, NonFiniteBatchWarning, stacklevel=5)
    elif nonfinite != "ignore":
        raise ValueError(f"nonfinite must be 'warn', 'raise' or 'ignore', got {nonfinite!r}")


# -- checks, before any state changes ---------------------------------------------------------------

def check_input(input: Tensor, num_features: Optional[int], ranks: Optional[Sequence[int]], name: str) -> None:
    """Raise a clear error, before any state changes, if ``input`` is not a valid BN input.

    ``ranks`` lists the accepted numbers of dimensions (``None``: any of 2 or more);
    ``num_features`` the channel count expected in dimension 1 (``None`` skips that check).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input (float16, bfloat16, float32 or float64), "
                        f"got dtype {input.dtype}")
    if input.dim() not in ranks if ranks is not None else input.dim() < 2:
        shapes = " or ".join(_shape_words(r) for r in ranks) if ranks is not None else "an (N, C, ...)"
        raise ValueError(f"{name}: expected {shapes} input, got a {input.dim()}-D input of shape {tuple(input.shape)}")
    if num_features is not None and input.size(1) != num_features:
        raise ValueError(f"{name}: expected {num_features} channels in dimension 1 (input of shape "
                         f"(N, {num_features}, ...)), got shape {tuple(input.shape)}")


def _shape_words(rank: int) -> str:
    letters = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}
    return f"{rank}-D {letters.get(rank, '')}".strip()


def check_arguments(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor], name: str = "batch_norm",
                    num_batches_tracked: Optional[Tensor] = None, training: bool = True) -> None:
    """Raise, before any state changes, if the parameters and buffers do not fit ``input``
    (checked by :func:`check_input`) as torch.nn requires: each is a tensor with one element
    per channel (``running_mean``/``running_var`` one-dimensional and, in training, writable
    in place), all on the input's device, and all of one dtype, the input's (float32 is also
    accepted for float16/bfloat16 input). ``running_mean`` and ``running_var`` come together.
    Raises :class:`MismatchError` (a ValueError and a RuntimeError, as torch's errors are)
    with torch.nn's wording, or TypeError for a non-tensor."""
    c = input.size(1)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must either both be None or neither be None")
    pdt = None
    first = ""
    for pname, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                     ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {pname} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.numel() != c:
            raise MismatchError(f"{name}: {pname} should contain {c} elements not {t.numel()} "
                                f"(one per channel of the input of shape {tuple(input.shape)})")
        if t.device != input.device:
            raise MismatchError(f"{name}: {pname} is on {t.device}, the input on {input.device}; "
                                "move the module (or the tensors) to the input's device")
        if pdt is None:
            pdt, first = t.dtype, pname
        elif t.dtype != pdt:
            raise MismatchError(f"{name}: mixed dtype: {first} is {pdt} but {pname} is {t.dtype}; "
                                "parameters and buffers must share one dtype")
    if pdt is not None and pdt != input.dtype and not (pdt == torch.float32 and input.dtype in _HALF):
        raise MismatchError(f"{name}: mixed dtype: the input is {input.dtype} but {first} is {pdt}; "
                            f"convert the input or the module (e.g. module.to({input.dtype})): parameters "
                            "and buffers must have the input's dtype (or float32 for float16/bfloat16 input)")
    if running_mean is not None:
        for pname, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t.dim() != 1:
                raise MismatchError(f"{name}: {pname} must be one-dimensional ({c},), got shape {tuple(t.shape)}")
            if training and ((c > 1 and t.stride(0) == 0) or _inference_outside(t)):
                raise MismatchError(f"{name}: {pname} cannot be updated in place (an expanded view or an "
                                    "inference tensor); give it its own memory, e.g. .clone()")
    if num_batches_tracked is not None and training:
        check_counter(num_batches_tracked, input.device, name)


def _inference_outside(t: Tensor) -> bool:
    """An inference tensor outside inference mode: torch refuses to update it in place.
    (Not asked under torch.compile, which cannot trace the question.)"""
    return not torch.compiler.is_compiling() and t.is_inference() and not torch.is_inference_mode_enabled()


def check_counter(nbt: Tensor, device, name: str) -> None:
    """num_batches_tracked: a one-element integer or floating tensor, incrementable in place."""
    if (not isinstance(nbt, Tensor) or nbt.numel() != 1 or nbt.dtype == torch.bool or nbt.is_complex()
            or nbt.device != device or _inference_outside(nbt)):
        raise MismatchError(f"{name}: num_batches_tracked must be a one-element integer tensor on {device}, got "
                            f"{nbt!r:.80}")


def check_training_count(input: Tensor, count_per_channel: int, name: str) -> None:
    """Training needs a non-empty batch and at least two values per channel."""
    if input.size(0) == 0:
        raise ValueError(f"{name}: got an empty batch (shape {tuple(input.shape)}) in training mode; "
                         "batch statistics need at least one example")
    if count_per_channel <= 1:
        raise ValueError(f"{name}: expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(input.shape)} ({count_per_channel} value per channel); use eval() or a larger "
                         "batch")
