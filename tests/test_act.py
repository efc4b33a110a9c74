"""BatchNormAct1d/2d/3d: act(BN(x) + residual) against torch.nn's BN followed by the same
activation; the in-place mode against the out-of-place one; model tools."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as tF
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm as bn

ACTS = {"identity": ({}, lambda y: y), "relu": ({}, tF.relu),
        "leaky_relu": ({"negative_slope": 0.2}, lambda y: tF.leaky_relu(y, 0.2)),
        "elu": ({"alpha": 0.7}, lambda y: tF.elu(y, 0.7)), "silu": ({}, tF.silu),
        "gelu": ({"approximate": "tanh"}, lambda y: tF.gelu(y, approximate="tanh"))}
INPLACE = ["identity", "leaky_relu", "elu"]
SHAPES = {"small": (4, 6, 5, 5), "fused": (16, 16, 16, 16)}  # 65,536 elements: the kernels' sizes
# The fused kernels' autograd nodes: in training (statistics in the same kernel call) and eval.
FUSED = ("_FusedBNActTrainBackward", "_FusedBNActBackward")


def _pair(act, c, inplace=False, **kw):
    ours = bn.BatchNormAct2d(c, act=act, act_kwargs=ACTS[act][0], inplace=inplace, **kw).double()
    theirs = nn.BatchNorm2d(c).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())  # a torch.nn checkpoint loads
    return ours, theirs


@pytest.mark.parametrize("size,memory_format", [("small", torch.contiguous_format), ("fused", torch.contiguous_format),
                                                ("fused", torch.channels_last)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("act", ACTS)
def test_matches_torch_bn_then_activation_over_steps(act, residual, size, memory_format):
    shape = SHAPES[size]
    ours, theirs = _pair(act, shape[1])
    f = ACTS[act][1]
    for step in range(2):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + step).to(memory_format=memory_format)
        r = torch.randn(shape, dtype=torch.float64) if residual else None
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ra, rb = (r.clone().requires_grad_(), r.clone().requires_grad_()) if residual else (None, None)
        ya = ours(xa, ra)
        yb = f(theirs(xb) + rb) if residual else f(theirs(xb))
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        g = torch.randn(shape, dtype=torch.float64)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
        if residual:
            torch.testing.assert_close(ra.grad, rb.grad, rtol=1e-9, atol=1e-10)
        for p, q in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 2
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours.eval()(x), f(theirs.eval()(x)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("act", INPLACE)
@pytest.mark.parametrize("training", [True, False])
def test_inplace_equals_out_of_place(act, residual, size, training):
    shape = SHAPES[size]
    out, _ = _pair(act, shape[1])
    inp = copy.deepcopy(out)
    inp.inplace = True
    out.train(training)
    inp.train(training)
    for _ in range(2):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        r = torch.randn(shape, dtype=torch.float64, requires_grad=True) if residual else None
        ya = out(x * 1.5, r)
        h = x * 1.5
        yb = inp(h, r)
        assert yb.data_ptr() == h.data_ptr()  # written over its input
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-10)
        g = torch.randn(shape, dtype=torch.float64)
        grads_a = torch.autograd.grad(ya, [x, out.weight, out.bias] + ([r] if residual else []), g)
        grads_b = torch.autograd.grad(yb, [x, inp.weight, inp.bias] + ([r] if residual else []), g)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(inp.running_mean, out.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inp.running_var, out.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_and_gradgradcheck(act, inplace, residual):
    if inplace and act not in INPLACE:
        pytest.skip("in place only for invertible activations")
    m = bn.BatchNormAct1d(2, act=act, act_kwargs=ACTS[act][0], inplace=inplace).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, r):
        return _functional(m, x, w, b, r if residual else None)

    args = (x, w, b, r)
    # forward AD and batched gradients (the costly checks) with the residual (under forward
    # AD the layer runs out of place)
    assert gradcheck(f, args, check_forward_ad=residual, check_batched_grad=residual)
    if inplace:  # the in-place backward has first derivatives only, and says so
        with pytest.raises(RuntimeError, match="first derivatives only"):
            gradgradcheck(f, args)
    else:
        assert gradgradcheck(f, args, check_batched_grad=residual)


def _functional(m, x, w, b, r):
    """The module's computation with w, b as differentiable inputs and x cloned first (the
    in-place mode overwrites its input)."""
    saved = m._parameters["weight"], m._parameters["bias"]
    m._parameters["weight"], m._parameters["bias"] = w, b
    try:
        return m(x * 1.0, r)
    finally:
        m._parameters["weight"], m._parameters["bias"] = saved


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_inplace_refuses_non_invertible_activations(act):
    with pytest.raises(ValueError, match="leaky_relu"):
        bn.BatchNormAct2d(4, act=act, inplace=True)


def test_inplace_error_cases_change_nothing():
    with pytest.raises(ValueError, match="negative_slope > 0"):
        bn.BatchNormAct2d(4, act="leaky_relu", act_kwargs={"negative_slope": 0.0}, inplace=True)
    with pytest.raises(TypeError, match="takes no alpha"):
        bn.BatchNormAct2d(4, act="relu", act_kwargs={"alpha": 1.0})
    with pytest.raises(ValueError, match="act must be one of"):
        bn.BatchNormAct2d(4, act="tanh")
    m = bn.BatchNormAct2d(4, act="leaky_relu", inplace=True)
    leaf = torch.randn(2, 4, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        m(leaf)
    with torch.no_grad():
        m.weight[1] = 0
    x = torch.randn(2, 4, 3, 3)
    before = x.clone()
    with pytest.raises(ValueError, match="gamma"):
        m(x)
    torch.testing.assert_close(x, before)  # nothing overwritten
    assert m.num_batches_tracked == 0
    with pytest.raises(ValueError, match="residual"):
        bn.BatchNormAct2d(4, act="elu", inplace=True)(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3))


def test_inplace_saves_only_the_output():
    m = bn.BatchNormAct2d(8, act="leaky_relu", inplace=True)
    x = torch.randn(8, 8, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = x * 2
        m(h)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == h.data_ptr()  # the output, in the input's storage


def test_fx_fold_convert_and_sync_keep_the_activation():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = bn.BatchNormAct2d(4, act="leaky_relu", act_kwargs={"negative_slope": 0.1})
            self.other = bn.BatchNormAct2d(4, act="elu")

        def forward(self, x):
            return self.other(self.bn(self.conv(x), x), x)

    model = Block()
    model(torch.randn(8, 4, 6, 6))
    gm = fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "bn", "other"]
    model.eval()
    x = torch.randn(2, 4, 6, 6)
    folded = bn.fold(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    kinds = {type(m).__name__ for m in folded.modules()}
    assert "FoldedAct" in kinds and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    converted = bn.convert(copy.deepcopy(model), nonfinite="raise")
    assert type(converted.bn) is bn.BatchNormAct2d and converted.bn.act == "leaky_relu"
    assert converted.bn.nonfinite == "raise"
    torch.testing.assert_close(converted(x), model(x))
    synced = bn.convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced.bn) is bn.BatchNormAct2d and synced.bn.sync
    torch.testing.assert_close(synced(x), model(x))


def test_population_statistics_and_freeze_with_inplace():
    m = bn.BatchNormAct2d(4, act="leaky_relu", inplace=True, momentum=0.3)
    ref = nn.BatchNorm2d(4, momentum=None)
    batches = [torch.randn(8, 4, 5, 5) + i for i in range(3)]
    bn.population_statistics(m, [b.clone() for b in batches])
    for b in batches:
        ref(b)
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    bn.freeze(m)
    m.train()
    x = torch.randn(8, 4, 5, 5)
    expected = tF.leaky_relu(ref.eval()(x), 0.01)
    torch.testing.assert_close(m(x.clone()), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_float32_at_fused_size(inplace, memory_format):
    """float32 (the kernels' main dtype) at 65,536 elements, with a residual: ours against
    torch's BN + leaky_relu, both modes."""
    shape = SHAPES["fused"]
    theirs = nn.BatchNorm2d(shape[1])
    ours = bn.BatchNormAct2d(shape[1], act="leaky_relu", act_kwargs={"negative_slope": 0.2}, inplace=inplace)
    ours.load_state_dict(theirs.state_dict())
    x = (torch.randn(shape) * 3 + 1).to(memory_format=memory_format).requires_grad_()
    r = torch.randn(shape, requires_grad=True)
    y = ours(x * 1.0, r)
    ref = tF.leaky_relu(theirs(x * 1.0) + r, 0.2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(shape)
    got = torch.autograd.grad(y, [x, r, ours.weight, ours.bias], g)
    want = torch.autograd.grad(ref, [x, r, theirs.weight, theirs.bias], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


# -- the fused kernels (every activation, on float32/float64 CPU tensors) ----------------------

KERNEL_ACTS = list(ACTS)


def _same_grads(y, want, mod, mod_want, x, r, tol):
    """The gradients of y (through ``mod``) and of want (through ``mod_want``) for one random
    dy, with respect to x, each module's weight and bias, and the residual r if any."""
    g = torch.randn_like(y)
    extra = [] if r is None else [r]
    got = torch.autograd.grad(y, [x, mod.weight, mod.bias] + extra, g)
    expected = torch.autograd.grad(want, [x, mod_want.weight, mod_want.bias] + extra, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype,memory_format", [(torch.float64, torch.contiguous_format),
                                                 (torch.float32, torch.channels_last),
                                                 (torch.float32, torch.contiguous_format)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_fused_kernels_run_and_match_torch(act, residual, memory_format, dtype):
    """At the kernels' size the layer runs the fused kernels (its grad_fn says so) and equals
    torch's BN + activation over train steps and in eval: outputs, every gradient, running
    statistics."""
    ours, theirs = _pair(act, 16)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for step, train in enumerate([True, True, False]):
        ours.train(train)
        theirs.train(train)
        x = (torch.randn(SHAPES["fused"], dtype=dtype) * 2 + 0.5).to(memory_format=memory_format)
        x.requires_grad_()
        r = torch.randn(SHAPES["fused"], dtype=dtype, requires_grad=True) if residual else None
        y = ours(x, r)
        assert type(y.grad_fn).__name__ in FUSED
        assert y.is_contiguous(memory_format=memory_format)
        z = theirs(x) + (r if residual else 0)
        want = ACTS[act][1](z)
        torch.testing.assert_close(y, want, **tol)
        _same_grads(y, want, ours, theirs, x, r, tol)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("act,residual,memory_format,kw", [
    ("relu", True, torch.contiguous_format, None), ("relu", False, torch.channels_last, None),
    ("leaky_relu", True, torch.channels_last, None), ("leaky_relu", False, torch.contiguous_format, None),
    ("identity", True, torch.contiguous_format, None), ("elu", True, torch.contiguous_format, None),
    ("silu", False, torch.channels_last, None), ("gelu", True, torch.channels_last, None),
    ("gelu", True, torch.channels_last, {}), ("gelu", False, torch.contiguous_format, {})])
def test_fused_kernels_gradcheck_at_fused_size(act, residual, memory_format, kw):
    """gradcheck and gradgradcheck (fast mode: one random projection) at 65,536 elements, with
    batched gradients and, for the first derivative, forward AD; train and eval; every
    activation on the kernels (``kw`` None: ACTS' arguments; {}: the defaults, exact gelu)."""
    m = bn.BatchNormAct2d(16, act=act, act_kwargs=ACTS[act][0] if kw is None else kw).double()
    _kernel_gradchecks(m, SHAPES["fused"], memory_format, residual)


def _kernel_gradchecks(m, shape, memory_format, residual):
    """gradcheck (forward AD, batched gradients) and gradgradcheck, fast mode, of the layer ``m``
    on the kernels, train and eval, with w, b as inputs (and the residual if ``residual``)."""
    x = (torch.randn(shape, dtype=torch.float64) * 2).to(memory_format=memory_format).requires_grad_()
    r = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)

    def f(x, w, b, r):
        return _functional(m, x, w, b, r if residual else None)

    for train in (True, False):
        m.train(train)
        assert type(f(x, w, b, r).grad_fn).__name__ in FUSED
        assert gradcheck(f, (x, w, b, r), fast_mode=True, check_forward_ad=True, check_batched_grad=True)
        assert gradgradcheck(f, (x, w, b, r), fast_mode=True, check_batched_grad=True)


@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_reference_path_gradcheck(act):
    """impl="reference" takes torch operations (no kernels) and differentiates alike."""
    m = bn.BatchNormAct2d(3, act=act, act_kwargs=ACTS[act][0], impl="reference").double()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b, r: _functional(m, x, w, b, r)
    assert type(f(x, w, b, r).grad_fn).__name__ not in FUSED
    assert gradcheck(f, (x, w, b, r), fast_mode=True, check_batched_grad=True)
    assert gradgradcheck(f, (x, w, b, r), fast_mode=True)


def test_relu_gradient_is_zero_where_relu_cut_it_even_for_nan():
    """As torch's threshold_backward: a NaN gradient where the pre-activation is <= 0 does not
    reach BN's sums, so dx stays finite and equal to torch's."""
    ours, theirs = _pair("relu", 16)
    x = torch.randn(SHAPES["fused"], dtype=torch.float64, requires_grad=True)
    y = ours(x)
    want = torch.relu(theirs(x))
    g = torch.randn_like(y)
    g[want == 0] = float("nan")
    got = torch.autograd.grad(y, x, g)[0]
    expect = torch.autograd.grad(want, x, g)[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("act", KERNEL_ACTS)
def test_eval_gradient_of_an_infinite_input_is_torchs(act, residual, memory_format, dtype):
    """In eval dL/dx = gamma * invstd * dz, finite where x is infinite for the piecewise-linear
    kinds and elu (torch's too): the kernels' training formula, whose x term has a zero
    coefficient in eval, would give 0 * inf = NaN there. silu and gelu have torch's NaN there
    (their derivative's z * (1 - sigmoid(z)) is inf * 0), ours too."""
    ours, theirs = _pair(act, 16)
    ours.to(dtype).eval(), theirs.to(dtype).eval()
    with torch.no_grad():
        theirs.running_mean.uniform_(-1, 1)
        theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(SHAPES["fused"], dtype=dtype).to(memory_format=memory_format)
    x[0, 0, 0, 0], x[1, 2, 3, 4] = float("inf"), -float("inf")
    r = torch.randn_like(x) if residual else None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ours(xa, r) if residual else ours(xa)
    z = theirs(xb) + r if residual else theirs(xb)
    want = ACTS[act][1](z)
    g = torch.randn_like(x)
    (got,) = torch.autograd.grad(y, xa, g)
    (expect,) = torch.autograd.grad(want, xb, g)
    if act in ("identity", "relu", "leaky_relu", "elu"):  # torch's finite here; silu', gelu' are inf * 0
        assert torch.isfinite(expect).all()
    assert torch.equal(torch.isfinite(got), torch.isfinite(expect))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expect, rtol=tol, atol=tol, equal_nan=True)


def test_residual_that_broadcasts_takes_torch_operations():
    """A residual of another shape (broadcast) or dtype is not the kernels' case: torch
    operations, with torch's broadcasting and type promotion."""
    ours, theirs = _pair("relu", 16)
    x = torch.randn(SHAPES["fused"], dtype=torch.float64)
    for r in (torch.randn(1, 16, 1, 1, dtype=torch.float64), torch.randn(SHAPES["fused"], dtype=torch.float32)):
        y = ours(x, r)
        assert type(y.grad_fn).__name__ not in FUSED
        torch.testing.assert_close(y, torch.relu(theirs(x) + r))


def test_kernel_boundary_refuses_bad_buffers():
    """The kernels' Python boundary checks what the C code would read: a mask of the wrong
    dtype or strides, a residual of the wrong shape, a non-finite slope or alpha, an unknown
    activation code, a combination the kernels do not run."""
    from batchnorm import _fused
    if not _fused.available():
        pytest.skip("kernels not built here")
    x = torch.randn(4, 8, 6, 6)
    lay = _fused.layout(x)
    a, b, mu = torch.ones(8), torch.zeros(8), torch.zeros(8)
    with pytest.raises(ValueError, match="residual"):
        _fused.act_forward(x, lay, a, b, 0.0, torch.randn(4, 8, 6))
    with pytest.raises(ValueError, match="slope must be finite"):
        _fused.act_forward(x, lay, a, b, float("nan"))
    _, mask = _fused.act_forward(x, lay, a, b, 0.0, torch.randn_like(x), want_mask=True)
    assert mask.dtype == torch.uint8 and mask.stride() == x.stride()
    for bad in (mask.to(torch.int32), mask.t() if mask.dim() == 2 else mask.transpose(2, 3), mask[:2]):
        with pytest.raises(ValueError, match="activation mask"):
            _fused.act_sums(torch.randn_like(x), x, lay, a, b, 0.0, bad, mu)
    with pytest.raises(ValueError, match="should contain 8 elements"):
        _fused.act_grad(torch.randn_like(x), x, lay, torch.ones(3), b, 0.0, None, a, b, b, True, False)
    # the smooth activations: what their kernels do not take (in place: elu only; no mask; dz from act_sums)
    with pytest.raises(ValueError, match="alpha must be finite"):
        _fused.act_forward(x, lay, a, b, 0.0, kind=_fused.ELU, act_alpha=float("inf"))
    with pytest.raises(ValueError, match="unknown activation code"):
        _fused.act_forward(x, lay, a, b, 0.0, kind=7)
    with pytest.raises(ValueError, match="invertible"):
        _fused.act_forward(x.clone(), lay, a, b, 0.0, inplace=True, kind=_fused.SILU)
    with pytest.raises(ValueError, match="mask is for the piecewise-linear"):
        _fused.act_forward(x, lay, a, b, 0.0, torch.randn_like(x), want_mask=True, kind=_fused.GELU)
    mask = torch.ones_like(x, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not a mask"):
        _fused.act_sums(torch.randn_like(x), x, lay, a, b, 0.0, mask, mu, kind=_fused.GELU)
    with pytest.raises(ValueError, match="comes from act_sums"):
        _fused.act_grad(torch.randn_like(x), x, lay, a, b, 0.0, None, a, b, b, True, False, kind=_fused.SILU)
    with pytest.raises(ValueError, match="invertible"):
        _fused.act_sums(torch.randn_like(x), x, lay, None, None, 0.0, None, mu, output=True, kind=_fused.GELU)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("kind,slope,residual", [("LINEAR", 0.0, False), ("LINEAR", 0.1, True), ("SILU", 0.0, True),
                                                 ("ELU", 0.0, False)])
def test_one_call_training_kernels_match_the_passes(kind, slope, residual, memory_format):
    """act_train_forward (statistics, coefficients, activation in one call) against the
    statistics pass and act_forward with the coefficients in float64; act_train_backward
    against act_sums then act_grad / grad_input with Section 3's coefficients. 65,536
    float64 values: every thread runs. Then what the one-call boundary refuses."""
    from batchnorm import _fused
    if not _fused.available():
        pytest.skip("kernels not built here")
    code = getattr(_fused, kind)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(16, 16, 16, 16, generator=g, dtype=torch.float64) * 2 + 3).to(memory_format=memory_format)
    r = torch.randn(x.shape, generator=g, dtype=torch.float64).to(memory_format=memory_format) if residual else None
    w, b = torch.rand(16, generator=g, dtype=torch.float64) + 0.5, torch.randn(16, generator=g, dtype=torch.float64)
    lay, m = _fused.layout(x), x.numel() // 16
    linear = code == _fused.LINEAR
    y, mask, st, coef, finite = _fused.act_train_forward(x, lay, w, b, 1e-3, m / (m - 1), slope, r,
                                                         want_mask=residual and linear, kind=code)
    mean, var = _fused.stats(x, lay)
    invstd = torch.rsqrt(var + 1e-3)
    scale, shift = w * invstd, b - mean * w * invstd
    y_ref, mask_ref = _fused.act_forward(x, lay, scale, shift, slope, r, want_mask=residual and linear, kind=code)
    assert finite and st.shape == (1, 3, 16) and coef.shape == (2, 16)
    torch.testing.assert_close(st[0], torch.stack((mean, invstd, var * m / (m - 1))), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coef, torch.stack((scale, shift)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert mask is None if mask_ref is None else torch.equal(mask, mask_ref)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(memory_format=memory_format)
    res = None if linear else r
    dx, dw, db, dz = _fused.act_train_backward(dy, x, lay, w, st, coef, slope, mask, res, True, True, True, residual,
                                               kind=code)
    sums, dz_smooth = _fused.act_sums(dy, x, lay, coef[0], coef[1], slope, mask, st[0, 0], res, kind=code)
    k = invstd * w
    b2 = k * invstd ** 2 * sums[1] / m
    al, be, ga = k, -b2, b2 * st[0, 0] - k * sums[0] / m
    if linear:
        dx_ref, dz_ref = _fused.act_grad(dy, x, lay, coef[0], coef[1], slope, mask, al, be, ga, True, True, kind=code)
    else:
        dz_ref, dx_ref = dz_smooth, torch.empty_like(x)
        _fused.grad_input(dz_smooth, x, lay, al, be, ga, dx_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, sums[1] * invstd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, sums[0], rtol=1e-12, atol=1e-12)
    assert (dz is None) == (not residual) and (dz is None or torch.equal(dz, dz_ref))
    # what the one-call boundary refuses, before the C code reads anything
    with pytest.raises(ValueError, match="statistics"):
        _fused.act_train_backward(dy, x, lay, w, st[..., :8], coef, slope, mask, res, True, True, True, False,
                                  kind=code)
    with pytest.raises(ValueError, match="activation coefficients"):
        _fused.act_train_backward(dy, x, lay, w, st, coef.t().contiguous().t(), slope, mask, res, True, True, True,
                                  False, kind=code)
    with pytest.raises(ValueError, match="should contain 16 elements"):
        _fused.act_train_forward(x, lay, w[:8], b, 1e-3, 1.0, slope, r, kind=code)
    if not linear:
        with pytest.raises(ValueError, match="mask is for the piecewise-linear"):
            _fused.act_train_forward(x, lay, w, b, 1e-3, 1.0, slope, r, want_mask=True, kind=code)


@pytest.mark.parametrize("dtype,memory_format", [(torch.float64, torch.contiguous_format),
                                                 (torch.float32, torch.channels_last)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("act", ["identity", "leaky_relu", "elu"])
@pytest.mark.parametrize("training", [True, False])
def test_inplace_kernels_match_out_of_place(act, residual, memory_format, dtype, training, monkeypatch):
    """In place on the kernels (the backward reads the output, and the residual): the same
    outputs, gradients and running statistics as the out-of-place layer; the kernels ran."""
    from batchnorm import _fused
    calls = []
    real = _fused.act_sums
    monkeypatch.setattr(_fused, "act_sums", lambda *a, **k: calls.append(k.get("output")) or real(*a, **k))
    ours, _ = _pair(act, 16)
    inp = copy.deepcopy(ours)
    inp.inplace = True
    ours, inp = ours.to(dtype).train(training), inp.to(dtype).train(training)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    x = (torch.randn(SHAPES["fused"], dtype=dtype) * 2 + 0.5).to(memory_format=memory_format).requires_grad_()
    r = torch.randn(SHAPES["fused"], dtype=dtype, requires_grad=True) if residual else None
    ya, yb = ours(x * 1.0, r), inp(x * 1.0, r)
    torch.testing.assert_close(yb, ya, **tol)
    _same_grads(yb, ya, inp, ours, x, r, tol)
    torch.testing.assert_close(inp.running_mean, ours.running_mean, **tol)
    assert True in calls  # the in-place backward ran on the kernels (output=True)


def test_inplace_refuses_a_residual_sharing_the_inputs_memory():
    m = bn.BatchNormAct2d(4, act="leaky_relu", inplace=True)
    h = torch.randn(8, 4, 5, 5, requires_grad=True) * 1.0
    before = (m.running_mean.clone(), int(m.num_batches_tracked))
    for r in (h, h[:, :]):
        with pytest.raises(ValueError, match="residual shares the input's memory"):
            m(h, r)
    assert torch.equal(m.running_mean, before[0]) and int(m.num_batches_tracked) == before[1]


@pytest.mark.parametrize("producer", ["relu", "sigmoid", "inplace_bn_act", "view_of_relu", "view_of_leaf"])
def test_inplace_refuses_an_input_its_producer_saved(producer):
    """Overwriting a tensor that the operation producing it saved for its backward would
    corrupt that backward: refused up front, with nothing changed (the input included)."""
    first = bn.BatchNormAct2d(4, act="leaky_relu", inplace=True)
    m = bn.BatchNormAct2d(4, act="leaky_relu", inplace=True)
    h = torch.randn(8, 4, 5, 5, requires_grad=True)
    x = {"relu": lambda: torch.relu(h * 1.0), "sigmoid": lambda: torch.sigmoid(h),
         "inplace_bn_act": lambda: first(h * 1.0), "view_of_relu": lambda: torch.relu(h * 1.0)[:, :],
         "view_of_leaf": lambda: h.view(8, 4, 5, 5)}[producer]()
    before, state = x.detach().clone(), {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="leaf tensor" if producer == "view_of_leaf" else "saved the input"):
        m(x)
    assert torch.equal(x.detach(), before)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())


def test_inplace_accepts_a_producer_that_saved_other_tensors():
    """A convolution saves its input and weight, not its output: in place is fine, and the
    gradients equal the out-of-place layer's."""
    torch.manual_seed(0)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(8, 4, 9, 9, dtype=torch.float64)
    grads = []
    for inplace in (True, False):
        m = bn.BatchNormAct2d(4, act="leaky_relu", inplace=inplace).double()
        y = m(torch.nn.functional.conv2d(h, w, padding=1))
        (gw,) = torch.autograd.grad((y * y).sum(), w)
        grads.append(gw)
    torch.testing.assert_close(grads[0], grads[1])


# -- the smooth activations on the kernels (elu, silu, gelu with erf or tanh) -------------------

SMOOTH = {"elu": ({"alpha": 0.7}, lambda z: tF.elu(z, 0.7)), "silu": ({}, tF.silu), "gelu": ({}, tF.gelu),
          "gelu_tanh": ({"approximate": "tanh"}, lambda z: tF.gelu(z, approximate="tanh"))}


def _smooth_pair(name, c, dtype, **kw):
    kwargs, f = SMOOTH[name]
    ours = bn.BatchNormAct2d(c, act=name.split("_")[0], act_kwargs=kwargs, **kw).to(dtype)
    theirs = nn.BatchNorm2d(c).to(dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, f


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name", ["elu", "silu", "gelu"])
def test_smooth_kernels_run_and_match_torch(name, residual, dtype, memory_format):
    """elu, silu and exact gelu at the kernels' size run the fused kernels (the grad_fn says
    so) and equal torch's BatchNorm2d + the activation over two training steps and in eval:
    outputs, the input's, weight's, bias's and residual's gradients, running statistics."""
    ours, theirs, f = _smooth_pair(name, 16, dtype)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-10}
    for train in (True, True, False):
        ours.train(train)
        theirs.train(train)
        x = (torch.randn(SHAPES["fused"], dtype=dtype) * 2 + 0.5).to(memory_format=memory_format).requires_grad_()
        r = torch.randn(SHAPES["fused"], dtype=dtype, requires_grad=True) if residual else None
        y = ours(x, r)
        assert type(y.grad_fn).__name__ in FUSED
        assert y.is_contiguous(memory_format=memory_format)
        want = f(theirs(x) + (r if residual else 0))
        torch.testing.assert_close(y, want, **tol)
        _same_grads(y, want, ours, theirs, x, r, tol)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2


@pytest.mark.parametrize("shape,memory_format", [((4, 3, 67, 83), torch.contiguous_format),
                                                  ((64, 21, 7, 7), torch.contiguous_format),
                                                  ((2, 300, 11, 11), torch.channels_last),
                                                  ((2, 24, 37, 37), torch.channels_last)],
                         ids=["nchw-long", "nchw-short", "cl-wide", "cl-narrow"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("name,inplace", [("elu", False), ("elu", True), ("silu", False), ("gelu", False),
                                          ("gelu_tanh", False)])
def test_smooth_kernels_across_chunk_boundaries(name, inplace, residual, shape, memory_format):
    """The smooth kinds run in chunks of 256 values, each a flat range of whole or partial rows:
    NCHW rows of 5561 values (several chunks per row) and of 49 (several rows per chunk, and
    rows across chunk ends), channels_last rows of 300 channels and of 24, give torch's
    outputs, gradients and running statistics, in float64, out of place and (elu) in place."""
    ours, theirs, f = _smooth_pair(name, shape[1], torch.float64, inplace=inplace)
    tol = {"rtol": 1e-9, "atol": 1e-10}
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        x0 = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(memory_format=memory_format).requires_grad_()
        r = torch.randn(shape, dtype=torch.float64, requires_grad=True) if residual else None
        x = x0.clone() if inplace else x0  # in place overwrites a non-leaf
        y = ours(x, r)
        assert type(y.grad_fn).__name__ in FUSED + ("_InplaceBNActBackward",)
        want = f(theirs(x0) + (r if residual else 0))
        torch.testing.assert_close(y, want, **tol)
        _same_grads(y, want, ours, theirs, x0, r, tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)


@pytest.mark.parametrize("shape,memory_format", [((4, 3, 67, 83), torch.contiguous_format),
                                                  ((64, 21, 7, 7), torch.contiguous_format),
                                                  ((2, 300, 11, 11), torch.channels_last)],
                         ids=["nchw-long", "nchw-short", "cl-wide"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_piecewise_linear_kernels_on_long_and_short_rows(act, residual, shape, memory_format):
    """The gradient sums (NCHW: an image at a time over the thread's channels; with a residual
    from the sign mask, in chunks of 256) on rows of 5561 and 49 values and on 300 channels:
    torch's outputs, gradients and running statistics in float64."""
    kwargs = {"negative_slope": 0.2} if act == "leaky_relu" else {}
    ours = bn.BatchNormAct2d(shape[1], act=act, act_kwargs=kwargs).double()
    theirs = nn.BatchNorm2d(shape[1]).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    f = ACTS[act][1] if act == "relu" else (lambda z: tF.leaky_relu(z, 0.2))
    tol = {"rtol": 1e-9, "atol": 1e-10}
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    r = torch.randn(shape, dtype=torch.float64, requires_grad=True) if residual else None
    y = ours(x, r)
    assert type(y.grad_fn).__name__ in FUSED
    want = f(theirs(x) + (r if residual else 0))
    torch.testing.assert_close(y, want, **tol)
    _same_grads(y, want, ours, theirs, x, r, tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)


@pytest.mark.parametrize("shape", [(5, 512, 5, 5), (3, 40, 27, 23), (7, 7, 61, 19), (2, 16, 47, 47)],
                         ids=["c512-125rows", "c40-1863rows", "c7", "c16"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "identity"])
def test_piecewise_linear_float_channels_last_without_residual(act, shape):
    """The float32 channels-last gradient sums and dx without a residual (the sign recomputed
    from x; AVX-512 builds: four rows at a time in 16-lane vectors) on widths with and without
    a partial vector, fewer than 16 channels, and row counts that are not multiples of four,
    within and beyond one block of 256 rows: outputs and gradients against torch's float64 BN
    + activation of the same input."""
    kwargs = {"negative_slope": 0.2} if act == "leaky_relu" else {}
    f = {"relu": tF.relu, "leaky_relu": lambda z: tF.leaky_relu(z, 0.2), "identity": lambda z: z}[act]
    ours = bn.BatchNormAct2d(shape[1], act=act, act_kwargs=kwargs)
    theirs = nn.BatchNorm2d(shape[1]).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in theirs.state_dict().items()})
    x = (torch.randn(shape) * 2 + 0.5).to(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = ours(x)
    assert type(y.grad_fn).__name__ in FUSED
    want = f(theirs(x64))
    tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, want.float(), **tol)
    g = torch.randn(shape).to(memory_format=torch.channels_last)
    got = torch.autograd.grad(y, [x, ours.weight, ours.bias], g)
    expected = torch.autograd.grad(want, [x64, theirs.weight, theirs.bias], g.double())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.float(), **tol)


@pytest.mark.parametrize("dtype,shape", [(torch.float64, (8, 32, 64, 64)), (torch.float32, (16, 32, 64, 64))],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("act,residual,inplace", [("relu", False, False), ("relu", True, False),
                                                  ("leaky_relu", True, True), ("gelu", True, False)])
def test_streamed_outputs_equal_torch(act, residual, inplace, memory_format, dtype, shape):
    """Outputs of 8 MiB and more (y, dx, the residual's gradient) are computed in chunks and
    streamed out with non-temporal stores: torch's values, also in place over an input whose
    data does not start on a cache line (a view one element into its storage)."""
    kwargs = {"negative_slope": 0.2} if act == "leaky_relu" else {}
    ours = bn.BatchNormAct2d(shape[1], act=act, act_kwargs=kwargs, inplace=inplace).to(dtype)
    theirs = nn.BatchNorm2d(shape[1]).to(dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    f = {"relu": tF.relu, "leaky_relu": lambda z: tF.leaky_relu(z, 0.2), "gelu": tF.gelu}[act]
    n, (N, C, H, W) = torch.Size(shape).numel(), shape

    def misaligned(t):  # the values from one element into t's storage, in memory_format's layout
        t = t[1:]
        return t.view(shape) if memory_format == torch.contiguous_format else t.view(N, H, W, C).permute(0, 3, 1, 2)

    # Values at least 0.5 from 0, the residual's of x's sign, bias 0: the pre-activation is far
    # from the kink, where float32's rounding (our fma, torch's multiply and add) could differ
    # in sign over two million values and so in the gradient.
    sign = torch.randn(n + 1, dtype=dtype).sign()
    leaf = (sign * (0.5 + torch.randn(n + 1, dtype=dtype).abs())).requires_grad_()
    twin = leaf.detach().clone().requires_grad_()
    r = None
    if residual:
        r = misaligned(sign * (0.5 + torch.randn(n + 1, dtype=dtype).abs())).clone(memory_format=memory_format)
        r.requires_grad_()
    x = misaligned(leaf * 1.0 if inplace else leaf)  # in place overwrites a non-leaf view
    assert x.data_ptr() % 64 and x.is_contiguous(memory_format=memory_format)
    y = ours(x, r)
    # The reference in float64 (float32's per-channel gradient sums over 65,536 values differ
    # from each other by a few 1e-4 in any two summation orders, torch's included)
    theirs.double()
    rr = None if r is None else r.double()
    want = f(theirs(misaligned(twin.double())) + (rr if residual else 0))
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, want.to(dtype), **tol)
    g = torch.randn_like(y)
    extra = [] if r is None else [r]
    for k, (a, b) in enumerate(zip(torch.autograd.grad(y, [leaf, ours.weight, ours.bias] + extra, g),
                                   torch.autograd.grad(want, [twin, theirs.weight, theirs.bias] + extra, g.double()))):
        if k in (1, 2) and dtype == torch.float32:
            # dweight and dbias are sums over 65,536 terms of size about 1: a channel's sum that
            # cancels to 0.7 carries the rounding of terms that sum to hundreds elsewhere (torch's
            # own float32 misses its float64 by 1.7e-4 here), so the bound scales with the largest.
            torch.testing.assert_close(a, b.to(dtype), rtol=1e-4, atol=max(1e-4, 2e-6 * float(b.abs().max())))
        else:
            torch.testing.assert_close(a, b.to(dtype), **tol)


@pytest.mark.parametrize("name,residual", [("gelu", False), ("gelu", True), ("elu", False), ("silu", True),
                                           ("gelu_tanh", False)])
def test_smooth_kernels_gradcheck_small(name, residual):
    """gradcheck (with forward AD and batched gradients) and gradgradcheck at a small size, train
    and eval: the kernels' first derivative and the torch-operation double backward agree with
    finite differences of the kernels' forward (test_gradcheck_and_gradgradcheck checks every
    activation in training, in full mode; here a random projection)."""
    m = bn.BatchNormAct2d(3, act=name.split("_")[0], act_kwargs=SMOOTH[name][0]).double()
    _kernel_gradchecks(m, (4, 3, 3, 3), torch.contiguous_format, residual)


_SPECIAL = [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e30, -1e30, 800.0, -800.0, 90.0, -90.0, -40.0,
            -12.0, 1e-40, -1e-40, 5e-324, -5e-324]


def _with_specials(shape, dtype, memory_format):
    """Random values with the special ones at the start, inside and at the end of the rows."""
    t = torch.randn(shape, dtype=dtype)
    flat = t.view(-1)
    vals = torch.tensor(_SPECIAL, dtype=dtype)
    for start in (0, 37, 1000, flat.numel() - len(_SPECIAL)):
        flat[start:start + len(_SPECIAL)] = vals
    return t.to(memory_format=memory_format)


@pytest.mark.parametrize("dtype,memory_format", [(torch.float32, torch.contiguous_format),
                                                 (torch.float64, torch.channels_last)], ids=["f32", "f64-cl"])
@pytest.mark.parametrize("name", list(SMOOTH))
def test_smooth_kernels_nan_and_inf_as_torch(name, dtype, memory_format):
    """NaN, +-inf, huge, subnormal and signed-zero values give torch's results: in eval through
    x (outputs and dx, elementwise), in training through the residual (outputs, and every
    gradient: a NaN dz spreads over its channel's dx as in torch's BN backward)."""
    ours, theirs, f = _smooth_pair(name, 16, dtype)
    ours.eval()
    theirs.eval()
    x = _with_specials(SHAPES["fused"], dtype, memory_format).requires_grad_()
    y, want = ours(x), f(theirs(x))
    assert type(y.grad_fn).__name__ in FUSED
    torch.testing.assert_close(y, want, equal_nan=True)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x, g)[0], equal_nan=True)
    ours.train()
    theirs.train()
    x = torch.randn(SHAPES["fused"], dtype=dtype).to(memory_format=memory_format).requires_grad_()
    r = _with_specials(SHAPES["fused"], dtype, memory_format).requires_grad_()
    y, want = ours(x, r), f(theirs(x) + r)
    torch.testing.assert_close(y, want, equal_nan=True, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(y, [x, r, ours.weight, ours.bias], g)
    expected = torch.autograd.grad(want, [x, r, theirs.weight, theirs.bias], g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-5)


def test_smooth_activation_with_residual_saves_x_and_the_residual_only():
    """With a residual, a smooth activation's backward recomputes z from x and the residual:
    the full-size tensors autograd keeps are those two (no copy, no z, no output)."""
    m = bn.BatchNormAct2d(8, act="silu")
    x = torch.randn(8, 8, 16, 16, requires_grad=True)
    r = torch.randn(8, 8, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = m(x, r)
    big = {t.data_ptr() for t in saved if t.numel() == x.numel()}
    assert big == {x.data_ptr(), r.data_ptr()} and y.data_ptr() not in big


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parameter_gradients_are_their_own_tensors(dtype):
    """As torch.nn's: weight.grad and bias.grad are fresh tensors, not views of a buffer of
    the backward's (the float64 sums' rows were handed out as they were)."""
    m = bn.BatchNormAct2d(16).to(dtype)
    x = torch.randn(SHAPES["fused"], dtype=dtype, requires_grad=True)
    m(x).sum().backward()
    assert m.weight.grad._base is None and m.bias.grad._base is None
    assert m.bias.grad.untyped_storage().nbytes() == 16 * m.bias.grad.element_size()
