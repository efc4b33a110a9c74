"""Inference latency of the small Inception network folded by batchnorm.fold over the same
network unfolded (eval mode), same process, interleaved; and the folded outputs' error.

    python benchmarks/fold.py [--quick] [--system-malloc]

The network is bnrepro's SmallInception (the Inception experiment's, BN before every
nonlinearity, 27 BN layers), given non-trivial running statistics and affine parameters by
a few training steps on random 28x28 inputs. Folding (Algorithm 2, step 11) merges every BN
into the convolution before it, so the folded network runs one layer fewer per unit.
Timed at batch sizes 1 (latency) and 256 (throughput), under torch.inference_mode(), next
to the floor of any fold: the same architecture built without BN layers, carrying the
folded weights (what removing every BN could at best give).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import bench_args, compare, machine, table  # noqa: E402
from bnrepro.models import SmallInception  # noqa: E402


def trained_network() -> torch.nn.Module:
    torch.manual_seed(0)
    net = SmallInception(bn=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(20):
        x = torch.randn(64, 1, 28, 28) * 0.5 + 0.3
        loss = net(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def no_bn_network(folded: torch.nn.Module) -> torch.nn.Module:
    """The floor of any fold: the same architecture built without BN layers (bias in every
    convolution), carrying the folded weights, as an ordinary nn.Module."""
    plain = SmallInception(bn=False).eval()
    plain.load_state_dict(folded.state_dict())
    return plain


def main(argv=None):
    _, repeats = bench_args(__doc__, argv)
    net = trained_network()
    folded = bn.fold(net)
    floor = no_bn_network(folded)
    n_bn = sum(bn.population.is_batchnorm(m) for m in net.modules())
    n_left = sum(bn.population.is_batchnorm(m) or isinstance(m, bn.ChannelAffine) for m in folded.modules())
    print(f"# benchmarks/fold.py: {machine()}")
    print(f"# SmallInception: {n_bn} BN layers; after fold: {n_left} BN or affine layers left")
    rows, ratios = [], []
    for batch in (1, 256):
        x = torch.randn(batch, 1, 28, 28) * 0.5 + 0.3
        with torch.inference_mode():
            ref, out = net(x), folded(x)
            rel = ((out - ref).abs().max() / ref.abs().max()).item()
            if (floor(x) - out).abs().max() > 1e-5 * ref.abs().max():
                raise RuntimeError("the no-BN network does not compute the folded network's function")
            t_net, t_fold, t_floor = compare([lambda: net(x), lambda: folded(x), lambda: floor(x)], min_time=5e-3,
                                             repeats=repeats)
        ratios.append(t_fold / t_net)
        rows.append((str(batch), f"{t_net * 1e3:.3f}", f"{t_fold * 1e3:.3f}", f"{t_fold / t_net:.2f}",
                     f"{t_floor * 1e3:.3f}", f"{t_floor / t_net:.2f}", f"{rel:.1e}"))
    print(table(["batch", "unfolded ms", "folded ms", "folded/unfolded", "no-BN net ms", "no-BN/unfolded",
                 "max rel. error"], rows))
    print(f"\nlatency (batch 1) ratio {ratios[0]:.2f}, throughput (batch 256) ratio {ratios[1]:.2f} (target <= 0.8); "
          f"outputs within 1e-5 relative: {all(float(r[-1]) <= 1e-5 for r in rows)}")
    print("no-BN net: the same architecture built without BN, with the folded weights; no fold can remove "
          "more than the BN layers, so its ratio is the floor of folded/unfolded on this machine")


if __name__ == "__main__":
    main()
