"""report.md for each experiment: command, config, versions, machine, seeds, wall time,
results, and the paper's claims beside what we measured."""

from __future__ import annotations

from typing import Any, Dict, List

from .names import DRIFT_FROM, PAPER_STEP_RATIO, VARIANT, label


def _provenance(metrics: Dict[str, Any]) -> List[str]:
    p = metrics["provenance"]
    return [
        f"- Command: `{p['command']}`",
        f"- Git commit: `{p['git_commit']}`",
        f"- Versions: Python {p['python']}, torch {p['torch']}, numpy {p['numpy']}",
        f"- Machine: {p['machine']}",
        f"- Wall time: {p['wall_time_s']:.0f} s for the whole command"
        + (" (resumed from checkpoints: the time before the resume is not in it)" if p.get("resumed") else ""),
    ]


def _config(metrics: Dict[str, Any]) -> List[str]:
    lines = ["| field | value |", "|---|---|"]
    for k, v in metrics["config"].items():
        lines.append(f"| {k} | {v} |")
    return lines


def _tail(metrics: Dict[str, Any]) -> List[str]:
    return ["## Configuration", "", *_config(metrics), "", "## Provenance", "", *_provenance(metrics), ""]


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
    drift_from = int(DRIFT_FROM * cfg["steps"])
    lines += [
        "",
        f"Drift of every unit: for each of the 100 sigmoids of the last hidden layer, the range "
        f"(max - min) of each percentile of its input over the evaluations from step {drift_from:,} "
        f"({100 * DRIFT_FROM:.0f} % of the run) on, averaged over the 100 units and the {len(seeds)} seeds "
        "(the panels of the figure show one unit, as the paper's do):",
        "",
        "| network | 15th percentile | median | 85th percentile |",
        "|---|---|---|---|",
    ]
    for name, r in (("without BN", b), ("with BN", n)):
        d = r["unit_drift"]
        lines.append(f"| {name} | {d['15']:.3f} | {d['50']:.3f} | {d['85']:.3f} |")
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
        f"| without BN the sigmoid inputs drift; with BN they are stable | after the first "
        f"{100 * DRIFT_FROM:.0f} % of training the median input of a unit moves over "
        f"{b['unit_drift']['50']:.3f} without BN vs {n['unit_drift']['50']:.3f} with BN (mean of 100 units) | "
        f"{'yes' if n['unit_drift']['50'] < 0.5 * b['unit_drift']['50'] else 'no'} (target: less than half) |",
        "",
        "The paper gives no optimizer, learning rate, initial scale or evaluation interval for this "
        "experiment; ours are in the configuration below (plain SGD for both networks).",
        "",
        *_tail(metrics),
    ]
    return "\n".join(lines)


def small_batch(metrics: Dict[str, Any]) -> str:
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
        lines.append(f"| {label(method)} | " + " | ".join(
            f"{100 * by_b[b]['mean']:.2f} ± {100 * by_b[b]['std']:.2f}" for b in bs) + " |")
    diverged = [r for r in metrics["runs"] if r["diverged"]]
    if diverged:
        lines += ["", "Diverged (loss became NaN/Inf; counted as 10 %): " + ", ".join(
            f"{r['method']} B={r['batch_size']} seed {r['seed']}" for r in diverged)]
    lines += ["", "## What it shows", "", *_small_batch_findings(metrics), "", *_tail(metrics)]
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


def inception(metrics: Dict[str, Any]) -> str:
    cfg = metrics["config"]
    s = metrics["summary"]
    seeds = sorted({r["seed"] for r in metrics["runs"]})
    lines = [
        "# Section 4.2 in miniature: Inception with BN (Figures 2 and 3)",
        "",
        f"A small Inception network (stem, Inception module, stride-2 module, two Inception modules; 1x1, 3x3, "
        f"double-3x3 and pool branches) on Fashion-MNIST, steps of {cfg['batch_size']} examples (Inception and "
        f"BN-Baseline until they plateau, at most {cfg['steps']:,}; the others {cfg['fast_steps']:,}), "
        f"SGD momentum {cfg['momentum']}, Inception's initial learning rate {cfg['lr']}. Test accuracy on the first "
        f"{cfg['eval_images']:,} test images every {cfg['eval_every']} steps (eval mode). Seeds: {', '.join(map(str, seeds))}.",
        "",
        "![Figure 2](figure2.png)",
        "",
        "## Figure 3: steps to match Inception, and maximum accuracy",
        "",
        f"Inception's mean maximum over seeds: {_pct(s['inception_mean_max']) if s.get('inception_mean_max') else 'n/a'}. "
        "Steps: the mean over seeds (only when every seed reaches it), then each seed's value.",
        "",
        "| model | steps to Inception's mean max: mean (per seed) | max accuracy: mean ± std (per seed) | "
        "steps trained (per seed) | paper: steps to 72.2 % | paper: max |",
        "|---|---|---|---|---|---|",
    ]
    for v in cfg["variants"]:
        r = s[v]
        per = ", ".join(f"{x:,}" if x else "never" for x in r["steps_to_inception_max_per_seed"])
        mean = f"{r['steps_to_inception_max']:,.0f}" if r["steps_to_inception_max"] else "never"
        maxes = ", ".join(f"{100 * m:.2f}" for m in r["max_accuracy_per_seed"])
        pa = VARIANT[v].paper_max
        lines.append(f"| {label(v)} | {mean} ({per}) | {_pct(r['max_accuracy'])} ± {100 * r['max_accuracy_std']:.2f} "
                     f"({maxes}) | {', '.join(f'{t:,}' for t in r['steps_trained'])} | {VARIANT[v].paper_steps} | "
                     f"{pa if isinstance(pa, str) else f'{pa} %'} |")
    ratio = s.get("inception_steps_over_bn_x5")
    rng = s.get("inception_steps_over_bn_x5_range") or {}
    own = s.get("inception_steps_to_own_max") or {}
    lines += [
        "",
        "Inception's steps to its own maximum (mean over seeds"
        + (f": {own['mean']:,.0f}" if own.get("mean") else "") + ") over BN-x5's steps to Inception's mean maximum: "
        + (f"**{ratio:.1f}**" if ratio else "not defined (BN-x5 did not reach it in every seed)")
        + (f"; paired by seed, {rng['min']:.1f} to {rng['max']:.1f} ({rng['n']} of {rng['of']} seeds)"
           if rng.get("n") else "")
        + f". The paper: {PAPER_STEP_RATIO:.1f} (31.0M / 2.1M).",
        "",
        "## Did the runs converge? The plateau rule, per seed",
        "",
        f"Judged at each run's last evaluation: the best accuracy of the last 20 % of the run is within "
        f"{100 * cfg['plateau_tol']:.1f} points of the run's best, and the best improved by at most "
        f"{100 * cfg['plateau_tol']:.1f} points over the last quarter. Inception and BN-Baseline stop as soon as it "
        f"holds (not before step {cfg['min_steps']:,}; at most {cfg['steps']:,} steps); the other variants train "
        f"{cfg['fast_steps']:,} steps.",
        "",
        "| model | seed | last step | best | best of last 20 % | gain over last quarter | plateau |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in cfg["variants"]:
        for seed, p in zip(s[v]["seeds"], s[v]["plateau"]):
            if not p:
                continue
            verdict = ("yes, stopped there" if p.get("stopped_early") else "yes") if p["plateaued"] else "**no**"
            lines.append(f"| {label(v)} | {seed} | {p['step']:,} | {_pct(p['best'])} | {_pct(p['best_last_20pct'])} | "
                         f"{100 * p['gain_last_quarter']:.2f} | {verdict} |")
    lines += [
        "",
        "## Targets, as measured",
        "",
    ]
    lines += _inception_targets(s)
    lines += [
        "",
        "## What is and is not comparable",
        "",
        "- Comparable: the recipe differences between variants and their direction (BN vs none, learning-rate "
        "multiples 1/5/30, Section 4.2.1's changes for BN-x5/x30: no dropout, L2 / 5, 6x faster decay, no LRN, "
        "thorough shuffling, fewer distortions), and sigmoid vs ReLU with and without BN.",
        "- Not comparable: the data (28x28 grey Fashion-MNIST), the network (4 modules, about 56k parameters), the "
        "scale (thousands of steps on one CPU), and so every absolute number. Step counts are in units of our "
        "steps.",
        f"- Our choices where the paper gives none: SGD momentum {cfg['momentum']}, base L2 {cfg['weight_decay']}, "
        f"exponential decay halving the rate every {cfg['half_life']:,} steps (BN-x5/x30: 6x sooner), "
        f"dropout {100 * cfg['dropout']:g} %, 'light' shuffling = one fixed order reused every epoch, 'thorough' = "
        f"a fresh permutation per epoch, photometric distortion = per-image contrast and brightness jitter of "
        f"{cfg['jitter']:g} (BN-x5/x30: a quarter of it), plus 2-pixel translations for every variant.",
        "",
        "## Configuration",
        "",
        *_config(metrics),
        "",
        "## Provenance",
        "",
        *_provenance(metrics),
        *([] if metrics["provenance"].get("images_per_second") is None else [
            f"- Training throughput: {metrics['provenance']['images_per_second']:.0f} images/s over the whole "
            f"command ({cfg['workers']} processes, evaluations included)"]),
        f"- The runs' own training times (each run's clock, checkpointed with it): "
        f"{sum(r['wall_time_s'] for r in metrics['runs']):.0f} s in all over {cfg['workers']} processes",
        "",
    ]
    return "\n".join(lines)


def _inception_targets(s: Dict[str, Any]) -> List[str]:
    out = []
    inc = s.get("inception")
    if inc and "bn-x5" in s:
        a, b = (s.get("inception_steps_to_own_max") or {}).get("mean"), s["bn-x5"]["steps_to_inception_max"]
        ok = bool(a and b and b <= a / 10)
        out.append(f"- BN-x5 reaches Inception's maximum within a tenth of Inception's steps: "
                   f"{'yes' if ok else 'no'} ({f'{b:,.0f}' if b else 'never'} vs {f'{a:,.0f}' if a else 'n/a'}, "
                   "means over seeds).")
    if inc and "bn-x30" in s:
        out.append(f"- BN-x30 ends above Inception's maximum: "
                   f"{'yes' if s['bn-x30']['final_accuracy'] > inc['max_accuracy'] else 'no'} "
                   f"({100 * s['bn-x30']['final_accuracy']:.2f} % vs {100 * inc['max_accuracy']:.2f} %).")
    if "bn-x5-sigmoid" in s and "inception-sigmoid" in s:
        a, b = s["bn-x5-sigmoid"]["max_accuracy"], s["inception-sigmoid"]["max_accuracy"]
        out.append(f"- BN-x5-Sigmoid learns while Inception-Sigmoid does much worse: "
                   f"{'yes' if a > 0.5 and a > b + 0.1 else 'no'} ({100 * a:.2f} % vs {100 * b:.2f} %; chance is 10 %).")
    return out


def ensemble(metrics: Dict[str, Any]) -> str:
    lines = [
        "# Section 4.2.3 in miniature: an ensemble of BN-x30-based networks",
        "",
        "Each member is the small Inception with the BN-x30 recipe and one or two of the paper's modifications; "
        "the ensemble averages the members' class probabilities.",
        "",
        "| network | test error |",
        "|---|---|",
    ]
    for m in metrics["members"]:
        lines.append(f"| {m['name']} (seed {m['seed']}) | {100 * m['test_error']:.2f} % |")
    lines += [
        f"| **ensemble of {len(metrics['members'])}** | **{100 * metrics['ensemble_test_error']:.2f} %** |",
        "",
        f"The ensemble's test error is {'below' if metrics['ensemble_test_error'] < metrics['best_member_test_error'] else 'not below'} "
        f"the best single network's ({100 * metrics['best_member_test_error']:.2f} %). The paper: 4.9 % top-5 "
        "validation error on ImageNet for 6 networks (4.82 % test); not comparable in absolute terms.",
        "",
        *_tail(metrics),
    ]
    return "\n".join(lines)
