"""The training configuration: every field that determines a training run, validated.

Kept apart from the training loop so the pipeline, the CLI and the config checks can read
it (defaults, field docs) without the loop's machinery.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln.contract import IMAGE_SIZE
from kiln.models import MODEL_TYPES

MODELS = MODEL_TYPES
DEVICES = ("auto", "cpu", "cuda")
FAMILY_SIZE_FIELDS = ("gru_hidden_size", "gru_layers", "patch_size", "d_model", "heads", "encoder_layers")
"""TrainConfig fields that size the ``gru`` and ``transformer`` families (positive ints)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Saved verbatim in the checkpoint."""

    model: str = "cnn"
    """Network family, a key of :data:`kiln.models.FAMILIES`: ``"cnn"`` (two conv
    blocks + MLP head, the default), ``"mlp"`` (784-512-10), ``"gru"`` (a GRU reading
    the image row by row, sized by ``gru_*``) or ``"transformer"`` (a ViT-style patch
    encoder, sized by ``patch_size``, ``d_model``, ``heads``, ``encoder_layers``). Each
    family reads only its own size fields."""

    epochs: int = 10
    """Maximum passes over the training table; early stopping may end sooner."""

    batch_size: int = 64
    """Training minibatch size."""

    lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule (AdamW)."""

    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""

    dropout: float = 0.25
    """Dropout before the classifier's last layer (0 disables)."""

    gru_hidden_size: int = 128
    """``gru``: width of the recurrent state (per layer)."""

    gru_layers: int = 2
    """``gru``: stacked GRU layers."""

    patch_size: int = 4
    """``transformer``: side of the square patches that become tokens; must divide 28
    (4 gives 49 tokens, 7 gives 16)."""

    d_model: int = 64
    """``transformer``: token width; a multiple of 4 and of ``heads``."""

    heads: int = 4
    """``transformer``: attention heads per encoder layer."""

    encoder_layers: int = 3
    """``transformer``: encoder blocks (self-attention + MLP, pre-norm)."""

    stem_channels: int = 32
    """``transformer``: channels of the two 3x3 convolutions run over the image before it
    is cut into patches; 0 gives the plain ViT patch embedding (raw pixels -> tokens)."""

    max_shift: int = 2
    """Training augmentation: each image is shifted by a random whole number of pixels
    in [-max_shift, max_shift] on each axis, padding with zeros (0 disables). With only
    a few thousand digits this is worth about half a point of test accuracy."""

    max_rotation: float = 10.0
    """Training augmentation: each image is also rotated by a random angle in
    [-max_rotation, max_rotation] degrees about its centre (bilinear, on the training
    device; 0 disables)."""

    amp: bool = True
    """On CUDA, run the training forward pass under bf16 autocast (weights, optimiser
    and validation stay float32). Ignored on CPU."""

    patience: int = 3
    """Stop after this many epochs without a new best validation loss."""

    seed: int = 0
    """Seeds weight init, shuffling, augmentation and dropout. Same seed, same data and
    same device (and, on CPU, same thread count) give the same run."""

    device: str = "auto"
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``."""

    eval_batch_size: int = 256
    """Batch size for validation passes; only affects speed and memory (on CPU a batch
    whose activations stay in cache beats a larger one)."""

    def __post_init__(self) -> None:
        def bad(name: str, requirement: str) -> ValueError:
            return ValueError(f"TrainConfig.{name} must be {requirement}, got {getattr(self, name)!r}")

        for name, choices in (("model", MODELS), ("device", DEVICES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"one of {choices}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("patience", 0), ("max_shift", 0),
                          ("seed", 0), ("stem_channels", 0), *((size, 1) for size in FAMILY_SIZE_FIELDS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, "a positive int" if low else "a non-negative int")
        for name in ("lr", "weight_decay", "dropout", "max_rotation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite number")
        for name, ok, requirement in (
            ("max_shift", self.max_shift < IMAGE_SIZE, f"< {IMAGE_SIZE}"), ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("max_rotation", 0 <= self.max_rotation <= 45, "in [0, 45] degrees"), ("amp", isinstance(self.amp, bool), "a bool"),
            ("patch_size", IMAGE_SIZE % self.patch_size == 0, f"a divisor of {IMAGE_SIZE} (1, 2, 4, 7, 14 or 28)"),
            ("d_model", self.d_model % self.heads == 0 and self.d_model % 4 == 0,
             f"a multiple of 4 (sine-cosine positions) and of heads={self.heads}"),
        ):
            if not ok:
                raise bad(name, requirement)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-safe dict; ``from_dict(to_dict())`` gives an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a mapping of field names.

        Missing fields take their defaults (so pipeline parameters can name only what
        they change); unknown fields raise ``ValueError`` rather than being ignored,
        because a misspelt hyperparameter silently falling back to its default is the
        kind of bug nobody notices. Values are validated as in the constructor.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(data))
