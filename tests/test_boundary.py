"""The safe boundary (issue 15, item 5): every tensor handed to the C kernels is checked
first, converted copies live until the call returns, a mismatch raises torch.nn's kind of
error before any state changes, on every path; negative views are read by value; the
running variance keeps torch's precision. Each test is one of the issue's reproductions."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import batchnorm as bn
from batchnorm import functional as F

# (name, factory, input shape, forward kwargs): one entry per path of the modules. Shapes
# of 32,768 elements and more take the fused kernels for plain BN; ghost batches, Batch
# Renormalization and masks take them at any size; impl="reference" and "torch" never do.
PATHS = [
    ("plain small", lambda: bn.BatchNorm1d(16), (32, 16), {}),
    ("plain kernels NCHW", lambda: bn.BatchNorm2d(16), (8, 16, 16, 16), {}),
    ("plain kernels channels_last", lambda: bn.BatchNorm2d(16), (8, 16, 16, 16), {"cl": True}),
    ("torch", lambda: bn.BatchNorm2d(16, impl="torch"), (8, 16, 16, 16), {}),
    ("reference", lambda: bn.BatchNorm2d(16, impl="reference"), (4, 16, 4, 4), {}),
    ("ghost", lambda: bn.BatchNorm2d(16, virtual_batch_size=2), (4, 16, 4, 4), {}),
    ("ghost paper", lambda: bn.BatchNorm2d(16, virtual_batch_size=2, impl="reference"), (4, 16, 4, 4), {}),
    ("renorm", lambda: bn.BatchRenorm1d(16), (8, 16), {}),
    ("renorm 2d", lambda: bn.BatchRenorm2d(16, r_max=2.0, d_max=1.0), (4, 16, 4, 4), {}),
    ("renorm paper", lambda: bn.BatchRenorm2d(16, impl="reference"), (4, 16, 4, 4), {}),
    ("masked", lambda: bn.BatchNorm1d(16), (4, 16, 9), {"mask": True}),
    ("masked paper", lambda: bn.BatchNorm1d(16, impl="reference"), (4, 16, 9), {"mask": True}),
    ("sync, no group", lambda: bn.SyncBatchNorm(16), (4, 16, 4, 4), {}),
    ("momentum None", lambda: bn.BatchNorm2d(16, momentum=None), (8, 16, 16, 16), {}),
]
IDS = [p[0] for p in PATHS]


def _input(shape, kw, dtype=torch.float32):
    x = torch.randn(*shape, dtype=dtype) * 2 + 1
    if kw.get("cl"):
        x = x.to(memory_format=torch.channels_last)
    return x


def _call(m, x, kw):
    if kw.get("mask"):
        mask = torch.ones(x.size(0), x.size(2), dtype=torch.bool)
        mask[:, -2:] = False
        return m(x, mask)
    return m(x)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_state(m, before):
    after = m.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), f"{k} changed by a call that raised"


def _raises_unchanged(m, x, kw, match):
    before = _state(m)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match) as info:
        _call(m, x, kw)
    _assert_state(m, before)
    return info.value


# -- use-after-free: converted copies must outlive the kernel call -------------------------

def test_strided_weight_functional():
    """A non-contiguous weight is converted into a copy whose pointer the kernel reads; the
    copy must live until the call returns (was: values off by 2.3e38)."""
    torch.manual_seed(0)
    x = torch.randn(512, 80)
    w = (torch.rand(160) + .5)[::2]
    for _ in range(3):  # a freed copy's memory is reused by the next allocation
        out = F.batch_norm(x, None, None, w, None, training=True)
        torch.testing.assert_close(out, nn.functional.batch_norm(x, None, None, w, None, training=True))


@pytest.mark.parametrize("name,factory,shape,kw", PATHS, ids=IDS)
def test_strided_parameters_and_buffers(name, factory, shape, kw):
    """Every path with weight, bias and running buffers that are strided views: the answer
    of the same module with contiguous copies."""
    m, ref = factory(), factory()
    c = m.num_features
    for key, fill in (("weight", torch.rand(2 * c) + .5), ("bias", torch.randn(2 * c))):
        setattr(m, key, nn.Parameter(fill[::2]))
        setattr(ref, key, nn.Parameter(fill[::2].clone()))
    m.running_mean = torch.randn(2 * c)[::2]
    m.running_var = (torch.rand(2 * c) + .5)[::2]
    ref.running_mean = m.running_mean.clone()
    ref.running_var = m.running_var.clone()
    assert not m.weight.is_contiguous() and not m.running_mean.is_contiguous()
    x = _input(shape, kw)
    for _ in range(2):
        torch.testing.assert_close(_call(m, x, kw), _call(ref, x, kw))
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    torch.testing.assert_close(m.running_var, ref.running_var)


# -- mixed dtypes raise as torch.nn does, before any state changes --------------------------

@pytest.mark.parametrize("name,factory,shape,kw", PATHS, ids=IDS)
@pytest.mark.parametrize("case", ["float64 input, float32 module", "float32 input, float64 module"])
def test_mixed_dtype_raises(name, factory, shape, kw, case):
    """torch.nn raises "mixed dtype" (a RuntimeError); ours raises a MismatchError, a
    ValueError and a RuntimeError, with the state unchanged (was: garbage outputs, e.g.
    BatchRenorm1d(3) gave 2.07e-309, from a freed float64 copy of float32 parameters)."""
    m = factory()
    if case.startswith("float64 input"):
        x = _input(shape, kw, torch.float64)
    else:
        m = m.double()
        x = _input(shape, kw)
    err = _raises_unchanged(m, x, kw, "mixed dtype")
    assert isinstance(err, bn.MismatchError) and isinstance(err, RuntimeError) and isinstance(err, ValueError)
    torch_m = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(16)
    if case.startswith("float32 input"):
        torch_m = torch_m.double()
    with pytest.raises(RuntimeError, match="mixed dtype"):
        torch_m(x)
    m.eval()
    _raises_unchanged(m, x, {k: v for k, v in kw.items() if k != "mask"}, "mixed dtype")


def test_half_input_with_float32_module_is_allowed():
    """torch.nn accepts float16/bfloat16 input into float32 parameters (statistics in
    float32): so do we, on every path."""
    for name, factory, shape, kw in PATHS:
        for dt in (torch.float16, torch.bfloat16):
            m, ref = factory(), factory()
            x = _input(shape, kw).to(dt)
            y = _call(m, x, kw)
            assert y.dtype == dt, name
            torch.testing.assert_close(y.float(), _call(ref, x.float(), kw), atol=5e-2, rtol=5e-2)


# -- wrong sizes: out-of-bounds writes ------------------------------------------------------

@pytest.mark.parametrize("name,factory,shape,kw", PATHS, ids=IDS)
@pytest.mark.parametrize("key,size", [("running_mean", 1), ("running_var", 1), ("running_mean", 17),
                                      ("weight", 2), ("bias", 32)])
def test_wrong_size_raises(name, factory, shape, kw, key, size):
    """A parameter or buffer of the wrong size raises torch.nn's "<name> should contain 16
    elements not <n>" before anything is written (was: 15 floats written past the end of a
    1-element running_mean)."""
    m = factory()
    if key in ("weight", "bias"):
        setattr(m, key, nn.Parameter(torch.ones(size)))
    else:
        setattr(m, key, torch.ones(size))
    x = _input(shape, kw)
    _raises_unchanged(m, x, kw, f"{key} should contain 16 elements not {size}")
    m.eval()
    _raises_unchanged(m, x, {k: v for k, v in kw.items() if k != "mask"}, f"{key} should contain 16 elements not {size}")


def test_functional_wrong_sizes_and_dtypes():
    x = torch.randn(64, 16, 32)  # 32,768 elements: the fused kernels
    for rm, rv, w, b, match in [
        (torch.zeros(1), torch.ones(16), None, None, "running_mean should contain 16 elements not 1"),
        (torch.zeros(16), torch.ones(16), torch.ones(3), None, "weight should contain 16 elements not 3"),
        (torch.zeros(16), torch.ones(16, dtype=torch.long), None, None, "mixed dtype"),
        (torch.zeros(16), torch.ones(16, dtype=torch.float64), None, None, "mixed dtype"),
        (torch.zeros(16), torch.ones(16), torch.ones(16, dtype=torch.float16), None, "mixed dtype"),
        (torch.zeros(16), torch.ones(16, device="meta"), None, None, "meta"),
        (torch.zeros(16), torch.ones(1).expand(16), None, None, "in place"),
    ]:
        for impl in ("auto", "torch", "reference"):
            for xi in (x, x[:4]):
                rm0, rv0 = rm.clone(), rv.clone()
                with pytest.raises(bn.MismatchError, match=match):
                    F.batch_norm(xi, rm, rv, w, b, training=True, impl=impl)
                assert torch.equal(rm, rm0) and (rv.is_meta or torch.equal(rv, rv0)), (match, impl)


def test_functional_int64_running_var_changes_nothing():
    """Was: running_mean updated, then a raise."""
    x = torch.randn(8, 4)
    rm, rv = torch.zeros(4), torch.ones(4, dtype=torch.long)
    nbt = torch.tensor(0)
    for impl in ("auto", "torch", "reference"):
        with pytest.raises(RuntimeError, match="mixed dtype"):
            F.batch_norm(x, rm, rv, training=True, impl=impl, num_batches_tracked=nbt)
        assert torch.equal(rm, torch.zeros(4)) and int(nbt) == 0


def test_paper_failure_changes_no_state():
    """Was: a failing impl="reference" call incremented num_batches_tracked and updated
    running_mean, then raised."""
    m = bn.BatchNorm1d(4, impl="reference")
    m.running_var = torch.ones(4, dtype=torch.long)
    _raises_unchanged(m, torch.randn(8, 4), {}, "mixed dtype")
    m = bn.BatchNorm1d(4, impl="reference")
    m.num_batches_tracked = torch.tensor(True)
    _raises_unchanged(m, torch.randn(8, 4), {}, "num_batches_tracked")


@pytest.mark.parametrize("name,factory,shape,kw", PATHS, ids=IDS)
def test_bad_counter_changes_no_state(name, factory, shape, kw):
    """A counter that cannot be incremented (here a bool) raises, and nothing changes."""
    m = factory()
    m.num_batches_tracked = torch.tensor(True)
    _raises_unchanged(m, _input(shape, kw), kw, "num_batches_tracked")


def test_huge_channel_count_with_one_element_buffer_does_not_crash():
    """C = 2^20 with a 1-element running_mean: the process was killed (segfault, or glibc's
    "free(): corrupted unsorted chunks"). In a subprocess, so that a crash fails this test
    instead of the run."""
    code = textwrap.dedent("""
        import torch, batchnorm as bn
        for impl in ("auto", "torch", "reference"):
            m = bn.BatchNorm1d(1 << 20, impl=impl)
            m.running_mean = torch.zeros(1)
            try:
                m(torch.randn(4, 1 << 20))
            except RuntimeError as e:
                assert "running_mean should contain 1048576 elements not 1" in str(e), e
            else:
                raise AssertionError("no error")
            assert m.running_mean.numel() == 1 and float(m.running_mean) == 0.0 and int(m.num_batches_tracked) == 0
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


# -- negative views are read by value -------------------------------------------------------

@pytest.mark.parametrize("name,factory,shape,kw", PATHS, ids=IDS)
def test_negative_view_input(name, factory, shape, kw):
    """torch._neg_view(x) holds x in memory and means -x (was: read as x, output off by up
    to 8.4, running_mean of the wrong sign); also as the incoming gradient."""
    m, ref = factory(), factory()
    x = _input(shape, kw)
    xn = torch._neg_view(x.clone()).requires_grad_()
    xr = (-x).requires_grad_()
    assert xn.is_neg()
    y, yr = _call(m, xn, kw), _call(ref, xr, kw)
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    g = torch.randn_like(yr)
    y.backward(torch._neg_view(g.clone()))
    yr.backward(-g)
    torch.testing.assert_close(xn.grad, xr.grad)
    # sums over 2,048 float32 values per channel, in another order on each side (the kernels
    # read one, torch's the other; torch's order depends on its thread count): a sign error
    # is off by tens
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)


def test_negative_view_weight():
    x = torch.randn(512, 80)
    w = torch.rand(80) + .5
    out = F.batch_norm(x, None, None, torch._neg_view(w.clone()), None, training=True)
    torch.testing.assert_close(out, nn.functional.batch_norm(x, None, None, -w, None, training=True))


# -- running_var keeps torch's precision ----------------------------------------------------

@pytest.mark.parametrize("name,factory,shape,kw", PATHS, ids=IDS)
def test_running_var_precision_large_eps(name, factory, shape, kw):
    """running_var was recomputed as 1/invstd^2 - eps on the small-input and native paths:
    relative error 9.8e-3 at eps 0.1 and variance 1e-6 (torch: 3.4e-7)."""
    m = factory()
    m.eps = 0.1
    if m.momentum is not None:
        m.momentum = 1.0  # running_var = the batch's unbiased variance, nothing else to round
    x = _input(shape, kw) * 1e-3
    _call(m, x, kw)
    xd = x.double()
    if kw.get("mask"):
        xd = xd[:, :, :-2]
    if m.virtual_batch_size:
        parts = xd.split(m.virtual_batch_size)
        var = torch.stack([p.transpose(0, 1).reshape(16, -1).var(dim=1) for p in parts]).mean(0)
    else:
        var = xd.transpose(0, 1).reshape(16, -1).var(dim=1)
    rel = ((m.running_var.double() - var) / var).abs().max()
    assert rel < 1e-5, float(rel)


def test_kernel_argument_structs_are_filled_by_their_field_names():
    """A ctypes Structure takes an unknown keyword (or attribute) silently, as a Python
    attribute, leaving the real field 0: a misspelled argument would reach the kernel as a
    NULL pointer or a zero size. Every struct filled in batchnorm._fused names only its
    fields (read from the source, so that no call pays for the check)."""
    import ast
    import inspect

    from batchnorm import _fused, _jit

    structs = {s.__name__: {name for name, _ in s._fields_} for s, _ in _jit.ENTRY_POINTS.values()}
    tree = ast.parse(inspect.getsource(_fused))
    checked = 0
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        bound = {}  # local name -> struct name
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in structs:
                fields = structs[node.func.id]
                assert len(node.args) <= len(fields), (fn.name, node.func.id)
                for kw in node.keywords:
                    assert kw.arg in fields, f"{fn.name}: {node.func.id} has no field {kw.arg!r}"
                checked += 1
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name) and node.value.func.id in structs):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        bound[t.id] = node.value.func.id
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                for a in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id in bound:
                        assert a.attr in structs[bound[a.value.id]], f"{fn.name}: {bound[a.value.id]} has no " \
                                                                     f"field {a.attr!r}"
                        checked += 1
    assert checked >= len(structs)  # every struct is filled somewhere


@pytest.mark.parametrize("trigger", ["empty", "empty_like"])
@pytest.mark.parametrize("act", [None, "relu"], ids=["bn", "bn-relu"])
def test_buffers_replaced_during_the_step_get_the_update_as_torch(trigger, act):
    # A torch function mode runs user code inside the step, between the check of the running
    # buffers and the kernel's update: here it gives running_mean new memory (at the step's
    # first torch.empty or torch.empty_like). The update must land in the buffer the module
    # holds when the kernel runs, as torch.nn's does, never in the storage it had before.
    c = 64
    x = torch.randn(32, c, 8, 8) + 5                          # 131,072 elements: the fused kernels
    ours = bn.BatchNorm2d(c) if act is None else bn.BatchNormAct2d(c, act=act)
    old = ours.running_mean.detach()                          # keeps the old storage alive

    class Swap(TorchFunctionMode):
        done = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is getattr(torch, trigger) and not Swap.done:
                Swap.done = True
                ours.running_mean.data = torch.zeros(c)
            return func(*args, **(kwargs or {}))

    with Swap():
        ours(x)
    assert Swap.done
    theirs = nn.BatchNorm2d(c)
    theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert torch.equal(old, torch.zeros(c)) and int(ours.num_batches_tracked) == 1


def test_a_default_device_context_does_not_reach_the_kernels():
    # Under `with torch.device("meta")` (or set_default_device), factory calls without a
    # device make meta tensors; the buffers the kernel boundary makes must stay on the CPU.
    # It crashed the process once (a meta pointer written by the kernel): in a subprocess.
    code = textwrap.dedent("""
        import torch, batchnorm as bn
        from torch import nn
        x = torch.randn(32, 64, 8, 8).to(memory_format=torch.channels_last)
        for ours, theirs in ((bn.BatchNorm2d(64), nn.BatchNorm2d(64)),
                             (bn.BatchNorm2d(64, track_running_stats=False),
                              nn.BatchNorm2d(64, track_running_stats=False)),
                             (bn.BatchNormAct2d(64, act="relu"), nn.Sequential(nn.BatchNorm2d(64), nn.ReLU()))):
            xs = [x.clone().requires_grad_() for _ in range(2)]
            with torch.device("meta"):
                y = ours(xs[0])
            want = theirs(xs[1])
            assert y.device.type == "cpu"
            torch.testing.assert_close(y, want)
            g = torch.randn_like(y)
            y.backward(g)
            want.backward(g)
            torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
            t = theirs if isinstance(theirs, nn.BatchNorm2d) else theirs[0]
            if t.running_mean is not None:
                torch.testing.assert_close(ours.running_mean, t.running_mean)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])
