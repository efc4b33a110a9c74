"""End to end: training-step time of whole networks with our BN layers over the same networks
with torch.nn's, same process, interleaved (forward, backward, SGD step).

    python benchmarks/e2e.py [--quick] [--system-malloc]

Networks (bnrepro.models, built twice from one seed, differing only in the BN class):

* Figure 1's MLP: 784-100-100-100-10, sigmoid, BN on the three hidden layers, batch 60
  (the paper's MNIST setting).
* A BN conv net: three 3x3 convs (16, 32, 64 channels) with BN and ReLU on 28x28 inputs,
  batch 64, in NCHW and in channels_last.
* The small Inception network of the Inception experiment (27 BN layers), batch 64.
* The ResNet-18-style network of ``_nets.py`` on 64x64 inputs, batch 32, NCHW and
  channels_last: torch.nn's BatchNorm2d + ReLU(inplace=True) against
  ``batchnorm.convert(model, fuse_activations=True)`` of it, where every BN + ReLU (+ the
  block's residual add) is one ``BatchNormAct2d``. The floor row is the
  torch.nn network with every BN and ReLU replaced by nn.Identity: the step time if BN and
  the activation cost nothing, so no BN layer can bring the ratio below floor / torch.
  Fewer repeats (7): a step takes seconds.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import bench_args, compare, machine, table  # noqa: E402
from _nets import resnet18  # noqa: E402
from bnrepro import models  # noqa: E402


def to_torch_bn(net: nn.Module) -> nn.Module:
    """The same network with every BN of ours replaced by torch.nn's (state copied)."""
    for name, child in net.named_children():
        if isinstance(child, (bn.BatchNorm1d, bn.BatchNorm2d)):
            cls = nn.BatchNorm1d if isinstance(child, bn.BatchNorm1d) else nn.BatchNorm2d
            new = cls(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(net, name, new)
        else:
            to_torch_bn(child)
    return net


def networks():
    torch.manual_seed(0)
    mlp = models.mnist_mlp(True, init_std=0.1)
    torch.manual_seed(0)
    conv = models.small_convnet("bn")
    torch.manual_seed(0)
    inception = models.SmallInception(bn=True)
    return [("Figure 1 MLP, batch 60", mlp, (60, 784), False),
            ("BN conv net, batch 64", conv, (64, 1, 28, 28), False),
            ("BN conv net, batch 64, channels_last", conv, (64, 1, 28, 28), True),
            ("small Inception, batch 64", inception, (64, 1, 28, 28), False)]


def step_fn(net, x, y):
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    return step


def main(argv=None):
    _, repeats = bench_args(__doc__, argv)
    print(f"# benchmarks/e2e.py: {machine()}")
    rows = []
    for name, net, shape, cl in networks():
        import copy
        ours = copy.deepcopy(net).train()
        ref = to_torch_bn(copy.deepcopy(net)).train()
        if cl:
            ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = torch.randn(*shape)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (shape[0],))
        t_ours, t_ref = compare([step_fn(ours, x, y), step_fn(ref, x, y)], min_time=2e-2, repeats=repeats)
        rows.append((name, f"{t_ref * 1e3:.3f}", f"{t_ours * 1e3:.3f}", f"{t_ours / t_ref:.2f}"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["network", "torch.nn BN ms/step", "ours ms/step", "ours/torch"], rows))
    print()
    print(table(["ResNet-18-style, 64x64, batch 32", "torch.nn ms/step", "ours ms/step", "ours/torch",
                 "floor ms/step", "floor/torch"], resnet_rows(min(repeats, 7))))


def _strip_bn_and_relu(net: nn.Module) -> nn.Module:
    for name, child in net.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.ReLU)):
            setattr(net, name, nn.Identity())
        else:
            _strip_bn_and_relu(child)
    return net


def resnet_rows(repeats):
    rows = []
    for cl in (False, True):
        ref = resnet18().train()
        ours = bn.convert(copy.deepcopy(ref), fuse_activations=True).train()
        assert sum(isinstance(m, bn.BatchNormAct2d) for m in ours.modules()) == 17  # every BN + ReLU
        floor = _strip_bn_and_relu(resnet18()).train()
        x = torch.randn(32, 3, 64, 64)
        if cl:
            ref, ours, floor = (m.to(memory_format=torch.channels_last) for m in (ref, ours, floor))
            x = x.to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (32,))
        t_ours, t_ref, t_floor = compare([step_fn(ours, x, y), step_fn(ref, x, y), step_fn(floor, x, y)],
                                         min_time=0.0, repeats=repeats, warmup=1)
        rows.append(("channels_last" if cl else "NCHW", f"{t_ref * 1e3:.1f}", f"{t_ours * 1e3:.1f}",
                     f"{t_ours / t_ref:.2f}", f"{t_floor * 1e3:.1f}", f"{t_floor / t_ref:.2f}"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


if __name__ == "__main__":
    main()
