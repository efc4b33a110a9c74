"""The fused CPU kernels (src/batchnorm/_kernels.c, built on first use) and the paths that
choose them: parity with torch.nn on inputs large enough to take them, gradcheck, large-mean
stability in every layout, the non-finite guard, the small-input path, and the fallback
when no kernels can be built."""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm import _fused, _jit, _operator, _stats
from batchnorm import functional as F


def _need_kernels():
    if _jit._compiler() is None:
        pytest.skip("no C compiler on this machine: the kernels cannot be built (torch operations are used)")
    assert _jit.kernels() is not None, _jit.status()  # a compiler that cannot build them is a failure


# Shapes above F._FUSED_MIN_NUMEL (fused kernels) in each layout, and one below (torch's
# kernel plus our check). (name, shape, channels_last)
BIG = [("rows", (8, 8, 24, 24), False), ("channels_last", (8, 8, 24, 24), True), ("matrix", (4096, 16), False),
       ("rows 3d", (64, 8, 100), False),
       # channels-innermost widths: whole rows in registers (C=16, 64, 80; 72 with its last
       # vector masked), plus one vector through scratch (C=256); over 256 (statistics in
       # 64-channel register blocks, gradient sums streamed), 512 + 16; over 256 and not a
       # multiple of 16 (the portable loop)
       ("channels_last C=256", (4, 256, 6, 6), True), ("matrix C=256", (512, 256), False),
       ("channels_last C=80", (8, 80, 8, 8), True), ("channels_last C=72", (8, 72, 8, 8), True),
       ("channels_last C=528", (2, 528, 6, 6), True), ("matrix C=512", (80, 512), False),
       ("channels_last C=300", (2, 300, 8, 8), True),
       # rows of 72 channels are not whole vectors: outputs streamed through coefficient tapes
       ("channels_last C=72, streamed", (8, 72, 64, 64), True),
       # 8 MiB and more: outputs written with non-temporal stores
       ("rows, streamed", (8, 64, 64, 64), False), ("channels_last, streamed", (8, 64, 64, 64), True)]


def _train_both(a, b, x, g, *args):
    """One training step of modules ``a`` and ``b`` on copies of ``x`` (extra forward args
    ``args``), backward with ``g``: (output of a, of b, input gradient of a, of b)."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa, *args), b(xb, *args)
    ya.backward(g)
    yb.backward(g)
    return ya, yb, xa.grad, xb.grad


def _make(shape, cl=False, scale=2.0, offset=1.0):
    x = torch.randn(*shape) * scale + offset
    return x.to(memory_format=torch.channels_last) if cl else x


@pytest.mark.parametrize("name,shape,cl", BIG, ids=[b[0] for b in BIG])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_path_matches_torch(name, shape, cl, momentum):
    _need_kernels()
    assert F.fast_layout(_make(shape, cl)) is not None and torch.Size(shape).numel() >= F._FUSED_MIN_NUMEL
    ours = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(shape[1], momentum=momentum)
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1], momentum=momentum)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    for _ in range(3):
        x = _make(shape, cl)
        g = torch.randn(*shape)
        ya, yb, ga, gb = _train_both(ours, ref, x, g)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        assert ya.is_contiguous(memory_format=torch.channels_last) == cl
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
        # Parameter gradients are sums over m values per channel; both sides round them in
        # float32, so the tolerance grows with their size (m = 32768 in the streamed shapes).
        for a, b in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-4, 2e-6 * b.abs().max().item()))
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval()
    ref.eval()
    x = _make(shape, cl)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,cl", [((3, 4, 5, 6), False), ((3, 4, 5, 6), True), ((7, 5), False), ((4, 3, 9), False)])
def test_fused_function_gradcheck(shape, cl):
    _need_kernels()
    x = torch.randn(*shape, dtype=torch.float64)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.rand(shape[1], dtype=torch.float64, requires_grad=True)
    lay = _fused.layout(x)
    assert lay is not None
    # The operator's fused path (the kernels read this layout, no mask, no ranks).
    f = lambda x, w, b: _operator.BatchNormFunction.apply(x, w, b, None, None, None, _operator.Plan())[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("shape,cl", [((64, 3, 16, 16), False), ((64, 3, 16, 16), True), ((20000, 3), False),
                                      ((16, 3, 8, 8), True), ((2000, 3), False), ((64, 256, 3, 3), True),
                                      ((300, 512), False), ((1000, 128), False)],
                         ids=["rows", "channels_last", "matrix", "small channels_last", "small matrix",
                              "channels_last C=256", "matrix C=512", "matrix C=128"])
@pytest.mark.usefixtures("kernel_mode")
def test_large_mean_is_stable_in_every_layout(shape, cl):
    # torch's own kernel sums channels_last and (N, C) inputs naively in float32; mean 1e4
    # then costs it about 1e-2 of a standard deviation. Ours must stay within 2e-3.
    x64 = torch.randn(*shape, dtype=torch.float64) + 1e4
    x = x64.float()
    if cl:
        x = x.to(memory_format=torch.channels_last)
    dims = tuple(d for d in range(x.dim()) if d != 1)
    ref = (x.double() - x.double().mean(dims, keepdim=True)) / torch.sqrt(
        x.double().var(dims, unbiased=False, keepdim=True) + 1e-5)
    m = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(shape[1])
    y = m(x.clone().requires_grad_())
    assert (y.double() - ref).abs().max() < 2e-3
    torch.testing.assert_close(m.running_mean.double(), 0.9 * 0 + 0.1 * x.double().mean(dims), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(8, 8, 24, 24), (16, 8, 5)], ids=["fused", "small"])
def test_nonfinite_batch_is_rejected(shape):
    _need_kernels()
    m = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(shape[1])
    m(torch.randn(*shape))
    before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    for bad in (float("nan"), float("inf")):
        x = torch.randn(*shape)
        x.view(-1)[5] = bad
        with pytest.warns(bn.NonFiniteBatchWarning):
            m(x)
        for a, b in zip(before, (m.running_mean, m.running_var, m.num_batches_tracked)):
            assert torch.equal(a, b)
    m.nonfinite = "raise"
    x = torch.randn(*shape)
    x.view(-1)[0] = float("nan")
    with pytest.raises(bn.NonFiniteBatchError):
        m(x)


@pytest.mark.parametrize("c", list(range(16, 257, 16)) + [1, 8, 24, 72, 250, 255, 272, 300, 528])
def test_channels_innermost_sums_every_width(c):
    # Each width up to 256 has its own whole-row kernel, the table picking it by C / 16
    # rounded up, the last vector masked when C % 16 != 0 (1 to 255; 250 and 255 put a
    # partial vector through the scratch accumulators); 272 and 528 take the wide paths, 300
    # the portable loop. Statistics and gradient sums against float64, over more than one
    # BLOCK of rows and enough elements that the rows are split between threads
    # (_fused._PARALLEL_MIN).
    _need_kernels()
    rows = 600 + _fused._PARALLEL_MIN // c
    g = torch.Generator().manual_seed(c)
    x = torch.randn(rows, c, generator=g) * 2 + 5
    dy = torch.randn(rows, c, generator=g)
    lay = _fused.layout(x)
    assert lay == (rows, c, 1, 1)
    mean, var = _fused.stats(x, lay)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), x64.var(0, unbiased=False), rtol=1e-5, atol=1e-6)
    sdy, sdyx = _fused.sums(dy, x, lay, mean)
    torch.testing.assert_close(sdy.double(), dy.double().sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sdyx.double(), (dy.double() * (x64 - mean.double())).sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 17, 33])
def test_rows_statistics_and_sums_every_image_count(n, dtype):
    # NCHW statistics and gradient sums sweep a thread's channels ROWS_IMAGES (8) images at a
    # time: image counts below, at and around multiples of it, rows of 13 and 200 values.
    _need_kernels()
    for s in (13, 200):
        g = torch.Generator().manual_seed(n * 1000 + s)
        x = (torch.randn(n, 6, s, generator=g) * 2 + 5).to(dtype)
        dy = torch.randn(n, 6, s, generator=g).to(dtype)
        lay = _fused.layout(x)
        assert lay == (n, 6, s, 0)
        mean, var = _fused.stats(x, lay)
        x64 = x.double()
        tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(mean.double(), x64.mean((0, 2)), **tol)
        torch.testing.assert_close(var.double(), x64.var((0, 2), unbiased=False), **tol)
        sdy, sdyx = _fused.sums(dy, x, lay, mean)
        tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
        torch.testing.assert_close(sdy.double(), dy.double().sum((0, 2)), **tol)
        torch.testing.assert_close(sdyx.double(), (dy.double() * (x64 - mean.double()[:, None])).sum((0, 2)), **tol)


@pytest.mark.parametrize("shape", [(9, 150, 7, 7), (3, 5, 67, 83), (130, 3, 13, 13), (17, 64, 8, 8)])
def test_nchw_training_kernels_in_channel_groups(shape):
    # The NCHW training kernels take a thread's channels in groups (rows_group: as many as fit
    # 512 KiB, at most 64) and each group's sums 8 images at a time: groups of 64 and a
    # remainder, groups of 3 of 5 channels, one group, image counts off multiples of 8. Two
    # training steps in float64 against torch.nn: output, every gradient, running statistics.
    _need_kernels()
    ours, theirs = bn.BatchNorm2d(shape[1], impl="kernels").double(), torch.nn.BatchNorm2d(shape[1]).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):
        x = (torch.randn(*shape, dtype=torch.float64) * (step + 1) + step).requires_grad_()
        xb = x.detach().clone().requires_grad_()
        ya, yb = ours(x), theirs(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        gy = torch.randn_like(ya)
        ya.backward(gy)
        yb.backward(gy)
        for a, b in ((x.grad, xb.grad), (ours.weight.grad, theirs.weight.grad), (ours.bias.grad, theirs.bias.grad),
                     (ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_thread_counts_agree():
    _need_kernels()
    x = torch.randn(16, 8, 32, 32) * 3 + 2
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            m = bn.BatchNorm2d(8)
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.square().sum().backward()
            results.append((y, xi.grad, m.running_var.clone()))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_variants_use_the_kernels_and_match_paper_formulas():
    # Ghost batches and renorm run the per-group kernels; their eager torch-operation
    # fallback (kernels disabled in the subprocess below) is covered by the other tests.
    _need_kernels()
    x = torch.randn(16, 8, 12, 12)
    ghost = bn.BatchNorm2d(8, virtual_batch_size=4)
    y = ghost(x)
    for k in range(4):
        chunk = x[4 * k:4 * k + 4].double()
        ref = (chunk - chunk.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            chunk.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(y[4 * k:4 * k + 4].double(), ref, rtol=1e-4, atol=1e-4)


def test_disabled_kernels_fall_back_to_torch_operations():
    code = ("import torch, batchnorm as bn; from batchnorm import _jit, functional as F;"
            "x = torch.randn(8, 8, 24, 24); m = bn.BatchNorm2d(8); y = m(x);"
            "ref = torch.nn.functional.batch_norm(x, None, None, training=True);"
            "assert F.fast_layout(x) is None; torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5);"
            "print(_jit.status())")
    env = dict(os.environ, BATCHNORM_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "disabled" in out.stdout


def test_bad_compiler_falls_back(tmp_path):
    code = "from batchnorm import _jit; print(_jit.kernels() is None, _jit.status())"
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    bad.chmod(0o755)
    env = dict(os.environ, CC=str(bad), BATCHNORM_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True") and "build failed" in out.stdout


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("kind", ["renorm", "ghost", "renorm+ghost"])
def test_fused_variants_match_torch_operation_path(kind, cl):
    # The fused kernels (impl="auto") against the torch-operation path (impl="reference") over
    # training steps with Batch Renorm's clipping active: outputs, all gradients, buffers.
    _need_kernels()
    kw = {"virtual_batch_size": 4} if "ghost" in kind else {}
    make = (lambda impl: bn.BatchRenorm2d(6, r_max=1.3, d_max=0.4, impl=impl, **kw)) if "renorm" in kind else \
        (lambda impl: bn.BatchNorm2d(6, impl=impl, **kw))
    fused, ref = make("auto"), make("reference")
    with torch.no_grad():
        for m in (fused, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 6))
            m.bias.copy_(torch.linspace(-1, 1, 6))
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
    for step in range(3):
        x = _make((16, 6, 20, 20), cl, scale=1.0 + step, offset=step)
        g = torch.randn(16, 6, 20, 20)
        ya, yb, ga, gb = _train_both(fused, ref, x, g)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (8, 5, 33)), (torch.float64, (8, 5, 33)),
                                         (torch.float32, (8, 64, 4096))], ids=["f32", "f64", "f32 streamed"])
def test_fused_masked_matches_torch_operation_path(dtype, shape):
    # (8, 64, 4096) float32 is 8 MiB: outputs written with non-temporal stores.
    _need_kernels()
    n, c, length = shape
    fused, ref = bn.BatchNorm1d(c, dtype=dtype), bn.BatchNorm1d(c, impl="reference", dtype=dtype)
    with torch.no_grad():
        for m in (fused, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-1, 1, c))
    for step in range(3):
        x = torch.randn(*shape, dtype=dtype) * 3 + 5
        mask = torch.rand(n, length) > 0.4
        g = torch.randn(*shape, dtype=dtype)
        ya, yb, ga, gb = _train_both(fused, ref, x, g, mask)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ya, yb, **tol)
        torch.testing.assert_close(ga, gb, **tol)
        for a, b in ((fused.weight.grad, ref.weight.grad), (fused.bias.grad, ref.bias.grad)):
            # sums over the batch: the float32 tolerance grows with their size
            scaled = dict(tol, atol=max(tol["atol"], 2e-6 * b.abs().max().item())) if dtype == torch.float32 else tol
            torch.testing.assert_close(a, b, **scaled)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name))


@pytest.mark.parametrize("cl", [False, True])
def test_streamed_batch_renorm_matches_torch_operation_path(cl):
    # 8 MiB: the renorm forward and backward kernels write with non-temporal stores.
    _need_kernels()
    fused, ref = (bn.BatchRenorm2d(64, r_max=1.3, d_max=0.4, impl=impl) for impl in ("auto", "reference"))
    with torch.no_grad():
        for m in (fused, ref):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.0)
    x = _make((8, 64, 64, 64), cl, scale=2.0, offset=1.0)
    g = torch.randn(8, 64, 64, 64)
    ya, yb, ga, gb = _train_both(fused, ref, x, g)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(fused.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_fused_masked_gradcheck_and_errors():
    _need_kernels()
    x = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 7) > 0.3
    mask[0, 0] = mask[1, 1] = True
    # The operator's masked-kernel path (contiguous (N, C, L), one group).
    f = lambda x, w, b: _operator.BatchNormFunction.apply(x, w, b, mask, None, None, _operator.Plan())[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    m = bn.BatchNorm1d(2)
    before = m.running_mean.clone()
    with pytest.raises(ValueError, match="no valid position"):
        m(torch.randn(3, 2, 7), torch.zeros(3, 7, dtype=torch.bool))
    one = torch.zeros(3, 7, dtype=torch.bool)
    one[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(3, 2, 7), one)
    assert torch.equal(m.running_mean, before) and int(m.num_batches_tracked) == 0


_ARCH_CHECK = """
import torch, batchnorm as bn
from batchnorm import _jit
from torch import nn
assert _jit.kernels() is not None, _jit.status()
torch.manual_seed(0)
worst = 0.0
for shape, cl in [((8, 64, 20, 20), False), ((8, 64, 20, 20), True), ((4096, 16), False), ((64, 8, 100), False),
                  ((16, 256, 10, 10), True), ((300, 13), False), ((32, 24, 7, 7), False), ((41, 40, 6, 6), True),
                  ((16, 96, 6, 6), True), ((8, 64, 64, 64), True), ((8, 72, 64, 64), True)]:
    ours = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(shape[1])
    ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1])
    x = torch.randn(*shape) * 2 + 1
    if cl:
        x = x.to(memory_format=torch.channels_last)
    g = torch.randn(*shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    ya.backward(g)
    yb.backward(g)
    for a, b in ((ya, yb), (xa.grad, xb.grad), (ours.running_var, ref.running_var)):
        worst = max(worst, (a - b).abs().max().item())
x = torch.randn(8, 5, 33) * 3 + 5
mask = torch.rand(8, 33) > 0.4
for a_mod, b_mod, xx, args in (
        (bn.BatchNorm1d(5), bn.BatchNorm1d(5, impl="reference"), x, (mask,)),
        (bn.BatchNorm2d(6, virtual_batch_size=4), bn.BatchNorm2d(6, virtual_batch_size=4, impl="reference"),
         torch.randn(16, 6, 20, 20), ()),
        (bn.BatchRenorm2d(6, r_max=1.3, d_max=0.4), bn.BatchRenorm2d(6, r_max=1.3, d_max=0.4, impl="reference"),
         torch.randn(16, 6, 20, 20).to(memory_format=torch.channels_last), ())):
    g = torch.randn(*xx.shape)
    xa, xb = xx.clone().requires_grad_(), xx.clone().requires_grad_()
    ya, yb = a_mod(xa, *args), b_mod(xb, *args)
    ya.backward(g)
    yb.backward(g)
    for a, b in ((ya, yb), (xa.grad, xb.grad)):
        worst = max(worst, (a - b).abs().max().item())
for act, kw, res in (("relu", {}, False), ("leaky_relu", {"negative_slope": 0.1}, True)):
    for cl in (False, True):
        ours = bn.BatchNormAct2d(24, act=act, act_kwargs=kw)
        ref = nn.BatchNorm2d(24)
        x = torch.randn(8, 24, 19, 19) * 2 + 1
        r = torch.randn(8, 24, 19, 19)
        if cl:
            x, r = x.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
        g = torch.randn(*x.shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ra, rb = r.clone().requires_grad_(), r.clone().requires_grad_()
        ya = ours(xa, ra) if res else ours(xa)
        zb = ref(xb) + rb if res else ref(xb)
        yb = torch.nn.functional.leaky_relu(zb, 0.1) if act == "leaky_relu" else torch.relu(zb)
        ya.backward(g)
        yb.backward(g)
        pairs = [(ya, yb), (xa.grad, xb.grad), (ours.weight.grad, ref.weight.grad)]
        if res:
            pairs.append((ra.grad, rb.grad))
        for a, b in pairs:
            worst = max(worst, (a - b).abs().max().item())
assert worst < 1e-4, worst
print("ok", worst, _jit._info["isa"])
"""


def test_portable_builds_are_correct_and_cached(tmp_path):
    # This machine builds for its best x86-64 level with OpenMP (x86-64-v4, AVX-512, here);
    # the AVX2 code paths, the portable (plain x86-64) loops and the pthread pool of
    # _kernels.c are built (and said so by the status) and checked too, against torch.nn and
    # impl="reference". Two builds cover them: AVX2 with OpenMP, and the portable loops with
    # the pthread pool (the pool does not depend on the instruction set). Shapes for the AVX2
    # paths: rows with a tail (S = 100, 49), channels-innermost groups of four rows with
    # leftover rows (C = 40, 1476 rows) and C = 16, statistics in groups but gradient sums on
    # the portable loop (C = 64, 96), wider (256) and odd (13) widths on the portable loop, 8 MB
    # channels_last outputs (non-temporal stores; C = 72 through coefficient tapes), and the
    # BN + activation kernels with and without a residual. The builds run at once, each in its
    # own cache directory: most of their time is the compiler's, and on two cores that halves
    # the wait. A second process then finds the portable build in its cache: it loads it
    # without compiling, and the cache holds the library and its hash record, no partial files.
    import platform
    _need_kernels()
    if platform.machine() != "x86_64":
        pytest.skip("x86-64 -march levels")
    expected = {"x86-64-v3": "AVX2+FMA, OpenMP", "x86-64": "portable loops, pthread pool"}
    procs, caches = {}, {}
    for arch in expected:
        caches[arch] = cache = tmp_path / arch
        cache.mkdir()
        # a generous compiler timeout: on a loaded 2-core machine an -O3 build took over 120 s
        env = dict(os.environ, BATCHNORM_CACHE=str(cache), BATCHNORM_CC_TIMEOUT="900", BATCHNORM_MARCH=arch)
        code = _ARCH_CHECK
        if arch == "x86-64":
            code = "from batchnorm import _jit\n_jit._VARIANTS = [[]]\n" + code
        procs[arch] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    try:
        results = {arch: p.communicate(timeout=600) for arch, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for arch, (stdout, stderr) in results.items():
        assert procs[arch].returncode == 0 and stdout.startswith("ok"), f"{arch}: {stdout}{stderr}"
        assert stdout.rstrip().endswith(expected[arch]), f"{arch}: {stdout}"
    # one private directory per user, holding the library and its hash record (tests/test_jit.py)
    cache = caches["x86-64"]
    assert os.listdir(cache) == [f"u{os.geteuid()}"]
    private = cache / f"u{os.geteuid()}"
    files = sorted(os.listdir(private))
    assert len(files) == 2 and files[0].endswith(".so") and files[1] == files[0] + ".sha256", files
    before = os.stat(private / files[0])
    env = dict(os.environ, BATCHNORM_CACHE=str(cache), BATCHNORM_MARCH="x86-64")
    # _jit.py loaded on its own (it needs only the standard library; the same file, so the
    # same source and cache key): the process starts without importing torch.
    code = (f"import importlib.util\nspec = importlib.util.spec_from_file_location('bn_jit_probe', {_jit.__file__!r})\n"
            "_jit = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(_jit)\n"
            "_jit._VARIANTS = [[]]\nprint(_jit.status())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stdout + out.stderr
    # a rebuild would have replaced the file (a new inode: builds are renamed into place)
    after = os.stat(private / files[0])
    assert sorted(os.listdir(private)) == files
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


# -- the kernel interface (batchnorm._fused) ----------------------------------------------

DTYPES = [torch.float32, torch.float64]
DT_IDS = ["f32", "f64"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,cl", [((16, 8, 32, 32), False), ((16, 8, 32, 32), True), ((8192, 8), False)],
                         ids=["rows", "channels_last", "matrix"])
def test_train_forward_statistics_rows_and_buffers(dtype, shape, cl):
    # 131,072 / 65,536 elements: the kernels run on every thread. The third row is
    # var_scale times the biased variance, the scale the caller's (here m / (m - 1), the
    # unbiased variance); invstd and y use the biased one (Algorithm 1).
    _need_kernels()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 3 + 2
    if cl:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.linspace(0.5, 1.5, c, dtype=dtype)
    b = torch.linspace(-1, 1, c, dtype=dtype)
    lay = _fused.layout(x)
    m = x.numel() // c
    dims = tuple(d for d in range(x.dim()) if d != 1)
    x64 = x.double()
    mean, var = x64.mean(dims), x64.var(dims, unbiased=False)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    y, st, finite = _fused.train_forward(x, lay, w, b, 1e-5, var_scale=m / (m - 1))
    assert finite and st.shape == (3, c) and st.dtype == dtype
    torch.testing.assert_close(st[0].double(), mean, **tol)
    torch.testing.assert_close(st[1].double(), torch.rsqrt(var + 1e-5), **tol)
    torch.testing.assert_close(st[2].double(), x64.var(dims, unbiased=True), **tol)
    shape_c = (1, c) + (1,) * (x.dim() - 2)
    ref = (x64 - mean.view(shape_c)) * torch.rsqrt(var + 1e-5).view(shape_c) * w.double().view(shape_c) \
        + b.double().view(shape_c)
    torch.testing.assert_close(y.double(), ref, **tol)
    # var_scale 1: the biased variance; the output does not depend on it
    y1, st1, _ = _fused.train_forward(x, lay, w, b, 1e-5)
    torch.testing.assert_close(st1[2].double(), var, **tol)
    assert torch.equal(y1, y) and torch.equal(st1[:2], st[:2])
    # caller buffers: a (1, 3, C) slice of a larger block, and a flat 3 * C tensor
    block = torch.full((3, 3, c), float("nan"), dtype=dtype)
    out = torch.empty_like(x)
    y2, st2, _ = _fused.train_forward(x, lay, w, b, 1e-5, out=out, st=block[1:2], var_scale=m / (m - 1))
    assert y2 is out and st2.data_ptr() == block[1].data_ptr()
    assert torch.equal(block[1], st) and block[0].isnan().all() and block[2].isnan().all()
    flat = torch.empty(3 * c, dtype=dtype)
    _fused.train_forward(x, lay, w, b, 1e-5, st=flat, var_scale=m / (m - 1))
    assert torch.equal(flat.view(3, c), st)
    for bad in (torch.empty(3, c + 1, dtype=dtype), torch.empty(3, c, dtype=torch.float16 if dtype == torch.float64
                                                                else torch.float64), torch.empty(c, 3, dtype=dtype).t()):
        with pytest.raises(ValueError, match="statistics buffer"):
            _fused.train_forward(x, lay, w, b, 1e-5, st=bad)
    # the backward reads only rows 0 and 1: any third row gives the same gradients
    dy = torch.randn(*shape, generator=g, dtype=dtype)
    grads = _fused.train_backward(dy, x, lay, w, st, True, True, True)
    for third in (st1[2], torch.full((c,), float("nan"), dtype=dtype)):
        other = torch.stack((st[0], st[1], third))
        for a, b_ in zip(grads, _fused.train_backward(dy, x, lay, w, other, True, True, True)):
            assert torch.equal(a, b_)
    _, _, db = _fused.train_backward(dy, x, lay, w, block[1:2], False, False, True)  # a (1, 3, C) block too
    assert torch.equal(db, grads[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_train_forward_reports_nonfinite_statistics(dtype, bad):
    _need_kernels()
    x = torch.randn(64, 4, 16, 16, dtype=dtype)
    x[3, 2, 5, 7] = bad
    _, st, finite = _fused.train_forward(x, _fused.layout(x), None, None, 1e-5, var_scale=2.0)
    assert not finite and not torch.isfinite(st[:, 2]).all() and torch.isfinite(st[:, [0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_train_forward_renorm_reads_running_buffers_only(dtype):
    _need_kernels()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 8, 16, 16, generator=g, dtype=dtype) * 2 + 1
    rm = torch.linspace(-1, 1, 8, dtype=dtype)
    rv = torch.linspace(0.5, 4, 8, dtype=dtype)
    before = (rm.clone(), rv.clone(), rm._version, rv._version)
    rd = torch.empty(2, 8, dtype=dtype)
    _, st, finite = _fused.train_forward(x, _fused.layout(x), None, None, 1e-5, renorm=(rm, rv, 1.5, 0.5, rd))
    assert finite
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]) and (rm._version, rv._version) == before[2:]
    sigma = torch.sqrt(rv.double() + 1e-5)
    var = 1 / st[1].double() ** 2 - 1e-5
    r = (torch.sqrt(var + 1e-5) / sigma).clamp(1 / 1.5, 1.5)
    d = ((st[0].double() - rm.double()) / sigma).clamp(-0.5, 0.5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rd[0].double(), r, **tol)
    torch.testing.assert_close(rd[1].double(), d, **tol)


def _threshold_case(dtype, c=1 << 16, m=4096):
    unit = torch.finfo(dtype).eps / 2
    mean = torch.linspace(-1, 1, c, dtype=dtype)
    invstd = torch.full((c,), 2.0, dtype=dtype)
    # channel 12345: offset risk sqrt(m) * unit * |mean| * invstd of exactly 2e-3
    mean[12345] = 2e-3 / (math.sqrt(m) * unit * 2.0)
    return mean, invstd, m, unit


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_check_stats_threshold(dtype):
    _need_kernels()
    mean, invstd, m, unit = _threshold_case(dtype)
    kept = (mean.clone(), invstd.clone())
    assert _fused.check_stats(mean, invstd, m, 1e-3, unit) == 2
    assert _fused.check_stats(mean, invstd, m, 4e-3, unit) == 0        # the risk is below this threshold
    assert _fused.check_stats(mean, invstd, m, 0.0, unit) == 0         # 0: the risk is not tested
    assert _fused.check_stats(mean, invstd, m // 16, 1e-3, unit) == 0  # a quarter of the risk (sqrt(m))
    assert _fused.check_stats(-mean, invstd, m, 1e-3, unit) == 2       # |mean|
    assert _fused.check_stats(torch._neg_view(mean), invstd, m, 1e-3, unit) == 2  # a negative view, by value
    assert _fused.check_stats(mean, torch.tensor(2.0, dtype=dtype).expand(1 << 16), m, 1e-3, unit) == 2
    strided = torch.zeros(2 << 16, dtype=dtype)
    strided[::2] = mean
    assert _fused.check_stats(strided[::2], invstd, m, 1e-3, unit) == 2  # copied: read-only
    assert torch.equal(mean, kept[0]) and torch.equal(invstd, kept[1])
    # the same verdicts in torch operations
    risk = math.sqrt(m) * unit * mean.double().abs() * invstd.double()
    assert bool((risk > 1e-3).any()) and not bool((risk > 4e-3).any())


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("threshold", [1e-3, 0.0])
def test_check_stats_nonfinite_whatever_the_threshold(dtype, threshold):
    _need_kernels()
    mean, invstd, m, unit = _threshold_case(dtype)
    for which, value in (("mean", float("nan")), ("mean", float("inf")), ("invstd", float("nan")),
                         ("invstd", float("inf")), ("invstd", 0.0), ("invstd", -1.0)):
        mu, inv = mean.clone(), invstd.clone()
        (mu if which == "mean" else inv)[40000] = value
        assert _fused.check_stats(mu, inv, m, threshold, unit) == 1, (which, value)


def test_check_stats_declines_what_it_cannot_read(monkeypatch):
    _need_kernels()
    mean, invstd, m, unit = _threshold_case(torch.float32)
    assert _fused.check_stats(mean.half(), invstd.half(), m, 1e-3, unit) is None
    assert _fused.check_stats(mean, invstd.double(), m, 1e-3, unit) is None
    assert _fused.check_stats(mean, invstd[:-1], m, 1e-3, unit) is None
    assert _fused.check_stats(mean.to("meta"), invstd.to("meta"), m, 1e-3, unit) is None
    from batchnorm import _jit as jit
    monkeypatch.setattr(jit, "_lib", None)
    monkeypatch.setattr(jit, "_status", "disabled for this test")
    assert _fused.check_stats(mean, invstd, m, 1e-3, unit) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("c", [1, 7, 16, 1000, 4099])
def test_lerp_is_torchs_lerp_bit_for_bit(dtype, c):
    # The running update's arithmetic on the kernels: what lerp_ of each row would write,
    # to the last bit, for weights either side of lerp's 0.5 switch; the counter counts.
    _need_kernels()
    g = torch.Generator().manual_seed(c)
    for w in (0.1, 1 / 3, 0.5, 0.9, 1.0, 0.0):
        a, b = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
        st = torch.randn(1, 3, c, generator=g, dtype=dtype) * 3 + 1
        ra, rb = a.clone().lerp_(st[0, 0], w), b.clone().lerp_(st[0, 2], w)
        nbt = torch.tensor(41)
        assert _fused.lerp_(a, b, st, (0, 2), w, nbt)
        assert torch.equal(a, ra) and torch.equal(b, rb) and int(nbt) == 42, w
        assert _fused.lerp_(a, b, st, (1, 0), w, None) and int(nbt) == 42  # other rows; no counter


def test_lerp_declines_what_it_cannot_write():
    # Anything the kernel cannot write in place, or that torch would refuse to write, is left
    # untouched and declined (the one update then uses torch operations, which raise or cope).
    _need_kernels()
    c = 8
    st = torch.rand(1, 3, c)
    good = (torch.zeros(c), torch.ones(c))
    with torch.inference_mode():
        inference = torch.zeros(c)
    cases = {
        "float64 buffer": (torch.zeros(c, dtype=torch.float64), good[1], st, None),
        "short buffer": (torch.zeros(c - 1), good[1], st, None),
        "strided buffer": (torch.zeros(2 * c)[::2], good[1], st, None),
        "negative view": (torch._neg_view(torch.zeros(c)), good[1], st, None),
        "inference buffer": (inference, good[1], st, None),
        "half stats": (good[0], good[1], st.half(), None),
        "short stats": (good[0], good[1], st[..., :-1], None),
        "float counter": (good[0], good[1], st, torch.zeros(())),
        "two-element counter": (good[0], good[1], st, torch.zeros(2, dtype=torch.int64)),
        "meta buffer": (torch.zeros(c, device="meta"), good[1], st, None),
    }
    for what, (a, b, src, counter) in cases.items():
        before = [t.clone() for t in (a, b, src) if t.device.type != "meta"]
        counted = None if counter is None else counter.clone()
        assert not _fused.lerp_(a, b, src, (0, 2), 0.1, counter), what
        after = [t for t in (a, b, src) if t.device.type != "meta"]
        assert all(torch.equal(x, y) for x, y in zip(before, after)), what
        assert counter is None or torch.equal(counter, counted), what
    assert not _fused.lerp_(good[0], good[1], st, (0, 3), 0.1, None)       # a row past the block
    assert not _fused.lerp_(good[0], good[1], st, (-1, 2), 0.1, None)
    assert torch.equal(good[0], torch.zeros(c)) and torch.equal(good[1], torch.ones(c))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_forward_kernels_apply_a_prepared_update_as_lerp_only_when_finite(dtype, cl):
    # running_target accepts exactly what lerp_ can write (1-D buffers of C elements). A
    # forward kernel given the prepared update fills the target's statistics block and then
    # updates the buffers as lerp_ would from its rows, to the bit, counting the batch; a batch
    # with a NaN changes nothing; a target of another channel count or dtype is refused, by
    # the Python boundary and by the C one, with nothing changed.
    _need_kernels()
    c = 40
    g = torch.Generator().manual_seed(3)
    st = torch.randn(1, 3, c, generator=g)
    with torch.inference_mode():
        inference = torch.zeros(c)
    bad = {
        "float64 buffer": (torch.zeros(c, dtype=torch.float64), torch.ones(c), None),
        "short buffer": (torch.zeros(c - 1), torch.ones(c), None),
        "2-D buffer": (torch.zeros(1, c), torch.ones(c), None),
        "strided buffer": (torch.zeros(2 * c)[::2], torch.ones(c), None),
        "negative view": (torch.zeros(c), torch._neg_view(torch.ones(c)), None),
        "inference buffer": (inference, torch.ones(c), None),
        "float counter": (torch.zeros(c), torch.ones(c), torch.zeros(())),
        "two-element counter": (torch.zeros(c), torch.ones(c), torch.zeros(2, dtype=torch.int64)),
        "meta buffer": (torch.zeros(c), torch.ones(c, device="meta"), None),
    }
    for what, (a, b, counter) in bad.items():
        assert _fused.running_target(a, b, counter, torch.float32, c) is None, what
        assert not _fused.lerp_(a, b, st, (0, 2), 0.1, counter) or what == "2-D buffer", what
    a, b = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) + 0.5
    nbt = torch.tensor(7)
    assert _stats.prepare_update(a, b, nbt, 0.1, torch.float64 if dtype == torch.float32 else torch.float32,
                                 c) is None
    x = torch.randn(32, c, 8, 8, generator=g, dtype=dtype)
    x = x.to(memory_format=torch.channels_last) if cl else x
    lay = _fused.layout(x)
    m = x.numel() // c
    for momentum in (0.1, 0.75, None):
        ra, rb, rn = a.clone(), b.clone(), nbt.clone()
        target = _stats.prepare_update(a, b, nbt, momentum, dtype, c)
        assert target.stats.shape == (1, 3, c) and target.stats.dtype == dtype
        y, got, finite = _fused.train_forward(x, lay, None, None, 1e-5, None, target, None, _stats.unbiased(1.0, m))
        assert got is target.stats and finite
        torch.testing.assert_close(got[0, 0], x.mean((0, 2, 3)))
        assert _fused.lerp_(ra, rb, got, (0, 2), 1 / (int(rn) + 1) if momentum is None else momentum, rn)
        assert torch.equal(a, ra) and torch.equal(b, rb) and torch.equal(nbt, rn), momentum
    before = [t.clone() for t in (a, b, nbt)]
    bad_x = x.clone()
    bad_x[3, 5, 1, 1] = float("nan")
    target = _stats.prepare_update(a, b, nbt, 0.1, dtype, c)
    assert not _fused.train_forward(bad_x, _fused.layout(bad_x), None, None, 1e-5, None, target, None, 1.0)[2]
    assert all(torch.equal(t, u) for t, u in zip((a, b, nbt), before))
    for other in (torch.randn(64, c + 1, generator=g, dtype=dtype), x.double() if dtype == torch.float32 else x.float()):
        with pytest.raises(ValueError, match="running target"):
            _fused.train_forward(other, _fused.layout(other), None, None, 1e-5, None, target, None, 1.0)
    # The C boundary's own test: an update of another channel count, given to the kernel directly.
    target.args.c = c - 1
    y, stb = torch.empty_like(x), torch.empty(3, c, dtype=dtype)
    n, _, s_, cl_ = lay
    args = _jit.TrainFwdArgs(x=x.data_ptr(), y=y.data_ptr(), stats=stb.data_ptr(), update=target.ptr, n=n, c=c, s=s_,
                             eps=1e-5, var_scale=1.0, cl=cl_, nt=1)
    assert _fused._fn(_jit.kernels(), "train_fwd", dtype)(args) == -2
    assert all(torch.equal(t, u) for t, u in zip((a, b, nbt), before))


@pytest.mark.parametrize("momentum", [0.1, 0.75, None])
def test_update_from_the_statistics_rows_matches_torch_operations(momentum, monkeypatch):
    # update_running_stats(stats=...) on the kernels and on torch operations: the same buffers.
    _need_kernels()
    c = 33
    st = torch.randn(1, 3, c) + 2
    results = []
    for kernels in (True, False):
        if not kernels:
            monkeypatch.setattr(_fused, "lerp_", lambda *args: False)
        rm, rv, nbt = torch.zeros(c), torch.ones(c), torch.tensor(3)
        for _ in range(2):
            assert F.update_running_stats(rm, rv, nbt, None, None, momentum, stats=st)
        results.append((rm, rv, nbt))
    (a, b, n), (ra, rb, rn) = results
    assert torch.equal(a, ra) and torch.equal(b, rb) and int(n) == int(rn) == 5


def test_kernels_from_two_threads_at_once():
    # ctypes releases the GIL during a call: two Python threads run kernels at the same
    # time, each filling its own argument structs. Different channel counts per thread, so
    # that arguments crossing between threads would show.
    import threading
    _need_kernels()
    cases = []
    for t, c in enumerate((3, 5)):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(6, c, 7, generator=g)
        dy = torch.randn(6, c, 7, generator=g)
        lay = _fused.layout(x)
        y, st, _ = _fused.train_forward(x, lay, None, None, 1e-5, var_scale=1.5)
        dx, _, _ = _fused.train_backward(dy, x, lay, None, st, True, False, False)
        cases.append((x, dy, lay, y, st, dx))
    errors = []

    def work(case):
        x, dy, lay, y, st, dx = case
        for _ in range(300):
            y_, st_, ok = _fused.train_forward(x, lay, None, None, 1e-5, var_scale=1.5)
            dx_, _, _ = _fused.train_backward(dy, x, lay, None, st_, True, False, False)
            code = _fused.check_stats(st_[0], st_[1], 42, 1e-3, 2.0 ** -24)
            if not (ok and code == 0 and torch.equal(y_, y) and torch.equal(st_, st) and torch.equal(dx_, dx)):
                errors.append(x.size(1))
                return

    threads = [threading.Thread(target=work, args=(case,)) for case in cases]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
