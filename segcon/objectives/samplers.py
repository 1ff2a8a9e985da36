"""Anchor samplers: which labelled pixels a contrastive loss uses.

A sampler is called with flattened per-image tensors and returns flat pixel indices into the
`[B * N]` batch (image b, pixel n -> b * N + n); the loss gathers embeddings and labels with
them. Samplers never return ignore pixels and are deterministic under a seeded generator.

    indices = sampler(labels [B, N], preds [B, N], probs [B, K, N] | None, generator) -> [M]

`probs` are passed only to samplers whose `needs_probs` is True. The whole batch is sampled in
a few vectorised passes (a constant number of host synchronisations per call, none per image
or class): every candidate pixel gets a priority (random, or its predicted probability), and
the first pixels of each (image, class[, hard/easy]) group in priority order are taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segcon.utils.errors import ConfigError


def random_priority(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """`n` uniform random priorities on `device` (drawn from `generator`, a CPU generator, when
    given; else from the device's default generator)."""
    if generator is None:
        return torch.rand(n, device=device)
    return torch.rand(n, generator=generator).to(device)


def first_per_group(group: Tensor, priority: Tensor, quota: Tensor) -> Tensor:
    """Positions `[M]` into `group [L]` of the `quota[g]` elements of lowest `priority [L]` in each
    group g (ties: the earlier position first), ordered by group, then by priority.

    `group` holds non-negative ids `< len(quota)`.
    """
    order = torch.argsort(priority, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    sizes = torch.bincount(group, minlength=quota.numel())
    start = torch.cumsum(sizes, 0) - sizes
    sorted_group = group[order]
    rank = torch.arange(order.numel(), device=group.device) - start[sorted_group]
    return order[rank < quota[sorted_group]]


def pair_counts(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """For `labels [B, N]`: each pixel's (image, class) id `[B * N]` (image b, class c ->
    b * C + c, with C = the largest label + 1), which pixels are labelled `[B * N]`, and the
    labelled pixel count of every id `[B * C]`."""
    b = labels.shape[0]
    valid = labels != ignore_index
    cls = labels.masked_fill(~valid, 0)
    num_classes = int(cls.max()) + 1 if cls.numel() else 1
    pair = (torch.arange(b, device=labels.device)[:, None] * num_classes + cls).reshape(-1)
    valid = valid.reshape(-1)
    return pair, valid, torch.bincount(pair[valid], minlength=b * num_classes)


def split_counts(num_hard: Tensor, num_easy: Tensor, n_view: int) -> tuple[Tensor, Tensor]:
    """How many hard and easy pixels to take per (image, class), ContrastiveSeg's rule, for
    every group at once (`[P]` counts). Where num_hard + num_easy > n_view, at least one set
    reaches n_view / 2: both do -> n_view // 2 hard, the rest easy; only hard -> all easy, the
    rest hard; only easy -> all hard, the rest easy."""
    hard_ok, easy_ok = num_hard * 2 >= n_view, num_easy * 2 >= n_view
    half = torch.full_like(num_hard, n_view // 2)
    n_hard = torch.where(hard_ok & easy_ok, half, torch.where(hard_ok, n_view - num_easy, num_hard))
    return n_hard, n_view - n_hard


class _PerClassSampler:
    """Shared budget: for each (image, class) with more than `max_views` pixels, `n_view =
    min(max_samples // pairs, max_views)` pixels, chosen by the subclass: `split` into hard
    (misclassified) and easy (correct) quotas or not, in the order of `_priority`."""

    needs_probs = False
    split = True

    def __init__(self, max_samples: int = 1024, max_views: int = 100, ignore_index: int = 255) -> None:
        self.max_samples, self.max_views, self.ignore_index = max_samples, max_views, ignore_index

    def __call__(
        self, labels: Tensor, preds: Tensor, probs: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        n = labels.shape[1]
        pair, valid, counts = pair_counts(labels, self.ignore_index)
        eligible = counts > self.max_views
        num_pairs = int(eligible.sum())
        if num_pairs == 0:
            return labels.new_zeros(0, dtype=torch.long)
        n_view = min(self.max_samples // num_pairs, self.max_views)
        cand = (valid & eligible[pair]).nonzero().squeeze(1)  # flat pixel indices
        cand_pair = pair[cand]
        hard = preds.reshape(-1)[cand] != labels.reshape(-1)[cand]
        prob = None
        if self.needs_probs:
            if probs is None:
                raise ValueError(f"{type(self).__name__} sorts by the predicted probabilities; the loss passed none")
            prob = probs[cand // n, labels.reshape(-1)[cand], cand % n]
        priority = self._priority(hard, prob, generator)
        if self.split:
            num_hard = torch.bincount(cand_pair[hard], minlength=counts.numel())
            n_hard, n_easy = split_counts(num_hard, counts - num_hard, n_view)
            group, quota = cand_pair * 2 + (~hard).long(), torch.stack([n_hard, n_easy], 1).reshape(-1)
        else:
            group, quota = cand_pair, torch.full_like(counts, n_view)
        return cand[first_per_group(group, priority, quota)]

    def _priority(self, hard: Tensor, prob: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Per candidate pixel `[L]`: lower is taken first within its group."""
        return random_priority(hard.numel(), hard.device, generator)


class RandomSampler(_PerClassSampler):
    """Uniform per class: the `n_view` pixels of each (image, class) drawn uniformly at random."""

    split = False


class HardEasySampler(_PerClassSampler):
    """ContrastiveSeg's hard-anchor sampling.

    Per (image, class c): hard = (gt = c, pred != c), easy = (gt = c, pred = c). Both sets have
    >= n_view / 2: n_view // 2 hard, the rest easy. Only hard is large: all easy, the rest hard.
    Only easy is large: all hard, the rest easy. Inside each set the choice is uniformly random.
    """


class MarginalSampler(_PerClassSampler):
    """CAC's confidence-aware marginal sampling (METHODS.md §1(d)).

    Same sets and counts as HardEasySampler, chosen by the predicted probability of the class
    instead of at random: the hard pixels (gt = c, pred != c) with the *highest* p[c] — wrong
    but closest to right — and the easy pixels (gt = c, pred = c) with the *lowest* p[c] —
    right but least sure. Ties keep pixel order, so the choice is deterministic. Needs the
    probabilities: the losses pass the main classifier's softmax.
    """

    needs_probs = True

    def _priority(self, hard: Tensor, prob: Tensor | None, generator: torch.Generator | None) -> Tensor:
        assert prob is not None
        return torch.where(hard, -prob, prob)


class ViewsSampler:
    """Pissas et al.'s sampler (the one Contextrast follows; METHODS.md §2(e)).

    The (image, class) pairs with at least `min_pixels` labelled pixels are kept; each gives the
    same number of pixels, uniformly at random: `views = min(smallest kept pair's count,
    max_views, max_total // pairs)`. The caps hold per call, i.e. per device in DDP (as in the
    authors' code); `caps: global` divides `max_views` and `max_total` by the number of devices
    (rounding up), so a run samples about as many pixels in all whatever its device count.
    """

    needs_probs = False

    def __init__(
        self, min_pixels: int = 5, max_views: int = 2500, max_total: int = 10000, caps: str = "device",
        ignore_index: int = 255,
    ) -> None:
        if caps not in ("device", "global"):
            raise ConfigError(f"sampler.caps must be device or global, got {caps!r}")
        if min(min_pixels, max_views, max_total) < 1:
            raise ConfigError(f"sampler.min_pixels, max_views and max_total must be >= 1, got "
                              f"{min_pixels}, {max_views}, {max_total}")
        self.min_pixels, self.max_views, self.max_total, self.caps = min_pixels, max_views, max_total, caps
        self.ignore_index = ignore_index

    def limits(self) -> tuple[int, int]:
        """(max_views, max_total) for this process."""
        if self.caps == "device" or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.max_views, self.max_total
        world = torch.distributed.get_world_size()
        return -(-self.max_views // world), -(-self.max_total // world)

    def __call__(
        self, labels: Tensor, preds: Tensor | None = None, probs: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Flat indices `[M]` into `[B * N]` of the chosen pixels of `labels [B, N]` (`preds` and
        `probs` are not read). At least one pixel per kept pair, even where `max_total` is below
        the number of pairs."""
        pair, valid, counts = pair_counts(labels, self.ignore_index)
        kept = counts >= self.min_pixels
        num_pairs = int(kept.sum())
        if num_pairs == 0:
            return labels.new_zeros(0, dtype=torch.long)
        max_views, max_total = self.limits()
        views = min(int(counts[kept].min()), max_views, max(1, max_total // num_pairs))
        cand = (valid & kept[pair]).nonzero().squeeze(1)
        quota = torch.full_like(counts, views)
        return cand[first_per_group(pair[cand], random_priority(cand.numel(), labels.device, generator), quota)]
