"""Per-call cost of the kernel boundary (batchnorm._fused): this checkout against the
positional-argument interface of an earlier commit (default 5bf89d3, the last one before
the argument structs), in one process, interleaved, median of many repeats.

The tensors are tiny ((4, 8) float32: the kernels' own work is a few dozen additions), and
everything runs on one thread, so what is timed is the Python side of one call: checking
the tensors, filling the arguments, ctypes, the return. Both sides' kernels are built from
their own commit's _kernels.c with their own commit's _jit.py (cached like any build).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/calls.py [--base COMMIT]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import compare, machine, table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_base(commit: str, where: str):
    """That commit's _jit and _fused as modules of their own, its _fused on its _jit."""
    for name in ("_jit.py", "_fused.py", "_kernels.c"):
        text = subprocess.run(["git", "show", f"{commit}:src/batchnorm/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        with open(os.path.join(where, name), "w") as f:
            f.write(text)
    mods = {}
    for name in ("_jit", "_fused"):
        spec = importlib.util.spec_from_file_location(f"batchnorm._base{name}", os.path.join(where, name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # _fused's "from . import _jit" imports ours; replaced below
        mods[name] = mod
    mods["_fused"]._jit = mods["_jit"]
    if mods["_jit"].kernels() is None:
        raise SystemExit(f"the kernels of {commit} did not load: {mods['_jit'].status()}")
    return mods["_fused"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="5bf89d3", help="commit with the positional interface (default 5bf89d3)")
    ap.add_argument("--repeats", type=int, default=41)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from batchnorm import _fused as new, _stats
    if not new.available():
        raise SystemExit("the kernels of this checkout did not load")
    with tempfile.TemporaryDirectory() as where:
        old = _load_base(args.base, where)
        x = torch.randn(4, 8)
        dy = torch.randn(4, 8)
        w, b = torch.rand(8) + 0.5, torch.randn(8)
        lay = new.layout(x)
        rm, rv, nbt = torch.zeros(8), torch.ones(8), torch.tensor(0)
        _, st, _ = new.train_forward(x, lay, w, b, 1e-5, var_scale=4 / 3)
        mean, invstd = st[0].clone(), st[1].clone()

        def new_step():  # the forward, then the one running update as the library calls it
            _, s, ok = new.train_forward(x, lay, w, b, 1e-5, var_scale=4 / 3)
            _stats.update_running_stats(rm, rv, nbt, None, None, 0.1, finite=ok, stats=s)

        def torch_update():  # the same update in torch operations (the path of other devices)
            mu, _, var = st.view(3, 8).unbind()
            torch._foreach_lerp_((rm.data, rv.data), (mu, var), 0.1)
            nbt.add_(1)

        rows = []
        pairs = [
            ("train_forward", lambda: old.train_forward(x, lay, w, b, 1e-5, None, None, 0.0),
             lambda: new.train_forward(x, lay, w, b, 1e-5, var_scale=4 / 3)),
            ("train_backward", lambda: old.train_backward(dy, x, lay, w, st, True, True, True),
             lambda: new.train_backward(dy, x, lay, w, st, True, True, True)),
            ("check_stats", lambda: old.check_stats(mean, invstd, 4),
             lambda: new.check_stats(mean, invstd, 4, 1e-3, 2.0 ** -24)),
            ("train_forward + running update", lambda: old.train_forward(x, lay, w, b, 1e-5, rm, rv, 0.1, nbt),
             new_step),
            ("stats", lambda: old.stats(x, lay), lambda: new.stats(x, lay)),
            ("sums", lambda: old.sums(dy, x, lay, mean), lambda: new.sums(dy, x, lay, mean)),
        ]
        for name, a, b_ in pairs:
            ta, tb = compare([a, b_], min_time=5e-3, repeats=args.repeats)
            rows.append((name, f"{ta * 1e6:.2f}", f"{tb * 1e6:.2f}", f"{(tb - ta) * 1e6:+.2f}"))
        # The running update alone, this checkout: torch operations against the kernels' one call.
        ta, tb = compare([torch_update, lambda: _stats.update_running_stats(rm, rv, nbt, None, None, 0.1, finite=True,
                                                                            stats=st)],
                         min_time=5e-3, repeats=args.repeats)
        update_row = ("running update", f"{ta * 1e6:.2f}", f"{tb * 1e6:.2f}", f"{(tb - ta) * 1e6:+.2f}")
    print(f"# benchmarks/calls.py, base {args.base}: {machine()}")
    print(f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, tensors (4, 8) float32")
    print(table(["call", f"{args.base} us", "this checkout us", "difference us"], rows))
    print()
    print("The running update of this checkout (num_batches_tracked included), two ways:")
    print(table(["update", "torch operations us (row views, _foreach_lerp_, add_)",
                 "update_running_stats us (one bn_lerp call)", "difference us"], [update_row]))


if __name__ == "__main__":
    main()
