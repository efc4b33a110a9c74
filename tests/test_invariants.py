"""The paper's invariants (Sections 3, 3.2, 3.3)."""

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm import functional as F

from conftest import SHAPES

# Every test here runs with the fused CPU kernels and with torch operations (conftest).
pytestmark = pytest.mark.usefixtures("kernel_mode")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_normalized_output_has_zero_mean_unit_variance(shape, impl):
    x = torch.randn(*shape, dtype=torch.float64) * 5 - 3
    y = F.batch_norm(x, None, None, None, None, True, eps=1e-12, impl=impl)
    dims = [0] + list(range(2, len(shape)))
    torch.testing.assert_close(y.mean(dim=dims), torch.zeros(shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.var(dim=dims, unbiased=False), torch.ones(shape[1], dtype=torch.float64), atol=1e-8, rtol=0)


def test_conv_statistics_are_per_feature_map():
    # Section 3.2: one mean/variance per feature map, over batch and all locations.
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x[:, 1] += torch.arange(9, dtype=torch.float64).view(3, 3)  # location-dependent offset
    y = F.batch_norm(x, None, None, None, None, True, eps=1e-12, impl="reference")
    manual = (x[:, 1] - x[:, 1].mean()) / x[:, 1].std(unbiased=False)
    torch.testing.assert_close(y[:, 1], manual)


def test_bias_before_bn_is_redundant():
    # BN(Wu + b) = BN(Wu): the bias is subtracted with the mean (Section 3.2).
    u = torch.randn(32, 10, dtype=torch.float64)
    lin = nn.Linear(10, 6).double()
    norm = bn.BatchNorm1d(6, impl="reference").double()
    with_bias = norm(lin(u))
    without = norm(u @ lin.weight.T)
    torch.testing.assert_close(with_bias, without)


@pytest.mark.parametrize("a", [0.1, 7.0])
def test_scale_invariance_and_weight_gradient(a):
    # Section 3.3: BN((aW)u) = BN(Wu) and d/d(aW) = (1/a) d/dW (eps negligible).
    u = torch.randn(32, 10, dtype=torch.float64)
    W = torch.randn(6, 10, dtype=torch.float64)
    gy = torch.randn(32, 6, dtype=torch.float64)
    outs, grads = [], []
    for scale in (1.0, a):
        Ws = (W * scale).requires_grad_()
        y = F.batch_norm(u @ Ws.T, None, None, None, None, True, eps=1e-12, impl="reference")
        y.backward(gy)
        outs.append(y.detach())
        grads.append(Ws.grad)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[1], grads[0] / a)
    # d/du is unchanged
    us = [u.clone().requires_grad_() for _ in range(2)]
    for uu, scale in zip(us, (1.0, a)):
        F.batch_norm(uu @ (W * scale).T, None, None, None, None, True, eps=1e-12, impl="reference").backward(gy)
    torch.testing.assert_close(us[0].grad, us[1].grad)


def test_running_average_equals_closed_form():
    m = bn.BatchNorm1d(2, momentum=0.3, impl="reference")
    xs = [torch.randn(8, 2) * (i + 1) for i in range(4)]
    for x in xs:
        m(x)
    expected = torch.zeros(2)
    for x in xs:
        expected = 0.7 * expected + 0.3 * x.mean(0)
    torch.testing.assert_close(m.running_mean, expected)
