"""Operations on per-pixel maps shared by objectives and methods: nearest resizing of label-like
maps, and pasting CutMix boxes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def labels_at(target: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of a map `[B, H, W]` (labels, confidences, boolean masks) to
    `size`, keeping its dtype: no new values."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    work = target if target.is_floating_point() else target.float()
    return F.interpolate(work[:, None], size=size, mode="nearest")[:, 0].to(target.dtype)


def cutmix(mask: Tensor, target: Tensor, source: Tensor) -> Tensor:
    """`source` inside the boxes of `mask [B, H, W]`, `target` elsewhere; `target`/`source` are
    `[B, H, W]` (labels, confidences) or `[B, C, H, W]` (images)."""
    m = mask if target.dim() == 3 else mask[:, None]
    return torch.where(m, source, target)
