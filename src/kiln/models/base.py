"""What every network family shares: input normalisation and the serving wrapper.

A family's network takes float images that are already normalised, shaped
[N, 1, 28, 28], and returns logits [N, 10]. Normalisation is the job of
:class:`Preprocess`, which training and :class:`ServingModel` share, so the exported
ONNX graph (uint8 in, see :mod:`kiln.contract`) computes exactly what training saw.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kiln.contract import NUM_CLASSES

MNIST_MEAN = 0.1307
"""Mean of MNIST training pixels scaled to [0, 1]; the usual published constant."""

MNIST_STD = 0.3081
"""Standard deviation of MNIST training pixels scaled to [0, 1]."""


class Preprocess(nn.Module):
    """uint8 [N, 28, 28] pixels -> float32 [N, 1, 28, 28], scaled to [0, 1] and
    standardised with the MNIST constants. Shared by training and serving."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(torch.float32) * (1.0 / 255.0)
        return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


class ServingModel(nn.Module):
    """The exported model: uint8 pixels [N, 28, 28] -> (probabilities float32 [N, 10],
    label int64 [N]), per :mod:`kiln.contract`. Always used in eval mode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.preprocess = Preprocess()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.net(self.preprocess(pixels)), dim=1)
        label = torch.argmax(probabilities, dim=1)  # int64, as the contract requires
        return probabilities, label


def predict_proba(net: nn.Module, pixels: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Probabilities float32 [N, 10] of ``net`` (e.g. from
    :func:`kiln.checkpoint.load_checkpoint`) for uint8 pixels [N, 28, 28], on CPU,
    through the same :class:`ServingModel` path as the exported graph."""
    serving = ServingModel(net).eval()
    out = [np.zeros((0, NUM_CLASSES), np.float32)]
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            batch = torch.tensor(pixels[start : start + batch_size])  # copies: input may be read-only
            out.append(serving(batch)[0].numpy())
    return np.concatenate(out)
