"""The training step as registered torch operators, for graph capture (torch.jit.trace,
torch.export): each BN call becomes two nodes that a traced or exported program replays.

* ``batchnorm::train(input, weight, bias, mask, running_mean, running_var, limits, groups,
  eps, use_kernels) -> (y, stats)``: functional and differentiable (the Section 3
  gradients, :mod:`batchnorm._autograd`'s formula; double backward through the reference);
  ``stats`` is (G, 5, C) in the statistics dtype, rows mean, invstd, unbiased variance, r,
  d, and not differentiable. One operator for plain BN, ghost batches (``groups``), masks
  and Batch Renormalization (``limits`` = (r_max, d_max), with the running buffers it reads).
* ``batchnorm::update_running_stats_(running_mean, running_var, num_batches_tracked, stats,
  momentum, nonfinite, name)``: folds the statistics into the buffers, which it mutates,
  behind the NaN/Inf guard (:func:`batchnorm._update.update_running_stats`).

torch.library requires a differentiable operator to be functional, hence two operators.
Eager training does not call them: a registered Python operator costs about three times
an autograd.Function per call (dispatcher, schema, autograd wrapper), which is most of a
small layer's step; eager code calls the same kernels directly (:mod:`batchnorm.functional`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _fused, _reference
from ._autograd import special_grads, _special
from ._update import update_running_stats

__all__ = ["train", "update_running_stats_"]


def _grouped(input: Tensor, mask: Optional[Tensor], groups: int):
    xv = input.view((groups, input.size(0) // groups) + tuple(input.shape[1:]))   # (G, n, C, *S)
    mv = None if mask is None else mask.view(groups, mask.size(0) // groups, 1, mask.size(1))  # (G, n, 1, L)
    return xv, mv


def _kernel_layout(xv: Tensor, mask, use_kernels: bool):
    if not use_kernels or mask is not None or not _fused.available():
        return None
    return _fused.layout(xv[0])


@torch.library.custom_op("batchnorm::train", mutates_args=())
def train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor],
          running_mean: Optional[Tensor], running_var: Optional[Tensor], limits: Optional[Tensor], groups: int,
          eps: float, use_kernels: bool) -> Tuple[Tensor, Tensor]:
    xv, mv = _grouped(input, mask, groups)
    G, C = xv.size(0), xv.size(2)
    dt = _reference.stat_dtype(input.dtype)
    stats = torch.empty(G, 5, C, dtype=dt)
    lay = _kernel_layout(xv, mask, use_kernels)
    out = torch.empty_like(input)  # returned as is: an operator's output must not be a view
    y = out.view(xv.shape)
    if lay is not None:
        # One fused kernel call per group: statistics, output and (renorm) r and d.
        st = torch.empty(G, 3, C, dtype=dt)
        rd = torch.empty(G, 2, C, dtype=dt) if limits is not None else None
        renorm = None
        if limits is not None:
            r_max, d_max = limits.tolist()
        for g in range(G):
            if limits is not None:
                renorm = (running_mean, running_var, r_max, d_max, rd[g])
            _fused.train_forward(xv[g], lay, weight, bias, eps, y[g], st[g], renorm)
        m = xv[0].numel() // C
        stats[:, 0:2] = st[:, 0:2]
        stats[:, 2] = st[:, 2] * (m / max(m - 1, 1))
        if rd is None:
            stats[:, 3].fill_(1.0)
            stats[:, 4].zero_()
        else:
            stats[:, 3:5] = rd
        return out, stats
    xs = xv.to(dt)
    mean, var, count = _reference.stats(xs, mv)                          # (G, 1, C, 1..)
    r = d = None
    if limits is not None:
        r, d = _reference.renorm_rd(mean, var, running_mean, running_var, limits[0], limits[1], eps)
    y.copy_(_reference.normalize(xs, mean, var, eps, weight, bias, r, d))
    stats[:, 0] = mean.reshape(G, C)
    stats[:, 1] = torch.rsqrt(var + eps).reshape(G, C)
    stats[:, 2] = (var * count / (count - 1).clamp_min(1.0)).reshape(G, C)
    stats[:, 3] = 1.0 if r is None else r.reshape(G, C)
    stats[:, 4] = 0.0 if d is None else d.reshape(G, C)
    return out, stats


@train.register_fake
def _(input, weight, bias, mask, running_mean, running_var, limits, groups, eps, use_kernels):
    dt = _reference.stat_dtype(input.dtype)
    return torch.empty_like(input), input.new_empty((groups, 5, input.size(1)), dtype=dt)


def _setup(ctx, inputs, output):
    input, weight, bias, mask = inputs[:4]
    ctx.save_for_backward(input, weight, mask, output[1])
    ctx.groups, ctx.eps, ctx.use_kernels = inputs[7], inputs[8], inputs[9]
    ctx.has_bias = bias is not None
    ctx.renorm = inputs[6] is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, grad_stats):
    input, weight, mask, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = (need[0], weight is not None and need[1], ctx.has_bias and need[2])
    xv, mv = _grouped(input, mask, ctx.groups)
    G, C, nd = xv.size(0), xv.size(2), xv.dim()
    shape = (G, 1, C) + (1,) * (nd - 3)
    mean, invstd = stats[:, 0].reshape(shape), stats[:, 1].reshape(shape)
    r = d = None
    if ctx.renorm:
        r, d = stats[:, 3].reshape(shape), stats[:, 4].reshape(shape)
    dy = grad_y.view(xv.shape)
    lay = _kernel_layout(xv, mask, ctx.use_kernels) if xv.dtype == stats.dtype else None
    if lay is not None and not _special(dy):
        dx = torch.empty_like(xv) if needs[0] else None
        dw = db = None
        for g in range(G):
            st = stats[g, 0:3].contiguous()
            rd = stats[g, 3:5].contiguous() if ctx.renorm else None
            _, w_g, b_g = _fused.train_backward(dy[g], xv[g], lay, weight, st, needs[0], needs[1], needs[2],
                                                None if dx is None else dx[g], rd)
            dw = w_g if dw is None else dw + w_g
            db = b_g if db is None else db + b_g
    else:
        count = xv[0].numel() // C if mv is None else mv.to(stats.dtype).sum(dim=_reference.reduce_dims(nd),
                                                                              keepdim=True)
        dx, dw, db = special_grads(dy, xv, weight, ctx.eps, mean, invstd, count, mv, r, d, needs)
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(weight.dtype if weight is not None else stats.dtype)
    return (None if dx is None else dx.view(input.shape), dw, db) + (None,) * 7


train.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("batchnorm::update_running_stats_",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_stats_(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                          stats: Tensor, momentum: Optional[float], nonfinite: str, name: str) -> None:
    # Algorithm 2's estimate over the groups: the mean of mu_B and of m/(m-1) sigma2_B.
    update_running_stats(running_mean, running_var, num_batches_tracked, stats[:, 0].mean(dim=0),
                         stats[:, 2].mean(dim=0), momentum, nonfinite, name)


@update_running_stats_.register_fake
def _(running_mean, running_var, num_batches_tracked, stats, momentum, nonfinite, name):
    return None
