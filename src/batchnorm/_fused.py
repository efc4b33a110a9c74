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

# Below this many elements a kernel runs on one thread: opening a parallel region costs more
# than a second core saves on so little data.
_PARALLEL_MIN = 1 << 16

Layout = Tuple[int, int, int, int]  # (N, C, S, channels_innermost)


def available() -> bool:
    return _jit.kernels() is not None


_DTYPES = (torch.float32, torch.float64)


def layout(t: Tensor) -> Optional[Layout]:
    """(N, C, S, cl) if the kernels can read ``t`` of shape (N, C, *S) in place, else None."""
    if not t.is_cpu or t.dtype not in _DTYPES or t.dim() < 2:
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


def _threads(lay: Layout) -> int:
    return torch.get_num_threads() if lay[0] * lay[1] * lay[2] >= _PARALLEL_MIN else 1


def _suffix(t: Tensor) -> str:
    return "f32" if t.dtype == torch.float32 else "f64"


def _vec(v: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector as a contiguous (C,) tensor of ``like``'s dtype."""
    return v.detach().reshape(-1).to(like.dtype).contiguous()


def stats(x: Tensor, lay: Layout, out: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x``, one read of it; in ``x``'s dtype, or
    in float64 written into ``out``'s two rows (each a contiguous (C,) float64 tensor)."""
    lib = _jit.kernels()
    n, c, s, cl = lay
    raw = out is not None
    if not raw:
        out = torch.empty(2, c, dtype=torch.float64)
    if getattr(lib, f"bn_stats_{_suffix(x)}")(x.data_ptr(), n, c, s, cl, out[0].data_ptr(), out[1].data_ptr(),
                                               _threads(lay)):
        raise MemoryError("batchnorm: out of memory in the statistics kernel")
    if not raw:
        out = out.to(x.dtype)
    return out[0], out[1]


def affine(x: Tensor, lay: Layout, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """out = scale[c] * x + shift[c]; ``out`` has ``x``'s layout."""
    lib = _jit.kernels()
    n, c, s, cl = lay
    a, b = _vec(scale, x), _vec(shift, x)
    getattr(lib, f"bn_affine_{_suffix(x)}")(x.data_ptr(), out.data_ptr(), n, c, s, cl, a.data_ptr(), b.data_ptr(),
                                             _threads(lay))


def sums(dy: Tensor, x: Tensor, lay: Layout, mean: Tensor, raw: bool = False) -> Tuple[Tensor, Tensor]:
    """Per channel: sum dy and sum dy * (x - mean), one read of each; in ``x``'s dtype, or
    with ``raw`` as the two rows of one (2, C) float64 tensor."""
    lib = _jit.kernels()
    n, c, s, cl = lay
    mu = _vec(mean, x)
    out = torch.empty(2, c, dtype=torch.float64)
    if getattr(lib, f"bn_sums_{_suffix(x)}")(dy.data_ptr(), x.data_ptr(), n, c, s, cl, mu.data_ptr(),
                                              out[0].data_ptr(), out[1].data_ptr(), _threads(lay)):
        raise MemoryError("batchnorm: out of memory in the gradient-sums kernel")
    if not raw:
        out = out.to(x.dtype)
    return out[0], out[1]


def grad_input(dy: Tensor, x: Tensor, lay: Layout, alpha: Tensor, beta: Tensor, gamma: Tensor, out: Tensor) -> None:
    """out = alpha[c] * dy + beta[c] * x + gamma[c]."""
    lib = _jit.kernels()
    n, c, s, cl = lay
    al, be, ga = _vec(alpha, x), _vec(beta, x), _vec(gamma, x)
    getattr(lib, f"bn_dx_{_suffix(x)}")(dy.data_ptr(), x.data_ptr(), out.data_ptr(), n, c, s, cl, al.data_ptr(),
                                         be.data_ptr(), ga.data_ptr(), _threads(lay))


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _param(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if t is None or (t.dtype == like.dtype and t.is_contiguous()):
        return t  # only its data pointer is taken: no detach needed
    return t.detach().to(like.dtype).contiguous()


def _direct(running_mean: Optional[Tensor], running_var: Optional[Tensor], x: Tensor) -> bool:
    """Whether the kernels may update the running buffers in place (same dtype, contiguous)."""
    return (running_mean is not None and running_mean.dtype == x.dtype and running_var.dtype == x.dtype
            and running_mean.is_contiguous() and running_var.is_contiguous())


def _counter(nbt: Optional[Tensor]) -> Optional[int]:
    """num_batches_tracked's address if the kernels may increment it in place."""
    if nbt is None or nbt.dtype != torch.int64 or not nbt.is_cpu or nbt.numel() != 1:
        return None
    return nbt.data_ptr()


def train_forward(x: Tensor, lay: Layout, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
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
    n, c, s, cl = lay
    y = torch.empty_like(x) if out is None else out
    if st is None:
        st = torch.empty(3, c, dtype=x.dtype)
    p = st.data_ptr()
    step = c * st.element_size()
    direct = _direct(running_mean, running_var, x)
    if renorm is None:
        ren = (None, None, 0.0, 0.0, None)
    else:
        rm, rv, r_max, d_max, rd = renorm
        ren = (_param(rm, x).data_ptr(), _param(rv, x).data_ptr(), float(r_max), float(d_max), rd.data_ptr())
    rc = getattr(lib, _NAMES["fwd", x.dtype])(
        x.data_ptr(), y.data_ptr(), n, c, s, cl, _ptr(_param(weight, x)), _ptr(_param(bias, x)), eps,
        p, p + step, p + 2 * step,
        running_mean.data_ptr() if direct else None, running_var.data_ptr() if direct else None,
        momentum, _counter(nbt) if direct else None, *ren, _threads(lay))
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
    n, c, s, cl = lay
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # the kernel reads both tensors with one layout
    dx = (torch.empty_like(x) if out is None else out) if need_x else None
    dw = torch.empty(c, dtype=x.dtype) if need_w else None
    db = torch.empty(c, dtype=x.dtype) if need_b else None
    p = st.data_ptr()
    if getattr(lib, _NAMES["bwd", x.dtype])(dy.data_ptr(), x.data_ptr(), _ptr(dx), n, c, s, cl,
                                            _ptr(_param(weight, x)), p, p + c * st.element_size(), _ptr(dw),
                                            _ptr(db), _ptr(rd), _threads(lay)) < 0:
        raise MemoryError("batchnorm: out of memory in the backward kernel")
    return dx, dw, db


def check_update(mean: Tensor, invstd: Tensor, m: int, eps: float, running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], momentum: float, nbt: Optional[Tensor] = None,
                 check_offset: bool = True) -> Tuple[int, bool]:
    """Check batch statistics (mean, invstd) and fold them into the running buffers.

    Returns (code, updated): code 0 fine, 1 non-finite, 2 possibly inexact (a large common
    offset that torch's naive sums may have rounded away; recompute with
    :func:`train_forward`; only tested with ``check_offset``, for torch's statistics);
    ``updated`` whether the buffers and ``nbt`` were updated here (only with code 0 and
    :func:`_direct` buffers)."""
    lib = _jit.kernels()
    if lib is None or mean.dtype not in _DTYPES:
        return _check_update_torch(mean, invstd, m, eps, running_mean, running_var, momentum, nbt, check_offset)
    fn = getattr(lib, _NAMES["upd", mean.dtype])
    if _direct(running_mean, running_var, mean):
        code = fn(mean.data_ptr(), invstd.data_ptr(), mean.numel(), m, eps, running_mean.data_ptr(),
                  running_var.data_ptr(), momentum, _counter(nbt), int(check_offset))
        return code, code == 0
    code = fn(mean.data_ptr(), invstd.data_ptr(), mean.numel(), m, eps, None, None, momentum, None, int(check_offset))
    return code, False


def _check_update_torch(mean, invstd, m, eps, running_mean, running_var, momentum, nbt, check_offset):
    """:func:`check_update` in torch operations, for machines without the kernels (the same
    tests, one host read)."""
    with torch.no_grad():
        finite = torch.isfinite(mean).all() & torch.isfinite(invstd).all() & (invstd > 0).all()
        unit = torch.finfo(mean.dtype).eps / 2  # unit roundoff, as in the C kernels
        risky = (mean.abs() * invstd * (math.sqrt(m) * unit) > 1e-3).any()
        ok, risk = torch.stack((finite, risky)).tolist()
        if not ok:
            return 1, False
        if check_offset and risk:
            return 2, False
        if running_mean is None:
            return 0, False
        var = (invstd.pow(-2) - eps).clamp_min_(0.0) * (m / max(m - 1, 1))
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_(var.to(running_var.dtype), momentum)
        if nbt is not None:
            nbt.add_(1)
    return 0, True


def masked_forward(x: Tensor, mask: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> Tuple[Tensor, Tensor, int]:
    """BN of a contiguous (N, C, L) ``x`` with statistics over the positions where the (N, L)
    bool ``mask`` is true; every position is normalized. Returns y, the (3, C) statistics
    (mean, invstd, biased var) and the number of valid positions (0: nothing computed)."""
    lib = _jit.kernels()
    n, c, length = x.shape
    y = torch.empty_like(x)
    st = torch.empty(3, c, dtype=x.dtype)
    p, step = st.data_ptr(), c * st.element_size()
    m8 = mask.contiguous().view(torch.uint8)
    count = getattr(lib, _NAMES["mfwd", x.dtype])(x.data_ptr(), m8.data_ptr(), y.data_ptr(), n, c, length,
                                                  _ptr(_param(weight, x)), _ptr(_param(bias, x)), eps, p, p + step,
                                                  p + 2 * step, _threads((n, c, length, 0)))
    return y, st, int(count)


def masked_backward(dy: Tensor, x: Tensor, mask: Tensor, weight: Optional[Tensor], st: Tensor, count: int,
                    need_x: bool, need_w: bool, need_b: bool):
    """Gradients of :func:`masked_forward`: (dx, dweight, dbias), None where not needed."""
    lib = _jit.kernels()
    n, c, length = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x) if need_x else None
    dw = torch.empty(c, dtype=x.dtype) if need_w else None
    db = torch.empty(c, dtype=x.dtype) if need_b else None
    p = st.data_ptr()
    m8 = mask.contiguous().view(torch.uint8)
    getattr(lib, _NAMES["mbwd", x.dtype])(dy.data_ptr(), x.data_ptr(), m8.data_ptr(), _ptr(dx), n, c, length,
                                          _ptr(_param(weight, x)), p, p + c * st.element_size(), count, _ptr(dw),
                                          _ptr(db), _threads((n, c, length, 0)))
    return dx, dw, db


_NAMES = {(k, dt): f"bn_{name}_{'f32' if dt == torch.float32 else 'f64'}"
          for k, name in (("fwd", "train_fwd"), ("bwd", "train_bwd"), ("upd", "update_running"),
                          ("mfwd", "masked_fwd"), ("mbwd", "masked_bwd"))
          for dt in (torch.float32, torch.float64)}
