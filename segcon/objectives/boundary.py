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

`squared_region_edt(ids)` does the same for every region of a label map at once: each pixel's
distance to the nearest pixel of another id. The column pass runs over the runs of equal ids; in
the row pass a pixel x' of the same id as the pixel x contributes its column distance, one of
another id 0 (it is outside). One pass over B maps gives what one EDT per (region, image) map
gives, exactly.

`boundary_errors` uses it to pick Contextrast's boundary-aware error pixels (BANE, METHODS.md
§2(d)), as a static-shape program (segcon.utils.static): nothing in it waits for the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segcon.objectives.samplers import first_per_group, random_priority
from segcon.utils.static import compact, group_counts


def _column_distance(ids: Tensor) -> Tensor:
    """`[B, H, W]` ids -> float `[B, H, W]`: distance along each column to the nearest pixel of
    another id (inf where the column has none)."""
    b, h, w = ids.shape
    rows = torch.arange(h, device=ids.device, dtype=torch.float32).view(1, h, 1).expand(b, h, w)
    inf = torch.tensor(float("inf"), device=ids.device)
    starts = torch.ones_like(ids, dtype=torch.bool)  # a run of equal ids starts here (from the top)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    ends = torch.ones_like(ids, dtype=torch.bool)  # ... and ends here
    ends[:, :-1] = starts[:, 1:]
    above = torch.where(starts, rows - 1, -inf).cummax(dim=1).values  # the other id above the run
    above = torch.where(above < 0, -inf, above)  # the run starts at the top: none above
    below = torch.where(ends, rows + 1, inf).flip(1).cummin(dim=1).values.flip(1)
    below = torch.where(below > h - 1, inf, below)
    return torch.minimum(rows - above, below - rows)


def squared_region_edt(ids: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """Exact squared Euclidean distance of every pixel of `ids [B, H, W]` (integer region ids)
    to the nearest pixel of another id in its image; float32 `[B, H, W]` of whole numbers (inf
    in an image of one id). Runs on `ids`' device; the row pass holds at most about
    `chunk_elements` values at once (chunks of images and rows)."""
    if ids.dim() != 3 or ids.is_floating_point():
        raise ValueError(f"region ids must be an integer or bool [B, H, W] map, got {ids.dtype} {tuple(ids.shape)}")
    b, h, w = ids.shape
    g2 = _column_distance(ids).square()  # [B, H, W']
    cols = torch.arange(w, device=ids.device, dtype=torch.float32)
    offsets = (cols.view(w, 1) - cols.view(1, w)).square()  # [W, W']: (x - x')²
    out = torch.empty(b, h, w, device=ids.device, dtype=torch.float32)
    per_image_row = w * w
    images = max(1, min(b, chunk_elements // per_image_row))
    rows = max(1, chunk_elements // (images * per_image_row))
    for i in range(0, b, images):
        for r in range(0, h, rows):
            part, part_ids = g2[i:i + images, r:r + rows], ids[i:i + images, r:r + rows]  # [b', r', W']
            same = part_ids.unsqueeze(3) == part_ids.unsqueeze(2)  # [b', r', W, W']: x' in x's region
            column = torch.where(same, part.unsqueeze(2), 0.0)  # x' outside x's region: itself outside
            out[i:i + images, r:r + rows] = (column + offsets).amin(dim=-1)  # [b', r', W]
    return out


def squared_edt(mask: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """Exact squared Euclidean distance of every True pixel of `mask [B, H, W]` (bool) to the
    nearest False pixel of its image; float32 `[B, H, W]` of whole numbers (0 on False pixels, inf
    in an image with no False pixel). Runs on `mask`'s device; the row pass holds at most about
    `chunk_elements` values at once (chunks of images and rows)."""
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"edt expects a bool [B, H, W] mask, got {mask.dtype} {tuple(mask.shape)}")
    return torch.where(mask, squared_region_edt(mask, chunk_elements), 0.0)


def edt(mask: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """Exact Euclidean distance of every True pixel of `mask [B, H, W]` (bool) to the nearest False
    pixel of its image; float32 `[B, H, W]` (0 on False pixels, inf in an image with no False
    pixel), as `scipy.ndimage.distance_transform_edt` gives per image."""
    return squared_edt(mask, chunk_elements).sqrt()


def boundary_errors(
    labels: Tensor,
    preds: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    fraction: float = 0.5,
    max_per_class: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contextrast's boundary-aware error pixels (BANE) of one layer.

    For each class n, its error region is the valid pixels of ground truth n predicted as another
    class; every error pixel gets its Euclidean distance to the edge of its region (the distance
    to the nearest pixel outside the region: 1 on the edge; ignore pixels, like any pixel outside
    the region, count as outside). Per class over the batch, the ceil(`fraction` × count) error
    pixels nearest the edge are kept (ties broken at random), then at most `max_per_class` of them
    at random.

    labels, preds: `[B, H, W]` (ground truth with `ignore_index`; the predicted class).
    Returns a fixed-size list of `num_classes × max_per_class` entries: flat indices into the
    `B·H·W` pixels, their true classes, their predicted classes, and which entries are valid.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = num_classes
    error = (labels != ignore_index) & (labels >= 0) & (labels < k) & (labels != preds)
    # every error region at once: an id per (class) region, -1 outside every region
    dist2 = squared_region_edt(torch.where(error, labels, -1))
    # a region filling its whole image has no edge in it (inf): farther than any real distance
    dist2 = dist2.clamp(max=float(sum(labels.shape[-2:]) ** 2)).reshape(-1)
    flat_error = error.reshape(-1)
    group = torch.where(flat_error, labels.reshape(-1), k)  # k: not an error pixel
    counts = group_counts(group, k + 1)[:k]
    zero = counts.new_zeros(1)
    # squared distances are whole numbers: a random offset below 1 only breaks ties
    priority = dist2 + 0.5 * random_priority(dist2.numel(), labels.device, generator)
    band = flat_error & first_per_group(group, priority, torch.cat([torch.ceil(counts * fraction).long(), zero]))
    in_band = torch.where(band, group, k)
    picked = band & first_per_group(in_band, random_priority(dist2.numel(), labels.device, generator),
                                    torch.cat([torch.full_like(counts, max_per_class), zero]))
    index, valid = compact(picked, k * max_per_class)
    return index, labels.reshape(-1)[index] * valid, preds.reshape(-1)[index], valid
