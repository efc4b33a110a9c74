"""Algorithm 2, steps 7-10: population statistics."""

import pytest
import torch
from torch import nn

import batchnorm as bn

# Every test here runs with the fused CPU kernels and with torch operations (conftest).
pytestmark = pytest.mark.usefixtures("kernel_mode")


def make(kind):
    norm = bn.BatchNorm1d if kind == "ours" else nn.BatchNorm1d
    return nn.Sequential(nn.Linear(5, 4), norm(4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3), norm(3))


@pytest.mark.parametrize("kind", ["ours", "torch"])
def test_population_statistics_match_hand_computation(kind):
    model = make(kind)
    model.train()
    batches = [torch.randn(m, 5) * 2 + 1 for m in (10, 10, 7)]
    nbt_before = [model[1].num_batches_tracked.clone(), model[5].num_batches_tracked.clone()]
    params_before = [p.clone() for p in model.parameters()]
    bn.population_statistics(model, batches)
    assert model.training and model[3].training  # modes restored
    # Hand computation: inputs of each BN with earlier BNs in batch mode and dropout off.
    with torch.no_grad():
        mu1, v1, mu2, v2 = [], [], [], []
        for x in batches:
            h = model[0](x)
            mu1.append(h.mean(0))
            v1.append(h.var(0, unbiased=True))
            a = torch.relu((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * model[1].weight + model[1].bias)
            h2 = model[4](a)
            mu2.append(h2.mean(0))
            v2.append(h2.var(0, unbiased=True))
    torch.testing.assert_close(model[1].running_mean, torch.stack(mu1).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack(v1).mean(0))
    torch.testing.assert_close(model[5].running_mean, torch.stack(mu2).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[5].running_var, torch.stack(v2).mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(model[1].num_batches_tracked, nbt_before[0])
    assert torch.equal(model[5].num_batches_tracked, nbt_before[1])
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p, q)


def test_population_statistics_eval_mode_restored_and_custom_forward():
    model = make("ours").eval()
    batches = [{"x": torch.randn(6, 5)} for _ in range(3)]
    bn.population_statistics(model, batches, forward=lambda m, b: m(b["x"]))
    assert not model.training and not model[1].training
    h = [model[0](b["x"]).detach() for b in batches]
    torch.testing.assert_close(model[1].running_mean, torch.stack([t.mean(0) for t in h]).mean(0))


def test_population_statistics_ghost_batches_count_each_chunk():
    model = nn.Sequential(bn.BatchNorm1d(3, virtual_batch_size=4))
    x = torch.randn(12, 3)
    bn.population_statistics(model, [x])
    chunks = x.view(3, 4, 3)
    torch.testing.assert_close(model[0].running_var, chunks.var(1, unbiased=True).mean(0))


def test_population_statistics_errors_leave_state():
    model = make("ours")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batches"):
        bn.population_statistics(model, [])
    bad = torch.randn(6, 5)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        bn.population_statistics(model, [torch.randn(6, 5), bad])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="no BatchNorm"):
        bn.population_statistics(nn.Linear(2, 2), [torch.randn(2, 2)])
