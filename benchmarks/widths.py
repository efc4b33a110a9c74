"""Training speed of our BatchNorm2d over torch.nn's across channel counts, channels_last.

    python benchmarks/widths.py [--quick] [--system-malloc]

ops.py's suite has two channels_last widths (64, 256). Real networks use many others, and
the channels-innermost kernels take different code for different widths (whole rows in
registers up to 256 channels, the last vector masked when C is not a multiple of 16, other
ways above; see src/batchnorm/_kernels.c). This script times ops.py's three operations on
(32, C, 28, 28) channels_last float32 tensors for widths common in CNNs, same process,
interleaved, and prints ours/torch per width.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench_args, machine, table  # noqa: E402
from ops import bench_row  # noqa: E402

WIDTHS = [16, 24, 32, 40, 48, 64, 72, 96, 112, 120, 128, 144, 160, 192, 200, 240, 256, 320, 384, 512]


def main(argv=None):
    args, repeats = bench_args(__doc__, argv)
    min_time = 1e-3 if args.quick else 3e-3
    print(f"# benchmarks/widths.py: {machine()}")
    rows = []
    for c in WIDTHS:
        shape = (32, c, 28, 28)
        r = {op: t_ours / t_ref for op, t_ours, t_ref, _ in bench_row(shape, "fp32-channels_last", "auto", min_time,
                                                                       repeats)}
        rows.append((str(c), f"{r['train fwd']:.2f}", f"{r['train fwd+bwd']:.2f}", f"{r['eval fwd']:.2f}"))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["C", "train fwd", "train fwd+bwd", "eval fwd"], rows))
    fb = sorted(float(r[2]) for r in rows)
    print(f"\ntrain fwd+bwd over {len(rows)} widths: median {fb[len(fb) // 2]:.2f}, max {fb[-1]:.2f}")


if __name__ == "__main__":
    main()
