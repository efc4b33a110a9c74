"""Inference-time BN as a fixed affine map folded into the preceding layer (Algorithm 2,
step 11), and freezing BN layers to their running statistics."""

from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ._stats import affine_coefficients
from .act import _BatchNormAct, _activate
from .modules import _BatchNormBase, added_behaviour
from .population import is_batchnorm

__all__ = ["fold", "freeze", "unfreeze", "ChannelAffine", "FoldedAct", "FoldedAway", "FoldWarning", "fold_into"]

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FoldWarning(UserWarning):
    """fold() could not fold some BN layer into its predecessor."""


class ChannelAffine(nn.Module):
    """y = scale * x + shift per channel (dimension 1): an inference-mode BN that had no
    layer to fold into."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(shape).to(x.dtype), x, self.scale.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


class FoldedAct(nn.Module):
    """What is left of a BN + activation layer (:class:`batchnorm.BatchNormAct2d`) after
    :func:`fold`: ``act(scale * x + shift + residual)``, with no scale and shift where the
    BN part was folded into the layer before it."""

    def __init__(self, act: str, act_kwargs: dict, scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None) -> None:
        super().__init__()
        self.act, self.act_kwargs = act, dict(act_kwargs)
        self.affine = None if scale is None else ChannelAffine(scale, shift)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = input if self.affine is None else self.affine(input)
        if residual is not None:
            y = y + residual
        return _activate(y, self.act, self.act_kwargs, inplace=y is not input)

    def extra_repr(self) -> str:
        return f"act={self.act!r}" + ("" if self.affine is None else ", with the BN's affine map")


def _coefficients(bn: nn.Module) -> Tuple[Tensor, Tensor]:
    f64 = torch.float64
    return affine_coefficients(
        bn.running_mean.to(f64), bn.running_var.to(f64),
        None if bn.weight is None else bn.weight.detach().to(f64),
        None if bn.bias is None else bn.bias.detach().to(f64), bn.eps)


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode ``bn`` into the Linear/Conv ``layer`` before it, in place:
    W' = scale * W (per output channel), b' = scale * b + shift (bias created if absent)."""
    scale, shift = _coefficients(bn)
    w = layer.weight
    if w.size(0) != scale.numel():
        raise ValueError(f"fold_into: {type(layer).__name__} has {w.size(0)} output channels, "
                         f"the BN has {scale.numel()}")
    shape = (-1,) + (1,) * (w.dim() - 1)
    w.copy_((w.to(torch.float64) * scale.view(shape)).to(w.dtype))
    b = torch.zeros(w.size(0), dtype=torch.float64, device=w.device) if layer.bias is None else layer.bias.to(torch.float64)
    new_bias = (b * scale + shift).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_bias)


def _affine_of(bn: nn.Module) -> nn.Module:
    """The fixed map an unfolded BN computes in eval mode (with its activation, if any)."""
    scale, shift = _coefficients(bn)
    dt = bn.running_mean.dtype
    if isinstance(bn, _BatchNormAct):
        return FoldedAct(bn.act, bn.act_kwargs, scale.to(dt), shift.to(dt))
    return ChannelAffine(scale.to(dt), shift.to(dt))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class FoldedAway(nn.Identity):
    """Where a BN was, after :func:`fold` merged it into the layer before it: passes its
    input through (the module tree and its forward code stay as they were)."""

    def extra_repr(self) -> str:
        return "folded into the preceding layer"


def fold(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BN folded away (Algorithm 2, step 11).

    A BN directly after a Linear or Conv1d/2d/3d whose output feeds nothing else is folded
    into that layer's weight and bias; every other BN becomes its fixed per-channel affine
    map (:class:`ChannelAffine`). The graph is found with torch.fx. The copy keeps the
    model's own classes, forward code and parameter names: a folded BN inside an
    nn.Sequential is dropped from it (the other entries keep their names, so state dicts
    line up, but positions after it shift by one: ``seq[2]`` of the original is ``seq[1]``
    of the copy; ``get_submodule("seq.2")`` still finds it), elsewhere it becomes a
    :class:`FoldedAway` pass-through. If the copy, traced again, does not compute
    exactly the folded graph (e.g. a forward that indexes a Sequential by position), the
    folded torch.fx GraphModule is returned instead. If the model cannot be traced, only
    BNs following such a layer inside an nn.Sequential are folded (left as FoldedAway) and a
    :class:`FoldWarning` names those left as affine maps. BNs without running statistics
    (track_running_stats=False) are left as they are, with a warning, and so are subclasses
    that add behaviour to a BN class (an activation, say: :func:`batchnorm.added_behaviour`),
    which folding as plain BN would drop; this package's BN + activation layers fold their BN
    part and keep the rest (:class:`FoldedAct`). ``model`` is untouched.
    """
    model_copy = copy.deepcopy(model)
    _strip_freeze_hooks(model_copy)
    model_copy.eval()
    try:
        gm = _trace(model_copy)
    except Exception as exc:  # tracing fails on data-dependent control flow, among others
        return _fold_sequential(model_copy, reason=f"{type(exc).__name__}: {exc}")
    # The GraphModule shares its leaf modules with model_copy: folding a layer's weights in
    # the graph folds them in the copy too.
    gm, folded, affine = _fold_graph(gm)
    for name in folded:
        _drop(model_copy, name)
    for name, mod in affine.items():
        _set_submodule(model_copy, name, mod)
    try:
        same = _signature(_trace(model_copy)) == _signature(gm)
    except Exception:
        same = False
    return model_copy.eval() if same else gm


def _drop(root: nn.Module, name: str) -> None:
    """Remove the folded BN ``name``: out of its nn.Sequential, else a FoldedAway."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
        del parent._modules[child]  # iteration skips it; the other entries keep their keys
    else:
        setattr(parent, child, FoldedAway())


def _signature(gm) -> list:
    """A traced graph as comparable data: per node its op, target and arguments (earlier
    nodes by position), with FoldedAway pass-throughs removed."""
    modules = dict(gm.named_modules())
    position: Dict = {}
    through: Dict = {}
    sig: list = []
    ref = lambda a: fx.node.map_arg(a, lambda n: ("node", position[through.get(n, n)]))
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), FoldedAway):
            arg = node.args[0]
            through[node] = through.get(arg, arg)
            continue
        position[node] = len(sig)
        sig.append((node.op, node.target, ref(node.args), ref(node.kwargs)))
    return sig


def _trace(model: nn.Module):
    class _Tracer(fx.Tracer):
        # Every BN layer whole, whatever package defines it (a subclass that adds behaviour
        # too: fold keeps it as it is).
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_batchnorm(m) or isinstance(m, (ChannelAffine, FoldedAct)) or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def _left_as_is(name: str, bn: nn.Module) -> bool:
    why = None if isinstance(bn, _BatchNormAct) and type(bn).__module__.startswith("batchnorm.") else added_behaviour(bn)
    if why:
        warnings.warn(f"fold: BN layer {name!r} ({type(bn).__name__}) is a subclass that adds behaviour ({why}); "
                      "folding it as a plain BN would drop that, so it is left as it is", FoldWarning, stacklevel=3)
        return True
    if bn.running_mean is None:
        warnings.warn(f"fold: BN layer {name!r} has no running statistics (track_running_stats=False) "
                      "and uses batch statistics even in eval mode; left unfolded", FoldWarning, stacklevel=3)
        return True
    return False


def _fold_graph(gm):
    """Fold in the traced graph; returns the GraphModule, the names of the BNs folded away
    and the affine maps that replace the others (by name)."""
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded: List[str] = []
    affine: Dict[str, ChannelAffine] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_batchnorm(modules[node.target]):
            continue
        bn = modules[node.target]
        if _left_as_is(node.target, bn):
            continue
        prev = node.args[0] if node.args else None
        prev_mod = modules.get(prev.target) if getattr(prev, "op", None) == "call_module" else None
        act = isinstance(bn, _BatchNormAct)
        foldable = (
            isinstance(prev_mod, _FOLDABLE)
            and len(prev.users) == 1
            and calls.get(prev.target, 0) == 1
            and calls.get(node.target, 0) == 1
            and (len(node.args) == 1 or act) and (not node.kwargs or act)
            and prev_mod.weight.size(0) == bn.running_mean.numel()
        )
        if foldable and act:
            # BN into the layer before; the residual add and the activation stay.
            fold_into(prev_mod, bn)
            affine[node.target] = FoldedAct(bn.act, bn.act_kwargs)
            _set_submodule(gm, node.target, affine[node.target])
        elif foldable:
            fold_into(prev_mod, bn)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)
            _set_submodule(gm, node.target, nn.Identity())
            folded.append(node.target)
        elif node.target not in affine:
            affine[node.target] = _affine_of(bn)
            _set_submodule(gm, node.target, affine[node.target])
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval(), folded, affine


def _fold_sequential(model: nn.Module, reason: str) -> nn.Module:
    folded = set()
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules.keys())
        for a, b in zip(names, names[1:]):
            layer, bn = parent._modules[a], parent._modules[b]
            if (isinstance(layer, _FOLDABLE) and is_batchnorm(bn) and bn.running_mean is not None
                    and (added_behaviour(bn) is None or isinstance(bn, _BatchNormAct))
                    and layer.weight.size(0) == bn.running_mean.numel()):
                fold_into(layer, bn)
                parent._modules[b] = FoldedAct(bn.act, bn.act_kwargs) if isinstance(bn, _BatchNormAct) else FoldedAway()
                folded.add(id(bn))
    left: List[str] = []
    for name, m in list(model.named_modules()):
        if is_batchnorm(m) and id(m) not in folded:
            if _left_as_is(name, m):
                continue
            _set_submodule(model, name, _affine_of(m))
            left.append(name)
    if left:
        warnings.warn(f"fold: torch.fx could not trace the model ({reason}); folded only BNs that follow "
                      f"a Linear/Conv inside nn.Sequential. Left as per-channel affine maps: {', '.join(left)}",
                      FoldWarning, stacklevel=2)
    return model.eval()


# -- freezing --------------------------------------------------------------------------------

_HOOK_ATTR = "_batchnorm_freeze"


def _force_eval(module: nn.Module, args) -> None:
    module.training = False


def _remove_hook(m: nn.Module, state: dict) -> None:
    # By key in this module's own dict: a deep-copied handle would point at the original's.
    if state.get("handle") is not None:
        m._forward_pre_hooks.pop(state["handle"].id, None)


def _strip_freeze_hooks(model: nn.Module) -> None:
    for m in model.modules():
        state = m.__dict__.pop(_HOOK_ATTR, None)
        if state is not None:
            _remove_hook(m, state)
        if isinstance(m, _BatchNormBase):
            m.frozen = False


def freeze(model: nn.Module, *, requires_grad: Optional[bool] = None) -> nn.Module:
    """Make every BN layer use and keep its running statistics, whatever train()/eval() says.

    Parameters stay as they are unless ``requires_grad`` is given (False: gamma and beta stop
    training too). Works for this package's BN modules and torch.nn's. Undo with
    :func:`unfreeze`. Returns ``model``.
    """
    bns = [(n, m) for n, m in model.named_modules() if is_batchnorm(m)]
    for name, m in bns:
        if m.running_mean is None:
            raise ValueError(f"freeze: BN layer {name!r} has track_running_stats=False; "
                             "there are no running statistics to freeze to")
    for _, m in bns:
        if _HOOK_ATTR in m.__dict__:
            continue
        state = {"requires_grad": {n: p.requires_grad for n, p in m.named_parameters(recurse=False)},
                 "handle": None}
        if isinstance(m, _BatchNormBase):
            m.frozen = True
        else:
            state["handle"] = m.register_forward_pre_hook(_force_eval)
        m.__dict__[_HOOK_ATTR] = state
    if requires_grad is not None:
        for _, m in bns:
            for p in m.parameters(recurse=False):
                if not is_lazy(p):
                    p.requires_grad_(requires_grad)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: BN layers follow train()/eval() again, requires_grad restored."""
    for m in model.modules():
        state = m.__dict__.pop(_HOOK_ATTR, None)
        if state is None:
            continue
        if isinstance(m, _BatchNormBase):
            m.frozen = False
        if state["handle"] is not None:
            _remove_hook(m, state)
            m.training = model.training
        for n, p in m.named_parameters(recurse=False):
            if not is_lazy(p):  # a Lazy layer not yet run: its parameters have no requires_grad_
                p.requires_grad_(state["requires_grad"].get(n, p.requires_grad))
    return model
