"""Batch Renormalization, ghost batches and masked statistics."""

import copy

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm.renorm import default_d_max, default_r_max

# Every test here runs with the fused CPU kernels and with torch operations (conftest).
pytestmark = pytest.mark.usefixtures("kernel_mode")


def grads_of(fn, *tensors, gy):
    ts = [t.clone().requires_grad_() for t in tensors]
    y = fn(*ts)
    y.backward(gy)
    return y.detach(), [t.grad for t in ts]


# -- Batch Renormalization -----------------------------------------------------------------------

@pytest.mark.parametrize("shape, cls, ref", [((16, 3), bn.BatchRenorm1d, bn.BatchNorm1d),
                                             ((8, 3, 5), bn.BatchRenorm1d, bn.BatchNorm1d),
                                             ((4, 3, 4, 5), bn.BatchRenorm2d, bn.BatchNorm2d),
                                             ((2, 3, 2, 3, 4), bn.BatchRenorm3d, bn.BatchNorm3d)])
def test_renorm_with_unit_limits_equals_batchnorm(shape, cls, ref):
    rn, norm = cls(3, r_max=1.0, d_max=0.0), ref(3)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    rn.load_state_dict(norm.state_dict())
    for step in range(3):
        x = torch.randn(*shape) * 2 + step
        gy = torch.randn(*shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = rn(xa), norm(xb)
        ya.backward(gy)
        yb.backward(gy)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rn.weight.grad, norm.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rn.bias.grad, norm.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rn.running_mean, norm.running_mean)
        torch.testing.assert_close(rn.running_var, norm.running_var)


def direct_renorm(x, gamma, beta, rm, rv, r_max, d_max, eps=1e-5):
    """Ioffe 2017, Algorithm 1, written out (float64), r and d detached."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    mu = x.mean(dim=dims, keepdim=True)
    sigma_b = torch.sqrt(((x - mu) ** 2).mean(dim=dims, keepdim=True) + eps)
    sigma = torch.sqrt(rv + eps).view(shape)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max).detach()
    d = torch.clamp((mu - rm.view(shape)) / sigma, -d_max, d_max).detach()
    return gamma.view(shape) * ((x - mu) / sigma_b * r + d) + beta.view(shape), r, d


def test_renorm_matches_direct_formula_with_active_clipping():
    x = torch.randn(12, 4, 3, dtype=torch.float64) * 3 + 1.5
    m = bn.BatchRenorm1d(4, r_max=1.5, d_max=0.5, dtype=torch.float64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([0.0, 1.5, 5.0, -5.0]))
        m.running_var.copy_(torch.tensor([1.0, 9.0, 0.1, 100.0]))
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    gamma, beta = m.weight.detach().clone(), m.bias.detach().clone()
    gy = torch.randn_like(x)
    _, r, d = direct_renorm(x, gamma, beta, rm, rv, 1.5, 0.5)
    assert (r == 1.5).any() and (r == 1 / 1.5).any() and (d.abs() == 0.5).any()  # clipping is active
    assert ((r > 1 / 1.5) & (r < 1.5)).any() or ((d.abs() < 0.5)).any()
    y_ref, (gx_ref, gg_ref, gb_ref) = grads_of(
        lambda x, g, b: direct_renorm(x, g, b, rm, rv, 1.5, 0.5)[0], x, gamma, beta, gy=gy)
    xa = x.clone().requires_grad_()
    y = m(xa)
    y.backward(gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xa.grad, gx_ref)
    torch.testing.assert_close(m.weight.grad, gg_ref)
    torch.testing.assert_close(m.bias.grad, gb_ref)
    # Running statistics update exactly like BatchNorm's.
    count = 12 * 3
    torch.testing.assert_close(m.running_mean, 0.9 * rm + 0.1 * x.mean(dim=(0, 2)))
    torch.testing.assert_close(m.running_var, 0.9 * rv + 0.1 * x.var(dim=(0, 2), unbiased=False) * count / (count - 1))


def test_renorm_gradcheck_where_clipped():
    # r and d are constants in the backward by design; where both are clipped they are also
    # locally constant, so the hand-written gradient must equal the numerical one.
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    m = bn.BatchRenorm1d(3, r_max=1.2, d_max=0.3, dtype=torch.float64, momentum=0.0)
    with torch.no_grad():
        m.running_mean.fill_(10.0)   # d = (mu_B - 10) / 10 ~ -1: clipped to -0.3
        m.running_var.fill_(100.0)   # r = sigma_B / 10 ~ 0.1: clipped to 1/1.2
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))


def test_renorm_schedule_and_checkpoint_into_batchnorm():
    assert default_r_max(0) == 1 and default_d_max(0) == 0
    assert default_r_max(5000) == 1 and default_d_max(5000) == 0
    assert default_d_max(25_000) == 5 and default_r_max(40_000) == 3
    assert 1 < default_r_max(20_000) < 3 and 0 < default_d_max(15_000) < 5
    m = bn.BatchRenorm2d(3, r_max=lambda step: 1.0 + step, d_max=lambda step: 0.5 * step)
    m.num_batches_tracked.fill_(2)
    assert m.current_limits() == (3.0, 1.0)
    for _ in range(3):
        m(torch.randn(4, 3, 2, 2) + 1)
    plain = bn.BatchNorm2d(3)
    plain.load_state_dict(m.state_dict())
    torch_bn = nn.BatchNorm2d(3)
    torch_bn.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 2, 2)
    m.eval(), plain.eval(), torch_bn.eval()
    torch.testing.assert_close(m(x), plain(x))
    torch.testing.assert_close(m(x), torch_bn(x))


def test_renorm_errors_and_half():
    with pytest.raises(ValueError, match="track_running_stats=True"):
        bn.BatchRenorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        bn.BatchRenorm1d(3, r_max=0.5)
    with pytest.raises(TypeError, match="d_max must be a float or a callable"):
        bn.BatchRenorm1d(3, d_max="big")
    m = bn.BatchRenorm1d(3, r_max=lambda s: 0.5)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="schedule gave r_max=0.5"):
        m(torch.randn(4, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k])
    h = bn.BatchRenorm2d(3, affine=False)
    y = h(torch.randn(4, 3, 2, 2).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and h.running_mean.dtype == torch.float32


# -- ghost batches -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(12, 3), (12, 3, 5), (8, 3, 2, 2)])
def test_ghost_batches_equal_per_chunk_batchnorm(shape):
    cls = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)]
    vbs = 4
    ghost = cls(3, virtual_batch_size=vbs)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-1, 1)
    ref = copy.deepcopy(ghost)
    ref.virtual_batch_size = None
    ref.impl = "reference"
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    ghost.double(), ref.double()
    gy = torch.randn_like(x)

    def per_chunk(x, w, b):
        return torch.cat([torch.nn.functional.batch_norm(c, None, None, w, b, True) for c in x.split(vbs)])

    y_ref, (gx_ref, gw_ref, gb_ref) = grads_of(per_chunk, x, ghost.weight.detach(), ghost.bias.detach(), gy=gy)
    xa = x.clone().requires_grad_()
    y = ghost(xa)
    y.backward(gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xa.grad, gx_ref)
    torch.testing.assert_close(ghost.weight.grad, gw_ref)
    torch.testing.assert_close(ghost.bias.grad, gb_ref)
    chunks = x.split(vbs)
    dims = [0] + list(range(2, x.dim()))
    mu = torch.stack([c.mean(dim=dims) for c in chunks]).mean(0)
    var = torch.stack([c.var(dim=dims, unbiased=True) if c.dim() == 2 else
                       c.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(ghost.running_mean, 0.1 * mu)
    torch.testing.assert_close(ghost.running_var, 0.9 + 0.1 * var)
    assert ghost.num_batches_tracked.item() == 1


def test_ghost_small_batch_is_one_chunk_and_channels_last():
    m = bn.BatchNorm2d(3, virtual_batch_size=16)
    ref = bn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(m(x), ref(x))
    g = bn.BatchNorm2d(3, virtual_batch_size=2)
    xc = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    y = g(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, g.__class__(3, virtual_batch_size=2)(xc.contiguous()))


def test_ghost_renorm():
    m = bn.BatchRenorm1d(3, virtual_batch_size=4, r_max=1.0, d_max=0.0)
    ref = bn.BatchNorm1d(3, virtual_batch_size=4)
    x = torch.randn(8, 3)
    torch.testing.assert_close(m(x), ref(x))
    torch.testing.assert_close(m.running_var, ref.running_var)


# -- masked statistics ---------------------------------------------------------------------------

def masked_reference(x, mask, w, b, eps=1e-5):
    """Statistics over valid positions only (float64 autograd); every position normalized."""
    m = mask.unsqueeze(1).to(x.dtype)                      # (N, 1, L)
    n = m.sum()
    mu = (x * m).sum(dim=(0, 2), keepdim=True) / n
    var = (((x - mu) ** 2) * m).sum(dim=(0, 2), keepdim=True) / n
    return (x - mu) / torch.sqrt(var + eps) * w.view(1, -1, 1) + b.view(1, -1, 1)


def test_masked_statistics_match_reference_and_gradcheck():
    x = torch.randn(4, 3, 6, dtype=torch.float64) * 2 + 1
    mask = torch.rand(4, 6) > 0.4
    mask[0, 0] = True
    mask[1, 1] = True
    x = x.masked_fill(~mask.unsqueeze(1), 1e3)  # padding garbage must not leak into the statistics
    m = bn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    gy = torch.randn_like(x)
    y_ref, (gx_ref, gw_ref, gb_ref) = grads_of(lambda x, w, b: masked_reference(x, mask, w, b),
                                                x, m.weight.detach(), m.bias.detach(), gy=gy)
    xa = x.clone().requires_grad_()
    y = m(xa, mask)
    y.backward(gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xa.grad, gx_ref)
    torch.testing.assert_close(m.weight.grad, gw_ref)
    torch.testing.assert_close(m.bias.grad, gb_ref)
    valid = x.transpose(1, 2)[mask]                          # (n_valid, C)
    torch.testing.assert_close(m.running_mean, 0.1 * valid.mean(0))
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * valid.var(0, unbiased=True))
    mm = bn.BatchNorm1d(3, dtype=torch.float64, affine=False)
    xg = torch.randn(3, 3, 5, dtype=torch.float64, requires_grad=True)
    mk = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: mm(x, mk), (xg,))


def test_full_mask_equals_plain_and_renorm_mask():
    x = torch.randn(4, 3, 5)
    full = torch.ones(4, 5, dtype=torch.bool)
    torch.testing.assert_close(bn.BatchNorm1d(3)(x, full), bn.BatchNorm1d(3)(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.BatchRenorm1d(3, r_max=1.0, d_max=0.0)(x, full), bn.BatchNorm1d(3)(x),
                               rtol=1e-5, atol=1e-6)


def test_mask_with_single_valid_value_is_rejected():
    m = bn.BatchNorm1d(2)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(3, 2, 4), mask)
    assert m.num_batches_tracked.item() == 0
