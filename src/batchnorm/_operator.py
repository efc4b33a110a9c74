"""The one training operator of Batch Normalization: every variant (plain, ghost batches,
masks, synchronized statistics, Batch Renormalization) through one forward and one
backward, written by hand from Section 3 of the paper.

Notation (per channel c and statistics group; all sums over the group's m values):
    xhat_i = (x_i - mu_B) * s,      s = 1 / sqrt(sigma2_B + eps)
    y_i    = gamma * (r * xhat_i + d) + beta
with r = 1 and d = 0 for plain BN (Batch Renormalization's r, d are constants in the
backward, Ioffe 2017). The paper's chain rule through sigma2_B and mu_B,

    dL/dxhat_i   = dL/dy_i * gamma * r                                   (= g_i)
    dL/dsigma2_B = sum_i g_i (x_i - mu_B) * (-1/2) s^3
    dL/dmu_B     = -s * sum_i g_i         (the sigma2_B term vanishes: sum_i (x_i - mu_B) = 0)
    dL/dx_i      = g_i s + dL/dsigma2_B * 2 (x_i - mu_B) / m + dL/dmu_B / m

simplifies to
    dL/dx_i = s * (g_i - w_i (sum_j g_j + xhat_i * sum_j g_j xhat_j) / m),
    dL/dgamma = sum_i dL/dy_i (r xhat_i + d),  dL/dbeta = sum_i dL/dy_i,

w the mask (1 without; the sums still run over every position, since every position is
normalized). With synchronized statistics the two sums are global: one collective in the
backward (:func:`batchnorm._collectives.all_sum`).

The operator is :func:`forward` and :func:`backward`, exposed twice: eagerly as the
autograd Function :class:`BatchNormFunction` (cheapest per call), and as the registered
torch operators ``batchnorm::train`` and ``batchnorm::update_running_stats_`` for graph
capture (torch.jit.trace, torch.export), which see one node per call. Both return the
statistics as an output marked non-differentiable: (G, 3, C) rows mean, invstd and
unbiased variance, in the statistics dtype.

Tensors are grouped views (G, n, C, *S): G statistics groups (ghost batches; 1 otherwise),
statistics of shape (G, 1, C, 1, ...).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _collectives, _fused, _reference, _stats
from ._reference import channel, reduce_dims, stat_dtype

__all__ = ["Plan", "BatchNormFunction", "forward", "backward", "train", "update_running_stats_", "special"]


class Plan(NamedTuple):
    """What one training call computes, besides its tensors."""

    groups: int = 1            # statistics groups (ghost batches)
    eps: float = 1e-5
    kernels: bool = True       # our fused C kernels may run (impl other than "reference")
    limits: Any = None         # Batch Renormalization: (r_max, d_max), floats or 0-d tensors
    group: Any = None          # process group of synchronized statistics, or None
    name: str = "batch_norm"
    owner: Any = None          # the calling module (the ranks' channel check runs once per owner)
    lay: Any = None            # the kernels' layout of the input, where the caller has found it
    target: Any = None         # with lay: the running buffers' _fused.running_target, which receives the stats


_has_storage = torch._C._has_storage
_NO_SYNC_SPECIAL = ("synchronized BN across processes: double backward and batched gradients would need "
                    "differentiable collectives; not supported (nor by torch.nn.SyncBatchNorm)")


def _layout(xv: Tensor, plan: Plan):
    """The fused kernels' layout of one group of ``xv``, or None where they do not run."""
    if (not plan.kernels or type(xv) is not Tensor or xv.dtype != stat_dtype(xv.dtype)
            or torch.compiler.is_compiling() or not _fused.available()):
        return None
    return _fused.layout(xv[0])


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], plan: Plan):
    """Training-mode BN of ``x`` (N, C, *S): returns (y, stats, saved), y of x's shape and
    memory format, stats (G, 3, C) and ``saved`` = (path, st, rd, count, lay) for
    :func:`backward`. ``running_mean``/``running_var`` are read by Batch Renormalization
    only. Raises, before anything is written, if a group has fewer than two values per
    channel (a mask: no valid position)."""
    G, eps = plan.groups, plan.eps
    C = x.size(1)
    if G == 1 and plan.lay is not None and mask is None and plan.group is None and plan.limits is None:
        # Plain BN on the kernels (the caller found their layout): one call, no views.
        y, st, finite = fused_forward(x, plan.lay, weight, bias, eps, plan.name, plan.target)
        return y, st, ("fused", st, None, x.numel() // C, plan.lay, finite)
    xv = _stats.grouped_view(x, G)                                                   # (G, n, C, *S)
    m = xv[0].numel() // C if xv.size(0) else 0
    lay = _layout(xv, plan)
    if lay is not None and mask is None and plan.group is None:
        _stats.check_training_count(x, m, plan.name)
        y = torch.empty_like(x)
        yv = _stats.grouped_view(y, G)
        st = torch.empty(G, 3, C, dtype=x.dtype, device=x.device)
        rd = torch.empty(G, 2, C, dtype=x.dtype, device=x.device) if plan.limits is not None else None
        finite = True
        for g in range(G):
            renorm = None if rd is None else (running_mean, running_var, plan.limits[0], plan.limits[1], rd[g])
            finite &= _fused.train_forward(xv[g], lay, weight, bias, eps, yv[g], st[g], renorm,
                                           _stats.unbiased(1.0, m))[2]
        return y, st, ("fused", st, rd, m, lay, finite)
    if (lay is not None and mask is not None and G == 1 and plan.group is None and plan.limits is None
            and x.dim() == 3 and x.is_contiguous()):
        y, st, count = _fused.masked_forward(x, mask, weight, bias, eps)
        _check_count(x, count, G, plan.name, True)
        st[2].mul_(_stats.unbiased(1.0, count))
        st = st.unsqueeze(0)
        return y, st, ("masked", st, None, count, lay, None)
    mv = None if mask is None else mask.view(G, mask.size(0) // G, 1, mask.size(1))   # (G, n, 1, L)
    with torch.no_grad():
        mean, var, count, work, center = _stats.batch_stats(xv, mv, method="kernels" if lay else "auto",
                                                            keep_work=lay is None)
        if plan.group is not None:
            mean, var, count = _collectives.sync_stats(mean, var, count, plan.group, C, plan.name, plan.owner)
        if mv is None and plan.group is None:
            _stats.check_training_count(x, m, plan.name)
        elif not torch.compiler.is_compiling():  # data-dependent (mask, other ranks): not under compile
            # (one rank's batch may be empty; the global one may not)
            _check_count(x, int(count.min()) if count.numel() else 0, G, plan.name, mv is not None)
        invstd = torch.rsqrt(var + eps)
        r = d = rd = None
        if plan.limits is not None:
            r, d = _stats.renorm_rd(mean, var, running_mean, running_var, plan.limits[0], plan.limits[1], eps)
            rd = torch.cat((r.reshape(G, 1, C), d.reshape(G, 1, C)), dim=1)           # (G, 2, C)
        # Everything per channel folded into one scale and one shift: one pass over x.
        scale = invstd if r is None else invstd * r                                  # (G, 1, C, 1..)
        shift = -mean * scale if d is None else d - mean * scale
        nd = xv.dim()
        if weight is not None:
            w = channel(weight.detach().to(mean.dtype), nd)
            scale, shift = scale * w, shift * w
        if bias is not None:
            shift = shift + channel(bias.detach().to(mean.dtype), nd)
        # y is a fresh tensor of x's shape (an output that is a view of a buffer made here
        # could not be modified in place).
        y = torch.empty_like(x)
        yv = _stats.grouped_view(y, G)
        if lay is not None:
            for g in range(G):
                _fused.affine(xv[g], lay, scale[g], shift[g], yv[g])
        elif work is not None and work.dtype == x.dtype:
            # ``work`` holds x - center (left over from the statistics): one pass from it.
            torch.addcmul(shift + center * scale, work, scale, out=yv)
        else:
            xs = xv if xv.dtype == mean.dtype else xv.to(mean.dtype)
            yv.copy_(torch.addcmul(shift, xs, scale))
        st = torch.stack((mean.reshape(G, C), invstd.reshape(G, C), _stats.unbiased(var, count).reshape(G, C)), 1)
    return y, st, ("torch", st, rd, count, lay, None)


def fused_forward(x: Tensor, lay, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, name: str,
                  target=None):
    """:func:`forward` of plain BN on the fused kernels, ``lay`` the input's layout
    (:func:`batchnorm._fused.layout`): (y, stats (1, 3, C), finite), one kernel call; the
    statistics in the block of ``target`` (a :func:`batchnorm._fused.running_target`) where
    given. The whole forward where nothing is differentiated (no Plan, no autograd
    bookkeeping)."""
    m = x.numel() // x.size(1)
    if m <= 1 or x.size(0) == 0:
        _stats.check_training_count(x, m, name)
    return _fused.train_forward(x, lay, weight, bias, eps, None, target, None, _stats.unbiased(1.0, m), True)


def _check_count(x: Tensor, count: int, groups: int, name: str, masked: bool) -> None:
    """At least two values per channel in every group (``count``: the fewest; data-dependent
    for masks and synchronized statistics)."""
    if count >= 2:
        return
    if masked and count == 0:
        raise ValueError(f"{name}: the mask has no valid position {'in some ghost batch ' if groups > 1 else ''}"
                         "in training mode; statistics need at least two valid values per channel")
    raise ValueError(f"{name}: expected more than 1 value per channel when training, got input of shape "
                     f"{tuple(x.shape)} ({count} value per channel{' over all ranks' if not masked else ''}); "
                     "use eval() or a larger batch")


def special(grad_out: Tensor) -> bool:
    """Whether a backward must run on differentiable torch operations: double backward
    (create_graph=True: grad mode is on inside the backward), or batched gradients
    (is_grads_batched, gradcheck's batched check: a vmapped dy without storage)."""
    if torch.is_grad_enabled():
        return True
    # traced tensors have no storage, and batching is not traced here
    return not torch.compiler.is_compiling() and (type(grad_out) is not Tensor or not _has_storage(grad_out))


def backward(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], mask: Optional[Tensor], saved, plan: Plan,
             needs: Tuple[bool, bool, bool]):
    """The gradients (dx, dgamma, dbeta) of :func:`forward`, None where not needed."""
    path, st, rd, count, lay, _ = saved
    G = plan.groups
    need_x, need_w, need_b = needs[0], needs[1] and weight is not None, needs[2]
    if special(grad_out):
        if plan.group is not None:
            raise NotImplementedError(_NO_SYNC_SPECIAL)
        C, nd = x.size(1), x.dim() + 1
        shape = (G, 1, C) + (1,) * (nd - 3)
        xv = _stats.grouped_view(x, G)
        mv = None if mask is None else mask.view(G, mask.size(0) // G, 1, mask.size(1))
        mean, invstd = st[:, 0].reshape(shape), st[:, 1].reshape(shape)
        r = d = None
        if rd is not None:
            r, d = rd[:, 0].reshape(shape), rd[:, 1].reshape(shape)
        if mv is not None and not isinstance(count, Tensor):
            count = mv.to(mean.dtype).sum(dim=reduce_dims(nd), keepdim=True)
        gx, gw, gb = _special_grads(_stats.grouped_view(grad_out, G), xv, weight, plan.eps, mean, invstd, count,
                                    mv, r, d, (need_x, need_w, need_b))
        return (None if gx is None else gx.view(x.shape)), _param(gw, weight), _param(gb, weight, st.dtype)
    if path == "fused" and G == 1:  # (the kernels' gradients have x's dtype, the parameters')
        return _fused.train_backward(grad_out, x, lay, weight, st, need_x, need_w, need_b, None,
                                     None if rd is None else rd[0])
    if path == "fused":
        dx = torch.empty_like(x) if need_x else None
        xv, dyv = _stats.grouped_view(x, G), _stats.grouped_view(grad_out, G)
        dxv = None if dx is None else _stats.grouped_view(dx, G)
        dw = db = None
        for g in range(G):
            _, w_g, b_g = _fused.train_backward(dyv[g], xv[g], lay, weight, st[g], need_x, need_w, need_b,
                                                None if dxv is None else dxv[g], None if rd is None else rd[g])
            dw = w_g if dw is None else dw.add_(w_g)
            db = b_g if db is None else db.add_(b_g)
        return dx, _param(dw, weight), _param(db, weight, st.dtype)
    if path == "masked":
        dx, dw, db = _fused.masked_backward(grad_out, x, mask, weight, st[0], count, need_x, need_w, need_b)
        return dx, _param(dw, weight), _param(db, weight, st.dtype)
    return _torch_backward(grad_out, x, weight, mask, st, rd, count, lay, plan, (need_x, need_w, need_b))


def _torch_backward(grad_out, x, weight, mask, st, rd, count, lay, plan: Plan, needs):
    """The Section 3 gradients with the two per-channel sums and dx on the kernels where they
    read the layout, else on torch operations; the sums summed over ranks if synchronized."""
    need_x, need_w, need_b = needs
    G, C = plan.groups, x.size(1)
    xv = _stats.grouped_view(x, G)
    nd = xv.dim()
    shape = (G, 1, C) + (1,) * (nd - 3)
    dt = st.dtype
    mean, invstd = st[:, 0].reshape(shape), st[:, 1].reshape(shape)
    dy = _stats.grouped_view(grad_out, G)
    if dy.dtype != dt:
        dy = dy.to(dt)
    mv = None if mask is None else mask.view(G, mask.size(0) // G, 1, mask.size(1))
    if lay is not None and mv is None:
        if dy.stride() != xv.stride():
            dy = torch.empty_like(xv).copy_(dy)                           # the kernels read both alike
        parts = [_fused.sums(dy[g], xv[g], lay, mean[g]) for g in range(G)]
        sum_dy = torch.stack([p[0] for p in parts]).view(shape)           # (G, 1, C, 1..)
        sum_dy_xhat = torch.stack([p[1] for p in parts]).view(shape) * invstd
    elif mv is None and xv.dtype == dt and xv.size(1) > 0 and C > 0:
        # The two sums in one fused pass per group: torch's inference-mode BN backward with
        # the batch statistics as constants gives sum dy * xhat and sum dy (nothing else is
        # asked of it); the corrections through mu_B and sigma2_B below are ours. torch's
        # kernel misreads a dy whose strides differ from x's in some layouts (channels_last
        # x with size-1 dimensions in torch 2.13): same strides.
        if dy.stride() != xv.stride():
            dy = torch.empty_like(xv, dtype=dt).copy_(dy)
        var_arg = invstd.pow(-2)
        parts = [torch.ops.aten.native_batch_norm_backward(
            dy[g], xv[g], None, mean[g].reshape(-1), var_arg[g].reshape(-1), None, None, False, 0.0,
            [False, True, True]) for g in range(G)]
        sum_dy_xhat = torch.stack([p[1] for p in parts]).view(shape)
        sum_dy = torch.stack([p[2] for p in parts]).view(shape)
        xc = None
    else:
        xc = (xv if xv.dtype == dt else xv.to(dt)) - mean                  # x - mu_B
        dims = reduce_dims(nd)
        sum_dy = dy.sum(dim=dims, keepdim=True)
        sum_dy_xhat = (dy * xc).sum(dim=dims, keepdim=True) * invstd
    r = d = None
    if rd is not None:
        r, d = rd[:, 0].reshape(shape), rd[:, 1].reshape(shape)
    gw = gb = gx = None
    if need_w:
        g = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
        gw = g.sum(dim=0).reshape(-1)
    if need_b:
        gb = sum_dy.sum(dim=0).reshape(-1)
    if need_x:
        if plan.group is not None:
            # The statistics were global, so the two sums they feed back must be too.
            # Wire format (2, C) float64 on every path.
            both = torch.cat((sum_dy.reshape(1, C), sum_dy_xhat.reshape(1, C))).to(torch.float64)
            total = _collectives.all_sum(both, plan.group)
            sum_dy, sum_dy_xhat = (t.to(dt).view(shape) for t in total)
        k = invstd if r is None else invstd * r                            # ds/dxhat scale
        if weight is not None:
            k = k * channel(weight.detach().to(dt), nd)
        m = count if isinstance(count, Tensor) else float(count)
        a = k * sum_dy / m
        b = k * sum_dy_xhat * invstd / m
        if lay is not None and mv is None:
            gx = torch.empty_like(x)
            gxv = _stats.grouped_view(gx, G)
            beta, gamma = -b, b * mean - a
            for g in range(G):
                _fused.grad_input(dy[g], xv[g], lay, k[g], beta[g], gamma[g], gxv[g])
            return gx, _param(gw, weight), _param(gb, weight, dt)
        if xc is None:
            # dL/dx = k dy - b (x - mu_B) - a, as two passes: k dy + (b mu_B - a), then - b x.
            gxv = torch.addcmul(b * mean - a, dy, k).addcmul_(xv, b, value=-1.0)
        elif mv is None:
            gxv = dy * k - (xc * b + a)
        else:
            gxv = dy * k - mv.to(dt) * (xc * b + a)
        gx = gxv.to(x.dtype).view(x.shape)
    return gx, _param(gw, weight), _param(gb, weight, dt)


def _param(g: Optional[Tensor], weight: Optional[Tensor], default: Optional[torch.dtype] = None):
    """A parameter gradient in the parameters' dtype."""
    if g is None:
        return None
    dt = weight.dtype if weight is not None else default
    return g if dt is None or g.dtype == dt else g.to(dt)


def _special_grads(grad_out: Tensor, xv: Tensor, weight, eps: float, mean: Tensor, invstd: Tensor, count,
                   mask=None, r=None, d=None, needs=(True, True, True)):
    """The gradients for the cases :func:`special` names. Double backward: autograd through
    the reference forward (:func:`batchnorm._reference.forward`), the statistics recomputed
    from x, so that dx is a differentiable function of x, gamma and dy (r, d stay constants,
    as in the first derivative). Batched gradients: the Section 3 formula in torch
    operations (:func:`batchnorm._reference.grads`), which vmap can batch."""
    need_x, need_w, need_b = needs
    need_w = need_w and weight is not None
    if not torch.is_grad_enabled():
        return _reference.grads(grad_out, xv, weight, mean, invstd, count, mask, r, d, need_x, need_w, need_b)
    gx = gw = gb = None
    with torch.enable_grad():
        inputs = ([xv] if need_x else []) + ([weight] if need_w else [])
        if inputs:
            y = _reference.forward(xv, weight, None, eps, mask, r, d)
            got = list(torch.autograd.grad(y, inputs, grad_out, create_graph=True, allow_unused=True))
            gx = got.pop(0) if need_x else None
            gw = got.pop(0) if need_w else None
    if need_b:
        gb = grad_out.sum(dim=reduce_dims(grad_out.dim())).sum(dim=0)
    return gx, gw, gb


class BatchNormFunction(torch.autograd.Function):
    """The eager form of the operator: ``apply(x, weight, bias, mask, running_mean,
    running_var, plan) -> (y, stats, finite)``: stats non-differentiable; ``finite``
    True or False where the kernels already know whether the statistics are finite, else
    None; under torch.compile ``(y, stats)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, running_mean, running_var, plan):
        y, st, saved = forward(x, weight, bias, mask, running_mean, running_var, plan)
        path, _, rd, count, lay, finite = saved
        counted = isinstance(count, Tensor)
        ctx.save_for_backward(x, weight, mask, st, rd, count if counted else None)
        ctx.meta = (path, None if counted else count, lay, plan, bias is not None)
        ctx.mark_non_differentiable(st)
        ctx.set_materialize_grads(False)  # no zero gradient is made for the statistics
        if plan.lay is None and torch.compiler.is_compiling():  # (a layout is found in eager mode only)
            return y, st  # a non-tensor output breaks torch.compile's tracing of the backward
        return y, st, finite

    @staticmethod
    def backward(ctx, grad_y, grad_st, grad_finite=None):
        x, weight, mask, st, rd, count_t = ctx.saved_tensors
        path, count, lay, plan, has_bias = ctx.meta
        need = ctx.needs_input_grad
        if grad_y is None:  # y took no part in the loss
            return (None,) * 7
        saved = (path, st, rd, count_t if count_t is not None else count, lay, None)
        dx, dw, db = backward(grad_y, x, weight, mask, saved, plan, (need[0], need[1], has_bias and need[2]))
        return dx, dw, db, None, None, None, None


# -- the registered operators, for graph capture ------------------------------------------------

@torch.library.custom_op("batchnorm::train", mutates_args=())
def train(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mask: Optional[Tensor],
          running_mean: Optional[Tensor], running_var: Optional[Tensor], limits: Optional[Tensor], groups: int,
          eps: float, use_kernels: bool) -> Tuple[Tensor, Tensor]:
    """``batchnorm::train``: :func:`forward` as a functional operator; returns y (a fresh
    tensor, as an operator's output must be) and the stats (G, 5, C): :func:`forward`'s
    three rows, then Batch Renormalization's r and d (1 and 0 without)."""
    lim = None if limits is None else tuple(limits.tolist())
    plan = Plan(groups, eps, use_kernels, lim, None, "batch_norm")
    y, st, saved = forward(input, weight, bias, mask, running_mean, running_var, plan)
    rd = saved[2]
    G, C = st.shape[0], st.shape[2]
    extra = torch.cat((torch.ones(G, 1, C, dtype=st.dtype), torch.zeros(G, 1, C, dtype=st.dtype)), 1) \
        if rd is None else rd.to(st.dtype)
    out = y if y._base is None and y.data_ptr() != input.data_ptr() else y.clone()
    return out, torch.cat((st, extra), 1)


@train.register_fake
def _(input, weight, bias, mask, running_mean, running_var, limits, groups, eps, use_kernels):
    dt = stat_dtype(input.dtype)
    return torch.empty_like(input), input.new_empty((groups, 5, input.size(1)), dtype=dt)


def _setup(ctx, inputs, output):
    input, weight, bias, mask = inputs[:4]
    ctx.save_for_backward(input, weight, mask, output[1])
    ctx.plan = Plan(inputs[7], inputs[8], inputs[9], None if inputs[6] is None else True, None, "batch_norm")
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, grad_stats):
    input, weight, mask, stats = ctx.saved_tensors
    plan = ctx.plan
    need = ctx.needs_input_grad
    st, rd = stats[:, :3].contiguous(), stats[:, 3:].contiguous() if plan.limits is not None else None
    G, C = plan.groups, input.size(1)
    xv = _stats.grouped_view(input, G)
    lay = _layout(xv, plan) if input.dtype == st.dtype else None
    if mask is None:
        count = xv[0].numel() // C
        path = "fused" if lay is not None else "torch"
    else:
        mv = mask.view(G, mask.size(0) // G, 1, mask.size(1))
        count = mv.to(st.dtype).sum(dim=reduce_dims(xv.dim()), keepdim=True)
        path, lay = "torch", None
    dx, dw, db = backward(grad_y, input, weight, mask, (path, st, rd, count, lay, None), plan,
                          (need[0], need[1], ctx.has_bias and need[2]))
    return (dx, dw, db) + (None,) * 7


train.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("batchnorm::update_running_stats_",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def update_running_stats_(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                          stats: Tensor, momentum: Optional[float], nonfinite: str, name: str) -> None:
    """``batchnorm::update_running_stats_``: :func:`batchnorm._stats.update_running_stats`
    of the stats of ``batchnorm::train`` (Algorithm 2's estimate over the groups: the mean
    of mu_B and of m/(m-1) sigma2_B)."""
    _stats.update_running_stats(running_mean, running_var, num_batches_tracked, stats[:, 0].mean(dim=0),
                                stats[:, 2].mean(dim=0), momentum, nonfinite, name)


@update_running_stats_.register_fake
def _(running_mean, running_var, num_batches_tracked, stats, momentum, nonfinite, name):
    return None
