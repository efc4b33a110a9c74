"""The benchmarks' header line names the commit it measures, so every record carries it."""

import re
import sys
from pathlib import Path

from bnrepro.runtime import git_commit

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_git_commit_of_a_path_outside_any_checkout_is_unknown(tmp_path):
    assert git_commit(tmp_path / "file") == "unknown"


def test_machine_line_ends_with_the_commit():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _timing
    finally:
        sys.path.remove(str(BENCHMARKS))
    line = _timing.machine()
    expected = git_commit()
    assert line.endswith(f"; commit {expected}"), line
    assert expected == "unknown" or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", expected)


def test_every_benchmark_prints_the_machine_line():
    for script in sorted(BENCHMARKS.glob("[!_]*.py")):
        assert "{machine()}" in script.read_text(), f"{script.name} prints no machine() header"
