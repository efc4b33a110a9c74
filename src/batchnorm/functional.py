"""Batch Normalization as functions: :func:`batch_norm` (torch.nn.functional.batch_norm's
signature) and :func:`train`, the one place that chooses how a training step runs.

Every variant of this package (plain BN, ghost batches, masks, SyncBatchNorm, Batch
Renormalization, population statistics) computes its batch statistics with
:func:`batchnorm._stats.batch_stats` (public here as :func:`batch_stats`) and folds them
into the running buffers with :func:`update_running_stats`, so a numerical fix made there
lands everywhere at once. (On the fused kernels' training forwards that update is prepared
before the step, :func:`batchnorm._stats.prepare_update`, and applied by the forward kernel
itself when the batch's statistics are finite, with the arithmetic of the other kernel
updates, if the buffers still hold the memory checked before the step.)

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

Implementations (``impl``):

* ``"auto"`` (default): the fastest of the others for the input: our fused CPU kernels
  for CPU float32/float64 inputs of at least 32,768 elements in NCHW or channels-last
  layout, torch's kernel for plain BN elsewhere, our operator on torch operations for the
  variants torch has no kernel for.
* ``"kernels"``: our operator (:mod:`batchnorm._operator`) on the fused CPU kernels where
  they read the input, on torch operations elsewhere.
* ``"torch"``: torch's own batch-norm kernel, for plain BN only (it has none for ghost
  batches, masks, Batch Renormalization or synchronized statistics); its running update
  is guarded against NaN/Inf batches like every other path.
* ``"reference"``: our operator on torch operations only, with the backward written by
  hand from Section 3; the reference the others are tested against.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _fused, _operator, _reference, _stats
from ._errors import MismatchError, NonFiniteBatchError, NonFiniteBatchWarning
from ._operator import Plan
from ._stats import (affine_coefficients, check_arguments, check_counter, check_input, check_training_count,
                     grouped_view, merge_stats, reduce_dims, stat_dtype, unbiased, update_running_stats)

__all__ = [
    "IMPLS",
    "batch_norm",
    "batch_stats",
    "merge_stats",
    "stat_dtype",
    "train",
    "update_running_stats",
    "check_input",
    "check_arguments",
    "check_impl",
    "MismatchError",
    "NonFiniteBatchWarning",
    "NonFiniteBatchError",
]

#: The values of ``impl`` (module docstring).
IMPLS = ("auto", "kernels", "torch", "reference")
_RENAMED = {"native": "torch", "paper": "reference"}


def check_impl(impl: str, name: str) -> None:
    """Raise ValueError unless ``impl`` is one of :data:`IMPLS`."""
    if impl not in IMPLS:
        hint = f" ({impl!r} was renamed {_RENAMED[impl]!r})" if impl in _RENAMED else ""
        raise ValueError(f"{name}: impl must be 'auto', 'kernels', 'torch' or 'reference', got {impl!r}{hint}")


def batch_stats(x: Tensor, dims: Sequence[int], mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, biased variance and count of a grouped view ``x`` (G, n, C, *S)
    over ``dims`` (all but 0 and 2; kept, size 1): :func:`batchnorm._stats.batch_stats`.

    mu_B = (1/m) sum_i x_i and sigma2_B = (1/m) sum_i (x_i - mu_B)^2 (Algorithm 1), with m
    the number of values (``mask`` true) per channel; accumulation in float32 (float64 for
    float64 input); never E[x^2] - E[x]^2 of the raw values, so a large common offset does
    not cancel the variance away. ``mask`` is a 0/1 or bool tensor broadcastable to ``x``.
    """
    if x.dim() < 3 or tuple(dims) != reduce_dims(x.dim()):
        raise ValueError(f"batch_stats: expects a grouped view (G, n, C, *S) and dims {reduce_dims(max(x.dim(), 3))}, "
                         f"got shape {tuple(x.shape)} and dims {tuple(dims)}")
    mean, var, count, _, _ = _stats.batch_stats(x, mask)
    return mean, var, count


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




# Below this many elements "auto" trains plain BN on torch's kernel (its C++ autograd node
# costs less than our Python one), checked and folded into the running buffers by one call.
_FUSED_MIN_NUMEL = 1 << 15


def fast_layout(input: Tensor):
    """The fused kernels' layout of ``input`` if they can read it here (CPU float32/float64,
    NCHW-contiguous or channels-innermost, the kernels built, outside torch.compile's
    tracing), else None."""
    if torch.compiler.is_compiling() or not _fused.available():
        return None
    return _fused.layout(input)


#: Sinks of population statistics (:func:`batchnorm.population_statistics`): while a module
#: is a key, its training steps append their per-group (mean, unbiased variance) to the list
#: instead of updating its running buffers.
statistics_sinks: dict = {}


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
    r"""Batch Normalization with torch.nn.functional.batch_norm's signature.

    Training (Algorithm 1): :math:`y = \gamma (x - \mu_B) / \sqrt{\sigma^2_B + \epsilon} +
    \beta` with per-channel batch statistics over every dimension but 1 (per activation for
    (N, C) and (N, C, L), per feature map for convolutions: m = N*H*W values, Section 3.2);
    the running buffers, if given, move toward :math:`\mu_B` and the unbiased
    :math:`m/(m-1) \sigma^2_B`. Inference (Algorithm 2): the same map with the running
    statistics.

    Args:
        input: (N, C, *) floating-point tensor.
        running_mean, running_var: (C,) buffers, or both None (training only).
        weight, bias: (C,) gamma and beta, or None.
        training: batch statistics (and the running update) if True.
        momentum: weight of the new batch in the running update; None: cumulative
            average, which needs ``num_batches_tracked``.
        eps: added to the variance inside the square root.
        impl: "auto", "kernels", "torch" or "reference" (module docstring).
        nonfinite: a batch with NaN/Inf statistics updates nothing and is reported:
            "warn" (:class:`NonFiniteBatchWarning`), "raise" (:class:`NonFiniteBatchError`)
            or "ignore".
        num_batches_tracked: one-element counter, incremented by each accepted batch.

    Shape:
        input (N, C, *); output the same shape, dtype and memory format.

    Example::

        >>> x = torch.randn(32, 8, 4, 4)
        >>> rm, rv = torch.zeros(8), torch.ones(8)
        >>> y = batch_norm(x, rm, rv, training=True)
        >>> y.shape
        torch.Size([32, 8, 4, 4])
    """
    with traced_checks():
        check_input(input, None, None, "batch_norm")
        check_impl(impl, "batch_norm")
        # Every check before any state changes: the arguments against the input, then the batch.
        check_arguments(input, weight, bias, running_mean, running_var, "batch_norm", num_batches_tracked, training)
        if training:
            check_training_count(input, input.numel() // max(input.size(1), 1), "batch_norm")
        elif running_mean is None:
            raise ValueError("batch_norm: eval mode (training=False) needs running_mean and running_var")
        if momentum is None and training and running_mean is not None and num_batches_tracked is None:
            raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked")
    if not training:
        return evaluate(input, running_mean, running_var, weight, bias, eps, impl, "batch_norm")
    return train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, nonfinite,
                 "batch_norm", impl=impl, checked=True)


def evaluate(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float, impl: str, name: str) -> Tensor:
    """Inference (Algorithm 2): one affine map per channel from the running statistics, on
    torch's kernel (it runs at memory bandwidth), or on torch operations for "reference"."""
    if impl != "reference":
        try:
            return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                    torch.backends.cudnn.enabled)
        except RuntimeError:
            check_arguments(input, weight, bias, running_mean, running_var, name, training=False)
            raise
    check_arguments(input, weight, bias, running_mean, running_var, name, training=False)
    scale, shift = affine_coefficients(running_mean, running_var, weight, bias, eps)
    shape = (1, -1) + (1,) * (input.dim() - 2)
    dt = stat_dtype(input.dtype)
    return (input.to(dt) * scale.to(dt).view(shape) + shift.to(dt).view(shape)).to(input.dtype)


def train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
          running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor], momentum: Optional[float],
          eps: float, nonfinite: str, name: str, *, impl: str = "auto", groups: int = 1,
          mask: Optional[Tensor] = None, limits=None, process_group=None, update: bool = True, owner=None,
          checked: bool = False) -> Tensor:
    """One training step of any variant: the one place that chooses how it runs.

    Args:
        input: (N, C, *) tensor, already checked by :func:`check_input`.
        weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
            nonfinite: as :func:`batch_norm`'s.
        name: the caller, for error messages.
        impl: as :func:`batch_norm`'s.
        groups: statistics groups (ghost batches: N // virtual_batch_size).
        mask: (N, L) bool tensor of the positions that enter the statistics ((N, C, L) input).
        limits: Batch Renormalization's (r_max, d_max), or None for BN.
        process_group: a resolved process group of synchronized statistics, or None.
        update: fold the batch statistics into the running buffers (guarded).
        owner: the module making the call (population-statistics sinks, the ranks'
            channel check of synchronized BN).
        checked: the arguments were checked by :func:`check_arguments` already.

    Plain BN runs on torch's kernel or, where faster, on our operator; every variant on
    our operator (:class:`batchnorm._operator.BatchNormFunction`); under graph capture on
    the registered operators, under torch.func transforms and forward-mode AD on
    differentiable torch operations (:func:`capture_mode`). Every check runs before any
    state changes.
    """
    if not eps > 0:  # as torch.nn.functional.batch_norm: a batch's variance can be 0
        raise ValueError(f"{name}: eps must be positive in training, got {eps!r} (eps=0 works in eval only)")
    sink = statistics_sinks.get(owner) if statistics_sinks and owner is not None else None
    mode = capture_mode()
    if mode is not None and mode != "compile":
        return _train_captured(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                               nonfinite, name, mode, impl, groups, mask, limits, process_group, update, sink, checked)
    plain = groups == 1 and mask is None and limits is None and process_group is None and sink is None
    if plain and impl in ("auto", "torch"):
        if not update:
            running_mean = running_var = num_batches_tracked = None
        # (mode None: not compiling, the one case fast_layout excludes besides the kernels' absence)
        lay = (_fused.layout(input) if impl == "auto" and mode is None and input.numel() >= _FUSED_MIN_NUMEL
               and _fused.available() else None)
        if lay is None:
            return _train_torch(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                nonfinite, name, impl, checked)
        target = None
        if running_mean is not None:
            # The running buffers checked once, before anything runs: for the kernels' update
            # or, where they do not fit it, by torch.nn's rules (weight and bias are checked
            # by the kernel boundary, whose error is then reworded the same way).
            target = _stats.prepare_update(running_mean, running_var, num_batches_tracked, momentum, input.dtype,
                                           input.size(1))
            if target is None and not checked:
                check_arguments(input, weight, bias, running_mean, running_var, name, num_batches_tracked)
        return _train_fused(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                            nonfinite, name, lay, target)
    elif impl == "torch":
        raise ValueError(f"{name}: impl='torch' runs torch's batch-norm kernel, which has no ghost batches, masks, "
                         "Batch Renormalization or synchronized statistics; use impl='auto'")
    elif not checked:
        check_arguments(input, weight, bias, running_mean, running_var, name, num_batches_tracked, training=update)
    return _train_operator(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                           nonfinite, name, impl, groups, mask, limits, process_group, update, sink, owner)


def _train_operator(input, weight, bias, running_mean, running_var, nbt, momentum, eps, nonfinite, name, impl,
                    groups, mask, limits, process_group, update, sink, owner):
    plan = Plan(groups, eps, impl != "reference", limits, process_group, name, owner)
    try:
        # only Batch Renormalization's forward reads the running buffers (each tensor input
        # costs autograd's Function.apply time, a few microseconds)
        rm, rv = (running_mean, running_var) if limits is not None else (None, None)
        if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            out = _operator.BatchNormFunction.apply(input, weight, bias, mask, rm, rv, plan)
        else:  # nothing to differentiate: the operator's forward without autograd's bookkeeping
            y, st, saved = _operator.forward(input, weight, bias, mask, rm, rv, plan)
            out = (y, st, saved[5])
    except MismatchError:
        check_arguments(input, weight, bias, running_mean, running_var, name, nbt, training=update)
        raise
    y, st = out[0], out[1]
    finite = out[2] if len(out) > 2 else None
    if sink is not None:
        sink.append((st[:, 0].detach().clone(), st[:, 2].detach().clone()))       # (G, C) each
    elif update and running_mean is not None:
        # (st is not differentiable: no autograd bookkeeping here)
        if groups == 1:  # the rows of st, read in place
            update_running_stats(running_mean, running_var, nbt, None, None, momentum, nonfinite, name, finite,
                                 stats=st)
        else:  # Algorithm 2's estimate over the groups: the mean of mu_B and of m/(m-1) sigma2_B
            update_running_stats(running_mean, running_var, nbt, st[:, 0].mean(dim=0), st[:, 2].mean(dim=0),
                                 momentum, nonfinite, name, finite)
    return y


def _train_fused(input, weight, bias, running_mean, running_var, nbt, momentum, eps, nonfinite, name, lay, target):
    """Plain BN on the fused kernels (``lay``: the input's layout; ``target``: the running
    update :func:`batchnorm._stats.prepare_update` made, or None): the
    operator, or its forward alone where nothing is differentiated, then the one update.
    :func:`_train_operator` for this one case, in fewer steps (it runs on every step of
    every wide layer)."""
    try:
        if torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            # (tuple.__new__: the Plan without its Python-level constructor)
            y, st, finite = _operator.BatchNormFunction.apply(
                input, weight, bias, None, None, None,
                tuple.__new__(Plan, (1, eps, True, None, None, name, None, lay, target)))
        else:
            y, st, finite = _operator.fused_forward(input, lay, weight, bias, eps, name, target)
    except MismatchError:
        check_arguments(input, weight, bias, running_mean, running_var, name, nbt)
        raise
    if running_mean is not None:
        update_running_stats(running_mean, running_var, nbt, None, None, momentum, nonfinite, name, finite, stats=st,
                             target=target)
    return y


def _train_torch(input, weight, bias, running_mean, running_var, nbt, momentum, eps, nonfinite, name, impl,
                 checked):
    """Plain BN on torch's kernel and C++ autograd node. Its running update is torch's own
    (the same rule as :func:`update_running_stats`, with the unbiased variance from its own
    sums), guarded: a batch with NaN/Inf statistics restores the buffers. On CPU with "auto"
    a batch at offset risk (:func:`batchnorm._stats.offset_risk`: torch's naive float sums
    may have rounded its statistics) is recomputed by our operator."""
    if torch.compiler.is_compiling():
        return _train_compiled(input, weight, bias, running_mean, running_var, nbt, momentum, eps)
    if running_mean is None:
        try:
            out, mean, invstd, _, _ = torch._batch_norm_impl_index(input, weight, bias, None, None, True, 0.0, eps,
                                                                   torch.backends.cudnn.enabled)
        except RuntimeError:
            check_arguments(input, weight, bias, None, None, name)
            raise
        if impl == "auto" and input.is_cpu and _stats.check_kernel_stats(mean, invstd, input.numel() // input.size(1)) == 2:
            return _train_operator(input, weight, bias, None, None, None, momentum, eps, nonfinite, name, "auto", 1,
                                   None, None, None, False, None, None)
        return out
    factor = _stats.momentum_factor(momentum, nbt)
    backup = None
    try:
        backup = torch.stack((running_mean, running_var))               # (2, C), to undo a rejected batch
        # torch.batch_norm's own entry (it checks every size), returning the statistics too.
        out, mean, invstd, _, _ = torch._batch_norm_impl_index(input, weight, bias, running_mean, running_var, True,
                                                               factor, eps, input.is_cuda and torch.backends.cudnn.enabled)
    except RuntimeError:
        if backup is not None:  # torch's CPU kernel may have written running_mean when it rejected running_var
            _restore(running_mean, running_var, backup)
        check_arguments(input, weight, bias, running_mean, running_var, name, nbt)
        raise
    if input.is_cpu:
        code = _stats.check_kernel_stats(mean, invstd, input.numel() // input.size(1), check_offset=impl == "auto")
    else:  # cuDNN returns no usable statistics here: test what it wrote (one reduction, one sync)
        code = 0 if math.isfinite(float(running_var.sum())) else 1
    if code:
        _restore(running_mean, running_var, backup)
        if code == 2:
            return _train_operator(input, weight, bias, running_mean, running_var, nbt, momentum, eps, nonfinite,
                                   name, "auto", 1, None, None, None, True, None, None)
        _stats.report_nonfinite(nonfinite, name)
        return out
    if nbt is not None:
        try:
            nbt.add_(1)
        except RuntimeError:
            _restore(running_mean, running_var, backup)
            check_counter(nbt, input.device, name)
            raise
    return out


def _restore(running_mean: Tensor, running_var: Tensor, backup: Tensor) -> None:
    running_mean.data.copy_(backup[0])
    running_var.data.copy_(backup[1])


def _train_compiled(input, weight, bias, running_mean, running_var, nbt, momentum, eps):
    """Plain BN under torch.compile: no data-dependent branch or host read. torch's kernel
    computes the batch mean and unbiased variance into zeroed scratch buffers (momentum 1),
    then the one update (its select form)."""
    if running_mean is None:
        return torch.nn.functional.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    scratch = torch.zeros((2,) + tuple(running_mean.shape), dtype=running_mean.dtype, device=input.device)
    out, mean, invstd = torch.native_batch_norm(input, weight, bias, scratch[0], scratch[1], True, 1.0, eps)
    finite = torch.isfinite(mean).all() & (invstd > 0).all()
    bad = torch.where(finite, 0.0, float("nan"))  # a NaN makes the update's guard reject the batch
    update_running_stats(running_mean, running_var, nbt, scratch[0] + bad, scratch[1], momentum)
    return out


def _train_captured(input, weight, bias, running_mean, running_var, nbt, momentum, eps, nonfinite, name, mode, impl,
                    groups, mask, limits, process_group, update, sink, checked):
    """A training step under torch.jit.trace or torch.export (``mode`` "trace"/"export"):
    the registered operators ``batchnorm::train`` and ``batchnorm::update_running_stats_``,
    one node each, whose running update the captured program replays; under forward-mode
    AD or torch.func transforms ("transform"): differentiable torch operations only
    (:mod:`batchnorm._reference`), which every transform understands."""
    with traced_checks():
        if not checked:
            check_arguments(input, weight, bias, running_mean, running_var, name, nbt, training=update)
        if process_group is not None:
            raise NotImplementedError(f"{name}: statistics synchronized across processes are not supported under "
                                      f"{mode} (torch.jit.trace, torch.export, forward AD, torch.func)")
        if impl == "torch" and (groups != 1 or mask is not None or limits is not None):
            raise ValueError(f"{name}: impl='torch' has no ghost batches, masks or Batch Renormalization")
    if mode in ("trace", "export"):
        lim = None
        if limits is not None:
            # (r_max, d_max) as one tensor: a schedule's values are tensors of the step count here.
            lim = torch.stack([v.to(torch.float64) if isinstance(v, Tensor)
                               else torch.full((), float(v), dtype=torch.float64) for v in limits])
        renorm = limits is not None
        y, stats = _operator.train(input, weight, bias, mask, running_mean if renorm else None,
                                   running_var if renorm else None, lim, groups, eps, impl != "reference")
        if sink is not None:
            sink.append((stats[:, 0], stats[:, 2]))
        elif update and running_mean is not None:
            _operator.update_running_stats_(running_mean, running_var, nbt, stats, momentum, nonfinite, name)
        return y
    xv = grouped_view(input, groups)                                     # (G, n, C, *S)
    mv = None if mask is None else grouped_view(mask.unsqueeze(1), groups)  # (G, n, 1, L)
    mean, var, count, _, _ = _stats.batch_stats(xv, mv, method="reference")  # (G, 1, C, 1..)
    r = d = None
    if limits is not None:  # constants of the derivative (Ioffe 2017)
        r, d = _stats.renorm_rd(mean.detach(), var.detach(), running_mean, running_var, limits[0], limits[1], eps)
    xs = xv.to(mean.dtype)
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
