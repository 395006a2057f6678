"""``model_type="gru"``: a GRU that reads the image one pixel row at a time.

Each of the 28 rows (28 normalised pixels) is one time step; the classifier sees the
last layer's output at the final step concatenated with its mean over all steps (the
mean lets early rows, e.g. the top of a 7, reach the head without surviving 28 updates).
The recurrent state starts at zero and is sized from the input inside ``nn.GRU``, so
the exported graph keeps a dynamic batch dimension.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kiln.contract import IMAGE_SIZE, NUM_CLASSES


class RowGRU(nn.Module):
    """rows [N, 28, 28] -> GRU(hidden_size, num_layers) -> [last step, mean over steps]
    -> dropout -> 10."""

    def __init__(self, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.gru = nn.GRU(IMAGE_SIZE, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden_size, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, _ = self.gru(x.squeeze(1))  # [N, 28 rows, hidden]; initial state: zeros
        return self.head(torch.cat([steps[:, -1], steps.mean(dim=1)], dim=1))


def build(config: Mapping[str, Any]) -> nn.Module:
    """A fresh :class:`RowGRU`; reads ``gru_hidden_size``, ``gru_layers`` and ``dropout``."""
    return RowGRU(int(config["gru_hidden_size"]), int(config["gru_layers"]), float(config["dropout"]))
