"""Per-op speed of batchnorm's BatchNorm against torch.nn's, same process, interleaved.

    python benchmarks/ops.py [--quick] [--impl auto|paper]

For every shape and format of the suite it times train forward, train forward+backward
and eval forward of both modules and prints median times and the ratio ours / torch.
Run it twice before believing a number: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import compare, machine, table  # noqa: E402

SHAPES = [(32, 64, 56, 56), (128, 256, 14, 14), (256, 1024), (60, 100)]
FORMATS = ["fp32", "fp32-channels_last", "bf16"]


def modules(shape):
    c = shape[1]
    if len(shape) == 2:
        return bn.BatchNorm1d(c), nn.BatchNorm1d(c)
    return bn.BatchNorm2d(c), nn.BatchNorm2d(c)


def make_input(shape, fmt):
    x = torch.randn(*shape)
    if fmt == "fp32-channels_last":
        x = x.to(memory_format=torch.channels_last)
    if fmt == "bf16":
        x = x.to(torch.bfloat16)
    return x


def bench_row(shape, fmt, impl, min_time, repeats):
    ours, ref = modules(shape)
    ours.impl = impl
    x = make_input(shape, fmt)
    gy = torch.randn_like(x)
    xg = x.clone().requires_grad_()

    def train_fwd(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    def train_fwdbwd(m):
        def f():
            xg.grad = None
            m(xg).backward(gy)
        return f

    def eval_fwd(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    rows = []
    for op, make, mode in (("train fwd", train_fwd, "train"), ("train fwd+bwd", train_fwdbwd, "train"),
                           ("eval fwd", eval_fwd, "eval")):
        for m in (ours, ref):
            m.train(mode == "train")
        t_ours, t_ref = compare([make(ours), make(ref)], min_time=min_time, repeats=repeats)
        rows.append((op, t_ours, t_ref))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--impl", default="auto", choices=["auto", "paper", "native"])
    args = p.parse_args(argv)
    repeats, min_time = (7, 1e-3) if args.quick else (21, 3e-3)
    print(f"# benchmarks/ops.py, impl={args.impl}: {machine()}")
    out = []
    ratios = []
    for shape in SHAPES:
        for fmt in FORMATS:
            if fmt == "fp32-channels_last" and len(shape) != 4:
                continue
            for op, t_ours, t_ref in bench_row(shape, fmt, args.impl, min_time, repeats):
                ratio = t_ours / t_ref
                ratios.append(ratio)
                out.append((str(shape), fmt, op, f"{t_ref * 1e3:.3f}", f"{t_ours * 1e3:.3f}", f"{ratio:.2f}"))
                print(" | ".join(out[-1]), file=sys.stderr, flush=True)
    print(table(["shape", "format", "op", "torch ms", "ours ms", "ours/torch"], out))
    print(f"\nmedian ratio {statistics.median(ratios):.2f}, max ratio {max(ratios):.2f} over {len(ratios)} rows")


if __name__ == "__main__":
    main()
