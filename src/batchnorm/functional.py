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

import contextlib
import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _fused, _ops, _reference
from ._autograd import BatchNormTransform, FusedBatchNorm, kernel_layout
from ._errors import MismatchError, NonFiniteBatchError, NonFiniteBatchWarning
from ._update import report_nonfinite as _report_nonfinite
from ._update import unbiased, update_running_stats

__all__ = [
    "batch_norm",
    "batch_stats",
    "batch_stats_work",
    "merge_stats",
    "stat_dtype",
    "update_running_stats",
    "check_input",
    "check_arguments",
    "MismatchError",
    "NonFiniteBatchWarning",
    "NonFiniteBatchError",
]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(input: Tensor, num_features: Optional[int], ranks: Optional[Sequence[int]], name: str) -> None:
    """Raise a clear error, before any state changes, if ``input`` is not a valid BN input.

    ``ranks`` lists the accepted numbers of dimensions (``None``: any of 2 or more);
    ``num_features`` the channel count expected in dimension 1 (``None`` skips that check).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(input).__name__}")
    if not (input.is_floating_point()):
        raise TypeError(
            f"{name}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got dtype {input.dtype}"
        )
    if input.dim() not in ranks if ranks is not None else input.dim() < 2:
        shapes = " or ".join(_shape_words(r) for r in ranks) if ranks is not None else "an (N, C, ...)"
        raise ValueError(f"{name}: expected {shapes} input, got a {input.dim()}-D input of shape {tuple(input.shape)}")
    if num_features is not None and input.size(1) != num_features:
        raise ValueError(
            f"{name}: expected {num_features} channels in dimension 1 (input of shape "
            f"(N, {num_features}, ...)), got shape {tuple(input.shape)}"
        )


_HALF = (torch.float16, torch.bfloat16)


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
    never computed as E[x^2] - E[x]^2 of the raw values, so a large common offset does not
    cancel it away (see :func:`batch_stats_work` for how). ``mask`` is a 0/1 tensor
    broadcastable to ``x``.
    """
    mean, var, count, _, _ = batch_stats_work(x, dims, mask, keep_work=False)
    return mean, var, count


# A channel whose |mean| / std exceeds this over sqrt(m) * eps is refused by the fast
# channels-last statistics below (their naive float sums could then be off by more than
# about 1e-3 of a standard deviation) and recomputed on shifted values.
_NAIVE_SUM_RISK = 1e-3


def batch_stats_work(x: Tensor, dims: Sequence[int], mask: Optional[Tensor] = None, keep_work: bool = True,
                     use_kernels: bool = True):
    """:func:`batch_stats` plus, where the method leaves one, a private buffer ``work`` =
    x - center (same shape and memory format as ``x``) and the per-channel ``center``, which
    the transform may overwrite with its output (``None, None`` otherwise).

    Methods, chosen by layout (all exact to float32 rounding of the centred values):

    * Grouped views (G, n, C, *S) that are contiguous with spatial size >= 32 (NCHW): a
      first mean from row sums (each (n, c) row is contiguous; torch's sums are cascaded),
      then the centred values, their sum (a correction to the mean) and their per-row
      Euclidean norms. Two reads and one write of x, no raw squares of large values.
    * Channels-innermost (channels_last, (N, C)), one group: torch's fused statistics
      kernel, whose float sums are naive; where |mean| / std makes that risky (see
      ``_NAIVE_SUM_RISK``) the statistics are recomputed on x minus one sample per channel.
    * Anything else, and masks: the corrected two-pass algorithm on centred values.

    With ``use_kernels`` (and the kernels built, outside torch.compile) unmasked grouped
    views in either layout take the fused kernels' statistics instead (shifted sums, one
    read); ``use_kernels=False`` keeps to torch operations (``impl="paper"``).
    """
    dt = stat_dtype(x.dtype)
    dims = tuple(dims)
    if x.numel() == 0:  # an empty part (e.g. one rank's empty batch) contributes count 0
        shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
        zeros = x.new_zeros(shape, dtype=dt)
        return zeros, zeros.clone(), zeros.clone(), None, None
    if mask is not None:
        # Positions outside the mask are left out with a select, not a product with 0/1,
        # so that even NaN there does not reach the statistics (as in the fused kernels).
        valid = mask if mask.dtype == torch.bool else mask != 0
        xs = x if x.dtype == dt else x.to(dt)
        count = torch.sum(valid.to(dt).expand_as(xs), dim=dims, keepdim=True)
        safe = count.clamp_min(1.0)
        mean = torch.sum(torch.where(valid, xs, 0.0), dim=dims, keepdim=True) / safe
        var = torch.sum(torch.where(valid, torch.square(xs - mean), 0.0), dim=dims, keepdim=True) / safe
        return mean, var, count, None, None
    count = 1
    for d in dims:
        count *= x.size(d)
    grouped = dims == reduce_dims(x.dim()) and x.dim() >= 3
    lay = kernel_layout(x) if grouped and use_kernels else None
    if lay is not None:
        shape = (x.size(0), 1, x.size(2)) + (1,) * (x.dim() - 3)
        parts = [_fused.stats(x[g], lay) for g in range(x.size(0))]
        mean = torch.stack([p[0] for p in parts]).view(shape)
        var = torch.stack([p[1] for p in parts]).view(shape)
        return mean, var, torch.full_like(mean, float(count)), None, None
    spatial = x[0, 0, 0].numel() if grouped else 0
    if torch.compiler.is_compiling():
        mean, var, work, center = _stats_two_pass(x, dims, count, dt)  # no data-dependent branch
    elif grouped and x.dim() >= 4 and spatial >= 32 and x.is_contiguous():
        mean, var, work, center = _stats_rows(x, count, dt)
    elif grouped and x.size(0) == 1 and x.dtype == dt and x.stride(2) == 1 and x.device.type == "cpu":
        mean, var, work, center = _stats_channels_last(x, count)
    else:
        mean, var, work, center = _stats_two_pass(x, dims, count, dt)
    if not keep_work:
        work = center = None
    return mean, var, torch.full_like(mean, float(count)), work, center


def _stats_rows(x: Tensor, count: int, dt: torch.dtype):
    G, n, C = x.shape[:3]
    xs = x if x.dtype == dt else x.to(dt)
    xv = xs.view(G, n, C, -1)                                            # (G, n, C, S)
    shape = (G, 1, C) + (1,) * (x.dim() - 3)
    center = (xv.sum(3).sum(1) / count).view(shape)                      # first mean
    # x - center in x's own shape: the transform may return this buffer as its output, and
    # an output that is a view of it could not be modified in place.
    work = xs - center
    wv = work.view(G, n, C, -1)                                          # (G, n, C, S)
    delta = wv.sum(3).sum(1) / count                                     # (G, C)
    sq = torch.linalg.vector_norm(wv, dim=3).square_().sum(1) / count    # (G, C)
    var = (sq - delta * delta).clamp_min_(0.0)
    mean = center.view(G, C) + delta
    return mean.view(shape), var.view(shape), work, center


def _stats_channels_last(x: Tensor, count: int):
    x0 = x[0]                                                            # (N, C, *S)
    C = x0.size(1)
    shape = (1, 1, C) + (1,) * (x.dim() - 3)
    mean, var = torch.batch_norm_update_stats(x0, None, None, 0.0)       # biased var
    eps = torch.finfo(x.dtype).eps
    risk = (mean.abs() * (math.sqrt(count) * eps) > _NAIVE_SUM_RISK * var.sqrt()).any()
    if not bool(risk):
        return mean.view(shape), var.view(shape), None, None
    # Shift by one sample per channel: the naive sums then see values of the order of the
    # spread, and x - sample is exact in floating point for values close together.
    center = x0[(0, slice(None)) + (0,) * (x0.dim() - 2)].reshape(shape)  # (1, 1, C, 1..)
    work = x - center
    delta, var = torch.batch_norm_update_stats(work[0], None, None, 0.0)
    return (center.reshape(-1) + delta).view(shape), var.view(shape), work, center


def _stats_two_pass(x: Tensor, dims, count: int, dt: torch.dtype):
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
    """Merge per-part (count, mean, biased variance) along ``dim`` into the statistics of the union.

    Count-weighted mean, and M2 = sum_k [n_k var_k + n_k (mean_k - mean)^2] (Chan et al.):
    exact and stable, with no raw sum of squares. Parts with count 0 contribute nothing.
    """
    total = counts.sum(dim=dim, keepdim=True)
    safe = total.clamp_min(1.0)
    mean = (counts * means).sum(dim=dim, keepdim=True) / safe
    m2 = (counts * (variances + torch.square(means - mean))).sum(dim=dim, keepdim=True)
    return total, mean, m2 / safe


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
    work: Optional[Tensor] = None,
    center: Optional[Tensor] = None,
    use_kernels: bool = True,
    eps: float = 1e-5,
) -> Tensor:
    """Training-mode BN transform of a grouped view ``x`` (G, n, C, *S) with the
    hand-written backward of Section 3 (see :mod:`batchnorm._autograd`).

    ``mean``/``invstd``/``count`` are the batch statistics of ``x`` (computed without
    autograd; the backward accounts for their dependence on ``x``). ``r``/``d`` are Batch
    Renormalization's corrections (constants). ``process_group``, if given, means the
    statistics are global over the group and the backward sums its two sums over the group.
    ``work``/``center`` (from :func:`batch_stats_work`): a private buffer x - center that
    the output may overwrite. ``use_kernels=False`` keeps every pass on torch operations.
    """
    scratch = (work, center) if work is not None else None
    return BatchNormTransform.apply(x, weight, bias, mean, invstd, count, mask, r, d, process_group, scratch,
                                    use_kernels, eps)


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

    ``impl``: "paper" always uses the hand-written autograd Function of this package, on
    torch operations only (the reference path);
    "native" uses torch's kernel; "auto" (default) picks the faster of the two for the
    input (:func:`fast_layout`); both compute the same function. Either way a batch
    with non-finite statistics leaves the running buffers untouched (``nonfinite`` says
    whether to "warn", "raise" or "ignore"). ``momentum=None`` needs ``num_batches_tracked``.
    """
    mode = capture_mode()
    with traced_checks():
        check_input(input, None, None, "batch_norm")
        if impl not in ("auto", "native", "paper"):
            raise ValueError(f"impl must be 'auto', 'native' or 'paper', got {impl!r}")
        # Every check before any state changes: the arguments against the input, then the batch.
        check_arguments(input, weight, bias, running_mean, running_var, "batch_norm", num_batches_tracked, training)
        if training:
            check_training_count(input, input.numel() // max(input.size(1), 1), "batch_norm")
        elif running_mean is None:
            raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
        if momentum is None and training and running_mean is not None and num_batches_tracked is None:
            raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked")

    if not training:
        return _eval(input, running_mean, running_var, weight, bias, eps, impl)
    if mode is not None and mode != "compile":
        return special_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                             nonfinite, mode, "batch_norm", use_kernels=impl != "paper")

    lay = fast_layout(input) if impl == "auto" else None
    if lay is not None:
        return _train_fused(input, running_mean, running_var, weight, bias, momentum, eps, nonfinite,
                            num_batches_tracked, lay)
    if impl == "paper":
        return _train_paper(input, running_mean, running_var, weight, bias, momentum, eps,
                            nonfinite, num_batches_tracked)
    return _train_native(input, running_mean, running_var, weight, bias, momentum, eps,
                         nonfinite, num_batches_tracked)


_forward_ad = torch.autograd.forward_ad


def capture_mode() -> Optional[str]:
    """Which special mode a training step runs under, if any: "compile" (torch.compile's
    tracing: torch operations without data-dependent branches), "export" (torch.export) or
    "trace" (torch.jit.trace): the registered operators of :mod:`batchnorm._ops`, one node
    per step, whose running update the captured program replays; "transform" (forward-mode
    AD, torch.func.vmap/grad/jacrev/jvp): differentiable torch operations only
    (:mod:`batchnorm._reference`), which every transform understands; None: eager."""
    if torch.compiler.is_compiling():
        return "export" if torch.compiler.is_exporting() else "compile"
    if torch._C._get_tracing_state() is not None:
        return "trace"
    if _forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None:
        return "transform"
    return None


@contextlib.contextmanager
def traced_checks():
    """Argument checks under torch.jit.trace: the tracer turns sizes into tensors, so each
    comparison of a check warns that it "might cause the trace to be incorrect". The checks
    are about the traced shapes, which the trace fixes anyway, so those warnings are
    silenced here, inside the checks only, as torch silences them in its own library."""
    if torch._C._get_tracing_state() is None:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def special_train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], nbt: Optional[Tensor], momentum: Optional[float], eps: float,
                  nonfinite: str, mode: str, name: str, *, groups: int = 1, mask: Optional[Tensor] = None,
                  limits=None, use_kernels: bool = True, update: bool = True, sink=None) -> Tensor:
    """A training step (plain BN, ghost ``groups``, ``mask``, Batch Renormalization with
    ``limits`` = (r_max, d_max)) in a :func:`capture_mode` mode other than eager and
    compile. The caller has checked the arguments. ``update``: fold the statistics into
    the running buffers (guarded); ``sink``: a list that receives them instead (population
    statistics)."""
    if mode in ("trace", "export"):
        lim = None
        if limits is not None:
            # (r_max, d_max) as one tensor: a schedule's values are tensors of the step count here.
            lim = torch.stack([v.to(torch.float64) if isinstance(v, Tensor)
                               else torch.full((), float(v), dtype=torch.float64) for v in limits])
        renorm = limits is not None
        y, stats = _ops.train(input, weight, bias, mask, running_mean if renorm else None,
                              running_var if renorm else None, lim, groups, eps, use_kernels)
        if sink is not None:
            sink.append((stats[:, 0], stats[:, 2]))
        elif update and running_mean is not None:
            _ops.update_running_stats_(running_mean, running_var, nbt, stats, momentum, nonfinite, name)
        return y
    xv = grouped_view(input, groups)                                     # (G, n, C, *S)
    mv = None if mask is None else grouped_view(mask.unsqueeze(1), groups)  # (G, n, 1, L)
    xs = xv.to(stat_dtype(input.dtype))
    mean, var, count = _reference.stats(xs, mv)                          # (G, 1, C, 1..)
    r = d = None
    if limits is not None:  # constants of the derivative (Ioffe 2017)
        r, d = _reference.renorm_rd(mean.detach(), var.detach(), running_mean, running_var, limits[0], limits[1], eps)
    y = _reference.normalize(xs, mean, var, eps, weight, bias, r, d).to(input.dtype).view(input.shape)
    if sink is not None or (update and running_mean is not None):
        with torch.no_grad():  # detach(): no gradient, and no forward-mode tangent either
            batch_mean, batch_var = mean.detach(), unbiased(var.detach(), count)
            G = xv.size(0)
            if sink is not None:
                sink.append((batch_mean.reshape(G, -1), batch_var.reshape(G, -1)))
            else:
                update_running_stats(running_mean, running_var, nbt, batch_mean.mean(dim=0).reshape(-1),
                                     batch_var.mean(dim=0).reshape(-1), momentum, nonfinite, name)
    return y


# Below this many elements the training step runs on torch's kernel (its C++ autograd node
# costs less than our Python one), checked and folded into the running buffers by one call.
_FUSED_MIN_NUMEL = 1 << 15


def fast_layout(input: Tensor):
    """The fused kernels' layout of ``input`` if ``impl="auto"`` trains it on this package's
    CPU path, else None (then torch's kernel is used).

    That path: CPU float32/float64 tensors, NCHW-contiguous or channels-innermost, with the
    kernels built (:func:`batchnorm.kernels_status`), outside torch.compile's tracing. On
    CUDA, cuDNN is used; half precision stays on torch's kernel.
    """
    if torch.compiler.is_compiling() or not _fused.available():
        return None
    return _fused.layout(input)


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


def _train_fused(input, running_mean, running_var, weight, bias, momentum, eps, nonfinite, nbt, lay=None,
                 name="batch_norm"):
    """Plain BN training on the CPU path (the caller checked :func:`fast_layout`). The
    arguments are checked where they are used: by torch's kernel for small inputs, by the
    kernel boundary (:mod:`batchnorm._fused`) for large ones; both raise before any state
    changes, and a mismatch is then reported in torch.nn's words (:func:`check_arguments`)."""
    if lay is None:
        lay = _fused.layout(input)
    if running_mean is None:
        factor = 0.0
    else:
        factor = momentum if momentum is not None else 1.0 / (float(nbt) + 1.0)
    m = lay[0] * lay[2]
    if input.numel() < _FUSED_MIN_NUMEL:
        out = _train_checked(input, running_mean, running_var, weight, bias, factor, eps, nonfinite, nbt, name)
        if out is not None:
            return out
        # else: a large common offset; the stable kernels below recompute the batch
    var_scale = m / max(m - 1, 1)  # the kernel's third statistics row: the unbiased variance
    try:
        if running_mean is not None:
            _check_running(running_mean, running_var, input)
            if nbt is not None:
                check_counter(nbt, input.device, name)
        if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            result = []
            out = FusedBatchNorm.apply(input, weight, bias, lay, eps, var_scale, result)
            st, finite = result
        else:
            out, st, finite = _fused.train_forward(input, lay, weight, bias, eps, var_scale=var_scale)
    except MismatchError:
        check_arguments(input, weight, bias, running_mean, running_var, name, nbt)
        raise
    if running_mean is not None:
        if not finite:
            _report_nonfinite(nonfinite, name)
        else:
            # _check_running made sure that these buffers can be written in place (and nbt).
            if not _fused.lerp_(running_mean, running_var, st[0], st[2], factor):
                running_mean.data.lerp_(st[0].to(running_mean.dtype), factor)
                running_var.data.lerp_(st[2].to(running_var.dtype), factor)
            if nbt is not None:
                nbt.add_(1)
    return out


def _check_running(running_mean: Tensor, running_var: Tensor, x: Tensor) -> None:
    """Raise :class:`MismatchError` if a running buffer does not fit ``x`` (size, dtype,
    device) or cannot be written in place at all (an expanded view, an inference tensor)."""
    c = x.size(1)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.dtype is x.dtype and t.shape == (c,) and t.is_contiguous() and t.is_cpu and not t.is_inference():
            continue
        if t.numel() != c:
            raise MismatchError(f"batch_norm: {name} should contain {c} elements not {t.numel()}")
        if t.dtype != x.dtype:
            raise MismatchError(f"batch_norm: mixed dtype: {name} is {t.dtype}, the input {x.dtype}; "
                                "parameters and buffers must have the input's dtype")
        if t.device != x.device:
            raise MismatchError(f"batch_norm: {name} is on {t.device}, the input on {x.device}")
        if t.dim() != 1 or (c > 1 and t.stride(0) == 0) or (t.is_inference() and not torch.is_inference_mode_enabled()):
            raise MismatchError(f"batch_norm: {name} (shape {tuple(t.shape)}, strides {t.stride()}) cannot be "
                                "updated in place")


def _train_checked(input, running_mean, running_var, weight, bias, factor, eps, nonfinite, nbt, name="batch_norm"):
    """torch's kernel and C++ autograd node (cheapest for small inputs), updating the
    running buffers exactly as torch.nn does (the unbiased variance from its own sums, not
    recomputed from invstd, which loses it where eps >> var); then one call of ours checks
    its statistics: NaN/Inf restores the buffers and rejects the batch; a large common
    offset, which torch's naive float sums may have rounded into the statistics, restores
    them and returns None so that the caller recomputes the batch stably.

    torch's kernel checks every argument before it writes anything; a mismatch is then
    reported in torch.nn's words by :func:`check_arguments`."""
    m = input.numel() // input.size(1)
    backup = None
    try:
        if running_mean is not None:
            backup = torch.stack((running_mean, running_var))            # (2, C), to undo a rejected batch
        # torch.batch_norm's own entry (it checks every size; native_batch_norm does not),
        # returning the statistics too. Index 0: torch's native kernel.
        out, mean, invstd, _, _ = torch._batch_norm_impl_index(input, weight, bias, running_mean, running_var, True,
                                                               factor, eps, False)
    except RuntimeError:
        if backup is not None:  # torch's CPU kernel may have written running_mean when it rejected running_var
            with torch.no_grad():
                running_mean.data.copy_(backup[0])
                running_var.data.copy_(backup[1])
        check_arguments(input, weight, bias, running_mean, running_var, name, nbt)
        raise
    code = _fused.check_stats(mean, invstd, m, _OFFSET_RISK, _UNIT[mean.dtype])
    if code is None:
        code = _check_stats_torch(mean, invstd, m)
    if running_mean is None:
        return None if code == 2 else out
    if code:
        running_mean.data.copy_(backup[0])
        running_var.data.copy_(backup[1])
        if code == 2:
            return None
        _report_nonfinite(nonfinite, name)
        return out
    if nbt is not None:
        try:
            nbt.add_(1)
        except RuntimeError:
            running_mean.data.copy_(backup[0])
            running_var.data.copy_(backup[1])
            check_counter(nbt, input.device, name)
            raise
    return out


# The offset-risk test of torch's statistics (see _fused.check_stats): at most 1e-3 of a
# standard deviation lost to a large common offset; unit roundoff per statistics dtype.
_OFFSET_RISK = 1e-3
_UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _check_stats_torch(mean: Tensor, invstd: Tensor, m: int) -> int:
    """_fused.check_stats in torch operations (the same tests, one host read)."""
    with torch.no_grad():
        finite = torch.isfinite(mean).all() & torch.isfinite(invstd).all() & (invstd > 0).all()
        unit = torch.finfo(mean.dtype).eps / 2  # unit roundoff
        risky = (mean.abs() * invstd * (math.sqrt(m) * unit) > _OFFSET_RISK).any()
        ok, risk = torch.stack((finite, risky)).tolist()
    if not ok:
        return 1
    return 2 if risk else 0


def _train_native(input, running_mean, running_var, weight, bias, momentum, eps, nonfinite, nbt,
                  name="batch_norm"):
    if running_mean is None:
        return torch.nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    if torch.compiler.is_compiling():
        # No data-dependent branch or host read under compile: torch's kernel computes the
        # batch mean and unbiased variance into zeroed scratch buffers (momentum 1), then our
        # update, with a select instead of the guard's branch.
        scratch = torch.zeros((2,) + tuple(running_mean.shape), dtype=running_mean.dtype, device=input.device)
        out, mean, invstd = torch.native_batch_norm(input, weight, bias, scratch[0], scratch[1], True, 1.0, eps)
        finite = torch.isfinite(mean).all() & torch.isfinite(scratch).all() & (invstd > 0).all()
        factor = momentum if momentum is not None else 1.0 / (nbt.to(torch.float32) + 1.0)
        rm = torch.lerp(running_mean, scratch[0], factor)
        rv = torch.lerp(running_var, scratch[1], factor)
        with torch.no_grad():
            running_mean.copy_(torch.where(finite, rm, running_mean))
            running_var.copy_(torch.where(finite, rv, running_var))
            if nbt is not None:
                nbt.add_(finite.to(nbt.dtype))
        return out
    factor = momentum if momentum is not None else 1.0 / (float(nbt) + 1.0)
    if input.device.type == "cpu":
        # torch's kernel, then our check (in C, or in torch operations without the kernels)
        out = _train_checked(input, running_mean, running_var, weight, bias, factor, eps, nonfinite, nbt, name)
        if out is not None:
            return out
        check_arguments(input, weight, bias, running_mean, running_var, name, nbt)
        return _train_paper(input, running_mean, running_var, weight, bias, momentum, eps, nonfinite, nbt,
                            use_kernels=True, name=name)
    # torch's kernel updates the buffers in place. Keep a backup (one small op) and put it
    # back if the update is not finite, so a NaN/Inf batch cannot poison the statistics.
    check_arguments(input, weight, bias, running_mean, running_var, name, nbt)
    backup = torch.stack((running_mean, running_var))                    # (2, C)
    out = torch.batch_norm(input, weight, bias, running_mean, running_var, True, factor, eps,
                           torch.backends.cudnn.enabled)
    if _var_finite(running_var):
        if nbt is not None:
            nbt.add_(1)  # buffers never require grad: no no_grad() needed (it costs microseconds)
    else:
        running_mean.data.copy_(backup[0])
        running_var.data.copy_(backup[1])
        _report_nonfinite(nonfinite, name)
    return out


def _var_finite(running_var: Tensor) -> bool:
    """Whether a running-variance update stayed finite, with one reduction and one sync.

    Checking the variance suffices: a NaN or Inf anywhere in a channel makes its batch mean
    non-finite, and x - mean then makes its variance NaN or Inf as well; an overflowing
    variance is caught directly. A sum of finite variances overflows only if the variances
    themselves are near float32's limit, where the update is rejected too.
    """
    return math.isfinite(float(running_var.sum()))


def _train_paper(input, running_mean, running_var, weight, bias, momentum, eps, nonfinite, nbt, use_kernels=False,
                 name="batch_norm"):
    xv = grouped_view(input, 1)
    dims = reduce_dims(xv.dim())
    with torch.no_grad():
        mean, var, count, work, center = batch_stats_work(xv, dims, use_kernels=use_kernels)
        invstd = torch.rsqrt(var + eps)
    out = transform(xv, weight, bias, mean, invstd, count, work=work, center=center,
                    use_kernels=use_kernels, eps=eps).view(input.shape)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, nbt, mean.reshape(-1), unbiased(var, count).reshape(-1),
                             momentum, nonfinite, name)
    return out
