"""Real models (issue 16, item 7): the small zoo of tests/zoo.py (ResNet with basic and with
bottleneck blocks, MobileNetV2's inverted residuals with depthwise convs, DenseNet's
concatenating blocks, Inception's branches), each built once with torch.nn's BN layers and
once with ours from the same state, in float64, and compared: training steps (outputs,
every gradient, running statistics), eval, fold, freeze, population_statistics, convert,
torch.fx, torch.jit.trace and torch.export.

Tolerances are relative: the largest difference over the reference's largest magnitude.
Our fused kernels (every BN input of 32,768 values or more here) and torch's kernel sum in
different orders, so a training step agrees to float64 rounding, not bitwise. Largest
disagreements seen over every model and step (torch 2.13, CPU, 1 and 2 threads): outputs
5.5e-15, input gradients 2.2e-14, parameters and running statistics after an SGD step
4.0e-15, population statistics against torch's cumulative average 2.7e-14, trace and export
against eager 2.8e-15 (outputs) and 8.1e-14 (gradients), fold 4.8e-16. TOL = 1e-11 leaves a
margin of over 400 and still fails on any real error (the biased variance in the running
update is 1.5e-5 here). Parameter gradients are sums over up to 131,072 values that can
cancel: DenseNet's stem gamma gradient, 150 times smaller than the step's largest gradient,
sums terms whose magnitudes add up to 2,700 times the result, and disagrees by 1.4e-12;
GRAD_TOL = 1e-10. A gradient that is exactly zero in exact arithmetic (a conv bias right
before a training-mode BN, a beta whose shift the next conv and BN remove) is rounding noise
on both sides, at most 1.4e-15 of the step's largest gradient: both must be below ZERO. Eval
(and a frozen BN) runs torch's own kernel on the running statistics: on the same state the
output is bitwise equal. fold() changes the arithmetic (the scale goes into the conv weight):
FOLD_TOL = 1e-10.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm as bn
from batchnorm import functional as bnf
from batchnorm.population import is_batchnorm

import zoo

DT = torch.float64
TOL = 1e-11        # outputs, input gradients, parameters and buffers (see above)
GRAD_TOL = 1e-10   # parameter gradients: sums over up to 131,072 values that may cancel
FOLD_TOL = 1e-10   # fold(model) against the unfolded eval model
ZERO = 1e-12       # a gradient that is zero but for rounding, relative to the step's largest
TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# torch 2.13 deprecates torch.jit.trace itself (a warning about the API, not about us).
_TRACE_WARNINGS = pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")

@pytest.fixture(autouse=True)
def _one_thread():
    """These models are small: a second intra-op thread costs more than it gains (about 2.7x
    the CPU time measured here), so the zoo runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHANNELS_LAST = ["resnet_basic", "mobilenet_v2"]
CASES = [(name, torch.contiguous_format) for name in zoo.NAMES] + [(name, torch.channels_last)
                                                                    for name in CHANNELS_LAST]
CASE_IDS = zoo.NAMES + [f"{name}-channels_last" for name in CHANNELS_LAST]


# -- helpers -----------------------------------------------------------------------------------

def bns(model):
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def is_ours(m) -> bool:
    return type(m).__module__.startswith("batchnorm.")


def perturb(model, seed=1):
    """gamma, beta and running statistics away from their initial values, so that every
    one of them shows in outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in bns(model):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)          # (C,)
            m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)             # (C,)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(5)
    return model


def torch_model(name, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    return perturb(zoo.build(name, nn.BatchNorm2d)).to(DT, memory_format=memory_format)


def pair(name, memory_format=torch.contiguous_format):
    """(ours, theirs): the model with our layers and with torch.nn's, in the same state."""
    theirs = torch_model(name, memory_format)
    ours = zoo.build(name, bn.BatchNorm2d).to(DT, memory_format=memory_format)
    ours.load_state_dict(theirs.state_dict())  # strict: the same names both ways
    ours_bns, their_bns = bns(ours), bns(theirs)
    assert [n for n, _ in ours_bns] == [n for n, _ in their_bns] and len(ours_bns) >= 6
    assert all(type(m) is bn.BatchNorm2d for _, m in ours_bns)
    assert all(type(m) is nn.BatchNorm2d for _, m in their_bns)
    return ours, theirs


def data(seed, n=zoo.INPUT[0], memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + zoo.INPUT[1:], generator=g, dtype=DT) * 1.5 + 0.5
    target = torch.randint(0, zoo.NUM_CLASSES, (n,), generator=g)
    return x.contiguous(memory_format=memory_format), target


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (0 for two zero tensors)."""
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return float((a - b).abs().max() / scale)


def close(a, b, what, tol=TOL):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def close_grads(names, ga, gb, what):
    """Per-parameter gradients. One whose true value is zero (a conv bias right before a
    training-mode BN; a beta whose shift the next conv and BN take out again: Section 3.2)
    is rounding noise on both sides: both must be below ZERO times the step's largest
    gradient instead. Likewise a small gradient that is a sum of large terms that cancel (a
    gamma whose gradient is 1e-6 of the step's largest) differs by rounding noise of the size
    of its terms: torch.nn's own NCHW and channels_last steps differ by 2e-10 relative on one
    in tests/test_fuse.py; a difference below ZERO times the step's largest gradient passes."""
    scale = max(float(g.abs().max()) for g in gb)
    for n, a, b in zip(names, ga, gb):
        if float(b.abs().max()) <= ZERO * scale:
            assert float(a.abs().max()) <= ZERO * scale, f"{what}: gradient of {n} should be zero, got {a}"
        elif a.shape != b.shape or float((a - b).abs().max()) > ZERO * scale:
            close(a, b, f"{what}: gradient of {n}", GRAD_TOL)


def same_state(a, b, what, tol=TOL):
    """Every parameter and buffer of a matches b's (num_batches_tracked exactly)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), (what, set(sa) ^ set(sb))
    for k, v in sb.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], v), f"{what}: {k} {sa[k]} != {v}"
        else:
            close(sa[k], v, f"{what}: {k}", tol)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def train_steps(ours, theirs, steps=3, seed=10, memory_format=torch.contiguous_format):
    """SGD steps on both with the same data: outputs, input and parameter gradients,
    parameters and buffers compared after each."""
    ours.train()
    theirs.train()
    opt_a, opt_b = sgd(ours), sgd(theirs)
    nbt = {n: int(m.num_batches_tracked) for n, m in bns(theirs)}
    for step in range(steps):
        x, target = data(seed + step, memory_format=memory_format)
        sgd_step(ours, theirs, opt_a, opt_b, x, lambda y: F.cross_entropy(y, target), f"step {step}")
    for n, m in bns(ours):
        assert int(m.num_batches_tracked) == nbt[n] + steps, n


def sgd_step(ours, theirs, opt_a, opt_b, x, loss, what):
    """One optimizer step on both with input ``x`` and ``loss(output)``: outputs, input and
    parameter gradients compared, then parameters and buffers."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    close(ya, yb, f"{what}: output")
    opt_a.zero_grad()
    opt_b.zero_grad()
    loss(ya).backward()
    loss(yb).backward()
    close(xa.grad, xb.grad, f"{what}: input gradient")
    pa, pb = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert set(pa) == set(pb)
    close_grads(list(pb), [pa[n].grad for n in pb], [p.grad for p in pb.values()], what)
    opt_a.step()
    opt_b.step()
    same_state(ours, theirs, f"after {what}")


# -- training, eval ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,memory_format", CASES, ids=CASE_IDS)
def test_train_steps_and_eval_match_torch(name, memory_format, monkeypatch):
    ours, theirs = pair(name, memory_format)
    layouts = []  # the layout of each step "auto" ran on the fused kernels

    def spy(input, *args):
        layouts.append(args[-2])
        return train_fused(input, *args)

    train_fused = bnf._train_fused
    monkeypatch.setattr(bnf, "_train_fused", spy)
    outputs = []  # the memory format of our layers' outputs
    for _, m in bns(ours):
        m.register_forward_hook(lambda mod, args, out: outputs.append(out.is_contiguous(memory_format=memory_format)))
    train_steps(ours, theirs, memory_format=memory_format)
    assert all(outputs) and len(outputs) == 3 * len(bns(ours))
    if bn._fused.available():
        kernel_calls = sum(lay is not None for lay in layouts)
        # Both paths ran: the fused kernels on the wide layers, torch's kernel on the others.
        assert 0 < kernel_calls < len(outputs), (kernel_calls, len(outputs))
    monkeypatch.undo()

    ours.eval()
    theirs.eval()
    x, _ = data(99, n=5, memory_format=memory_format)
    close(ours(x), theirs(x), "eval output")
    # In eval mode ours runs torch's own kernel on the running statistics: on the same
    # state the outputs are bitwise equal.
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours(x), theirs(x))


# -- fold --------------------------------------------------------------------------------------

def bn_after_conv(model, x):
    """{BN name: whether its input is the output of a Conv2d}, from forward hooks (not fx)."""
    names = {m: n for n, m in model.named_modules()}
    producer, outputs, follows = {}, [], {}

    def record(mod, args, out):
        outputs.append(out)  # kept alive, so that no id is reused
        producer[id(out)] = mod

    def check(mod, args):
        follows[names[mod]] = isinstance(producer.get(id(args[0])), nn.Conv2d)

    hooks = [m.register_forward_hook(record) for m in names if not list(m.children())]
    hooks += [m.register_forward_pre_hook(check) for m in names if is_batchnorm(m)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return follows


@pytest.mark.parametrize("name", zoo.NAMES)
def test_fold_matches_the_eval_model(name):
    ours, theirs = pair(name)
    ours.eval()
    x, _ = data(7)
    expected = ours(x)
    follows = bn_after_conv(ours, x)
    assert sorted(follows) == sorted(n for n, _ in bns(ours))
    folded = bn.fold(ours)
    assert type(folded) is type(ours) and not folded.training
    close(folded(x), expected, "folded output", FOLD_TOL)
    modules = dict(folded.named_modules())
    assert not any(is_batchnorm(m) for m in modules.values())
    for bn_name, after_conv in follows.items():
        if after_conv:  # merged into its conv: gone from its Sequential, or a pass-through
            assert bn_name not in modules or isinstance(modules[bn_name], bn.FoldedAway), bn_name
        else:  # after a concatenation or an activation: its per-channel affine map
            assert isinstance(modules[bn_name], bn.ChannelAffine), bn_name
    n_affine = sum(isinstance(m, bn.ChannelAffine) for m in modules.values())
    assert n_affine == sum(not v for v in follows.values())
    if name == "densenet":
        assert n_affine == 7  # five dense layers' first BN, the transition's, the final one
    else:
        assert n_affine == 0
    # torch.nn's model folds to the same function.
    close(bn.fold(theirs)(x), theirs.eval()(x), "folded torch.nn model", FOLD_TOL)


# -- freeze ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", zoo.NAMES)
def test_freeze_uses_and_keeps_running_stats(name):
    ours, theirs = pair(name)
    frozen_theirs = copy.deepcopy(theirs)
    bn.freeze(ours)
    bn.freeze(frozen_theirs)  # torch.nn's layers, frozen by a hook
    for model in (ours, theirs, frozen_theirs):
        model.train()
    for _, m in bns(theirs):  # the reference: torch.nn's BN in eval mode inside a training model
        m.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items() if "running" in k or "num_batches" in k}
    assert len(before) == 3 * len(bns(ours))
    opts = [sgd(m) for m in (ours, theirs, frozen_theirs)]
    for step in range(2):
        x, target = data(30 + step)
        ys = [m(x) for m in (ours, theirs, frozen_theirs)]
        close(ys[0], ys[1], f"step {step}: frozen output")
        close(ys[2], ys[1], f"step {step}: torch.nn frozen output")
        for y, opt in zip(ys, opts):
            opt.zero_grad()
            F.cross_entropy(y, target).backward()
        names = [n for n, _ in ours.named_parameters()]
        reference = [p.grad for p in theirs.parameters()]
        close_grads(names, [p.grad for p in ours.parameters()], reference, f"step {step}")
        close_grads(names, [p.grad for p in frozen_theirs.parameters()], reference, f"step {step}: torch.nn frozen")
        for opt in opts:
            opt.step()
    for model in (ours, frozen_theirs):
        state = model.state_dict()
        for k, v in before.items():
            assert torch.equal(state[k], v), k
    same_state(ours, theirs, "after frozen steps")
    assert ours.training and all(m.training for _, m in bns(ours))  # train(), yet frozen
    bn.unfreeze(ours)
    ours(data(40)[0])
    assert all(int(m.num_batches_tracked) == 6 for _, m in bns(ours))  # updating again


# -- population statistics ---------------------------------------------------------------------

@pytest.mark.parametrize("name", zoo.NAMES)
def test_population_statistics_equal_torch_cumulative_average(name):
    ours, theirs = pair(name)
    ours.eval()
    batches = [data(50 + i, n=n)[0] for i, n in enumerate((4, 3, 4))]  # unequal batch sizes
    params = [p.clone() for p in ours.parameters()]
    bn.population_statistics(ours, batches)
    # The documented equivalent: momentum=None (cumulative average) from reset statistics,
    # each batch through the training network: E_B[mu_B] and E_B[m/(m-1) sigma2_B].
    reference = copy.deepcopy(theirs)
    for _, m in bns(reference):
        m.momentum = None
        m.reset_running_stats()
    reference.train()
    with torch.no_grad():
        for x in batches:
            reference(x)
    for (n, a), (_, b), (_, t) in zip(bns(ours), bns(reference), bns(theirs)):
        close(a.running_mean, b.running_mean, f"{n}.running_mean")
        close(a.running_var, b.running_var, f"{n}.running_var")
        assert int(a.num_batches_tracked) == int(t.num_batches_tracked) == 5  # not touched
        assert int(b.num_batches_tracked) == 3
    assert not ours.training and not any(m.training for m in ours.modules())  # modes restored
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), params))
    x, _ = data(59)
    close(ours(x), reference.eval()(x), "eval output with population statistics")
    # torch.nn's layers get the same estimates (through forward hooks).
    bn.population_statistics(theirs, batches)
    for (n, a), (_, t) in zip(bns(ours), bns(theirs)):
        close(t.running_mean, a.running_mean, f"torch.nn {n}.running_mean")
        close(t.running_var, a.running_var, f"torch.nn {n}.running_var")


# -- torch.jit.trace, torch.export --------------------------------------------------------------

def grads(model, x, target, names):
    """The model's output and the gradients of the loss for the parameters ``names``."""
    y = model(x)
    params = dict(model.named_parameters())
    return y, torch.autograd.grad(F.cross_entropy(y, target), [params[n] for n in names])


def same_steps(captured, eager, steps, seed, what):
    """Training steps (no optimizer) of a captured program against the eager model."""
    names = [n for n, _ in eager.named_parameters()]
    for step in range(steps):
        x, target = data(seed + step)
        ya, ga = grads(captured, x, target, names)
        yb, gb = grads(eager, x, target, names)
        close(ya, yb, f"{what} step {step}: output")
        close_grads(names, ga, gb, f"{what} step {step}")


@_TRACE_WARNINGS
@pytest.mark.parametrize("name", zoo.NAMES)
def test_jit_trace_train_and_eval(name):
    ours, _ = pair(name)
    eager = copy.deepcopy(ours)
    example = data(60)[0]
    traced = torch.jit.trace(ours.train(), (example,), check_trace=False)
    eager.train()(example)  # the trace ran one step
    same_steps(traced, eager, 2, 61, "traced")
    same_state(ours, eager, "traced train")  # the traced module updated its running stats
    assert all(int(m.num_batches_tracked) == 8 for _, m in bns(ours))
    traced_eval = torch.jit.trace(ours.eval(), (example,), check_trace=False)
    x = data(63, n=3)[0]
    close(traced_eval(x), eager.eval()(x), "traced eval output")
    same_state(ours, eager, "traced eval")


@pytest.mark.parametrize("name", zoo.NAMES)
def test_export_eval_and_train(name):
    ours, _ = pair(name)
    x = data(70)[0]
    ours.eval()
    exported = torch.export.export(ours, (x,)).module()
    x2 = data(71, n=4)[0]
    close(exported(x2), ours(x2), "exported eval output")
    ours.train()
    eager = copy.deepcopy(ours)
    exported = torch.export.export(ours, (x,)).module()
    same_steps(exported, eager, 2, 72, "exported")
    same_state(exported, eager, "exported train")
    assert int(exported.state_dict()[bns(ours)[0][0] + ".num_batches_tracked"]) == 7


# -- convert (batchnorm.convert is being written) -----------------------------------------------

@pytest.mark.parametrize("name", zoo.NAMES)
def test_convert_computes_the_same_function(name):
    theirs = torch_model(name)
    converted = bn.convert(copy.deepcopy(theirs))
    converted_bns = bns(converted)
    assert sorted(n for n, _ in converted_bns) == sorted(n for n, _ in bns(theirs))
    assert all(is_ours(m) and type(m) not in TORCH_BN for _, m in converted_bns)
    assert set(converted.state_dict()) == set(theirs.state_dict())
    same_state(converted, theirs, "converted", tol=0.0)
    train_steps(converted, theirs)
    converted.eval()
    theirs.eval()
    x, _ = data(80, n=3)
    close(converted(x), theirs(x), "converted eval output")


# -- torch.fx ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", zoo.NAMES)
def test_fx_symbolic_trace_keeps_each_bn_one_node(name):
    ours, _ = pair(name)
    eager = copy.deepcopy(ours)
    gm = torch.fx.symbolic_trace(ours)  # shares ours's modules
    names = [n for n, _ in bns(ours)]
    calls = [node.target for node in gm.graph.nodes if node.op == "call_module"]
    for n in names:
        assert calls.count(n) == 1, n
    inside = [node for node in gm.graph.nodes if node.op in ("get_attr", "call_module")
              and any(str(node.target).startswith(n + ".") for n in names)]
    assert not inside, inside  # not traced into: no BN buffer or parameter in the graph
    same_steps(gm.train(), eager.train(), 2, 90, "fx")
    same_state(ours, eager, "fx train")
    x = data(93, n=3)[0]
    close(gm.eval()(x), eager.eval()(x), "fx eval output")


# -- timm (optional) ------------------------------------------------------------------------------

def _timm():
    try:
        import timm
    except Exception as exc:  # not installed, or torchvision's C ops fail to load (RuntimeError, OSError)
        return None, f"timm does not import here: {type(exc).__name__}: {exc}"
    return timm, ""


def swap_bn(model):
    """Replace every torch.nn.BatchNorm2d (that exact class) of a float32 model by ours,
    with its state; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                new = bn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(parent, child_name, new)
                swapped += 1
    return swapped


@pytest.mark.parametrize("arch", ["resnet10t", "resnet14t"])
def test_timm_models(arch):
    timm, why = _timm()
    if timm is None:
        pytest.skip(why)
    torch.manual_seed(0)
    theirs = perturb(timm.create_model(arch, pretrained=False, num_classes=zoo.NUM_CLASSES))
    ours = copy.deepcopy(theirs)
    assert swap_bn(ours) == sum(type(m) is nn.BatchNorm2d for m in theirs.modules()) > 0
    ours, theirs = ours.to(DT), theirs.to(DT)
    train_steps(ours, theirs, steps=2)
    ours.eval()
    theirs.eval()
    x, _ = data(95, n=3)
    close(ours(x), theirs(x), "eval output")
    close(bn.fold(ours)(x), theirs(x), "folded output", FOLD_TOL)
