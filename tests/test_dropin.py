"""Our layers where a PyTorch user's code expects torch.nn's: the class hierarchy, the
ecosystem's helpers that find BN layers by isinstance, fx, TorchScript, Lazy layers,
convert, and the torch.nn behaviours we match."""

import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

import batchnorm as bn

# SyncBatchNorm is a _BatchNorm but no torch.nn.SyncBatchNorm: DDP refuses those on CPU
# (test_ddp.py runs ours under DDP on CPU).
TORCH_OF = {bn.BatchNorm1d: nn.BatchNorm1d, bn.BatchNorm2d: nn.BatchNorm2d, bn.BatchNorm3d: nn.BatchNorm3d,
            bn.SyncBatchNorm: _BatchNorm}


def _net(norm=bn.BatchNorm2d, c=16):
    """Conv-BN-ReLU twice and a Linear-BN1d head; the first BN sees 8*16*16*16 = 32,768
    values and the second (8, 16, 16, 16) too; the kernels run from 65,536 (see _big)."""
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), norm(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                         norm(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10),
                         (bn.BatchNorm1d if norm is bn.BatchNorm2d else nn.BatchNorm1d)(10))


def _big():
    return torch.randn(16, 3, 16, 16, dtype=torch.float64)  # 16*16*16*16 = 65,536 per BN2d


def _twins():
    ours = _net().double()
    theirs = _net(nn.BatchNorm2d).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _bns(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize("ours", [bn.BatchNorm1d, bn.BatchNorm2d, bn.BatchNorm3d, bn.SyncBatchNorm])
def test_our_layers_are_torch_classes(ours):
    m = ours(4)
    assert isinstance(m, TORCH_OF[ours]) and isinstance(m, _BatchNorm)
    assert list(m.state_dict()) == list(TORCH_OF[ours](4).state_dict())
    for renorm in (bn.BatchRenorm1d, bn.BatchRenorm2d, bn.BatchRenorm3d):
        assert isinstance(renorm(4), _BatchNorm)
    # ours, not torch's: a BatchNorm1d is no BatchNorm2d
    assert not isinstance(bn.BatchNorm1d(4), nn.BatchNorm2d)


def test_swa_update_bn_recomputes_running_statistics():
    from torch.optim.swa_utils import update_bn
    ours, theirs = _twins()
    loader = [_big() + 1.5 for _ in range(3)]
    update_bn(loader, ours)
    update_bn(loader, theirs)
    for a, b in zip(_bns(ours), _bns(theirs)):
        assert a.running_mean.abs().max() > 0.1  # recomputed, not left at 0
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-10, atol=1e-12)
        assert a.momentum == b.momentum == 0.1  # update_bn restores it


def test_torch_convert_sync_batchnorm_finds_our_layers():
    ours, _ = _twins()
    with torch.no_grad():
        ours[1].running_mean.fill_(0.25)
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    converted = [m for m in torch_sync.modules() if type(m) is nn.SyncBatchNorm]
    assert len(converted) == 3
    assert converted[0].running_mean.eq(0.25).all()
    # Ours (a classmethod of our subclass) makes our SyncBatchNorm, which runs on CPU.
    mine = bn.SyncBatchNorm.convert_sync_batchnorm(_net(nn.BatchNorm2d))
    assert [type(m) for m in _bns(mine)] == [bn.SyncBatchNorm] * 3
    assert mine(torch.randn(4, 3, 8, 8)).shape == (4, 10)


def test_fuse_modules_fuses_conv_and_our_bn_in_eval():
    from torch.ao.quantization import fuse_modules, fuse_modules_qat
    net = nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.normal_()
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    fused = fuse_modules(net, [["0", "1", "2"]])
    assert not _bns(fused)
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="quantization-aware"):
        fuse_modules_qat(nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm2d(8)).train(), [["0", "1"]])


def test_replace_all_batch_norm_modules_then_vmap():
    from torch.func import replace_all_batch_norm_modules_
    model = nn.Sequential(nn.Linear(4, 8), bn.BatchNorm1d(8))
    replace_all_batch_norm_modules_(model)
    assert model[1].running_mean is None and not model[1].track_running_stats
    x = torch.randn(3, 5, 4)
    y = torch.func.vmap(model)(x)
    torch.testing.assert_close(y[1], model(x[1]))


def test_weight_decay_split_by_isinstance():
    ours, _ = _twins()
    no_decay = {id(p) for m in ours.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
    assert len(no_decay) == 6  # weight and bias of each of the three BN layers


def test_fx_symbolic_trace_keeps_each_bn_one_node():
    ours, theirs = _twins()
    gm = fx.symbolic_trace(ours)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == [str(i) for i in range(10)]  # each layer, ours included, one call_module
    x = _big()
    torch.testing.assert_close(gm(x), theirs(x), rtol=1e-10, atol=1e-10)
    assert ours[1].num_batches_tracked == 1  # the GraphModule runs our layers: state updates

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn.BatchNorm1d(4)

        def forward(self, x, mask):
            return self.bn(x, mask)

    g = fx.symbolic_trace(Masked())
    (node,) = [n for n in g.graph.nodes if n.op == "call_module"]
    assert node.target == "bn" and len(node.args) == 2
    x, mask = torch.randn(2, 4, 6), torch.rand(2, 6) > 0.3
    torch.testing.assert_close(g(x, mask), g.bn(x, mask))


def test_jit_script_runs_torchs_kernel_on_our_parameters():
    ours, theirs = _twins()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        scripted = torch.jit.script(ours)
    x = _big()
    torch.testing.assert_close(scripted(x), theirs(x), rtol=1e-10, atol=1e-10)
    # the scripted layers share our parameters and buffers: training updates ours
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, rtol=1e-10, atol=1e-12)
    assert ours[1].num_batches_tracked == 1
    scripted.eval()
    theirs.eval()
    torch.testing.assert_close(scripted(x), theirs(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layer", [lambda: bn.BatchNorm2d(4, virtual_batch_size=2), lambda: bn.BatchRenorm2d(4),
                                   lambda: bn.freeze(bn.BatchNorm2d(4))])
def test_jit_script_refuses_what_torch_cannot_compute(layer):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        with pytest.raises(RuntimeError, match="torch.jit.trace or torch.export"):
            torch.jit.script(layer())
        # a refusal leaves nothing half-compiled behind: the next script works
        x = torch.randn(4, 4, 3, 3)
        torch.testing.assert_close(torch.jit.script(bn.BatchNorm2d(4))(x), nn.BatchNorm2d(4)(x))


@pytest.mark.parametrize("lazy,shape,eager", [(bn.LazyBatchNorm1d, (8, 5), bn.BatchNorm1d),
                                               (bn.LazyBatchNorm2d, (4, 5, 6, 6), bn.BatchNorm2d),
                                               (bn.LazyBatchNorm3d, (2, 5, 3, 4, 4), bn.BatchNorm3d)])
def test_lazy_layers_infer_num_features(lazy, shape, eager):
    m = lazy(momentum=0.2, virtual_batch_size=None)
    ref = getattr(nn, lazy.__name__)(momentum=0.2)
    assert m.has_uninitialized_params()
    x = torch.randn(shape)
    torch.testing.assert_close(m(x), ref(x))
    assert type(m) is eager and m.num_features == 5 and isinstance(m, getattr(nn, eager.__name__))
    torch.testing.assert_close(m.running_mean, ref.running_mean)
    # an uninitialized layer loads a checkpoint, as torch's does
    fresh = lazy()
    fresh.load_state_dict(ref.state_dict())
    assert fresh.num_features == 0 or fresh.running_mean.shape == (5,)
    torch.testing.assert_close(fresh.eval()(x), ref.eval()(x))


def test_lazy_layer_rejects_bad_rank_before_materializing():
    m = bn.LazyBatchNorm2d()
    with pytest.raises(ValueError, match="BatchNorm2d"):
        m(torch.randn(4, 5))
    assert m.has_uninitialized_params()


def test_convert_replaces_torch_layers_and_keeps_the_function():
    theirs = _net(nn.BatchNorm2d).double()
    reference = _net(nn.BatchNorm2d).double()
    reference.load_state_dict(theirs.state_dict())
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1)
    weight = theirs[1].weight
    model = bn.convert(theirs)
    assert model is theirs and [type(m) for m in _bns(model)] == [bn.BatchNorm2d, bn.BatchNorm2d, bn.BatchNorm1d]
    assert model[1].weight is weight  # shared: the optimizer made before still trains it
    x = _big()
    opt.zero_grad()
    model(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad, rtol=1e-10, atol=1e-12)
    opt.step()
    torch.testing.assert_close(model[4].running_var, reference[4].running_var, rtol=1e-10, atol=1e-12)
    # options reach every converted layer; ours are rebuilt with them
    again = bn.convert(model, virtual_batch_size=8, nonfinite="raise")
    assert all(m.virtual_batch_size == 8 and m.nonfinite == "raise" for m in _bns(again))


def test_convert_sync_and_lazy_and_frozen():
    model = nn.Sequential(nn.SyncBatchNorm(4), nn.LazyBatchNorm2d(), nn.BatchNorm2d(4))
    bn.freeze(model)
    out = bn.convert(model)
    assert [type(m) for m in out] == [bn.SyncBatchNorm, bn.LazyBatchNorm2d, bn.BatchNorm2d]
    assert out[2].frozen and out[0].frozen
    x = torch.randn(2, 4, 3, 3)
    out.train()
    out[2](x)
    assert out[2].num_batches_tracked == 0  # frozen: running statistics kept
    bn.unfreeze(out)
    assert not out[2].frozen


class _BNReLU(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


def test_convert_leaves_subclasses_that_add_behaviour():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _BNReLU(4), nn.BatchNorm2d(4))
    with pytest.warns(bn.ConvertWarning, match=r"1 \(_BNReLU: class _BNReLU defines forward\)"):
        out = bn.convert(model)
    assert type(out[1]) is _BNReLU and type(out[2]) is bn.BatchNorm2d


def test_convert_bad_option_changes_nothing():
    model = _net(nn.BatchNorm2d)
    with pytest.raises(TypeError, match="unknown option"):
        bn.convert(model, virtual_batch=4)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn.convert(model, virtual_batch_size=0)
    sync = nn.Sequential(nn.BatchNorm2d(4), nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match="has no virtual_batch_size option"):
        bn.convert(sync, virtual_batch_size=2)
    assert all(type(m).__module__.startswith("torch.") for m in _bns(model) + _bns(sync))


@pytest.mark.parametrize("cls", [_BNReLU, bn.BatchNorm2d])
def test_fold_keeps_subclasses_that_add_behaviour(cls):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    if cls is _BNReLU:
        with pytest.warns(bn.FoldWarning, match="adds behaviour"):
            folded = bn.fold(model)
        assert any(isinstance(m, _BNReLU) for m in folded.modules())
    else:
        folded = bn.fold(model)
        assert not _bns(folded)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


# -- torch.nn's behaviours ------------------------------------------------------------------

def test_eps_zero_as_torch():
    ours, theirs = bn.BatchNorm2d(4, eps=0.0), nn.BatchNorm2d(4, eps=0.0)
    with torch.no_grad():
        theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))
    # torch refuses eps=0 in training (a constant channel would divide by 0); so do we,
    # before any state changes
    for m in (theirs, ours):
        with pytest.raises(ValueError, match="eps must be positive"):
            m.train()(x)
    assert ours.num_batches_tracked == 0


@pytest.mark.parametrize("shape", [(4, 4, 5, 5), (16, 16, 16, 16)])
def test_track_running_stats_switched_off_after_construction(shape):
    ours, theirs = bn.BatchNorm2d(shape[1]).double(), nn.BatchNorm2d(shape[1]).double()
    for m in (ours, theirs):
        m.track_running_stats = False
    x = torch.randn(shape, dtype=torch.float64) + 3
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 0
    assert ours.running_mean.eq(0).all()
    # eval still uses the buffers, as torch.nn's does
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("momentum", [1.5, -0.5, 0.0, 1.0])
def test_momentum_outside_unit_interval_as_torch(momentum):
    ours, theirs = bn.BatchNorm1d(8, momentum=momentum).double(), nn.BatchNorm1d(8, momentum=momentum).double()
    x = torch.randn(64, 8, dtype=torch.float64) + 2
    ours(x)
    theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (64, 16, 16, 16)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("impl", ["auto", "kernels", "reference", "torch"])
def test_mixed_dtypes_raise_like_torch_and_change_nothing(shape, training, impl):
    ours = bn.BatchNorm2d(shape[1], impl=impl).train(training)
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        nn.BatchNorm2d(shape[1]).train(training)(x)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        ours(x)
    assert ours.num_batches_tracked == 0 and ours.running_mean.eq(0).all()


def test_onnx_export_in_eval_matches_eager():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
                        bn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[5].running_var.uniform_(0.5, 2)
        net[5].bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and version notes
        program = torch.onnx.export(net, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), net(x), rtol=1e-5, atol=1e-5)


def test_the_readme_difference_table_holds():
    """Each row of the README's table of deliberate differences, both sides."""
    x = torch.randn(8, 4)
    x[0, 1] = float("nan")
    theirs, ours = nn.BatchNorm1d(4), bn.BatchNorm1d(4)
    theirs(x)
    with pytest.warns(bn.NonFiniteBatchWarning):
        ours(x)
    assert theirs.running_mean.isnan().any() and ours.running_mean.eq(0).all()
    # empty training batch
    theirs, ours = nn.BatchNorm2d(4), bn.BatchNorm2d(4)
    assert theirs(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)
    assert theirs.num_batches_tracked == 1 and theirs.running_mean.eq(0).all() and theirs.running_var.eq(1).all()
    with pytest.raises(ValueError, match="empty batch"):
        ours(torch.randn(0, 4, 3, 3))
    # mixed dtypes: torch counts the batch before it raises
    theirs, ours = nn.BatchNorm2d(4), bn.BatchNorm2d(4)
    for m in (theirs, ours):
        with pytest.raises(RuntimeError, match="mixed dtype"):
            m(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    assert theirs.num_batches_tracked == 1 and ours.num_batches_tracked == 0
    # a wrong-sized buffer
    theirs, ours = nn.BatchNorm2d(4), bn.BatchNorm2d(4)
    for m in (theirs, ours):
        m.running_mean = torch.zeros(1)
        with pytest.raises(RuntimeError, match="running_mean"):
            m(torch.randn(2, 4, 3, 3))
    # momentum that is not a number
    nn.BatchNorm1d(4, momentum="0.1")
    with pytest.raises(ValueError, match="momentum"):
        bn.BatchNorm1d(4, momentum="0.1")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", [None, "relu"], ids=["bn", "bn-relu"])
def test_checkpoint_recomputes_the_running_update_as_torch(reentrant, memory_format, act):
    # torch.utils.checkpoint runs the forward again in the backward; torch.nn's running update
    # is part of its forward, so the buffers move twice per step. Ours, on the fused kernels
    # (131,072 elements), move the same way: the same state after the step.
    ours = bn.BatchNorm2d(64) if act is None else bn.BatchNormAct2d(64, act=act)
    theirs = nn.BatchNorm2d(64) if act is None else nn.Sequential(nn.BatchNorm2d(64), nn.ReLU())
    x = torch.randn(8, 64, 16, 16).to(memory_format=memory_format)
    for m in (ours, theirs):
        xg = x.clone().requires_grad_()
        checkpoint(m, xg, use_reentrant=reentrant).square().sum().backward()
    t = theirs if act is None else theirs[0]
    assert int(ours.num_batches_tracked) == int(t.num_batches_tracked) == 2
    torch.testing.assert_close(ours.running_mean, t.running_mean)
    torch.testing.assert_close(ours.running_var, t.running_var)
