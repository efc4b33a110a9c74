"""The Figure 1 experiment: smoke run of the CLI, resume after a kill, the CLI's errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnrepro import runtime
from bnrepro.__main__ import main
from bnrepro.config import Figure1Config
from bnrepro.experiments import figure1

REPO = Path(__file__).resolve().parents[1]


def strip(runs):
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in runs]


def test_quick_smoke_run_writes_everything(tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["figure1", "--quick", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {r["model"] for r in m["runs"]} == {"baseline", "bn"}
    for r in m["runs"]:
        assert r["steps"][-1] == 2000 and len(r["test_accuracy"]) == len(r["steps"])
        assert set(r["percentiles"]) == {"15", "50", "85"}
        assert all(len(v) == len(r["steps"]) for v in r["percentiles"].values())
    acc = {r["model"]: r["test_accuracy"][-1] for r in m["runs"]}
    # With the paper's small initial weights the sigmoid baseline starts slowly; BN does not.
    assert acc["bn"] > 0.9 and acc["baseline"] > 0.2 and acc["bn"] > acc["baseline"]
    s = m["summary"]
    assert set(s) >= {"baseline", "bn", "steps_to_baseline_final"}
    for r in m["runs"]:  # every unit of the last hidden layer, from 10 % of the run on
        assert set(r["unit_drift_per_unit"]) == {"15", "50", "85"}
        assert all(len(v) == 100 and min(v) >= 0 for v in r["unit_drift_per_unit"].values())
    for kind in ("baseline", "bn"):
        d = s[kind]["unit_drift"]
        assert set(d) == {"15", "50", "85"} and all(isinstance(x, float) and x > 0 for x in d.values())
    # BN holds each unit's input distribution in place (Figure 1b, c), over all 100 units
    assert s["bn"]["unit_drift"]["50"] < s["baseline"]["unit_drift"]["50"]
    assert isinstance(s["baseline"]["final_accuracy"], float)
    assert (out / "figure1.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "The paper's claims beside ours" in report and "torch" in report
    assert "bnrepro figure1" in capsys.readouterr().out


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    cfg = Figure1Config(steps=300, eval_every=50, checkpoint_every=100, seeds=1, workers=1)
    base = {"config": cfg.__dict__.copy(), "model": "bn", "seed": 0}
    whole = figure1.train_run(0, {**base, "checkpoint": str(tmp_path / "a.pt")})
    ck = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        figure1.train_run(0, {**base, "checkpoint": str(ck), "stop_after": 150})
    import torch
    assert runtime.load_checkpoint(ck)["step"] == 100  # steps 101-150 are lost, as in a crash
    resumed = figure1.train_run(0, {**base, "checkpoint": str(ck), "resume": True})
    assert strip([resumed]) == strip([whole])


def test_resume_refuses_other_config(tmp_path):
    cfg = Figure1Config(steps=100, eval_every=50, checkpoint_every=50, seeds=1, workers=1)
    task = {"config": cfg.__dict__.copy(), "model": "baseline", "seed": 0, "checkpoint": str(tmp_path / "c.pt")}
    figure1.train_run(0, task)
    other = dict(task, config={**task["config"], "lr": 0.1}, resume=True)
    with pytest.raises(runtime.CheckpointError, match="different configuration"):
        figure1.train_run(0, other)


def test_cli_resume_after_sigkill_matches(tmp_path):
    # One torch thread per run: up to three runs share the cores, and torch's default (one
    # thread per core) made a 300-step run take 35 s instead of 8 s of CPU on two cores
    # with another process busy (threads spinning at each parallel region). Both runs being
    # compared use the same setting.
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "bnrepro", "figure1", "--steps", "300", "--eval-every", "75",
            "--checkpoint-every", "75", "--seeds", "1", "--workers", "1", "--quiet"]
    # The uninterrupted run and the one to be killed run at once (two cores; most of each
    # run is start-up); the killed one resumes as soon as it is dead, while the
    # uninterrupted one may still be training.
    full = subprocess.Popen(args + ["--out", str(tmp_path / "full")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    again = None
    try:
        ck = killed / "checkpoints" / "baseline-seed0.pt"
        deadline = time.time() + 120
        while not ck.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (killed / "metrics.json").exists()
        again = subprocess.Popen(args + ["--out", str(killed), "--resume"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        _, full_err = full.communicate(timeout=240)
        assert full.returncode == 0, full_err
        _, again_err = again.communicate(timeout=240)
        assert again.returncode == 0, again_err
    finally:
        for p in (full, proc, again):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert strip(a["runs"]) == strip(b["runs"])
    assert b["provenance"]["resumed"] is True


@pytest.mark.parametrize("argv, pattern", [
    (["figure1", "--bogus"], "unrecognized arguments: --bogus"),
    (["figure1", "--steps", "0"], "--steps must be >= 1"),
    (["figure1", "--lr", "fast"], "invalid float value"),
    (["figure1", "--resume"], "--resume needs the --out"),
    (["nope"], "invalid choice"),
])
def test_cli_errors_are_one_line(argv, pattern, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert pattern in err and "accepted:" in err and err.count("\n") == 1


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "figure1" in capsys.readouterr().out
