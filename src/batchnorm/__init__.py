"""Batch Normalization (Ioffe & Szegedy, ICML 2015) for PyTorch.

Drop-in BatchNorm1d/2d/3d (and BN + activation layers) with the paper's hand-written backward, population statistics
(Algorithm 2), folding into the preceding layer, freezing, synchronized BN that also runs
on CPU, Batch Renormalization, ghost batches and masked statistics.
"""

from . import _jit, functional, monitor
from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .distributed import SyncBatchNorm, convert_sync_batchnorm
from .fold import ChannelAffine, FoldedAct, FoldedAway, FoldWarning, fold, freeze, unfreeze
from ._errors import MismatchError, NonFiniteBatchError, NonFiniteBatchWarning
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d,
                      added_behaviour)
from .population import population_statistics
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .surgery import ConvertWarning, FusedAway, convert

__version__ = "0.1.0"


def kernels_status() -> str:
    """Whether the fused CPU kernels (compiled on first use) are in use: the file loaded,
    its build flags and whether it was built now or verified from the cache, or why torch
    operations are used instead.

    Training on CPU uses them for float32/float64 inputs in NCHW-contiguous or
    channels-last layout; ``BATCHNORM_KERNELS=0`` in the environment turns them off, and
    without a C compiler everything runs on torch operations (same results). The build,
    the cache and the environment variables they read: :mod:`batchnorm._jit`."""
    return _jit.status()


__all__ = [
    "BatchNorm1d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelAffine",
    "ConvertWarning",
    "FoldedAct",
    "FoldedAway",
    "FoldWarning",
    "FusedAway",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "MismatchError",
    "NonFiniteBatchError",
    "NonFiniteBatchWarning",
    "SyncBatchNorm",
    "added_behaviour",
    "convert",
    "convert_sync_batchnorm",
    "fold",
    "freeze",
    "functional",
    "kernels_status",
    "monitor",
    "population_statistics",
    "unfreeze",
]
