"""Figure 1 (Section 4.1): a sigmoid MLP on MNIST with and without BN.

(a) test accuracy against training steps; (b, c) the 15th, 50th and 85th percentiles of
the input to one fixed sigmoid of the last hidden layer over training, without and with BN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import torch
from torch import nn

from batchnorm.monitor import InputPercentiles

from .. import plots, report, runtime
from ..data import mnist_tensors
from ..evaluate import accuracy
from ..config import Figure1Config
from ..models import mnist_mlp
from ..names import DRIFT_FROM

MODELS = ("baseline", "bn")
PERCENTILES = (15, 50, 85)

class UnitPercentiles:
    """The 15th/50th/85th percentiles of every unit of a layer's input over the test set,
    one row per evaluation: ``history[q]`` is a list of (units,) lists."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.history: Dict[str, List[List[float]]] = {str(q): [] for q in PERCENTILES}
        self.steps: List[int] = []

    @contextlib.contextmanager
    def record(self, step: int) -> Iterator["UnitPercentiles"]:
        """Collect the layer's inputs inside this block, then append every unit's percentiles."""
        seen: List[torch.Tensor] = []
        handle = self.layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        try:
            yield self
        finally:
            handle.remove()
        qs = torch.quantile(torch.cat(seen).double(), torch.tensor([q / 100 for q in PERCENTILES],
                            dtype=torch.float64), dim=0)                     # (3, units)
        for q, row in zip(PERCENTILES, qs.tolist()):
            self.history[str(q)].append(row)
        self.steps.append(step)

    def drift(self, total_steps: int) -> Dict[str, List[float]]:
        """Per percentile, each unit's range (max - min) over the evaluations at or after
        DRIFT_FROM of the run."""
        keep = [i for i, st in enumerate(self.steps) if st >= DRIFT_FROM * total_steps]
        out = {}
        for q, rows in self.history.items():
            a = np.asarray([rows[i] for i in keep])                          # (evals, units)
            out[q] = (a.max(axis=0) - a.min(axis=0)).tolist() if len(a) else []
        return out

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "history": {k: [list(r) for r in v] for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        self.history = {k: [list(r) for r in v] for k, v in state["history"].items()}


def _evaluate(model: nn.Module, monitor: InputPercentiles, units: UnitPercentiles, test_x, test_y,
              step: int) -> float:
    """Test accuracy, recording the monitored unit's and every unit's input percentiles."""
    with monitor.record(step=step), units.record(step):
        return accuracy(model, test_x, test_y, batch=len(test_x))


def train_run(task_id: int, task: Dict[str, Any]) -> Dict[str, Any]:
    """Train one network for one seed; resumable from its checkpoint. Returns its record."""
    cfg = Figure1Config(**task["config"])
    kind, seed, ckpt = task["model"], task["seed"], Path(task["checkpoint"])
    train_x, train_y, test_x, test_y = mnist_tensors(cfg.data_dir)
    rank, world = runtime.distributed()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    torch.manual_seed(seed)
    net = mnist_mlp(use_bn=(kind == "bn"), init_std=cfg.init_std)
    # Under torchrun: every rank draws the same global batch and trains on its own slice,
    # with SyncBatchNorm and DDP (gradient average == gradient of the global mean loss).
    model = runtime.data_parallel(net)
    net = model.module if world > 1 else model
    lo, hi = rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    # The data order depends on the seed only: both networks see the same mini-batches.
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    monitor = InputPercentiles(net[-2], unit=cfg.unit, q=PERCENTILES)
    units = UnitPercentiles(net[-2])
    steps: List[int] = []
    accs: List[float] = []
    losses: List[float] = []
    start = 0
    elapsed = 0.0
    running = 0.0  # sum of training losses since the last evaluation
    if task.get("resume") and ckpt.exists():
        state = runtime.load_checkpoint(ckpt)
        if state["config"] != task["config"] or state["model"] != kind or state["seed"] != seed:
            raise runtime.CheckpointError(f"checkpoint {ckpt}: written by a different configuration; "
                             "use another --out or drop --resume")
        net.load_state_dict(state["model_state"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        monitor.load_state_dict(state["monitor"])
        units.load_state_dict(state["units"])
        steps, accs, losses = state["steps"], state["test_accuracy"], state["loss"]
        start, elapsed, running = state["step"], state["elapsed"], state["running_loss"]
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter() - elapsed
    model.train()
    for step in range(start + 1, cfg.steps + 1):
        idx = torch.randint(0, len(train_y), (cfg.batch_size,), generator=gen)[lo:hi]
        loss = loss_fn(model(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()  # this rank's slice; rank 0's is what the bar shows
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = _evaluate(net, monitor, units, test_x, test_y, step)  # every rank: identical replicas
            steps.append(step)
            accs.append(acc)
            losses.append(running / ((step - 1) % cfg.eval_every + 1))
            running = 0.0
            runtime.report_progress(task_id, step, losses[-1], acc)
        if (step % cfg.checkpoint_every == 0 or step == cfg.steps) and rank == 0:
            runtime.save_checkpoint(ckpt, {
                "config": task["config"], "model": kind, "seed": seed, "step": step,
                "model_state": net.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(), "monitor": monitor.state_dict(),
                "units": units.state_dict(),
                "steps": steps, "test_accuracy": accs, "loss": losses, "running_loss": running,
                "elapsed": time.perf_counter() - t0,
            })
        if task.get("stop_after") and step >= task["stop_after"]:
            raise KeyboardInterrupt(f"stopped at step {step} (stop_after, for testing)")
    return {
        "model": kind, "seed": seed, "steps": steps, "test_accuracy": accs, "train_loss": losses,
        "percentiles": {str(q): monitor.history[str(q)] for q in PERCENTILES},
        "unit_drift_per_unit": units.drift(cfg.steps),
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean/std final accuracy per model, and the first evaluated step at which the BN
    network's mean accuracy reaches the baseline's final mean accuracy."""
    out: Dict[str, Any] = {}
    curves = {}
    for kind in MODELS:
        rs = [r for r in runs if r["model"] == kind]
        acc = np.array([r["test_accuracy"] for r in rs])            # (seeds, evals)
        p50 = np.array([r["percentiles"]["50"] for r in rs])
        p15 = np.array([r["percentiles"]["15"] for r in rs])
        p85 = np.array([r["percentiles"]["85"] for r in rs])
        curves[kind] = acc.mean(axis=0)
        finals = acc[:, -1]
        out[kind] = {
            "final_accuracy": float(finals.mean()),
            "final_accuracy_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
            "final_accuracies": [float(a) for a in finals],
            "max_accuracy": float(acc.mean(axis=0).max()),
            # How far the monitored sigmoid's median input moves over training.
            "p50_range": float(np.mean(p50.max(axis=1) - p50.min(axis=1))),
            "p50_first": float(p50[:, 0].mean()),
            "p50_last": float(p50[:, -1].mean()),
            "spread_first": float((p85 - p15)[:, 0].mean()),
            "spread_last": float((p85 - p15)[:, -1].mean()),
            # Every unit of the last hidden layer: the range of each percentile of its input
            # over the evaluations from DRIFT_FROM of the run on, averaged over units and seeds.
            "unit_drift": {str(q): float(np.mean([np.mean(r["unit_drift_per_unit"][str(q)]) for r in rs]))
                           for q in PERCENTILES},
            "wall_time_s": float(np.mean([r["wall_time_s"] for r in rs])),
        }
    steps = runs[0]["steps"]
    target = out["baseline"]["final_accuracy"]
    hit = np.nonzero(curves["bn"] >= target)[0]
    out["steps_to_baseline_final"] = int(steps[hit[0]]) if len(hit) else None
    out["baseline_final_step"] = int(steps[-1])
    return out


def run(cfg: Figure1Config, out: Path, resume: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Train both networks for every seed, then write metrics.json, figure1.png, report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    mnist_tensors(cfg.data_dir)  # fail fast on data problems, before any process starts
    tasks = [{"config": config, "model": kind, "seed": cfg.first_seed + s, "resume": resume,
              "checkpoint": str(out / "checkpoints" / f"{kind}-seed{cfg.first_seed + s}.pt")}
             for s in range(cfg.seeds) for kind in MODELS]
    started = runtime.provenance()  # the code and commit that run, taken before training
    t0 = time.perf_counter()
    rank, world = runtime.distributed()
    workers = 1 if world > 1 else cfg.workers  # under torchrun the ranks are the parallelism
    runs = runtime.run_tasks(train_run, tasks, workers, cfg.steps * len(tasks), "figure1",
                             quiet=quiet or rank != 0, threads=1)
    wall = time.perf_counter() - t0
    if rank != 0:
        return None  # only rank 0 writes outputs
    metrics = {
        "config": config,
        "runs": runs,
        "summary": summarize(runs),
        "provenance": {**started, "wall_time_s": round(wall, 1), "resumed": resume,
                       "processes": world},
    }
    runtime.write_json(out / "metrics.json", metrics)
    plots.figure1(metrics, out / "figure1.png")
    runtime.atomic_write_text(out / "report.md", report.figure1(metrics))
    return metrics


def headline(metrics: Dict[str, Any]) -> str:
    s = metrics["summary"]
    return (f"final test accuracy: without BN {100 * s['baseline']['final_accuracy']:.2f} %, "
            f"with BN {100 * s['bn']['final_accuracy']:.2f} %; BN reaches the baseline's final accuracy at step "
            f"{s['steps_to_baseline_final']} of {s['baseline_final_step']}")
