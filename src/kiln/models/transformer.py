"""``model_type="transformer"``: a small ViT-style encoder over image patches.

The image is cut into non-overlapping ``patch_size`` x ``patch_size`` patches (a strided
convolution, the usual ViT patch embedding), each becomes a ``d_model`` token with a
learned position embedding, pre-norm encoder blocks (multi-head self-attention + MLP)
mix them, and the mean token feeds the classifier. Attention is written with plain
tensor ops and ``reshape(n, ...)`` taken from the input, so the exported ONNX graph has
no fixed batch size and no fused kernel that only PyTorch has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kiln.contract import IMAGE_SIZE, NUM_CLASSES


class Block(nn.Module):
    """Pre-norm encoder block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, tokens, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(n, tokens, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class PatchTransformer(nn.Module):
    """patches -> d_model tokens + positions -> ``num_layers`` blocks -> mean token ->
    dropout -> 10. ``d_model`` must be divisible by ``heads`` and 28 by ``patch_size``."""

    def __init__(self, patch_size: int, d_model: int, heads: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        side = IMAGE_SIZE // patch_size
        self.embed = nn.Conv2d(1, d_model, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, side * side, d_model))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(num_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.position  # [N, patches, d_model]
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def build(config: Mapping[str, Any]) -> nn.Module:
    """A fresh :class:`PatchTransformer`; reads ``patch_size``, ``d_model``, ``heads``,
    ``encoder_layers`` and ``dropout``."""
    return PatchTransformer(int(config["patch_size"]), int(config["d_model"]), int(config["heads"]),
                            int(config["encoder_layers"]), float(config["dropout"]))
