"""Anchor samplers: which labelled pixels a contrastive loss uses.

A sampler is called with flattened per-image tensors and returns a fixed-size list of flat
pixel indices into the `[B * N]` batch (image b, pixel n -> b * N + n) with a validity mask; the
loss gathers embeddings and labels with them and leaves the invalid rows out. Samplers never
choose ignore pixels and are deterministic under a seeded generator.

    index, valid = sampler(labels [B, N], preds [B, N], probs [B, K, N] | None, num_classes=K,
                           generator=None)  # index, valid: [sampler.capacity(B, K)]

`probs` are passed only to samplers whose `needs_probs` is True. With `segments=(column_level
[N], S)` (the columns of several maps side by side, segcon.utils.static.LevelLayout), each level
is sampled as if alone, all in one program: index, valid `[S, sampler.capacity(B, K)]`, row s
holding level s's pixels (still flat indices into `[B * N]`; 0 in the rows that are not valid).

The whole batch is sampled as one static-shape program (segcon.utils.static): every pixel gets
a group (image, class[, hard/easy]; a dummy group for the pixels not taken part) and a priority
(random, drawn on the pixels' device, or its predicted probability), and the first pixels of
each group in priority order are taken. No op's size depends on the data, so nothing waits for
the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segcon.utils.errors import ConfigError
from segcon.utils.static import compact, group_counts, rank_in_group


def random_priority(n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """`n` uniform random priorities drawn on `device` (from `generator`, a generator of that
    device, when given; else from the device's default generator)."""
    return torch.rand(n, device=device, generator=generator)


def first_per_group(group: Tensor, priority: Tensor, quota: Tensor) -> Tensor:
    """Whether each element `[L]` of `group [L]` is among the `quota[g]` elements of lowest
    `priority [L]` of its group g (ties: the earlier position first). `group` holds ids `<
    len(quota)`."""
    return rank_in_group(group, priority) < quota[group]


def pair_ids(labels: Tensor, num_classes: int, ignore_index: int,
             column_level: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """For `labels [B, N]`: each pixel's (image, class) id `[B * N]` (image b, class c -> b * K +
    c; with `column_level [N]`, (level, image, class): l * B * K + b * K + c) and whether it is
    labelled with a class `[B * N]` (neither ignore nor outside [0, K))."""
    b = labels.shape[0]
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    image = torch.arange(b, device=labels.device)[:, None]
    if column_level is not None:
        image = image + column_level[None, :] * b
    return (image * num_classes + labels.masked_fill(~valid, 0)).reshape(-1), valid.reshape(-1)


def split_counts(num_hard: Tensor, num_easy: Tensor, n_view: Tensor | int) -> tuple[Tensor, Tensor]:
    """How many hard and easy pixels to take per (image, class), ContrastiveSeg's rule, for
    every group at once (`[P]` counts, or any shape `n_view` broadcasts against; `n_view` an int
    or a tensor). Where num_hard + num_easy > n_view, at least one set reaches n_view / 2: both
    do -> n_view // 2 hard, the rest easy; only hard -> all easy, the rest hard; only easy -> all
    hard, the rest easy."""
    # the three cases in one expression: half, but at least what the easy pixels leave to fill,
    # and at most the hard pixels there are
    n_hard = torch.minimum(torch.clamp(n_view - num_easy, min=n_view // 2), num_hard)
    return n_hard, n_view - n_hard


class _PerClassSampler:
    """Shared budget: for each (image, class) with more than `max_views` pixels, `n_view =
    min(max_samples // pairs, max_views)` pixels, chosen by the subclass: `split` into hard
    (misclassified) and easy (correct) quotas or not, in the order of `_priority`. At most
    `max_samples` pixels in all: that is the capacity."""

    needs_probs = False
    split = True

    def __init__(self, max_samples: int = 1024, max_views: int = 100, ignore_index: int = 255) -> None:
        self.max_samples, self.max_views, self.ignore_index = max_samples, max_views, ignore_index

    def capacity(self, batch: int, num_classes: int) -> int:
        """The length of the index list for a batch of `batch` images and `num_classes` classes."""
        return self.max_samples

    def __call__(
        self, labels: Tensor, preds: Tensor, probs: Tensor | None = None, num_classes: int | None = None,
        generator: torch.Generator | None = None, segments: tuple[Tensor, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        b, n = labels.shape
        k = num_classes if num_classes is not None else probs.shape[1] if probs is not None else None
        if k is None:
            raise ValueError(f"{type(self).__name__} needs num_classes (the logits' channel count)")
        column_level, s = segments if segments is not None else (None, 1)
        pair, valid = pair_ids(labels, k, self.ignore_index, column_level)
        hard = preds.reshape(-1) != labels.reshape(-1)
        # labelled pixels per (level, image, class) and, of them, the hard ones: one scatter
        split = group_counts(pair * 2 + hard.long(), 2 * s * b * k, valid).view(s, b * k, 2)
        counts = split.sum(2)  # [S, B * K]
        eligible = counts > self.max_views
        n_view = torch.clamp(self.max_samples // eligible.sum(1, keepdim=True).clamp_min(1), max=self.max_views)
        cand = valid & eligible.view(-1)[pair]
        prob = None
        if self.needs_probs:
            if probs is None:
                raise ValueError(f"{type(self).__name__} sorts by the predicted probabilities; the loss passed none")
            prob = probs.gather(1, labels.clamp(0, k - 1).reshape(b, 1, n)).reshape(-1)
        priority = self._priority(hard, prob, generator)
        if self.split:
            n_hard, n_easy = split_counts(split[..., 1], split[..., 0], n_view)
            group = torch.where(cand, pair * 2 + (~hard).long(), 2 * s * b * k)
            quota = torch.cat([torch.stack([n_hard, n_easy], 2).reshape(-1), n_hard.new_zeros(1)])
        else:
            group = torch.where(cand, pair, s * b * k)
            quota = torch.cat([(torch.zeros_like(counts) + n_view).reshape(-1), counts.new_zeros(1)])
        chosen = cand & first_per_group(group, priority, quota)
        return compact(chosen, self.max_samples, None if segments is None else pair // (b * k), s)

    def _priority(self, hard: Tensor, prob: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Per pixel `[B * N]`: lower is taken first within its group."""
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

    def capacity(self, batch: int, num_classes: int) -> int:
        """The length of the index list: `max_total`, or one pixel per (image, class) where that is more."""
        return max(self.limits()[1], batch * num_classes)

    def __call__(
        self, labels: Tensor, preds: Tensor | None = None, probs: Tensor | None = None, num_classes: int | None = None,
        generator: torch.Generator | None = None, segments: tuple[Tensor, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Flat indices `[capacity]` into `[B * N]` of the chosen pixels of `labels [B, N]`, and
        which are valid (`preds` and `probs` are not read); `[S, capacity]` with `segments`. At
        least one pixel per kept pair, even where `max_total` is below the number of pairs."""
        if num_classes is None:
            raise ValueError("ViewsSampler needs num_classes (the logits' channel count)")
        b, k = labels.shape[0], num_classes
        column_level, s = segments if segments is not None else (None, 1)
        pair, valid = pair_ids(labels, k, self.ignore_index, column_level)
        counts = group_counts(pair, s * b * k, valid).view(s, b * k)
        kept = counts >= self.min_pixels
        max_views, max_total = self.limits()
        smallest = torch.where(kept, counts, torch.iinfo(torch.long).max).amin(1, keepdim=True)  # [S, 1]
        views = torch.minimum(smallest.clamp(max=max_views),
                              (max_total // kept.sum(1, keepdim=True).clamp_min(1)).clamp_min(1))
        cand = valid & kept.view(-1)[pair]
        group = torch.where(cand, pair, s * b * k)
        quota = torch.cat([(torch.zeros_like(counts) + views).reshape(-1), counts.new_zeros(1)])
        chosen = cand & first_per_group(group, random_priority(pair.numel(), labels.device, generator), quota)
        return compact(chosen, self.capacity(b, k), None if segments is None else pair // (b * k), s)
