"""Per-op speed of batchnorm's BatchNorm against torch.nn's, same process, interleaved, with
a memory-bandwidth roofline.

    python benchmarks/ops.py [--quick] [--impl auto|kernels|torch|reference] [--system-malloc]

For every shape and format of the suite it times train forward, train forward+backward
and eval forward of both modules (median of many interleaved repeats) and prints the
ratio ours / torch.

Roofline: the machine's bandwidth is measured in the same run (a 64 MiB copy, bytes read
plus written), and each row reports the lower-bound time, the fewest bytes the operation
must move over that bandwidth, and each implementation's fraction of it (100 % = at the
limit). Bytes per operation, with |x| the tensor's size in bytes:

* eval forward: read x, write y: 2 |x|.
* train forward: read x for the statistics, read it again to normalize, write y: 3 |x|.
* train forward+backward: the forward's 3 |x|, plus read dy and x for the two gradient
  sums, read them again for dx, write dx: 8 |x| in all.

An implementation that keeps a channel in cache between its two passes moves less than
that, so its fraction can exceed 100 %. For the smallest shapes the tensors live in cache
and the bound says little; per-call overhead decides those rows.

Allocator: fresh outputs of tens of MB are where glibc's malloc decides, from the state of
its heap, whether to hand back recycled memory or new pages that fault on first touch,
and the faults (about a microsecond per 4 KiB page here) then dominate both columns at
random. The script therefore re-executes itself once with glibc's mmap and trim thresholds
pinned (GLIBC_TUNABLES; what jemalloc/tcmalloc users get anyway), so that rows compare the
kernels. ``--system-malloc`` keeps the default allocator.

Summary lines: the issue's targets are stated over float32 contiguous and channels_last
train forward+backward rows (median ratio, max ratio) and eval rows (max ratio).

An AVX2-only machine (no AVX-512), emulated on this one: both sides limited to AVX2,

    ATEN_CPU_CAPABILITY=avx2 BATCHNORM_MARCH=x86-64-v3 python benchmarks/ops.py

(the header line says which instruction sets were in use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import compare, machine, pin_malloc, table  # noqa: E402

SHAPES = [(32, 64, 56, 56), (128, 256, 14, 14), (256, 1024), (60, 100)]
FORMATS = ["fp32", "fp32-channels_last", "bf16"]
PASSES = {"train fwd": 3, "train fwd+bwd": 8, "eval fwd": 2}


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


def bandwidth(repeats: int) -> float:
    """Bytes per second of a large copy (read plus write), torch's threads."""
    src = torch.randn(16 << 20)  # 64 MiB
    dst = torch.empty_like(src)
    t = compare([lambda: dst.copy_(src)], min_time=0.02, repeats=repeats)[0]
    return 2 * src.numel() * src.element_size() / t


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

    rows = []
    for op, make, mode in (("train fwd", train_fwd, "train"), ("train fwd+bwd", train_fwdbwd, "train"),
                           ("eval fwd", train_fwd, "eval")):
        for m in (ours, ref):
            m.train(mode == "train")
        t_ours, t_ref = compare([make(ours), make(ref)], min_time=min_time, repeats=repeats)
        rows.append((op, t_ours, t_ref, PASSES[op] * x.numel() * x.element_size()))
    return rows


def first_call_latency() -> str:
    """Seconds to build the fused kernels into an empty cache (what a first run pays once)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, BATCHNORM_CACHE=d)
        code = "import time, torch; from batchnorm import _jit; t = time.perf_counter(); s = _jit.status(); " \
               "print(f'{time.perf_counter() - t:.2f} s ({s})')"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        return out.stdout.strip() or out.stderr.strip()[-200:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--impl", default="auto", choices=["auto", "kernels", "torch", "reference"])
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc behaviour")
    args = p.parse_args(argv)
    if not args.system_malloc:
        pin_malloc()
    repeats, min_time = (7, 1e-3) if args.quick else (21, 3e-3)
    from batchnorm import _jit
    bw = bandwidth(repeats)
    print(f"# benchmarks/ops.py, impl={args.impl}: {machine()}")
    print(f"# kernels: {_jit.status()}; malloc: {os.environ.get('GLIBC_TUNABLES', 'glibc default')}")
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s (read + write); first build of the kernels: "
          f"{first_call_latency()}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    out, results = [], []
    for shape in SHAPES:
        for fmt in FORMATS:
            if fmt == "fp32-channels_last" and len(shape) != 4:
                continue
            for op, t_ours, t_ref, nbytes in bench_row(shape, fmt, args.impl, min_time, repeats):
                bound = nbytes / bw
                ratio = t_ours / t_ref
                results.append((fmt, op, ratio))
                out.append((str(shape), fmt, op, f"{t_ref * 1e3:.3f}", f"{t_ours * 1e3:.3f}", f"{ratio:.2f}",
                            f"{bound * 1e3:.3f}", f"{100 * bound / t_ref:.0f}%", f"{100 * bound / t_ours:.0f}%"))
                print(" | ".join(out[-1]), file=sys.stderr, flush=True)
    print(table(["shape", "format", "op", "torch ms", "ours ms", "ours/torch", "bound ms", "torch of bound",
                 "ours of bound"], out))
    fp32 = [r for f, o, r in results if f.startswith("fp32") and o == "train fwd+bwd"]
    ev = [r for f, o, r in results if f.startswith("fp32") and o == "eval fwd"]
    allr = [r for _, _, r in results]
    print(f"\nfp32 train fwd+bwd (contiguous and channels_last): median ratio {statistics.median(fp32):.2f}, "
          f"max {max(fp32):.2f} over {len(fp32)} rows")
    print(f"fp32 eval fwd: max ratio {max(ev):.2f} over {len(ev)} rows")
    print(f"all rows: median ratio {statistics.median(allr):.2f}, max {max(allr):.2f} over {len(allr)} rows")


if __name__ == "__main__":
    main()
