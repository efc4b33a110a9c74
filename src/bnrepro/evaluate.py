"""The one evaluation of every experiment: class probabilities and accuracy on a test set,
in eval mode (BN uses its running statistics, Algorithm 2), without gradients."""

from __future__ import annotations

import torch
from torch import nn


def probabilities(model: nn.Module, x: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """Softmax class probabilities of ``model`` on ``x``, ``batch`` examples at a time;
    the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out.append(torch.softmax(model(x[i:i + batch]), dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    """Fraction of ``x`` whose most probable class is ``y``."""
    return float((probabilities(model, x, batch).argmax(1) == y).float().mean())
