"""The autograd contract (issue 15, item 4) on every path, at sizes where the fused kernels
run (65,536 elements and more), in float32 and float64, NCHW and channels_last, and on the
reference path (impl="reference"): gradcheck and gradgradcheck with forward-mode AD and batched
gradients, a gradient penalty through Conv2d + BN, forward-mode tangents, torch.func.vmap /
jacrev / jvp, is_grads_batched, in-place ops on the output, torch.jit.trace and
torch.export in train mode. Each mode is compared with torch.nn's answer where torch.nn has
the variant, else with an independent float64 formula under torch's own autograd."""

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm as bn
from batchnorm import _fused

BIG = (16, 4, 32, 32)  # 65,536 elements: every kernel path runs on it

# (name, factory, input shape, forward options). "mask": (N, L) mask for BatchNorm1d.
PATHS = [
    ("plain NCHW", lambda: bn.BatchNorm2d(4), BIG, {}),
    ("plain channels_last", lambda: bn.BatchNorm2d(4), BIG, {"cl": True}),
    ("plain (N, C)", lambda: bn.BatchNorm1d(4), (16384, 4), {}),
    ("reference", lambda: bn.BatchNorm2d(4, impl="reference"), BIG, {}),
    ("torch", lambda: bn.BatchNorm2d(4, impl="torch"), BIG, {}),
    ("ghost", lambda: bn.BatchNorm2d(4, virtual_batch_size=4), BIG, {}),
    ("ghost channels_last", lambda: bn.BatchNorm2d(4, virtual_batch_size=4), BIG, {"cl": True}),
    ("renorm", lambda: bn.BatchRenorm2d(4, r_max=1.5, d_max=0.5), BIG, {}),
    ("masked", lambda: bn.BatchNorm1d(4), (16, 4, 1024), {"mask": True}),
    ("sync, no process group", lambda: bn.SyncBatchNorm(4), BIG, {}),
]
IDS = [p[0] for p in PATHS]
KERNEL_PATHS = {"plain NCHW", "plain channels_last", "plain (N, C)", "ghost", "ghost channels_last", "renorm",
                "masked", "sync, no process group"}


def _make(factory, dtype=torch.float32):
    m = factory().to(dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        if isinstance(m, bn.BatchRenorm2d):
            # Far from the batch statistics: r and d clipped, so they are constant in x,
            # as the paper's derivative (which treats them as constants) assumes.
            m.running_mean.fill_(10.0)
            m.running_var.fill_(100.0)
            m.momentum = 0.0  # the same r, d on every call of gradcheck
    return m


def _input(shape, opts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    return x.to(memory_format=torch.channels_last) if opts.get("cl") else x


def _mask(shape):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape[0], shape[2], generator=g) > 0.3
    mask[:, :2] = True
    return mask


def _call(m, x, opts, mask=None):
    return m(x, mask) if opts.get("mask") else m(x)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the fused kernels' Python entry points."""
    calls = []
    for name in ("train_forward", "train_backward", "stats", "masked_forward", "masked_backward"):
        fn = getattr(_fused, name)

        def spy(*a, _fn=fn, _name=name, **k):
            calls.append(_name)
            return _fn(*a, **k)
        monkeypatch.setattr(_fused, name, spy)
    return calls


def _reference(name, m, x, mask):
    """An independent float64 answer for the variants torch.nn lacks, under torch's autograd
    (any order, forward mode): ghost batches as torch.nn.functional.batch_norm per chunk;
    masked statistics and Batch Renormalization from their formulas."""
    w, b = m.weight, m.bias
    if name.startswith("ghost"):
        chunks = x.split(m.virtual_batch_size)
        return torch.cat([nn.functional.batch_norm(c, None, None, w, b, True, 0.0, m.eps) for c in chunks])
    if name == "masked":
        valid = mask.unsqueeze(1).to(x.dtype)                            # (N, 1, L)
        cnt = valid.sum()
        mean = (x * valid).sum((0, 2), keepdim=True) / cnt
        var = (((x - mean) ** 2) * valid).sum((0, 2), keepdim=True) / cnt
        return (x - mean) / torch.sqrt(var + m.eps) * w.view(1, -1, 1) + b.view(1, -1, 1)
    if name == "renorm":
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), unbiased=False, keepdim=True)
        sigma = torch.sqrt(m.running_var.to(x.dtype).view(1, -1, 1, 1) + m.eps)
        r = torch.clamp(torch.sqrt(var + m.eps) / sigma, 1 / m.r_max, m.r_max).detach()
        d = torch.clamp((mean - m.running_mean.to(x.dtype).view(1, -1, 1, 1)) / sigma, -m.d_max, m.d_max).detach()
        xhat = (x - mean) / torch.sqrt(var + m.eps) * r + d
        return xhat * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
    return nn.functional.batch_norm(x, None, None, w, b, True, 0.0, m.eps)


def _ref_module_fn(name, m, mask):
    """(x, weight, bias) -> the reference output, parameters as arguments."""
    def fn(x, w, b):
        mm = copy.copy(m)
        mm._parameters = dict(m._parameters, weight=w, bias=b)
        return _reference(name, mm, x, mask)
    return fn


def _our_fn(m, opts, mask):
    def fn(x, w, b):
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (x, mask) if opts.get("mask") else (x,))
    return fn


# -- gradcheck and gradgradcheck (float64) ---------------------------------------------------

@pytest.mark.parametrize("name,factory,shape,opts", PATHS, ids=IDS)
def test_gradcheck_and_gradgradcheck(name, factory, shape, opts, kernel_calls):
    """float64 at 65,536 elements (fast_mode: one random projection, so it stays quick),
    with forward-mode AD and batched gradients; the second derivative too, with forward
    over reverse and batched. The kernels must have run."""
    m = _make(factory, torch.float64)
    x = _input(shape, opts, torch.float64).requires_grad_()
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    fn = _our_fn(m, opts, _mask(shape) if opts.get("mask") else None)
    assert gradcheck(fn, (x, w, b), fast_mode=True, check_forward_ad=True, check_batched_grad=True)
    assert gradgradcheck(fn, (x, w, b), fast_mode=True, check_fwd_over_rev=name in ("plain NCHW", "reference"),
                         check_batched_grad=True)
    if name in KERNEL_PATHS and _fused.available():
        assert kernel_calls, "the fused kernels did not run"
    else:
        assert not kernel_calls


def test_gradcheck_functional_at_kernel_size(kernel_calls):
    x = _input(BIG, {}, torch.float64).requires_grad_()
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.rand(4, dtype=torch.float64, requires_grad=True)
    for impl in ("auto", "reference"):
        fn = lambda x, w, b: bn.functional.batch_norm(x, None, None, w, b, True, impl=impl)  # noqa: E731
        assert gradcheck(fn, (x, w, b), fast_mode=True, check_forward_ad=True, check_batched_grad=True)
        assert gradgradcheck(fn, (x, w, b), fast_mode=True, check_batched_grad=True)
    assert bool(kernel_calls) == _fused.available()


# -- double backward: a gradient penalty ----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cl", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("impl", ["auto", "reference", "torch"])
def test_gradient_penalty_conv_bn_matches_torch(dtype, cl, impl, kernel_calls):
    """Was: gx had no graph, half of torch's d/dconv.weight (0.00614 vs 0.01223) and no
    bn.weight.grad on the fused path; "Expected a proper Tensor but got None" with paper."""
    grads = []
    for make in (lambda: bn.BatchNorm2d(4, impl=impl), lambda: nn.BatchNorm2d(4)):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), make()).to(dtype)
        x = _input((16, 3, 32, 32), {"cl": cl}, dtype).requires_grad_()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        y = model(x)
        g = _input(y.shape, {}, dtype, seed=5)
        (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
        gx.square().sum().backward()
        grads.append((model[0].weight.grad, model[1].weight.grad, model[1].bias.grad))
    (conv_o, w_o, b_o), (conv_t, w_t, b_t) = grads
    assert conv_o is not None and w_o is not None
    for ours, theirs in ((conv_o, conv_t), (w_o, w_t)):
        # float32: second derivatives of sums over 65,536 values, rounded differently
        scale = float(theirs.abs().max())
        tol = dict(rtol=2e-3, atol=1e-3 * scale) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12 * scale)
        torch.testing.assert_close(ours, theirs, **tol)
    assert b_t is None and (b_o is None or not b_o.any())  # dx does not depend on beta
    assert bool(kernel_calls) == (impl == "auto" and _fused.available())


@pytest.mark.parametrize("name,factory,shape,opts", [p for p in PATHS if p[0] in (
    "ghost", "ghost channels_last", "renorm", "masked")], ids=["ghost", "ghost channels_last", "renorm", "masked"])
def test_double_backward_variants_match_reference(name, factory, shape, opts):
    """A penalty on the input gradient, for the variants torch.nn lacks: against autograd
    through the float64 formula."""
    m = _make(factory)
    mask = _mask(shape) if opts.get("mask") else None
    x = _input(shape, opts)
    results = []
    for fn, dt in ((_our_fn(m, opts, mask), torch.float32), (_ref_module_fn(name, m, mask), torch.float64)):
        xi = x.to(dt).requires_grad_()
        w = m.weight.detach().to(dt).requires_grad_()
        b = m.bias.detach().to(dt).requires_grad_()
        y = fn(xi, w, b)
        g = _input(y.shape, {}, dt, seed=5)
        (gx,) = torch.autograd.grad(y, xi, g, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (xi, w)))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours.double(), ref, rtol=2e-3, atol=1e-3 * float(ref.abs().max()))


# -- forward-mode AD ------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cl", [False, True], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_forward_ad_tangents_match_torch(affine, cl, dtype, impl):
    """Was: NotImplementedError (fused path and paper), and a silent None tangent with
    affine=False. Running statistics are updated as in a plain training step."""
    x = _input(BIG, {"cl": cl}, dtype)
    t = _input(BIG, {}, dtype, seed=7)
    results = []
    for m in (bn.BatchNorm2d(4, affine=affine, impl=impl).to(dtype), nn.BatchNorm2d(4, affine=affine).to(dtype)):
        with fwAD.dual_level():
            primal, tangent = fwAD.unpack_dual(m(fwAD.make_dual(x, t)))
        assert tangent is not None
        results.append((primal, tangent, m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)))
    for ours, theirs in zip(*results):
        if isinstance(ours, int):
            assert ours == theirs
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,factory,shape,opts", PATHS, ids=IDS)
def test_forward_ad_every_path(name, factory, shape, opts):
    m = _make(factory)
    mask = _mask(shape) if opts.get("mask") else None
    x, t = _input(shape, opts), _input(shape, {}, seed=7)
    with fwAD.dual_level():
        _, tangent = fwAD.unpack_dual(_call(m, fwAD.make_dual(x, t), opts, mask))
    ref = _ref_module_fn(name, m, mask)
    _, want = torch.func.jvp(lambda x: ref(x, m.weight.detach().double(), m.bias.detach().double()),
                             (x.double(),), (t.double(),))
    torch.testing.assert_close(tangent.double(), want, rtol=1e-4, atol=1e-4)


# -- torch.func: vmap, jacrev, jvp ----------------------------------------------------------

def test_vmap_jacrev_jvp_without_running_stats_match_torch():
    """Was: "Cannot access data pointer of Tensor that doesn't have storage"."""
    ours, ref = bn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(4, track_running_stats=False)
    X = torch.randn(3, 16, 4, 32, 32)
    torch.testing.assert_close(torch.func.vmap(ours)(X), torch.func.vmap(ref)(X), rtol=1e-5, atol=1e-5)
    x, t = X[0], torch.randn(16, 4, 32, 32)
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (t,))[1], torch.func.jvp(ref, (x,), (t,))[1],
                               rtol=1e-5, atol=1e-5)
    small = torch.randn(4, 3, 2, 2)
    o, r = bn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3, track_running_stats=False)
    torch.testing.assert_close(torch.func.jacrev(o)(small), torch.func.jacrev(r)(small), rtol=1e-5, atol=1e-5)
    po, pr = dict(o.named_parameters()), dict(r.named_parameters())
    jo = torch.func.jacrev(lambda p: torch.func.functional_call(o, p, (small,)))(po)
    jr = torch.func.jacrev(lambda p: torch.func.functional_call(r, p, (small,)))(pr)
    for k in jo:
        torch.testing.assert_close(jo[k], jr[k], rtol=1e-5, atol=1e-5)
    # Per-sample gradients (vmap over grad), the functorch idiom.
    xs = torch.randn(5, 8, 3, 3, 3)
    loss_o = lambda p, x: torch.func.functional_call(o, p, (x,)).square().sum()  # noqa: E731
    loss_r = lambda p, x: torch.func.functional_call(r, p, (x,)).square().sum()  # noqa: E731
    go = torch.func.vmap(torch.func.grad(loss_o), in_dims=(None, 0))(po, xs)
    gr = torch.func.vmap(torch.func.grad(loss_r), in_dims=(None, 0))(pr, xs)
    for k in go:
        torch.testing.assert_close(go[k], gr[k], rtol=1e-4, atol=1e-4)


def test_vmap_functional_and_variants():
    X = torch.randn(3, 16, 4, 32, 32)
    f = lambda x: bn.functional.batch_norm(x, None, None, training=True)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(f)(X),
                               torch.func.vmap(lambda x: nn.functional.batch_norm(x, None, None, training=True))(X),
                               rtol=1e-5, atol=1e-5)
    ghost = bn.BatchNorm2d(4, track_running_stats=False, virtual_batch_size=4)
    want = torch.stack([torch.cat([nn.functional.batch_norm(c, None, None, ghost.weight, ghost.bias, True)
                                   for c in x.split(4)]) for x in X])
    torch.testing.assert_close(torch.func.vmap(ghost)(X), want, rtol=1e-5, atol=1e-5)


# -- is_grads_batched -----------------------------------------------------------------------

@pytest.mark.parametrize("name,factory,shape,opts", PATHS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_is_grads_batched(name, factory, shape, opts, dtype):
    """Was: "Cannot access data pointer of Tensor that doesn't have storage" (also
    gradcheck's batched check). Each batched gradient equals the unbatched one."""
    m = _make(factory, dtype)
    mask = _mask(shape) if opts.get("mask") else None
    x = _input(shape, opts, dtype).requires_grad_()
    y = _call(m, x, opts, mask)
    V = torch.stack([_input(shape, {}, dtype, seed=s) for s in (11, 12)])
    batched = torch.autograd.grad(y, (x, m.weight, m.bias), V, is_grads_batched=True, retain_graph=True)
    for i in range(2):
        single = torch.autograd.grad(y, (x, m.weight, m.bias), V[i], retain_graph=True)
        for a, b in zip(batched, single):
            torch.testing.assert_close(a[i], b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    if name in ("plain NCHW", "reference"):
        ref = nn.BatchNorm2d(4).to(dtype)
        ref.load_state_dict(m.state_dict())
        xr = x.detach().clone().requires_grad_()
        want = torch.autograd.grad(ref(xr), (xr, ref.weight), V, is_grads_batched=True)
        for a, b in zip(batched, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


# -- outputs modifiable in place ------------------------------------------------------------

@pytest.mark.parametrize("name,factory,shape,opts", PATHS, ids=IDS)
def test_output_modifiable_in_place(name, factory, shape, opts):
    """Was, with impl="reference": "Output 0 of View is a view and is being modified inplace"
    (every model with ReLU(inplace=True) or x += shortcut)."""
    m = _make(factory)
    mask = _mask(shape) if opts.get("mask") else None
    x = _input(shape, opts)
    grads = []
    for inplace in (True, False):
        xi = x.clone().requires_grad_()
        y = _call(copy.deepcopy(m), xi, opts, mask)
        y = y.add_(1.0).relu_() if inplace else torch.relu(y + 1.0)  # x += shortcut; ReLU(inplace=True)
        y.square().sum().backward()  # (not invariant: the ReLU cuts)
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1])


# -- torch.jit.trace and torch.export in train mode -----------------------------------------

_TRACE_WARNINGS = pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")


@_TRACE_WARNINGS
@pytest.mark.parametrize("name,factory,shape,opts", [p for p in PATHS if p[0] != "reference"] + [
    ("momentum None", lambda: bn.BatchNorm2d(4, momentum=None), BIG, {}),
    ("renorm schedule", lambda: bn.BatchRenorm2d(4), BIG, {})], ids=[p[0] for p in PATHS if p[0] != "reference"] + [
    "momentum None", "renorm schedule"])
def test_jit_trace_train_mode_keeps_updating(name, factory, shape, opts):
    """Was: ctypes.ArgumentError at fused sizes, and at small sizes a traced module that
    silently stopped updating its running statistics. The traced module must give the
    eager module's outputs, gradients and running statistics step after step."""
    m = _make(factory)
    if name.startswith("renorm"):
        m.momentum = 0.1
    eager = copy.deepcopy(m)
    mask = _mask(shape) if opts.get("mask") else None
    example = (_input(shape, opts),) + ((mask,) if mask is not None else ())
    traced = torch.jit.trace(m, example, check_trace=False)
    eager(*example)  # the trace ran one step
    for step in range(3):
        x = _input(shape, opts, seed=20 + step) * (1 + step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = traced(xa, *example[1:])
        yb = eager(xb, *example[1:])
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        g = _input(shape, {}, seed=40 + step)  # (sum y^2 of a normalized y is nearly constant in x)
        ga = torch.autograd.grad(ya, (xa, m.weight), g)
        gb = torch.autograd.grad(yb, (xb, eager.weight), g)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, buf), getattr(eager, buf), rtol=1e-5, atol=1e-6)
    assert int(m.num_batches_tracked) == 4


def _call_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def test_export_train_mode_node_count_and_numerics():
    """Was: 549 graph nodes for resnet18 against torch's 89. A ResNet-style block: ours
    may add at most 3x torch.nn's nodes per BN layer, and the exported program must
    compute the eager module's output and update the same buffers."""
    def block(norm):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(inplace=True),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False), norm(8), nn.ReLU())
    x = torch.randn(8, 3, 32, 32)
    counts = {}
    for key, norm in (("torch", nn.BatchNorm2d), ("ours", bn.BatchNorm2d), ("none", lambda c: nn.Identity())):
        torch.manual_seed(0)
        model = block(norm).train()
        eager = copy.deepcopy(model)
        ep = torch.export.export(model, (x,))
        counts[key] = len(_call_nodes(ep.graph_module))
        if key == "ours":
            exported = ep.module()
            for step in range(2):
                xi = torch.randn(8, 3, 32, 32) * (step + 1)
                torch.testing.assert_close(exported(xi), eager(xi), rtol=1e-5, atol=1e-5)
            state = exported.state_dict()
            for k, v in eager.state_dict().items():
                torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)
            assert int(state["1.num_batches_tracked"]) == 2
    per_bn_torch = (counts["torch"] - counts["none"]) / 2
    per_bn_ours = (counts["ours"] - counts["none"]) / 2
    assert per_bn_ours <= 3 * per_bn_torch, counts


@pytest.mark.parametrize("make", [lambda: bn.BatchNorm2d(4, virtual_batch_size=2),
                                  lambda: bn.BatchRenorm2d(4, r_max=1.5, d_max=0.5)], ids=["ghost", "renorm"])
def test_export_variants(make):
    torch.manual_seed(0)
    m = make().train()
    eager = copy.deepcopy(m)
    x = torch.randn(8, 4, 6, 6)
    ep = torch.export.export(m, (x,))
    exported = ep.module()
    for step in range(2):
        xi = torch.randn(8, 4, 6, 6) + step
        torch.testing.assert_close(exported(xi), eager(xi), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported.state_dict()["running_var"], eager.running_var)
