"""The package's exception and warning classes (the bottom layer: imports nothing)."""

from __future__ import annotations

__all__ = ["MismatchError", "NonFiniteBatchWarning", "NonFiniteBatchError"]


class MismatchError(ValueError, RuntimeError):
    """A parameter or buffer does not fit the input: its size, dtype or device.

    Raised before any state changes. A ValueError, as every rejected argument of this
    package, and a RuntimeError, as torch.nn raises for the same mistakes (its messages:
    "running_mean should contain 16 elements not 1", "mixed dtype"), so code written
    against either catches it."""


class NonFiniteBatchWarning(UserWarning):
    """A training batch had NaN/Inf statistics; running statistics were left unchanged."""


class NonFiniteBatchError(ValueError):
    """Raised instead of :class:`NonFiniteBatchWarning` when ``nonfinite="raise"``."""
