"""Section 4.2 at small scale: Inception and its BN variants (Figure 2 curves, Figure 3
table) on Fashion-MNIST, with the paper's recipe changes (Section 4.2.1).

What is comparable: the recipe differences between variants (BN or not, learning-rate
multiples, dropout, L2, decay speed, LRN, shuffling, distortions) and their direction.
What is not: the data (28x28 grey Fashion-MNIST, not ImageNet), the network (a few
Inception modules, not 22 layers), the scale (thousands of steps, not millions), so
absolute accuracies and step counts are not the paper's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from .. import names, plots, report, runtime
from ..data import fashion_tensors
from ..config import InceptionConfig
from ..models import SmallInception

# Section 4.2.2's variants as changes to the Inception recipe. lr_mult multiplies the
# initial learning rate; "x5 recipe" is Section 4.2.1: no dropout, L2 / 5, 6x faster decay,
# no LRN, thorough shuffling, fewer photometric distortions.
X5_RECIPE = {"dropout": False, "wd_div": 5.0, "decay_speed": 6.0, "lrn": False, "shuffle": "thorough", "jitter_div": 4.0}
BASE_RECIPE = {"dropout": True, "wd_div": 1.0, "decay_speed": 1.0, "lrn": True, "shuffle": "light", "jitter_div": 1.0}
VARIANTS: Dict[str, Dict[str, Any]] = {
    v.name: {"bn": v.bn, "act": v.act, "lr_mult": v.lr_mult, **(X5_RECIPE if v.x5_recipe else BASE_RECIPE)}
    for v in names.VARIANTS}


def augment(x: torch.Tensor, gen: torch.Generator, jitter: float) -> torch.Tensor:
    """Random translation by up to 2 pixels (per example) and photometric distortion:
    contrast x (1 +- jitter) and brightness +- jitter (in standardized units)."""
    n = x.size(0)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(28).view(1, 28))                       # (n, 28)
    cols = (dx.view(n, 1) + torch.arange(28).view(1, 28))                       # (n, 28)
    out = padded[:, 0][torch.arange(n).view(n, 1, 1), rows.view(n, 28, 1), cols.view(n, 1, 28)].unsqueeze(1)
    if jitter > 0:
        contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * jitter
        bright = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * jitter
        mean = out.mean(dim=(2, 3), keepdim=True)
        out = (out - mean) * contrast + mean + bright
    return out


def recipe(cfg, variant: str, overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Concrete hyperparameters of a variant under this config."""
    v = dict(VARIANTS[variant])
    v.update(overrides or {})
    return {
        "bn": v["bn"], "act": v["act"], "lrn": v["lrn"],
        "dropout": getattr(cfg, "dropout", 0.4) if v["dropout"] else float(v.get("dropout_p", 0.0)),
        "lr": cfg.lr * v["lr_mult"],
        "weight_decay": cfg.weight_decay / v["wd_div"],
        "half_life": max(1, int(cfg.decay_every * cfg.steps / v["decay_speed"])),
        "shuffle": v["shuffle"],
        "jitter": cfg.jitter / v["jitter_div"],
        "init_gain": float(v.get("init_gain", 1.0)),
        "hidden_bn": bool(v.get("hidden_bn", False)),
    }


def train_network(task_id: int, task: Dict[str, Any]) -> Dict[str, Any]:
    """Train one network of the given recipe, resumable; returns its record (and, if
    asked, its test-set class probabilities)."""
    r, seed, ckpt = task["recipe"], task["seed"], Path(task["checkpoint"])
    steps, batch, eval_every = task["steps"], task["batch_size"], task.get("eval_every", 0)
    train_x, train_y, test_x, test_y = fashion_tensors(task.get("data_dir"))
    n_eval = task.get("eval_images", len(test_y))
    torch.manual_seed(seed)
    model = SmallInception(bn=r["bn"], act=r["act"], lrn=r["lrn"], dropout=r["dropout"],
                           init_gain=r["init_gain"], hidden_bn=r["hidden_bn"])
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=task["momentum"], weight_decay=r["weight_decay"])
    # Exponential decay: the rate halves every half_life steps.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** (s / r["half_life"]))
    gen = torch.Generator().manual_seed(seed)
    fixed_order = torch.randperm(len(train_y), generator=gen)  # "light" shuffling: one order, every epoch
    steps_done, accs, losses, running, elapsed = [], [], [], 0.0, 0.0
    start = 0
    if task.get("resume") and ckpt.exists():
        state = runtime.load_checkpoint(ckpt)
        if state["task_key"] != task["key"]:
            raise runtime.CheckpointError(f"checkpoint {ckpt}: written by a different configuration; "
                                         "use another --out or drop --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        fixed_order = state["fixed_order"]
        steps_done, accs, losses = state["steps"], state["test_accuracy"], state["loss"]
        start, running, elapsed = state["step"], state["running_loss"], state["elapsed"]
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = len(train_y) // batch
    order = None
    t0 = time.perf_counter() - elapsed
    model.train()
    for step in range(start + 1, steps + 1):
        epoch, pos = divmod(step - 1, per_epoch)
        if pos == 0 or order is None:
            if r["shuffle"] == "thorough":
                # A fresh permutation per epoch, derived from (seed, epoch) so that resuming
                # mid-epoch gives the same order.
                order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            else:
                order = fixed_order
        idx = order[pos * batch:(pos + 1) * batch]
        x = augment(train_x[idx], gen, r["jitter"])
        loss = loss_fn(model(x), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item() if torch.isfinite(loss) else float("nan")
        if eval_every and (step % eval_every == 0 or step == steps):
            steps_done.append(step)
            accs.append(evaluate(model, test_x[:n_eval], test_y[:n_eval]))
            losses.append(running / ((step - 1) % eval_every + 1))
            running = 0.0
            runtime.report_progress(task_id, step, losses[-1], accs[-1])
        elif not eval_every and step % 100 == 0:
            runtime.report_progress(task_id, step, loss.item(), None)
        if step % task["checkpoint_every"] == 0 or step == steps:
            runtime.save_checkpoint(ckpt, {
                "task_key": task["key"], "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": gen.get_state(), "fixed_order": fixed_order,
                "steps": steps_done, "test_accuracy": accs, "loss": losses, "running_loss": running,
                "elapsed": time.perf_counter() - t0})
        if task.get("stop_after") and step >= task["stop_after"]:
            raise KeyboardInterrupt(f"stopped at step {step} (stop_after, for testing)")
    record = {"seed": seed, "steps": steps_done, "test_accuracy": accs, "train_loss": losses,
              "wall_time_s": round(time.perf_counter() - t0, 2), "recipe": r}
    if task.get("return_probs"):
        record["test_probs"] = probabilities(model, test_x)
        record["test_accuracy_final"] = float((record["test_probs"].argmax(1) == test_y).float().mean())
    return record


def evaluate(model: nn.Module, x, y, batch: int = 2000) -> float:
    return float((probabilities(model, x, batch).argmax(1) == y).float().mean())


def probabilities(model: nn.Module, x, batch: int = 2000) -> torch.Tensor:
    """Softmax class probabilities on x, in eval mode (running statistics)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(torch.softmax(model(x[i:i + batch]), dim=1))
    model.train()
    return torch.cat(out)


def first_reach(steps: List[int], curve: np.ndarray, target: float) -> Optional[int]:
    hit = np.nonzero(curve >= target - 1e-12)[0]
    return int(steps[hit[0]]) if len(hit) else None


def summarize(runs: List[Dict[str, Any]], variants) -> Dict[str, Any]:
    """Per variant: max of the mean accuracy curve and the first evaluated step at which the
    mean curve reaches Inception's maximum mean accuracy."""
    curves = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        curves[v] = (rs[0]["steps"], np.mean([r["test_accuracy"] for r in rs], axis=0),
                     [max(r["test_accuracy"]) for r in rs])
    target = float(curves["inception"][1].max()) if "inception" in curves else None
    out: Dict[str, Any] = {}
    for v, (steps, curve, maxes) in curves.items():
        out[v] = {"max_accuracy": float(curve.max()),
                  "max_accuracy_std": float(np.std(maxes, ddof=1)) if len(maxes) > 1 else 0.0,
                  "final_accuracy": float(curve[-1]),
                  "steps_to_inception_max": first_reach(steps, curve, target) if target is not None else None}
    if target is not None and "bn-x5" in out:
        a, b = out["inception"]["steps_to_inception_max"], out["bn-x5"]["steps_to_inception_max"]
        out["inception_steps_over_bn_x5"] = (a / b) if (a and b) else None
    return out


def run(cfg: InceptionConfig, out: Path, resume: bool = False, quiet: bool = False) -> Optional[Dict[str, Any]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(cfg)
    fashion_tensors(cfg.data_dir)
    rank, world = runtime.distributed()
    if world > 1:
        raise SystemExit("bnrepro inception: runs its variants in parallel processes itself; run it without torchrun")
    tasks = []
    for s in range(cfg.seeds):
        for v in cfg.variants:
            r = recipe(cfg, v)
            seed = cfg.first_seed + s
            tasks.append({"variant": v, "recipe": r, "seed": seed, "steps": cfg.steps, "batch_size": cfg.batch_size,
                          "momentum": cfg.momentum, "eval_every": cfg.eval_every, "eval_images": cfg.eval_images,
                          "checkpoint_every": cfg.checkpoint_every, "data_dir": cfg.data_dir, "resume": resume,
                          "key": repr((config, v, seed)),
                          "checkpoint": str(out / "checkpoints" / f"{v}-seed{seed}.pt")})
    started = runtime.provenance()  # the code and commit that run, taken before training
    t0 = time.perf_counter()
    records = runtime.run_tasks(train_network, tasks, cfg.workers, cfg.steps * len(tasks), "inception", quiet=quiet)
    runs = [{"variant": t["variant"], **rec} for t, rec in zip(tasks, records)]
    wall = time.perf_counter() - t0
    metrics = {"config": config, "runs": runs, "summary": summarize(runs, cfg.variants),
               "provenance": {**started, "wall_time_s": round(wall, 1), "resumed": resume,
                              "processes": 1,
                              "images_per_second": round(cfg.steps * cfg.batch_size * len(tasks) / wall, 1)}}
    runtime.write_json(out / "metrics.json", metrics)
    plots.figure2(metrics, out / "figure2.png")
    runtime.atomic_write_text(out / "report.md", report.inception(metrics))
    return metrics


def headline(metrics: Dict[str, Any]) -> str:
    s = metrics["summary"]
    return "max test accuracy -- " + ", ".join(
        f"{names.label(v)} {100 * s[v]['max_accuracy']:.2f}%" for v in metrics["config"]["variants"])
