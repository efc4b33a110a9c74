"""BN followed by an activation, after an optional residual add, as one layer:
``act(BN(input) + residual)``, with an in-place mode that keeps one tensor for the backward.

The in-place mode follows In-Place Activated BatchNorm (Rota Bulo et al., CVPR 2018): for
an invertible activation the backward needs only the output, from which it recovers the
pre-activation z = act^-1(y) and the normalized value xhat = (z - beta - residual) / gamma,
so the layer overwrites its input and saves the output alone (and the residual, if any;
in a residual network it is the block's input, which the network keeps anyway).
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as torch_F
from torch import Tensor

from . import _fused, _operator, _reference, _stats
from . import functional as F
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "ACTIVATIONS", "INPLACE_ACTIVATIONS"]

#: The activations and their keyword arguments (defaults as torch.nn.functional's).
ACTIVATIONS: Dict[str, Dict[str, Any]] = {
    "identity": {},
    "relu": {},
    "leaky_relu": {"negative_slope": 0.01},
    "elu": {"alpha": 1.0},
    "silu": {},
    "gelu": {"approximate": "none"},
}

#: The invertible ones, which inplace=True accepts (leaky_relu with a slope > 0, elu with
#: alpha > 0). ReLU loses the value wherever it outputs 0; SiLU and GELU are not monotonic.
INPLACE_ACTIVATIONS = ("identity", "leaky_relu", "elu")


def _activate(y: Tensor, act: str, kw: Dict[str, Any], inplace: bool) -> Tensor:
    """act(y); in place on ``y`` where the activation's backward needs only its output."""
    if act == "identity":
        return y
    if act == "relu":
        return torch.relu_(y) if inplace else torch.relu(y)
    if act == "leaky_relu":
        return torch_F.leaky_relu(y, kw["negative_slope"], inplace=inplace)
    if act == "elu":
        return torch_F.elu(y, kw["alpha"], inplace=inplace)
    if act == "silu":
        return torch_F.silu(y)
    return torch_F.gelu(y, approximate=kw["approximate"])


def _invert(y: Tensor, act: str, kw: Dict[str, Any]):
    """(z, act'(z)) from y = act(z), for the invertible activations."""
    if act == "identity":
        return y, torch.ones_like(y)
    if act == "leaky_relu":
        s = kw["negative_slope"]
        pos = y >= 0
        return torch.where(pos, y, y / s), pos.to(y.dtype) * (1.0 - s) + s  # 1 or s, in y's dtype
    alpha = kw["alpha"]  # elu: y = alpha * (exp(z) - 1) for z <= 0
    pos = y > 0
    return torch.where(pos, y, torch.log1p(y / alpha)), torch.where(pos, torch.ones_like(y), y + alpha)


_SAVED_NAMES: Dict[type, tuple] = {}


def _saved_by_producer(t: Tensor) -> Optional[str]:
    """The name of the autograd node that produced ``t`` if that node saved ``t`` (or a
    tensor sharing its memory) for its own backward, else None. Overwriting ``t`` would
    then corrupt that backward: e.g. a ReLU's or sigmoid's output, or the output of a
    preceding in-place BatchNormAct. (Other consumers of ``t`` that saved it are not
    reachable from ``t``; autograd's version counter still catches those at backward.)"""
    fn = t.grad_fn
    if fn is None:
        return None
    names = _SAVED_NAMES.get(type(fn))
    first = names is None
    if first:  # the C++ nodes' saved values are attributes _saved_<name>; Python ones' saved_tensors
        names = tuple(n for n in dir(fn) if n.startswith("_saved_")) + (
            ("saved_tensors",) if hasattr(fn, "saved_tensors") else ())
    storage, kept = t.untyped_storage().data_ptr(), []
    found = None
    for name in names:
        try:
            value = getattr(fn, name)
        except RuntimeError:  # already freed by a backward
            kept.append(name)
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if all(v is None or isinstance(v, Tensor) for v in values):
            kept.append(name)  # a tensor field (a node type's fields keep their kinds): looked at again
        for v in values:
            if (found is None and isinstance(v, Tensor) and v.device == t.device
                    and v.untyped_storage().data_ptr() == storage):
                found = type(fn).__name__
        if found is not None and not first:
            return found
    if first:
        _SAVED_NAMES[type(fn)] = tuple(kept)
    return found


class _InplaceBNAct(torch.autograd.Function):
    """y = act(gamma * (x - mean) * invstd + beta + residual) written into x. ``mean`` and
    ``invstd`` (C,) are the batch's (``batch``: their gradient is part of the backward, as
    Section 3 derives it) or the running ones. Saves y (and the residual), not x."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, invstd, batch, act, kw, lay=None):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
        shift = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
        if lay is not None:  # the kernels: one pass, y written over x
            spec = _kernel_act(act, kw)
            _fused.act_forward(x, lay, scale.to(x.dtype), shift.to(x.dtype), spec.slope, residual, inplace=True,
                               kind=spec.kind, act_alpha=spec.alpha)
        else:
            x.mul_(scale.view(shape).to(x.dtype)).add_(shift.view(shape).to(x.dtype))
            if residual is not None:
                x.add_(residual)
            _activate(x, act, kw, inplace=True)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, weight, bias, residual, invstd)
        ctx.batch, ctx.act, ctx.kw, ctx.lay = batch, act, kw, lay
        return x

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            # A second derivative needs how invstd depends on x, and x is gone (that is the
            # point). Refused loudly: a once-differentiable backward would give silent zeros.
            raise RuntimeError("BatchNormAct with inplace=True has first derivatives only (its input was "
                               "overwritten); for double backward (create_graph=True) use inplace=False")
        if ctx.lay is not None and not _operator.special(dy):
            return _InplaceBNAct._kernels_backward(ctx, dy)
        y, weight, bias, residual, invstd = ctx.saved_tensors
        dt = invstd.dtype
        shape = (1, -1) + (1,) * (y.dim() - 2)
        dims = [d for d in range(y.dim()) if d != 1]
        z, slope = _invert(y.to(dt), ctx.act, ctx.kw)
        dz = dy.to(dt) * slope
        if residual is not None:
            z = z - residual.to(dt)
        if bias is not None:
            z = z - bias.to(dt).view(shape)
        gamma = None if weight is None else weight.to(dt).view(shape)
        xhat = z if gamma is None else z / gamma
        dbeta = dz.sum(dims)
        dgamma = (dz * xhat).sum(dims)
        g = invstd.view(shape) if gamma is None else gamma * invstd.view(shape)
        if ctx.batch:
            m = y.numel() // y.size(1)
            dx = g * (dz - (dbeta / m).view(shape) - xhat * (dgamma / m).view(shape))
        else:
            dx = g * dz
        need = ctx.needs_input_grad
        return (dx.to(y.dtype) if need[0] else None,
                dgamma.to(weight.dtype) if weight is not None and need[1] else None,
                dbeta.to(bias.dtype) if bias is not None and need[2] else None,
                dz.to(residual.dtype) if residual is not None and need[3] else None,
                None, None, None, None, None, None)

    @staticmethod
    def _kernels_backward(ctx, dy):
        """Two passes over the output (and the residual): the sums of dz and dz * (u - beta)
        with u = act^-1(y) - residual = gamma * xhat + beta, then dx and dz."""
        y, weight, bias, residual, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_r = need[0], need[3] and residual is not None
        dt, C = y.dtype, y.size(1)
        spec = _kernel_act(ctx.act, ctx.kw)
        beta = torch.zeros(C, dtype=dt) if bias is None else bias.detach()
        sums, _ = _fused.act_sums(dy, y, ctx.lay, None, None, spec.slope, None, beta, residual, output=True,
                                  kind=spec.kind, act_alpha=spec.alpha)
        gamma = torch.ones(C, dtype=torch.float64) if weight is None else weight.detach().double()
        s1, sxh = sums[0], sums[1] / gamma                                  # sum dz, sum dz * xhat
        dw = sxh.to(dt) if weight is not None and need[1] else None
        db = s1.to(dt) if bias is not None and need[2] else None
        dx = dz = None
        if need_x or need_r:
            k = gamma * invstd.double()
            if ctx.batch:
                m = y.numel() // C
                be = -k * sxh / (m * gamma)
                ga = -k * s1 / m - be * beta.double()
            else:
                be = ga = torch.zeros(C, dtype=torch.float64)
            dx, dz = _fused.act_grad(dy, y, ctx.lay, None, None, spec.slope, None, k.to(dt), be.to(dt), ga.to(dt),
                                     need_x, need_r, residual, output=True, kind=spec.kind, act_alpha=spec.alpha)
        return dx, dw, db, dz, None, None, None, None, None, None


class _KernelAct(NamedTuple):
    """An activation as the kernels take it: its code (:data:`batchnorm._fused.LINEAR`,
    ``ELU``, ``SILU``, ``GELU``, ``GELU_TANH``), the slope below zero of the piecewise-linear
    ones, elu's alpha."""
    kind: int
    slope: float = 0.0
    alpha: float = 1.0


def _kernel_act(act: str, kw: Dict[str, Any]) -> Optional[_KernelAct]:
    """The activation as our kernels run it, or None where they do not (a parameter that is
    not finite, a gelu approximation torch does not know: torch operations, and their errors)."""
    if act == "identity":
        return _KernelAct(_fused.LINEAR, 1.0)
    if act == "relu":
        return _KernelAct(_fused.LINEAR, 0.0)
    if act == "leaky_relu":  # slope 0 would be ReLU, but NaN-free at -inf
        slope = float(kw["negative_slope"])
        return _KernelAct(_fused.LINEAR, slope) if slope != 0 and math.isfinite(slope) else None
    if act == "elu":
        alpha = float(kw["alpha"])
        return _KernelAct(_fused.ELU, alpha=alpha) if math.isfinite(alpha) else None
    if act == "silu":
        return _KernelAct(_fused.SILU)
    if act == "gelu" and kw["approximate"] in ("none", "tanh"):
        return _KernelAct(_fused.GELU if kw["approximate"] == "none" else _fused.GELU_TANH)
    return None


_SQRT1_2, _INV_SQRT_2PI = math.sqrt(0.5), 1 / math.sqrt(2 * math.pi)
_TANH_BETA, _TANH_KAPPA = math.sqrt(2 / math.pi), 0.044715  # torch's tanh gelu: u = beta (z + kappa z^3)


def _smooth_grad(z: Tensor, spec: _KernelAct) -> Tensor:
    """act'(z) of a smooth activation in torch operations, differentiable again (the double
    backward's), by the kernels' formulas."""
    if spec.kind == _fused.ELU:  # exp of z <= 0 only: no inf * 0 in the second derivative
        return torch.where(z > 0, torch.ones_like(z), spec.alpha * torch.exp(z.clamp(max=0)))
    if spec.kind == _fused.SILU:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if spec.kind == _fused.GELU:
        return 0.5 * torch.erfc(z * -_SQRT1_2) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    s = torch.sigmoid(2 * _TANH_BETA * (z + _TANH_KAPPA * z * z * z))  # (1 + tanh u) / 2
    return s + 2 * z * s * (1 - s) * _TANH_BETA * (1 + 3 * _TANH_KAPPA * z * z)


class _FusedBNAct(torch.autograd.Function):
    """y = act(scale * x + shift + residual) on the fused kernels (``spec``, a
    :class:`_KernelAct`), scale = gamma * invstd and shift = beta - mean * scale from the
    batch's statistics (``batch``: their gradient is part of the backward, Section 3) or the
    running ones. One pass forward; backward: one pass for the two sums of dz = dy * act'(z),
    one for dx (and dz, the residual's gradient). The backward recomputes z from x exactly as
    the forward found it (z = fma(scale, x, shift) + residual, the same rounding), so it saves
    x and, with a residual: for a piecewise-linear act the sign of z as one byte per value,
    for a smooth one (elu, silu, gelu) the residual itself (the caller's tensor, not a copy:
    in a residual network the block's input, which the network keeps anyway), read once more
    by each backward pass; never the output."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, mean, invstd, batch, spec, lay, eps):
        scale = invstd if weight is None else weight.detach() * invstd
        shift = -mean * scale if bias is None else bias.detach() - mean * scale
        linear = spec.kind == _fused.LINEAR
        y, mask = _fused.act_forward(x, lay, scale, shift, spec.slope, residual,
                                     want_mask=residual is not None and linear and spec.slope != 1.0,
                                     kind=spec.kind, act_alpha=spec.alpha)
        ctx.save_for_backward(x, weight, bias, None if linear else residual, mean, invstd, scale, shift, mask)
        ctx.meta = (batch, spec, lay, eps, residual is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, res, mean, invstd, scale, shift, mask = ctx.saved_tensors
        batch, spec, lay, eps, has_res = ctx.meta
        need = ctx.needs_input_grad
        need_x, need_w, need_b = need[0], need[1] and weight is not None, need[2] and bias is not None
        need_r = need[3] and has_res
        if _operator.special(dy):
            return _FusedBNAct._special(dy, x, weight, bias, res, mean, invstd, scale, shift, mask, batch, spec, lay,
                                        eps, (need_x, need_w, need_b, need_r))
        dt, C = x.dtype, x.size(1)
        act = {"kind": spec.kind, "act_alpha": spec.alpha}
        smooth = spec.kind != _fused.LINEAR
        gw = gb = dz = None
        al = be = ga = None
        if batch or need_w or need_b or smooth:  # a smooth act's dz comes with the sums
            sums, dz = _fused.act_sums(dy, x, lay, scale, shift, spec.slope, mask, mean, res, **act)
            s1, s2 = sums[0], sums[1]                                                  # float64 (C,) each
        if need_b:
            gb = s1.to(dt, copy=True)  # (a row of the sums buffer: never handed out as a view)
        if need_w:
            gw = (s2 * invstd).to(dt)
        if need_x:
            # dx = al * dz + be * x + ga (Section 3, the sums' terms in be and ga), computed in
            # float64 and cast together (each small operation costs microseconds in a step)
            inv = invstd.double()
            k = inv if weight is None else inv * weight.detach()
            if batch:
                b2 = (k * inv.square()).mul_(s2).div_(x.numel() // C)                  # -be
                ga = torch.addcmul(b2 * mean, k, s1, value=-C / x.numel())             # b2 mu - k s1 / m
                al, be, ga = torch.stack((k, b2.neg_(), ga)).to(dt).unbind()
            else:  # eval: dx = al * dz
                al = k.to(dt)
        dx = None
        zeros = torch.zeros(C, dtype=dt) if (need_x and not batch) or (not smooth and (need_x or need_r)) else None
        if smooth:
            if need_x and batch:
                dx = torch.empty_like(x)
                _fused.grad_input(dz, x, lay, al, be, ga, dx)
            elif need_x:  # eval: dx = k * dz, x not read (an infinite x gives no inf * 0)
                dx = torch.empty_like(x)
                _fused.affine(dz, lay, al, zeros, dx)
        elif need_x and not batch:
            # Eval: dx = k * dz. Through dz, not the training formula with zero coefficients:
            # 0 * x would make an infinite x a NaN gradient where torch's is finite.
            _, dz = _fused.act_grad(dy, x, lay, scale, shift, spec.slope, mask, zeros, zeros, zeros, False, True, res,
                                    **act)
            dx = torch.empty_like(x)
            _fused.affine(dz, lay, al, zeros, dx)
        elif need_x or need_r:
            dx, dz = _fused.act_grad(dy, x, lay, scale, shift, spec.slope, mask, zeros if al is None else al,
                                     zeros if be is None else be, zeros if ga is None else ga, need_x, need_r, res,
                                     **act)
        return dx, gw, gb, dz if need_r else None, None, None, None, None, None, None

    @staticmethod
    def _special(dy, x, weight, bias, res, mean, invstd, scale, shift, mask, batch, spec, lay, eps, needs):
        """Double backward (create_graph=True) and batched gradients: torch operations. act'(z)
        from the kernels, so that it agrees with the forward's z exactly, except in the double
        backward of a smooth act, whose act'(z) must be differentiable again: there z is
        recomputed in torch operations from x, gamma, beta (the statistics from x in
        training) and the residual, and act' is :func:`_smooth_grad`; for a piecewise-linear
        act, act' is piecewise constant (its own derivative is 0). Then BN's gradients as the
        core operator's special path."""
        need_x, need_w, need_b, need_r = needs
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if spec.kind != _fused.LINEAR and torch.is_grad_enabled():
            if batch:
                z = _reference.forward(x.unsqueeze(0), weight, bias, eps).squeeze(0)
            else:
                k = invstd if weight is None else weight * invstd
                z = (x - mean.view(shape)) * k.view(shape) + (0 if bias is None else bias.view(shape))
            deriv = _smooth_grad(z if res is None else z + res, spec)
        elif spec.kind != _fused.LINEAR:
            _, deriv = _fused.act_sums(torch.ones_like(x), x, lay, scale, shift, spec.slope, mask, mean, res,
                                       kind=spec.kind, act_alpha=spec.alpha)
        else:
            zeros = torch.zeros(x.size(1), dtype=x.dtype)
            _, deriv = _fused.act_grad(torch.ones_like(x), x, lay, scale, shift, spec.slope, mask, zeros, zeros, zeros,
                                       False, True, kind=spec.kind, act_alpha=spec.alpha)
        dz = dy * deriv
        dims = [d for d in range(x.dim()) if d != 1]
        gx = gw = gb = None
        if batch:
            gshape = (1, 1, -1) + (1,) * (x.dim() - 2)
            gx, gw, gb = _operator._special_grads(dz.unsqueeze(0), x.unsqueeze(0), weight, eps,
                                                  mean.view(gshape), invstd.view(gshape), x.numel() // x.size(1),
                                                  needs=(need_x, need_w, need_b))
            gx = None if gx is None else gx.squeeze(0)
        else:
            xhat = (x - mean.view(shape)) * invstd.view(shape)
            k = invstd if weight is None else weight * invstd
            gx = dz * k.view(shape) if need_x else None
            gw = (dz * xhat).sum(dims) if need_w else None
            gb = dz.sum(dims) if need_b else None
        if gb is not None and weight is not None:
            gb = gb.to(weight.dtype)
        return (gx if need_x else None, gw if need_w else None, gb if need_b else None,
                dz if need_r else None, None, None, None, None, None, None)


class _FusedBNActTrain(torch.autograd.Function):
    """:class:`_FusedBNAct` in training, the batch's statistics computed by the same kernel
    call (:func:`batchnorm._fused.act_train_forward`: the statistics pass, the coefficients,
    the activation's pass): ``apply(x, weight, bias, residual, spec, lay, eps, var_scale,
    target) -> (y, stats, finite)``, stats the (1, 3, C) rows mean, invstd and var_scale *
    biased variance (the block of ``target``, a :func:`batchnorm._fused.running_target`,
    where given), marked non-differentiable, for the caller's running update; ``finite``:
    whether they all are. Saves what :class:`_FusedBNAct` saves; its backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, spec, lay, eps, var_scale, target):
        linear = spec.kind == _fused.LINEAR
        y, mask, st, coef, finite = _fused.act_train_forward(
            x, lay, weight, bias, eps, var_scale, spec.slope, residual,
            want_mask=residual is not None and linear and spec.slope != 1.0, kind=spec.kind, act_alpha=spec.alpha,
            target=target)
        ctx.save_for_backward(x, weight, bias, None if linear else residual, st[0, 0], st[0, 1], coef[0], coef[1],
                              mask)
        ctx.meta = (True, spec, lay, eps, residual is not None)
        ctx.rows = (st, coef)  # the same memory as the saved rows, for the one-call backward
        ctx.mark_non_differentiable(st)
        ctx.set_materialize_grads(False)  # no zero gradient is made for the statistics
        return y, st, finite

    @staticmethod
    def backward(ctx, dy, grad_st=None, grad_finite=None):
        if dy is None:  # y took no part in the loss
            return (None,) * 9
        if _operator.special(dy):
            return _FusedBNAct.backward(ctx, dy)[:4] + (None,) * 5
        x, weight, bias, res, _, _, _, _, mask = ctx.saved_tensors
        _, spec, lay, _, has_res = ctx.meta
        st, coef = ctx.rows
        need = ctx.needs_input_grad
        dx, gw, gb, dz = _fused.act_train_backward(dy, x, lay, weight, st, coef, spec.slope, mask, res, need[0],
                                                   need[1] and weight is not None, need[2] and bias is not None,
                                                   need[3] and has_res, kind=spec.kind, act_alpha=spec.alpha)
        return dx, gw, gb, dz, None, None, None, None, None


class _BatchNormAct:
    """What BatchNormAct1d/2d/3d add to their BatchNorm class."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, act: str = "relu",
                 act_kwargs: Optional[Dict[str, Any]] = None, inplace: bool = False, **kwargs) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(f"{self._name}: act must be one of {', '.join(ACTIVATIONS)}, got {act!r}")
        extra = sorted(set(act_kwargs or {}) - set(ACTIVATIONS[act]))
        if extra:
            raise TypeError(f"{self._name}: act={act!r} takes no {', '.join(extra)}; it takes "
                            f"{', '.join(ACTIVATIONS[act]) or 'no arguments'}")
        kw = {**ACTIVATIONS[act], **(act_kwargs or {})}
        if inplace:
            if act not in INPLACE_ACTIVATIONS:
                raise ValueError(
                    f"{self._name}: inplace=True needs an invertible activation (the backward recovers BN's "
                    f"normalized value from the output), and {act} is not: use act='leaky_relu' (e.g. "
                    "negative_slope=0.01), 'elu' or 'identity', or inplace=False")
            if act == "leaky_relu" and not kw["negative_slope"] > 0:
                raise ValueError(f"{self._name}: inplace=True with leaky_relu needs negative_slope > 0, got "
                                 f"{kw['negative_slope']!r}")
            if act == "elu" and not kw["alpha"] > 0:
                raise ValueError(f"{self._name}: inplace=True with elu needs alpha > 0, got {kw['alpha']!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.act = act
        self.act_kwargs = kw
        self.inplace = inplace

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", act={self.act!r}"
        if self.act_kwargs:
            s += ", act_kwargs=" + repr(self.act_kwargs)
        return s + (", inplace=True" if self.inplace else "")

    def _script_refusal(self) -> Optional[str]:
        return f"adds an activation ({self.act})"

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if isinstance(input, torch.fx.Proxy):  # one call_module node, as for our BN layers
            return self._fx_call(input) if residual is None else self._fx_call(input, residual)
        if isinstance(input, Tensor) and self._inplace_applies():
            if self.inplace:
                return self._inplace_step(input, residual)
            lay = self._kernel_layout(input, residual)
            if lay is not None:
                return self._fused_step(input, residual, lay)
        y = self._forward(input)
        if residual is not None:
            y = y + residual
        # BN's output is a fresh tensor that autograd does not save: relu, leaky_relu and
        # elu act on it in place (their backward needs only their output).
        return _activate(y, self.act, self.act_kwargs, inplace=True)

    def _inplace_applies(self) -> bool:
        """The in-place path runs eagerly on plain batches; elsewhere (graph capture,
        torch.func transforms, forward-mode AD, ghost batches, synchronized statistics,
        population statistics being gathered) the layer runs out of place."""
        return (F.capture_mode() is None and self.virtual_batch_size is None and not self.sync
                and not (F.statistics_sinks and F.statistics_sinks.get(self) is not None))

    def _kernel_layout(self, input: Tensor, residual: Optional[Tensor]):
        """The fused kernels' layout of ``input`` where they run this step, else None: an
        activation they run (:func:`_kernel_act`), impl "auto" or "kernels", a plain
        float32/float64 CPU tensor with parameters of its dtype, and no residual or one of its
        exact shape and dtype (anything else, broadcasting included, takes torch operations)."""
        if (self.impl not in ("auto", "kernels") or _kernel_act(self.act, self.act_kwargs) is None
                or not _fused.available() or input.dim() not in self._ranks):
            return None
        if residual is not None and (type(residual) is not Tensor or residual.shape != input.shape
                                     or residual.dtype != input.dtype or not residual.is_cpu):
            return None
        if any(p is not None and p.dtype != input.dtype for p in (self.weight, self.bias)):
            return None
        return _fused.layout(input) if input.size(1) == self.num_features else None

    def _fused_step(self, input: Tensor, residual: Optional[Tensor], lay) -> Tensor:
        spec = _kernel_act(self.act, self.act_kwargs)
        weight, bias, batch, update = self._checks(input)
        if not batch:  # eval: the running statistics
            mean, invstd = self._running_inverse(input)
            return _FusedBNAct.apply(input, weight, bias, residual, mean.to(input.dtype), invstd.to(input.dtype),
                                     False, spec, lay, self.eps)
        # Training: statistics, coefficients and activation in one kernel call, then the one
        # running update from its statistics rows (the buffers checked before anything runs).
        running_mean, running_var, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        target = (_stats.prepare_update(running_mean, running_var, nbt, self.momentum, input.dtype, input.size(1))
                  if update else None)
        y, st, finite = _FusedBNActTrain.apply(input, weight, bias, residual, spec, lay, self.eps,
                                               _stats.unbiased(1.0, input.numel() // self.num_features), target)
        if update:
            _stats.update_running_stats(running_mean, running_var, nbt, None, None, self.momentum, self.nonfinite,
                                        self._name, finite, stats=st, target=target)
        return y

    def _inplace_step(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        F.check_input(input, self.num_features, self._ranks, self._name)
        base = input._base
        if input.requires_grad and (input.is_leaf or (base is not None and base.is_leaf and base.requires_grad)):
            raise RuntimeError(f"{self._name}: inplace=True overwrites its input, but the input is a leaf tensor "
                               "that requires grad, or a view of one (autograd needs it as it is); pass a computed "
                               "tensor, or use inplace=False")
        producer = None
        if input.requires_grad:  # a view: its base's producer may have saved the base
            producer = _saved_by_producer(input) or (_saved_by_producer(base) if base is not None else None)
        if producer is not None:
            raise RuntimeError(f"{self._name}: inplace=True overwrites its input, but autograd saved the input "
                               f"for the backward of the operation that produced it ({producer}); use "
                               "inplace=False for this layer (or an out-of-place producer)")
        if residual is not None and (not isinstance(residual, Tensor) or residual.shape != input.shape
                                     or residual.dtype != input.dtype or residual.device != input.device):
            raise ValueError(f"{self._name}: residual must be a tensor of the input's shape, dtype and device "
                             f"{tuple(input.shape)}, {input.dtype}, {input.device}; got "
                             f"{tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__}")
        if self.weight is not None and bool((self.weight == 0).any()):
            raise ValueError(f"{self._name}: inplace=True divides by gamma (weight) to recover the normalized "
                             "value, and some channel's gamma is 0; use inplace=False for this layer")
        if residual is not None and residual.untyped_storage().data_ptr() == input.untyped_storage().data_ptr():
            raise ValueError(f"{self._name}: inplace=True overwrites its input, and the residual shares the "
                             "input's memory (it would be read after being overwritten); pass a copy of it, or "
                             "use inplace=False")
        lay = self._kernel_layout(input, residual)
        weight, bias, mean, invstd, batch = self._statistics(input)
        if lay is not None:
            mean, invstd = mean.to(input.dtype), invstd.to(input.dtype)
        return _InplaceBNAct.apply(input, weight, bias, residual, mean, invstd, batch, self.act, self.act_kwargs,
                                   lay)

    def _checks(self, input: Tensor):
        """Check the step's arguments, before anything runs: (weight, bias, batch, update),
        batch whether the step normalizes by the batch's statistics, update whether it
        folds them into the running buffers."""
        F.check_input(input, self.num_features, self._ranks, self._name)
        weight, bias = self.weight, self.bias
        running_mean, running_var, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        training = self.training and not self.frozen
        batch = training or running_mean is None
        update = training and self.track_running_stats and running_mean is not None
        _stats.check_arguments(input, weight, bias, running_mean, running_var, self._name, nbt, training=update)
        if batch:
            F.check_training_count(input, input.numel() // self.num_features, self._name)
            if not self.eps > 0:
                raise ValueError(f"{self._name}: eps must be positive in training, got {self.eps!r}")
        if update and self.momentum is None and nbt is None:
            raise ValueError(f"{self._name}: momentum=None (cumulative average) needs num_batches_tracked")
        return weight, bias, batch, update

    def _running_inverse(self, input: Tensor):
        """The running mean and 1 / sqrt(running_var + eps), in the statistics dtype."""
        dt = _stats.stat_dtype(input.dtype)
        with torch.no_grad():
            return self.running_mean.to(dt), torch.rsqrt(self.running_var.to(dt) + self.eps)

    def _statistics(self, input: Tensor):
        """Check the step's arguments, then (weight, bias, mean, invstd, batch): the batch's
        statistics (the running ones updated from them) or, in eval, the running ones."""
        weight, bias, batch, update = self._checks(input)
        if not batch:
            mean, invstd = self._running_inverse(input)
            return weight, bias, mean, invstd, batch
        with torch.no_grad():
            method = "kernels" if self.impl in ("auto", "kernels") else "auto"
            mean, var, _, _, _ = _stats.batch_stats(_stats.grouped_view(input.detach(), 1), method=method)
            mean, var = mean.flatten(), var.flatten()
            if update:  # (m values per channel: no mask here)
                _stats.update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked, mean,
                                            _stats.unbiased(var, input.numel() // self.num_features),
                                            self.momentum, self.nonfinite, self._name)
            invstd = torch.rsqrt(var + self.eps)
        return weight, bias, mean, invstd, batch


_DOC = """BN then an activation, after an optional residual add: ``act(BN(input) + residual)``,
    over {shape} input.

    A :class:`batchnorm.{base}` in every sense (its subclass: the same parameters, buffers
    and state_dict, so a torch.nn.{base} checkpoint loads; ghost batches, the NaN guard,
    freezing, population statistics, synchronized statistics through
    ``convert_sync_batchnorm``), plus the activation.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias,
            virtual_batch_size, nonfinite, impl: as :class:`batchnorm.{base}`'s.
        act: "identity", "relu", "leaky_relu", "elu", "silu" or "gelu". Default: "relu".
        act_kwargs: the activation's arguments: ``negative_slope`` (leaky_relu, default
            0.01), ``alpha`` (elu, 1.0), ``approximate`` (gelu, "none" or "tanh").
        inplace: overwrite the input with the output and save only the output for the
            backward (and the residual, if given), recovering BN's normalized value from it
            (In-Place ABN). Only for invertible activations: "identity", "leaky_relu" with
            negative_slope > 0, "elu" with alpha > 0; every gamma must be nonzero; the
            input must not be a leaf that requires grad, nor the output of an operation that
            saved it for its backward (a ReLU, a sigmoid, another in-place BatchNormAct:
            RuntimeError before anything changes; other users of the input that saved it
            are caught by autograd's version check at backward). It runs eagerly on plain batches;
            under graph capture, torch.func transforms, forward-mode AD, ghost batches or
            synchronized statistics the layer runs out of place (the input is left as it
            is). Its backward has first derivatives only (create_graph=True raises; inplace=False
            layers differentiate to any order). Default: False.

    Fused kernels: with any of the activations (gelu exact or tanh; in place: "identity",
    "leaky_relu" or "elu") on float32 or float64 CPU input (NCHW-contiguous or channels_last)
    and a residual, if any, of the input's shape and dtype, the layer runs on this package's C
    kernels: the statistics pass, one pass writing act(scale * x + shift + residual) (in
    place: over x); backward one pass for the two gradient sums (for elu, silu and gelu out
    of place it also writes dz = dy * act'(z), the residual's gradient), one for dx (and, for
    the piecewise-linear ones and in place, the residual's gradient). The smooth
    activations' exp, expm1, log1p and normal cdf are the kernels' own vectorized
    polynomials, within a few units in the last place of torch's results (documented in
    _kernels.c). Anything else (a broadcast residual, a non-finite negative_slope or alpha,
    impl="torch" or "reference", graph capture, torch.func transforms, ghost batches,
    synchronized statistics) runs on torch operations, with the same results.

    What the backward keeps, per layer: on the fused kernels out of place, the input and,
    with a residual, for identity, relu and leaky_relu the sign of the pre-activation (one
    byte per value), for elu, silu and gelu the residual itself (the caller's tensor, not a
    copy: in a residual network the block's input, which the network keeps anyway; the
    pre-activation is recomputed from the input and the residual exactly as the forward
    computed it); never the output. On torch operations out of place, the BN's input and
    output (relu, leaky_relu, elu act on the output in place, so no third tensor) or, for
    silu and gelu, the BN's input and the activation's input; in place, the output (and the
    residual).

    Shape:
        Input: {shape}; residual (optional): the input's shape. Output: the input's shape.

    Example::

        >>> m = {name}(16, act="leaky_relu", act_kwargs={{"negative_slope": 0.1}})
        >>> y = m(torch.randn({example}), residual=torch.randn({example}))
        >>> y.shape
        torch.Size([{size}])
    """


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    __doc__ = _DOC.format(shape="(N, C) or (N, C, L)", base="BatchNorm1d", name="BatchNormAct1d",
                          example="8, 16", size="8, 16")
    _name = "BatchNormAct1d"


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    __doc__ = _DOC.format(shape="(N, C, H, W)", base="BatchNorm2d", name="BatchNormAct2d",
                          example="4, 16, 8, 8", size="4, 16, 8, 8")
    _name = "BatchNormAct2d"


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    __doc__ = _DOC.format(shape="(N, C, D, H, W)", base="BatchNorm3d", name="BatchNormAct3d",
                          example="2, 16, 4, 4, 4", size="2, 16, 4, 4, 4")
    _name = "BatchNormAct3d"
