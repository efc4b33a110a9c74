"""BatchNorm1d/2d/3d: drop-in replacements for torch.nn's, plus ghost batches and masks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import functional as F
from ._autograd import FusedGroupedBatchNorm, FusedMaskedBatchNorm, kernel_layout

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
        if impl not in ("auto", "native", "paper"):
            raise ValueError(f"{self._name}: impl must be 'auto', 'native' or 'paper', got {impl!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.virtual_batch_size = virtual_batch_size
        self.nonfinite = nonfinite
        self.impl = impl
        self.frozen = False  # set by batchnorm.freeze(): use and keep running stats in train() too
        self._stat_sink = None  # set by batchnorm.population_statistics()
        self.sync = False  # True: statistics over the global batch of process_group (SyncBatchNorm)
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

    # -- hooks for the variants ------------------------------------------------------------
    def _process_group(self):
        """The group whose global batch the statistics span (SyncBatchNorm); None = local
        (not synchronized, no process group initialized, or a group of one process)."""
        if not self.sync:
            return None
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return None
        return group

    def _renorm(self, mean: Tensor, var: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Batch Renormalization's (r, d) for these batch statistics; (None, None) for BN."""
        return None, None

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
        mode = F.capture_mode()
        if mode is not None and mode != "compile":
            return self._forward_special(input, mask, mode)
        F.check_input(input, self.num_features, self._ranks, self._name)
        if mask is not None:
            self._check_mask(input, mask)
        # Parameters and buffers straight from their dicts: nn.Module.__getattr__ costs about
        # a microsecond per lookup, which shows on small layers.
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        weight, bias = params["weight"], params["bias"]
        if not ((self.training and not self.frozen) or running_mean is None):
            # Inference (Algorithm 2): the running statistics, one affine map per channel.
            if self.impl == "paper":
                return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, self.eps,
                                    impl="paper")
            try:
                return torch.batch_norm(input, weight, bias, running_mean, running_var, False, 0.0, self.eps,
                                        torch.backends.cudnn.enabled)
            except RuntimeError:
                F.check_arguments(input, weight, bias, running_mean, running_var, self._name, training=False)
                raise
        update = self.training and not self.frozen and running_mean is not None
        nbt = buffers["num_batches_tracked"]
        if (self.impl != "paper" and mask is None and self.virtual_batch_size is None and self._stat_sink is None
                and not self.sync and not self._is_renorm()):
            # Plain BN: Algorithm 1 and the unbiased update, on our fused kernels where they
            # are faster, else on torch's kernel, which computes exactly the same. The
            # arguments are checked where they are used (torch's kernel, the kernel boundary),
            # before any state changes.
            F.check_training_count(input, input.numel() // self.num_features, self._name)
            if self.momentum is None and update and nbt is None:
                raise ValueError(f"{self._name}: momentum=None (cumulative average) needs num_batches_tracked")
            lay = F.fast_layout(input) if self.impl == "auto" else None
            if lay is not None:
                if not update:
                    running_mean = running_var = None
                return F._train_fused(input, running_mean, running_var, weight, bias, self.momentum, self.eps,
                                      self.nonfinite, nbt, lay, self._name)
            if not update:
                try:
                    return torch.batch_norm(input, weight, bias, None, None, True, 0.0, self.eps,
                                            torch.backends.cudnn.enabled)
                except RuntimeError:
                    F.check_arguments(input, weight, bias, None, None, self._name)
                    raise
            return F._train_native(input, running_mean, running_var, weight, bias, self.momentum, self.eps,
                                   self.nonfinite, nbt, self._name)
        # Every other path: all checks first (its statistics and update take many steps).
        F.check_arguments(input, weight, bias, running_mean, running_var, self._name, nbt, training=update)
        if self.momentum is None and update and nbt is None:
            raise ValueError(f"{self._name}: momentum=None (cumulative average) needs num_batches_tracked")
        return self._forward_paper(input, mask, update)

    def _is_renorm(self) -> bool:
        return False

    def _forward_special(self, input: Tensor, mask: Optional[Tensor], mode: str) -> Tensor:
        """Under graph capture (jit.trace, export) or autograd transforms (forward AD,
        torch.func): every check, then :func:`batchnorm.functional.special_train` in
        training, torch's own (or the reference) transform in eval."""
        weight, bias, running_mean, running_var = self.weight, self.bias, self.running_mean, self.running_var
        nbt = self.num_batches_tracked
        training = (self.training and not self.frozen) or running_mean is None
        update = self.training and not self.frozen and running_mean is not None
        with F.traced_checks():
            F.check_input(input, self.num_features, self._ranks, self._name)
            if mask is not None:
                self._check_mask(input, mask)
            F.check_arguments(input, weight, bias, running_mean, running_var, self._name, nbt, training=update)
            if not training:
                return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, self.eps,
                                    impl="paper" if self.impl == "paper" else "native")
            if self.momentum is None and update and nbt is None:
                raise ValueError(f"{self._name}: momentum=None (cumulative average) needs num_batches_tracked")
            groups = self._groups(input)
            if self._process_group() is not None:
                raise NotImplementedError(f"{self._name}: statistics synchronized across processes are not "
                                          f"supported under {mode} (torch.jit.trace, torch.export, forward AD, "
                                          "torch.func)")
            if mask is None:
                F.check_training_count(input, input.numel() // self.num_features // groups, self._name)
        limits = self.current_limits() if self._is_renorm() else None
        return F.special_train(input, weight, bias, running_mean, running_var, nbt, self.momentum, self.eps,
                               self.nonfinite, mode, self._name, groups=groups, mask=mask, limits=limits,
                               use_kernels=self.impl != "paper", update=update, sink=self._stat_sink)

    def _local_stats(self, input: Tensor, mask: Optional[Tensor], groups: int):
        """Grouped view, mask view and per-group local statistics (count, mean, biased var)."""
        xv = F.grouped_view(input, groups)                            # (G, n, C, *S)
        dims = F.reduce_dims(xv.dim())
        mv = None
        if mask is not None:
            mv = F.grouped_view(mask.unsqueeze(1), groups)             # (G, n, 1, L)
        with torch.no_grad():
            mean, var, count, work, center = F.batch_stats_work(xv, dims, mv,  # (G, 1, C, 1..)
                                                                use_kernels=self.impl != "paper")
        return xv, mv, mean, var, count, work, center

    def _forward_paper(self, input: Tensor, mask: Optional[Tensor], update: bool) -> Tensor:
        groups = self._groups(input)
        group = self._process_group()
        if input.size(0) == 0 and group is None:
            F.check_training_count(input, 0, self._name)
        if mask is None and group is None and self.impl != "paper":
            xv = F.grouped_view(input, groups)
            lay = kernel_layout(xv)
            if lay is not None:
                return self._forward_grouped_fused(input, xv, lay, groups, update)
        if (group is not None and mask is None and groups == 1 and self.impl != "paper" and not self._is_renorm()
                and self._stat_sink is None):
            lay = F.fast_layout(input)
            if lay is not None:
                return self._forward_sync_fused(input, lay, group, update)
        if (mask is not None and groups == 1 and group is None and self.impl != "paper" and not self._is_renorm()
                and input.is_contiguous() and kernel_layout(input.unsqueeze(0)) is not None):
            return self._forward_masked_fused(input, mask, update)
        xv, mv, mean, var, count, work, center = self._local_stats(input, mask, groups)
        if group is not None:
            mean, var, count = self._sync_stats(mean, var, count, group)
        # All checks on the statistics happen before any state changes.
        if mask is None and group is None:
            min_count = input.numel() // self.num_features // groups     # known from the shape
        elif torch.compiler.is_compiling():
            min_count = None  # data-dependent (mask, other ranks): not checkable without a graph break
        else:
            min_count = int(count.min()) if count.numel() else 0
        if min_count is not None and min_count <= 1:
            if mask is not None and min_count == 0:
                raise ValueError(f"{self._name}: the mask has no valid position "
                                 f"{'in some ghost batch ' if groups > 1 else ''}in training mode; "
                                 "statistics need at least two valid values per channel")
            F.check_training_count(input, min_count, self._name)
        with torch.no_grad():
            invstd = torch.rsqrt(var + self.eps)
            r, d = self._renorm(mean, var)
            if r is not None:
                # Constants of the backward. Explicitly detached: under torch.compile's
                # AOTAutograd, values computed from the running buffers inside this no_grad
                # block were otherwise differentiated through (tests/test_compile.py).
                r, d = r.detach(), d.detach()
        out = F.transform(xv, self.weight, self.bias, mean, invstd, count, mv, r, d, group, work, center,
                          use_kernels=self.impl != "paper", eps=self.eps)
        out = out.view(input.shape)
        with torch.no_grad():
            # Algorithm 2's estimate over the groups: mean of mu_B and of m/(m-1) sigma2_B.
            batch_mean = mean.mean(dim=0).reshape(-1)                  # (C,)
            batch_var = F.unbiased(var, count).mean(dim=0).reshape(-1)  # (C,)
        if self._stat_sink is not None:
            self._stat_sink.append((mean.reshape(groups, -1), F.unbiased(var, count).reshape(groups, -1)))
        elif update:
            accepted = F.update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked,
                                              batch_mean, batch_var, self.momentum, self.nonfinite, self._name)
            if accepted:
                self._after_update()
        return out

    def _forward_grouped_fused(self, input: Tensor, xv: Tensor, lay, groups: int, update: bool) -> Tensor:
        """Ghost batches and/or Batch Renormalization on the fused CPU kernels (the same
        mathematics as the rest of :meth:`_forward_paper`, one kernel call per group)."""
        F.check_training_count(input, input.numel() // self.num_features // groups, self._name)
        renorm = None
        if self._is_renorm():
            r_max, d_max = self.current_limits()
            renorm = (self.running_mean, self.running_var, r_max, d_max)
        result = []
        out = FusedGroupedBatchNorm.apply(xv, self.weight, self.bias, lay, self.eps, renorm, result)
        st, finite = result
        m = input.numel() // self.num_features // groups
        with torch.no_grad():
            mean = st[:, 0]                                             # (G, C)
            var_u = st[:, 2] * (m / max(m - 1, 1))                      # (G, C), unbiased
        if self._stat_sink is not None:
            self._stat_sink.append((mean.clone(), var_u.clone()))
        elif update:
            accepted = F.update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked,
                                              mean.mean(dim=0), var_u.mean(dim=0), self.momentum, self.nonfinite,
                                              self._name)
            if accepted:
                self._after_update()
        return out.view(input.shape)

    def _forward_masked_fused(self, input: Tensor, mask: Tensor, update: bool) -> Tensor:
        """Masked statistics on the fused CPU kernels (same mathematics as the rest of
        :meth:`_forward_paper`)."""
        result = []
        out = FusedMaskedBatchNorm.apply(input, mask, self.weight, self.bias, self.eps, result)
        st, count = result  # the kernel counted the valid positions; no state has changed yet
        if count <= 1:
            if count == 0:
                raise ValueError(f"{self._name}: the mask has no valid position in training mode; "
                                 "statistics need at least two valid values per channel")
            F.check_training_count(input, count, self._name)
        if self._stat_sink is not None:
            with torch.no_grad():
                self._stat_sink.append((st[0].view(1, -1).clone(), (st[2] * (count / (count - 1))).view(1, -1)))
        elif update:
            self._update_from_kernel(st[0], st[1], st[2], count)
        return out

    def _forward_sync_fused(self, input: Tensor, lay, group, update: bool) -> Tensor:
        """Synchronized plain BN on the fused CPU kernels (the same mathematics and wire
        format as the rest of :meth:`_forward_paper`, far fewer small operations)."""
        from .distributed import FusedSyncBatchNorm, check_channels
        check_channels(self, group, self.num_features, self._name, input.device)
        result = []
        out = FusedSyncBatchNorm.apply(input, self.weight, self.bias, lay, self.eps, group, self._name, result)
        mean, invstd, var, count = result
        if update:
            self._update_from_kernel(mean, invstd, var, count)
        return out

    def _update_from_kernel(self, mean: Tensor, invstd: Tensor, var: Tensor, count: int) -> None:
        """Fold statistics from the fused kernels (``count`` values per channel; ``var`` the
        biased variance) into the running buffers; a non-finite batch updates nothing and
        is reported (:func:`batchnorm.functional.update_running_stats`)."""
        with torch.no_grad():
            var_u = var * (count / max(count - 1, 1))
        F.update_running_stats(self.running_mean, self.running_var, self.num_batches_tracked, mean, var_u,
                               self.momentum, self.nonfinite, self._name)

    def _after_update(self) -> None:
        """Called after an accepted running-statistics update (Batch Renorm counts steps)."""

    def _sync_stats(self, mean, var, count, group):
        from .distributed import sync_stats
        if self.virtual_batch_size is not None:
            raise ValueError(f"{self._name}: ghost batches (virtual_batch_size) are per-replica chunks and "
                             "do not combine with synchronized statistics; use one or the other")
        return sync_stats(mean, var, count, group, self.num_features, self._name, self)


class BatchNorm1d(_BatchNormBase):
    """Batch Normalization over (N, C) or (N, C, L) input (per activation; Algorithm 1).

    Same constructor and state as torch.nn.BatchNorm1d.
    ``momentum`` is the weight of the new batch: running = (1 - momentum) * running + momentum * batch; None = cumulative average.
    Normalization uses the biased batch variance; running_var stores the unbiased m/(m-1) one (m = values per channel).
    ``eps`` sits inside the square root: (x - mu) / sqrt(var + eps).
    Half-precision inputs get float32 statistics; the output keeps the input's dtype.
    A training batch with NaN/Inf statistics updates nothing (``nonfinite``: "warn", "raise" or "ignore").

    Extra keyword-only options (``bias=False``, as in torch 2.13, drops beta): ``virtual_batch_size`` (ghost batches: statistics per
    consecutive chunk of that many examples; the batch size must be a multiple of it),
    ``impl``: "auto" trains on this package's fused CPU kernels where they apply (CPU
    float32/float64, NCHW or channels_last; see :func:`batchnorm.kernels_status`) and on
    torch's kernel elsewhere; "native" always uses torch's kernel for plain BN; "paper"
    always uses the hand-written Function on torch operations (the reference path).
    ``forward(input, mask=None)``: for (N, C, L) input an (N, L) bool mask restricts the
    statistics (and their gradients and the running-stat count) to the valid positions;
    every position is still normalized. Values outside the mask never reach the statistics
    (not even NaN), but being normalized they take part in the backward: keep them finite
    (e.g. zero padding) when training.
    """

    _ranks = (2, 3)
    _name = "BatchNorm1d"

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self._forward(input, mask)


class BatchNorm2d(_BatchNormBase):
    """Batch Normalization over (N, C, H, W) input, per feature map (Section 3.2: m' = N*H*W).

    Same constructor and state as torch.nn.BatchNorm2d; conventions as in :class:`BatchNorm1d`.
    """

    _ranks = (4,)
    _name = "BatchNorm2d"

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)


class BatchNorm3d(_BatchNormBase):
    """Batch Normalization over (N, C, D, H, W) input, per feature map (m' = N*D*H*W).

    Same constructor and state as torch.nn.BatchNorm3d; conventions as in :class:`BatchNorm1d`.
    """

    _ranks = (5,)
    _name = "BatchNorm3d"

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)
