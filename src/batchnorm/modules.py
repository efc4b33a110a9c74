"""BatchNorm1d/2d/3d: drop-in replacements for torch.nn's, plus ghost batches and masks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _collectives
from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNormBase(nn.Module):
    """Shared state and forward of every BN module in this package.

    Parameters and buffers are named as in torch.nn (weight, bias, running_mean,
    running_var, num_batches_tracked), so state_dicts load both ways.
    """

    _version = 2
    _ranks: Tuple[int, ...] = ()
    _name = "BatchNorm"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        virtual_batch_size: Optional[int] = None,
        nonfinite: str = "warn",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{self._name}: num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"{self._name}: eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{self._name}: momentum must be in [0, 1] or None, got {momentum!r}")
        if virtual_batch_size is not None and (not isinstance(virtual_batch_size, int) or virtual_batch_size < 1):
            raise ValueError(f"{self._name}: virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}")
        if nonfinite not in ("warn", "raise", "ignore"):
            raise ValueError(f"{self._name}: nonfinite must be 'warn', 'raise' or 'ignore', got {nonfinite!r}")
        F.check_impl(impl, self._name)
        if impl == "torch" and virtual_batch_size is not None:
            raise ValueError(f"{self._name}: impl='torch' runs torch's batch-norm kernel, which has no ghost "
                             "batches; use impl='auto'")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.virtual_batch_size = virtual_batch_size
        self.nonfinite = nonfinite
        self.impl = impl
        # A mode, like ``training``: batchnorm.freeze() sets it (running statistics used and
        # kept in train() too).
        self.frozen = False
        # Synchronized statistics over the global batch of process_group (SyncBatchNorm, and
        # the layers convert_sync_batchnorm makes).
        self.sync = False
        self.process_group = None
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")
        if self.virtual_batch_size is not None:
            s += f", virtual_batch_size={self.virtual_batch_size}"
        if self.nonfinite != "warn":
            s += f", nonfinite={self.nonfinite!r}"
        if self.impl != "auto":
            s += f", impl={self.impl!r}"
        if self.frozen:
            s += ", frozen=True"
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints from torch < 0.4.1 (version < 2) lack num_batches_tracked, as in torch.nn.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- what the variants override ---------------------------------------------------------
    def _process_group(self):
        """The group whose global batch the statistics span (SyncBatchNorm); None = local
        (not synchronized, no process group initialized, or a group of one process)."""
        if not self.sync:
            return None
        return _collectives.resolve_group(self.process_group)

    def _limits(self):
        """Batch Renormalization's (r_max, d_max) at this step; None for BN."""
        return None

    # -- forward ----------------------------------------------------------------------------
    def _check_mask(self, input: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{self._name}: mask must be a torch.bool tensor of shape (N, L), got "
                            f"{type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}")
        if input.dim() != 3 or mask.shape != (input.size(0), input.size(2)):
            raise ValueError(f"{self._name}: mask needs (N, C, L) input and an (N, L) mask; got input "
                             f"{tuple(input.shape)} and mask {tuple(mask.shape)}")
        if mask.device != input.device:
            raise ValueError(f"{self._name}: mask is on {mask.device}, the input on {input.device}")
        return mask

    def _groups(self, input: Tensor) -> int:
        vbs = self.virtual_batch_size
        n = input.size(0)
        if vbs is None or n <= vbs:
            return 1
        if n % vbs:
            raise ValueError(
                f"{self._name}: batch size {n} is not a multiple of virtual_batch_size={vbs}; "
                f"use a batch size divisible by {vbs} (e.g. drop_last=True in the DataLoader)")
        return n // vbs

    def _forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if torch._C._get_tracing_state() is not None:
            with F.traced_checks():
                return self._step(input, mask)
        return self._step(input, mask)

    def _step(self, input: Tensor, mask: Optional[Tensor]) -> Tensor:
        F.check_input(input, self.num_features, self._ranks, self._name)
        if mask is not None:
            self._check_mask(input, mask)
        # Parameters and buffers straight from their dicts: nn.Module.__getattr__ costs about
        # a microsecond per lookup, which shows on small layers.
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        weight, bias = params["weight"], params["bias"]
        training = self.training and not self.frozen
        if not training and running_mean is not None:
            # Inference (Algorithm 2): the running statistics, one affine map per channel.
            return F.evaluate(input, running_mean, running_var, weight, bias, self.eps, self.impl, self._name)
        update = training and running_mean is not None
        nbt = buffers["num_batches_tracked"]
        if self.momentum is None and update and nbt is None:
            raise ValueError(f"{self._name}: momentum=None (cumulative average) needs num_batches_tracked")
        groups = self._groups(input) if self.virtual_batch_size is not None else 1
        group = self._process_group() if self.sync else None
        if group is not None and groups != 1:
            raise ValueError(f"{self._name}: ghost batches (virtual_batch_size) are per-replica chunks and "
                             "do not combine with synchronized statistics; use one or the other")
        if mask is None and group is None:
            F.check_training_count(input, input.numel() // self.num_features // groups, self._name)
        elif input.size(0) == 0 and group is None:
            F.check_training_count(input, 0, self._name)
        return F.train(input, weight, bias, running_mean, running_var, nbt, self.momentum, self.eps, self.nonfinite,
                       self._name, impl=self.impl, groups=groups, mask=mask, limits=self._limits(),
                       process_group=group, update=update, owner=self)


_ARGS = """
    Args:
        num_features: C, the number of channels (dimension 1 of the input).
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: weight of the new batch in the running statistics, ``running = (1 -
            momentum) * running + momentum * batch``; None: cumulative average. Default: 0.1.
        affine: learnable per-channel gamma (``weight``) and beta (``bias``). Default: True.
        track_running_stats: keep running_mean, running_var and num_batches_tracked, used in
            eval mode; False: batch statistics in eval mode too. Default: True.
        device, dtype: of the parameters and buffers.
        bias: (keyword-only) False drops beta, as in torch 2.13. Default: True.
        virtual_batch_size: (keyword-only) ghost batches: statistics per consecutive chunk
            of that many examples; the batch size must be a multiple of it. Default: None.
        nonfinite: (keyword-only) a training batch with NaN/Inf statistics updates nothing
            and is reported: "warn", "raise" or "ignore". Default: "warn".
        impl: (keyword-only) "auto", "kernels", "torch" or "reference"
            (:mod:`batchnorm.functional`); every one computes the same function.
            Default: "auto".

    Conventions: normalization uses the biased batch variance, running_var stores the
    unbiased m/(m-1) one (m = values per channel); float16/bfloat16 inputs get float32
    statistics and the output keeps the input's dtype.
"""


class BatchNorm1d(_BatchNormBase):
    __doc__ = """Batch Normalization over (N, C) or (N, C, L) input, per activation (Algorithm 1).

    A drop-in torch.nn.BatchNorm1d: the same constructor, parameters, buffers and
    state_dict, plus the keyword-only extras below.
""" + _ARGS + """
    ``forward(input, mask=None)``: for (N, C, L) input an (N, L) bool mask restricts the
    statistics (and their gradients and the running-stat count) to the valid positions;
    every position is still normalized. Values outside the mask never reach the statistics
    (not even NaN), but being normalized they take part in the backward: keep them finite
    (e.g. zero padding) when training.

    Shape:
        Input: (N, C) or (N, C, L); mask (N, L). Output: the input's shape.

    Example::

        >>> m = BatchNorm1d(100)
        >>> y = m(torch.randn(20, 100))
        >>> lengths = torch.tensor([7, 5])
        >>> mask = torch.arange(8) < lengths[:, None]          # (N, L) valid positions
        >>> y = BatchNorm1d(16)(torch.randn(2, 16, 8), mask)
    """

    _ranks = (2, 3)
    _name = "BatchNorm1d"

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self._forward(input, mask)


class BatchNorm2d(_BatchNormBase):
    __doc__ = """Batch Normalization over (N, C, H, W) input, per feature map (Section 3.2: statistics
    over m = N*H*W values per channel).

    A drop-in torch.nn.BatchNorm2d: the same constructor, parameters, buffers and
    state_dict, plus the keyword-only extras below.
""" + _ARGS + """
    Shape:
        Input: (N, C, H, W), any memory format. Output: the input's shape and memory format.

    Example::

        >>> m = BatchNorm2d(64)
        >>> y = m(torch.randn(8, 64, 32, 32))
        >>> ghost = BatchNorm2d(64, virtual_batch_size=4)     # statistics per 4 examples
        >>> y = ghost(torch.randn(8, 64, 32, 32))
    """

    _ranks = (4,)
    _name = "BatchNorm2d"

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)


class BatchNorm3d(_BatchNormBase):
    __doc__ = """Batch Normalization over (N, C, D, H, W) input, per feature map (m = N*D*H*W).

    A drop-in torch.nn.BatchNorm3d: the same constructor, parameters, buffers and
    state_dict, plus the keyword-only extras below.
""" + _ARGS + """
    Shape:
        Input: (N, C, D, H, W). Output: the input's shape and memory format.

    Example::

        >>> m = BatchNorm3d(16)
        >>> y = m(torch.randn(4, 16, 8, 8, 8))
    """

    _ranks = (5,)
    _name = "BatchNorm3d"

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)
