"""A per-class FIFO memory of embeddings, held in registered buffers (so it is checkpointed)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from segcon.utils.static import arange


class ClassMemory(nn.Module):
    """`num_classes` ring buffers of `size` detached `[dim]` entries each.

    Buffers: `feats [K, size, D]`, `ptr [K]` (next slot to write) and `count [K]` (filled
    slots). Every class, class 0 included, is a class like any other.
    """

    def __init__(self, num_classes: int, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("feats", torch.zeros(num_classes, size, dim))
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, feats: Tensor, labels: Tensor) -> None:
        """Append entries `[M, D]` in order; `labels [M]` outside [0, K) (padding: -1) are skipped.

        When a class receives more than `size` entries at once, only its last `size` are kept;
        otherwise the oldest entries are overwritten first. One static-shape program for all
        classes: each entry's slot comes from its rank among its class's new entries.
        """
        k, size, device = self.feats.shape[0], self.size, self.feats.device
        cls = labels.clamp(0, k - 1)
        valid = labels == cls  # inside [0, K)
        member = (cls[:, None] == arange(k, device)[None, :]) & valid[:, None]  # [M, K]
        so_far = member.cumsum(0)  # [M, K]: each class's new entries up to each entry
        order = so_far.gather(1, cls[:, None])[:, 0]  # 1, 2, ...: order inside its class
        new = so_far[-1]  # [K] entries per class
        first = (new - (size - 1)).clamp_min(1)  # the first kept: all but the last `size` of a class are dropped
        keep = valid & (order >= first[cls])
        slot = (self.ptr - first)[cls] + order  # the ring position, before wrapping
        target = torch.where(keep, cls * size + slot % size, k * size)
        # which entry writes each slot (-1: none); at most one per slot
        source = torch.full((k * size + 1,), -1, dtype=torch.long, device=device)
        source = source.scatter_(0, target, arange(labels.numel(), device))[:-1]
        rows = self.feats.view(k * size, -1)
        rows.copy_(torch.where((source >= 0)[:, None], feats[source.clamp_min(0)].to(rows.dtype), rows))
        written = new.clamp(max=size)
        self.ptr.copy_((self.ptr + written) % size)
        self.count.copy_(torch.clamp(self.count + written, max=size))

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every slot of every class: `[K * size, D]` embeddings, `[K * size]` labels and which
        slots are filled `[K * size]` (a fixed-size list: the unfilled slots take no part)."""
        k, device = self.feats.shape[0], self.feats.device
        filled = arange(self.size, device)[None, :] < self.count[:, None]  # [K, size]
        labels = arange(k, device)[:, None].expand(k, self.size)
        return self.feats.reshape(k * self.size, -1), labels.reshape(-1), filled.reshape(-1)

    def ordered(self, c: int) -> Tensor:
        """Class `c`'s entries, oldest first `[count_c, D]` (for inspection and tests)."""
        n, p = int(self.count[c]), int(self.ptr[c])
        start = (p - n) % self.size
        idx = (start + torch.arange(n, device=self.feats.device)) % self.size
        return self.feats[c, idx]
