"""A small zoo of real architectures for tests/test_zoo.py, written here from the papers'
descriptions (no code taken from torchvision or timm): each one is built with the BN class
it is given, so the same network exists with torch.nn's layers and with ours.

``build(name, norm=nn.BatchNorm2d)`` returns a float32 model for (N, 3, 32, 32) input and
10 classes, 5,000 to 40,000 parameters. Every model has a stride-1 stem, conv 3 -> 16 at
32x32, so that with N = 4 (:data:`INPUT`) its first BN sees 4*16*32*32 = 65,536 values and
the fused CPU kernels run (from 32,768 values on), while the narrow BNs of the later stages
run on torch's kernel: both paths of impl="auto" are exercised in every model. Convolutions
followed by BN have no bias (Section 3.2: beta takes its role), except one, on purpose, in
the Inception net, which fold() must add into.
"""

from typing import Callable, List

import torch
from torch import Tensor, nn

NAMES = ["resnet_basic", "resnet_bottleneck", "mobilenet_v2", "densenet", "inception"]
NUM_CLASSES = 10
INPUT = (4, 3, 32, 32)


def conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class Head(nn.Module):
    """Global average pooling, then a linear classifier."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def stem(norm, act: Callable[[], nn.Module] = lambda: nn.ReLU(inplace=True)) -> nn.Sequential:
    return nn.Sequential(conv(3, 16, 3), norm(16), act())


# -- ResNet (He et al. 2016) -------------------------------------------------------------------

def shortcut(cin: int, cout: int, stride: int, norm):
    """The shortcut's strided 1x1 conv-BN where the shape changes, else None (identity)."""
    if stride != 1 or cin != cout:
        return nn.Sequential(conv(cin, cout, 1, stride), norm(cout))
    return None


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, the second added to the shortcut before the ReLU; a strided 1x1
    conv-BN projects the shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv(cout, cout, 3), norm(cout)
        self.downsample = shortcut(cin, cout, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in "ResNet v1.5"), 1x1 expand, each with BN;
    the last BN's output is added to the shortcut before the ReLU."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(cin, width, 1), norm(width)
        self.conv2, self.bn2 = conv(width, width, 3, stride), norm(width)
        self.conv3, self.bn3 = conv(width, cout, 1), norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(cin, cout, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, blocks: List[nn.Module], cout: int, norm) -> None:
        super().__init__()
        self.stem = stem(norm)
        self.layers = nn.Sequential(*blocks)
        self.head = Head(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(self.stem(x)))


def resnet_basic(norm) -> nn.Module:
    """stem 16 @32x32; basic block 16 (identity shortcut); basic blocks 16 -> 32 @16x16 and
    32 -> 32 @8x8, stride 2 (projected shortcuts); head."""
    return ResNet([BasicBlock(16, 16, 1, norm), BasicBlock(16, 32, 2, norm), BasicBlock(32, 32, 2, norm)], 32, norm)


def resnet_bottleneck(norm) -> nn.Module:
    """stem 16 @32x32; bottleneck 16 -> (8) -> 32 (projected shortcut); bottleneck
    32 -> (16) -> 64, stride 2 @16x16; bottleneck 64 -> (16) -> 64 (identity); head."""
    return ResNet([Bottleneck(16, 8, 32, 1, norm), Bottleneck(32, 16, 64, 2, norm), Bottleneck(64, 16, 64, 1, norm)],
                  64, norm)


# -- MobileNetV2 (Sandler et al. 2018) -------------------------------------------------------------

class InvertedResidual(nn.Module):
    """1x1 expansion (factor t) with BN and ReLU6, 3x3 depthwise conv (groups = channels)
    with BN and ReLU6, 1x1 linear projection with BN (no activation: the bottleneck is
    linear); the input is added where stride 1 keeps the shape."""

    def __init__(self, cin: int, cout: int, stride: int, t: int, norm) -> None:
        super().__init__()
        hidden = cin * t
        layers: List[nn.Module] = []
        if t != 1:
            layers += [conv(cin, hidden, 1), norm(hidden), nn.ReLU6(inplace=True)]
        layers += [conv(hidden, hidden, 3, stride, groups=hidden), norm(hidden), nn.ReLU6(inplace=True),
                   conv(hidden, cout, 1), norm(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """stem 16 @32x32 (ReLU6); t=1 block 16 -> 8; t=4 block 8 -> 16, stride 2 (its
    expansion BN sees 4*32*32*32 values); t=4 block 16 -> 16 with the residual @16x16;
    1x1 conv 16 -> 64 with BN and ReLU6; head."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.stem = stem(norm, lambda: nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(16, 8, 1, 1, norm), InvertedResidual(8, 16, 2, 4, norm),
                                    InvertedResidual(16, 16, 1, 4, norm))
        self.last = nn.Sequential(conv(16, 64, 1), norm(64), nn.ReLU6(inplace=True))
        self.head = Head(64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.last(self.blocks(self.stem(x))))


# -- DenseNet (Huang et al. 2017) ------------------------------------------------------------------

class DenseLayer(nn.Module):
    """Pre-activation: BN-ReLU-1x1 conv (to bn_size*growth), BN-ReLU-3x3 conv (to growth),
    on the concatenation of every earlier feature map of the block. Its first BN follows a
    concatenation, not a conv: fold() turns it into a per-channel affine map."""

    def __init__(self, cin: int, growth: int, bn_size: int, norm) -> None:
        super().__init__()
        self.norm1, self.relu1 = norm(cin), nn.ReLU(inplace=True)
        self.conv1 = conv(cin, bn_size * growth, 1)
        self.norm2, self.relu2 = norm(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = conv(bn_size * growth, growth, 3)

    def forward(self, features: List[Tensor]) -> Tensor:
        h = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(h)))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int, norm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bn_size, norm) for i in range(layers))

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (halving the channels), 2x2 average pooling."""

    def __init__(self, cin: int, cout: int, norm) -> None:
        super().__init__(norm(cin), nn.ReLU(inplace=True), conv(cin, cout, 1), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    """stem 16 @32x32; dense block of 3 layers, growth 8 (16 -> 40); transition 40 -> 20
    @16x16; dense block of 2 layers (20 -> 36); final BN and ReLU; head."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.stem = stem(norm)
        self.block1 = DenseBlock(3, 16, 8, 2, norm)
        self.trans1 = Transition(40, 20, norm)
        self.block2 = DenseBlock(2, 20, 8, 2, norm)
        self.norm_final = norm(36)
        self.head = Head(36)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.trans1(self.block1(self.stem(x))))
        return self.head(torch.relu(self.norm_final(h)))


# -- Inception with BN (Section 4.2: 5x5 convolutions replaced by two 3x3) ----------------------

class ConvBN(nn.Sequential):
    """conv, BN, ReLU (the paper's Inception unit, Section 3.2: BN before the nonlinearity)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, norm=nn.BatchNorm2d, bias: bool = False) -> None:
        super().__init__(conv(cin, cout, k, stride, bias=bias), norm(cout), nn.ReLU(inplace=True))


class InceptionModule(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (for the 5x5);
    3x3 average pooling -> 1x1 projection (which keeps a redundant conv bias on purpose)."""

    def __init__(self, cin: int, norm) -> None:
        super().__init__()
        self.b1 = ConvBN(cin, 8, 1, norm=norm)
        self.b3 = nn.Sequential(ConvBN(cin, 6, 1, norm=norm), ConvBN(6, 8, 3, norm=norm))
        self.b33 = nn.Sequential(ConvBN(cin, 4, 1, norm=norm), ConvBN(4, 6, 3, norm=norm), ConvBN(6, 6, 3, norm=norm))
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)
        self.proj = ConvBN(cin, 4, 1, norm=norm, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b33(x), self.proj(self.pool(x))], 1)


class InceptionReduction(nn.Module):
    """The stride-2 module: 1x1 -> 3x3/2; 1x1 -> 3x3 -> 3x3/2; 3x3/2 max pooling of the
    input, concatenated (the paper's pass-through pooling branch)."""

    def __init__(self, cin: int, norm) -> None:
        super().__init__()
        self.b3 = nn.Sequential(ConvBN(cin, 8, 1, norm=norm), ConvBN(8, 12, 3, 2, norm=norm))
        self.b33 = nn.Sequential(ConvBN(cin, 8, 1, norm=norm), ConvBN(8, 10, 3, norm=norm),
                                 ConvBN(10, 10, 3, 2, norm=norm))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b3(x), self.b33(x), self.pool(x)], 1)


class Inception(nn.Module):
    """stem 16 @32x32; Inception module 16 -> 26; reduction 26 -> 48 @16x16; head."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.stem = stem(norm)
        self.mixed = InceptionModule(16, norm)
        self.reduce = InceptionReduction(26, norm)
        self.head = Head(48)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.reduce(self.mixed(self.stem(x))))


_BUILDERS = {"resnet_basic": resnet_basic, "resnet_bottleneck": resnet_bottleneck, "mobilenet_v2": MobileNetV2,
             "densenet": DenseNet, "inception": Inception}
assert list(_BUILDERS) == NAMES


def build(name: str, norm=nn.BatchNorm2d) -> nn.Module:
    """The zoo's model ``name`` (one of :data:`NAMES`) with ``norm(C)`` for every BN layer."""
    return _BUILDERS[name](norm)
