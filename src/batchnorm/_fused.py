"""Python side of the fused CPU kernels (``_kernels.c``, built by :mod:`batchnorm._jit`).

Each function takes one statistics group, a tensor ``(n, C, *S)`` laid out either as
NCHW-contiguous rows or channels-innermost (channels_last, and plain ``(N, C)``), and
returns new tensors or writes into the buffers it is given; :func:`layout` says whether a
tensor qualifies. Statistics come back in the input's dtype (float32 or float64),
accumulated in double inside the kernels. Nothing here decides how the running buffers
change: :func:`batchnorm._stats.update_running_stats` does, with :func:`lerp_` (one C call)
or torch operations for the arithmetic, or, on the fused training forwards, with an update
it prepared before the step (:func:`batchnorm._stats.prepare_update`, a
:func:`running_target`) that the forward kernel applies when the statistics are finite.

Each kernel call fills a fresh argument struct (the ctypes mirrors in :mod:`batchnorm._jit`)
with the addresses of tensors that this module checked and that stay referenced by local
variables until the call returns; a fresh struct per call also means that threads calling
at once never share one.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _jit
from ._errors import MismatchError
from ._jit import (ActDxArgs, ActFwdArgs, ActSumsArgs, ActTrainBwdArgs, ActTrainFwdArgs, AffineArgs, CheckStatsArgs, DxArgs, LerpArgs, MaskedBwdArgs,
                   MaskedFwdArgs, StatsArgs, SumsArgs, TrainBwdArgs, TrainFwdArgs)

# Below this many elements a kernel runs on one thread: opening a parallel region costs more
# than a second core saves on so little data.
_PARALLEL_MIN = 1 << 16

Layout = Tuple[int, int, int, int]  # (N, C, S, channels_innermost)


def available() -> bool:
    return _jit.kernels() is not None


_DTYPES = (torch.float32, torch.float64)
_has_storage = torch._C._has_storage  # False for functorch wrappers and other storage-less tensors
# Every buffer made here is on the CPU, whatever default device the caller set (torch.device(...)
# as a context or set_default_device): the kernels write it through a CPU pointer.
_CPU = torch.device("cpu")
Parameter = torch.nn.Parameter
_PLAIN = (Tensor, Parameter)  # the tensor types the kernels read (subclasses may mean anything)


def layout(t: Tensor) -> Optional[Layout]:
    """(N, C, S, cl) if the kernels can read ``t`` of shape (N, C, *S) in place, else None.

    Only plain dense CPU tensors with real storage qualify: no tensor subclass, no functorch
    wrapper (vmap, grad, jacrev), no negative view (its memory holds the values unnegated),
    and float32/float64 in NCHW-contiguous or channels-innermost order. (Two tests are
    implied: a conjugate view exists only for complex dtypes, and sparse, MKLDNN and the
    other non-strided layouts have no storage.)"""
    shape = t.shape
    if len(shape) < 2 or type(t) not in _PLAIN or t.dtype not in _DTYPES or not t.is_cpu or t.is_neg():
        return None
    try:
        t.data_ptr()  # (cheaper than torch._C._has_storage, a pybind11 call, on every step)
    except RuntimeError:  # no storage
        return None
    n, c = shape[0], shape[1]
    s = t.numel() // (n * c) if n * c else 0
    if s == 0:
        return None
    if t.is_contiguous():
        return (n, c, s, 1 if s == 1 else 0)
    if t.stride(1) == 1 and t.permute(0, *range(2, len(shape)), 1).is_contiguous():
        return (n, c, s, 1)
    return None


def _fail(what: str) -> None:
    raise ValueError(f"batchnorm kernels: {what}")


def _check_x(x: Tensor, lay: Layout) -> None:
    """The boundary's own check of the tensor the kernels read: ``lay`` must be its layout."""
    if layout(x) != lay:
        _fail(f"input of shape {tuple(x.shape)}, strides {x.stride()}, dtype {x.dtype} does not have the "
              f"layout {lay} the kernels were asked to read")


def _vec(v: Optional[Tensor], like: Tensor, c: int, name: Optional[str] = None) -> Optional[Tensor]:
    """A per-channel vector as a contiguous (C,) CPU tensor of ``like``'s dtype, holding its
    values in memory (a negative view resolved). The caller keeps the result in a local
    variable until the kernel returns: the kernel reads its memory through a raw pointer.

    ``name``: the vector is the user's parameter or buffer of that name, which must already
    have ``like``'s dtype (no conversion: torch.nn raises "mixed dtype" there too)."""
    if v is None:
        return None
    if v.dtype is like.dtype and v.shape == (c,) and v.is_contiguous() and v.is_cpu and not v.is_neg():
        return v  # only its data pointer is taken: no detach needed
    if v.numel() != c or not v.is_cpu or v.layout != torch.strided:
        what = name or "a per-channel tensor"
        raise MismatchError(f"batch_norm: {what} should contain {c} elements not {v.numel()}"
                            if v.numel() != c else f"batch_norm: {what} on {v.device} for a CPU input")
    if name is not None and v.dtype != like.dtype:
        raise MismatchError(f"batch_norm: mixed dtype: {name} is {v.dtype}, the input {like.dtype}; "
                            "parameters and buffers must have the input's dtype")
    return v.detach().resolve_neg().reshape(c).to(like.dtype).contiguous()


def _rows(t: Tensor, rows: int, c: int, dtype: torch.dtype, what: str) -> Tensor:
    """Check a (rows, C) buffer the kernels write or read by row: contiguous, CPU, dtype."""
    if (tuple(t.shape) != (rows, c) or t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.is_neg()
            or not _has_storage(t)):
        _fail(f"{what} must be a contiguous ({rows}, {c}) {dtype} CPU tensor, got shape {tuple(t.shape)}, "
              f"dtype {t.dtype}, strides {t.stride()}")
    return t


def _stats_buffer(st: Tensor, c: int, dtype: torch.dtype, what: str) -> Tensor:
    """Check a statistics buffer: rows mean, invstd, variance of C each, in one contiguous
    block of 3 * C elements ((3, C), (1, 3, C) or any other shape holding exactly that)."""
    if (st.numel() != 3 * c or st.dtype != dtype or not st.is_cpu or not st.is_contiguous() or st.is_neg()
            or st.layout != torch.strided or not _has_storage(st)):
        _fail(f"{what} must be a contiguous {dtype} CPU tensor of 3 * {c} elements (rows mean, invstd, variance), "
              f"got shape {tuple(st.shape)}, dtype {st.dtype}, strides {st.stride()}")
    return st


def _out(out: Optional[Tensor], x: Tensor) -> Tensor:
    """A fresh tensor laid out like ``x``, or a checked caller buffer with ``x``'s layout."""
    if out is None:
        return torch.empty_like(x)
    if (out.shape != x.shape or out.stride() != x.stride() or out.dtype != x.dtype or not out.is_cpu
            or out.is_neg() or not _has_storage(out)):
        _fail(f"output buffer of shape {tuple(out.shape)}, strides {out.stride()}, dtype {out.dtype} does not "
              f"match the input's {tuple(x.shape)}, {x.stride()}, {x.dtype}")
    return out


def _like(dy: Tensor, x: Tensor) -> Tensor:
    """``dy`` with ``x``'s shape, strides and dtype in plain memory (copied if not)."""
    if dy.shape != x.shape:
        _fail(f"tensor of shape {tuple(dy.shape)} (a gradient or residual) for an input of shape {tuple(x.shape)}")
    if (dy.stride() != x.stride() or dy.dtype != x.dtype or not dy.is_cpu or dy.is_neg() or dy.is_conj()
            or not _has_storage(dy) or dy.layout != torch.strided):
        dy = torch.empty_like(x).copy_(dy)  # the kernels read both tensors with one layout
    return dy


def _threads(lay: Layout) -> int:
    return torch.get_num_threads() if lay[0] * lay[1] * lay[2] >= _PARALLEL_MIN else 1


def stats(x: Tensor, lay: Layout, out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x``, one read of it; in ``x``'s dtype, or
    in float64 written into ``out``'s two rows (each a contiguous (C,) float64 tensor)."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    raw = out is not None
    if not raw:
        out = torch.empty(2, c, dtype=torch.float64, device=_CPU)
    elif (tuple(out.shape) != (2, c) or out.dtype != torch.float64 or not out.is_cpu or out.stride(1) != 1
          or out.is_neg() or not _has_storage(out)):
        _fail(f"statistics buffer must be (2, {c}) float64 with contiguous rows")
    mean, var = out[0], out[1]
    args = StatsArgs(x=x.data_ptr(), mean=mean.data_ptr(), var=var.data_ptr(), n=n, c=c, s=s, cl=cl,
                     nt=_threads(lay))
    if _fn(lib, "stats", x.dtype)(args):
        raise MemoryError("batchnorm: out of memory in the statistics kernel")
    if not raw:
        out = out.to(x.dtype)
    return out[0], out[1]


def affine(x: Tensor, lay: Layout, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """out = scale[c] * x + shift[c]; ``out`` has ``x``'s layout."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    a, b, o = _vec(scale, x, c), _vec(shift, x, c), _out(out, x)
    _fn(lib, "affine", x.dtype)(AffineArgs(x=x.data_ptr(), y=o.data_ptr(), scale=a.data_ptr(), shift=b.data_ptr(),
                                           n=n, c=c, s=s, cl=cl, nt=_threads(lay)))


def sums(dy: Tensor, x: Tensor, lay: Layout, mean: Tensor, raw: bool = False) -> Tuple[Tensor, Tensor]:
    """Per channel: sum dy and sum dy * (x - mean), one read of each; in ``x``'s dtype, or
    with ``raw`` as the two rows of one (2, C) float64 tensor."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    g, mu = _like(dy, x), _vec(mean, x, c)
    out = torch.empty(2, c, dtype=torch.float64, device=_CPU)
    sdy, sdyx = out[0], out[1]
    args = SumsArgs(dy=g.data_ptr(), x=x.data_ptr(), mean=mu.data_ptr(), sum_dy=sdy.data_ptr(),
                    sum_dy_xmu=sdyx.data_ptr(), n=n, c=c, s=s, cl=cl, nt=_threads(lay))
    if _fn(lib, "sums", x.dtype)(args):
        raise MemoryError("batchnorm: out of memory in the gradient-sums kernel")
    if not raw:
        out = out.to(x.dtype)
    return out[0], out[1]


def grad_input(dy: Tensor, x: Tensor, lay: Layout, alpha: Tensor, beta: Tensor, gamma: Tensor, out: Tensor) -> None:
    """out = alpha[c] * dy + beta[c] * x + gamma[c]."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    g, o = _like(dy, x), _out(out, x)
    al, be, ga = _vec(alpha, x, c), _vec(beta, x, c), _vec(gamma, x, c)
    _fn(lib, "dx", x.dtype)(DxArgs(dy=g.data_ptr(), x=x.data_ptr(), dx=o.data_ptr(), alpha=al.data_ptr(),
                                   beta=be.data_ptr(), gamma=ga.data_ptr(), n=n, c=c, s=s, cl=cl, nt=_threads(lay)))


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    """The address of a tensor the caller holds (never of a temporary: see :func:`_vec`)."""
    return None if t is None else t.data_ptr()


def _forward_failed(rc: int) -> None:
    if rc == -1:
        raise MemoryError("batchnorm: out of memory in the forward kernel")
    _fail(f"the forward kernel refused its arguments (code {rc})")


def train_forward(x: Tensor, lay: Layout, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  out: Optional[Tensor] = None, st: Optional[Tensor] = None, renorm=None,
                  var_scale: float = 1.0, one_group: bool = False) -> Tuple[Tensor, Tensor, bool]:
    """One plain-BN training forward (Algorithm 1): y, the batch statistics and whether
    they are all finite. The statistics are one block of rows (mean, invstd, var_scale *
    biased variance): a fresh (3, C) tensor ((1, 3, C) with ``one_group``, the operator's
    statistics of one group), or ``st``, a contiguous tensor of 3 * C
    elements in ``x``'s dtype (a (1, 3, C) slice of a larger one, say), or a
    :func:`running_target`, whose block it fills and whose update it applies when the
    statistics are finite. ``var_scale`` is
    the caller's: m / (m - 1) there gives the unbiased variance. ``out``: a buffer for y
    with ``x``'s layout. ``renorm``: (running_mean, running_var, r_max, d_max, rd) for
    Batch Renormalization, rd a (2, C) buffer that receives r and d; the running buffers
    are read, never written."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    y = _out(out, x)
    target = None
    if st is None:
        # (sizes as arguments, not a tuple: torch.empty parses a tuple a microsecond slower)
        st = (torch.empty(1, 3, c, dtype=x.dtype, device=_CPU) if one_group
              else torch.empty(3, c, dtype=x.dtype, device=_CPU))
    elif type(st) is RunningTarget:
        target, st = st, _target_stats(st, x, c)
    else:
        st = _stats_buffer(st, c, x.dtype, "statistics buffer")
    w, b = _vec(weight, x, c, "weight"), _vec(bias, x, c, "bias")
    args = TrainFwdArgs(x=x.data_ptr(), y=y.data_ptr(), weight=None if w is None else w.data_ptr(),
                        bias=None if b is None else b.data_ptr(), stats=st.data_ptr(), n=n, c=c, s=s,
                        eps=eps, var_scale=var_scale, cl=cl,
                        nt=torch.get_num_threads() if n * c * s >= _PARALLEL_MIN else 1)
    if renorm is not None:
        rm, rv, r_max, d_max, rd = renorm
        rm, rv = _vec(rm, x, c, "running_mean"), _vec(rv, x, c, "running_var")  # held until the call returns
        rd = _rows(rd, 2, c, x.dtype, "Batch Renormalization r, d buffer")
        args.ren_mean, args.ren_var, args.rd = rm.data_ptr(), rv.data_ptr(), rd.data_ptr()
        args.r_max, args.d_max = float(r_max), float(d_max)
    args.update = _live(target)  # (last, right before the call)
    rc = _fn(lib, "train_fwd", x.dtype)(args)
    if rc < 0:
        _forward_failed(rc)
    return y, st, rc == 0


def train_backward(dy: Tensor, x: Tensor, lay: Layout, weight: Optional[Tensor], st: Tensor,
                   need_x: bool, need_w: bool, need_b: bool, out: Optional[Tensor] = None,
                   rd: Optional[Tensor] = None):
    """Gradients of plain BN (Section 3): (dx, dweight, dbias), None where not needed;
    ``st`` is :func:`train_forward`'s statistics (only its mean and invstd rows are read),
    ``rd`` its Batch Renormalization r and d; ``out`` a buffer for dx."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    g = _like(dy, x)
    st = _stats_buffer(st, c, x.dtype, "statistics")
    if rd is not None:
        rd = _rows(rd, 2, c, x.dtype, "Batch Renormalization r, d")
    w = _vec(weight, x, c, "weight")
    dx = _out(out, x) if need_x else None
    dw = torch.empty(c, dtype=x.dtype, device=_CPU) if need_w else None
    db = torch.empty(c, dtype=x.dtype, device=_CPU) if need_b else None
    args = TrainBwdArgs(dy=g.data_ptr(), x=x.data_ptr(), dx=_ptr(dx), weight=_ptr(w), stats=st.data_ptr(),
                        rd=_ptr(rd), dweight=_ptr(dw), dbias=_ptr(db), n=n, c=c, s=s, cl=cl, nt=_threads(lay))
    if _fn(lib, "train_bwd", x.dtype)(args) < 0:
        raise MemoryError("batchnorm: out of memory in the backward kernel")
    return dx, dw, db


def _act_mask(mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """Check the forward's sign mask: uint8 bytes laid out exactly like ``x``."""
    if mask is not None and (mask.dtype != torch.uint8 or mask.shape != x.shape or mask.stride() != x.stride()
                             or not mask.is_cpu or not _has_storage(mask) or mask.layout != torch.strided):
        _fail(f"activation mask of shape {tuple(mask.shape)}, strides {mask.stride()}, dtype {mask.dtype} does "
              f"not match the input's {tuple(x.shape)}, {x.stride()} (expected uint8)")
    return mask


#: The kernels' activation codes (the ``act`` field of their argument structs; ACT_* in
#: _kernels.c): LINEAR is z > 0 ? z : slope * z (identity, relu, leaky_relu); the others are
#: smooth, elu with its ``alpha``.
LINEAR, ELU, SILU, GELU, GELU_TANH = range(5)


def _slope(slope: float, what: str = "slope") -> float:
    slope = float(slope)
    if slope != slope or slope in (float("inf"), float("-inf")):
        _fail(f"activation {what} must be finite, got {slope}")
    return slope


def _kind(kind: int, slope: float, act_alpha: float) -> Tuple[int, float, float]:
    """Check an activation (code, slope, alpha) before it reaches a kernel."""
    if kind not in (LINEAR, ELU, SILU, GELU, GELU_TANH):
        _fail(f"unknown activation code {kind!r}")
    return int(kind), _slope(slope), _slope(act_alpha, "alpha")


def act_forward(x: Tensor, lay: Layout, scale: Tensor, shift: Tensor, slope: float,
                residual: Optional[Tensor] = None, want_mask: bool = False,
                inplace: bool = False, kind: int = LINEAR, act_alpha: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
    """y = act(scale[c] * x + shift[c] + residual) for act(z) = z (z > 0), slope * z
    (else; ReLU at slope 0) or the smooth activation ``kind`` (elu with ``act_alpha``), and with
    ``want_mask`` (piecewise linear only) the bytes (z > 0) for the backward; ``inplace``
    (piecewise linear, or elu): y is written over x (and returned)."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    kind, slope, act_alpha = _kind(kind, slope, act_alpha)
    a, b = _vec(scale, x, c), _vec(shift, x, c)
    r = None if residual is None else _like(residual, x)
    if inplace and (want_mask or (r is not None and r.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())):
        _fail("the in-place forward writes no mask and cannot add a residual that shares the input's memory")
    if inplace and kind not in (LINEAR, ELU):
        _fail("in place only for the invertible activations (piecewise linear, elu)")
    if want_mask and kind != LINEAR:
        _fail("a sign mask is for the piecewise-linear activations only")
    y = x if inplace else torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    _fn(lib, "act_fwd", x.dtype)(ActFwdArgs(x=x.data_ptr(), r=_ptr(r), y=y.data_ptr(), mask=_ptr(mask),
                                            scale=a.data_ptr(), shift=b.data_ptr(), n=n, c=c, s=s, slope=slope,
                                            act_alpha=act_alpha, act=kind, cl=cl, nt=_threads(lay)))
    return y, mask


def act_train_forward(x: Tensor, lay: Layout, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      var_scale: float, slope: float, residual: Optional[Tensor] = None, want_mask: bool = False,
                      kind: int = LINEAR, act_alpha: float = 1.0, target: Optional[RunningTarget] = None):
    """BN's training forward and the activation in one call: the statistics of ``x``, then
    y = act(a[c] * x + b[c] + residual) with a = gamma * invstd and b = beta - mean * a
    (:func:`act_forward`'s pass; ``want_mask`` as there). Returns (y, mask, stats, coef,
    finite): the statistics as :func:`train_forward`'s (a (1, 3, C) block: mean, invstd,
    var_scale * biased variance), coef the (2, C) rows a, b, and whether the statistics are
    all finite (y is computed either way). ``target``: a :func:`running_target`, whose
    block receives the statistics and whose update is applied when they are finite."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    kind, slope, act_alpha = _kind(kind, slope, act_alpha)
    w, b = _vec(weight, x, c, "weight"), _vec(bias, x, c, "bias")
    r = None if residual is None else _like(residual, x)
    if want_mask and kind != LINEAR:
        _fail("a sign mask is for the piecewise-linear activations only")
    y = torch.empty_like(x)
    mask = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    st = torch.empty(1, 3, c, dtype=x.dtype, device=_CPU) if target is None else _target_stats(target, x, c)
    coef = torch.empty(2, c, dtype=x.dtype, device=_CPU)
    args = ActTrainFwdArgs(
        x=x.data_ptr(), r=_ptr(r), y=y.data_ptr(), mask=_ptr(mask), weight=_ptr(w), bias=_ptr(b),
        stats=st.data_ptr(), coef=coef.data_ptr(), n=n, c=c, s=s, eps=float(eps), var_scale=float(var_scale),
        slope=slope, act_alpha=act_alpha, act=kind, cl=cl, nt=_threads(lay))
    args.update = _live(target)  # (last, right before the call)
    rc = _fn(lib, "act_train_fwd", x.dtype)(args)
    if rc < 0:
        _forward_failed(rc)
    return y, mask, st, coef, rc == 0


def _act_source(v: Tensor, lay: Layout, mask: Optional[Tensor], residual: Optional[Tensor], output: bool,
                kind: int, slope: float, act_alpha: float):
    """Check what a backward kernel reads besides dy: the saved tensor ``v`` (x, or the
    in-place output), the mask (piecewise linear out of place) or the residual (in place, and
    smooth activations out of place)."""
    _check_x(v, lay)
    if output:
        if mask is not None:
            _fail("the in-place backward reads the output's sign, not a mask")
        if not (kind == LINEAR and slope > 0 or kind == ELU and act_alpha > 0):
            _fail(f"the in-place backward needs an invertible activation (slope > 0 or elu with alpha > 0), got "
                  f"code {kind}, slope {slope}, alpha {act_alpha}")
        return None, None if residual is None else _like(residual, v)
    if kind == LINEAR:
        if residual is not None:
            _fail("the out-of-place backward reads no residual (its sign is in the mask)")
        return _act_mask(mask, v), None
    if mask is not None:
        _fail("a smooth activation's backward reads the residual, not a mask")
    return None, None if residual is None else _like(residual, v)


def act_sums(dy: Tensor, v: Tensor, lay: Layout, scale: Optional[Tensor], shift: Optional[Tensor], slope: float,
             mask: Optional[Tensor], mu: Tensor, residual: Optional[Tensor] = None,
             output: bool = False, kind: int = LINEAR,
             act_alpha: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
    """(sums, dz): sums (2, C) float64, per channel sum dz and sum dz * (u - mu), dz = dy *
    act'(z). Out of place ``v`` is x and u = x, z from scale * x + shift (+ residual, smooth
    activations) as :func:`act_forward` made it, or its sign from ``mask``; with ``output``
    (in place) ``v`` is the output y and u = act^-1(y) - residual (scale and shift are not
    read). dz itself, laid out like ``v``, for a smooth activation out of place (whose dx
    then is :func:`grad_input` of dz: act'(z) computed once per backward), else None."""
    lib = _jit.kernels()
    n, c, s, cl = lay
    kind, slope, act_alpha = _kind(kind, slope, act_alpha)
    g = _like(dy, v)
    m, r = _act_source(v, lay, mask, residual, output, kind, slope, act_alpha)
    a, b = (None, None) if output else (_vec(scale, v, c), _vec(shift, v, c))
    mu_ = _vec(mu, v, c)
    out = torch.empty(2, c, dtype=torch.float64, device=_CPU)
    s1, s2 = out[0], out[1]
    dz = torch.empty_like(v) if kind != LINEAR and not output else None
    args = ActSumsArgs(dy=g.data_ptr(), v=v.data_ptr(), mask=_ptr(m), r=_ptr(r), scale=_ptr(a), shift=_ptr(b),
                       mu=mu_.data_ptr(), sum_dz=s1.data_ptr(), sum_dzu=s2.data_ptr(), dz=_ptr(dz), n=n, c=c, s=s,
                       slope=slope, act_alpha=act_alpha, act=kind, output=int(output), cl=cl, nt=_threads(lay))
    rc = _fn(lib, "act_sums", v.dtype)(args)
    if rc == -1:
        raise MemoryError("batchnorm: out of memory in the activation gradient-sums kernel")
    if rc:
        _fail(f"the activation gradient-sums kernel refused activation code {kind} (output={output})")
    return out, dz


def act_grad(dy: Tensor, v: Tensor, lay: Layout, scale: Optional[Tensor], shift: Optional[Tensor], slope: float,
             mask: Optional[Tensor], alpha: Tensor, beta: Tensor, gamma: Tensor, need_dx: bool,
             need_dz: bool, residual: Optional[Tensor] = None,
             output: bool = False, kind: int = LINEAR,
             act_alpha: float = 1.0) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dx = alpha[c] * dz + beta[c] * u + gamma[c] and dz = dy * act'(z) (the residual's
    gradient), each where asked, in one pass; ``v``, ``u``, ``output`` and ``kind`` as in
    :func:`act_sums` (``act_alpha``: elu's alpha). The piecewise-linear activations, and elu
    in place; a smooth activation out of place has its dz from :func:`act_sums`."""
    lib = _jit.kernels()
    n, c, s, cl = lay
    kind, slope, act_alpha = _kind(kind, slope, act_alpha)
    if kind != LINEAR and not output:
        _fail("a smooth activation's dz comes from act_sums out of place (and dx from grad_input)")
    g = _like(dy, v)
    m, r = _act_source(v, lay, mask, residual, output, kind, slope, act_alpha)
    a, b = (None, None) if output else (_vec(scale, v, c), _vec(shift, v, c))
    al, be, ga = _vec(alpha, v, c), _vec(beta, v, c), _vec(gamma, v, c)
    dx = torch.empty_like(v) if need_dx else None
    dz = torch.empty_like(v) if need_dz else None
    if _fn(lib, "act_dx", v.dtype)(ActDxArgs(dy=g.data_ptr(), v=v.data_ptr(), mask=_ptr(m), r=_ptr(r),
                                             scale=_ptr(a), shift=_ptr(b), alpha=al.data_ptr(), beta=be.data_ptr(),
                                             gamma=ga.data_ptr(), dx=_ptr(dx), dz=_ptr(dz), n=n, c=c, s=s,
                                             slope=slope, act_alpha=act_alpha, act=kind, output=int(output),
                                             cl=cl, nt=_threads(lay))):
        _fail(f"the activation gradient kernel refused activation code {kind} (output={output})")
    return dx, dz


def act_train_backward(dy: Tensor, x: Tensor, lay: Layout, weight: Optional[Tensor], st: Tensor, coef: Tensor,
                       slope: float, mask: Optional[Tensor], residual: Optional[Tensor], need_x: bool, need_w: bool,
                       need_b: bool, need_r: bool, kind: int = LINEAR, act_alpha: float = 1.0):
    """Gradients of :func:`act_train_forward` (dx, dweight, dbias, dz), None where not
    needed, in one call: :func:`act_sums`' pass, the per-channel coefficients (Section 3,
    with the batch's statistics ``st`` and the forward's ``coef``), then :func:`act_grad`'s
    pass (piecewise linear) or :func:`grad_input`'s over dz (smooth). dz = dy * act'(z) is
    the residual's gradient. ``mask`` / ``residual``: what the forward's mode saved (the
    sign mask of a piecewise-linear act with a residual; the residual of a smooth act)."""
    lib = _jit.kernels()
    n, c, s, cl = lay
    kind, slope, act_alpha = _kind(kind, slope, act_alpha)
    g = _like(dy, x)
    m, r = _act_source(x, lay, mask, residual, False, kind, slope, act_alpha)
    st = _stats_buffer(st, c, x.dtype, "statistics")
    co = _rows(coef, 2, c, x.dtype, "activation coefficients")
    w = _vec(weight, x, c, "weight")
    dx = torch.empty_like(x) if need_x else None
    dz = torch.empty_like(x) if need_r or kind != LINEAR else None  # a smooth act's dx is computed from dz
    dw = torch.empty(c, dtype=x.dtype, device=_CPU) if need_w else None
    db = torch.empty(c, dtype=x.dtype, device=_CPU) if need_b else None
    rc = _fn(lib, "act_train_bwd", x.dtype)(ActTrainBwdArgs(
        dy=g.data_ptr(), x=x.data_ptr(), mask=_ptr(m), r=_ptr(r), coef=co.data_ptr(), stats=st.data_ptr(),
        weight=_ptr(w), dx=_ptr(dx), dz=_ptr(dz), dweight=_ptr(dw), dbias=_ptr(db), n=n, c=c, s=s, slope=slope,
        act_alpha=act_alpha, act=kind, cl=cl, nt=_threads(lay)))
    if rc == -1:
        raise MemoryError("batchnorm: out of memory in the activation backward kernel")
    if rc:
        _fail(f"the activation backward kernel refused activation code {kind}")
    return dx, dw, db, dz if need_r else None


def _plain(t: Tensor) -> bool:
    """A dense CPU tensor with real storage, of torch's own type (see :func:`layout`)."""
    return (t.is_cpu and t.layout == torch.strided and _has_storage(t)
            and (type(t) is Tensor or type(t) is Parameter))


def check_stats(mean: Tensor, invstd: Tensor, m: int, threshold: float, unit: float) -> Optional[int]:
    """Check batch statistics (mean, invstd) of ``m`` values per channel in one C call: 0
    fine, 1 non-finite (NaN/Inf mean or invstd, or invstd <= 0: a variance that
    overflowed), 2 offset risk (some channel has ``sqrt(m) * unit * |mean| * invstd >
    threshold``: a common offset large enough that sums without a shift may have rounded
    part of the variance away; ``threshold`` 0: not tested). ``unit`` is the unit roundoff
    of the arithmetic the statistics came from. Changes nothing. None when the kernels are
    not loaded or the tensors are not plain CPU float32/float64 of one dtype and C elements
    each (the caller then tests with torch operations)."""
    lib = _jit.kernels()
    dt = mean.dtype
    c = mean.numel()
    if (lib is None or dt not in _DTYPES or invstd.dtype is not dt or invstd.numel() != c or not _plain(mean)
            or not _plain(invstd)):
        return None
    mu, inv = _vec(mean, mean, c), _vec(invstd, mean, c)  # read-only: copies are fine, held until the call returns
    return _fn(lib, "check_stats", dt)(CheckStatsArgs(mean=mu.data_ptr(), invstd=inv.data_ptr(), c=c, m=m,
                                                      threshold=threshold, unit=unit))


def _writable(t: Tensor, dt: torch.dtype, numel: int) -> bool:
    """A contiguous CPU tensor of ``dt`` and ``numel`` elements in plain memory (of torch's
    own type, with real storage, not a negative view) that an in-place torch operation could
    write here (not an inference tensor outside inference mode). Written for speed: it runs
    on every training step."""
    return ((type(t) is Tensor or type(t) is Parameter) and t.dtype is dt and t.is_cpu and t.numel() == numel
            and t.is_contiguous() and _has_storage(t) and not t.is_neg()
            and (not t.is_inference() or torch.is_inference_mode_enabled()))


def _vector_buffer(t: Tensor, dt: torch.dtype, c: int) -> bool:
    """:func:`_writable` for a 1-D buffer of ``c`` elements, all but the storage test (the
    caller's ``data_ptr()`` raises without storage), in the cheapest calls."""
    return ((type(t) is Tensor or type(t) is Parameter) and t.dtype is dt and t.dim() == 1 and t.numel() == c
            and t.is_contiguous() and t.is_cpu and not t.is_neg()
            and (not t.is_inference() or torch.is_inference_mode_enabled()))


def _counter_buffer(t: Tensor) -> bool:
    """:func:`_vector_buffer` for a counter: one int64 element, of any shape."""
    return ((type(t) is Tensor or type(t) is Parameter) and t.dtype is torch.int64 and t.numel() == 1 and t.is_cpu
            and not t.is_neg() and (not t.is_inference() or torch.is_inference_mode_enabled()))


def lerp_(a: Tensor, b: Tensor, src: Tensor, rows: Tuple[int, int], weight: float,
          counter: Optional[Tensor]) -> bool:
    """a.lerp_(src row rows[0], weight) and b.lerp_(src row rows[1], weight) (torch's formula,
    in the buffers' dtype), then counter += 1, in one C call: the arithmetic of
    :func:`batchnorm._stats.update_running_stats`, its only caller, which decides whether and
    with which weight. ``src`` is a contiguous block of rows of C elements (the operator's
    statistics), read in place: no row views are made. Writes through the data pointers,
    as ``.data`` ops would (no version bump). Returns False, having changed nothing, where
    the kernels cannot do it (not loaded; anything but contiguous CPU float32/float64 of one
    dtype, buffers of C elements, or a one-element int64 counter): the caller then uses
    torch operations."""
    lib = _jit.kernels()
    dt, c = a.dtype, a.numel()
    r0, r1 = rows
    rows_needed = c * (max(r0, r1) + 1)
    if (lib is None or dt not in _DTYPES or min(r0, r1) < 0 or not _writable(a, dt, c) or not _writable(b, dt, c)
            or src.numel() < rows_needed or not _writable(src, dt, src.numel())
            or (counter is not None and not _writable(counter, torch.int64, 1))):
        return False
    p, step = src.data_ptr(), c * src.element_size()
    _fn(lib, "lerp", dt)(LerpArgs(a.data_ptr(), b.data_ptr(), p + r0 * step, p + r1 * step,
                                  None if counter is None else counter.data_ptr(), c, float(weight)))
    return True


class RunningTarget(NamedTuple):
    """Running buffers that :func:`running_target` found the kernels can update in place,
    the block the step's statistics go into (``stats``, (1, 3, C) of the buffers' dtype:
    rows mean, invstd, unbiased variance) and the update that a forward kernel given the
    target as its ``st`` applies from that block's rows 0 and 2 when all three rows are
    finite (``args``, with the weight that :func:`batchnorm._stats.prepare_update` sets;
    ``ptr``, its address; ``ptrs``, the buffers' addresses as checked, for :func:`_live`).
    Holding the tensors keeps the addresses in ``args`` valid."""

    a: Tensor
    b: Tensor
    counter: Optional[Tensor]
    stats: Tensor
    args: LerpArgs
    ptr: int
    ptrs: Tuple[int, int, Optional[int]]


def running_target(a: Tensor, b: Tensor, counter: Optional[Tensor], dt: torch.dtype,
                   c: int) -> Optional[RunningTarget]:
    """Check, once per step and before anything is computed, that the kernels can update
    ``a`` and ``b`` (1-D, C elements of ``dt``) and ``counter`` (None or one int64) in place,
    as :func:`lerp_` requires: the target of a forward kernel's update (weight 0 until the
    caller sets ``args.w``), with a fresh statistics block, or None where they cannot (then
    :func:`lerp_` and torch operations remain). The forward kernel applies the update only
    if the buffers still hold the memory checked here when it is called (:func:`_live`):
    a torch function mode, a subclass's ``__torch_function__`` or another thread may have
    replaced them meanwhile."""
    lib = _jit.kernels()
    if (lib is None or dt not in _DTYPES or not _vector_buffer(a, dt, c) or not _vector_buffer(b, dt, c)
            or (counter is not None and not _counter_buffer(counter))):
        return None
    st = torch.empty(1, 3, c, dtype=dt, device=_CPU)
    try:
        pa, pb, pc = a.data_ptr(), b.data_ptr(), None if counter is None else counter.data_ptr()
    except RuntimeError:  # a tensor without storage
        return None
    # (the kernel reads its targets from its own statistics block: ta and tb stay unset)
    args = LerpArgs(pa, pb, None, None, pc, c, 0.0)
    # (tuple.__new__: the named tuple without its Python-level constructor, on every step)
    return tuple.__new__(RunningTarget, (a, b, counter, st, args, ctypes.addressof(args), (pa, pb, pc)))


def _live(target: Optional[RunningTarget]) -> Optional[int]:
    """The address of ``target``'s update for the kernel about to run, if its buffers still
    hold the memory :func:`running_target` checked; else None, and the target is marked not
    applied (``args.c = 0``: :func:`batchnorm._stats.update_running_stats` then updates the
    buffers as they are now, by its other paths). Nothing that could run user code comes
    between this test and the kernel call."""
    if target is None:
        return None
    a, b, counter, _, args, ptr, (pa, pb, pc) = target
    if a.data_ptr() == pa and b.data_ptr() == pb and (counter is None or counter.data_ptr() == pc):
        return ptr
    args.c = 0
    return None


def _target_stats(target: RunningTarget, x: Tensor, c: int) -> Tensor:
    """The statistics block of a :func:`running_target` for a forward kernel on ``x``."""
    st = target.stats
    if target.args.c != c or st.dtype is not x.dtype:
        _fail(f"a running target of {target.args.c} {st.dtype} channels for an input of {c} {x.dtype} channels")
    return st


def masked_forward(x: Tensor, mask: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> Tuple[Tensor, Tensor, int]:
    """BN of a contiguous (N, C, L) ``x`` with statistics over the positions where the (N, L)
    bool ``mask`` is true; every position is normalized. Returns y, the (3, C) statistics
    (mean, invstd, biased var) and the number of valid positions (0: nothing computed)."""
    lib = _jit.kernels()
    n, c, length = _check_masked(x, mask)
    y = torch.empty_like(x)
    st = torch.empty(3, c, dtype=x.dtype, device=_CPU)
    m8 = mask.contiguous().view(torch.uint8)
    w, b = _vec(weight, x, c, "weight"), _vec(bias, x, c, "bias")
    args = MaskedFwdArgs(x=x.data_ptr(), mask=m8.data_ptr(), y=y.data_ptr(), weight=_ptr(w), bias=_ptr(b),
                         stats=st.data_ptr(), n=n, c=c, l=length, eps=eps, nt=_threads((n, c, length, 0)))
    count = _fn(lib, "masked_fwd", x.dtype)(args)
    return y, st, int(count)


def masked_backward(dy: Tensor, x: Tensor, mask: Tensor, weight: Optional[Tensor], st: Tensor, count: int,
                    need_x: bool, need_w: bool, need_b: bool):
    """Gradients of :func:`masked_forward`: (dx, dweight, dbias), None where not needed."""
    lib = _jit.kernels()
    n, c, length = _check_masked(x, mask)
    g = _like(dy, x)
    st = _rows(st, 3, c, x.dtype, "statistics")
    w = _vec(weight, x, c, "weight")
    dx = torch.empty_like(x) if need_x else None
    dw = torch.empty(c, dtype=x.dtype, device=_CPU) if need_w else None
    db = torch.empty(c, dtype=x.dtype, device=_CPU) if need_b else None
    m8 = mask.contiguous().view(torch.uint8)
    args = MaskedBwdArgs(dy=g.data_ptr(), x=x.data_ptr(), mask=m8.data_ptr(), dx=_ptr(dx), weight=_ptr(w),
                         stats=st.data_ptr(), dweight=_ptr(dw), dbias=_ptr(db), n=n, c=c, l=length, count=count,
                         nt=_threads((n, c, length, 0)))
    _fn(lib, "masked_bwd", x.dtype)(args)
    return dx, dw, db


def _check_masked(x: Tensor, mask: Tensor) -> Tuple[int, int, int]:
    """The masked kernels read a contiguous (N, C, L) ``x`` and an (N, L) bool ``mask``."""
    if x.dim() != 3 or layout(x) is None or not x.is_contiguous():
        _fail(f"masked input must be a contiguous (N, C, L) float32/float64 CPU tensor, got shape "
              f"{tuple(x.shape)}, strides {x.stride()}, dtype {x.dtype}")
    n, c, length = x.shape
    if (mask.dtype != torch.bool or tuple(mask.shape) != (n, length) or not mask.is_cpu
            or not _has_storage(mask) or mask.layout != torch.strided):
        _fail(f"mask must be an ({n}, {length}) bool CPU tensor, got shape {tuple(mask.shape)}, dtype {mask.dtype}")
    return n, c, length


def _fn(lib, kind: str, dtype: torch.dtype):
    """The kernel ``bn_<kind>_f32`` or ``bn_<kind>_f64`` of the loaded library."""
    return getattr(lib, _NAMES[kind, dtype])


_NAMES = {(k, dt): f"bn_{k}_{'f32' if dt == torch.float32 else 'f64'}"
          for k in _jit.ENTRY_POINTS for dt in (torch.float32, torch.float64)}
