"""Model surgery: swap torch.nn's BN layers for this package's, keeping the model's function."""

from __future__ import annotations

import collections
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch.fx as fx
from torch import nn
from torch.ao.quantization import fuser_method_mappings as _fusers

from . import _collectives, _fusion, act, modules, renorm
from .distributed import SyncBatchNorm
from .fold import _HOOK_ATTR, _signature, _trace
from .modules import _BatchNormBase, added_behaviour
from .population import is_batchnorm

__all__ = ["convert", "ConvertWarning", "FusedAway"]


class ConvertWarning(UserWarning):
    """convert() left a BN layer as it was (a subclass that adds behaviour), or could not
    fuse the activation after it (``fuse_activations=True``)."""


class FusedAway(nn.Identity):
    """Where an activation module was, after ``convert(fuse_activations=True)`` moved it
    into the BN layer before it (now a BatchNormAct): passes its input through, so the
    module tree and the forward code stay as they were."""

    def extra_repr(self) -> str:
        return "fused into the BN layer before it"


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


def convert(model: nn.Module, *, fuse_activations: bool = False, **options) -> nn.Module:
    """Replace every torch.nn BN layer in ``model`` by this package's (and rebuild ours with
    new options), keeping parameters, buffers, train/eval mode and frozen state; with
    ``fuse_activations=True``, also merge each BN layer with the activation after it into
    one BN + activation layer (:class:`batchnorm.BatchNormAct2d`, 1d, 3d).

    The replacements share the original layers' parameter and buffer tensors, so an
    optimizer made before the call keeps working and the model computes the same function.
    torch.nn.BatchNorm1d/2d/3d become :class:`batchnorm.BatchNorm1d`/2d/3d, their Lazy
    versions ours, torch.nn.SyncBatchNorm :class:`batchnorm.SyncBatchNorm`; this package's
    layers keep their class. A subclass that adds behaviour to a BN class (e.g. timm's
    BatchNormAct2d and its activation: :func:`batchnorm.added_behaviour`) is left as it is,
    with one :class:`ConvertWarning` naming the layers left. Forward hooks registered on a
    replaced layer are not carried over. Every new layer is built before any is put in
    place, so a bad option changes nothing.

    Fusing (``fuse_activations=True``): torch.fx traces ``model`` (each BN layer one node),
    and a BN layer whose output feeds only an activation, ``act(bn(x))``, or only an add
    whose output feeds only an activation, ``act(bn(x) + y)`` or ``act(y + bn(x))``, becomes
    one BatchNormAct call, ``bn(x, residual=y)``; the activation and the add leave the
    graph. Adds: ``+``, ``torch.add`` and ``Tensor.add`` without alpha; in place (``+=``
    as fx records it, ``add_``) only into BN's output. Activations: the modules nn.ReLU,
    LeakyReLU, ELU, SiLU, GELU (those exact classes, without hooks) and F.relu,
    torch.relu, torch.relu_, Tensor.relu/relu_, F.leaky_relu(_), F.elu(_), F.silu, F.gelu
    with constant arguments; any other (ReLU6, Hardswish, nn.Identity) stays. The BN layer
    must be plain (torch.nn's BatchNorm1d/2d/3d or SyncBatchNorm, ours, a Lazy one once
    initialized) and called once, with its input alone; a SyncBatchNorm becomes a
    synchronized BatchNormAct, whose rank (1d, 2d, 3d) the Linear or Conv layer before it
    tells. Where the pattern is there but the layer is Batch Renormalization, an
    uninitialized Lazy layer, called twice or with a mask, or a SyncBatchNorm after
    something else, it is not fused and one ConvertWarning says which and why. An
    activation module called at several places (one nn.ReLU for a whole block) is fused
    where it follows a BN and stays where else it is used. timm's BatchNormAct2d (known by
    its class's module and name; timm is not imported) becomes ours with its activation if
    that is one of the modules above or nn.Identity and its drop is nn.Identity; otherwise
    it is left as it is, with the warning. If torch.fx cannot trace ``model``, only a BN
    layer directly followed by an activation module inside an nn.Sequential is fused, and
    a ConvertWarning names the BN layers not fused.

    Args:
        model: the module to convert, in place (a BN layer itself is returned replaced).
        fuse_activations: also fuse BN + activation and BN + residual add + activation, as
            above. Default: False.
        **options: constructor arguments for every converted layer: ``eps``, ``momentum``,
            ``virtual_batch_size``, ``nonfinite``, ``impl`` (and ``r_max``, ``d_max`` for
            Batch Renormalization layers); a layer whose class has no such argument
            (SyncBatchNorm: ghost batches, impl) raises a ValueError naming it.

    Returns:
        ``model`` with its BN layers replaced (or the new layer, if ``model`` is one).
        When fusing: ``model``, fused in place, if its own forward code computes the fused
        graph once the fused BN layers are BatchNormAct layers and the fused activation
        modules :class:`FusedAway` pass-throughs (modules called one after the other, as in
        an nn.Sequential). Otherwise (a residual add, a functional activation, an activation
        module also used unfused) a ``torch.fx.GraphModule`` of the fused graph, of
        ``model``'s class name, holding ``model``'s submodules under the same names (the
        same state_dict keys) and the same parameter and buffer objects; ``model`` itself
        is then converted without fusing, sharing those tensors. Like any traced module it
        runs the code traced now: Python branches on attributes (``if self.training:``)
        stay as they were taken.

    Shape:
        Not applicable: ``convert`` acts on modules, not tensors.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> net = convert(net, virtual_batch_size=16)
        >>> type(net[1]).__module__, net[1].virtual_batch_size
        ('batchnorm.modules', 16)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.SiLU())
        >>> net = convert(net, fuse_activations=True)
        >>> type(net[1]).__name__, net[1].act, type(net[2]).__name__
        ('BatchNormAct2d', 'silu', 'FusedAway')
    """
    if not isinstance(fuse_activations, bool):
        raise TypeError(f"convert: fuse_activations must be True or False, got {fuse_activations!r}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"convert: unknown option(s) {', '.join(map(repr, unknown))}; expected some of "
                        f"{', '.join(_OPTIONS)}")
    plan, left = _plan(model, options, fuse_activations)
    if left:
        warnings.warn("convert: left as they are, since replacing them by a plain BN layer would drop what "
                      "their class adds: " + "; ".join(left), ConvertWarning, stacklevel=2)
    if fuse_activations and plan and not is_batchnorm(model):
        return _fuse(model, plan, options)
    return _place(model, plan)


# (where the layer sits, the layer, what replaces it): one entry per place, so a layer used
# at several places is one new layer.
_Plan = List[Tuple[str, nn.Module, nn.Module]]


def _plan(model: nn.Module, options: Dict[str, Any], fuse: bool) -> Tuple[_Plan, List[str]]:
    """Every replacement, built (nothing put in place yet), and the layers left, in words."""
    plan: _Plan = []
    made: Dict[int, nn.Module] = {}
    left: List[str] = []
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in made:
            plan.append((name, m, made[id(m)]))
            continue
        target = _target(m)
        if target is None:
            continue
        why = added_behaviour(m) if type(m) is not target else None  # our own classes keep theirs
        activation = None
        if why and fuse:
            activation, timm_why = _fusion.timm_activation(m)
            if activation is not None:
                target, why = act.BatchNormAct2d, None
            why = timm_why or why
        if why:
            left.append(f"{name or 'model'} ({type(m).__name__}: {why})")
            continue
        bad = sorted(set(options) - set(_accepted(target)))
        if bad:
            raise ValueError(f"convert: {name or 'model'} becomes a {target.__name__}, which has no "
                             f"{', '.join(bad)} option; convert it separately or drop the option")
        made[id(m)] = _build(name, m, target, options, activation)
        plan.append((name, m, made[id(m)]))
    return plan, left


def _build(name: str, m: nn.Module, target: type, options: Dict[str, Any],
           activation: Optional[_fusion.Activation] = None) -> nn.Module:
    """``m`` rebuilt as ``target`` (with ``activation``: a BatchNormAct), sharing its state."""
    try:
        if activation is None:
            return _rebuild(m, target, options)
        new = _rebuild(m, target, {**options, "act": activation[0], "act_kwargs": activation[1], "inplace": False})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"convert: {name or 'model'} ({type(m).__name__}): {exc}") from None
    if isinstance(m, nn.SyncBatchNorm):  # torch's (ours carries sync and its group in _rebuild)
        new.sync, new.process_group = True, m.process_group
    if new.sync:
        _collectives.number_layer(new)  # as SyncBatchNorm numbers itself: the ranks' same-layer check
    return new


def _put(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new


def _place(model: nn.Module, plan: _Plan) -> nn.Module:
    for name, _, new in plan:
        if not name:
            return new
        _put(model, name, new)
    return model


# -- fusing BN and activation ---------------------------------------------------------------

_WITH_ACT = {modules.BatchNorm1d: act.BatchNormAct1d, modules.BatchNorm2d: act.BatchNormAct2d,
             modules.BatchNorm3d: act.BatchNormAct3d}
_BY_DIMS = {1: act.BatchNormAct1d, 2: act.BatchNormAct2d, 3: act.BatchNormAct3d}


def _act_class(new: nn.Module, producer: Optional[nn.Module]) -> Tuple[Optional[type], Optional[str]]:
    """The BatchNormAct class for the converted layer ``new`` (its input from ``producer``),
    or why there is none: (None, None) for layers with nothing to say (ours with an
    activation already)."""
    if type(new) in _WITH_ACT:
        return _WITH_ACT[type(new)], None
    if type(new) is SyncBatchNorm:
        dims = _fusion.input_dims(producer)
        if dims is None:
            return None, ("a SyncBatchNorm after no Linear or Conv layer: whether it needs BatchNormAct1d, 2d "
                          "or 3d is not known")
        return _BY_DIMS[dims], None
    if isinstance(new, renorm._BatchRenorm):
        return None, "Batch Renormalization, which BatchNormAct does not do"
    if isinstance(new, modules._LazyBatchNorm):
        return None, "a Lazy layer not initialized yet (num_features unknown): run a batch through the model first"
    return None, None


def _fuse(model: nn.Module, plan: _Plan, options: Dict[str, Any]) -> nn.Module:
    """convert(fuse_activations=True), once every plain replacement is built: find the
    fusions in the torch.fx graph, build their layers, then put everything in place."""
    made = {id(old): new for _, old, new in plan}
    try:
        gm = _trace(model)
    except Exception as exc:  # tracing fails on data-dependent control flow, among others
        return _fuse_sequential(model, plan, options, f"{type(exc).__name__}: {exc}")
    mods = dict(gm.named_modules())  # model's own layers (the GraphModule shares them)
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    fusions: List[_fusion.Fusion] = []
    fused: Dict[int, nn.Module] = {}
    refused: Dict[str, str] = {}  # BN layer: why not fused
    taken = set()  # activation nodes fused
    for f in _fusion.find_fusions(gm.graph, mods):
        old = mods[f.bn.target]
        if id(old) not in made or f.act in taken:
            continue  # left as it is (and said so), or the other operand of an add already fused
        before = f.bn.args[0] if f.bn.args else None
        producer = mods.get(before.target) if isinstance(before, fx.Node) and before.op == "call_module" else None
        target, why = _act_class(made[id(old)], producer)
        if target is not None and calls[f.bn.target] != 1:
            target, why = None, f"called {calls[f.bn.target]} times"
        if target is not None and (len(f.bn.args) != 1 or f.bn.kwargs):
            target, why = None, "called with more than its input (a mask)"
        if target is None:
            if why:
                refused[f.bn.target] = why
            continue
        fused[id(old)] = _build(f.bn.target, old, target, options, f.activation)
        fusions.append(f)
        taken.add(f.act)
    if refused:
        warnings.warn("convert: BN layers followed by an activation, not fused with it: "
                      + "; ".join(f"{name} ({why})" for name, why in refused.items()),
                      ConvertWarning, stacklevel=3)
    _place(model, plan)
    if not fusions:
        return model
    for node in gm.graph.nodes:
        if node.op == "call_module" and id(mods[node.target]) in made:
            key = id(mods[node.target])
            _put(gm, node.target, fused.get(key, made[key]))
    _fusion.rewrite(gm, fusions)
    if _fuse_in_place(model, gm, plan, fused, fusions, calls, mods):
        return model
    gm.delete_all_unused_submodules()
    gm.training = model.training
    for name, sub in gm.named_modules():
        if name and type(sub) is nn.Module:  # a container the GraphModule made: model's mode
            sub.training = model.get_submodule(name).training
    return gm


def _fuse_in_place(model: nn.Module, gm: fx.GraphModule, plan: _Plan, fused: Dict[int, nn.Module],
                   fusions: List[_fusion.Fusion], calls: Dict[str, int], mods: Dict[str, nn.Module]) -> bool:
    """Put the fused layers into ``model`` itself, and a FusedAway where each activation
    module was whose every call is fused. Kept if ``model``, traced again, is exactly
    ``gm``'s fused graph (its own forward then computes it); undone otherwise."""
    swaps = [(name, new, fused[id(old)]) for name, old, new in plan if id(old) in fused]
    names = collections.defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        names[id(m)].append(name)
    acts = collections.Counter(f.act.target for f in fusions if f.act.op == "call_module")
    for target, count in acts.items():
        if count == calls[target]:
            away = FusedAway()
            swaps += [(name, mods[target], away) for name in names[id(mods[target])]]
    for name, _, new in swaps:
        _put(model, name, new)
    try:
        same = _signature(_trace(model)) == _signature(gm)
    except Exception:  # a forward that traced once and not now, or arguments that do not compare
        same = False
    if not same:
        for name, old, _ in reversed(swaps):
            _put(model, name, old)
    return same


def _fuse_sequential(model: nn.Module, plan: _Plan, options: Dict[str, Any], reason: str) -> nn.Module:
    """The fallback where torch.fx cannot trace ``model``: a BN layer directly followed by
    an activation module in an nn.Sequential is fused (the Sequential runs them in turn);
    a ConvertWarning names the BN layers not fused."""
    made = {id(old): new for _, old, new in plan}
    places = collections.Counter(id(old) for _, old, _ in plan)
    where = {id(old): name for name, old, _ in plan}
    fused: Dict[int, nn.Module] = {}
    slots = []
    for parent, bn_key, act_key, before, activation in _fusion.sequential_pairs(model):
        old = parent._modules[bn_key]
        if id(old) not in made or places[id(old)] != 1:
            continue  # left as it is, or at several places (which may be called apart)
        target, _ = _act_class(made[id(old)], before)
        if target is not None:
            fused[id(old)] = _build(where[id(old)], old, target, options, activation)
            slots.append((parent, act_key))
    _place(model, [(name, old, fused.get(id(old), new)) for name, old, new in plan])
    for parent, key in slots:
        parent._modules[key] = FusedAway()
    others = [name for name, old, new in plan if id(old) not in fused and not isinstance(new, act._BatchNormAct)]
    if others:
        warnings.warn(f"convert: torch.fx could not trace the model ({reason}), so only BN layers directly "
                      "followed by an activation module in an nn.Sequential were fused with it; not fused "
                      f"(what reads their output is not known): {', '.join(others)}", ConvertWarning, stacklevel=4)
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
