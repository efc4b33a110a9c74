"""BatchNorm1d/2d/3d: drop-in replacements for torch.nn's, plus ghost batches and masks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from . import _collectives
from . import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d",
           "added_behaviour"]


class _BatchNormBase(_BatchNorm):
    """Shared state and forward of every BN module in this package.

    A subclass of torch.nn's ``_BatchNorm``, so every helper that looks for BN layers by
    isinstance (swa_utils.update_bn, convert_sync_batchnorm, torch.func's
    replace_all_batch_norm_modules_, weight-decay splits, freezing utilities) finds ours.
    Parameters and buffers are torch.nn's (weight, bias, running_mean, running_var,
    num_batches_tracked, made by torch's own constructor), so state_dicts load both ways.
    """

    _ranks: Tuple[int, ...] = ()
    _name = "BatchNorm"
    _plain_bn = True  # see added_behaviour

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
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{self._name}: num_features must be a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{self._name}: eps must be a float >= 0, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or momentum != momentum):
            raise ValueError(f"{self._name}: momentum must be a float or None, got {momentum!r}")
        if virtual_batch_size is not None and (not isinstance(virtual_batch_size, int) or virtual_batch_size < 1):
            raise ValueError(f"{self._name}: virtual_batch_size must be a positive int or None, got {virtual_batch_size!r}")
        if nonfinite not in ("warn", "raise", "ignore"):
            raise ValueError(f"{self._name}: nonfinite must be 'warn', 'raise' or 'ignore', got {nonfinite!r}")
        F.check_impl(impl, self._name)
        if impl == "torch" and virtual_batch_size is not None:
            raise ValueError(f"{self._name}: impl='torch' runs torch's batch-norm kernel, which has no ghost "
                             "batches; use impl='auto'")
        # torch's constructor makes the parameters and buffers (and calls reset_parameters).
        _NormBase.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
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

    def _fx_call(self, *args) -> fx.Proxy:
        """Under torch.fx symbolic tracing (fx.symbolic_trace, feature extractors, fold) the
        layer is one call_module node, as torch.nn's BN layers are, not its internals."""
        tracer = args[0].tracer
        return tracer.create_proxy("call_module", tracer.path_of_module(self), args, {})

    def __prepare_scriptable__(self) -> nn.Module:
        """What torch.jit.script compiles in place of this layer: torch.nn's own class of
        the same rank, sharing this layer's parameters and buffers (a scripted model trains
        and updates them in place), running torch's kernel. TorchScript cannot run this
        package's Python paths, so a layer whose function torch's cannot compute (ghost
        batches, synchronized statistics, Batch Renormalization, frozen) is refused, and a
        scripted layer has no non-finite guard: a NaN batch reaches its running statistics
        as it does torch.nn's."""
        why = self._script_refusal()
        if why:
            raise RuntimeError(f"torch.jit.script: {self._name} {why}, which torch.nn's BatchNorm (what TorchScript "
                               "compiles in this layer's place) cannot compute; use torch.jit.trace or "
                               "torch.export, which keep this package's operators")
        twin = self._torch_class(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
                                 device="meta")
        # The same parameter and buffer dicts: not copies.
        twin._parameters = self._parameters
        twin._buffers = self._buffers
        twin.train(self.training)
        return twin

    _torch_class = nn.BatchNorm1d

    def _script_refusal(self) -> Optional[str]:
        if self.virtual_batch_size is not None:
            return f"uses ghost batches (virtual_batch_size={self.virtual_batch_size})"
        if self.sync:
            return "synchronizes statistics across processes"
        if self.frozen:
            return "is frozen (running statistics used in training)"
        return None

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
        if isinstance(input, fx.Proxy):
            return self._fx_call(input) if mask is None else self._fx_call(input, mask)
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
        # As torch.nn: running statistics are updated only while tracked (track_running_stats
        # may be switched off after construction), and used in eval whenever they exist.
        update = training and self.track_running_stats and running_mean is not None
        nbt = buffers["num_batches_tracked"]
        if self.momentum is None and update and nbt is None:
            raise ValueError(f"{self._name}: momentum=None (cumulative average) needs num_batches_tracked")
        groups = self._groups(input) if self.virtual_batch_size is not None else 1
        group = self._process_group() if self.sync else None
        if group is not None and groups != 1:
            raise ValueError(f"{self._name}: ghost batches (virtual_batch_size) are per-replica chunks and "
                             "do not combine with synchronized statistics; use one or the other")
        if mask is None and group is None:
            per_channel = input.numel() // self.num_features // groups
            if per_channel <= 1 or input.size(0) == 0:
                F.check_training_count(input, per_channel, self._name)
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


class BatchNorm1d(_BatchNormBase, nn.BatchNorm1d):
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
    _torch_class = nn.BatchNorm1d
    _plain_bn = True

    def forward(self, input: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return self._forward(input, mask)


class BatchNorm2d(_BatchNormBase, nn.BatchNorm2d):
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
    _torch_class = nn.BatchNorm2d
    _plain_bn = True

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)


class BatchNorm3d(_BatchNormBase, nn.BatchNorm3d):
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
    _torch_class = nn.BatchNorm3d
    _plain_bn = True

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input)


class _LazyBatchNorm(LazyModuleMixin):
    """num_features inferred from ``input.size(1)`` at the first forward, as torch.nn's
    LazyBatchNorm layers do; the layer then becomes ``cls_to_become``."""

    cls_to_become = None
    _plain_bn = True

    def __init__(self, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, **kwargs) -> None:
        super().__init__(1, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.num_features = 0
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = UninitializedParameter(**factory)
            if self.bias is not None:
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input: Tensor, *args, **kwargs) -> None:
        if not self.has_uninitialized_params():
            # Materialized by loading a state_dict: the loaded tensors give the size.
            loaded = [t for t in (self.weight, self.running_mean) if t is not None]
            if loaded and self.num_features == 0:
                self.num_features = loaded[0].numel()
            return
        F.check_input(input, None, self._ranks, self._name)
        self.num_features = input.size(1)
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if isinstance(t, (UninitializedParameter, UninitializedBuffer)):
                t.materialize((self.num_features,))
        self.reset_parameters()


_LAZY = """{summary}

    The arguments of :class:`batchnorm.{base}` but ``num_features``, which the first
    input's size(1) sets; the layer then becomes a :class:`batchnorm.{base}`.

    Args:
        eps, momentum, affine, track_running_stats, device, dtype, bias,
            virtual_batch_size, nonfinite, impl: as :class:`batchnorm.{base}`'s.

    Shape:
        Input and output: as :class:`batchnorm.{base}`'s.

    Example::

        >>> m = {name}()
        >>> y = m(torch.randn({shape}))
        >>> type(m).__name__, m.num_features
        ('{base}', 16)
    """


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    __doc__ = _LAZY.format(summary="A BatchNorm1d whose num_features is inferred at the first forward.",
                           base="BatchNorm1d", name="LazyBatchNorm1d", shape="4, 16")
    cls_to_become = BatchNorm1d
    _plain_bn = True


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    __doc__ = _LAZY.format(summary="A BatchNorm2d whose num_features is inferred at the first forward.",
                           base="BatchNorm2d", name="LazyBatchNorm2d", shape="4, 16, 8, 8")
    cls_to_become = BatchNorm2d
    _plain_bn = True


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    __doc__ = _LAZY.format(summary="A BatchNorm3d whose num_features is inferred at the first forward.",
                           base="BatchNorm3d", name="LazyBatchNorm3d", shape="2, 16, 4, 4, 4")
    cls_to_become = BatchNorm3d
    _plain_bn = True


# What a class body may hold without adding behaviour (the class machinery, docs).
_NOTHING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
            "__firstlineno__", "__static_attributes__", "__parameters__", "__orig_bases__", "__abstractmethods__",
            "_abc_impl", "_name", "_ranks", "_torch_class"}


def added_behaviour(module: nn.Module) -> Optional[str]:
    """What a BN layer's class adds beyond torch.nn's or this package's plain BN classes
    (methods, attributes, submodules: an activation, as timm's BatchNormAct2d and ours add),
    in words; None if it adds nothing, so that replacing it by a plain BN layer keeps its
    function. Model tools (convert, fold, convert_sync_batchnorm) treat such layers apart.
    A plain class is one of torch's or one that sets ``_plain_bn = True`` in its body."""
    for klass in type(module).__mro__:
        if klass in (nn.Module, object) or klass.__module__.split(".")[0] == "torch" or vars(klass).get("_plain_bn"):
            break
        extra = sorted(set(vars(klass)) - _NOTHING)
        if extra:
            return f"class {klass.__name__} defines {', '.join(extra)}"
    children = [n for n, _ in module.named_children()]
    if children:
        return f"it has submodules {', '.join(children)}"
    return None
