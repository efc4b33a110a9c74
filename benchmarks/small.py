"""Small layers, where per-call Python decides: this checkout against an earlier commit's
package (default 5bf89d3, the last before the one-core rework), both loaded in one process
and timed interleaved, with torch.nn beside them.

ops.py times each side in its own process, and on a shared machine two runs of one commit
there differ by up to 30 % on the small rows, far more than the few microseconds in
question. Here the earlier package is copied from git into a temporary directory under the
name ``batchnorm_base`` (its registered operators renamed ``batchnorm_base::``, so that
both can register theirs), and the three modules are timed A B C A B C ... (median of
many interleaved repeats, benchmarks/_timing.compare), so that the machine's moods hit
them alike. Rows: ops.py's small shapes ((256, 1024): the fused kernels; (60, 100):
torch's kernel) plus (4096, 8), the smallest input of the fused path (32,768 elements),
float32, training forward (under no_grad, as ops.py's "train fwd") and forward+backward.

    PYTHONPATH=src python benchmarks/small.py [--base COMMIT] [--quick] [--system-malloc]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import compare, machine, pin_malloc, table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(256, 1024), (4096, 8), (60, 100)]


def load_base(commit: str, where: str):
    """That commit's src/batchnorm as the package ``batchnorm_base``."""
    pkg = os.path.join(where, "batchnorm_base")
    os.makedirs(pkg)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{commit}:src/batchnorm"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "show", f"{commit}:src/batchnorm/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        if name.endswith(".py"):
            text = text.replace('"batchnorm::', '"batchnorm_base::').replace("torch.ops.batchnorm.",
                                                                            "torch.ops.batchnorm_base.")
        with open(os.path.join(pkg, name), "w") as f:
            f.write(text)
    sys.path.insert(0, where)
    return importlib.import_module("batchnorm_base")


def row_fns(shape, lib):
    """(train fwd, train fwd+bwd) callables of a fresh module of ``lib`` on ``shape``."""
    c = shape[1]
    m = lib.BatchNorm1d(c) if len(shape) == 2 else lib.BatchNorm2d(c)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    gy = torch.randn(*shape, generator=g)
    xg = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            m(x)

    def fwdbwd():
        xg.grad = None
        m(xg).backward(gy)

    return fwd, fwdbwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="5bf89d3", help="the earlier commit (default 5bf89d3)")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc behaviour")
    args = p.parse_args(argv)
    if not args.system_malloc:
        pin_malloc()
    repeats, min_time = (11, 2e-3) if args.quick else (61, 5e-3)
    with tempfile.TemporaryDirectory() as where:
        base = load_base(args.base, where)
        from batchnorm import _jit
        print(f"# benchmarks/small.py, base {args.base}: {machine()}")
        print(f"# kernels: ours {_jit.status()}; base {base._jit.status()}")
        print(f"# malloc: {os.environ.get('GLIBC_TUNABLES', 'glibc default')}; {repeats} interleaved repeats")
        rows = []
        for shape in SHAPES:
            sides = [row_fns(shape, lib) for lib in (base, bn, nn)]
            for k, op in enumerate(("train fwd", "train fwd+bwd")):
                t_base, t_ours, t_torch = compare([s[k] for s in sides], min_time=min_time, repeats=repeats)
                rows.append((str(shape), op, f"{t_torch * 1e6:.1f}", f"{t_base * 1e6:.1f}", f"{t_ours * 1e6:.1f}",
                             f"{t_ours / t_base:.3f}", f"{t_base / t_torch:.2f}", f"{t_ours / t_torch:.2f}"))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["shape", "op", "torch us", f"{args.base} us", "ours us", f"ours / {args.base}",
                 f"{args.base} / torch", "ours / torch"], rows))


if __name__ == "__main__":
    main()
