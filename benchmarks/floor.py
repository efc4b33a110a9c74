"""How close a BN training step can come to nothing but its memory traffic, on this machine.

    python benchmarks/floor.py [--quick] [--system-malloc]

Issue 7 asks for training forward+backward at 0.6 of torch's time. A training step must
make (at least) four passes over its tensors: read x for the statistics; read x again and
write y; read dy and x for the two gradient sums; read them again and write dx (8 |x|, the
bound in ops.py). This script compiles ``_passes.c``, four bare streaming passes of exactly
that traffic with one add or multiply-add per element and nothing else (no statistics, no
autograd, no allocation), and times them, in sequence on the same tensors and with the same
threads, interleaved with torch.nn's and our BatchNorm forward+backward. ``floor/torch``
is the fraction of torch's time that the traffic alone takes: an implementation making
these four passes cannot go below it, and reaching it would leave nothing for arithmetic,
the autograd engine or the outputs' allocation.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import bench_args, compare, machine, table  # noqa: E402

# The channels_last shapes of ops.py's suite (torch's kernels there are near the bandwidth
# limit) and its (N, C) row; NCHW rows are 0.42 to 0.46 of torch already.
SHAPES = [((32, 64, 56, 56), True), ((128, 256, 14, 14), True), ((256, 1024), False)]


def build(directory: str) -> ctypes.CDLL:
    from batchnorm import _jit
    cc = _jit._compiler()
    if cc is None:
        raise SystemExit("floor.py needs a C compiler ($CC, cc, gcc or clang)")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_passes.c")
    so = os.path.join(directory, "passes.so")
    proc = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", src, "-o", so],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"floor.py: {cc} could not build _passes.c (it needs OpenMP, -fopenmp):\n"
                         f"{proc.stderr.strip()[-2000:]}")
    lib = ctypes.CDLL(so)
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pass_read.argtypes = [p, p, i64, i]
    lib.pass_read.restype = ctypes.c_double
    lib.pass_write.argtypes = [p, p, p, i64, ctypes.c_float, i]
    lib.pass_write.restype = None
    return lib


def main(argv=None):
    _, repeats = bench_args(__doc__, argv)
    nt = torch.get_num_threads()
    print(f"# benchmarks/floor.py: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        lib = build(d)
        for shape, cl in SHAPES:
            x = torch.randn(*shape)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            gy = torch.randn_like(x)
            xg = x.clone().requires_grad_()
            y, dx = torch.empty_like(x), torch.empty_like(x)
            n = x.numel()
            ours = (bn.BatchNorm2d if len(shape) == 4 else bn.BatchNorm1d)(shape[1])
            ref = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1])

            def step(m):
                def f():
                    xg.grad = None
                    m(xg).backward(gy)
                return f

            def passes():
                lib.pass_read(x.data_ptr(), None, n, nt)                            # statistics
                lib.pass_write(x.data_ptr(), None, y.data_ptr(), n, 1.5, nt)        # normalize
                lib.pass_read(x.data_ptr(), gy.data_ptr(), n, nt)                   # gradient sums
                lib.pass_write(x.data_ptr(), gy.data_ptr(), dx.data_ptr(), n, 1.5, nt)  # dx

            t_ref, t_ours, t_floor = compare([step(ref), step(ours), passes], min_time=5e-3, repeats=repeats)
            rows.append((str(shape), "channels_last" if cl else "contiguous", f"{t_ref * 1e3:.3f}",
                         f"{t_ours * 1e3:.3f}", f"{t_floor * 1e3:.3f}", f"{t_floor / t_ref:.2f}",
                         f"{t_ours / t_ref:.2f}", f"{t_ours / t_floor:.2f}"))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["shape", "format", "torch ms", "ours ms", "4 bare passes ms", "floor/torch", "ours/torch",
                 "ours/floor"], rows))


if __name__ == "__main__":
    main()
