"""The paper's networks at the scale this machine runs."""

from __future__ import annotations

from typing import Type

import torch
from torch import nn

import batchnorm
from batchnorm.renorm import _ramp


def mnist_mlp(use_bn: bool, init_std: float = 0.01, hidden: int = 100, depth: int = 3,
              norm: Type[nn.Module] = batchnorm.BatchNorm1d) -> nn.Sequential:
    """Section 4.1: 784-100-100-100-10, sigmoid hidden units, N(0, init_std^2) weights.

    With BN, BN sits on Wu of each hidden layer before the sigmoid and the hidden biases are
    dropped (Section 3.2: beta takes their role). Layout: [Linear, (BN), Sigmoid] x depth,
    Linear; the last hidden layer's sigmoid is ``model[-2]``.
    """
    layers = []
    width = 784
    for _ in range(depth):
        lin = nn.Linear(width, hidden, bias=not use_bn)
        layers.append(lin)
        if use_bn:
            layers.append(norm(hidden))
        layers.append(nn.Sigmoid())
        width = hidden
    layers.append(nn.Linear(width, 10))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def renorm_schedule(total_steps: int):
    """Batch Renormalization's limits, scaled to a run of ``total_steps``: r_max = 1 and
    d_max = 0 for the first 10 % of steps, then linearly to r_max = 3 at 50 % and d_max = 5
    at 35 % (the paper's 5k / 40k / 25k steps, proportionally shorter)."""

    warm = int(0.10 * total_steps)
    r_end, d_end = max(int(0.50 * total_steps), warm + 1), max(int(0.35 * total_steps), warm + 1)
    return (lambda step: _ramp(step, warm, r_end, 1.0, 3.0)), (lambda step: _ramp(step, warm, d_end, 0.0, 5.0))


def small_convnet(norm: str, total_steps: int = 1, ghost_batch: int = 0, widths=(16, 32, 64)) -> nn.Sequential:
    """A small conv net for 28x28 grey images: three 3x3 conv layers (each followed by the
    normalization and ReLU, the first two by 2x2 max pooling), global average pooling and
    a linear classifier. ``norm``: "none" (conv biases kept), "bn", "renorm" (schedule
    scaled to ``total_steps``) or "ghost" (BN with virtual_batch_size=``ghost_batch``)."""
    if norm not in ("none", "bn", "renorm", "ghost"):
        raise ValueError(f"norm must be 'none', 'bn', 'renorm' or 'ghost', got {norm!r}")
    layers = []
    cin = 1
    for i, c in enumerate(widths):
        layers.append(nn.Conv2d(cin, c, 3, padding=1, bias=(norm == "none")))
        if norm == "bn":
            layers.append(batchnorm.BatchNorm2d(c))
        elif norm == "ghost":
            layers.append(batchnorm.BatchNorm2d(c, virtual_batch_size=ghost_batch))
        elif norm == "renorm":
            r_max, d_max = renorm_schedule(total_steps)
            layers.append(batchnorm.BatchRenorm2d(c, r_max=r_max, d_max=d_max))
        layers.append(nn.ReLU())
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    for m in layers:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


# -- a small Inception network for 28x28 images (the paper's Appendix, Figure 5, in miniature) --

class ConvUnit(nn.Sequential):
    """conv -> (BN) -> nonlinearity; with BN the conv bias is dropped (beta takes its role)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, bn: bool = True, act: str = "relu"):
        layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=not bn)]
        if bn:
            layers.append(batchnorm.BatchNorm2d(cout))
        layers.append(nn.ReLU() if act == "relu" else nn.Sigmoid())
        super().__init__(*layers)


class InceptionModule(nn.Module):
    """Four branches concatenated: 1x1; 1x1 reduce then 3x3; 1x1 reduce then two 3x3 (the
    paper's replacement of the 5x5); 3x3 average pooling then 1x1 projection."""

    def __init__(self, cin: int, c1: int, r3: int, c3: int, rd: int, cd: int, cp: int, bn: bool, act: str):
        super().__init__()
        self.b1 = ConvUnit(cin, c1, 1, bn=bn, act=act)
        self.b3 = nn.Sequential(ConvUnit(cin, r3, 1, bn=bn, act=act), ConvUnit(r3, c3, 3, bn=bn, act=act))
        self.bd = nn.Sequential(ConvUnit(cin, rd, 1, bn=bn, act=act), ConvUnit(rd, cd, 3, bn=bn, act=act),
                                ConvUnit(cd, cd, 3, bn=bn, act=act))
        self.bp = nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), ConvUnit(cin, cp, 1, bn=bn, act=act))
        self.out_channels = c1 + c3 + cd + cp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.bd(x), self.bp(x)], dim=1)


class ReductionModule(nn.Module):
    """Stride-2 module: 3x3 and double-3x3 branches with stride 2, and max pooling as the
    pass-through branch, in place of pooling between modules (the paper's Figure 5)."""

    def __init__(self, cin: int, r3: int, c3: int, rd: int, cd: int, bn: bool, act: str):
        super().__init__()
        self.b3 = nn.Sequential(ConvUnit(cin, r3, 1, bn=bn, act=act), ConvUnit(r3, c3, 3, stride=2, bn=bn, act=act))
        self.bd = nn.Sequential(ConvUnit(cin, rd, 1, bn=bn, act=act), ConvUnit(rd, cd, 3, bn=bn, act=act),
                                ConvUnit(cd, cd, 3, stride=2, bn=bn, act=act))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels = c3 + cd + cin

    def forward(self, x):
        return torch.cat([self.b3(x), self.bd(x), self.pool(x)], dim=1)


class SmallInception(nn.Module):
    """Stem (3x3 conv, stride 2: 28 -> 14), an Inception module, a reduction module
    (14 -> 7), two Inception modules, global average pooling, (dropout), a linear
    classifier. ``bn``: BN before every nonlinearity; ``lrn``: local response
    normalization after the stem (as the original Inception had); ``hidden_bn``: an extra
    per-activation BN hidden layer before the classifier (the ensemble's variation)."""

    def __init__(self, bn: bool = True, act: str = "relu", lrn: bool = False, dropout: float = 0.0,
                 width: float = 1.0, init_gain: float = 1.0, hidden_bn: bool = False):
        super().__init__()
        w = lambda c: max(4, int(round(c * width)))
        self.stem = ConvUnit(1, w(24), 3, stride=2, bn=bn, act=act)
        self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0) if lrn else nn.Identity()
        m1 = InceptionModule(w(24), w(8), w(8), w(12), w(8), w(12), w(8), bn, act)
        r1 = ReductionModule(m1.out_channels, w(16), w(24), w(16), w(24), bn, act)
        m2 = InceptionModule(r1.out_channels, w(24), w(16), w(24), w(16), w(24), w(16), bn, act)
        m3 = InceptionModule(m2.out_channels, w(24), w(16), w(24), w(16), w(24), w(16), bn, act)
        self.body = nn.Sequential(m1, r1, m2, m3)
        feats = m3.out_channels
        head = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if hidden_bn:
            head += [nn.Linear(feats, feats, bias=False), batchnorm.BatchNorm1d(feats),
                     nn.ReLU() if act == "relu" else nn.Sigmoid()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(feats, 10))
        self.head = nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.weight.data.mul_(init_gain)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.body(self.lrn(self.stem(x))))
