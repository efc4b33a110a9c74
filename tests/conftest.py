import threading
import warnings

import pytest
import torch

with warnings.catch_warnings():
    # torch scripts its forward-AD decompositions on first use (a torch-internal
    # DeprecationWarning about torch.jit.script): load them once here, so that no test,
    # whatever runs first, trips over it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401


_kernels_thread = None


def pytest_configure(config):
    """Load the fused kernels (on a fresh machine: build them, about 15 s of one core) in a
    thread while pytest collects the tests, instead of inside the first test that needs
    them; the compiler runs as a subprocess, so collection goes on meanwhile."""
    global _kernels_thread
    from batchnorm import _jit
    _kernels_thread = threading.Thread(target=_jit.kernels, name="batchnorm-kernels", daemon=True)
    _kernels_thread.start()


def pytest_collection_finish(session):
    """No test starts before the kernels are loaded (or have failed to): tests that patch
    the loader's state must not race with it."""
    if _kernels_thread is not None:
        _kernels_thread.join()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


SHAPES = [(16, 4), (8, 4, 7), (4, 4, 5, 6), (2, 4, 3, 4, 5)]


@pytest.fixture(params=["kernels", "torch-ops"])
def kernel_mode(request, monkeypatch):
    """Run a test twice: with the fused CPU kernels (when this machine can build them) and
    with them switched off, so the torch-operation paths are tested on every machine."""
    if request.param == "torch-ops":
        from batchnorm import _jit
        monkeypatch.setattr(_jit, "_lib", None)
        monkeypatch.setattr(_jit, "_status", "disabled for this test")
    return request.param


@pytest.fixture
def fashion_dir(tmp_path, monkeypatch):
    """A small Fashion-MNIST stand-in in IDX files this test wrote, with the dataset's spec
    expecting exactly it: the experiments' smoke tests need no installed dataset."""
    from idx_util import install_fake
    return install_fake(monkeypatch, "fashion-mnist", tmp_path / "fashion-idx")
