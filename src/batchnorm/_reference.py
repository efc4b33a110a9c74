"""Batch Normalization in torch operations only: the reference that every autograd mode can
differentiate (double backward, forward-mode AD, torch.func.vmap/jacrev, batched
gradients), and the Section 3 gradients as one formula.

Tensors are grouped views (G, n, C, *S): G statistics groups (ghost batches; 1 otherwise);
statistics have shape (G, 1, C, 1, ...). ``mask``: None or a (G, n, 1, L) bool tensor of the
positions that enter the statistics (every position is normalized). ``r``/``d``: Batch
Renormalization's corrections (Ioffe 2017), constants of the derivative; None for BN.

Nothing here reads a value on the host or branches on data, so the same code runs under
torch.func transforms, dual tensors and batched gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["stat_dtype", "reduce_dims", "channel", "moments", "normalize", "forward", "grads"]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(ndim: int) -> Tuple[int, ...]:
    """Dimensions to reduce over for a grouped view ``(G, n, C, *spatial)``: all but 0 and 2."""
    return (1,) + tuple(range(3, ndim))


def channel(t: Tensor, ndim: int) -> Tensor:
    """A (C,) per-channel tensor shaped to broadcast against a grouped view of ``ndim`` dims."""
    return t.reshape((1, 1, -1) + (1,) * (ndim - 3))


def moments(xs: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-group, per-channel mean, biased variance and count of the grouped view ``xs``
    (already in the statistics dtype), differentiable: mu_B = (1/m) sum x_i and sigma2_B =
    (1/m) sum (x_i - mu_B)^2 (Algorithm 1), two passes (no E[x^2] - E[x]^2). With ``mask``
    only its positions count, selected (not multiplied), so values outside never enter."""
    dims = reduce_dims(xs.dim())
    if mask is None:
        count = xs.new_full((), float(xs.numel() // max(1, xs.size(0) * xs.size(2))))
        mean = xs.mean(dim=dims, keepdim=True)
        var = (xs - mean).square().mean(dim=dims, keepdim=True)
        return mean, var, count
    valid = mask.expand_as(xs)
    count = valid.to(xs.dtype).sum(dim=dims, keepdim=True)               # (G, 1, C, 1..)
    safe = count.clamp_min(1.0)
    zero = xs.new_zeros(())
    mean = torch.where(valid, xs, zero).sum(dim=dims, keepdim=True) / safe
    var = torch.where(valid, (xs - mean).square(), zero).sum(dim=dims, keepdim=True) / safe
    return mean, var, count


def normalize(xs: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Optional[Tensor], bias: Optional[Tensor],
              r: Optional[Tensor] = None, d: Optional[Tensor] = None) -> Tensor:
    """y = gamma * (r * (x - mu_B) / sqrt(sigma2_B + eps) + d) + beta (r = 1, d = 0 for BN)."""
    nd = xs.dim()
    y = (xs - mean) * torch.rsqrt(var + eps)
    if r is not None:
        y = y * r + d
    if weight is not None:
        y = y * channel(weight.to(xs.dtype), nd)
    if bias is not None:
        y = y + channel(bias.to(xs.dtype), nd)
    return y


def forward(xv: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, mask: Optional[Tensor] = None,
            r: Optional[Tensor] = None, d: Optional[Tensor] = None) -> Tensor:
    """The training-mode transform of a grouped view, statistics included, in the input's
    dtype (statistics in :func:`stat_dtype`)."""
    xs = xv.to(stat_dtype(xv.dtype))
    mean, var, _ = moments(xs, mask)
    return normalize(xs, mean, var, eps, weight, bias, r, d).to(xv.dtype)


def grads(dy: Tensor, xv: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor, count: Tensor,
          mask: Optional[Tensor] = None, r: Optional[Tensor] = None, d: Optional[Tensor] = None,
          need_x: bool = True, need_w: bool = True, need_b: bool = True):
    """The Section 3 gradients (see :mod:`batchnorm._operator`), given the forward's
    statistics as constants: (dx, dgamma, dbeta), None where not needed. With g = dL/dy *
    gamma * r and xhat = (x - mu_B) * s,

        dL/dx = s * (g - w * (sum g + xhat * sum g xhat) / m),  dL/dgamma = sum dy (r xhat + d),

    w the mask (1 without). Not differentiable through the statistics (for that, use
    :func:`forward` under autograd); batched gradients (vmap) are fine."""
    dt = mean.dtype
    nd = xv.dim()
    dims = reduce_dims(nd)
    dy = dy.to(dt)
    xc = xv.to(dt) - mean                                                # x - mu_B
    sum_dy = dy.sum(dim=dims, keepdim=True)                              # (G, 1, C, 1..)
    sum_dy_xhat = (dy * xc).sum(dim=dims, keepdim=True) * invstd         # (G, 1, C, 1..)
    gw = gb = gx = None
    if weight is not None and need_w:
        g = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
        gw = g.sum(dim=0).reshape(-1).to(weight.dtype)                   # (C,)
    if need_b:
        gb = sum_dy.sum(dim=0).reshape(-1)                               # (C,)
    if need_x:
        k = invstd if r is None else invstd * r
        if weight is not None:
            k = k * channel(weight.to(dt), nd)                           # (G, 1, C, 1..)
        a = k * sum_dy / count
        b = k * sum_dy_xhat * invstd / count
        corr = xc * b + a
        if mask is not None:
            corr = corr * mask.to(dt)
        gx = (dy * k - corr).to(xv.dtype)
    return gx, gw, gb
