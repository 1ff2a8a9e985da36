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

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.objectives.samplers import first_per_group, random_priority
from segcon.utils.static import LevelLayout, compact, group_counts


@functools.lru_cache(maxsize=64)
def _axis_constants(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For `h x w` maps on `device` (cached): the row coordinates `[h, 1]`, the row above each
    row (-inf for the top row: nothing above) and below it (inf for the bottom row), and the
    squared column offsets `(x - x')² [w, w]`."""
    rows = torch.arange(h, dtype=torch.float32).view(h, 1)
    above, below = rows - 1, rows + 1
    above[0], below[-1] = float("-inf"), float("inf")
    cols = torch.arange(w, dtype=torch.float32)
    offsets = (cols.view(w, 1) - cols.view(1, w)).square()
    return rows.to(device), above.to(device), below.to(device), offsets.to(device)


def _column_distance(ids: Tensor) -> Tensor:
    """`[B, H, W]` ids -> float `[B, H, W]`: distance along each column to the nearest pixel of
    another id (inf where the column has none)."""
    _, h, w = ids.shape
    rows, row_above, row_below, _ = _axis_constants(h, w, ids.device)
    change = ids[:, 1:] != ids[:, :-1]  # [B, H - 1, W]: the id changes between a row and the next
    starts = F.pad(change, (0, 0, 1, 0), value=True)  # a run of equal ids starts here (from the top)
    ends = F.pad(change, (0, 0, 0, 1), value=True)  # ... and ends here
    above = torch.where(starts, row_above, float("-inf")).cummax(dim=1).values  # the other id above the run
    below = torch.where(ends, row_below, float("inf")).flip(1).cummin(dim=1).values.flip(1)
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
    offsets = _axis_constants(h, w, ids.device)[3]  # [W, W']: (x - x')²
    per_image_row = w * w
    images = max(1, min(b, chunk_elements // per_image_row))
    rows = max(1, chunk_elements // (images * per_image_row))

    def row_pass(part: Tensor, part_ids: Tensor) -> Tensor:
        """`[b', r', W']` column distances and ids -> `[b', r', W]`."""
        same = part_ids.unsqueeze(3) == part_ids.unsqueeze(2)  # [b', r', W, W']: x' in x's region
        column = torch.where(same, part.unsqueeze(2), 0.0)  # x' outside x's region: itself outside
        return (column + offsets).amin(dim=-1)

    if images >= b and rows >= h:
        return row_pass(g2, ids)
    out = torch.empty(b, h, w, device=ids.device, dtype=torch.float32)
    for i in range(0, b, images):
        for r in range(0, h, rows):
            out[i:i + images, r:r + rows] = row_pass(g2[i:i + images, r:r + rows], ids[i:i + images, r:r + rows])
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
    layout: LevelLayout | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Contextrast's boundary-aware error pixels (BANE) of one layer, or of several at once.

    For each class n, its error region is the valid pixels of ground truth n predicted as another
    class; every error pixel gets its Euclidean distance to the edge of its region (the distance
    to the nearest pixel outside the region: 1 on the edge; ignore pixels, like any pixel outside
    the region, count as outside). Per class over the batch, the ceil(`fraction` × count) error
    pixels nearest the edge are kept (ties broken at random), then at most `max_per_class` of them
    at random.

    labels, preds: `[B, H, W]` (ground truth with `ignore_index`; the predicted class), or, with
    `layout`, several layers' maps side by side `[B, N]` (segcon.utils.static.LevelLayout): each
    layer is treated as if alone (its own regions, distances, fractions and caps), in one program.
    Returns a fixed-size list of `num_classes × max_per_class` entries (`[S, ...]`, one row per
    layer, with a layout): flat indices into the `B·H·W` (`B·N`) pixels, their true classes, their
    predicted classes, and which entries are valid.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k, b = num_classes, labels.shape[0]
    flat_labels, flat_preds = labels.reshape(b, -1), preds.reshape(b, -1)
    error = (flat_labels != ignore_index) & (flat_labels >= 0) & (flat_labels < k) & (flat_labels != flat_preds)
    # every error region at once: an id per (class) region, -1 outside every region
    ids = torch.where(error, flat_labels, -1)
    maps = [ids.view(labels.shape)] if layout is None else layout.split(ids)
    parts = [squared_region_edt(m).reshape(b, -1) for m in maps]
    dist2 = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).reshape(-1)
    # a region filling its whole image has no edge in it (inf): farther than any real distance
    dist2 = dist2.clamp(max=float(max(sum(m.shape[-2:]) for m in maps) ** 2))
    flat_error = error.reshape(-1)
    levels = 1 if layout is None else len(layout.sizes)
    region = flat_labels.reshape(-1) if layout is None else layout.element_level * k + flat_labels.reshape(-1)
    group = torch.where(flat_error, region, levels * k)  # levels * k: not an error pixel
    counts = group_counts(group, levels * k + 1)[:-1]
    zero = counts.new_zeros(1)
    # squared distances are whole numbers: a random offset below 1 only breaks ties
    priority = dist2 + 0.5 * random_priority(dist2.numel(), labels.device, generator)
    band = flat_error & first_per_group(group, priority, torch.cat([torch.ceil(counts * fraction).long(), zero]))
    in_band = torch.where(band, group, levels * k)
    picked = band & first_per_group(in_band, random_priority(dist2.numel(), labels.device, generator),
                                    torch.cat([torch.full_like(counts, max_per_class), zero]))
    index, valid = compact(picked, k * max_per_class, None if layout is None else layout.element_level, levels)
    return index, flat_labels.reshape(-1)[index] * valid, flat_preds.reshape(-1)[index], valid
