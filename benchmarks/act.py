"""BN + activation (+ residual add) as one layer: batchnorm.BatchNormAct2d against torch.nn's
BatchNorm2d followed by the same activation, training forward+backward, same process,
interleaved.

    python benchmarks/act.py [--quick] [--system-malloc] [--part blocks|memory|all] [--smooth] [--floor]

Rows, per shape and memory format (float32, NCHW and channels_last):

* BN+ReLU: ours ``BatchNormAct2d(C, act="relu")`` against torch's best of
  ``relu(bn(x))`` with ReLU out of place and in place (both are timed; the faster one is
  the reference).
* BN+add+ReLU: ours ``m(x, residual=r)`` against ``torch.relu(bn(x) + r)``; the gradient
  reaches x and r on both sides.
* BN+leaky_relu in place (``inplace=True``, In-Place ABN): ours against torch's
  ``leaky_relu(bn(x), 0.01, inplace=True)``.
* BN+ELU, BN+SiLU, BN+GELU (exact, erf): ours ``BatchNormAct2d(C, act=...)`` against
  torch.nn's ``nn.ELU()(bn(x))``, ``nn.SiLU()(bn(x))``, ``nn.GELU()(bn(x))`` (``--smooth``:
  these rows only).

Passes over memory (|x| per pass), counted for the roofline column as in ops.py, ours:
forward 1 read for the statistics + 1 read and 1 write for y (+ 1 read of r); backward 1
read each of dy and x for the sums, again for dx, 1 write of dx (+ 1 write of dr; with a
residual the sign of the pre-activation rides along as a byte per value). torch's BN+ReLU
adds a read and a write for ReLU forward and two reads and a write for its backward, the
add another two reads and a write.

The floor (``--floor``: the BN+ReLU and BN+add+ReLU rows only): floor.py's bare streaming
passes (``_passes.c``, one add or multiply-add per element, no statistics, no autograd, no
allocation) of exactly the traffic the fused layer cannot avoid, timed interleaved with both
sides: read x; read x (and r) and write y; read dy and x; read them and write dx (and, with
a residual, write dr). The sign the backward needs (a bit per value at least) is left out,
so this is a lower bound for any layer that reads and writes what these passes do:
floor/torch above a target rules the target out for that row.

Memory (``--part memory`` or ``all``): peak training memory of the ResNet-18-style network
of ``_nets.py`` on 64x64 inputs, batch 32, one training step (forward, cross-entropy,
backward) in a fresh subprocess per configuration: the process's peak resident set
(VmHWM) after the step minus its resident set (VmRSS) just before it, with the model, the
input and the kernels already loaded, with glibc's mmap threshold fixed at 128 KiB (every
tensor larger than that is mapped on allocation and unmapped when freed, so the resident
set follows the live tensors; under the default, adaptive threshold the peak varied by
+-10 % between runs, with the heap's recycling); and the tensors
autograd saved for the backward (a saved_tensors_hooks pack hook, each storage counted
once), the memory a training step keeps between its forward and its backward. Configurations: torch.nn's BatchNorm2d +
ReLU(inplace=True); ours, BatchNormAct2d(relu) out of place; ours, BatchNormAct2d(leaky_relu
0.01, inplace=True), the in-place mode (In-Place ABN replaces ReLU by leaky ReLU, as here).

Allocator: as ops.py (pinned glibc thresholds unless ``--system-malloc``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as tF
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import compare, machine, pin_malloc, table  # noqa: E402

SHAPES = [(32, 64, 56, 56), (128, 256, 14, 14), (32, 128, 28, 28), (64, 512, 7, 7)]
FORMATS = ["NCHW", "channels_last"]


def _fwdbwd(fn, x, gy, r=None):
    """One training step of ``fn`` (forward, backward into x and r)."""
    def step():
        x.grad = None
        if r is not None:
            r.grad = None
        fn().backward(gy)
    return step


def rows_for(shape, fmt, repeats, min_time):
    c = shape[1]
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    base = torch.randn(*shape).to(memory_format=mf)
    x = base.clone().requires_grad_()
    r = torch.randn(*shape).to(memory_format=mf).requires_grad_()
    gy = torch.randn(*shape).to(memory_format=mf)
    ref = nn.BatchNorm2d(c).train()
    out = []

    ours = bn.BatchNormAct2d(c, act="relu").train()
    t = compare([_fwdbwd(lambda: ours(x), x, gy),
                 _fwdbwd(lambda: torch.relu(ref(x)), x, gy),
                 _fwdbwd(lambda: torch.relu_(ref(x)), x, gy)], min_time=min_time, repeats=repeats)
    out.append(("BN+ReLU", t[0], min(t[1], t[2]), "in place" if t[2] < t[1] else "out of place"))

    t = compare([_fwdbwd(lambda: ours(x, r), x, gy, r),
                 _fwdbwd(lambda: torch.relu(ref(x) + r), x, gy, r)], min_time=min_time, repeats=repeats)
    out.append(("BN+add+ReLU", t[0], t[1], "relu(bn(x) + r)"))

    # In place: each step overwrites its input, so both sides start from a fresh copy made
    # inside the step (the same copy on both sides).
    leaky = bn.BatchNormAct2d(c, act="leaky_relu", inplace=True).train()
    h = base.clone().requires_grad_()

    def inplace_ours():
        return leaky(h * 1.0)

    def inplace_torch():
        return tF.leaky_relu(ref(h * 1.0), 0.01, inplace=True)
    t = compare([_fwdbwd(inplace_ours, h, gy), _fwdbwd(inplace_torch, h, gy)], min_time=min_time,
                repeats=repeats)
    out.append(("BN+leaky_relu, inplace", t[0], t[1], "copy of x in both"))
    return out + smooth_rows(c, x, gy, ref, repeats, min_time)


SMOOTH = [("BN+ELU", "elu", nn.ELU), ("BN+SiLU", "silu", nn.SiLU), ("BN+GELU", "gelu", nn.GELU)]


def smooth_rows(c, x, gy, ref, repeats, min_time):
    """The smooth activations: ours against torch.nn's BN followed by the activation module."""
    out = []
    for name, act, module in SMOOTH:
        ours, theirs = bn.BatchNormAct2d(c, act=act).train(), module()
        t = compare([_fwdbwd(lambda: ours(x), x, gy), _fwdbwd(lambda: theirs(ref(x)), x, gy)], min_time=min_time,
                    repeats=repeats)
        out.append((name, t[0], t[1], f"nn.{module.__name__}()(bn(x))"))
    return out


MEMORY_CONFIGS = [
    ("torch.nn BatchNorm2d + ReLU(inplace=True)", "None"),
    ("ours, BatchNormAct2d(relu)", "{'act': 'relu'}"),
    ("ours, BatchNormAct2d(leaky_relu 0.01, inplace=True)", "{'act': 'leaky_relu', 'inplace': True}"),
]

_MEMORY_CHILD = """
import sys, torch
sys.path.insert(0, {here!r})
from batchnorm import _jit
from _nets import resnet18
_jit.kernels()
net = resnet18({config}).train()
x = torch.randn(32, 3, 64, 64)
y = torch.randint(0, 10, (32,))
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
saved = {{}}
def pack(t):  # every tensor autograd keeps for the backward, counted once per storage
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t
before = status("VmRSS")
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = torch.nn.functional.cross_entropy(net(x), y)
loss.backward()
print((status("VmHWM") - before) / 1024, sum(saved.values()) / 2 ** 20)
"""


def memory_rows():
    """(name, MiB) per configuration, each measured in a fresh interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for name, config in MEMORY_CONFIGS:
        code = _MEMORY_CHILD.format(here=here, config=config)
        env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, check=True,
                             env=env)
        peak, saved = (float(v) for v in out.stdout.split()[-2:])
        rows.append((name, peak, saved))
        print(f"{name}: peak {peak:.0f} MiB, saved {saved:.0f} MiB", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--system-malloc", action="store_true", help="keep glibc's default malloc behaviour")
    p.add_argument("--part", choices=["blocks", "memory", "all"], default="all")
    p.add_argument("--smooth", action="store_true", help="only the smooth-activation rows, (32, 64, 56, 56) only")
    p.add_argument("--floor", action="store_true", help="only BN+ReLU and BN+add+ReLU, against their bare passes")
    args = p.parse_args(argv)
    if not args.system_malloc:
        pin_malloc()
    repeats = 7 if args.quick else 21
    min_time = 1e-3 if args.quick else 3e-3
    from batchnorm import _jit
    what = "--floor" if args.floor else "--smooth" if args.smooth else "--part " + args.part
    print(f"# benchmarks/act.py {what}: {machine()}")
    print(f"# kernels: {_jit.status()}; malloc: {os.environ.get('GLIBC_TUNABLES', 'glibc default')}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if args.floor:
        floors(repeats, min_time)
    elif args.smooth:
        blocks(repeats, min_time, shapes=SHAPES[:1], rows=_smooth_only)
    elif args.part in ("blocks", "all"):
        blocks(repeats, min_time)
    if args.part in ("memory", "all") and not (args.smooth or args.floor):
        rows = memory_rows()
        ref, ref_saved = rows[0][1], rows[0][2]
        print()
        print(table(["ResNet-18-style, 64x64, batch 32: one training step", "peak MiB", "of torch.nn's",
                     "saved for backward MiB", "of torch.nn's"],
                    [(n, f"{m:.0f}", f"{m / ref:.2f}", f"{sv:.0f}", f"{sv / ref_saved:.2f}") for n, m, sv in rows]))


def floors(repeats, min_time):
    """BN+ReLU and BN+add+ReLU against their bare passes (see the module docstring)."""
    import tempfile
    import floor
    out, ratios = [], {}
    nt = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        lib = floor.build(d)
        for shape in SHAPES:
            for fmt in FORMATS:
                mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                x = torch.randn(*shape).to(memory_format=mf).requires_grad_()
                r = torch.randn(*shape).to(memory_format=mf).requires_grad_()
                gy = torch.randn(*shape).to(memory_format=mf)
                y, dx, dr = (torch.empty_like(gy) for _ in range(3))
                n = x.numel()
                ref = nn.BatchNorm2d(shape[1]).train()
                ours = bn.BatchNormAct2d(shape[1], act="relu").train()

                def passes(res):
                    def f():
                        lib.pass_read(x.data_ptr(), None, n, nt)                                  # statistics
                        lib.pass_write(x.data_ptr(), r.data_ptr() if res else None, y.data_ptr(), n, 1.5, nt)  # y
                        lib.pass_read(x.data_ptr(), gy.data_ptr(), n, nt)                         # sums
                        lib.pass_write(x.data_ptr(), gy.data_ptr(), dx.data_ptr(), n, 1.5, nt)    # dx
                        if res:
                            lib.pass_write(gy.data_ptr(), None, dr.data_ptr(), n, 1.0, nt)        # dr
                    return f

                t = compare([_fwdbwd(lambda: ours(x), x, gy), _fwdbwd(lambda: torch.relu(ref(x)), x, gy),
                             _fwdbwd(lambda: torch.relu_(ref(x)), x, gy), passes(False)],
                            min_time=min_time, repeats=repeats)
                measured = [("BN+ReLU", t[0], min(t[1], t[2]), t[3])]
                t = compare([_fwdbwd(lambda: ours(x, r), x, gy, r), _fwdbwd(lambda: torch.relu(ref(x) + r), x, gy, r),
                             passes(True)], min_time=min_time, repeats=repeats)
                measured.append(("BN+add+ReLU", t[0], t[1], t[2]))
                for block, t_ours, t_ref, t_floor in measured:
                    ratios.setdefault(block, []).append(t_floor / t_ref)
                    out.append((str(shape), fmt, block, f"{t_ref * 1e3:.3f}", f"{t_ours * 1e3:.3f}",
                                f"{t_floor * 1e3:.3f}", f"{t_floor / t_ref:.2f}", f"{t_ours / t_ref:.2f}",
                                f"{t_ours / t_floor:.2f}"))
                    print(" | ".join(out[-1]), file=sys.stderr, flush=True)
    print(table(["shape", "format", "block", "torch ms", "ours ms", "bare passes ms", "floor/torch", "ours/torch",
                 "ours/floor"], out))
    print()
    for block, rs in ratios.items():
        print(f"{block}: floor/torch median {statistics.median(rs):.2f}, min {min(rs):.2f}, max {max(rs):.2f} "
              f"over {len(rs)} rows")


def _smooth_only(shape, fmt, repeats, min_time):
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(*shape).to(memory_format=mf).requires_grad_()
    gy = torch.randn(*shape).to(memory_format=mf)
    return smooth_rows(shape[1], x, gy, nn.BatchNorm2d(shape[1]).train(), repeats, min_time)


def blocks(repeats, min_time, shapes=SHAPES, rows=rows_for):
    out, ratios = [], {}
    for shape in shapes:
        for fmt in FORMATS:
            for block, t_ours, t_ref, note in rows(shape, fmt, repeats, min_time):
                ratios.setdefault(block, []).append(t_ours / t_ref)
                out.append((str(shape), fmt, block, f"{t_ref * 1e3:.3f}", f"{t_ours * 1e3:.3f}",
                            f"{t_ours / t_ref:.2f}", note))
                print(" | ".join(out[-1]), file=sys.stderr, flush=True)
    print(table(["shape", "format", "block", "torch ms", "ours ms", "ours/torch", "torch side"], out))
    print()
    for block, rs in ratios.items():
        print(f"{block} train fwd+bwd: median ratio {statistics.median(rs):.2f}, max {max(rs):.2f} "
              f"over {len(rs)} rows")


if __name__ == "__main__":
    main()
