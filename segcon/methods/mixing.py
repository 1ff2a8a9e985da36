"""CutMix for semi-supervised steps: one box per image, the same box for the image, its
pseudo-labels and their confidences (METHODS.md shared blocks: strong augmentation)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cutmix_masks(
    batch: int,
    size: tuple[int, int],
    prob: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean masks `[B, H, W]`: for each image, with probability `prob`, one axis-aligned box
    covering a fraction of the image drawn uniformly from `area`, with height/width ratio drawn
    uniformly from `aspect`, placed uniformly where it fits; otherwise no box (UniMatch's rule)."""
    h, w = size
    masks = torch.zeros(batch, h, w, dtype=torch.bool)
    for b in range(batch):
        if float(torch.rand((), generator=generator)) >= prob:
            continue
        while True:
            frac = float(torch.empty(()).uniform_(*area, generator=generator))
            ratio = float(torch.empty(()).uniform_(*aspect, generator=generator))
            bh = max(1, round(math.sqrt(frac * h * w * ratio)))
            bw = max(1, round(math.sqrt(frac * h * w / ratio)))
            if bh <= h and bw <= w:
                break
        y0 = int(torch.randint(0, h - bh + 1, (), generator=generator))
        x0 = int(torch.randint(0, w - bw + 1, (), generator=generator))
        masks[b, y0 : y0 + bh, x0 : x0 + bw] = True
    return masks.to(device)
