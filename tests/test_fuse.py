"""convert(fuse_activations=True) (issue 17, item 4): BN + activation, and BN + residual add +
activation, become one BatchNormAct call where torch.fx proves the pattern (in an
nn.Sequential where the model cannot be traced); timm's BatchNormAct2d becomes ours.

Every fused model is checked against the original, unconverted model in float64: SGD steps
(outputs, input and parameter gradients, parameters and running statistics after each step,
with an optimizer made before convert, so the parameters must be the same objects), then
eval outputs. Tolerances are test_zoo's (relative; our BN and torch.nn's sum in different
orders).
"""

import copy
from functools import partial

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import batchnorm as bn
from batchnorm.act import ACTIVATIONS as DEFAULTS, _BatchNormAct
from batchnorm.population import is_batchnorm

import zoo
from test_zoo import FOLD_TOL, _one_thread, close, perturb, sgd_step, torch_model  # noqa: F401 (_one_thread: autouse)

DT = torch.float64


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def projection(y, seed):
    """A loss whose gradient reaches every output: the output's sum weighted by fixed
    random numbers (the same for the same seed and shape)."""
    return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)).sum()


def fuse_and_compare(model, shape, steps=2, seed=0):
    """convert(model, fuse_activations=True), with an SGD optimizer made on ``model`` before
    the call, against a deep copy of the unconverted model: ``steps`` training steps, then
    eval. Returns the converted model."""
    reference = copy.deepcopy(model)
    opt = sgd(model)  # made before convert: it must keep training the converted model
    fused = bn.convert(model, fuse_activations=True)
    opt_ref = sgd(reference)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(shape, generator=g, dtype=DT) * 1.5 + 0.5
        sgd_step(fused, reference, opt, opt_ref, x, partial(projection, seed=seed + step), f"step {step}")
    fused.eval()
    reference.eval()
    x = torch.randn(shape, generator=g, dtype=DT)
    close(fused(x), reference(x), "eval output")
    return fused


def acts(model):
    """{name: (act, act_kwargs)} of the BatchNormAct layers in ``model``."""
    return {n: (m.act, m.act_kwargs) for n, m in model.named_modules() if isinstance(m, _BatchNormAct)}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return is_batchnorm(m) or super().is_leaf_module(m, qualname)


def graph_ops(model):
    """The call nodes of ``model`` traced by torch.fx (BN layers as one node each)."""
    return [(n.op, n.target) for n in _Tracer().trace(model).nodes if n.op.startswith("call")]


def activations_left(model):
    """The ReLU and ReLU6 calls (modules and functions) in ``model``'s traced graph."""
    mods = dict(model.named_modules())
    return [n.target for n in _Tracer().trace(model).nodes
            if (n.op == "call_module" and isinstance(mods[n.target], (nn.ReLU, nn.ReLU6)))
            or (n.op == "call_function" and n.target in (F.relu, torch.relu))]


def conv_bn_relu():
    return nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 4, 1)).to(DT)


# -- Sequential ----------------------------------------------------------------------------------

def test_sequential_is_fused_in_place():
    model = conv_bn_relu()
    weight, running_var = model[1].weight, model[1].running_var
    fused = fuse_and_compare(model, (4, 3, 8, 8))
    assert fused is model and type(fused[1]) is bn.BatchNormAct2d and fused[1].act == "relu"
    assert type(fused[2]) is bn.FusedAway and type(fused[3]) is nn.Conv2d  # positions kept
    assert fused[1].weight is weight and fused[1].running_var is running_var
    assert ("call_module", "2") not in graph_ops(fused)
    assert set(fused.state_dict()) == set(conv_bn_relu().state_dict())


def test_frozen_state_is_carried():
    model = bn.freeze(conv_bn_relu())
    reference = copy.deepcopy(model)
    fused = bn.convert(model, fuse_activations=True)
    assert type(fused[1]) is bn.BatchNormAct2d and fused[1].frozen and fused.training
    x = torch.randn(4, 3, 8, 8, dtype=DT)
    close(fused(x), reference(x), "frozen output")  # running statistics used in train mode
    assert int(fused[1].num_batches_tracked) == 0
    bn.unfreeze(fused)
    assert not fused[1].frozen


def test_default_keeps_the_plain_conversion():
    for kwargs in ({}, {"fuse_activations": False}):
        model = conv_bn_relu()
        out = bn.convert(model, **kwargs)
        assert out is model and type(out[1]) is bn.BatchNorm2d and type(out[2]) is nn.ReLU


# -- a ResNet basic block ------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """relu(bn1(conv1(x))), then relu(bn2(conv2(.)) + shortcut), the activation and the
    add written four ways; ``project``: the shortcut is conv-BN too."""

    def __init__(self, style, project=False):
        super().__init__()
        self.style = style
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)  # one module for both activations, as torchvision's
        self.down = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)) if project else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        if self.style == "functional":
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + identity)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.style == "iadd":
            out += identity
        elif self.style == "add_":
            out = out.add_(identity)
        elif self.style == "torch.add":
            out = torch.add(identity, out)
        else:
            out = out + identity
        return self.relu(out)


@pytest.mark.parametrize("style", ["functional", "module", "iadd", "add_", "torch.add"])
@pytest.mark.parametrize("project", [False, True], ids=["identity", "projection"])
def test_resnet_block_fuses_the_residual_add(style, project):
    model = BasicBlock(style, project).to(DT)
    params = {n: p for n, p in model.named_parameters()}
    fused = fuse_and_compare(model, (3, 4, 6, 6))
    assert isinstance(fused, fx.GraphModule) and type(fused).__name__ == "BasicBlock"
    assert all(p is params[n] for n, p in fused.named_parameters()) and len(params) == len(dict(fused.named_parameters()))
    # The first BN of the add in the graph (the shortcut's) is fused with it, but an in-place
    # add writes into its first operand, bn2's output, so only bn2 may be fused with add_.
    last = "down.1" if project and style != "add_" else "bn2"
    assert acts(fused) == {"bn1": ("relu", {}), last: ("relu", {})}
    calls = [n for n in fused.graph.nodes if n.op != "placeholder" and n.op != "output"]
    # No activation and no add left: conv1, bn1, conv2, [down.0], and the fused call.
    assert [n.op for n in calls] == ["call_module"] * len(calls), fused.code
    fused_call = calls[-1]
    assert len(fused_call.args) == 2 and fused_call.args[1].op in ("placeholder", "call_module")
    assert not hasattr(fused, "relu")  # its every use fused: gone from the graph module
    # The block itself was converted in place without fusing (it shares the tensors).
    assert type(model.bn2) is bn.BatchNorm2d and type(model.relu) is nn.ReLU
    assert model.bn2.running_mean is fused.get_submodule("bn2").running_mean


def test_graph_module_keeps_modes():
    model = BasicBlock("module", project=True).to(DT)
    model.eval().conv1.train()
    model.down[1].train()
    fused = bn.convert(model, fuse_activations=True)
    assert isinstance(fused, fx.GraphModule) and not fused.training
    assert type(fused.down) is nn.Module and not fused.down.training  # a container the GraphModule made
    assert fused.conv1.training and fused.get_submodule("down.1").training
    assert not fused.bn1.training and not fused.bn2.training


# -- activations -----------------------------------------------------------------------------------

class BNThen(nn.Module):
    """linear/conv, BN, then ``act`` (a module, or a function of the BN output)."""

    def __init__(self, dims, act):
        super().__init__()
        self.layer = {1: nn.Linear(5, 4), 2: nn.Conv2d(3, 4, 3), 3: nn.Conv3d(3, 4, 2)}[dims]
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](4)
        self.act = act if isinstance(act, nn.Module) else None
        self.fn = None if isinstance(act, nn.Module) else act

    def forward(self, x):
        y = self.bn(self.layer(x))
        return self.act(y) if self.fn is None else self.fn(y)


SHAPE = {1: (8, 5), 2: (4, 3, 5, 5), 3: (3, 3, 3, 3, 3)}

ACTIVATIONS = [
    ("ReLU", 2, nn.ReLU(), "relu", {}),
    ("LeakyReLU", 1, nn.LeakyReLU(0.2), "leaky_relu", {"negative_slope": 0.2}),
    ("ELU", 3, nn.ELU(alpha=0.7), "elu", {"alpha": 0.7}),
    ("SiLU", 2, nn.SiLU(), "silu", {}),
    ("GELU-tanh", 2, nn.GELU(approximate="tanh"), "gelu", {"approximate": "tanh"}),
    ("GELU", 1, nn.GELU(), "gelu", {"approximate": "none"}),
    ("F.relu-inplace", 2, lambda y: F.relu(y, inplace=True), "relu", {}),
    ("torch.relu", 1, torch.relu, "relu", {}),
    ("torch.relu_", 2, torch.relu_, "relu", {}),
    ("Tensor.relu", 2, lambda y: y.relu(), "relu", {}),
    ("Tensor.relu_", 3, lambda y: y.relu_(), "relu", {}),
    ("F.leaky_relu", 2, lambda y: F.leaky_relu(y, 0.3), "leaky_relu", {"negative_slope": 0.3}),
    ("F.leaky_relu_", 1, lambda y: F.leaky_relu_(y, 0.05), "leaky_relu", {"negative_slope": 0.05}),
    ("F.elu", 2, lambda y: F.elu(y, alpha=0.5), "elu", {"alpha": 0.5}),
    ("F.elu_", 2, F.elu_, "elu", {}),
    ("F.silu", 1, F.silu, "silu", {}),
    ("F.gelu", 2, lambda y: F.gelu(y, approximate="tanh"), "gelu", {"approximate": "tanh"}),
]


@pytest.mark.parametrize("dims,act,name,kwargs", [a[1:] for a in ACTIVATIONS], ids=[a[0] for a in ACTIVATIONS])
def test_each_activation_is_fused(dims, act, name, kwargs):
    model = BNThen(dims, act).to(DT)
    fused = fuse_and_compare(model, SHAPE[dims])
    kind = {1: bn.BatchNormAct1d, 2: bn.BatchNormAct2d, 3: bn.BatchNormAct3d}[dims]
    assert type(fused.get_submodule("bn")) is kind
    full = {**DEFAULTS[name], **kwargs}
    assert acts(fused) == {"bn": (name, full)}
    assert graph_ops(fused) == [("call_module", "layer"), ("call_module", "bn")]
    # A module activation is fused in place; a functional one needs the traced graph.
    assert isinstance(fused, fx.GraphModule) != isinstance(act, nn.Module)
    if isinstance(act, nn.Module):
        assert type(fused.act) is bn.FusedAway


# -- what is not fused -------------------------------------------------------------------------------

def _hooked_relu():
    m = nn.ReLU()
    m.register_forward_hook(lambda mod, args, out: out * 2)  # fusing would drop the hook
    return m


class NotFused(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.act = {"ReLU6": nn.ReLU6(), "Identity": nn.Identity(), "hooked": _hooked_relu()}.get(case, nn.ReLU())

    def forward(self, x):
        c = self.conv(x)
        y = self.bn(c)
        if self.case == "two readers":
            return self.act(y) + y
        if self.case == "alpha":
            return self.act(torch.add(y, c, alpha=2.0))
        if self.case == "add_ into the other operand":
            z = c * 1
            w = z.add_(y)  # writes into z, which is read again below
            return self.act(w) + z
        if self.case == "add_ unchained":  # fx: the activation reads the BN node, not the add's
            y.add_(c)
            return self.act(y)
        if self.case == "add read twice":
            s = y + c
            return self.act(s) * s
        if self.case == "bn + bn":
            return self.act(y + y)
        return self.act(y)


NOT_FUSED = ["two readers", "alpha", "add_ into the other operand", "add_ unchained", "add read twice", "bn + bn", "ReLU6",
             "Identity", "hooked"]


@pytest.mark.parametrize("case", NOT_FUSED)
def test_patterns_fx_does_not_prove_are_not_fused(case):
    model = NotFused(case).to(DT)
    fused = fuse_and_compare(model, (3, 3, 5, 5))
    assert fused is model and type(fused.bn) is bn.BatchNorm2d and not isinstance(fused.act, bn.FusedAway)


class DoubledReLU(nn.ReLU):
    """Not a torch.nn class, so torch.fx traces into its forward: F.relu, then * 2."""

    def forward(self, x):
        return super().forward(x) * 2


def test_activation_subclass_is_traced_into():
    fused = fuse_and_compare(BNThen(2, DoubledReLU()).to(DT), SHAPE[2])
    assert isinstance(fused, fx.GraphModule) and acts(fused) == {"bn": ("relu", {})}
    assert [op for op, _ in graph_ops(fused)] == ["call_module", "call_module", "call_function"]  # conv, bn, * 2


class SharedAct(nn.Module):
    """One SiLU module after a BN and, elsewhere, after a plain add."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + self.act(x + 1)


def test_activation_module_used_elsewhere_stays_where_it_is_used():
    fused = fuse_and_compare(SharedAct().to(DT), (3, 4, 5, 5))
    assert isinstance(fused, fx.GraphModule) and acts(fused) == {"bn": ("silu", {})}
    assert type(fused.act) is nn.SiLU
    assert [t for op, t in graph_ops(fused) if op == "call_module"] == ["conv", "bn", "act"]


class TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return F.relu(self.bn(x)) + F.relu(self.bn(x * 2))


class Refused(nn.Module):
    """BN layers in the pattern that BatchNormAct cannot replace."""

    def __init__(self):
        super().__init__()
        self.renorm = bn.BatchRenorm2d(3)
        self.lazy = nn.LazyBatchNorm2d()
        self.pool = nn.AvgPool2d(1)
        self.sync = nn.SyncBatchNorm(3)

    def forward(self, x):
        return F.relu(self.renorm(x)) + F.relu(self.lazy(x)) + F.relu(self.sync(self.pool(x)))


def test_refused_layers_warn_and_stay():
    model = Refused()
    with pytest.warns(bn.ConvertWarning) as record:
        out = bn.convert(model, fuse_activations=True)
    (w,) = record
    assert w.filename == __file__  # attributed to the caller of convert
    message = str(w.message)
    assert "renorm (Batch Renormalization" in message and "lazy (a Lazy layer not initialized" in message
    assert "sync (a SyncBatchNorm after no Linear or Conv" in message
    assert out is model and [type(m) for m in (out.renorm, out.lazy, out.sync)] == [
        bn.BatchRenorm2d, bn.LazyBatchNorm2d, bn.SyncBatchNorm]
    with pytest.warns(bn.ConvertWarning, match=r"bn \(called 2 times\)"):
        twice = bn.convert(TwoCalls(), fuse_activations=True)
    assert type(twice.bn) is bn.BatchNorm1d


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = bn.BatchNorm1d(4)

    def forward(self, x, mask):
        return torch.relu(self.bn(x, mask))


def test_masked_call_is_not_fused():
    with pytest.warns(bn.ConvertWarning, match=r"bn \(called with more than its input"):
        out = bn.convert(Masked(), fuse_activations=True)
    assert type(out.bn) is bn.BatchNorm1d


class SyncBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.sync, self.relu = nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU()
        self.linear, self.ours = nn.Linear(5, 4), bn.SyncBatchNorm(4)

    def forward(self, x):
        return self.relu(self.sync(self.conv(x))).mean() + F.elu(self.ours(self.linear(x[:, 0, 0])))


def test_sync_batchnorm_becomes_a_synchronized_batchnorm_act():
    fused = fuse_and_compare(SyncBlock().to(DT), (4, 3, 5, 5))  # no process group: local statistics
    assert type(fused.sync) is bn.BatchNormAct2d and type(fused.ours) is bn.BatchNormAct1d
    assert fused.sync.sync and fused.ours.sync
    assert fused.sync._sync_layer != fused.ours._sync_layer  # numbered for the ranks' same-layer check


# -- untraceable models ------------------------------------------------------------------------------

class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = conv_bn_relu()[:3]
        self.bn = nn.BatchNorm2d(6).to(DT)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return F.relu(self.bn(y))


def test_untraceable_model_falls_back_to_sequential_and_warns():
    model = Untraceable()
    with pytest.warns(bn.ConvertWarning, match=r"torch.fx could not trace the model \(TraceError.*not fused "
                                               r"\(what reads their output is not known\): bn$") as record:
        fused = fuse_and_compare(model, (4, 3, 8, 8))
    assert record[0].filename == __file__
    assert fused is model and type(model.features[1]) is bn.BatchNormAct2d and type(model.features[2]) is bn.FusedAway
    assert type(model.bn) is bn.BatchNorm2d


# -- options ---------------------------------------------------------------------------------------------

def test_bad_options_change_nothing():
    model = BasicBlock("module")
    with pytest.raises(TypeError, match="fuse_activations must be True or False"):
        bn.convert(model, fuse_activations="yes")
    with pytest.raises(TypeError, match="unknown option"):
        bn.convert(model, fuse_activations=True, virtual_batch=4)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn.convert(model, fuse_activations=True, virtual_batch_size=0)
    assert [type(m) for m in model.modules()] == [type(m) for m in BasicBlock("module").modules()]
    fused = bn.convert(model.to(DT), fuse_activations=True, nonfinite="raise", eps=1e-3)
    assert all(m.nonfinite == "raise" and m.eps == 1e-3 for n, m in fused.named_modules() if is_batchnorm(m))


# -- timm ------------------------------------------------------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """A STAND-IN for timm.layers.BatchNormAct2d (timm is not installed here and does not
    import beside this torch): an nn.BatchNorm2d subclass with ``act`` and ``drop``
    submodules, forward act(drop(bn(x))) as timm's, and timm's module and class name, by
    which convert recognizes timm's layer."""

    def __init__(self, num_features, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_features)
        self.drop = drop_layer() if drop_layer else nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


BatchNormAct2d.__module__ = "timm.layers.norm_act"


def timm_net(**kwargs):
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), BatchNormAct2d(4, **kwargs), nn.Conv2d(4, 2, 1)).to(DT)


@pytest.mark.parametrize("act_layer,name", [(nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.Identity, "identity")])
def test_timm_batchnorm_act_becomes_ours(act_layer, name):
    fused = fuse_and_compare(timm_net(act_layer=act_layer), (4, 3, 6, 6))
    assert type(fused[1]) is bn.BatchNormAct2d and fused[1].act == name and not list(fused[1].children())


@pytest.mark.parametrize("kwargs,why", [({"act_layer": nn.ReLU6}, "act torch.nn.modules.activation.ReLU6"),
                                        ({"drop_layer": nn.Dropout}, "drop Dropout")])
def test_timm_batchnorm_act_that_does_not_map_is_left(kwargs, why):
    model = timm_net(**kwargs)
    with pytest.warns(bn.ConvertWarning, match=f"1 \\(BatchNormAct2d: timm BatchNormAct2d with {why}"):
        out = bn.convert(model, fuse_activations=True)
    assert type(out[1]) is BatchNormAct2d


def test_timm_batchnorm_act_left_without_fusing():
    with pytest.warns(bn.ConvertWarning, match=r"1 \(BatchNormAct2d: class BatchNormAct2d defines"):
        out = bn.convert(timm_net())
    assert type(out[1]) is BatchNormAct2d


# -- fold ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sequential", "resnet block"])
def test_fold_folds_the_fused_layers(which):
    model = conv_bn_relu() if which == "sequential" else BasicBlock("functional").to(DT)
    shape = (4, 3, 8, 8) if which == "sequential" else (4, 4, 6, 6)
    reference = copy.deepcopy(perturb(model)).eval()  # running statistics away from (0, 1): folding shows
    fused = bn.convert(model, fuse_activations=True).eval()
    folded = bn.fold(fused)
    x = torch.randn(shape, dtype=DT)
    close(folded(x), reference(x), "folded output", FOLD_TOL)
    kinds = [type(m) for m in folded.modules()]
    assert not any(is_batchnorm(m) for m in folded.modules()) and bn.ChannelAffine not in kinds
    assert [m.act for m in folded.modules() if isinstance(m, bn.FoldedAct)] == ["relu"] * (1 if which == "sequential" else 2)


# -- the zoo ---------------------------------------------------------------------------------------------

# Fused BatchNormAct layers per model: every BN followed by a ReLU (MobileNetV2's ReLU6 is not
# supported); in the ResNets the block's last BN (or its projection's) with the residual add.
FUSED = {"resnet_basic": 7, "resnet_bottleneck": 10, "mobilenet_v2": 0, "densenet": 13, "inception": 13}


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_models_fused_compute_the_same_function(name):
    model = torch_model(name)
    relus = len(activations_left(model))
    fused = fuse_and_compare(model, (4,) + zoo.INPUT[1:])
    assert len(acts(fused)) == FUSED[name]
    assert len(activations_left(fused)) == (relus if name == "mobilenet_v2" else 0) and relus > 0
    # fused in place where the model's own forward computes the fused graph
    assert (fused is model) == (name in ("mobilenet_v2", "inception"))
