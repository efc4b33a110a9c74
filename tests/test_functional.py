"""The hand-written Function against autograd on the plain formula, torch, and gradcheck."""

import pytest
import torch

from batchnorm import functional as F

from conftest import SHAPES

# Every test here runs with the fused CPU kernels and with torch operations (conftest).
pytestmark = pytest.mark.usefixtures("kernel_mode")


def reference(x, weight, bias, eps=1e-5):
    """Algorithm 1 composed of autograd ops, in float64: the independent reference."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    xhat = (x - mu) / torch.sqrt(var + eps)
    return xhat * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradcheck_float64(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: F.batch_norm(x, None, None, w, b, True, impl="reference")
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_gradcheck_channels_last():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: F.batch_norm(x, None, None, w, b, True, impl="reference")
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_autograd_reference(shape):
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    w = torch.randn(shape[1], dtype=torch.float64)
    b = torch.randn(shape[1], dtype=torch.float64)
    gy = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for fn in (reference, lambda x, w, b: F.batch_norm(x, None, None, w, b, True, impl="reference")):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, ws, bs)
        y.backward(gy)
        grads.append((y.detach(), xs.grad, ws.grad, bs.grad))
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torch_float32(impl, channels_last):
    x = torch.randn(8, 5, 6, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(5), torch.randn(5)
    rm, rv = torch.randn(5), torch.rand(5) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    gy = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    ya = F.batch_norm(xa, rm, rv, wa, b, True, 0.1, 1e-5, impl=impl)
    yb = torch.nn.functional.batch_norm(xb, rm2, rv2, wb, b, True, 0.1, 1e-5)
    ya.backward(gy)
    yb.backward(gy)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    assert ya.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert xa.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_uses_float32_statistics(impl, dtype):
    x32 = torch.randn(16, 3, 4, 4) * 2 + 5
    x = x32.to(dtype)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = F.batch_norm(x, rm, rv, torch.ones(3), torch.zeros(3), True, 1.0, 1e-5, impl=impl)
    assert y.dtype == dtype and rm.dtype == torch.float32
    expected = F.batch_norm(x.float(), None, None, None, None, True, impl="reference")
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 3e-3)
    # Running stats come from float32 arithmetic on the half values.
    torch.testing.assert_close(rm, x.float().mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_half_backward_paper():
    x = (torch.randn(16, 3, 4) * 2).to(torch.bfloat16).requires_grad_()
    w = torch.ones(3, requires_grad=True)
    y = F.batch_norm(x, None, None, w, None, True, impl="reference")
    y.float().pow(2).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert torch.isfinite(x.grad.float()).all()


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_large_mean_is_stable(impl):
    # float32 values around 1e4 with unit spread: raw E[x^2]-E[x]^2 would be off by thousands.
    x64 = torch.randn(64, 3, 8, 8, dtype=torch.float64) + 1e4
    x32 = x64.float()
    y32 = F.batch_norm(x32, None, None, None, None, True, impl=impl).double()
    y64 = F.batch_norm(x32.double(), None, None, None, None, True, impl="reference")
    assert (y32 - y64).abs().max() < 2e-3
    mean, var, _ = F.batch_stats(x32.view(1, *x32.shape), (1, 3, 4))
    assert abs(var.mean().item() - x32.double().var(dim=(0, 2, 3), unbiased=False).mean().item()) < 1e-2


def test_masked_stats_are_stable():
    x = torch.randn(1, 32, 2, 50, dtype=torch.float64) + 1e4
    mask = torch.ones(1, 32, 1, 50)
    mean, var, count = F.batch_stats(x.float(), (1, 3), mask)
    torch.testing.assert_close(var.double().reshape(-1), x.var(dim=(0, 1, 3), unbiased=False), rtol=1e-2, atol=1e-2)


def test_merge_stats_equals_whole():
    x = torch.randn(30, 4, dtype=torch.float64) * 3 + 100
    parts = [x[:7], x[7:8], x[8:8], x[8:]]
    c = torch.tensor([[len(p)] * 4 for p in parts], dtype=torch.float64)
    m = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    v = torch.stack([p.var(0, unbiased=False) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    total, mean, var = F.merge_stats(c, m, v)
    torch.testing.assert_close(mean[0], x.mean(0))
    torch.testing.assert_close(var[0], x.var(0, unbiased=False))
    assert total[0, 0].item() == 30


def test_eval_uses_running_stats_both_impls():
    x = torch.randn(6, 3, 4)
    rm, rv = torch.randn(3), torch.rand(3) + 0.1
    w, b = torch.randn(3), torch.randn(3)
    expected = (x - rm.view(1, 3, 1)) / torch.sqrt(rv.view(1, 3, 1) + 1e-5) * w.view(1, 3, 1) + b.view(1, 3, 1)
    for impl in ("reference", "torch"):
        torch.testing.assert_close(F.batch_norm(x, rm, rv, w, b, False, impl=impl), expected)


def test_functional_errors():
    with pytest.raises(ValueError, match="impl"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, impl="fast")
    with pytest.raises(ValueError, match="weight should contain 3 elements not 2"):
        F.batch_norm(torch.randn(4, 3), None, None, torch.ones(2), training=True)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        F.batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(TypeError, match="floating-point"):
        F.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True)
