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
one all-reduce in the backward.

Tensors are grouped views (G, n, C, *S): G statistics groups (ghost batches; 1 otherwise),
statistics of shape (G, 1, C, 1, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _channel(t: Tensor, ndim: int) -> Tensor:
    return t.view((1, 1, -1) + (1,) * (ndim - 3))


def _dims(ndim: int):
    return (1,) + tuple(range(3, ndim))


class BatchNormTransform(torch.autograd.Function):
    """y = gamma * (r * (x - mean) * invstd + d) + beta, with the Section 3 backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, mask, r, d, process_group):
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
        xf = x if x.dtype == dt else x.to(dt)
        y = torch.addcmul(shift, xf, scale)                               # (G, n, C, *S)
        ctx.save_for_backward(x, weight, mean, invstd, count, mask, r, d)
        ctx.process_group = process_group
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, count, mask, r, d = ctx.saved_tensors
        dt = mean.dtype
        nd = x.dim()
        dims = _dims(nd)
        dy = grad_out if grad_out.dtype == dt else grad_out.to(dt)        # (G, n, C, *S)
        fused = mask is None and x.size(0) == 1 and x.dtype == dt and x.size(1) > 0
        if fused:
            # One fused pass for the three per-element/per-channel pieces: torch's inference-mode
            # BN backward (statistics as constants) gives dy * gamma r s, sum dy * xhat and
            # sum dy, for the mean and s given. The corrections through mu_B and sigma2_B
            # below are ours (Section 3).
            c = x.size(2)
            w_eff = (torch.ones(c, dtype=dt, device=x.device) if weight is None else weight.to(dt))
            if r is not None:
                w_eff = w_eff * r.reshape(-1)
            dy_s, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy[0], x[0], w_eff, mean.reshape(-1), invstd.reshape(-1).pow(-2), None, None, False, 0.0,
                [ctx.needs_input_grad[0], True, True])
            shape = mean.shape
            sum_dy, sum_dy_xhat = sum_dy.view(shape), sum_dy_xhat.view(shape)  # (1, 1, C, 1..)
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
                import torch.distributed as dist
                both = torch.cat([sum_dy, sum_dy_xhat], dim=0)
                dist.all_reduce(both, group=ctx.process_group)
                sum_dy, sum_dy_xhat = both.chunk(2, dim=0)
            k = invstd if r is None else invstd * r                       # ds/dxhat scale
            if weight is not None:
                k = k * _channel(weight.to(dt), nd)                       # (G, 1, C, 1..)
            a = k * sum_dy / count                                        # (G, 1, C, 1..)
            b = k * sum_dy_xhat * invstd / count                          # (G, 1, C, 1..)
            if fused:
                xc = x[0] - mean[0]                                       # (n, C, *S)
                grad_x = torch.addcmul(dy_s, xc, -b[0]).sub_(a[0]).unsqueeze(0)
            elif mask is None:
                grad_x = dy * k - (xc * b + a)                            # (G, n, C, *S)
            else:
                grad_x = dy * k - mask.to(dt) * (xc * b + a)
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None, None, None
