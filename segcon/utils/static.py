"""Static-shape building blocks for training-step code (DESIGN.md "Speed on a GPU").

On a GPU, an op whose output size depends on the data (`nonzero`, boolean-mask indexing,
`unique`, `bincount`) or a read of a value (`.item()`, `int(t)`, `.tolist()`) makes the host wait
until the device has drained its queue. These helpers keep every size a function of the shapes
and the config: counts by scatter-add into a fixed number of groups, ranks inside groups by one
sort, and fixed-capacity index lists with a validity mask instead of `nonzero`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_counts(group: Tensor, num_groups: int, mask: Tensor | None = None) -> Tensor:
    """How many elements of `group [L]` (ids in `[0, num_groups)`) fall in each group, counting
    only where `mask [L]` is True: `[num_groups]` int64, `bincount(group[mask], minlength=...)`
    without its host synchronisation."""
    ones = torch.ones_like(group, dtype=torch.long) if mask is None else mask.to(torch.long)
    return torch.zeros(num_groups, dtype=torch.long, device=group.device).scatter_add_(0, group, ones)


def group_sums(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Sums of the rows of `values [L, ...]` per group `[L]`: `[num_groups, ...]`."""
    out = values.new_zeros(num_groups, *values.shape[1:])
    return out.index_add_(0, group, values)


def rank_in_group(group: Tensor, priority: Tensor, num_groups: int) -> Tensor:
    """Each element's rank `[L]` (0, 1, ...) among the elements of its group `[L]` in order of
    increasing `priority [L]` (ties: the earlier position first)."""
    order = torch.argsort(priority, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sizes = group_counts(group, num_groups)
    start = torch.cumsum(sizes, 0) - sizes
    sorted_group = group[order]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=group.device) - start[sorted_group]
    return rank


def compact(mask: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """The positions of the True elements of `mask [L]`, in order, in a fixed-size list:
    (`index [capacity]`, `valid [capacity]`). Positions past the number of True elements are 0
    and not valid; True elements past `capacity` are left out."""
    position = torch.cumsum(mask.to(torch.long), 0) - 1
    slot = torch.where(mask & (position < capacity), position, capacity)
    index = torch.zeros(capacity + 1, dtype=torch.long, device=mask.device)
    index.scatter_(0, slot, torch.arange(mask.numel(), device=mask.device))
    valid = torch.arange(capacity, device=mask.device) < mask.sum()
    return index[:capacity] * valid, valid
