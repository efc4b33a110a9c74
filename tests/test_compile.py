"""torch.compile(fullgraph=True) of every module of ours, in training and eval.

fullgraph=True turns any graph break into an error, so passing means no break. The
backend is aot_eager: it traces forward and backward exactly as inductor would (dynamo,
then AOTAutograd through our autograd.Functions) but needs no C++ compiler, so the test
runs on any CI machine. Each case compares the compiled module with an eager copy over
two training steps (outputs, input and parameter gradients, running statistics,
num_batches_tracked) and one eval step.
"""

import copy

import pytest
import torch

import batchnorm as bn

# torch 2.13's dynamo, tracing any autograd.Function, builds the ctx object in a way that
# trips torch's own DeprecationWarning about instantiating Functions (torch/_dynamo/
# side_effects.py -> torch/autograd/function.py); it is torch-internal, so it is ignored
# here, narrowly, instead of failing every case under -W error.
pytestmark = pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated:DeprecationWarning")


def _cases():
    return [
        ("BatchNorm1d (N, C)", lambda: bn.BatchNorm1d(4), (16, 4), {}),
        ("BatchNorm1d (N, C, L)", lambda: bn.BatchNorm1d(4), (8, 4, 5), {}),
        ("BatchNorm2d", lambda: bn.BatchNorm2d(4), (4, 4, 5, 6), {}),
        ("BatchNorm2d channels_last", lambda: bn.BatchNorm2d(4), (4, 4, 5, 6), {"channels_last": True}),
        ("BatchNorm3d", lambda: bn.BatchNorm3d(4), (2, 4, 3, 4, 5), {}),
        ("BatchNorm2d momentum=None", lambda: bn.BatchNorm2d(4, momentum=None), (4, 4, 5, 6), {}),
        ("BatchNorm2d affine=False", lambda: bn.BatchNorm2d(4, affine=False), (4, 4, 5, 6), {}),
        ("BatchNorm2d no running stats", lambda: bn.BatchNorm2d(4, track_running_stats=False), (4, 4, 5, 6), {}),
        ("BatchNorm2d ghost batches", lambda: bn.BatchNorm2d(4, virtual_batch_size=2), (4, 4, 5, 6), {}),
        ("BatchNorm1d masked", lambda: bn.BatchNorm1d(4), (6, 4, 7), {"mask": True}),
        ("BatchRenorm2d (schedule)", lambda: bn.BatchRenorm2d(4), (4, 4, 5, 6), {}),
        ("BatchRenorm1d (constants)", lambda: bn.BatchRenorm1d(4, r_max=1.5, d_max=0.5), (16, 4), {}),
        ("SyncBatchNorm, no process group", lambda: bn.SyncBatchNorm(4), (4, 4, 5, 6), {}),
        ("BatchNorm2d impl=reference", lambda: bn.BatchNorm2d(4, impl="reference"), (4, 4, 5, 6), {}),
    ]


@pytest.mark.parametrize("name,make,shape,opts", _cases(), ids=[c[0] for c in _cases()])
def test_compiled_module_matches_eager(name, make, shape, opts):
    torch._dynamo.reset()
    eager = make()
    if eager.weight is not None:
        with torch.no_grad():
            eager.weight.uniform_(0.5, 1.5)
            if eager.bias is not None:
                eager.bias.uniform_(-0.5, 0.5)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    mask = None
    if opts.get("mask"):
        mask = torch.rand(shape[0], shape[2]) > 0.3
        mask[:, 0] = True
    for step in range(2):
        x = torch.randn(*shape) * 2 + 1
        if opts.get("channels_last"):
            x = x.to(memory_format=torch.channels_last)
        g = torch.randn(*shape)
        outs, grads = [], []
        for m in (eager, compiled):
            xi = x.clone().requires_grad_()
            y = m(xi, mask) if mask is not None else m(xi)
            y.backward(g)
            outs.append(y)
            grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(compiled_module, buf), getattr(eager, buf)
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if eager.track_running_stats:
        eager.eval()
        compiled_module.eval()
        x = torch.randn(*shape)
        with torch.no_grad():
            ye = eager(x, mask) if mask is not None else eager(x)
            yc = compiled(x, mask) if mask is not None else compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)


def test_compiled_folded_model_matches():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), bn.BatchNorm2d(4), torch.nn.ReLU(),
                                bn.BatchNorm2d(4))
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8))
    folded = bn.fold(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(folded, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), folded(x), rtol=1e-5, atol=1e-5)


def test_compiled_nonfinite_batch_updates_nothing():
    torch._dynamo.reset()
    m = bn.BatchNorm2d(3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(4, 3, 5, 5))
    before = (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    compiled(x)  # no warning under compile (it would be a graph break); the guard still holds
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    assert int(m.num_batches_tracked) == int(before[2])
