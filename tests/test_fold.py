"""Algorithm 2, step 11: folding, and freezing."""

import copy

import pytest
import torch
from torch import nn

import batchnorm as bn


def trained(model, shape, steps=3):
    model.train()
    for _ in range(steps):
        model(torch.randn(*shape) * 2 + 0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (bn.BatchNorm1d, bn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return model.eval()


class ConvNet(nn.Module):
    def __init__(self, norm=bn.BatchNorm2d, conv_bias=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=conv_bias)
        self.b1 = norm(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=conv_bias)
        self.b2 = norm(8)
        self.b3 = norm(8)  # follows an add: not foldable, becomes an affine map
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = self.b3(torch.relu(self.b2(self.c2(h))) + h)
        return self.fc(h.mean(dim=(2, 3)))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("norm", [bn.BatchNorm2d, nn.BatchNorm2d])
def test_fold_conv_net(conv_bias, norm):
    model = trained(ConvNet(norm, conv_bias), (8, 3, 6, 6))
    original = copy.deepcopy(model.state_dict())
    folded = bn.fold(model)
    x = torch.randn(5, 3, 6, 6)
    assert rel_err(folded(x), model(x)) < 1e-5
    kinds = [type(m).__name__ for m in folded.modules()]
    assert "ChannelAffine" in kinds and not any(k.startswith("BatchNorm") for k in kinds)
    assert folded.c1.bias is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k])  # the original is untouched
    assert not folded.training


def test_fold_keeps_the_model_class_code_and_names():
    model = trained(ConvNet(), (8, 3, 6, 6))
    folded = bn.fold(model)
    assert type(folded) is ConvNet  # the user's class and forward, not a GraphModule
    assert isinstance(folded.b1, bn.FoldedAway) and isinstance(folded.b2, bn.FoldedAway)
    assert isinstance(folded.b3, bn.ChannelAffine)
    expected = {k for k in model.state_dict() if not k.startswith(("b1.", "b2.", "b3."))}
    expected |= {"c1.bias", "c2.bias", "b3.scale", "b3.shift"}
    assert set(folded.state_dict()) == expected


class Unit(nn.Sequential):
    """conv -> BN -> ReLU as an nn.Sequential subclass (as bnrepro's ConvUnit)."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), bn.BatchNorm2d(cout), nn.ReLU())


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Unit(3, 4)
        self.b = nn.Sequential(Unit(3, 4), Unit(4, 4))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def test_fold_drops_bn_from_sequentials_keeping_the_other_keys():
    model = trained(Branches(), (8, 3, 5, 5))
    folded = bn.fold(model)
    x = torch.randn(3, 3, 5, 5)
    assert type(folded) is Branches and rel_err(folded(x), model(x)) < 1e-5
    assert [type(m).__name__ for m in folded.a] == ["Conv2d", "ReLU"]
    assert list(folded.b[1]._modules) == ["0", "2"]  # the ReLU keeps its name
    assert not any(bn.population.is_batchnorm(m) or isinstance(m, bn.FoldedAway) for m in folded.modules())
    bn_names = {name + "." for name, m in model.named_modules() if bn.population.is_batchnorm(m)}
    assert bn_names == {"a.1.", "b.0.1.", "b.1.1."}
    kept = {k for k in model.state_dict() if not k.startswith(tuple(bn_names))}
    assert set(folded.state_dict()) == kept | {"a.0.bias", "b.0.0.bias", "b.1.0.bias"}


class ByPosition(nn.Module):
    """A forward that indexes its Sequential by position: dropping an entry would shift it."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), bn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        return self.seq[3](self.seq[2](self.seq[1](self.seq[0](x))))


def test_fold_falls_back_to_the_graph_when_the_copy_would_compute_something_else():
    model = trained(ByPosition(), (8, 3, 5, 5))
    folded = bn.fold(model)
    x = torch.randn(3, 3, 5, 5)
    assert isinstance(folded, torch.fx.GraphModule)
    assert rel_err(folded(x), model(x)) < 1e-5
    assert not any(bn.population.is_batchnorm(m) for m in folded.modules())


def test_fold_mlp_sequential():
    model = trained(nn.Sequential(nn.Linear(6, 5), bn.BatchNorm1d(5), nn.Sigmoid(), nn.Linear(5, 4, bias=False),
                                  nn.BatchNorm1d(4), nn.Sigmoid(), nn.Linear(4, 2)), (16, 6))
    folded = bn.fold(model)
    x = torch.randn(7, 6)
    assert rel_err(folded(x), model(x)) < 1e-5
    assert sum(isinstance(m, (bn.BatchNorm1d, bn.ChannelAffine)) for m in folded.modules()) == 0


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), bn.BatchNorm2d(4), nn.ReLU())
        self.tail = bn.BatchNorm2d(4)

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:  # data-dependent control flow defeats torch.fx
            h = h * 1.0
        return self.tail(h)


def test_fold_untraceable_model_warns_and_still_matches():
    model = trained(Untraceable(), (4, 3, 5, 5))
    with pytest.warns(bn.FoldWarning, match="tail"):
        folded = bn.fold(model)
    assert isinstance(folded.body[1], nn.Identity)
    assert isinstance(folded.tail, bn.ChannelAffine)
    x = torch.randn(3, 3, 5, 5)
    assert rel_err(folded(x), model(x)) < 1e-5


def test_fold_keeps_untracked_bn_with_warning():
    model = nn.Sequential(nn.Linear(3, 4), bn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.warns(bn.FoldWarning, match="track_running_stats=False"):
        folded = bn.fold(model)
    x = torch.randn(5, 3)
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("norm", [bn.BatchNorm1d, nn.BatchNorm1d])
def test_freeze_and_unfreeze(norm):
    model = nn.Sequential(nn.Linear(3, 4), norm(4))
    model.train()
    model(torch.randn(8, 3))
    bn.freeze(model)
    model.train()
    snap = {k: v.clone() for k, v in model[1].state_dict().items()}
    x = torch.randn(8, 3)
    y = model(x)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, snap[k])
    model.eval()
    torch.testing.assert_close(y, model(x))  # frozen training output == eval output
    assert model[1].weight.requires_grad
    bn.unfreeze(model)
    model.train()
    model(x)
    assert model[1].num_batches_tracked.item() == 2
    bn.freeze(model, requires_grad=False)
    assert not model[1].weight.requires_grad
    bn.unfreeze(model)
    assert model[1].weight.requires_grad


def test_freeze_refuses_untracked():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn.freeze(nn.Sequential(bn.BatchNorm1d(3, track_running_stats=False)))


def test_fold_of_frozen_torch_model_leaves_original_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    bn.freeze(model)
    bn.fold(model)
    model.train()
    before = model[1].num_batches_tracked.item()
    model(torch.randn(5, 3))
    assert model[1].num_batches_tracked.item() == before
