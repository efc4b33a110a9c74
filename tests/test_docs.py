"""The examples in the public docstrings run and print what they say."""

import doctest

import pytest
import torch

import batchnorm as bn
from batchnorm import functional

PUBLIC = [bn.BatchNorm1d, bn.BatchNorm2d, bn.BatchNorm3d, bn.BatchRenorm1d, bn.BatchRenorm2d, bn.BatchRenorm3d,
          bn.SyncBatchNorm, bn.convert, functional.batch_norm]


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__name__)
def test_docstring_has_args_shape_example_and_runs(obj):
    doc = obj.__doc__
    assert all(section in doc for section in ("Args:", "Shape:", "Example::")), obj.__name__
    torch.manual_seed(0)
    namespace = {"torch": torch, **{name: getattr(bn, name) for name in bn.__all__}, "batch_norm": functional.batch_norm}
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(obj, obj.__name__, globs=namespace)
    assert tests and sum(len(t.examples) for t in tests) > 0
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{runner.failures} failing example(s) in {obj.__name__}'s docstring"
