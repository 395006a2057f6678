"""``model_type="mlp"``: the simple 784-512-10 baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kiln.contract import IMAGE_SIZE, NUM_CLASSES


class MLP(nn.Module):
    """784 -> 512 -> 10 with ReLU."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 512),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(512, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(config: Mapping[str, Any]) -> nn.Module:
    """A fresh :class:`MLP`; reads ``dropout``."""
    return MLP(float(config["dropout"]))
