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
    assert main(["inception", "--steps", "12", "--eval-every", "6", "--eval-images", "200", "--workers", "1",
                 "--data-dir", str(fashion_dir), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    names = ["inception", "bn-baseline", "bn-x5", "bn-x30", "bn-x5-sigmoid", "inception-sigmoid"]
    assert [r["variant"] for r in m["runs"]] == names
    for r in m["runs"]:
        assert r["steps"] == [6, 12] and len(r["test_accuracy"]) == 2
    for v in names:
        assert set(m["summary"][v]) >= {"max_accuracy", "steps_to_inception_max"}
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
