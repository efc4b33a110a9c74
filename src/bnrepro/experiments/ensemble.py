"""Section 4.2.3: an ensemble of BN-x30-based networks, each with some of the paper's
modifications (larger initial conv weights, dropout of 5 or 10 %, per-activation BN in the
last hidden layers), predictions averaged over class probabilities."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import report, runtime
from ..data import fashion_tensors
from ..config import EnsembleConfig
from .inception import recipe, train_network

# The variations, cycled through by member index; each member also has its own seed.
VARIATIONS = [
    {"name": "bn-x30, dropout 5%", "dropout": False, "dropout_p": 0.05},
    {"name": "bn-x30, dropout 10%", "dropout": False, "dropout_p": 0.10},
    {"name": "bn-x30, larger initial conv weights (x1.5)", "init_gain": 1.5},
    {"name": "bn-x30, per-activation BN hidden layer", "hidden_bn": True},
    {"name": "bn-x30, dropout 5%, per-activation BN hidden layer", "dropout": False, "dropout_p": 0.05,
     "hidden_bn": True},
    {"name": "bn-x30, dropout 10%, larger initial conv weights (x1.5)", "dropout": False, "dropout_p": 0.10,
     "init_gain": 1.5},
]


def run(cfg: EnsembleConfig, out: Path, resume: bool = False, quiet: bool = False) -> Optional[Dict[str, Any]]:

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    _, _, _, test_y = fashion_tensors(cfg.data_dir)
    rank, world = runtime.distributed()
    if world > 1:
        raise SystemExit("bnrepro ensemble: trains its members in parallel processes itself; run it without torchrun")
    tasks = []
    for i in range(cfg.members):
        var = {k: v for k, v in VARIATIONS[i % len(VARIATIONS)].items() if k != "name"}
        seed = cfg.first_seed + i
        tasks.append({"name": f"member {i}: " + VARIATIONS[i % len(VARIATIONS)]["name"],
                      "recipe": recipe(cfg, "bn-x30", var), "seed": seed, "steps": cfg.steps,
                      "batch_size": cfg.batch_size, "momentum": cfg.momentum, "eval_every": 0,
                      "checkpoint_every": cfg.checkpoint_every, "data_dir": cfg.data_dir, "resume": resume,
                      "return_probs": True, "key": repr((config, i)),
                      "checkpoint": str(out / "checkpoints" / f"member{i}.pt")})
    started = runtime.provenance()  # the code and commit that run, taken before training
    t0 = time.perf_counter()
    records = runtime.run_tasks(train_network, tasks, cfg.workers, cfg.steps * len(tasks), "ensemble", quiet=quiet)
    probs = torch.stack([r["test_probs"] for r in records])                # (members, 10000, 10)
    ensemble_pred = probs.mean(dim=0).argmax(dim=1)
    members = [{"name": t["name"], "seed": t["seed"], "test_error": 1.0 - r["test_accuracy_final"],
                "recipe": t["recipe"], "wall_time_s": r["wall_time_s"]} for t, r in zip(tasks, records)]
    metrics = {"config": config, "members": members,
               "ensemble_test_error": float((ensemble_pred != test_y).float().mean()),
               "best_member_test_error": min(m["test_error"] for m in members),
               "provenance": {**started, "wall_time_s": round(time.perf_counter() - t0, 1),
                              "resumed": resume, "processes": 1}}
    runtime.write_json(out / "metrics.json", metrics)
    runtime.atomic_write_text(out / "report.md", report.ensemble(metrics))
    return metrics


def headline(metrics: Dict[str, Any]) -> str:
    return (f"ensemble test error {100 * metrics['ensemble_test_error']:.2f}% vs best member "
            f"{100 * metrics['best_member_test_error']:.2f}%")
