"""Anchor samplers: which labelled pixels a contrastive loss uses.

A sampler is called with flattened per-image tensors and returns flat pixel indices into the
`[B * N]` batch (image b, pixel n -> b * N + n); the loss gathers embeddings and labels with
them. Samplers never return ignore pixels and are deterministic under a seeded generator.

    indices = sampler(labels [B, N], preds [B, N], probs [B, K, N] | None, generator) -> [M]
"""

from __future__ import annotations

import torch
from torch import Tensor


def _candidate_pairs(labels: Tensor, ignore_index: int, min_pixels: int) -> list[tuple[int, int]]:
    """(image, class) pairs whose class has more than `min_pixels` pixels in that image."""
    pairs = []
    for b in range(labels.shape[0]):
        classes, counts = labels[b].unique(return_counts=True)
        for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
            if c != ignore_index and n > min_pixels:
                pairs.append((b, c))
    return pairs


def pick_random(candidates: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Up to `n` of the `candidates` uniformly at random, without replacement."""
    perm = torch.randperm(candidates.numel(), generator=generator, device="cpu")[:n]
    return candidates[perm.to(candidates.device)]


class _PerClassSampler:
    """Shared budget: for each (image, class) with more than `max_views` pixels, `n_view =
    min(max_samples // pairs, max_views)` pixels, chosen by the subclass's `_choose`."""

    def __init__(self, max_samples: int = 1024, max_views: int = 100, ignore_index: int = 255) -> None:
        self.max_samples, self.max_views, self.ignore_index = max_samples, max_views, ignore_index

    def __call__(
        self, labels: Tensor, preds: Tensor, probs: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        pairs = _candidate_pairs(labels, self.ignore_index, self.max_views)
        if not pairs:
            return labels.new_zeros(0, dtype=torch.long)
        n_view = min(self.max_samples // len(pairs), self.max_views)
        n = labels.shape[1]
        return torch.cat([
            b * n + self._choose(labels[b], preds[b], None if probs is None else probs[b, c], c, n_view, generator)
            for b, c in pairs
        ])

    def _choose(
        self, labels: Tensor, preds: Tensor, prob_c: Tensor | None, c: int, n_view: int, generator: torch.Generator | None
    ) -> Tensor:
        """`n_view` pixel indices `[n_view]` of class `c` in one image (`labels`, `preds`, and the
        predicted probability of class c `prob_c`: `[N]`)."""
        raise NotImplementedError


class RandomSampler(_PerClassSampler):
    """Uniform per class: the `n_view` pixels of each (image, class) drawn uniformly at random."""

    def _choose(
        self, labels: Tensor, preds: Tensor, prob_c: Tensor | None, c: int, n_view: int, generator: torch.Generator | None
    ) -> Tensor:
        return pick_random((labels == c).nonzero().squeeze(1), n_view, generator)


class HardEasySampler(_PerClassSampler):
    """ContrastiveSeg's hard-anchor sampling.

    Per (image, class c): hard = (gt = c, pred != c), easy = (gt = c, pred = c). Both sets have
    >= n_view / 2: n_view // 2 hard, the rest easy. Only hard is large: all easy, the rest hard.
    Only easy is large: all hard, the rest easy. Inside each set the choice is uniformly random.
    """

    def _choose(
        self, labels: Tensor, preds: Tensor, prob_c: Tensor | None, c: int, n_view: int, generator: torch.Generator | None
    ) -> Tensor:
        hard, easy = hard_easy_sets(labels, preds, c)
        n_hard, n_easy = split_counts(hard.numel(), easy.numel(), n_view)
        return torch.cat([pick_random(hard, n_hard, generator), pick_random(easy, n_easy, generator)])


class MarginalSampler(_PerClassSampler):
    """CAC's confidence-aware marginal sampling (METHODS.md §1(d)).

    Same sets and counts as HardEasySampler, chosen by the predicted probability of the class
    instead of at random: the hard pixels (gt = c, pred != c) with the *highest* p[c] — wrong
    but closest to right — and the easy pixels (gt = c, pred = c) with the *lowest* p[c] —
    right but least sure. Ties keep pixel order (stable sort), so the choice is deterministic.
    Needs the probabilities: the losses pass the main classifier's softmax.
    """

    def _choose(
        self, labels: Tensor, preds: Tensor, prob_c: Tensor | None, c: int, n_view: int, generator: torch.Generator | None
    ) -> Tensor:
        if prob_c is None:
            raise ValueError("sampler=marginal sorts by the predicted probabilities; the loss passed none")
        hard, easy = hard_easy_sets(labels, preds, c)
        n_hard, n_easy = split_counts(hard.numel(), easy.numel(), n_view)
        hard = hard[torch.argsort(prob_c[hard], descending=True, stable=True)[:n_hard]]
        easy = easy[torch.argsort(prob_c[easy], stable=True)[:n_easy]]
        return torch.cat([hard, easy])


def hard_easy_sets(labels: Tensor, preds: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Pixel indices of class `c` in one image (`[N]` inputs): misclassified (hard) and correct
    (easy)."""
    is_c = labels == c
    return (is_c & (preds != c)).nonzero().squeeze(1), (is_c & (preds == c)).nonzero().squeeze(1)


def split_counts(num_hard: int, num_easy: int, n_view: int) -> tuple[int, int]:
    """How many hard and easy pixels to take for one (image, class), ContrastiveSeg's rule.

    The caller guarantees num_hard + num_easy > n_view, so at least one set reaches n_view / 2.
    """
    hard_ok, easy_ok = num_hard >= n_view / 2, num_easy >= n_view / 2
    if hard_ok and easy_ok:
        return n_view // 2, n_view - n_view // 2
    if hard_ok:  # easy is short: take all of it, fill up with hard
        return n_view - num_easy, num_easy
    return num_hard, n_view - num_hard  # hard is short: take all of it, fill up with easy
