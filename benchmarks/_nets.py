"""A ResNet-18-style network for the BN+activation benchmarks (act.py's memory table,
e2e.py's ResNet rows): a 3x3 stride-1 stem conv (3 -> 64) with BN and ReLU, four stages of
two basic blocks (64, 128, 256, 512 channels; stride 2 from the second stage on, a 1x1
conv-BN projecting the shortcut where the shape changes), global average pooling and a
linear classifier; every conv followed by BN has no bias.

``resnet18(bn_act=None)`` builds it with torch.nn's BatchNorm2d and ReLU(inplace=True) as
separate modules (torchvision's arrangement). With ``bn_act`` (a dict of BatchNormAct2d
arguments, e.g. ``{"act": "leaky_relu", "inplace": True}``) every BN + activation is one
``batchnorm.BatchNormAct2d`` and each block's second one takes the shortcut as its residual.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import batchnorm as bn


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn_act: Optional[dict]) -> None:
        super().__init__()
        self.fused = bn_act is not None
        self.conv1, self.conv2 = _conv(cin, cout, 3, stride), _conv(cout, cout, 3)
        if self.fused:
            self.bn1 = bn.BatchNormAct2d(cout, **bn_act)
            self.bn2 = bn.BatchNormAct2d(cout, **bn_act)
        else:
            self.bn1, self.bn2 = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.down is None else self.down(x)
        if self.fused:
            return self.bn2(self.conv2(self.bn1(self.conv1(x))), shortcut)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet18(nn.Module):
    def __init__(self, bn_act: Optional[dict] = None, num_classes: int = 10) -> None:
        super().__init__()
        if bn_act is None:
            self.stem = nn.Sequential(_conv(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(_conv(3, 64, 3), bn.BatchNormAct2d(64, **bn_act))
        blocks, cin = [], 64
        for i, c in enumerate((64, 128, 256, 512)):
            blocks += [_Block(cin, c, 1 if i == 0 else 2, bn_act), _Block(c, c, 1, bn_act)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def resnet18(bn_act: Optional[dict] = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResNet18(bn_act)
