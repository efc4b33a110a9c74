"""Python side of the fused CPU kernels (``_kernels.c``, built by :mod:`batchnorm._jit`).

Each function takes one statistics group, a tensor ``(n, C, *S)`` laid out either as
NCHW-contiguous rows or channels-innermost (channels_last, and plain ``(N, C)``), and
returns new tensors or writes into the buffers it is given; :func:`layout` says whether a
tensor qualifies. Statistics come back
in the input's dtype (float32 or float64), accumulated in double inside the kernels.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _jit
from ._errors import MismatchError

# Below this many elements a kernel runs on one thread: opening a parallel region costs more
# than a second core saves on so little data.
_PARALLEL_MIN = 1 << 16

Layout = Tuple[int, int, int, int]  # (N, C, S, channels_innermost)


def available() -> bool:
    return _jit.kernels() is not None


_DTYPES = (torch.float32, torch.float64)
_has_storage = torch._C._has_storage  # False for functorch wrappers and other storage-less tensors
Parameter = torch.nn.Parameter


def layout(t: Tensor) -> Optional[Layout]:
    """(N, C, S, cl) if the kernels can read ``t`` of shape (N, C, *S) in place, else None.

    Only plain dense CPU tensors with real storage qualify: no tensor subclass, no functorch
    wrapper (vmap, grad, jacrev), no negative or conjugate view (their memory holds the
    values unnegated), and float32/float64 in NCHW-contiguous or channels-innermost order."""
    if (not t.is_cpu or t.dtype not in _DTYPES or t.dim() < 2 or t.is_neg() or t.is_conj()
            or t.layout != torch.strided or not _has_storage(t) or (type(t) is not Tensor and type(t) is not Parameter)):
        return None
    shape = t.shape
    nc = shape[0] * shape[1]
    if nc == 0:
        return None
    s = t.numel() // nc
    if s == 0:
        return None
    if t.is_contiguous():
        return (shape[0], shape[1], s, 1 if s == 1 else 0)
    if t.stride(1) == 1 and t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return (shape[0], shape[1], s, 1)
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
    if t.numel() == rows * c and t.dim() == 3 and t.size(0) == 1:
        t = t[0]  # TEMPORARY shim: (1, rows, C)
    if (tuple(t.shape) != (rows, c) or t.dtype != dtype or not t.is_cpu or not t.is_contiguous() or t.is_neg()
            or not _has_storage(t)):
        _fail(f"{what} must be a contiguous ({rows}, {c}) {dtype} CPU tensor, got shape {tuple(t.shape)}, "
              f"dtype {t.dtype}, strides {t.stride()}")
    return t


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
        _fail(f"gradient of shape {tuple(dy.shape)} for an input of shape {tuple(x.shape)}")
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
        out = torch.empty(2, c, dtype=torch.float64)
    elif (tuple(out.shape) != (2, c) or out.dtype != torch.float64 or not out.is_cpu or out.stride(1) != 1
          or out.is_neg()):
        _fail(f"statistics buffer must be (2, {c}) float64 with contiguous rows")
    if _fn(lib, "stats", x.dtype)(x.data_ptr(), n, c, s, cl, out[0].data_ptr(), out[1].data_ptr(),
                                     _threads(lay)):
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
    _fn(lib, "affine", x.dtype)(x.data_ptr(), o.data_ptr(), n, c, s, cl, a.data_ptr(), b.data_ptr(),
                                   _threads(lay))


def sums(dy: Tensor, x: Tensor, lay: Layout, mean: Tensor, raw: bool = False) -> Tuple[Tensor, Tensor]:
    """Per channel: sum dy and sum dy * (x - mean), one read of each; in ``x``'s dtype, or
    with ``raw`` as the two rows of one (2, C) float64 tensor."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    g, mu = _like(dy, x), _vec(mean, x, c)
    out = torch.empty(2, c, dtype=torch.float64)
    if _fn(lib, "sums", x.dtype)(g.data_ptr(), x.data_ptr(), n, c, s, cl, mu.data_ptr(),
                                    out[0].data_ptr(), out[1].data_ptr(), _threads(lay)):
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
    _fn(lib, "dx", x.dtype)(g.data_ptr(), x.data_ptr(), o.data_ptr(), n, c, s, cl, al.data_ptr(),
                               be.data_ptr(), ga.data_ptr(), _threads(lay))


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    """The address of a tensor the caller holds (never of a temporary: see :func:`_vec`)."""
    return None if t is None else t.data_ptr()


def _direct(running_mean: Optional[Tensor], running_var: Optional[Tensor], x: Tensor) -> bool:
    """Whether the kernels may update the running buffers in place (contiguous plain CPU
    memory, not a negative view); else torch operations update them. Raises
    :class:`~batchnorm.MismatchError` if a buffer does not fit ``x`` (size, dtype, device)
    or cannot be written in place at all (an expanded view, an inference tensor)."""
    if running_mean is None or running_var is None:
        return False
    c = x.size(1)
    direct = True
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.dtype is x.dtype and t.shape == (c,) and t.is_contiguous() and t.is_cpu and not t.is_neg():
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
        direct = False
    return direct


def _counter(nbt: Optional[Tensor]) -> Optional[int]:
    """num_batches_tracked's address if the kernels may increment it in place; None if torch
    operations must (or there is none). Raises :class:`~batchnorm.MismatchError` if it
    cannot be incremented at all."""
    if nbt is None:
        return None
    if nbt.dtype is torch.int64 and nbt.is_cpu and nbt.numel() == 1 and not nbt.is_neg():
        return nbt.data_ptr()
    if (nbt.numel() != 1 or nbt.dtype == torch.bool or nbt.is_complex() or not nbt.is_cpu
            or (nbt.is_inference() and not torch.is_inference_mode_enabled())):
        raise MismatchError(f"batch_norm: num_batches_tracked must be a one-element integer CPU tensor, got shape "
                            f"{tuple(nbt.shape)}, dtype {nbt.dtype}, device {nbt.device}")
    return None


def train_forward(x: Tensor, lay: Layout, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  out: Optional[Tensor] = None, st: Optional[Tensor] = None, renorm=None,
                  var_scale: float = 1.0) -> Tuple[Tensor, Tensor, bool]:
    # TEMPORARY shim over the old kernels (being replaced).
    y, st2, finite, _ = _train_forward_old(x, lay, weight, bias, eps, None, None, 0.0, None, out, st, renorm)
    st2[2].mul_(var_scale)
    return y, st if st is not None else st2, finite


def _train_forward_old(x: Tensor, lay: Layout, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  momentum: float, nbt: Optional[Tensor] = None, out: Optional[Tensor] = None,
                  st: Optional[Tensor] = None, renorm=None) -> Tuple[Tensor, Tensor, bool, bool]:
    """One plain-BN training forward: y; the batch statistics as one (3, C) tensor (mean,
    invstd, biased var); whether they were finite; whether the kernel already updated the
    running buffers and ``nbt`` (it does when :func:`_direct`; never for a non-finite batch).

    ``out``/``st``: buffers to write y and the statistics into (one statistics group of a
    larger tensor). ``renorm``: (running_mean, running_var, r_max, d_max, rd) for Batch
    Renormalization, rd a (2, C) buffer that receives r and d."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    y = _out(out, x)
    st = torch.empty(3, c, dtype=x.dtype) if st is None else _rows(st, 3, c, x.dtype, "statistics buffer")
    w, b = _vec(weight, x, c, "weight"), _vec(bias, x, c, "bias")
    p = st.data_ptr()
    step = c * st.element_size()
    direct = _direct(running_mean, running_var, x)
    counter = _counter(nbt)  # checked even when not direct: torch operations then increment it
    if not direct:
        counter = None
    rm = rv = rd = None
    r_max = d_max = 0.0
    if renorm is not None:
        rm, rv, r_max, d_max, rd = renorm
        rm, rv = _vec(rm, x, c, "running_mean"), _vec(rv, x, c, "running_var")
        rd = _rows(rd, 2, c, x.dtype, "Batch Renormalization r, d buffer")
        r_max, d_max = float(r_max), float(d_max)
    rc = _fn(lib, "train_fwd", x.dtype)(
        x.data_ptr(), y.data_ptr(), n, c, s, cl, _ptr(w), _ptr(b), eps,
        p, p + step, p + 2 * step,
        running_mean.data_ptr() if direct else None, running_var.data_ptr() if direct else None,
        momentum, counter, _ptr(rm), _ptr(rv), r_max, d_max, _ptr(rd), _threads(lay))
    if rc < 0:
        raise MemoryError("batchnorm: out of memory in the forward kernel")
    return y, st, rc == 0, direct


def train_backward(dy: Tensor, x: Tensor, lay: Layout, weight: Optional[Tensor], st: Tensor,
                   need_x: bool, need_w: bool, need_b: bool, out: Optional[Tensor] = None,
                   rd: Optional[Tensor] = None):
    """Gradients of plain BN (Section 3): (dx, dweight, dbias), None where not needed;
    ``st`` is :func:`train_forward`'s statistics, ``rd`` its Batch Renormalization r and d;
    ``out`` a buffer for dx."""
    lib = _jit.kernels()
    _check_x(x, lay)
    n, c, s, cl = lay
    g = _like(dy, x)
    st = _rows(st, 3, c, x.dtype, "statistics")
    if rd is not None:
        rd = _rows(rd, 2, c, x.dtype, "Batch Renormalization r, d")
    w = _vec(weight, x, c, "weight")
    dx = _out(out, x) if need_x else None
    dw = torch.empty(c, dtype=x.dtype) if need_w else None
    db = torch.empty(c, dtype=x.dtype) if need_b else None
    p = st.data_ptr()
    if _fn(lib, "train_bwd", x.dtype)(g.data_ptr(), x.data_ptr(), _ptr(dx), n, c, s, cl, _ptr(w), p,
                                   p + c * st.element_size(), _ptr(dw), _ptr(db), _ptr(rd), _threads(lay)) < 0:
        raise MemoryError("batchnorm: out of memory in the backward kernel")
    return dx, dw, db


def lerp_(running_mean, running_var, mean, var, factor, var_scale=1.0) -> bool:
    return False  # TEMPORARY


def check_stats(mean: Tensor, invstd: Tensor, m: int, threshold: float, unit: float):
    if _jit.kernels() is None:
        return None
    return _check_stats_old(mean, invstd, m, threshold > 0)


def _check_stats_old(mean: Tensor, invstd: Tensor, m: int, check_offset: bool = True) -> int:
    """Check batch statistics (mean, invstd) of ``m`` values per channel, one C call (or a
    few torch operations without the kernels): 0 fine, 1 non-finite (NaN/Inf, or a variance
    that overflowed), 2 possibly inexact (a large common offset that torch's naive sums may
    have rounded away: ``sqrt(m) * unit roundoff * |mean| * invstd > 1e-3``; only tested
    with ``check_offset``, for torch's statistics). Changes nothing."""
    lib = _jit.kernels()
    c = mean.numel()
    if (lib is None or mean.dtype not in _DTYPES or invstd.dtype != mean.dtype or invstd.numel() != c
            or not mean.is_cpu or not invstd.is_cpu):
        return _check_stats_torch(mean, invstd, m, check_offset)
    mu, inv = _vec(mean, mean, c), _vec(invstd, mean, c)
    return _fn(lib, "update_running", mean.dtype)(mu.data_ptr(), inv.data_ptr(), c, m, 0.0, None, None, 0.0, None,
                                                   int(check_offset))


def _check_stats_torch(mean: Tensor, invstd: Tensor, m: int, check_offset: bool) -> int:
    """:func:`check_stats` in torch operations (the same tests, one host read)."""
    with torch.no_grad():
        finite = torch.isfinite(mean).all() & torch.isfinite(invstd).all() & (invstd > 0).all()
        unit = torch.finfo(mean.dtype).eps / 2  # unit roundoff, as in the C kernels
        risky = (mean.abs() * invstd * (math.sqrt(m) * unit) > 1e-3).any()
        ok, risk = torch.stack((finite, risky)).tolist()
    if not ok:
        return 1
    return 2 if check_offset and risk else 0


def masked_forward(x: Tensor, mask: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> Tuple[Tensor, Tensor, int]:
    """BN of a contiguous (N, C, L) ``x`` with statistics over the positions where the (N, L)
    bool ``mask`` is true; every position is normalized. Returns y, the (3, C) statistics
    (mean, invstd, biased var) and the number of valid positions (0: nothing computed)."""
    lib = _jit.kernels()
    n, c, length = _check_masked(x, mask)
    y = torch.empty_like(x)
    st = torch.empty(3, c, dtype=x.dtype)
    p, step = st.data_ptr(), c * st.element_size()
    m8 = mask.contiguous().view(torch.uint8)
    w, b = _vec(weight, x, c, "weight"), _vec(bias, x, c, "bias")
    count = _fn(lib, "masked_fwd", x.dtype)(x.data_ptr(), m8.data_ptr(), y.data_ptr(), n, c, length, _ptr(w),
                                            _ptr(b), eps, p, p + step, p + 2 * step, _threads((n, c, length, 0)))
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
    dw = torch.empty(c, dtype=x.dtype) if need_w else None
    db = torch.empty(c, dtype=x.dtype) if need_b else None
    p = st.data_ptr()
    m8 = mask.contiguous().view(torch.uint8)
    _fn(lib, "masked_bwd", x.dtype)(g.data_ptr(), x.data_ptr(), m8.data_ptr(), _ptr(dx), n, c, length, _ptr(w), p,
                                    p + c * st.element_size(), count, _ptr(dw), _ptr(db),
                                    _threads((n, c, length, 0)))
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
          for k in ("stats", "affine", "sums", "dx", "train_fwd", "train_bwd", "update_running", "masked_fwd",
                    "masked_bwd")
          for dt in (torch.float32, torch.float64)}
