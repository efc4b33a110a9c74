"""The paper's networks at the scale this machine runs."""

from __future__ import annotations

from typing import Type

import torch
from torch import nn

import batchnorm


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
    from batchnorm.renorm import _ramp

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
