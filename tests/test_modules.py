"""BatchNorm1d/2d/3d as drop-in replacements for torch.nn's."""

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm as bn

from conftest import SHAPES

# Every test here runs with the fused CPU kernels and with torch operations (conftest).
pytestmark = pytest.mark.usefixtures("kernel_mode")

PAIRS = {2: (bn.BatchNorm1d, nn.BatchNorm1d), 3: (bn.BatchNorm1d, nn.BatchNorm1d),
         4: (bn.BatchNorm2d, nn.BatchNorm2d), 5: (bn.BatchNorm3d, nn.BatchNorm3d)}


def pair(shape, **kw):
    ours_cls, theirs_cls = PAIRS[len(shape)]
    ours, theirs = ours_cls(shape[1], **kw), theirs_cls(shape[1], **{k: v for k, v in kw.items() if k != "impl"})
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-1, 1)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("affine", [True, False])
def test_parity_over_training_steps(shape, momentum, impl, affine):
    ours, theirs = pair(shape, momentum=momentum, impl=impl, affine=affine)
    for step in range(4):
        x = torch.randn(*shape) * (step + 1) + step
        gy = torch.randn(*shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ya.backward(gy)
        yb.backward(gy)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == step + 1
    ours.eval()
    theirs.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_track_running_stats_false_uses_batch_stats_in_eval(impl):
    ours, theirs = pair((8, 3, 4, 4), track_running_stats=False, impl=impl)
    assert ours.running_mean is None and "running_mean" not in ours.state_dict()
    ours.eval()
    theirs.eval()
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))


def test_state_dict_loads_both_ways_and_matches():
    theirs = nn.BatchNorm2d(6)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    theirs(torch.randn(4, 6, 3, 3) * 2 + 1)
    ours = bn.BatchNorm2d(6)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6, 3, 3)
    for mode in ("train", "eval"):
        for m in (theirs, ours, back):
            getattr(m, mode)()
        ours_copy, theirs_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
        torch.testing.assert_close(ours_copy(x), theirs_copy(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(back(x) if mode == "eval" else copy.deepcopy(back)(x), theirs_copy(x), rtol=0, atol=1e-6)


def test_old_checkpoint_without_num_batches_tracked_loads():
    sd = nn.BatchNorm1d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    m = bn.BatchNorm1d(3)
    m.load_state_dict(sd)
    assert m.num_batches_tracked.item() == 0


def test_constructor_and_repr_match_torch():
    ours, theirs = bn.BatchNorm2d(5), nn.BatchNorm2d(5)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(theirs, attr)
    assert repr(ours) == repr(theirs)
    assert "virtual_batch_size=4" in repr(bn.BatchNorm1d(3, virtual_batch_size=4))
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in ours.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    m = bn.BatchNorm1d(3, dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64


def test_unbiased_running_var_uses_values_per_channel():
    m = bn.BatchNorm2d(2, momentum=1.0)
    x = torch.randn(3, 2, 4, 5)
    m(x)
    count = 3 * 4 * 5
    expected = x.var(dim=(0, 2, 3), unbiased=False) * count / (count - 1)
    torch.testing.assert_close(m.running_var, expected)


def test_cumulative_average_with_momentum_none():
    m = bn.BatchNorm1d(3, momentum=None, impl="reference")
    xs = [torch.randn(10, 3) + i for i in range(5)]
    for x in xs:
        m(x)
    torch.testing.assert_close(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(m.running_var, torch.stack([x.var(0) for x in xs]).mean(0))


def test_all_finite():
    """The NaN guard's test: every value finite, in each of the tensors (empty ones are)."""
    from batchnorm._stats import all_finite
    for dt in (torch.float32, torch.float64):
        ok = torch.randn(512, dtype=dt) * 1e30
        assert all_finite(ok, ok.abs()) and all_finite(torch.empty(0, dtype=dt), ok)
        for bad in (float("nan"), float("inf"), -float("inf")):
            t = ok.clone()
            t[300] = bad
            assert not all_finite(ok, t) and not all_finite(t, ok) and not all_finite(t)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("layer", ["act", "ghost"])
def test_nonfinite_batch_is_rejected_at_the_kernels_size(layer, bad):
    """BatchNormAct2d and ghost batches (whose statistics come without the kernels' finite
    flag: the guard tests them itself) at 65,536 elements: nothing updated, a warning."""
    m = bn.BatchNormAct2d(16) if layer == "act" else bn.BatchNorm2d(16, virtual_batch_size=8)
    m(torch.randn(16, 16, 16, 16))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(16, 16, 16, 16)
    x[3, 5, 2, 7] = bad
    with pytest.warns(bn.NonFiniteBatchWarning, match="not updated"):
        m(x)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_does_not_poison(impl, bad):
    m = bn.BatchNorm2d(3, impl=impl)
    m(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 1] = bad
    with pytest.warns(bn.NonFiniteBatchWarning, match="not updated"):
        y = m(x)
    assert y.shape == x.shape and torch.isfinite(y[:, :2]).all()
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])
    strict = bn.BatchNorm2d(3, impl=impl, nonfinite="raise")
    with pytest.raises(bn.NonFiniteBatchError):
        strict(x)
    assert strict.num_batches_tracked.item() == 0 and torch.all(strict.running_var == 1)
    quiet = bn.BatchNorm2d(3, impl=impl, nonfinite="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet(x)
    assert quiet.num_batches_tracked.item() == 0


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_unchanged(m, snap):
    for k, v in m.state_dict().items():
        assert torch.equal(v, snap[k]), k


BAD_INPUTS = [
    (bn.BatchNorm2d(3), torch.randn(4, 5, 2, 2), ValueError, r"expected 3 channels.*\(4, 5, 2, 2\)"),
    (bn.BatchNorm2d(3), torch.randn(4, 3, 2), ValueError, r"expected 4-D \(N, C, H, W\) input, got a 3-D"),
    (bn.BatchNorm1d(3), torch.randn(4, 3, 2, 2), ValueError, r"expected 2-D \(N, C\) or 3-D \(N, C, L\)"),
    (bn.BatchNorm3d(3), torch.randn(4, 3, 2, 2), ValueError, r"5-D"),
    (bn.BatchNorm1d(3), torch.ones(4, 3, dtype=torch.int64), TypeError, "floating-point.*int64"),
    (bn.BatchNorm1d(3), torch.ones(4, 3, dtype=torch.bool), TypeError, "floating-point.*bool"),
    (bn.BatchNorm1d(3), torch.randn(1, 3), ValueError, "more than 1 value per channel"),
    (bn.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, "more than 1 value per channel"),
    (bn.BatchNorm1d(3), torch.randn(0, 3), ValueError, "empty batch"),
    (bn.BatchNorm2d(3), torch.randn(0, 3, 2, 2), ValueError, "empty batch"),
    (bn.BatchNorm1d(3), [[1.0, 2.0, 3.0]], TypeError, "torch.Tensor"),
    (bn.BatchNorm1d(3, virtual_batch_size=4), torch.randn(6, 3), ValueError, "not a multiple of virtual_batch_size=4"),
]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_is_rejected_without_state_change(case, impl):
    m, x, exc, pattern = BAD_INPUTS[case]
    m = copy.deepcopy(m)
    m.impl = impl
    m(torch.randn(8, 3, *([2] * (m._ranks[-1] - 2))))
    snap = snapshot(m)
    with pytest.raises(exc, match=pattern):
        m(x)
    assert_unchanged(m, snap)


def test_bad_mask_is_rejected_without_state_change():
    m = bn.BatchNorm1d(3)
    snap = snapshot(m)
    x = torch.randn(4, 3, 5)
    with pytest.raises(TypeError, match="torch.bool"):
        m(x, torch.ones(4, 5))
    with pytest.raises(ValueError, match=r"\(N, L\) mask"):
        m(x, torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="no valid position"):
        m(x, torch.zeros(4, 5, dtype=torch.bool))
    assert_unchanged(m, snap)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_features"):
        bn.BatchNorm1d(0)
    with pytest.raises(ValueError, match="momentum"):
        bn.BatchNorm1d(3, momentum="0.1")
    with pytest.raises(ValueError, match="momentum"):
        bn.BatchNorm1d(3, momentum=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        bn.BatchNorm1d(3, eps=-1e-5)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn.BatchNorm1d(3, virtual_batch_size=0)


def test_single_value_eval_is_fine():
    m = bn.BatchNorm1d(3).eval()
    assert m(torch.randn(1, 3)).shape == (1, 3)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_bias_false_matches_torch(impl):
    ours, theirs = bn.BatchNorm2d(3, bias=False, impl=impl), nn.BatchNorm2d(3, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, 3, 2, 2)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    assert repr(ours).replace(", impl='reference'", "") == repr(theirs)
