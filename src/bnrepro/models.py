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
