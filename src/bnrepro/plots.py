"""Figures: the paper's panels, with mean lines and min-max bands over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from .names import colour, label

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path) -> None:
    """Write the figure atomically (temporary file, then rename) and close it."""
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _band(ax, x, ys, color, label, lw=1.6):
    """Mean line and min-max band over runs; runs may stop at different points (a shorter
    run is a prefix of ``x``): each point is over the runs that reached it."""
    n = max(len(y) for y in ys)
    a = np.full((len(ys), n), np.nan)
    for i, y in enumerate(ys):
        a[i, :len(y)] = y
    x = np.asarray(x, dtype=float)[:n]
    mean = np.nanmean(a, axis=0)
    ax.plot(x, mean, color=color, lw=lw, label=label)
    if len(ys) > 1:
        ax.fill_between(x, np.nanmin(a, axis=0), np.nanmax(a, axis=0), color=color, alpha=0.2, lw=0)
    return mean


def figure1(metrics: Dict[str, Any], path: Path) -> None:
    """(a) test accuracy vs steps, with and without BN; (b, c) 15/50/85th percentiles of the
    monitored sigmoid input, without and with BN. Lines: mean over seeds; bands: min-max."""
    plt = _pyplot()
    runs = metrics["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"baseline": "tab:blue", "bn": "tab:red"}
    labels = {"baseline": "Without BN", "bn": "With BN"}
    ax = axes[0]
    for kind in ("baseline", "bn"):
        rs = [r for r in runs if r["model"] == kind]
        _band(ax, rs[0]["steps"], [r["test_accuracy"] for r in rs], colors[kind], labels[kind])
    s = metrics["summary"]
    if s.get("steps_to_baseline_final"):
        ax.axvline(s["steps_to_baseline_final"], color="gray", ls=":", lw=1)
        ax.axhline(s["baseline"]["final_accuracy"], color="gray", ls=":", lw=1)
    ax.set_ylim(max(0.0, min(0.9, s["baseline"]["final_accuracy"] - 0.06)), 1.0)
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) MNIST test accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    lo = min(min(min(r["percentiles"]["15"]) for r in runs), -1.0)
    hi = max(max(max(r["percentiles"]["85"]) for r in runs), 1.0)
    for ax, kind, title in ((axes[1], "baseline", "(b) without BN"), (axes[2], "bn", "(c) with BN")):
        rs = [r for r in runs if r["model"] == kind]
        for q, style in (("15", "--"), ("50", "-"), ("85", "--")):
            ys = np.asarray([r["percentiles"][q] for r in rs])
            ax.plot(rs[0]["steps"], ys.mean(axis=0), color=colors[kind], ls=style, lw=1.4, label=f"{q}th pct")
            if ys.shape[0] > 1:
                ax.fill_between(rs[0]["steps"], ys.min(axis=0), ys.max(axis=0), color=colors[kind], alpha=0.15, lw=0)
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"input to sigmoid unit {metrics['config']['unit']}, last hidden layer")
        ax.set_title(title)
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    n = len({r["seed"] for r in runs})
    fig.suptitle(f"Figure 1 reproduction: MNIST 784-100-100-100-10 sigmoid MLP, {n} seed(s) "
                 "(lines: mean, bands: min-max)", fontsize=10)
    fig.tight_layout()
    _save(plt, fig, path)


def small_batch(metrics: Dict[str, Any], path: Path) -> None:
    """Test accuracy against the per-replica batch size, one line per method (mean over
    seeds, error bars min-max)."""
    plt = _pyplot()
    s = metrics["summary"]
    runs = metrics["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_b in s.items():
        bs = sorted(int(b) for b in by_b)
        mean = [100 * by_b[str(b)]["mean"] for b in bs]
        lo = [100 * min(r["test_accuracy"] for r in runs if r["method"] == method and r["batch_size"] == b) for b in bs]
        hi = [100 * max(r["test_accuracy"] for r in runs if r["method"] == method and r["batch_size"] == b) for b in bs]
        ax.errorbar(bs, mean, yerr=[[m - l for m, l in zip(mean, lo)], [h - m for m, h in zip(mean, hi)]],
                    marker="o", capsize=3, color=colour(method), label=label(method))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(b) for by_b in s.values() for b in by_b}))
    ax.get_xaxis().set_major_formatter(__import__("matplotlib").ticker.ScalarFormatter())
    ax.set_xlabel("examples per replica for BN statistics (batch size)")
    ax.set_ylabel("test accuracy (%)")
    cfg = metrics["config"]
    n = len({r["seed"] for r in runs})
    ax.set_title(f"Fashion-MNIST, small conv net, {cfg['epochs']:g} epochs, {n} seed(s)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)


def figure2(metrics: Dict[str, Any], path: Path) -> None:
    """Test accuracy against steps for every variant (mean over seeds, min-max band), with
    Inception's maximum as a dotted line and a mark where each variant first reaches it."""
    plt = _pyplot()
    runs = metrics["runs"]
    s = metrics["summary"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for v in metrics["config"]["variants"]:
        rs = [r for r in runs if r["variant"] == v]
        longest = max(rs, key=lambda r: len(r["steps"]))
        _band(ax, longest["steps"], [r["test_accuracy"] for r in rs], colour(v), label(v))
        for r in rs:  # where a run stopped at its plateau
            if (r.get("plateau") or {}).get("stopped_early"):
                ax.plot([r["steps"][-1]], [r["test_accuracy"][-1]], marker="x", color=colour(v), ms=6)
        hit = s[v].get("steps_to_inception_max")
        if hit is not None and v != "inception":
            ax.plot([hit], [s["inception"]["max_accuracy"]], marker="v", color=colour(v), ms=8)  # mean over seeds
    if "inception" in s:
        ax.axhline(s["inception"]["max_accuracy"], color="black", ls=":", lw=1)
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    top = max(s[v]["max_accuracy"] for v in metrics["config"]["variants"])
    ax.set_ylim(max(0.0, top - 0.25), min(1.0, top + 0.02))
    n = len({r["seed"] for r in runs})
    ax.set_title(f"Figure 2 in miniature: small Inception on Fashion-MNIST, {n} seed(s)\n"
                 "(lines: mean, bands: min-max; v: mean step at Inception's mean max; x: stopped at plateau)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)
