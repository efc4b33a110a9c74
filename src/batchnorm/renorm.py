"""Batch Renormalization (Ioffe 2017): BN whose training output is corrected toward the
running statistics, so that training and inference compute closer functions."""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from . import functional as F
from .modules import _BatchNormBase

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "default_r_max", "default_d_max"]

Schedule = Union[float, Callable[[int], float]]


def _ramp(step, start: int, end: int, lo: float, hi: float):
    """lo until ``start``, then linearly to hi at ``end``; ``step`` an int or a 0-d tensor."""
    frac = (step - start) / (end - start)
    frac = frac.clamp(0.0, 1.0) if isinstance(frac, Tensor) else min(max(frac, 0.0), 1.0)
    return lo + (hi - lo) * frac


def default_r_max(step: int) -> float:
    """The paper's schedule: 1 for the first 5,000 steps, then linearly up to 3 at 40,000."""
    return _ramp(step, 5_000, 40_000, 1.0, 3.0)


def default_d_max(step: int) -> float:
    """The paper's schedule: 0 for the first 5,000 steps, then linearly up to 5 at 25,000."""
    return _ramp(step, 5_000, 25_000, 0.0, 5.0)


class _BatchRenorm(_BatchNormBase):
    """Shared implementation of BatchRenorm1d/2d/3d.

    In training, with sigma_B = sqrt(sigma2_B + eps) and sigma = sqrt(running_var + eps):
    r = clip(sigma_B / sigma, 1/r_max, r_max), d = clip((mu_B - running_mean) / sigma,
    -d_max, d_max), xhat = (x - mu_B) / sigma_B * r + d, y = gamma * xhat + beta, with r and
    d constants in the backward. Inference, running statistics and state are exactly
    BatchNorm's, so a checkpoint loads into BatchNorm. ``r_max``/``d_max`` are floats or
    callables of the number of training steps taken (num_batches_tracked); the defaults
    follow the paper's schedule (:func:`default_r_max`, :func:`default_d_max`). ``impl``:
    "auto" or "kernels" run the fused CPU kernels where they apply, "reference" always
    torch operations (the same mathematics, :mod:`batchnorm._operator`).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 bias: bool = True, r_max: Schedule = default_r_max, d_max: Schedule = default_d_max,
                 virtual_batch_size: Optional[int] = None, nonfinite: str = "warn", impl: str = "auto") -> None:
        if not track_running_stats:
            raise ValueError(f"{self._name}: Batch Renormalization corrects toward the running statistics, "
                             "so it needs track_running_stats=True")
        for name, v in (("r_max", r_max), ("d_max", d_max)):
            if not callable(v) and not isinstance(v, (int, float)):
                raise TypeError(f"{self._name}: {name} must be a float or a callable of the step count, got {type(v).__name__}")
        if not callable(r_max) and r_max < 1:
            raise ValueError(f"{self._name}: r_max must be >= 1, got {r_max}")
        if not callable(d_max) and d_max < 0:
            raise ValueError(f"{self._name}: d_max must be >= 0, got {d_max}")
        F.check_impl(impl, self._name)
        if impl == "torch":
            raise ValueError(f"{self._name}: impl='torch' runs torch's batch-norm kernel, which has no Batch "
                             "Renormalization; use impl='auto'")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, virtual_batch_size=virtual_batch_size, nonfinite=nonfinite, impl=impl)
        self.r_max = r_max
        self.d_max = d_max

    def current_limits(self) -> Tuple[float, float]:
        """(r_max, d_max) at the current step count.

        Under torch.compile a callable schedule receives the step count as a 0-d tensor
        (the defaults accept either) and its values are not validated (no host read)."""
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            step = self.num_batches_tracked
            r_max = self.r_max(step) if callable(self.r_max) else float(self.r_max)
            d_max = self.d_max(step) if callable(self.d_max) else float(self.d_max)
            return r_max, d_max
        step = int(self.num_batches_tracked)
        r_max = float(self.r_max(step)) if callable(self.r_max) else float(self.r_max)
        d_max = float(self.d_max(step)) if callable(self.d_max) else float(self.d_max)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"{self._name}: need r_max >= 1 and d_max >= 0, schedule gave "
                             f"r_max={r_max}, d_max={d_max} at step {step}")
        return r_max, d_max

    def _limits(self):
        return self.current_limits()

    _plain_bn = True

    def _script_refusal(self):
        return "is Batch Renormalization"

    def extra_repr(self) -> str:
        def show(v):
            return getattr(v, "__name__", repr(v)) if callable(v) else repr(v)
        return super().extra_repr() + f", r_max={show(self.r_max)}, d_max={show(self.d_max)}"


_ARGS = """
    Args:
        num_features, eps, momentum, affine, device, dtype, bias, virtual_batch_size,
            nonfinite, impl: as :class:`batchnorm.BatchNorm1d`'s (``track_running_stats``
            must stay True; ``impl="torch"`` is refused: torch has no such kernel).
        r_max: bound of r, a float >= 1 or a callable of the step count. Default: the
            paper's schedule, :func:`default_r_max`.
        d_max: bound of d, a float >= 0 or a callable of the step count. Default:
            :func:`default_d_max`.
"""


class BatchRenorm1d(_BatchRenorm):
    __doc__ = """Batch Renormalization (Ioffe 2017) over (N, C) or (N, C, L) input; the mathematics,
    arguments and state are :class:`_BatchRenorm`'s (and ``forward(input, mask=None)`` accepts an (N, L) bool mask like BatchNorm1d).

""" + _ARGS + """
    Shape:
        Input: (N, C) or (N, C, L); mask (N, L). Output: the input's shape.

    Example::

        >>> y = BatchRenorm1d(100)(torch.randn(20, 100))
    """

    _ranks = (2, 3)
    _name = "BatchRenorm1d"
    _plain_bn = True  # (a BN variant of this package: no added behaviour)

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self._forward(input, mask)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = """Batch Renormalization (Ioffe 2017) over (N, C, H, W) input; the mathematics,
    arguments and state are :class:`_BatchRenorm`'s.

""" + _ARGS + """
    Shape:
        Input: (N, C, H, W). Output: the input's shape.

    Example::

        >>> y = BatchRenorm2d(64, r_max=3.0, d_max=5.0)(torch.randn(8, 64, 16, 16))
    """

    _ranks = (4,)
    _name = "BatchRenorm2d"
    _plain_bn = True  # (a BN variant of this package: no added behaviour)

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = """Batch Renormalization (Ioffe 2017) over (N, C, D, H, W) input; the mathematics,
    arguments and state are :class:`_BatchRenorm`'s.

""" + _ARGS + """
    Shape:
        Input: (N, C, D, H, W). Output: the input's shape.

    Example::

        >>> y = BatchRenorm3d(16)(torch.randn(4, 16, 4, 8, 8))
    """

    _ranks = (5,)
    _name = "BatchRenorm3d"
    _plain_bn = True  # (a BN variant of this package: no added behaviour)

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)
