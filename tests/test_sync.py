"""SyncBatchNorm on 2-3 gloo processes on CPU against one process on the concatenated batch."""

import pytest
import torch
from torch import nn

import batchnorm as bn
from batchnorm import _collectives
from dist_util import run_ranks, run_ranks_each

SPLITS = [(8, 8), (5, 11), (0, 16)]
TAILS = [(), (5,), (3, 4)]
C = 3


def full_batch(n, tail, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, *tail, generator=g) * 2 + 1
    gy = torch.randn(n, C, *tail, generator=g)
    return x, gy


def init_params(m):
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
        m.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    return m


def local_step(m, x, gy, sizes, rank, mask=None):
    lo = sum(sizes[:rank])
    xl = x[lo:lo + sizes[rank]].clone().requires_grad_()
    args = (xl,) if mask is None else (xl, mask[lo:lo + sizes[rank]])
    y = m(*args)
    y.backward(gy[lo:lo + sizes[rank]])
    return {"y": y.detach(), "gx": xl.grad, "gw": m.weight.grad.clone(), "gb": m.bias.grad.clone(),
            "rm": m.running_mean.clone(), "rv": m.running_var.clone(), "nbt": m.num_batches_tracked.item()}


def splits_worker(rank, world):
    out = {}
    for sizes in SPLITS:
        for tail in TAILS:
            x, gy = full_batch(sum(sizes), tail, seed=len(tail))
            m = init_params(bn.SyncBatchNorm(C))
            out[(sizes, tail)] = local_step(m, x, gy, sizes, rank)
        # channels_last input (the fused kernels read it channels-innermost)
        x, gy = full_batch(sum(sizes), (3, 4), seed=2)
        x = x.contiguous(memory_format=torch.channels_last)
        out[(sizes, "channels_last")] = local_step(init_params(bn.SyncBatchNorm(C)), x, gy, sizes, rank)
        x, gy = full_batch(sum(sizes), (5,), seed=1)
        out[(sizes, "float64")] = local_step(init_params(bn.SyncBatchNorm(C).double()), x.double(), gy.double(),
                                             sizes, rank)
    return out


def reference_step(x, gy, module=None, mask=None):
    m = module if module is not None else init_params(bn.BatchNorm1d(C) if x.dim() <= 3 else bn.BatchNorm2d(C))
    xr = x.clone().requires_grad_()
    y = m(xr) if mask is None else m(xr, mask)
    y.backward(gy)
    return {"y": y.detach(), "gx": xr.grad, "gw": m.weight.grad, "gb": m.bias.grad,
            "rm": m.running_mean, "rv": m.running_var}


def assert_matches(results, ref, sizes):
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref["y"], **close)
    torch.testing.assert_close(torch.cat([r["gx"] for r in results]), ref["gx"], **close)
    torch.testing.assert_close(sum(r["gw"] for r in results), ref["gw"], **close)
    torch.testing.assert_close(sum(r["gb"] for r in results), ref["gb"], **close)
    for r in results:
        torch.testing.assert_close(r["rm"], ref["rm"], **close)
        torch.testing.assert_close(r["rv"], ref["rv"], **close)


def ok(results):
    for r in results:
        if "error" in r:
            raise AssertionError(r["trace"])
    return [r["ok"] for r in results]


def test_sync_equals_single_process_on_every_split(two_ranks):
    results = ok(two_ranks[splits_worker])
    for sizes in SPLITS:
        for tail in TAILS:
            x, gy = full_batch(sum(sizes), tail, seed=len(tail))
            ref = reference_step(x, gy)
            assert_matches([results[0][(sizes, tail)], results[1][(sizes, tail)]], ref, sizes)
        x, gy = full_batch(sum(sizes), (3, 4), seed=2)
        ref = reference_step(x, gy)
        assert_matches([results[0][(sizes, "channels_last")], results[1][(sizes, "channels_last")]], ref, sizes)
        x, gy = full_batch(sum(sizes), (5,), seed=1)
        ref = reference_step(x.double(), gy.double(), module=init_params(bn.BatchNorm1d(C).double()))
        assert_matches([results[0][(sizes, "float64")], results[1][(sizes, "float64")]], ref, sizes)


def features_worker(rank, world):
    """Masks and Batch Renorm over the global batch; collective counts; eval has none."""
    import torch.distributed as dist
    out = {}
    sizes = (3, 5)
    x, gy = full_batch(8, (6,), seed=7)
    mask = torch.Generator().manual_seed(3)
    mask = torch.rand(8, 6, generator=mask) > 0.3
    # Blocking waits (poll_ms = 0) give the same results as the default polled ones.
    import batchnorm.distributed as bd
    saved, bd.poll_ms = bd.poll_ms, 0.0
    try:
        out["mask"] = local_step(init_params(bn.SyncBatchNorm(C)), x, gy, sizes, rank, mask)
    finally:
        bd.poll_ms = saved
    rn = bn.BatchRenorm1d(C, r_max=1.5, d_max=0.5)
    with torch.no_grad():
        rn.running_mean.copy_(torch.tensor([0.0, 3.0, -2.0]))
        rn.running_var.copy_(torch.tensor([1.0, 0.2, 20.0]))
    init_params(rn)
    rn = bn.convert_sync_batchnorm(rn)
    out["renorm"] = local_step(rn, x, gy, sizes, rank)
    # Collective counts: one in forward, one in backward (on CPU an all_gather, see
    # batchnorm.distributed.all_sum), none in eval.
    counts = {"all_gather": 0, "all_reduce": 0}
    real = {k: getattr(dist, k) for k in counts}

    def counting(name):
        def f(*a, **kw):
            counts[name] += 1
            return real[name](*a, **kw)
        return f

    m = init_params(bn.SyncBatchNorm(C))
    xl = x[:4].clone().requires_grad_() if rank == 0 else x[4:].clone().requires_grad_()
    m(xl)  # first call also checks channel counts
    for k in counts:
        setattr(dist, k, counting(k))
    try:
        y = m(xl)
        out["grad_fn"] = type(y.grad_fn).__name__
        fwd = dict(counts)
        y.sum().backward()
        bwd = {k: counts[k] - fwd[k] for k in counts}
        m.eval()
        before = dict(counts)
        m(xl)
        ev = {k: counts[k] - before[k] for k in counts}
    finally:
        for k in counts:
            setattr(dist, k, real[k])
    out["counts"] = (fwd, bwd, ev)
    # Half precision: float32 statistics over the global batch.
    h = bn.SyncBatchNorm(C)
    yh = h(x[:4].to(torch.bfloat16) if rank == 0 else x[4:].to(torch.bfloat16))
    out["bf16"] = (yh.dtype, h.running_mean.clone())
    return out


def test_sync_masks_renorm_collectives_and_half(two_ranks):
    results = ok(two_ranks[features_worker])
    x, gy = full_batch(8, (6,), seed=7)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(8, 6, generator=g) > 0.3
    assert_matches([r["mask"] for r in results], reference_step(x, gy, mask=mask), (3, 5))
    rn = bn.BatchRenorm1d(C, r_max=1.5, d_max=0.5)
    with torch.no_grad():
        rn.running_mean.copy_(torch.tensor([0.0, 3.0, -2.0]))
        rn.running_var.copy_(torch.tensor([1.0, 0.2, 20.0]))
    init_params(rn)
    assert_matches([r["renorm"] for r in results], reference_step(x, gy, module=rn), (3, 5))
    for r in results:
        fwd, bwd, ev = r["counts"]
        assert fwd == {"all_gather": 1, "all_reduce": 0}
        assert bwd == {"all_gather": 1, "all_reduce": 0}
        assert ev == {"all_gather": 0, "all_reduce": 0}
        # contiguous float32 input takes the fused-kernel path (the operator, batchnorm._operator)
        assert r["grad_fn"] == "BatchNormFunctionBackward", r["grad_fn"]
        assert r["bf16"][0] == torch.bfloat16
        torch.testing.assert_close(r["bf16"][1], 0.1 * x.to(torch.bfloat16).float().mean(dim=(0, 2)))


def subgroup_worker(rank, world):
    import torch.distributed as dist
    pair = dist.new_group([0, 1])
    solo = dist.new_group([2])
    x, gy = full_batch(12, (4,), seed=11)
    if rank < 2:
        m = init_params(bn.SyncBatchNorm(C, process_group=pair))
        return local_step(m, x[:10], gy[:10], (4, 6), rank)
    m = init_params(bn.SyncBatchNorm(C, process_group=solo))
    return local_step(m, x[10:], gy[10:], (2,), 0)


def test_process_subgroups_and_group_of_one():
    results = ok(run_ranks(subgroup_worker, world=3, timeout=120))
    x, gy = full_batch(12, (4,), seed=11)
    assert_matches(results[:2], reference_step(x[:10], gy[:10]), (4, 6))
    assert_matches(results[2:], reference_step(x[10:], gy[10:]), (2,))


def world_one_worker(rank, world):
    x, gy = full_batch(6, (), seed=0)
    return local_step(init_params(bn.SyncBatchNorm(C)), x, gy, (6,), 0)


def test_world_size_one_and_no_process_group():
    results = ok(run_ranks(world_one_worker, world=1, timeout=60))
    x, gy = full_batch(6, (), seed=0)
    assert_matches(results, reference_step(x, gy), (6,))
    assert_matches([local_step(init_params(bn.SyncBatchNorm(C)), x, gy, (6,), 0)], reference_step(x, gy), (6,))


def nonfinite_worker(rank, world):
    """A NaN on one rank poisons the global statistics on every rank: all of them reject
    the batch (running statistics untouched) on both the fused and the generic path."""
    out = {}
    for name in ("fused", "generic"):
        m = bn.SyncBatchNorm(C, nonfinite="raise")
        if name == "generic":
            m.impl = "reference"
        x = torch.randn(4, C, 5)
        if rank == 1:
            x[2, 1, 3] = float("nan")
        try:
            m(x)
            out[name] = "no error"
        except bn.NonFiniteBatchError:
            out[name] = (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.item())
    return out


def test_nan_on_one_rank_is_rejected_on_every_rank(two_ranks):
    for r in ok(two_ranks[nonfinite_worker]):
        for name in ("fused", "generic"):
            assert r[name] != "no error", name
            rm, rv, nbt = r[name]
            assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C)) and nbt == 0, name


def mismatch_worker(rank, world):
    m = bn.SyncBatchNorm(3 + rank)
    try:
        m(torch.randn(4, 3 + rank))
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_channel_mismatch_is_a_clear_error_not_a_hang(two_ranks):
    for msg in ok(two_ranks[mismatch_worker]):
        assert "ranks disagree on the number of channels: [3, 4]" in msg


def two_layers():
    return nn.Sequential(init_params(bn.BatchNorm1d(C)), init_params(bn.BatchNorm1d(C, momentum=0.3)))


def order_worker(rank, world):
    """Two same-width layers called in swapped order on the two ranks, then the same two
    (converted) layers in the same order, on one process group."""
    a, b = bn.SyncBatchNorm(C), bn.SyncBatchNorm(C)
    x = torch.randn(4, C, 5)
    out = {"numbers": (a._sync_layer, b._sync_layer)}
    try:
        for m in ((a, b) if rank == 0 else (b, a)):
            m(x)
        out["swapped"] = "no error"
    except RuntimeError as exc:
        out["swapped"] = str(exc)
    out["untouched"] = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.item()) for m in (a, b)]
    # The ranks stay in step after the error: the same order works, and equals one process.
    net = bn.convert_sync_batchnorm(two_layers())
    xf, gy = full_batch(8, (5,), seed=5)
    xl = xf[4 * rank:4 * rank + 4].clone().requires_grad_()
    y = net(xl)
    y.backward(gy[4 * rank:4 * rank + 4])
    out["same"] = {"y": y.detach(), "gx": xl.grad,
                   "state": [(m.weight.grad, m.bias.grad, m.running_mean, m.running_var) for m in net]}
    return out


def test_layers_called_in_swapped_order_are_an_error_on_every_rank(two_ranks):
    results = ok(two_ranks[order_worker])
    for rank, r in enumerate(results):
        msg = r["swapped"]
        assert msg.startswith("SyncBatchNorm: rank 1 called a different synchronized layer than rank 0 at "
                              "synchronized call #1 on this process group"), msg
        na, nb = r["numbers"]  # creation order, the same on both ranks
        assert nb == na + 1
        assert f"rank 0 called its synchronized layer #{na} (call #1), rank 1 its #{nb} (call #1)" in msg, msg
        assert "every rank must call the same synchronized layers in the same order" in msg, msg
        assert f"this process's layer #{(na, nb)[rank]}: SyncBatchNorm(3" in msg, msg
        for rm, rv, nbt in r["untouched"]:  # neither layer's running statistics changed
            assert torch.equal(rm, torch.zeros(C)) and torch.equal(rv, torch.ones(C)) and nbt == 0
    xf, gy = full_batch(8, (5,), seed=5)
    ref = two_layers()
    xr = xf.clone().requires_grad_()
    y = ref(xr)
    y.backward(gy)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["same"]["y"] for r in results]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["same"]["gx"] for r in results]), xr.grad, **close)
    for i, m in enumerate(ref):
        gw, gb, rm, rv = zip(*(r["same"]["state"][i] for r in results))
        torch.testing.assert_close(sum(gw), m.weight.grad, **close)
        torch.testing.assert_close(sum(gb), m.bias.grad, **close)
        for k in range(2):
            torch.testing.assert_close(rm[k], m.running_mean, **close)
            torch.testing.assert_close(rv[k], m.running_var, **close)


def test_layer_check_names_what_differs():
    """check_same_layer on gathered (call number, layer number) rows, without processes:
    equal rows pass, -1 (a rank under torch.compile's tracing) matches anything, and a
    call-number mismatch is named as such."""
    check = _collectives.check_same_layer
    check(torch.tensor([[3.0, 2.0], [3.0, 2.0]], dtype=torch.float64), None, "SyncBatchNorm")
    check(torch.tensor([[3.0, 2.0], [-1.0, -1.0]], dtype=torch.float64), None, "SyncBatchNorm")
    with pytest.raises(RuntimeError, match=r"^BatchRenorm2d: rank 2 is at synchronized call #4 where rank 0 is at #3 "
                                           r"\(a rank made a training-mode call .*every rank must call the same "
                                           r"synchronized layers in the same order"):
        check(torch.tensor([[3.0, 2.0], [3.0, 2.0], [4.0, 2.0]], dtype=torch.float64), None, "BatchRenorm2d")
    with pytest.raises(RuntimeError, match=r"rank 1 called a different synchronized layer than rank 0 at "
                                           r"synchronized call #3 .*rank 0 called its synchronized layer #2 "
                                           r"\(call #3\), rank 1 its #5 \(call #3\)"):
        check(torch.tensor([[3.0, 2.0], [3.0, 5.0]], dtype=torch.float64), None, "SyncBatchNorm")


# -- convert_sync_batchnorm (one process) --------------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: a BN subclass that adds an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class PlainSubclass(nn.BatchNorm2d):
    pass


def test_convert_sync_batchnorm_copies_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), bn.BatchNorm2d(4, momentum=None), PlainSubclass(4),
                          nn.Sequential(nn.BatchNorm1d(4, affine=False)))
    model.train()
    model[:4](torch.randn(4, 3, 2, 2))
    model[1].weight.requires_grad_(False)
    model.eval()
    converted = bn.convert_sync_batchnorm(__import__("copy").deepcopy(model))
    kinds = [type(m).__name__ for m in converted.modules()]
    assert kinds.count("SyncBatchNorm") == 4
    assert not converted[1].weight.requires_grad and not converted.training
    assert converted[2].momentum is None and converted[4][0].weight is None
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(converted[:4](x), model[:4](x))


def test_convert_refuses_subclass_that_adds_behaviour():
    with pytest.raises(ValueError, match="BatchNormAct2d.*(act|forward).*drop"):
        bn.convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(4)))


def test_convert_refuses_ghost_batches():
    with pytest.raises(ValueError, match="ghost batches.*virtual_batch_size=4"):
        bn.convert_sync_batchnorm(nn.Sequential(bn.BatchNorm2d(4, virtual_batch_size=4)))


def test_poll_setting_from_environment(monkeypatch):
    """$BATCHNORM_SYNC_POLL_MS sets how long CPU collectives are polled; a value that is not
    a number is a clear error naming the variable."""
    import batchnorm.distributed as bd
    monkeypatch.setenv("BATCHNORM_SYNC_POLL_MS", "2.5")
    assert _collectives._poll_ms_from_env() == 2.5
    monkeypatch.setenv("BATCHNORM_SYNC_POLL_MS", "fast")
    with pytest.raises(ValueError, match="BATCHNORM_SYNC_POLL_MS must be a number of milliseconds.*'fast'"):
        _collectives._poll_ms_from_env()
    monkeypatch.delenv("BATCHNORM_SYNC_POLL_MS")
    assert _collectives._poll_ms_from_env() == 20.0


@pytest.fixture(scope="module")
def two_ranks():
    """The 2-rank workers of this file, run once in one pair of processes (a torch import
    per rank costs seconds; five pairs cost five times that), each on a process group of its
    own: {worker: [rank 0's result, rank 1's]}."""
    return run_ranks_each([splits_worker, features_worker, nonfinite_worker, mismatch_worker, order_worker],
                          world=2, timeout=300)
