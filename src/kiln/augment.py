"""Training-time augmentation of uint8 digit batches, on whatever device holds them.

Randomness comes only from the ``generator`` passed in (a CPU generator), so a run is
reproducible on any device and every DDP rank can draw the same augmentation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each uint8 image [N, 28, 28] by its own random (dy, dx) in
    [-max_shift, max_shift], filling with zeros. Randomness comes only from
    ``generator`` (a CPU generator), so it is reproducible on any device."""
    if max_shift == 0:
        return images
    n, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s))
    offsets = torch.randint(0, 2 * s + 1, (2, n), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device)[None, :] + offsets[0][:, None]  # [N, H]
    cols = torch.arange(w, device=images.device)[None, :] + offsets[1][:, None]  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def random_rotate(images: torch.Tensor, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each uint8 image [N, 28, 28] about its centre by its own random angle in
    [-max_degrees, max_degrees] (bilinear, zeros outside), returning uint8. Angles come
    only from ``generator`` (CPU), the resampling runs on the images' device."""
    if max_degrees == 0:
        return images
    n = images.shape[0]
    angles = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angles), torch.sin(angles)
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    x = images.to(torch.float32).unsqueeze(1)
    grid = F.affine_grid(theta.to(device=images.device, dtype=torch.float32), list(x.shape), align_corners=False)
    with torch.no_grad():
        rotated = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.squeeze(1).round_().clamp_(0, 255).to(torch.uint8)


__all__ = ["random_rotate", "random_shift"]
