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
from ..evaluate import accuracy, probabilities
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
        "half_life": max(1, int(cfg.half_life / v["decay_speed"])),
        "shuffle": v["shuffle"],
        "jitter": cfg.jitter / v["jitter_div"],
        "init_gain": float(v.get("init_gain", 1.0)),
        "hidden_bn": bool(v.get("hidden_bn", False)),
    }


def plateau(steps: List[int], accs: List[float], tol: float) -> Dict[str, Any]:
    """The plateau rule, judged at the last evaluation (step t) of a run:

    - the best accuracy of the last 20 % of the run (evaluations after 0.8 t) is within
      ``tol`` of the run's best, and
    - the run's best exceeds the best up to 0.75 t by at most ``tol`` (no improvement of
      more than ``tol`` over the last quarter).
    """
    st, a = np.asarray(steps, dtype=float), np.asarray(accs, dtype=float)
    t = st[-1]
    best = float(a.max())
    last20, before = a[st > 0.8 * t], a[st <= 0.75 * t]
    best_last20 = float(last20.max()) if len(last20) else float("-inf")
    gain = best - float(before.max()) if len(before) else float("inf")
    return {"plateaued": bool(best_last20 >= best - tol and gain <= tol), "step": int(t), "best": best,
            "best_last_20pct": best_last20, "gain_last_quarter": gain}


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
    start, stopped = 0, False
    until_plateau = bool(task.get("until_plateau"))
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
        stopped = state["stopped"]
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = len(train_y) // batch
    order = None
    t0 = time.perf_counter() - elapsed
    model.train()
    for step in range(start + 1, steps + 1):
        if stopped:
            break
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
            accs.append(accuracy(model, test_x[:n_eval], test_y[:n_eval]))
            losses.append(running / ((step - 1) % eval_every + 1))
            running = 0.0
            runtime.report_progress(task_id, step, losses[-1], accs[-1])
            # The baselines train until they have converged (the plateau rule), not for a
            # fixed length: the paper's comparison is against a finished Inception.
            stopped = (until_plateau and step >= task.get("min_steps", 0)
                       and plateau(steps_done, accs, task["plateau_tol"])["plateaued"])
        elif not eval_every and step % 100 == 0:
            runtime.report_progress(task_id, step, loss.item(), None)
        if step % task["checkpoint_every"] == 0 or step == steps or stopped:
            runtime.save_checkpoint(ckpt, {
                "task_key": task["key"], "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": gen.get_state(), "fixed_order": fixed_order,
                "steps": steps_done, "test_accuracy": accs, "loss": losses, "running_loss": running,
                "elapsed": time.perf_counter() - t0, "stopped": stopped})
        if task.get("stop_after") and step >= task["stop_after"]:
            raise KeyboardInterrupt(f"stopped at step {step} (stop_after, for testing)")
    record = {"seed": seed, "steps": steps_done, "test_accuracy": accs, "train_loss": losses,
              "wall_time_s": round(time.perf_counter() - t0, 2), "recipe": r}
    if accs:
        record["plateau"] = {**plateau(steps_done, accs, task.get("plateau_tol", 0.003)), "stopped_early": stopped}
    if task.get("return_probs"):
        record["test_probs"] = probabilities(model, test_x)
        record["test_accuracy_final"] = float((record["test_probs"].argmax(1) == test_y).float().mean())
    return record


def first_reach(steps: List[int], curve, target: float) -> Optional[int]:
    hit = np.nonzero(np.asarray(curve) >= target - 1e-12)[0]
    return int(steps[hit[0]]) if len(hit) else None


def _spread(values: List[Optional[float]]) -> Dict[str, Any]:
    """Mean, min and max of the values that exist, and how many do."""
    have = [v for v in values if v is not None]
    return {"mean": float(np.mean(have)) if have else None, "min": min(have) if have else None,
            "max": max(have) if have else None, "n": len(have), "of": len(values)}


def summarize(runs: List[Dict[str, Any]], variants) -> Dict[str, Any]:
    """Figure 3 over seeds. Inception's target is the mean over seeds of each Inception
    run's maximum; each run's steps to it are the first evaluation at or above it.
    Inception's own steps (the paper's 31.0M) are each Inception run's steps to its own
    maximum; the ratio pairs each Inception seed with the BN-x5 run of the same seed,
    which is asked to reach that seed's maximum."""
    by = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]) for v in variants}
    inc = by.get("inception", [])
    target = float(np.mean([max(r["test_accuracy"]) for r in inc])) if inc else None
    out: Dict[str, Any] = {"inception_mean_max": target}
    for v, rs in by.items():
        maxes = [max(r["test_accuracy"]) for r in rs]
        to_target = [first_reach(r["steps"], r["test_accuracy"], target) if target is not None else None for r in rs]
        out[v] = {"max_accuracy": float(np.mean(maxes)),
                  "max_accuracy_std": float(np.std(maxes, ddof=1)) if len(maxes) > 1 else 0.0,
                  "max_accuracy_per_seed": [float(m) for m in maxes],
                  "final_accuracy": float(np.mean([r["test_accuracy"][-1] for r in rs])),
                  "seeds": [r["seed"] for r in rs],
                  "steps_trained": [r["steps"][-1] for r in rs],
                  "steps_to_inception_max_per_seed": to_target,
                  # mean over seeds, only when every seed got there (else "never")
                  "steps_to_inception_max": float(np.mean(to_target)) if to_target and None not in to_target
                  else None,
                  "plateau": [r.get("plateau") for r in rs]}
    if inc and "bn-x5" in by:
        own = {r["seed"]: first_reach(r["steps"], r["test_accuracy"], max(r["test_accuracy"])) for r in inc}
        x5 = {r["seed"]: r for r in by["bn-x5"]}
        ratios = []
        for r in inc:
            b = x5.get(r["seed"])
            hit = first_reach(b["steps"], b["test_accuracy"], max(r["test_accuracy"])) if b else None
            ratios.append(own[r["seed"]] / hit if hit else None)
        x5_steps = out["bn-x5"]["steps_to_inception_max"]
        out["inception_steps_to_own_max"] = _spread(list(own.values()))
        out["inception_steps_over_bn_x5"] = (out["inception_steps_to_own_max"]["mean"] / x5_steps
                                             if x5_steps and out["inception_steps_to_own_max"]["mean"] else None)
        out["inception_steps_over_bn_x5_per_seed"] = ratios
        out["inception_steps_over_bn_x5_range"] = _spread(ratios)
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
            long = names.VARIANT[v].until_plateau
            tasks.append({"variant": v, "recipe": r, "seed": seed, "steps": cfg.steps if long else cfg.fast_steps,
                          "until_plateau": long, "min_steps": cfg.min_steps, "plateau_tol": cfg.plateau_tol,
                          "batch_size": cfg.batch_size,
                          "momentum": cfg.momentum, "eval_every": cfg.eval_every, "eval_images": cfg.eval_images,
                          "checkpoint_every": cfg.checkpoint_every, "data_dir": cfg.data_dir, "resume": resume,
                          "key": repr((config, v, seed)),
                          "checkpoint": str(out / "checkpoints" / f"{v}-seed{seed}.pt")})
    started = runtime.provenance()  # the code and commit that run, taken before training
    t0 = time.perf_counter()
    # The baselines first: they are the longest runs, so the workers finish together.
    order = sorted(range(len(tasks)), key=lambda i: -tasks[i]["steps"])
    done = runtime.run_tasks(train_network, [tasks[i] for i in order], cfg.workers,
                             sum(t["steps"] for t in tasks), "inception", quiet=quiet)
    records = [None] * len(tasks)
    for i, rec in zip(order, done):
        records[i] = rec
    runs = [{"variant": t["variant"], **rec} for t, rec in zip(tasks, records)]
    wall = time.perf_counter() - t0
    metrics = {"config": config, "runs": runs, "summary": summarize(runs, cfg.variants),
               "provenance": {**started, "wall_time_s": round(wall, 1), "resumed": resume,
                              "processes": 1,
                              # a resumed command trained only part of the steps: no throughput
                              "images_per_second": None if resume else round(
                                  sum(r["steps"][-1] for r in records if r["steps"]) * cfg.batch_size / wall, 1)}}
    runtime.write_json(out / "metrics.json", metrics)
    plots.figure2(metrics, out / "figure2.png")
    runtime.atomic_write_text(out / "report.md", report.inception(metrics))
    return metrics


def headline(metrics: Dict[str, Any]) -> str:
    s = metrics["summary"]
    return "max test accuracy -- " + ", ".join(
        f"{names.label(v)} {100 * s[v]['max_accuracy']:.2f}%" for v in metrics["config"]["variants"])
