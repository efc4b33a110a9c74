"""Beyond the paper: BN's weak spot, small batches. A small BN conv net on Fashion-MNIST
trained with per-replica batch sizes 2..64 on the same number of examples, comparing no
normalization, BN, Batch Renormalization and BN with ghost batches.

"ghost" trains on batches of ``ghost_batch`` examples whose BN statistics are computed per
chunk of ``batch_size`` (what ``batch_size``-example replicas of a data-parallel job see
without SyncBatchNorm); the other methods train on batches of ``batch_size`` examples.
The learning rate scales linearly with the real batch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .. import plots, report, runtime
from ..data import fashion_tensors
from ..evaluate import accuracy
from ..config import SmallBatchConfig
from ..models import small_convnet

def steps_for(cfg: SmallBatchConfig, method: str, batch_size: int, n_train: int) -> int:
    """Steps of one run: ``cfg.epochs`` passes over the ``n_train`` training images."""
    real = cfg.ghost_batch if method == "ghost" else batch_size
    return max(1, int(cfg.epochs * n_train) // real)


def train_run(task_id: int, task: Dict[str, Any]) -> Dict[str, Any]:
    cfg = SmallBatchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in task["config"].items()})
    method, bsz, seed = task["method"], task["batch_size"], task["seed"]
    done = Path(task["result"])
    if task.get("resume") and done.exists():
        saved = _saved_result(done, task)
        if saved is not None:
            return saved
    train_x, train_y, test_x, test_y = fashion_tensors(cfg.data_dir)
    real = cfg.ghost_batch if method == "ghost" else bsz
    steps = steps_for(cfg, method, bsz, len(train_y))
    torch.manual_seed(seed)
    model = small_convnet(method, total_steps=steps, ghost_batch=bsz)
    lr = cfg.lr * real / 64
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    # The data order depends on the seed only: every method and batch size sees the same
    # sequence of examples.
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(train_y), generator=gen) for _ in range(int(np.ceil(cfg.epochs)) + 1)])
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    running, losses, diverged = 0.0, [], False
    report_every = max(1, steps // 20)
    for step in range(1, steps + 1):
        idx = order[(step - 1) * real: step * real]
        loss = loss_fn(model(train_x[idx]), train_y[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % report_every == 0 or step == steps:
            losses.append(running / ((step - 1) % report_every + 1))
            running = 0.0
            runtime.report_progress(task_id, step, losses[-1], None)
    acc = 0.1 if diverged else accuracy(model, test_x, test_y)
    if diverged:
        runtime.report_progress(task_id, steps, float("nan"), None)
    result = {"method": method, "batch_size": bsz, "seed": seed, "real_batch": real, "steps": steps, "lr": lr,
              "test_accuracy": acc, "diverged": diverged, "train_loss": losses,
              "wall_time_s": round(time.perf_counter() - t0, 2)}
    runtime.write_json(done, {"task": _task_identity(task), "result": result})
    return result


def _task_identity(task: Dict[str, Any]) -> Dict[str, Any]:
    """What a per-run result depends on: the whole config, the method, batch size, seed."""
    return {k: task[k] for k in ("config", "method", "batch_size", "seed")}


def _saved_result(path: Path, task: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The result stored at ``path`` if it was made by this very task (same config), else
    None: a result of another configuration is retrained, never reused."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("task") != json.loads(json.dumps(_task_identity(task))):
        return None
    return saved.get("result")


def summarize(cfg: SmallBatchConfig, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for method in cfg.methods:
        out[method] = {}
        for b in cfg.batch_sizes:
            accs = [r["test_accuracy"] for r in runs if r["method"] == method and r["batch_size"] == b]
            out[method][str(b)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                                   "n": len(accs)}
    return out


def run(cfg: SmallBatchConfig, out: Path, resume: bool = False, quiet: bool = False) -> Optional[Dict[str, Any]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    n_train = len(fashion_tensors(cfg.data_dir)[1])  # also fails fast on data problems
    tasks = [{"config": config, "method": m, "batch_size": b, "seed": cfg.first_seed + s, "resume": resume,
              "result": str(out / "runs" / f"{m}-b{b}-seed{cfg.first_seed + s}.json")}
             for s in range(cfg.seeds) for b in cfg.batch_sizes for m in cfg.methods]
    # Longest first, so the two workers finish together.
    tasks.sort(key=lambda t: -steps_for(cfg, t["method"], t["batch_size"], n_train)
               * (1.0 if t["method"] != "ghost" else 4.0))
    total = sum(steps_for(cfg, t["method"], t["batch_size"], n_train) for t in tasks)
    started = runtime.provenance()  # the code and commit that run, taken before training
    t0 = time.perf_counter()
    rank, world = runtime.distributed()
    if world > 1:
        raise SystemExit("bnrepro small-batch: simulates replicas itself (ghost batches); run it without torchrun")
    runs = runtime.run_tasks(train_run, tasks, cfg.workers, total, "small-batch", quiet=quiet)
    runs.sort(key=lambda r: (r["method"], r["batch_size"], r["seed"]))
    metrics = {"config": config, "runs": runs, "summary": summarize(cfg, runs),
               "provenance": {**started, "wall_time_s": round(time.perf_counter() - t0, 1),
                              "resumed": resume, "processes": 1}}
    runtime.write_json(out / "metrics.json", metrics)
    plots.small_batch(metrics, out / "small_batch.png")
    runtime.atomic_write_text(out / "report.md", report.small_batch(metrics))
    return metrics


def headline(metrics: Dict[str, Any]) -> str:
    s = metrics["summary"]
    parts = []
    for method, by_b in s.items():
        parts.append(f"{method}: " + ", ".join(f"B={b} {100 * v['mean']:.1f}%" for b, v in by_b.items()))
    return "test accuracy by batch size -- " + "; ".join(parts)
