"""Smoke runs of the small-batch, inception and ensemble experiments (reduced sizes), and
resume for the Inception trainer."""

import json

import pytest
import torch

from bnrepro import runtime
from bnrepro.__main__ import main
from bnrepro.config import InceptionConfig
from bnrepro.experiments import inception


def test_small_batch_smoke(tmp_path, fashion_dir):
    out = tmp_path / "sb"
    assert main(["small-batch", "--batch-sizes", "4", "8", "--epochs", "0.01", "--seeds", "1", "--workers", "1",
                 "--data-dir", str(fashion_dir), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {(r["method"], r["batch_size"]) for r in m["runs"]} == {(a, b) for a in ("none", "bn", "renorm", "ghost")
                                                                    for b in (4, 8)}
    ghost = [r for r in m["runs"] if r["method"] == "ghost"]
    assert all(r["real_batch"] == 64 for r in ghost)
    assert set(m["summary"]["bn"]) == {"4", "8"}
    assert (out / "small_batch.png").stat().st_size > 10_000
    assert "Batch Renorm beats BN" in (out / "report.md").read_text()


def test_inception_smoke_all_variants(tmp_path, fashion_dir):
    out = tmp_path / "inc"
    assert main(["inception", "--steps", "12", "--fast-steps", "12", "--seeds", "1", "--eval-every", "6", "--batch-size", "16",
                 "--eval-images", "200", "--workers", "1",
                 "--data-dir", str(fashion_dir), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    names = ["inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid", "inception-sigmoid"]
    assert [r["variant"] for r in m["runs"]] == names
    for r in m["runs"]:
        assert r["steps"] == [6, 12] and len(r["test_accuracy"]) == 2
        assert set(r["plateau"]) >= {"plateaued", "best", "best_last_20pct", "gain_last_quarter", "stopped_early"}
    for v in names:
        assert set(m["summary"][v]) >= {"max_accuracy", "steps_to_inception_max", "steps_to_inception_max_per_seed",
                                        "max_accuracy_per_seed", "plateau"}
    assert "inception_steps_over_bn_x5_range" in m["summary"]
    rec = {r["variant"]: r["recipe"] for r in m["runs"]}
    assert rec["bn-x30"]["lr"] == pytest.approx(30 * rec["inception"]["lr"])
    assert rec["bn-x5"]["weight_decay"] == pytest.approx(rec["bn-baseline"]["weight_decay"] / 5)
    assert rec["bn-x5"]["dropout"] == 0 and rec["inception"]["dropout"] > 0
    assert rec["inception"]["lrn"] and not rec["bn-x5"]["lrn"]
    assert (out / "figure2.png").stat().st_size > 10_000
    assert "Figure 3" in (out / "report.md").read_text()


def test_inception_resume_equals_uninterrupted(tmp_path, fashion_dir):
    cfg = InceptionConfig(steps=16, eval_every=4, eval_images=200, checkpoint_every=5)
    base = {"recipe": inception.recipe(cfg, "bn-x5"), "seed": 3, "steps": 16, "batch_size": 16, "momentum": 0.9,
            "eval_every": 4, "eval_images": 200, "checkpoint_every": 5, "key": "k",
            "data_dir": str(fashion_dir)}
    whole = inception.train_network(0, {**base, "checkpoint": str(tmp_path / "a.pt")})
    with pytest.raises(KeyboardInterrupt):
        inception.train_network(0, {**base, "checkpoint": str(tmp_path / "b.pt"), "stop_after": 12})
    assert runtime.load_checkpoint(tmp_path / "b.pt")["step"] == 10
    resumed = inception.train_network(0, {**base, "checkpoint": str(tmp_path / "b.pt"), "resume": True})
    for k in ("steps", "test_accuracy", "train_loss"):
        assert resumed[k] == whole[k]


def test_ensemble_smoke(tmp_path, fashion_dir):
    out = tmp_path / "ens"
    assert main(["ensemble", "--members", "2", "--steps", "10", "--workers", "1", "--data-dir", str(fashion_dir),
                 "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["members"]) == 2 and all(0 <= x["test_error"] <= 1 for x in m["members"])
    assert 0 <= m["ensemble_test_error"] <= 1
    assert m["members"][0]["recipe"]["lr"] == pytest.approx(30 * m["config"]["lr"])


def test_plateau_rule():
    flat = [0.50, 0.70, 0.80, 0.85, 0.860, 0.861, 0.859, 0.862]
    steps = [100 * (i + 1) for i in range(len(flat))]
    assert inception.plateau(steps, flat, 0.003)["plateaued"]
    rising = [0.50, 0.60, 0.70, 0.75, 0.78, 0.80, 0.82, 0.84]
    p = inception.plateau(steps, rising, 0.003)
    assert not p["plateaued"] and p["gain_last_quarter"] == pytest.approx(0.84 - 0.80)
    fell = [0.50, 0.70, 0.86, 0.85, 0.84, 0.83, 0.82, 0.80]  # the best is early, the end is worse
    assert not inception.plateau(steps, fell, 0.003)["plateaued"]


def test_baseline_stops_at_its_plateau_and_resumes_stopped(tmp_path, fashion_dir, monkeypatch):
    cfg = InceptionConfig(steps=400, eval_every=4, eval_images=200, checkpoint_every=1000)
    # a plateau at once: every evaluation equals the first
    monkeypatch.setattr(inception, "accuracy", lambda *a, **k: 0.5)
    task = {"recipe": inception.recipe(cfg, "inception"), "seed": 0, "steps": 400, "batch_size": 8,
            "momentum": 0.9, "eval_every": 4, "eval_images": 200, "checkpoint_every": 1000, "key": "k",
            "data_dir": str(fashion_dir), "until_plateau": True, "min_steps": 12, "plateau_tol": 0.003,
            "checkpoint": str(tmp_path / "p.pt")}
    rec = inception.train_network(0, task)
    assert rec["steps"][-1] == 12 and rec["plateau"]["stopped_early"] and rec["plateau"]["plateaued"]
    assert runtime.load_checkpoint(tmp_path / "p.pt")["stopped"] is True
    again = inception.train_network(0, {**task, "resume": True})
    assert again["steps"] == rec["steps"]


def test_summary_pairs_seeds_and_reports_ranges():
    def run(v, seed, accs):
        return {"variant": v, "seed": seed, "steps": [100 * (i + 1) for i in range(len(accs))],
                "test_accuracy": accs}
    runs = [run("inception", 0, [0.5, 0.6, 0.7, 0.8]), run("inception", 1, [0.5, 0.7, 0.9]),
            run("bn-x5", 0, [0.8, 0.9]), run("bn-x5", 1, [0.6, 0.95])]
    s = inception.summarize(runs, ["inception", "bn-x5"])
    assert s["inception_mean_max"] == pytest.approx(0.85)
    assert s["inception"]["steps_to_inception_max_per_seed"] == [None, 300]
    assert s["bn-x5"]["steps_to_inception_max_per_seed"] == [200, 200]
    # seed 0: Inception reaches its 0.8 at 400, BN-x5 at 100; seed 1: 0.9 at 300 vs 200
    assert s["inception_steps_over_bn_x5_per_seed"] == [4.0, 1.5]
    assert s["inception_steps_over_bn_x5_range"]["min"] == 1.5 and s["inception_steps_over_bn_x5_range"]["max"] == 4.0
    assert s["inception_steps_over_bn_x5"] == pytest.approx(350 / 200)
