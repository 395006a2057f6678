"""``model_type="transformer"``: a small ViT-style encoder over image patches.

The image (after an optional convolutional stem, ``stem_channels``) is cut into
non-overlapping ``patch_size`` x ``patch_size`` patches (a strided convolution, the usual
ViT patch embedding); each becomes a ``d_model`` token plus a fixed 2-D sine-cosine
position, pre-norm encoder blocks (multi-head self-attention + MLP) mix them, and the
mean token feeds the classifier. Attention is written with plain tensor ops and
``reshape(n, ...)`` taken from the input, so the exported ONNX graph has no fixed batch
size and no fused kernel that only PyTorch has.

Two choices make it learn from a few thousand digits in a few epochs: the stem gives
the tokens local stroke features that attention would otherwise have to learn from raw
pixels ("early convolutions help transformers see better", Xiao et al. 2021), and each
block's residual branches start at zero, so the untrained encoder is the identity and
the first epochs are not spent undoing random mixing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kiln.contract import IMAGE_SIZE, NUM_CLASSES


def sincos_positions(side: int, d_model: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes [1, side * side, d_model] (``d_model`` % 4 == 0):
    a quarter of the channels each for sin/cos of the column and of the row."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(d_model // 4, dtype=torch.float32) / (d_model // 4))
    angles = [axis.flatten()[:, None].float() * omega for axis in (cols, rows)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)[None]


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
        for last in (self.proj, self.mlp[-1]):  # residual branches start at zero
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, tokens, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(n, tokens, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


def _stem(channels: int) -> nn.Module:
    """Two 3x3 conv + BatchNorm + ReLU layers at full resolution (``channels`` 0: none)."""
    if not channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())


class PatchTransformer(nn.Module):
    """[conv stem] -> patches -> d_model tokens + positions -> ``num_layers`` blocks ->
    mean token -> dropout -> 10. 28 must be divisible by ``patch_size``, ``d_model`` by 4
    and by ``heads``; ``stem_channels`` 0 leaves the stem out (a plain ViT)."""

    def __init__(self, patch_size: int, d_model: int, heads: int, num_layers: int, dropout: float,
                 stem_channels: int = 0) -> None:
        super().__init__()
        self.stem = _stem(stem_channels)
        self.embed = nn.Conv2d(stem_channels or 1, d_model, patch_size, stride=patch_size)
        self.register_buffer("position", sincos_positions(IMAGE_SIZE // patch_size, d_model), persistent=False)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(num_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.stem(x)).flatten(2).transpose(1, 2) + self.position  # [N, patches, d_model]
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def build(config: Mapping[str, Any]) -> nn.Module:
    """A fresh :class:`PatchTransformer`; reads ``patch_size``, ``d_model``, ``heads``,
    ``encoder_layers``, ``stem_channels`` and ``dropout``."""
    return PatchTransformer(int(config["patch_size"]), int(config["d_model"]), int(config["heads"]),
                            int(config["encoder_layers"]), float(config["dropout"]), int(config["stem_channels"]))
