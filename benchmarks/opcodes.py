"""Python bytecode per training step of a small layer: this checkout against an earlier
commit's package (default 5bf89d3, loaded as in benchmarks/small.py), counted with
``sys.settrace`` opcode events over one call after a warm-up, per function.

Where per-call Python decides the time (benchmarks/small.py), the opcode count says where
it goes without the machine's noise: it is the same on every run.

    PYTHONPATH=src python benchmarks/opcodes.py [--base COMMIT] [--shape 256,1024] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import batchnorm as bn  # noqa: E402
from _timing import machine  # noqa: E402
from small import load_base, row_fns  # noqa: E402


def count(step) -> collections.Counter:
    """Opcodes executed by one call of ``step``, per (file, function)."""
    counts: collections.Counter = collections.Counter()

    def local(frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            counts[(os.path.basename(code.co_filename), code.co_name)] += 1
        return local

    def on_call(frame, event, arg):
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return local

    step()  # warm-up: first-call paths (imports, caches) are not a step's
    sys.settrace(on_call)
    try:
        step()
    finally:
        sys.settrace(None)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="5bf89d3", help="the earlier commit (default 5bf89d3)")
    p.add_argument("--shape", default="256,1024", help="input shape (N,C), default 256,1024")
    p.add_argument("--top", type=int, default=25, help="functions listed per count")
    args = p.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as where:
        base = load_base(args.base, where)
        print(f"# benchmarks/opcodes.py, base {args.base}, shape {shape}: {machine()}")
        for k, op in enumerate(("train fwd (no_grad)", "train fwd+bwd")):
            ours, theirs = count(row_fns(shape, bn)[k]), count(row_fns(shape, base)[k])
            print(f"\n## {op}: ours {sum(ours.values())} opcodes, {args.base} {sum(theirs.values())}\n")
            print(f"| ours | opcodes | {args.base} | opcodes |")
            print("|---|---|---|---|")
            a, b = ours.most_common(args.top), theirs.most_common(args.top)
            for i in range(max(len(a), len(b))):
                left = (f"{a[i][0][0]}:{a[i][0][1]}", str(a[i][1])) if i < len(a) else ("", "")
                right = (f"{b[i][0][0]}:{b[i][0][1]}", str(b[i][1])) if i < len(b) else ("", "")
                print(f"| {left[0]} | {left[1]} | {right[0]} | {right[1]} |")


if __name__ == "__main__":
    main()
