"""Model surgery: swap torch.nn's BN layers for this package's, keeping the model's function."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Tuple

from torch import nn
from torch.ao.quantization import fuser_method_mappings as _fusers

from . import act, modules, renorm
from .distributed import SyncBatchNorm
from .fold import _HOOK_ATTR
from .modules import _BatchNormBase, added_behaviour

__all__ = ["convert", "ConvertWarning"]


class ConvertWarning(UserWarning):
    """convert() left a BN layer as it was (a subclass that adds behaviour)."""


# Known classes, most derived first: what each becomes.
_TARGETS: Tuple[Tuple[type, type], ...] = tuple(
    (k, k) for k in (act.BatchNormAct1d, act.BatchNormAct2d, act.BatchNormAct3d, renorm.BatchRenorm1d, renorm.BatchRenorm2d, renorm.BatchRenorm3d, modules.LazyBatchNorm1d,
                     modules.LazyBatchNorm2d, modules.LazyBatchNorm3d, modules.BatchNorm1d, modules.BatchNorm2d,
                     modules.BatchNorm3d, SyncBatchNorm)
) + (
    (nn.LazyBatchNorm1d, modules.LazyBatchNorm1d), (nn.LazyBatchNorm2d, modules.LazyBatchNorm2d),
    (nn.LazyBatchNorm3d, modules.LazyBatchNorm3d), (nn.BatchNorm1d, modules.BatchNorm1d),
    (nn.BatchNorm2d, modules.BatchNorm2d), (nn.BatchNorm3d, modules.BatchNorm3d), (nn.SyncBatchNorm, SyncBatchNorm),
)

# Options a converted layer takes (each class accepts those its constructor has).
_OPTIONS = ("eps", "momentum", "virtual_batch_size", "nonfinite", "impl", "r_max", "d_max")
_EXTRAS = ("virtual_batch_size", "nonfinite", "impl", "r_max", "d_max", "act", "act_kwargs", "inplace")


def _target(m: nn.Module):
    for klass, target in _TARGETS:
        if isinstance(m, klass):
            return target
    return None


def _rebuild(m: nn.Module, target: type, options: Dict[str, Any]) -> nn.Module:
    lazy = issubclass(target, modules._LazyBatchNorm)
    kw: Dict[str, Any] = {"eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                          "track_running_stats": m.track_running_stats, "device": "meta",
                          "bias": not m.affine or m.bias is not None}
    for k in _EXTRAS:
        if hasattr(m, k) and k in _carried(target):
            kw[k] = getattr(m, k)
    kw.update(options)
    if target is SyncBatchNorm:
        kw["process_group"] = getattr(m, "process_group", None)
    args = () if lazy else (m.num_features,)
    new = target(*args, **kw)
    # The layer's own parameters and buffers, not copies: an optimizer built on the model
    # keeps training them.
    for name in ("weight", "bias"):
        new._parameters[name] = m._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = m._buffers.get(name)
    new.num_features = m.num_features
    new.train(m.training)
    if isinstance(m, _BatchNormBase):
        new.frozen, new.sync, new.process_group = m.frozen, m.sync, m.process_group
    state = m.__dict__.get(_HOOK_ATTR)
    if state is not None:  # frozen by batchnorm.freeze(): ours freeze by flag, not by hook
        new.frozen = True
        new.__dict__[_HOOK_ATTR] = {"requires_grad": dict(state["requires_grad"]), "handle": None}
    if hasattr(m, "qconfig"):
        new.qconfig = m.qconfig
    return new


def _carried(target: type) -> Tuple[str, ...]:
    """What a rebuilt layer keeps from the old one: its options and, for BN + activation
    layers, the activation."""
    if issubclass(target, act._BatchNormAct):
        return _accepted(target) + ("act", "act_kwargs", "inplace")
    return _accepted(target)


def _accepted(target: type) -> Tuple[str, ...]:
    if target is SyncBatchNorm:
        return ("eps", "momentum", "nonfinite")
    if issubclass(target, renorm._BatchRenorm):
        return _OPTIONS
    return tuple(k for k in _OPTIONS if k not in ("r_max", "d_max"))


def convert(model: nn.Module, **options) -> nn.Module:
    """Replace every torch.nn BN layer in ``model`` by this package's (and rebuild ours with
    new options), keeping parameters, buffers, train/eval mode and frozen state.

    The replacements share the original layers' parameter and buffer tensors, so an
    optimizer made before the call keeps working and the model computes the same function.
    torch.nn.BatchNorm1d/2d/3d become :class:`batchnorm.BatchNorm1d`/2d/3d, their Lazy
    versions ours, torch.nn.SyncBatchNorm :class:`batchnorm.SyncBatchNorm`; this package's
    layers keep their class. A subclass that adds behaviour to a BN class (e.g. timm's
    BatchNormAct2d and its activation: :func:`batchnorm.added_behaviour`) is left as it is,
    with one :class:`ConvertWarning` naming the layers left. Forward hooks registered on a
    replaced layer are not carried over. Every new layer is built before any is put in
    place, so a bad option changes nothing.

    Args:
        model: the module to convert, in place (a BN layer itself is returned replaced).
        **options: constructor arguments for every converted layer: ``eps``, ``momentum``,
            ``virtual_batch_size``, ``nonfinite``, ``impl`` (and ``r_max``, ``d_max`` for
            Batch Renormalization layers); a layer whose class has no such argument
            (SyncBatchNorm: ghost batches, impl) raises a ValueError naming it.

    Returns:
        ``model`` with its BN layers replaced (or the new layer, if ``model`` is one).

    Shape:
        Not applicable: ``convert`` acts on modules, not tensors.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = convert(net, virtual_batch_size=16)
        >>> type(net[1]).__module__, net[1].virtual_batch_size
        ('batchnorm.modules', 16)
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"convert: unknown option(s) {', '.join(map(repr, unknown))}; expected some of "
                        f"{', '.join(_OPTIONS)}")
    plan: List[Tuple[str, nn.Module]] = []
    made: Dict[int, nn.Module] = {}  # a layer used at several places stays one layer
    left: List[str] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in made:
            plan.append((name, made[id(m)]))
            continue
        target = _target(m)
        if target is None:
            continue
        why = added_behaviour(m) if type(m) is not target else None  # our own classes keep theirs
        if why:
            left.append(f"{name or 'model'} ({type(m).__name__}: {why})")
            continue
        bad = sorted(set(options) - set(_accepted(target)))
        if bad:
            raise ValueError(f"convert: {name or 'model'} becomes a {target.__name__}, which has no "
                             f"{', '.join(bad)} option; convert it separately or drop the option")
        try:
            made[id(m)] = _rebuild(m, target, options)
            plan.append((name, made[id(m)]))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"convert: {name or 'model'} ({type(m).__name__}): {exc}") from None
    if left:
        warnings.warn("convert: left as they are, since replacing them by a plain BN layer would drop what "
                      "their class adds: " + "; ".join(left), ConvertWarning, stacklevel=2)
    for name, new in plan:
        if not name:
            return new
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = new
    return model


def _register_fusers() -> None:
    """Let torch.ao.quantization.fuse_modules fuse Conv/Linear + our BN (+ ReLU) as it fuses
    torch.nn's: it looks the module types up by exact class in its table, so our classes
    get torch's entries. Only inference fusion (eval mode) is possible: quantization-aware
    training's fused modules accept torch.nn's exact classes only."""
    table = getattr(_fusers, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):
        return  # another torch: fuse_modules then needs additional_fuser_method_mapping
    ours = {nn.BatchNorm1d: modules.BatchNorm1d, nn.BatchNorm2d: modules.BatchNorm2d,
            nn.BatchNorm3d: modules.BatchNorm3d}
    for key, method in list(table.items()):
        if key[0] in ours or not any(k in ours for k in key):
            continue  # BN first (BN + ReLU) builds a QAT-only module of torch's exact class
        table.setdefault(tuple(ours.get(k, k) for k in key), _eval_only(method))


def _eval_only(method):
    def fuse(is_qat: bool, *mods):
        if is_qat:
            raise NotImplementedError(
                "fuse_modules: quantization-aware training fuses torch.nn's exact BN classes only; "
                "fuse this package's BN layers in eval mode (or batchnorm.fold), or use torch.nn's for QAT")
        return method(is_qat, *mods)
    return fuse


_register_fusers()
