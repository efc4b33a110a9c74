"""The package's layering: every module imports only modules below it, so the imports form
no cycle, and no import hides inside a function (except optional dependencies).

The layers, lowest first (DESIGN.md and :mod:`batchnorm.functional` describe them):
errors; the kernel backends (build and load, the C kernels' Python side, the same
interface on torch operations); statistics; collectives; the operator; functional; the
modules; the model tools; the package's namespace.
"""

from __future__ import annotations

import ast
import pathlib

import batchnorm

PACKAGE = pathlib.Path(batchnorm.__file__).parent

ORDER = [
    "_errors",
    "_jit", "_reference", "_fused",            # kernel backends
    "_stats",                                  # statistics
    "_collectives",                            # collectives
    "_operator",                               # the one autograd operator
    "functional",                              # the one place that chooses a path
    "modules", "renorm", "act", "distributed",  # modules: state only
    "population", "fold", "_fusion", "surgery", "monitor",  # model tools
    "__init__",
]

# Imports that may sit inside a function: optional dependencies, absent on some platforms.
OPTIONAL = {"fcntl"}


def _modules():
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def _internal_imports(tree: ast.Module):
    """(line, imported package module) for every import of this package in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:          # from . import a, b
                found += [(node.lineno, a.name) for a in node.names]
            elif node.level == 1:                                # from .a import b
                found.append((node.lineno, node.module.split(".")[0]))
            elif node.level == 0 and node.module and node.module.split(".")[0] == "batchnorm":
                parts = node.module.split(".")
                found += ([(node.lineno, parts[1])] if len(parts) > 1 else
                          [(node.lineno, a.name) for a in node.names])
            elif node.level > 1:
                raise AssertionError(f"line {node.lineno}: a relative import above the package")
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "batchnorm" and len(parts) > 1:
                    found.append((node.lineno, parts[1]))
    return found


def test_every_module_has_a_layer():
    assert sorted(ORDER) == _modules(), "a module was added or removed: give it its place in ORDER"


def test_imports_only_go_down():
    upward = []
    for name in _modules():
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for line, target in _internal_imports(tree):
            assert target in ORDER, f"{name}.py:{line} imports {target!r}, which is not a module of the package"
            if ORDER.index(target) >= ORDER.index(name):
                upward.append(f"{name}.py:{line} imports {target}")
    assert not upward, "imports that go up or sideways (a cycle waiting to happen):\n" + "\n".join(upward)


def test_no_function_local_imports():
    hidden = []
    for name in _modules():
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or "."]
                if not set(n.split(".")[0] for n in names) <= OPTIONAL:
                    hidden.append(f"{name}.py:{node.lineno} imports {', '.join(names)}")
    assert not hidden, "imports inside functions or blocks:\n" + "\n".join(hidden)


def test_the_check_catches_an_upward_import(tmp_path):
    """The walk finds every spelling of an import of the package."""
    source = ("from . import modules\nfrom .functional import train\nimport batchnorm._stats\n"
              "from batchnorm import _operator\nfrom batchnorm.renorm import x\n")
    got = sorted(t for _, t in _internal_imports(ast.parse(source)))
    assert got == ["_operator", "_stats", "functional", "modules", "renorm"]
