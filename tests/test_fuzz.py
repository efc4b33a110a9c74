"""Fuzz the kernel boundary and every path (issue 15, item 5).

Random shapes, strides (channels_last, transposed, sliced, expanded, negative views),
dtypes, and sizes and dtypes of parameters and buffers, thrown at every module (BatchNorm,
BatchRenorm, SyncBatchNorm without a process group, functional.batch_norm), every impl,
ghost batches and masks, in training and eval, forward and backward. Each example must
give torch.nn's answer (for the variants torch.nn lacks: an independent float64 formula,
where torch.nn accepts the same arguments), or raise TypeError/ValueError/RuntimeError with
a message and leave every parameter and buffer unchanged.

A crash (the boundary's old failure: writes past a buffer, reads of freed copies) would
kill the test process, so the examples run in a subprocess; each prints its description
before it runs, and a crash reports the last one. derandomize=True: the same examples on
every run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn

import batchnorm as bn

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency (pyproject's "test" extra)
    given = None

KINDS = ["BatchNorm", "BatchRenorm", "SyncBatchNorm", "functional"]
CORRUPT = [None] * 6 + ["weight size", "bias size", "running_mean size", "running_var size", "running_var int64",
                        "running_mean float64", "weight float64", "weight float16", "weight strided",
                        "weight negative view", "running_mean strided", "running_var negative view",
                        "counter bool", "running_var meta"]
LAYOUTS = ["contiguous"] * 3 + ["channels_last", "transposed", "sliced", "expanded", "negative view"]
TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (2e-4, 2e-4), torch.float16: (2e-2, 2e-2),
       torch.bfloat16: (8e-2, 5e-2)}
_TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_OUR_BN = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}
_OUR_RENORM = {2: bn.BatchRenorm1d, 3: bn.BatchRenorm1d, 4: bn.BatchRenorm2d, 5: bn.BatchRenorm3d}


if given is not None:
    @st.composite
    def cases(draw):
        kind = draw(st.sampled_from(KINDS))
        rank = draw(st.integers(2, 5))
        c = draw(st.sampled_from([1, 3, 16]))
        n = draw(st.sampled_from([1, 2, 4, 6, 8]))
        spatial = [draw(st.sampled_from([1, 2, 3, 5, 8])) for _ in range(rank - 2)]
        if draw(st.booleans()):  # large enough for the fused plain-BN kernels (32,768 elements)
            if rank == 2:
                n = -(-40000 // c)
            else:
                spatial[0] = -(-40000 // (n * c * max(1, _prod(spatial[1:]))))
        case = dict(
            kind=kind, shape=(n, c, *spatial), impl=draw(st.sampled_from(["auto", "kernels", "torch", "reference"])),
            dtype=draw(st.sampled_from([torch.float32] * 3 + [torch.float64, torch.float16, torch.bfloat16])),
            layout=draw(st.sampled_from(LAYOUTS)), training=draw(st.booleans()) or draw(st.booleans()),
            affine=draw(st.booleans()) or kind == "BatchRenorm", track=draw(st.booleans()) or kind == "BatchRenorm",
            momentum=draw(st.sampled_from([0.1, 0.1, None, 1.0])), eps=draw(st.sampled_from([1e-5, 0.1])),
            corrupt=draw(st.sampled_from(CORRUPT)), grad=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)),
            ghost=None, mask=False,
        )
        if kind in ("BatchNorm", "BatchRenorm") and n >= 4 and draw(st.booleans()):
            case["ghost"] = draw(st.sampled_from([d for d in (1, 2, 3, 4) if n % d == 0 and d < n]))
        if kind in ("BatchNorm", "BatchRenorm", "SyncBatchNorm") and rank == 3 and draw(st.booleans()):
            case["mask"] = True
        if case["impl"] == "torch" and (kind == "BatchRenorm" or case["ghost"] or case["mask"]):
            case["impl"] = "kernels"  # torch has no kernel for these variants (impl="torch" refuses them)
        return case


def _prod(xs):
    p = 1
    for v in xs:
        p *= v
    return p


def _make_input(case):
    """The case's input, with its layout: the same values and strides on every call."""
    g = torch.Generator().manual_seed(case["seed"] + 1)
    shape, dtype, lay = case["shape"], case["dtype"], case["layout"]
    base = lambda s: (torch.randn(*s, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)  # noqa: E731
    if lay == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return base(shape).contiguous(memory_format=fmt)
    if lay == "transposed" and len(shape) >= 3:
        return base((shape[0],) + tuple(shape[2:]) + (shape[1],)).movedim(-1, 1)
    if lay == "sliced":
        return base((shape[0], shape[1] * 2) + tuple(shape[2:]))[:, ::2]
    if lay == "expanded" and len(shape) >= 3:
        return base(shape[:-1] + (1,)).expand(shape)
    if lay == "negative view":
        return torch._neg_view(base(shape))
    return base(shape)


def _corrupt(state, case, g):
    """Apply the case's corruption to a dict of weight/bias/running_mean/running_var/nbt."""
    what = case["corrupt"]
    c = case["shape"][1]
    if what is None:
        return
    target, _, how = what.partition(" ")
    if target.startswith("weight") or target == "bias":
        if state[target] is None:
            return
        old = state[target].detach()
        if how == "size":
            new = torch.ones(c + 1)
        elif how in ("float64", "float16"):
            new = old.to(getattr(torch, how))
        elif how == "strided":
            new = (torch.rand(2 * c, generator=g) + .5)[::2]
        else:  # negative view
            new = torch._neg_view(old.clone())
        state[target] = nn.Parameter(new)
    elif target == "counter":
        if state["num_batches_tracked"] is not None:
            state["num_batches_tracked"] = torch.tensor(True)
    else:
        old = state[target]
        if old is None:
            return
        if how == "size":
            state[target] = torch.ones(1) if target == "running_mean" else torch.ones(c + 2)
        elif how in ("int64", "float64"):
            state[target] = old.to(getattr(torch, how))
        elif how == "strided":
            state[target] = torch.randn(2 * c, generator=g)[::2]
        elif how == "meta":
            state[target] = old.to("meta")
        else:  # negative view
            state[target] = torch._neg_view((torch.rand(c, generator=g) + .5).neg())


def _state_of(m):
    return {k: getattr(m, k) for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def _snapshot(state):
    return {k: (None if v is None else (v.shape, v.dtype, v.device, None if v.is_meta else v.detach().clone()))
            for k, v in state.items()}


def _assert_unchanged(state, snap):
    for k, v in state.items():
        s = snap[k]
        if v is None or s is None:
            assert v is None and s is None, k
            continue
        assert (v.shape, v.dtype, v.device) == s[:3], f"{k} changed shape/dtype/device"
        if not v.is_meta:
            assert torch.equal(v.detach(), s[3]), f"{k} changed by a call that raised"


def _reference(case, x, state, mask, r_max, d_max):
    """The variants' float64 formula (ghost batches, masks, Batch Renormalization):
    (output, new running_mean, new running_var), with autograd through the statistics
    (r, d constants, as Ioffe 2017 prescribes). ``state`` holds float64 leaves."""
    c = x.size(1)
    w, b = state["weight"], state["bias"]
    rm, rv = state["running_mean"], state["running_var"]
    rm = rm.double() if rm is not None else None
    rv = rv.double() if rv is not None else None
    nd = x.dim()
    shape = (1, c) + (1,) * (nd - 2)
    dims = [0] + list(range(2, nd))
    training = case["training"] or rm is None
    if not training:
        y = (x - rm.view(shape)) / torch.sqrt(rv.view(shape) + case["eps"])
        return _affine(y, w, b, shape), rm, rv
    n = x.size(0)
    groups = n // case["ghost"] if case["ghost"] and n > case["ghost"] else 1
    ys, means, variances = [], [], []
    for i, xc in enumerate(x.split(n // groups)):
        if mask is None:
            cnt = xc.numel() // c
            mean = xc.mean(dims, keepdim=True)
            var = ((xc - mean) ** 2).mean(dims, keepdim=True)
        else:
            valid = mask.split(n // groups)[i].unsqueeze(1).double()
            cnt = float(valid.sum())
            mean = (xc * valid).sum(dims, keepdim=True) / cnt
            var = (((xc - mean) ** 2) * valid).sum(dims, keepdim=True) / cnt
        xhat = (xc - mean) / torch.sqrt(var + case["eps"])
        if case["kind"] == "BatchRenorm":
            sigma = torch.sqrt(rv.view(shape) + case["eps"])
            r = torch.clamp(torch.sqrt(var + case["eps"]) / sigma, 1 / r_max, r_max).detach()
            d = torch.clamp((mean - rm.view(shape)) / sigma, -d_max, d_max).detach()
            xhat = xhat * r + d
        ys.append(xhat)
        means.append(mean.detach().reshape(-1))
        variances.append((var.detach() * cnt / (cnt - 1)).reshape(-1))
    y = _affine(torch.cat(ys), w, b, shape)
    if rm is None:
        return y, None, None
    nbt = state["num_batches_tracked"]
    f = case["momentum"] if case["momentum"] is not None else 1.0 / (float(nbt) + 1.0)
    return y, torch.lerp(rm, torch.stack(means).mean(0), f), torch.lerp(rv, torch.stack(variances).mean(0), f)


def _affine(y, w, b, shape):
    if w is not None:
        y = y * w.view(shape)
    if b is not None:
        y = y + b.view(shape)
    return y


def _close(ours, ref, dtype, what):
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(ref.detach().abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(ours.detach().double(), ref.detach().double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def run_case(case):
    g = torch.Generator().manual_seed(case["seed"])
    kind, shape = case["kind"], case["shape"]
    rank, c = len(shape), shape[1]
    x = _make_input(case)
    mask = None
    if case["mask"]:
        mask = torch.rand(shape[0], shape[2], generator=g) < 0.7
        mask[:, :2] = True  # at least two valid positions in every ghost batch
    r_max, d_max = 1.5, 0.5
    # Ours, and torch.nn's module with the same (possibly corrupted) state.
    if kind == "functional":
        ours = None
        state = {"weight": nn.Parameter(torch.rand(c, generator=g) + .5) if case["affine"] else None,
                 "bias": nn.Parameter(torch.randn(c, generator=g)) if case["affine"] else None,
                 "running_mean": torch.randn(c, generator=g) if case["track"] else None,
                 "running_var": torch.rand(c, generator=g) + .5 if case["track"] else None,
                 "num_batches_tracked": torch.tensor(3) if case["track"] else None}
    else:
        kw = dict(momentum=case["momentum"], eps=case["eps"], affine=case["affine"],
                  track_running_stats=case["track"])
        if kind == "BatchNorm":
            ours = _OUR_BN[rank](c, virtual_batch_size=case["ghost"], impl=case["impl"], **kw)
        elif kind == "BatchRenorm":
            ours = _OUR_RENORM[rank](c, virtual_batch_size=case["ghost"], impl=case["impl"], r_max=r_max,
                                     d_max=d_max, **kw)
        else:
            ours = bn.SyncBatchNorm(c, **kw)
            ours.impl = case["impl"]
        ours.train(case["training"])
        with torch.no_grad():
            if case["affine"]:
                ours.weight.copy_(torch.rand(c, generator=g) + .5)
                ours.bias.copy_(torch.randn(c, generator=g))
            if case["track"]:
                ours.running_mean.copy_(torch.randn(c, generator=g))
                ours.running_var.copy_(torch.rand(c, generator=g) + .5)
                ours.num_batches_tracked.fill_(3)
        state = _state_of(ours)
    _corrupt(state, case, g)
    if ours is not None:
        for k, v in state.items():
            setattr(ours, k, v)
    torch_state = {k: (None if v is None else (nn.Parameter(v.detach().clone()) if isinstance(v, nn.Parameter)
                                               else v.clone())) for k, v in state.items()}
    # torch.nn's answer on the plain BN of the same arguments (it raises where they do not fit).
    xt = _make_input(case).requires_grad_(case["grad"])  # torch's kernels differ by layout: the same one
    torch_error = None
    try:
        if kind == "functional":
            nbt = torch_state["num_batches_tracked"]
            f = case["momentum"] if case["momentum"] is not None else 1.0 / (float(nbt) + 1.0)
            y_torch = nn.functional.batch_norm(xt, torch_state["running_mean"], torch_state["running_var"],
                                               torch_state["weight"], torch_state["bias"], case["training"], f,
                                               case["eps"])
        else:
            tm = _TORCH_BN[rank](c, **kw)
            tm.train(case["training"])
            for k, v in torch_state.items():
                setattr(tm, k, v)
            y_torch = tm(xt)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        torch_error = e
    # Ours.
    xo = x.detach().requires_grad_(case["grad"])
    snap = _snapshot(state)
    try:
        if kind == "functional":
            y = bn.functional.batch_norm(xo, state["running_mean"], state["running_var"], state["weight"],
                                         state["bias"], case["training"], case["momentum"], case["eps"],
                                         impl=case["impl"], num_batches_tracked=state["num_batches_tracked"])
        elif mask is not None:
            y = ours(xo, mask)
        else:
            y = ours(xo)
    except (RuntimeError, ValueError, TypeError) as e:
        assert str(e), "an error without a message"
        _assert_unchanged(state, snap)
        # Where torch.nn accepts the arguments, ours may refuse only what it documents:
        # a counter that cannot be counted (functional has no counter in torch).
        # Ghost batches need two values per channel in each batch. Mixed dtypes: torch's
        # rule, which its kernels enforce on some layouts only (in eval, a non-contiguous
        # input passes the forward with an int64 running_var and fails in the backward).
        allowed = (torch_error is not None or (case["corrupt"] == "counter bool" and kind == "functional")
                   or ("mixed dtype" in str(e) and case["corrupt"] and case["corrupt"].endswith(("int64", "float64")))
                   or (case["ghost"] is not None and case["training"] and case["ghost"] * _prod(shape[2:]) < 2))
        assert allowed, f"ours raised {type(e).__name__}: {e}; torch.nn gave an answer"
        return
    assert torch_error is None, f"torch.nn raised {type(torch_error).__name__}: {torch_error}; ours gave an answer"
    assert y.shape == x.shape and y.dtype == x.dtype
    batch_stats = case["training"] or snap["running_mean"] is None
    variant = batch_stats and (case["ghost"] is not None or mask is not None or kind == "BatchRenorm")
    if variant:
        xd = x.detach().double().requires_grad_(case["grad"])
        ref_state = {k: (None if snap[k] is None else snap[k][3].double()) for k in state}
        for k in ("weight", "bias"):
            if ref_state[k] is not None:
                ref_state[k].requires_grad_()
        y_ref, rm_ref, rv_ref = _reference(case, xd, ref_state, mask, r_max, d_max)
        ref_params = [ref_state["weight"], ref_state["bias"]]
    else:
        xd, y_ref = xt, y_torch
        rm_ref, rv_ref = torch_state["running_mean"], torch_state["running_var"]
        ref_params = [torch_state["weight"], torch_state["bias"]]
        nbt, nbt_ref = state["num_batches_tracked"], torch_state["num_batches_tracked"]
        if kind != "functional" and nbt is not None:
            assert int(nbt) == int(nbt_ref), ("num_batches_tracked", int(nbt), int(nbt_ref))
    _close(y, y_ref, case["dtype"], "output")
    if state["running_mean"] is not None and not state["running_mean"].is_meta:
        _close(state["running_mean"], rm_ref, torch.float32 if case["dtype"] != torch.float64 else torch.float64,
               "running_mean")
        _close(state["running_var"], rv_ref, torch.float32 if case["dtype"] != torch.float64 else torch.float64,
               "running_var")
    if case["grad"]:
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
        params = [p for p in (state["weight"], state["bias"]) if p is not None]
        ref_params = [p for p in ref_params if p is not None]
        try:
            ref_grads = torch.autograd.grad(y_ref, [xd] + ref_params, dy.to(y_ref.dtype))
        except RuntimeError as e:  # torch's backward refuses what its forward accepted (e.g. an
            # int64 running_var in eval with a non-contiguous input): ours must refuse too
            try:
                torch.autograd.grad(y, [xo] + params, dy)
            except RuntimeError:
                return
            raise AssertionError(f"torch.nn's backward raised {e}; ours gave gradients") from None
        grads = torch.autograd.grad(y, [xo] + params, dy)
        for got, want, what in zip(grads, ref_grads, ("input gradient", "weight gradient", "bias gradient")):
            _close(got, want, case["dtype"], what)


if given is not None:
    @settings(max_examples=int(os.environ.get("BN_FUZZ_EXAMPLES", "200")), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck), print_blob=False)
    @given(cases())
    def fuzz(case):
        print(repr(case), file=sys.stderr, flush=True)
        run_case(case)


def test_fuzz_in_subprocess():
    import pytest

    if given is None:
        pytest.skip("hypothesis is not installed (pip install hypothesis, or the package's 'test' extra)")
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(bn.__file__)))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-W", "error", os.path.abspath(__file__)], capture_output=True, text=True,
                          env=env, timeout=600)
    last = [line for line in proc.stderr.splitlines() if line.startswith("{")][-1:]
    assert proc.returncode == 0, (
        f"fuzz process exited with {proc.returncode}"
        + (f" (killed by signal {-proc.returncode}: a crash)" if proc.returncode < 0 else "")
        + f"; last example: {last}\n{proc.stderr[-6000:]}")


if __name__ == "__main__":
    fuzz()
