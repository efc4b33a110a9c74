"""One source for the names of the experiments' variants: their labels, plot colours and
the paper's numbers. Configs, experiments, plots and reports all read them from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union


@dataclass(frozen=True)
class Variant:
    """One network of Section 4.2.2 (Figure 3's rows)."""

    name: str                       # the CLI's name
    label: str                      # the paper's name, for plots and reports
    colour: str                     # matplotlib colour of its curve
    bn: bool                        # BN before every nonlinearity
    act: str                        # "relu" or "sigmoid"
    lr_mult: int                    # multiple of Inception's initial learning rate
    x5_recipe: bool                 # Section 4.2.1's changes (no dropout, L2 / 5, ...)
    paper_steps: str                # Figure 3: steps to reach Inception's 72.2 %
    paper_max: Union[float, str]    # Figure 3: maximum accuracy (%), or "chance"
    until_plateau: bool             # trained until the plateau rule holds (the baselines)


VARIANTS: Tuple[Variant, ...] = (
    Variant("inception", "Inception", "black", False, "relu", 1, False, "31.0M", 72.2, True),
    Variant("bn-baseline", "BN-Baseline", "tab:blue", True, "relu", 1, False, "13.3M", 72.7, True),
    Variant("bn-x5", "BN-x5", "tab:green", True, "relu", 5, True, "2.1M", 73.0, False),
    Variant("bn-x30", "BN-x30", "tab:red", True, "relu", 30, True, "2.7M", 74.8, False),
    Variant("bn-x5-sigmoid", "BN-x5-Sigmoid", "tab:purple", True, "sigmoid", 5, True, "never", 69.8, False),
    Variant("inception-sigmoid", "Inception-Sigmoid", "tab:gray", False, "sigmoid", 1, False, "never", "chance",
            False),
)
VARIANT: Dict[str, Variant] = {v.name: v for v in VARIANTS}

# The paper's headline (Section 4.2.2): Inception's steps to 72.2 % over BN-x5's.
PAPER_STEP_RATIO = 31.0 / 2.1


@dataclass(frozen=True)
class Method:
    """A normalization of the small-batch experiment."""

    name: str
    label: str
    colour: str


METHODS: Tuple[Method, ...] = (
    Method("none", "no normalization", "tab:gray"),
    Method("bn", "BatchNorm", "tab:blue"),
    Method("renorm", "Batch Renorm", "tab:red"),
    Method("ghost", "BN, ghost batches", "tab:green"),
)
METHOD: Dict[str, Method] = {m.name: m for m in METHODS}


def label(name: str) -> str:
    """The label of a variant or method; the name itself for anything else."""
    found: Optional[Union[Variant, Method]] = VARIANT.get(name) or METHOD.get(name)
    return found.label if found else name


def colour(name: str) -> Optional[str]:
    found: Optional[Union[Variant, Method]] = VARIANT.get(name) or METHOD.get(name)
    return found.colour if found else None


# Figure 1's drift over every unit is measured on the evaluations from this fraction of the
# run on: the first evaluations are dominated by every network's initial fast change.
DRIFT_FROM = 0.1
