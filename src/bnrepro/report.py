"""report.md for each experiment: command, config, versions, machine, seeds, wall time,
results, and the paper's claims beside what we measured."""

from __future__ import annotations

from typing import Any, Dict, List


def _provenance(metrics: Dict[str, Any]) -> List[str]:
    p = metrics["provenance"]
    return [
        f"- Command: `{p['command']}`",
        f"- Git commit: `{p['git_commit']}`",
        f"- Versions: Python {p['python']}, torch {p['torch']}, numpy {p['numpy']}",
        f"- Machine: {p['machine']}",
        f"- Wall time: {p['wall_time_s']:.0f} s for the whole command"
        + (" (resumed from checkpoints)" if p.get("resumed") else ""),
    ]


def _config(metrics: Dict[str, Any]) -> List[str]:
    lines = ["| field | value |", "|---|---|"]
    for k, v in metrics["config"].items():
        lines.append(f"| {k} | {v} |")
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def figure1(metrics: Dict[str, Any]) -> str:
    s = metrics["summary"]
    cfg = metrics["config"]
    seeds = sorted({r["seed"] for r in metrics["runs"]})
    b, n = s["baseline"], s["bn"]
    frac = (s["steps_to_baseline_final"] / s["baseline_final_step"]) if s["steps_to_baseline_final"] else None
    one_seed_time = b["wall_time_s"] + n["wall_time_s"]
    lines = [
        "# Figure 1 reproduction (Section 4.1, MNIST)",
        "",
        f"784-100-100-100-10 sigmoid MLP, {cfg['steps']:,} SGD steps of {cfg['batch_size']} examples, "
        f"learning rate {cfg['lr']}, N(0, {cfg['init_std']}^2) initial weights; with BN, BN before each "
        "hidden sigmoid and no hidden biases. Test accuracy on all 10,000 test images every "
        f"{cfg['eval_every']} steps. Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); "
        "mean ± sample std over seeds.",
        "",
        "![Figure 1](figure1.png)",
        "",
        "## Results",
        "",
        "| network | final test accuracy | max of mean curve | median sigmoid input: first → last eval (range) | 15th-85th spread: first → last |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("without BN", b), ("with BN", n)):
        lines.append(
            f"| {name} | {_pct(r['final_accuracy'])} ± {100 * r['final_accuracy_std']:.2f} | {_pct(r['max_accuracy'])} | "
            f"{r['p50_first']:+.2f} → {r['p50_last']:+.2f} ({r['p50_range']:.2f}) | "
            f"{r['spread_first']:.2f} → {r['spread_last']:.2f} |")
    lines += [
        "",
        f"- The BN network's mean accuracy first reaches the baseline's final mean accuracy "
        f"({_pct(b['final_accuracy'])}) at step "
        + (f"{s['steps_to_baseline_final']:,}, {frac:.3f} of the baseline's {s['baseline_final_step']:,} steps "
           f"(1/{1 / frac:.1f})." if frac else "— never, within this run."),
        f"- Training time for one seed (both networks, one process each, 1 thread): "
        f"{one_seed_time:.0f} s ({b['wall_time_s']:.0f} s without BN + {n['wall_time_s']:.0f} s with BN, "
        "evaluations included).",
        "",
        "## The paper's claims beside ours",
        "",
        "| paper (Figure 1) | measured here | holds? |",
        "|---|---|---|",
        f"| BN network reaches higher test accuracy | {_pct(n['final_accuracy'])} vs {_pct(b['final_accuracy'])} | "
        f"{'yes' if n['final_accuracy'] > b['final_accuracy'] else 'no'} |",
        f"| BN network trains faster | reaches the baseline's final accuracy at step "
        f"{s['steps_to_baseline_final'] if s['steps_to_baseline_final'] else 'never'} of {s['baseline_final_step']:,} | "
        f"{'yes' if frac and frac <= 0.2 else ('partly' if frac else 'no')} (target: within 1/5 of the steps) |",
        f"| without BN the sigmoid inputs drift; with BN they are stable | median moves over a range of "
        f"{b['p50_range']:.2f} without BN vs {n['p50_range']:.2f} with BN | "
        f"{'yes' if n['p50_range'] < 0.5 * b['p50_range'] else 'no'} |",
        "",
        "The paper gives no optimizer, learning rate, initial scale or evaluation interval for this "
        "experiment; ours are in the configuration below (plain SGD for both networks).",
        "",
        "## Configuration",
        "",
        *_config(metrics),
        "",
        "## Provenance",
        "",
        *_provenance(metrics),
        "",
    ]
    return "\n".join(lines)


def small_batch(metrics: Dict[str, Any]) -> str:
    from .experiments.small_batch import LABELS

    cfg = metrics["config"]
    s = metrics["summary"]
    bs = [str(b) for b in cfg["batch_sizes"]]
    seeds = sorted({r["seed"] for r in metrics["runs"]})
    lines = [
        "# Small batches: BN, Batch Renormalization and ghost batches (beyond the paper)",
        "",
        f"A small conv net (3 conv layers, 16-32-64 channels) on Fashion-MNIST, {cfg['epochs']:g} epochs for every "
        f"run, SGD with momentum {cfg['momentum']}, learning rate {cfg['lr']} per 64 examples scaled linearly with the "
        f"real batch, cosine decay, weight decay {cfg['weight_decay']}. \"BN, ghost batches\" trains on batches of "
        f"{cfg['ghost_batch']} whose statistics are computed per chunk of the batch size, as "
        "batch-size replicas would see them without SyncBatchNorm. Batch Renorm's r_max/d_max schedule is the "
        "paper's, scaled to the run length (r_max = 1, d_max = 0 for the first 10 % of steps, then up to 3 at 50 % "
        "and 5 at 35 %). Test accuracy on the 10,000 test images with the running statistics. "
        f"Seeds: {', '.join(map(str, seeds))}; mean ± sample std.",
        "",
        "![test accuracy against batch size](small_batch.png)",
        "",
        "## Test accuracy (%)",
        "",
        "| method | " + " | ".join(f"B = {b}" for b in bs) + " |",
        "|---|" + "---|" * len(bs),
    ]
    for method, by_b in s.items():
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(
            f"{100 * by_b[b]['mean']:.2f} ± {100 * by_b[b]['std']:.2f}" for b in bs) + " |")
    diverged = [r for r in metrics["runs"] if r["diverged"]]
    if diverged:
        lines += ["", "Diverged (loss became NaN/Inf; counted as 10 %): " + ", ".join(
            f"{r['method']} B={r['batch_size']} seed {r['seed']}" for r in diverged)]
    lines += ["", "## What it shows", "", *_small_batch_findings(metrics), "",
              "## Configuration", "", *_config(metrics), "", "## Provenance", "", *_provenance(metrics), ""]
    return "\n".join(lines)


def _small_batch_findings(metrics: Dict[str, Any]) -> List[str]:
    """Plain statements computed from the numbers, not written in advance."""
    s = metrics["summary"]
    bs = [str(b) for b in metrics["config"]["batch_sizes"]]
    out = []
    lo, hi = bs[0], bs[-1]
    for method, by_b in s.items():
        drop = 100 * (by_b[hi]["mean"] - by_b[lo]["mean"])
        out.append(f"- {method}: {100 * by_b[lo]['mean']:.2f} % at B = {lo}, {100 * by_b[hi]['mean']:.2f} % at "
                   f"B = {hi} ({'loses' if drop > 0 else 'gains'} {abs(drop):.2f} points going from {hi} to {lo}).")
    if "bn" in s and "renorm" in s:
        better = [b for b in bs if s["renorm"][b]["mean"] > s["bn"][b]["mean"] + 1e-9]
        worse = [b for b in bs if s["renorm"][b]["mean"] < s["bn"][b]["mean"] - 1e-9]
        out.append(f"- Batch Renorm beats BN at B in {{{', '.join(better) or 'none'}}} and trails it at B in "
                   f"{{{', '.join(worse) or 'none'}}} (means; compare the spread before reading much into "
                   "differences under a point).")
    if "bn" in s and "ghost" in s:
        out.append("- Ghost batches vs BN at the same statistics size: " + ", ".join(
            f"B={b}: {100 * (s['ghost'][b]['mean'] - s['bn'][b]['mean']):+.2f}" for b in bs) +
            " points (ghost also takes larger real batches, so fewer optimizer steps).")
    return out
