"""Where a BN layer's output goes straight into an activation, for
``convert(fuse_activations=True)``: in a torch.fx graph, where the graph proves it (the BN
output feeds only the activation, or only a residual add whose output feeds only the
activation), and in an nn.Sequential, where the order of the entries does. Also what
timm's BatchNormAct2d computes, read from its submodules.

Only the matching lives here; :mod:`batchnorm.surgery` builds the layers and puts them in
place.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .population import is_batchnorm

__all__ = ["Activation", "Fusion", "module_activation", "find_fusions", "rewrite", "sequential_pairs",
           "input_dims", "timm_activation"]

#: (act, act_kwargs) as :class:`batchnorm.BatchNormAct2d` takes them.
Activation = Tuple[str, Dict[str, Any]]

# Activation modules by exact class (a subclass may compute something else).
_MODULES = {
    nn.ReLU: lambda m: ("relu", {}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.ELU: lambda m: ("elu", {"alpha": m.alpha}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
}

# Functions (as torch.fx records them) and Tensor methods: the activation and the names of
# the arguments after the input, in order. ``inplace`` changes nothing here: BN's output is
# a fresh tensor that only the activation reads, and BatchNormAct acts on it in place.
_FUNCTIONS = {
    F.relu: ("relu", ("inplace",)), torch.relu: ("relu", ()), torch.relu_: ("relu", ()),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")), F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.elu: ("elu", ("alpha", "inplace")), F.elu_: ("elu", ("alpha",)),
    F.silu: ("silu", ("inplace",)), F.gelu: ("gelu", ("approximate",)),
}
_METHODS = {"relu": ("relu", ()), "relu_": ("relu", ())}

# Residual adds: out of place, and in place (which writes into its first operand).
_ADD_FUNCTIONS = {operator.add: False, torch.add: False, operator.iadd: True}
_ADD_METHODS = {"add": False, "add_": True}


def _valid(kw: Dict[str, Any]) -> bool:
    """Constant arguments BatchNormAct accepts (a value computed in the graph is not)."""
    for name, value in kw.items():
        if name == "inplace":
            ok = isinstance(value, bool)
        elif name in ("negative_slope", "alpha"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # approximate
            ok = isinstance(value, str) and value in ("none", "tanh")
        if not ok:
            return False
    return True


def _lookup(node: fx.Node, functions: dict, methods: dict):
    """What ``functions`` (for a call_function node) or ``methods`` (call_method) hold for
    the node's target; None for other nodes and targets."""
    table = functions if node.op == "call_function" else methods if node.op == "call_method" else {}
    try:
        return table.get(node.target)
    except TypeError:  # an unhashable target
        return None


def module_activation(m: nn.Module) -> Optional[Activation]:
    """The activation an nn.ReLU/LeakyReLU/ELU/SiLU/GELU module computes; None for any other
    module, and for one with forward hooks (fusing would drop them)."""
    make = _MODULES.get(type(m))
    if make is None or m._forward_hooks or m._forward_pre_hooks:
        return None
    act, kw = make(m)
    return (act, kw) if _valid(kw) else None


def _activation(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[Activation]:
    """The activation ``node`` applies to its first argument, its other arguments being
    constants; None if it is not one of the supported activations."""
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        return module_activation(modules[node.target])
    spec = _lookup(node, _FUNCTIONS, _METHODS)
    if spec is None or not node.args:
        return None
    act, names = spec
    if len(node.args) - 1 > len(names):
        return None
    given = dict(zip(names, node.args[1:]))
    if set(node.kwargs) - set(names) or set(node.kwargs) & set(given):
        return None
    given.update(node.kwargs)
    if not _valid(given):
        return None
    return act, {k: v for k, v in given.items() if k != "inplace"}


def _residual(add: fx.Node, bn: fx.Node) -> Optional[fx.Node]:
    """The other operand if ``add`` is bn + other or other + bn, with no alpha or out. An
    in-place add only into BN's output (its first operand): one into the other operand
    changes that tensor for whatever else reads it."""
    inplace = _lookup(add, _ADD_FUNCTIONS, _ADD_METHODS)
    if inplace is None or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    if a is bn and isinstance(b, fx.Node) and b is not bn:
        return b
    if b is bn and isinstance(a, fx.Node) and a is not bn and not inplace:
        return a
    return None


class Fusion(NamedTuple):
    """act(bn(x)) or act(bn(x) + residual) in a graph: the nodes that become one call."""
    bn: fx.Node                  # call_module of the BN layer
    act: fx.Node                 # the activation
    activation: Activation
    add: Optional[fx.Node]       # the residual add (None: no residual)


def find_fusions(graph: fx.Graph, modules: Dict[str, nn.Module]) -> Iterator[Fusion]:
    """Every call of a BN layer (any class) whose output feeds only a supported activation,
    or only an add (of one other value) whose output feeds only a supported activation.
    Both operands of one add may be such BN calls: the caller fuses one of them (and decides
    whether a layer can become a BatchNormAct at all)."""
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(modules.get(node.target)) or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.args and user.args[0] is node:
            activation = _activation(user, modules)
            if activation is not None:
                yield Fusion(node, user, activation, None)
                continue
        if _residual(user, node) is not None and len(user.users) == 1:
            (act,) = user.users
            activation = _activation(act, modules) if act.args and act.args[0] is user else None
            if activation is not None:
                yield Fusion(node, act, activation, user)


def rewrite(gm: fx.GraphModule, fusions: List[Fusion]) -> None:
    """Each fusion's nodes become one call of the BN node's module (now a BatchNormAct):
    ``bn(x)`` where there is no add, ``bn(x, residual)`` where there is."""
    graph = gm.graph
    for f in fusions:
        if f.add is None:
            f.act.replace_all_uses_with(f.bn)
            graph.erase_node(f.act)
            continue
        # Read the operands now: an earlier rewrite may have replaced one of them.
        residual = f.add.args[1] if f.add.args[0] is f.bn else f.add.args[0]
        with graph.inserting_before(f.act):
            fused = graph.call_module(f.bn.target, (f.bn.args[0], residual))
        f.act.replace_all_uses_with(fused)
        for node in (f.act, f.add, f.bn):
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def sequential_pairs(model: nn.Module) -> Iterator[Tuple[nn.Sequential, str, str, Optional[nn.Module], Activation]]:
    """(sequential, BN's key, activation's key, the entry before the BN, activation) for
    every BN layer directly followed by a supported activation module inside an
    nn.Sequential that runs its entries in order (its class keeps Sequential's forward)."""
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
            continue
        keys = list(parent._modules)
        for i in range(len(keys) - 1):
            bn, act = parent._modules[keys[i]], parent._modules[keys[i + 1]]
            activation = module_activation(act) if is_batchnorm(bn) else None
            if activation is not None:
                before = parent._modules[keys[i - 1]] if i > 0 else None
                yield parent, keys[i], keys[i + 1], before, activation


_DIMS = ((1, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)), (2, (nn.Conv2d, nn.ConvTranspose2d)),
         (3, (nn.Conv3d, nn.ConvTranspose3d)))


def input_dims(producer: Optional[nn.Module]) -> Optional[int]:
    """1, 2 or 3: which BatchNormAct (1d/2d/3d) takes the output of ``producer`` (a
    Linear or Conv layer, batched); None if its rank is not known. A SyncBatchNorm takes
    any rank, a BatchNormAct one: this decides which."""
    for dims, classes in _DIMS:
        if isinstance(producer, classes):
            return dims
    return None


def timm_activation(m: nn.Module) -> Tuple[Optional[Activation], Optional[str]]:
    """For timm's BatchNormAct2d (found by its class's module and name; timm itself is not
    imported): (its activation, None) when it is one BatchNormAct2d computes and its drop
    is nn.Identity, else (None, why not). (None, None) for any other layer."""
    klass = type(m)
    if klass.__name__ != "BatchNormAct2d" or klass.__module__.split(".")[0] != "timm":
        return None, None
    children = dict(m.named_children())
    if not isinstance(m, nn.BatchNorm2d) or set(children) != {"act", "drop"}:
        return None, f"a timm BatchNormAct2d with submodules {', '.join(children) or 'none'}, not act and drop"
    if type(children["drop"]) is not nn.Identity:
        return None, f"timm BatchNormAct2d with drop {type(children['drop']).__name__}, which BatchNormAct lacks"
    act = children["act"]
    hooked = bool(act._forward_hooks or act._forward_pre_hooks)
    activation = ("identity", {}) if type(act) is nn.Identity and not hooked else module_activation(act)
    if activation is None:
        return None, (f"timm BatchNormAct2d with act {type(act).__module__}.{type(act).__name__}"
                      + (" (with hooks)" if hooked else "") + ", where BatchNormAct2d takes torch.nn's ReLU, "
                      "LeakyReLU, ELU, SiLU, GELU or Identity")
    return activation, None
