"""A per-class FIFO memory of embeddings, held in registered buffers (so it is checkpointed)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
        valid = (labels >= 0) & (labels < k)
        cls = torch.where(valid, labels, k)  # k: no class
        first = (cls[:, None] == torch.arange(k, device=device)[None, :]).long()  # [M, K] one-hot, padding all 0
        rank = (first.cumsum(0) - 1).gather(1, cls.clamp(max=k - 1)[:, None]).squeeze(1)  # order inside its class
        new = first.sum(0)  # [K] entries per class
        dropped = (new - size).clamp_min(0)  # all but the last `size` of a class
        keep = valid & (rank >= dropped[cls.clamp(max=k - 1)])
        slot = (self.ptr[cls.clamp(max=k - 1)] + rank - dropped[cls.clamp(max=k - 1)]) % size
        target = torch.where(keep, cls.clamp(max=k - 1) * size + slot, k * size)
        # which entry writes each slot (-1: none); at most one per slot
        source = torch.full((k * size + 1,), -1, dtype=torch.long, device=device)
        source = source.scatter_(0, target, torch.arange(labels.numel(), device=device))[:-1]
        rows = self.feats.view(k * size, -1)
        rows.copy_(torch.where((source >= 0)[:, None], feats[source.clamp_min(0)].to(rows.dtype), rows))
        written = new.clamp(max=size)
        self.ptr.copy_((self.ptr + written) % size)
        self.count.copy_(torch.clamp(self.count + written, max=size))

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every slot of every class: `[K * size, D]` embeddings, `[K * size]` labels and which
        slots are filled `[K * size]` (a fixed-size list: the unfilled slots take no part)."""
        k = self.feats.shape[0]
        filled = torch.arange(self.size, device=self.feats.device)[None, :] < self.count[:, None]  # [K, size]
        labels = torch.arange(k, device=self.feats.device)[:, None].expand(k, self.size)
        return self.feats.reshape(k * self.size, -1), labels.reshape(-1), filled.reshape(-1)

    def ordered(self, c: int) -> Tensor:
        """Class `c`'s entries, oldest first `[count_c, D]` (for inspection and tests)."""
        n, p = int(self.count[c]), int(self.ptr[c])
        start = (p - n) % self.size
        idx = (start + torch.arange(n, device=self.feats.device)) % self.size
        return self.feats[c, idx]


class MemoryUser:
    """A loss term that keeps memories filled with entries from every rank.

    The training method calls `pending_entries()` after each step, gathers every tensor from all
    ranks (fixed shapes; label -1 marks padding) and hands the result to `enqueue`, so that all
    ranks hold the same memory. Objectives stay free of any distributed code.
    """

    def pending_entries(self) -> dict[str, tuple[Tensor, Tensor]]:
        """memory name -> (entries `[M, D]`, labels `[M]`) produced by the last forward."""
        raise NotImplementedError

    def enqueue(self, memory: str, feats: Tensor, labels: Tensor) -> None:
        """Append gathered entries to the named memory."""
        raise NotImplementedError
