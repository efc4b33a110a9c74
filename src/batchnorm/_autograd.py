"""The BN transform with the backward written by hand from Section 3 of the paper.

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
    dL/dx_i = s * (g_i - (sum_j g_j + xhat_i * sum_j g_j xhat_j) / m),
    dL/dgamma = sum_i dL/dy_i (r xhat_i + d),  dL/dbeta = sum_i dL/dy_i.

With a mask w (0/1) only valid positions enter mu_B and sigma2_B, and the correction terms
carry w_i: dL/dx_i = s * (g_i - w_i (sum_j g_j + xhat_i sum_j g_j xhat_j) / m), the sums
still running over every position (invalid positions are normalized too, so their
gradients reach the statistics). With synchronized statistics the two sums are global:
one collective in the backward (:func:`batchnorm.distributed.all_sum`).

Tensors are grouped views (G, n, C, *S): G statistics groups (ghost batches; 1 otherwise),
statistics of shape (G, 1, C, 1, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _fused, _reference

_has_storage = torch._C._has_storage


def _special(grad_out: Tensor) -> bool:
    """Whether a backward must run on differentiable torch operations: double backward
    (create_graph=True: grad mode is on inside the backward), or batched gradients
    (is_grads_batched, gradcheck's batched check: a vmapped dy without storage)."""
    if torch.compiler.is_compiling():  # traced tensors have no storage; batching is not traced here
        return torch.is_grad_enabled()
    return torch.is_grad_enabled() or not _has_storage(grad_out) or type(grad_out) is not Tensor


def special_grads(grad_out: Tensor, xv: Tensor, weight, eps: float, mean: Tensor, invstd: Tensor, count,
                  mask=None, r=None, d=None, needs=(True, True, True)):
    """The gradients (dx, dgamma, dbeta) of a grouped view's training transform, for the
    cases :func:`_special` names. Double backward: autograd through the reference forward
    (:func:`batchnorm._reference.forward`), the statistics recomputed from x, so that dx is a
    differentiable function of x, gamma and dy (r, d stay constants, as in the first
    derivative). Batched gradients: the Section 3 formula in torch operations
    (:func:`batchnorm._reference.grads`), which vmap can batch."""
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
        gb = grad_out.sum(dim=_reference.reduce_dims(grad_out.dim())).sum(dim=0)  # (C,)
    return gx, gw, gb


def kernel_layout(x: Tensor):
    """The fused kernels' layout for a grouped view (G, n, C, *S), or None where they do not
    apply (no kernels built, under torch.compile's tracing, tensor subclasses, other layouts)."""
    if type(x) is not Tensor or x.dim() < 3 or torch.compiler.is_compiling() or not _fused.available():
        return None
    return _fused.layout(x[0])


def _channel(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, 1, -1) + (1,) * (ndim - 3))


def _dims(ndim: int):
    return (1,) + tuple(range(3, ndim))


class BatchNormTransform(torch.autograd.Function):
    """y = gamma * (r * (x - mean) * invstd + d) + beta, with the Section 3 backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, mask, r, d, process_group, scratch, use_kernels, eps):
        # ``scratch``: (work, center) or None, in a tuple so that autograd does not take the
        # buffer for an input: the output may overwrite it, and an output that is an input
        # would be returned as a view of it (then no in-place op on the output is allowed).
        work, center = scratch if scratch is not None else (None, None)
        dt = mean.dtype
        nd = x.dim()
        # Fold everything per-channel into one scale and one shift: one pass over x.
        scale = invstd if r is None else invstd * r                      # (G, 1, C, 1..)
        shift = -mean * scale if d is None else d - mean * scale          # (G, 1, C, 1..)
        if weight is not None:
            w = _channel(weight.to(dt), nd)
            scale = scale * w
            shift = shift * w
        if bias is not None:
            shift = shift + _channel(bias.to(dt), nd)
        lay = kernel_layout(x) if x.dtype == dt and use_kernels else None
        if lay is not None:
            y = torch.empty_like(x)
            for g in range(x.size(0)):                                    # statistics groups
                _fused.affine(x[g], lay, scale[g], shift[g], y[g])
        elif work is not None and work.dtype == x.dtype:
            # ``work`` holds x - center (left over from the statistics, a private buffer):
            # normalize it in place, so the output costs no extra allocation or pass.
            y = torch.addcmul(shift + center * scale, work, scale, out=work)
        else:
            xf = x if x.dtype == dt else x.to(dt)
            y = torch.addcmul(shift, xf, scale)                           # (G, n, C, *S)
        ctx.save_for_backward(x, weight, mean, invstd, count, mask, r, d)
        ctx.process_group = process_group
        ctx.has_bias = bias is not None
        ctx.use_kernels = use_kernels
        ctx.eps = eps
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, count, mask, r, d = ctx.saved_tensors
        if _special(grad_out):
            if ctx.process_group is not None:
                raise NotImplementedError(_NO_SYNC_SPECIAL)
            need = ctx.needs_input_grad
            gx, gw, gb = special_grads(grad_out, x, weight, ctx.eps, mean, invstd, count, mask, r, d,
                                       (need[0], need[1], ctx.has_bias and need[2]))
            gw, gb = _param_dtype(gw, gb, weight)
            return gx, gw, gb, None, None, None, None, None, None, None, None, None, None
        dt = mean.dtype
        nd = x.dim()
        dims = _dims(nd)
        dy = grad_out if grad_out.dtype == dt else grad_out.to(dt)        # (G, n, C, *S)
        fused = mask is None and x.dtype == dt and x.size(1) > 0 and x.size(2) > 0
        lay = kernel_layout(x) if fused and ctx.use_kernels else None
        if lay is not None:
            if dy.stride() != x.stride():
                dy = torch.empty_like(x).copy_(dy)                        # the kernels read both alike
            parts = [_fused.sums(dy[g], x[g], lay, mean[g]) for g in range(x.size(0))]
            shape = mean.shape
            sum_dy = torch.stack([p[0] for p in parts]).view(shape)       # (G, 1, C, 1..)
            sum_dy_xhat = torch.stack([p[1] for p in parts]).view(shape) * invstd
        elif fused:
            # The two per-channel sums in one fused pass per statistics group: torch's
            # inference-mode BN backward with the batch statistics as constants gives
            # sum dy * xhat and sum dy (nothing else is asked of it). The corrections through
            # mu_B and sigma2_B below are ours (Section 3).
            # torch's kernel misreads a dy whose strides differ from x's in some layouts
            # (channels_last x with size-1 dimensions: wrong sums in torch 2.13): same strides.
            if dy.stride() != x.stride():
                dy = torch.empty_like(x, dtype=dt).copy_(dy)
            var_arg = invstd.pow(-2)
            parts = [torch.ops.aten.native_batch_norm_backward(
                dy[g], x[g], None, mean[g].reshape(-1), var_arg[g].reshape(-1), None, None, False, 0.0,
                [False, True, True]) for g in range(x.size(0))]
            shape = mean.shape
            sum_dy_xhat = torch.stack([p[1] for p in parts]).view(shape)  # (G, 1, C, 1..)
            sum_dy = torch.stack([p[2] for p in parts]).view(shape)       # (G, 1, C, 1..)
        else:
            xc = (x if x.dtype == dt else x.to(dt)) - mean                # x - mu_B
            sum_dy = dy.sum(dim=dims, keepdim=True)                       # (G, 1, C, 1..)
            sum_dy_xhat = (dy * xc).sum(dim=dims, keepdim=True) * invstd  # (G, 1, C, 1..)

        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            gw = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
            grad_weight = gw.sum(dim=0).reshape(-1).to(weight.dtype)      # (C,)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.sum(dim=0).reshape(-1).to(weight.dtype if weight is not None else dt)  # (C,)

        grad_x = None
        if ctx.needs_input_grad[0]:
            if ctx.process_group is not None:
                # The statistics were global, so the two sums they feed back must be too.
                from .distributed import all_sum
                # Wire format (2, C) float64, as distributed.FusedSyncBatchNorm's.
                both = torch.cat([sum_dy, sum_dy_xhat], dim=0)
                total = all_sum(both.reshape(2, -1).to(torch.float64), ctx.process_group)
                sum_dy, sum_dy_xhat = total.to(dt).view_as(both).chunk(2, dim=0)
            k = invstd if r is None else invstd * r                       # ds/dxhat scale
            if weight is not None:
                k = k * _channel(weight.to(dt), nd)                       # (G, 1, C, 1..)
            a = k * sum_dy / count                                        # (G, 1, C, 1..)
            b = k * sum_dy_xhat * invstd / count                          # (G, 1, C, 1..)
            if lay is not None:
                grad_x = torch.empty_like(x)
                beta, gamma = -b, b * mean - a
                for g in range(x.size(0)):
                    _fused.grad_input(dy[g], x[g], lay, k[g], beta[g], gamma[g], grad_x[g])
            elif fused:
                # dL/dx = k dy - b (x - mu_B) - a, as two passes: k dy + (b mu_B - a), then - b x.
                grad_x = torch.addcmul(b * mean - a, dy, k).addcmul_(x, b, value=-1.0)
            elif mask is None:
                grad_x = dy * k - (xc * b + a)                            # (G, n, C, *S)
            else:
                grad_x = dy * k - mask.to(dt) * (xc * b + a)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None, None


_NO_SYNC_SPECIAL = ("synchronized BN across processes: double backward and batched gradients would need "
                    "differentiable collectives; not supported (nor by torch.nn.SyncBatchNorm)")


def _grouped_stats(st: Tensor, nd: int):
    """Mean and invstd rows of kernel statistics (G, 3, C) or (3, C) as (G, 1, C, 1..)."""
    st = st if st.dim() == 3 else st.unsqueeze(0)
    shape = (st.size(0), 1, st.size(2)) + (1,) * (nd - 3)
    return st[:, 0].reshape(shape), st[:, 1].reshape(shape)


def _param_dtype(dw, db, weight):
    """The kernels' parameter gradients (input dtype) in the parameters' dtype."""
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    if db is not None and weight is not None and db.dtype != weight.dtype:
        db = db.to(weight.dtype)
    return dw, db


class FusedBatchNorm(torch.autograd.Function):
    """Plain BN training step on the fused CPU kernels: statistics and output in one call
    forward, the Section 3 gradients in one call backward (the same formulas as
    :class:`BatchNormTransform`, in C). ``result`` receives the (3, C) statistics (mean,
    invstd, var_scale * biased var) and whether they were finite."""

    @staticmethod
    def forward(ctx, x, weight, bias, lay, eps, var_scale, result):
        y, st, finite = _fused.train_forward(x, lay, weight, bias, eps, var_scale=var_scale)
        ctx.save_for_backward(x, weight, st)
        ctx.lay = lay
        ctx.has_bias = bias is not None
        ctx.eps = eps
        result.extend((st, finite))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, st = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _special(grad_out):
            xv = x.unsqueeze(0)
            mean, invstd = _grouped_stats(st, xv.dim())
            gx, dw, db = special_grads(grad_out.unsqueeze(0), xv, weight, ctx.eps, mean, invstd, x.numel() // x.size(1),
                                       needs=(need[0], need[1], ctx.has_bias and need[2]))
            dw, db = _param_dtype(dw, db, weight)
            return None if gx is None else gx.squeeze(0), dw, db, None, None, None, None
        dx, dw, db = _fused.train_backward(grad_out, x, ctx.lay, weight, st, need[0],
                                           weight is not None and need[1], ctx.has_bias and need[2])
        dw, db = _param_dtype(dw, db, weight)
        return dx, dw, db, None, None, None, None


class FusedGroupedBatchNorm(torch.autograd.Function):
    """Ghost batches and/or Batch Renormalization on the fused CPU kernels: one forward and
    one backward kernel call per statistics group of the grouped view (G, n, C, *S).

    ``renorm``: None, or (running_mean, running_var, r_max, d_max); r and d are computed in
    the kernel from each group's statistics and the running ones, exactly as
    :meth:`batchnorm.renorm._BatchRenorm._renorm` does, and are constants of the backward.
    ``result`` receives the (G, 3, C) statistics (mean, invstd, biased var) and whether all
    were finite. The running buffers are left to the caller."""

    @staticmethod
    def forward(ctx, xv, weight, bias, lay, eps, renorm, result):
        G, C = xv.size(0), xv.size(2)
        y = torch.empty_like(xv)
        st = torch.empty(G, 3, C, dtype=xv.dtype)
        rd = torch.empty(G, 2, C, dtype=xv.dtype) if renorm is not None else None
        finite = True
        for g in range(G):
            ok = _fused.train_forward(xv[g], lay, weight, bias, eps, y[g], st[g],
                                      None if renorm is None else (*renorm, rd[g]))[2]
            finite = finite and ok
        ctx.save_for_backward(xv, weight, st, rd)
        ctx.lay = lay
        ctx.has_bias = bias is not None
        ctx.eps = eps
        result.extend((st, finite))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xv, weight, st, rd = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_w, need_b = weight is not None and need[1], ctx.has_bias and need[2]
        if _special(grad_out):
            nd = xv.dim()
            mean, invstd = _grouped_stats(st, nd)
            r = d = None
            if rd is not None:
                shape = mean.shape
                r, d = rd[:, 0].reshape(shape), rd[:, 1].reshape(shape)
            count = xv[0].numel() // xv.size(2)
            dx, dw, db = special_grads(grad_out, xv, weight, ctx.eps, mean, invstd, count, None, r, d,
                                       (need[0], need_w, need_b))
            dw, db = _param_dtype(dw, db, weight)
            return dx, dw, db, None, None, None, None
        dx = torch.empty_like(xv) if need[0] else None
        dw = db = None
        for g in range(xv.size(0)):
            _, w_g, b_g = _fused.train_backward(grad_out[g], xv[g], ctx.lay, weight, st[g], need[0], need_w, need_b,
                                                None if dx is None else dx[g], None if rd is None else rd[g])
            if need_w:
                dw = w_g if dw is None else dw.add_(w_g)
            if need_b:
                db = b_g if db is None else db.add_(b_g)
        dw, db = _param_dtype(dw, db, weight)
        return dx, dw, db, None, None, None, None


class FusedMaskedBatchNorm(torch.autograd.Function):
    """Masked statistics on the fused CPU kernels for contiguous (N, C, L) input and an (N, L)
    bool mask: statistics over valid positions, every position normalized, and the masked
    Section 3 gradients (module docstring). ``result`` receives the (3, C) statistics and
    the number of valid positions (0: nothing was computed; the caller raises)."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps, result):
        y, st, count = _fused.masked_forward(x, mask, weight, bias, eps)
        ctx.save_for_backward(x, mask, weight, st)
        ctx.count = count
        ctx.has_bias = bias is not None
        ctx.eps = eps
        result.extend((st, count))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight, st = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _special(grad_out):
            xv = x.unsqueeze(0)
            mean, invstd = _grouped_stats(st, xv.dim())
            mv = mask.view(1, mask.size(0), 1, mask.size(1))
            gx, dw, db = special_grads(grad_out.unsqueeze(0), xv, weight, ctx.eps, mean, invstd, ctx.count, mv,
                                       needs=(need[0], need[2], ctx.has_bias and need[3]))
            dw, db = _param_dtype(dw, db, weight)
            return None if gx is None else gx.squeeze(0), None, dw, db, None, None
        dx, dw, db = _fused.masked_backward(grad_out, x, mask, weight, st, ctx.count, need[0],
                                            weight is not None and need[2], ctx.has_bias and need[3])
        dw, db = _param_dtype(dw, db, weight)
        return dx, None, dw, db, None, None
