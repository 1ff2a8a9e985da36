"""Exact Euclidean distance transform on the training device (plain torch, batched), and the
boundary error pixels Contextrast samples with it.

`edt(mask)` gives each True pixel of `mask [B, H, W]` its Euclidean distance to the nearest False
pixel of the same image (0 on False pixels; inf in an image without any False pixel), as
`scipy.ndimage.distance_transform_edt` does for one image.

The squared distance separates exactly over the two axes:
`D²(y, x) = min_{x'} [ g(y, x')² + (x - x')² ]`, where `g(y, x')` is the distance along column x'
from row y to the nearest False pixel of that column. The column pass is two running maxima
(nearest False above and below); the row pass is a min-plus product over each row, done in
chunks of images and rows so that about `chunk_elements` values are held at once. Work is O(B·H·W²):
meant for feature-map resolutions (e.g. 128 × 256), not for full images.

`boundary_errors` uses it to pick Contextrast's boundary-aware error pixels (BANE, METHODS.md §2(d)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segcon.objectives.samplers import first_per_group, random_priority


def _column_distance(mask: Tensor) -> Tensor:
    """`[B, H, W]` bool -> float `[B, H, W]`: distance along each column to the nearest False
    pixel (inf where the column has none)."""
    b, h, w = mask.shape
    rows = torch.arange(h, device=mask.device, dtype=torch.float32).view(1, h, 1).expand(b, h, w)
    inf = torch.tensor(float("inf"), device=mask.device)
    above = torch.where(mask, -inf, rows).cummax(dim=1).values  # last False row at or above
    below = torch.where(mask, inf, rows).flip(1).cummin(dim=1).values.flip(1)  # first False row at or below
    return torch.minimum(rows - above, below - rows)


def squared_edt(mask: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """Exact squared Euclidean distance of every True pixel of `mask [B, H, W]` (bool) to the
    nearest False pixel of its image; float32 `[B, H, W]` of whole numbers (0 on False pixels, inf
    in an image with no False pixel). Runs on `mask`'s device; the row pass holds at most about
    `chunk_elements` values at once (chunks of images and rows)."""
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"edt expects a bool [B, H, W] mask, got {mask.dtype} {tuple(mask.shape)}")
    b, h, w = mask.shape
    g2 = _column_distance(mask).square()  # [B, H, W']
    cols = torch.arange(w, device=mask.device, dtype=torch.float32)
    offsets = (cols.view(w, 1) - cols.view(1, w)).square()  # [W, W']: (x - x')²
    out = torch.empty(b, h, w, device=mask.device, dtype=torch.float32)
    per_image_row = w * w
    images = max(1, min(b, chunk_elements // per_image_row))
    rows = max(1, chunk_elements // (images * per_image_row))
    for i in range(0, b, images):
        for r in range(0, h, rows):
            part = g2[i:i + images, r:r + rows]  # [b', r', W']
            out[i:i + images, r:r + rows] = (part.unsqueeze(2) + offsets).amin(dim=-1)  # [b', r', W, W'] -> [b', r', W]
    return out


def edt(mask: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """Exact Euclidean distance of every True pixel of `mask [B, H, W]` (bool) to the nearest False
    pixel of its image; float32 `[B, H, W]` (0 on False pixels, inf in an image with no False
    pixel), as `scipy.ndimage.distance_transform_edt` gives per image."""
    return squared_edt(mask, chunk_elements).sqrt()


def boundary_errors(
    labels: Tensor,
    preds: Tensor,
    ignore_index: int = 255,
    fraction: float = 0.5,
    max_per_class: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Contextrast's boundary-aware error pixels (BANE) of one layer.

    For each class n, its error region is the valid pixels of ground truth n predicted as another
    class; every error pixel gets its Euclidean distance to the edge of its region (`edt` of the
    region's mask: 1 on the edge; ignore pixels, like any pixel outside the region, count as
    outside). Per class over the batch, the ceil(`fraction` × count) error
    pixels nearest the edge are kept (ties broken at random), then at most `max_per_class` of them
    at random.

    labels, preds: `[B, H, W]` (ground truth with `ignore_index`; the predicted class).
    Returns flat indices `[M]` into the `B·H·W` pixels, their true classes `[M]` and predicted
    classes `[M]`, grouped by true class.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    error = (labels != ignore_index) & (labels != preds)
    flat_error = error.reshape(-1).nonzero().squeeze(1)
    if flat_error.numel() == 0:
        empty = labels.new_zeros(0, dtype=torch.long)
        return empty, empty, empty
    classes = labels.reshape(-1)[flat_error].unique()  # [C]
    masks = (error.unsqueeze(0) & (labels.unsqueeze(0) == classes.view(-1, 1, 1, 1))).flatten(0, 1)  # [C·B, H, W]
    regions = masks.flatten(1).any(1).nonzero().squeeze(1)  # the (class, image) maps with errors
    dist2 = torch.zeros(masks.shape, device=labels.device)
    dist2[regions] = torch.where(masks[regions], squared_edt(masks[regions]), 0)
    dist2 = dist2.view(classes.numel(), *labels.shape).sum(0)  # each error pixel is in one region
    # a region filling its whole image has no edge in it (inf): farther than any real distance
    dist2 = dist2.clamp(max=float(sum(labels.shape[-2:]) ** 2))
    true = labels.reshape(-1)[flat_error]
    group = torch.searchsorted(classes, true)  # [L] class position
    counts = torch.bincount(group, minlength=classes.numel())
    # squared distances are whole numbers: a random offset below 1 only breaks ties
    priority = dist2.reshape(-1)[flat_error] + 0.5 * random_priority(flat_error.numel(), labels.device, generator)
    band = first_per_group(group, priority, torch.ceil(counts * fraction).long())
    picked = band[first_per_group(group[band], random_priority(band.numel(), labels.device, generator),
                                  torch.full_like(counts, max_per_class))]
    index = flat_error[picked]
    return index, labels.reshape(-1)[index], preds.reshape(-1)[index]
