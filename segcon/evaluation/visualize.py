"""Colour-coded masks and image | ground truth | prediction panels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

IGNORE_COLOUR = (255, 255, 255)


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """`[H, W]` class indices -> `[H, W, 3] uint8` RGB with the palette; ignore pixels white."""
    lut = np.zeros((len(palette) + 1, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[-1] = IGNORE_COLOUR
    idx = np.where((mask >= 0) & (mask < len(palette)), mask, len(palette))
    return lut[idx]


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised `[3, H, W]` tensor -> `[H, W, 3] uint8` RGB."""
    img = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    img = img * np.asarray(std) + np.asarray(mean)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def panel(
    image: np.ndarray,
    target: np.ndarray | None,
    pred: np.ndarray,
    palette: Sequence[Sequence[int]],
    ignore_index: int,
) -> np.ndarray:
    """One row `[H, 3W (or 2W), 3]`: image | ground truth (if any) | prediction blended on the image."""
    pred_rgb = colorize(pred, palette, ignore_index)
    blend = (0.5 * image + 0.5 * pred_rgb).astype(np.uint8)
    parts = [image] + ([colorize(target, palette, ignore_index)] if target is not None else []) + [blend]
    return np.concatenate(parts, axis=1)


def default_palette(num_classes: int) -> list[list[int]]:
    """A fixed, well-spread palette for datasets that do not define one (Pascal VOC's bit trick)."""
    palette = []
    for i in range(num_classes):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette
