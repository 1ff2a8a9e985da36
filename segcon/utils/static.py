"""Static-shape building blocks for training-step code (DESIGN.md "Speed on a GPU").

On a GPU, an op whose output size depends on the data (`nonzero`, boolean-mask indexing,
`unique`, `bincount`) or a read of a value (`.item()`, `int(t)`, `.tolist()`) makes the host wait
until the device has drained its queue. These helpers keep every size a function of the shapes
and the config: counts by scatter-add into a fixed number of groups, ranks inside groups by one
sort, and fixed-capacity index lists with a validity mask instead of `nonzero`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def group_counts(group: Tensor, num_groups: int, mask: Tensor | None = None) -> Tensor:
    """How many elements of `group [L]` (ids in `[0, num_groups)`) fall in each group, counting
    only where `mask [L]` is True: `[num_groups]` int64, `bincount(group[mask], minlength=...)`
    without its host synchronisation."""
    ones = torch.ones_like(group, dtype=torch.long) if mask is None else mask.to(torch.long)
    return torch.zeros(num_groups, dtype=torch.long, device=group.device).scatter_add_(0, group, ones)


def class_counts(labels: Tensor, mask: Tensor, num_classes: int) -> Tensor:
    """`bincount(labels[mask], minlength=K)[:K]` without its host synchronisation: how many
    elements of `labels` (any shape) where `mask` holds fall in each class `[K]`; labels outside
    `[0, K)` may sit where `mask` is False (ignore values)."""
    return group_counts(torch.where(mask, labels, num_classes).flatten(), num_classes + 1)[:num_classes]


def group_sums(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Sums of the rows of `values [L, ...]` per group `[L]`: `[num_groups, ...]`."""
    out = values.new_zeros(num_groups, *values.shape[1:])
    return out.index_add_(0, group, values)


def rank_in_group(group: Tensor, priority: Tensor) -> Tensor:
    """Each element's rank `[L]` (0, 1, ...) among the elements of its group `[L]` in order of
    increasing `priority [L]` (ties: the earlier position first)."""
    if group.numel() == 0:
        return torch.zeros_like(group)
    order = torch.argsort(priority, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by group, then priority
    sorted_group = group[order]
    position = torch.arange(order.numel(), device=group.device)
    first = F.pad(sorted_group[1:] != sorted_group[:-1], (1, 0), value=True)  # the first of its group
    start = torch.where(first, position, 0).cummax(0).values  # where each element's group starts
    return torch.empty_like(order).scatter_(0, order, position - start)


@functools.lru_cache(maxsize=16)
def off_diagonal(n: int, device: torch.device) -> Tensor:
    """`[n, n]` bool, False on the diagonal only (pairs of two different rows), built once."""
    return ~torch.eye(n, dtype=torch.bool, device=device)


@functools.lru_cache(maxsize=64)
def arange(n: int, device: torch.device) -> Tensor:
    """`torch.arange(n)` on `device`, built once."""
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant `[len(values)]` on `device`, built once (a host-to-device copy in the
    step would wait for the device)."""
    return torch.tensor(values, dtype=dtype).to(device)


def compact(mask: Tensor, capacity: int, segment: Tensor | None = None,
            num_segments: int = 1) -> tuple[Tensor, Tensor]:
    """The positions of the True elements of `mask [L]`, in order, in a fixed-size list:
    (`index [capacity]`, `valid [capacity]`). Positions past the number of True elements are 0
    and not valid; True elements past `capacity` are left out.

    With `segment [L]` (ids in `[0, num_segments)`, in any order), one such list per segment:
    `[num_segments, capacity]` each, row s holding the True elements of segment s.
    """
    flag = mask.to(torch.long)
    if segment is None:
        rank = torch.cumsum(flag, 0) - 1  # [L]
        slot = torch.where(mask & (rank < capacity), rank, capacity)
        count = flag.sum().view(1)
    else:
        member = segment[None, :] == torch.arange(num_segments, device=mask.device)[:, None]  # [S, L]
        position = torch.cumsum(member.to(torch.long) * flag, 1)  # [S, L]: True elements so far, per segment
        rank = position.gather(0, segment[None, :])[0] - 1
        slot = torch.where(mask & (rank < capacity), segment * capacity + rank, num_segments * capacity)
        count = position[:, -1]
    index = torch.zeros(num_segments * capacity + 1, dtype=torch.long, device=mask.device)
    index.scatter_(0, slot, torch.arange(mask.numel(), device=mask.device))
    valid = torch.arange(capacity, device=mask.device) < count[:, None]  # [S, capacity]
    index = index[:-1].view(num_segments, capacity) * valid
    return (index[0], valid[0]) if segment is None else (index, valid)


@dataclass(frozen=True)
class LevelLayout:
    """Several maps of one batch side by side, so that one static-shape program serves them all:
    per image, level l's `h_l x w_l` pixels, flattened, after those of the levels before it, as
    `[B, N]` with `N = sum_l h_l w_l` (flat index `b * N + column` into `[B * N]`). Built once
    per shape and device (`level_layout`), so a step pays no op for it.

    Attributes:
        sizes: `(h_l, w_l)` per level. column_level: `[N]` each column's level.
        element_level, image, pixel: `[B * N]` each flat element's level, image, and flat pixel
            into its level's `h_l * w_l` map.
    """

    sizes: tuple[tuple[int, int], ...]
    column_level: Tensor
    element_level: Tensor
    image: Tensor
    pixel: Tensor

    @property
    def offsets(self) -> list[int]:
        """The first column of each level."""
        areas = [h * w for h, w in self.sizes]
        return [sum(areas[:i]) for i in range(len(areas))]

    def gather(self, maps: Tensor) -> Tensor:
        """`maps [B, H, W]` (labels, predictions: any dtype) nearest-resized to every level, side
        by side: `[B, N]`, exactly what `F.interpolate(mode="nearest")` gives per level."""
        b, h, w = maps.shape
        return maps.reshape(b, -1)[:, _resize_columns(h, w, self.sizes, maps.device)]

    def split(self, values: Tensor) -> list[Tensor]:
        """`values [B, N]` back into the levels' maps `[B, h_l, w_l]` (views)."""
        b = values.shape[0]
        return [values[:, o:o + h * w].reshape(b, h, w) for o, (h, w) in zip(self.offsets, self.sizes, strict=True)]


@functools.lru_cache(maxsize=64)
def level_layout(sizes: tuple[tuple[int, int], ...], batch: int, device: torch.device) -> LevelLayout:
    """The `LevelLayout` of `batch` images at the levels `sizes` on `device` (cached)."""
    areas = [h * w for h, w in sizes]
    column_level = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(areas))
    starts = torch.tensor([sum(areas[:i]) for i in range(len(areas))])
    pixel = torch.arange(sum(areas)) - starts[column_level]
    image = torch.arange(batch).repeat_interleave(sum(areas))
    return LevelLayout(tuple(sizes), column_level.to(device), column_level.repeat(batch).to(device),
                       image.to(device), pixel.repeat(batch).to(device))


@functools.lru_cache(maxsize=64)
def _resize_columns(h: int, w: int, sizes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """For every column of a `LevelLayout` of `sizes`, the flat pixel of an `h x w` map that
    nearest-neighbour resizing reads: `[N]`, from F.interpolate itself."""
    source = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    columns = [F.interpolate(source, size=size, mode="nearest").reshape(-1) for size in sizes]
    return torch.cat(columns).long().to(device)
