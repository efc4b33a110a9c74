"""The variants built on the hand-written path against plain BN on the same input: training
forward+backward time of ghost batches, masked statistics and Batch Renormalization over
our plain BatchNorm's, same process, interleaved.

    python benchmarks/variants.py [--quick] [--system-malloc]

SyncBatchNorm needs several processes; benchmarks/sync.py times it (on one process it is
plain BN). Target: every variant within 1.5x plain BN.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import bench_args, compare, machine, table  # noqa: E402


def cases():
    conv = (32, 64, 56, 56)
    seq = (64, 256, 128)
    return [
        ("ghost batches (8 of 4)", conv, False, lambda: bn.BatchNorm2d(64, virtual_batch_size=4), None),
        ("ghost batches (8 of 4), channels_last", conv, True, lambda: bn.BatchNorm2d(64, virtual_batch_size=4), None),
        ("Batch Renorm", conv, False, lambda: bn.BatchRenorm2d(64, r_max=3.0, d_max=5.0), None),
        ("Batch Renorm, channels_last", conv, True, lambda: bn.BatchRenorm2d(64, r_max=3.0, d_max=5.0), None),
        ("masked statistics (N, C, L)", seq, False, lambda: bn.BatchNorm1d(256), "mask"),
    ]


def main(argv=None):
    _, repeats = bench_args(__doc__, argv)
    print(f"# benchmarks/variants.py: {machine()}")
    rows = []
    for name, shape, cl, make, extra in cases():
        x = torch.randn(*shape)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        xg = x.clone().requires_grad_()
        gy = torch.randn_like(x)
        plain = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(shape[1])
        variant = make()
        mask = None
        if extra == "mask":
            mask = torch.rand(shape[0], shape[2]) > 0.25

        def run(m, with_mask):
            def f():
                xg.grad = None
                (m(xg, mask) if with_mask else m(xg)).backward(gy)
            return f
        t_var, t_plain = compare([run(variant, mask is not None), run(plain, False)], min_time=5e-3, repeats=repeats)
        rows.append((name, str(shape), f"{t_plain * 1e3:.3f}", f"{t_var * 1e3:.3f}", f"{t_var / t_plain:.2f}"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["variant", "shape", "plain BN ms", "variant ms", "variant/plain"], rows))


if __name__ == "__main__":
    main()
