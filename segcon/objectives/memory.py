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
        otherwise the oldest entries are overwritten first.
        """
        for c in labels.unique().tolist():
            if not 0 <= c < self.feats.shape[0]:
                continue
            new = feats[labels == c][-self.size :].to(self.feats.dtype)
            n = new.shape[0]
            slots = (self.ptr[c] + torch.arange(n, device=self.feats.device)) % self.size
            self.feats[c, slots] = new
            self.ptr[c] = (self.ptr[c] + n) % self.size
            self.count[c] = torch.clamp(self.count[c] + n, max=self.size)

    def entries(self) -> tuple[Tensor, Tensor]:
        """The filled slots of every class: `[T, D]` embeddings and `[T]` labels."""
        k = self.feats.shape[0]
        filled = torch.arange(self.size, device=self.feats.device)[None, :] < self.count[:, None]  # [K, size]
        labels = torch.arange(k, device=self.feats.device)[:, None].expand(k, self.size)
        return self.feats[filled], labels[filled]

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
