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

from .. import runtime
from ..config import SmallBatchConfig
from ..models import small_convnet

LABELS = {"none": "no normalization", "bn": "BatchNorm", "renorm": "Batch Renorm", "ghost": "BN, ghost batches"}

_DATA = None


def fashion_tensors(data_dir: Optional[str]):
    """(train_x, train_y, test_x, test_y): (N, 1, 28, 28) float32 standardized images."""
    global _DATA
    if _DATA is None or _DATA[0] != data_dir:
        from ..data import load_fashion_mnist
        d = load_fashion_mnist(data_dir)
        train = torch.from_numpy(d.train_images).float().div_(255.0)
        mean, std = train.mean().item(), train.std().item()
        to_x = lambda a: torch.from_numpy(a).float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)
        _DATA = (data_dir, (to_x(d.train_images), torch.from_numpy(d.train_labels),
                            to_x(d.test_images), torch.from_numpy(d.test_labels)))
    return _DATA[1]


def accuracy(model: nn.Module, x, y, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    model.train()
    return correct / len(y)


def steps_for(cfg: SmallBatchConfig, method: str, batch_size: int) -> int:
    real = cfg.ghost_batch if method == "ghost" else batch_size
    return max(1, int(cfg.epochs * 60_000) // real)


def train_run(task_id: int, task: Dict[str, Any]) -> Dict[str, Any]:
    cfg = SmallBatchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in task["config"].items()})
    method, bsz, seed = task["method"], task["batch_size"], task["seed"]
    done = Path(task["result"])
    if task.get("resume") and done.exists():
        return json.loads(done.read_text())
    train_x, train_y, test_x, test_y = fashion_tensors(cfg.data_dir)
    real = cfg.ghost_batch if method == "ghost" else bsz
    steps = steps_for(cfg, method, bsz)
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
    runtime.write_json(done, result)
    return result


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
    from .. import plots, report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    fashion_tensors(cfg.data_dir)
    tasks = [{"config": config, "method": m, "batch_size": b, "seed": cfg.first_seed + s, "resume": resume,
              "result": str(out / "runs" / f"{m}-b{b}-seed{cfg.first_seed + s}.json")}
             for s in range(cfg.seeds) for b in cfg.batch_sizes for m in cfg.methods]
    # Longest first, so the two workers finish together.
    tasks.sort(key=lambda t: -steps_for(cfg, t["method"], t["batch_size"]) * (1.0 if t["method"] != "ghost" else 4.0))
    total = sum(steps_for(cfg, t["method"], t["batch_size"]) for t in tasks)
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
