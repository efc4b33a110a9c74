"""Record percentiles of a layer's input over training (the paper's Figure 1b, 1c)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["InputPercentiles"]


class InputPercentiles:
    """Percentiles of one unit of a layer's input, recorded only inside :meth:`record`.

    ``unit`` indexes dimension 1 of the input (a neuron of an (N, C) input, a feature map
    of (N, C, ...)); ``None`` pools every unit. The forward hook exists only while
    recording, so outside :meth:`record` the layer costs nothing extra.

    >>> mon = InputPercentiles(model[5], unit=17, q=(15, 50, 85))
    >>> with mon.record(step=100):
    ...     model(test_images)
    >>> mon.history["50"][-1]
    """

    def __init__(self, layer: nn.Module, unit: Optional[int] = None, q: Sequence[float] = (15, 50, 85)) -> None:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"InputPercentiles: layer must be an nn.Module, got {type(layer).__name__}")
        for v in q:
            if not 0 <= v <= 100:
                raise ValueError(f"InputPercentiles: percentiles must be in [0, 100], got {v}")
        self.layer = layer
        self.unit = unit
        self.q = tuple(q)
        self.steps: List[int] = []
        self.history: Dict[str, List[float]] = {self._key(v): [] for v in self.q}
        self._values: List[Tensor] = []

    @staticmethod
    def _key(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else str(v)

    def _hook(self, module, args) -> None:
        x = args[0].detach()
        if self.unit is not None:
            if x.dim() < 2 or not -x.size(1) <= self.unit < x.size(1):
                raise ValueError(f"InputPercentiles: unit {self.unit} out of range for input of shape {tuple(x.shape)}")
            x = x.select(1, self.unit)
        self._values.append(x.reshape(-1).float())

    @contextlib.contextmanager
    def record(self, step: Optional[int] = None) -> Iterator["InputPercentiles"]:
        """Collect the inputs seen in this block, then append their percentiles as one point."""
        self._values = []
        handle = self.layer.register_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
        if self._values:
            values = torch.cat(self._values)
            qs = torch.quantile(values, torch.tensor([v / 100 for v in self.q]))
            for v, val in zip(self.q, qs.tolist()):
                self.history[self._key(v)].append(val)
            self.steps.append(len(self.steps) if step is None else int(step))
        self._values = []

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = list(state["steps"])
        self.history = {k: list(v) for k, v in state["history"].items()}
