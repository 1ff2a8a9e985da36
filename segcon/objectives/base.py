"""What every loss term is given (`Targets`) and what a term declares (`Term`).

Every loss term is a `Term`: `term(output: SegOutput, targets: Targets) -> scalar | {name:
scalar}`, a plain `torch` module (no Lightning) configured by `_target_`. What it needs from the
rest of segcon it declares on `Term`, in one place, and the Objective, the methods and the
training module read only these declarations:

- `reads`: the `SegOutput` fields it reads (a method that assembles an output from several
  passes copies only those); `reads_teacher`: whether it reads `targets.teacher` (the method then
  runs the teacher on the weak views);
- `per_pixel`: a loss on a class-score map, `pixel_loss(logits, labels, weight)` (CE, OHEM,
  Dice, focal, the imbalance loss: `segcon.objectives.supervised.PixelLoss`); such a term also
  supervises a fusion network's side outputs, CAC's weight branch, and is what `pseudo_loss`
  takes; `mines_hard_pixels`: it picks hard pixels by other logits (`mining_logits`, OHEM);
- `needs_class_frequencies` / `set_class_frequencies`: the labeled images' class frequencies,
  counted when training starts (by default: whatever its sub-terms need);
- `memories`, `pending_entries` / `enqueue`: the memories it keeps, filled with every rank's
  entries after each step (none by default);
- `diagnostics`: values about its last computed step's inputs that are not losses (e.g. how
  many teacher regions it kept), logged on the steps the method logs and never summed (none by
  default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from segcon.models.output import SegOutput


@dataclass
class Targets:
    """The targets of one batch, for every term.

    Attributes:
        labels: `[B, H, W]` long: ground truth on labeled rows, pseudo-labels on unlabeled rows;
            `ignore_index` where nothing is known (ignore pixels, crop padding).
        ignore_index: the label value of unknown pixels.
        confidence: `[B, H, W]` in [0, 1], how sure the label source is (1 on ground truth); None:
            every label is ground truth.
        keep: `[B, H, W]` bool, the labels the method's confidence filter trusts (False on
            low-confidence pseudo-labels, which keep their label and confidence); None: all.
        labeled: `[B]` bool, the rows with ground truth; None: all rows.
        teacher: the teacher's output on the weak views of the step's unlabeled images (in their
            batch order; before CutMix), when the method has a teacher and a term reads it; its
            `valid` `[B_u, H, W]` marks the views' real pixels (False on crop padding).
        mix_boxes: `[B, H, W]` bool, where CutMix pasted into a row the content of the previous
            unlabeled image of its view's batch (`roll(1)`); None without CutMix. A term that
            reads the teacher's maps mixes them with these boxes to align them with the rows.
    """

    labels: Tensor
    ignore_index: int = 255
    confidence: Tensor | None = None
    keep: Tensor | None = None
    labeled: Tensor | None = None
    teacher: SegOutput | None = None
    mix_boxes: Tensor | None = None

    @property
    def valid(self) -> Tensor:
        """`[B, H, W]` bool: pixels with a label."""
        return self.labels != self.ignore_index

    @property
    def weight(self) -> Tensor | None:
        """Per-pixel loss weights for PixelLoss terms: 1 on kept labels, 0 on the rest (None
        when every label is kept)."""
        return None if self.keep is None else self.keep.to(torch.float32)

    def reliable(self) -> Tensor:
        """The labels a term that trusts only kept labels uses: `labels` with `ignore_index` where
        the filter did not keep them."""
        return self.labels if self.keep is None else self.labels.masked_fill(~self.keep, self.ignore_index)

    @staticmethod
    def cat(parts: Sequence[Targets]) -> Targets:
        """The targets of several batches as one, in order; a part without confidence, keep or
        labeled rows counts as ground truth (confidence 1, every valid label kept, labeled), one
        without boxes as unmixed."""
        ignore = parts[0].ignore_index
        if any(p.ignore_index != ignore for p in parts):
            raise ValueError("Targets.cat: the parts use different ignore values")
        labels = torch.cat([p.labels for p in parts])

        def field(name: str, default: Callable) -> Tensor | None:
            if all(getattr(p, name) is None for p in parts):
                return None
            return torch.cat([getattr(p, name) if getattr(p, name) is not None else default(p) for p in parts])

        return Targets(
            labels, ignore,
            confidence=field("confidence", lambda p: torch.ones(p.labels.shape, device=p.labels.device)),
            keep=field("keep", lambda p: p.valid),
            labeled=field("labeled", lambda p: torch.ones(p.labels.shape[0], dtype=torch.bool, device=p.labels.device)),
            mix_boxes=field("mix_boxes", lambda p: torch.zeros(p.labels.shape, dtype=torch.bool, device=p.labels.device)),
        )


class Term(nn.Module):
    """A loss term: `forward(output: SegOutput, targets: Targets)` returns a scalar or a dict of
    named scalars (summed, each logged). See the module docstring for the capabilities.

    Class attributes:
        reads: the SegOutput fields the term reads.
        reads_teacher: whether it reads `targets.teacher` (the method then runs the teacher on
            the weak views and keeps the heads `method.teacher_heads` names).
        per_pixel: whether it is a loss on a class-score map (`pixel_loss`).
        mines_hard_pixels: whether `pixel_loss` takes `mining_logits`.
        memories: the names of the memories it keeps (`pending_entries`, `enqueue`).
    """

    reads: ClassVar[frozenset[str]] = frozenset({"logits"})
    reads_teacher: ClassVar[bool] = False
    per_pixel: ClassVar[bool] = False
    mines_hard_pixels: ClassVar[bool] = False
    memories: ClassVar[tuple[str, ...]] = ()

    def sub_terms(self) -> list[Term]:
        """The terms this one applies (CAC's weight branch applies the supervised terms)."""
        return [m for m in self.children() if isinstance(m, Term)] + [
            t for m in self.children() if isinstance(m, nn.ModuleDict) for t in m.values() if isinstance(t, Term)]

    @property
    def needs_class_frequencies(self) -> bool:
        """Whether it still waits for the labeled images' class frequencies."""
        return any(t.needs_class_frequencies for t in self.sub_terms())

    def set_class_frequencies(self, frequencies: Sequence[float] | Tensor) -> None:
        """Hand the class pixel frequencies `[K]` to what needs them."""
        for t in self.sub_terms():
            if t.needs_class_frequencies:
                t.set_class_frequencies(frequencies)

    def pending_entries(self) -> dict[str, tuple[Tensor, Tensor]]:
        """memory name -> (entries `[M, D]`, labels `[M]`; label -1 marks padding) produced by the
        last forward: the training module gathers them from every rank (fixed shapes) and hands
        them to `enqueue`, so that all ranks hold the same memory. None by default."""
        return {}

    def diagnostics(self, class_names: Sequence[str]) -> dict[str, Tensor]:
        """name -> detached scalar about the last step the term was computed in (`class_names`
        name per-class values), logged as `train/<term>/<name>` on the steps whose values the
        method writes; computed only then, from what `forward` kept. None by default."""
        return {}

    def enqueue(self, memory: str, feats: Tensor, labels: Tensor) -> None:
        """Append gathered entries to the named memory."""
        raise KeyError(f"{type(self).__name__} keeps no memory {memory!r}")

    def pixel_loss(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        """A per-pixel term's loss of class scores `logits [B, K, h, w]` against `labels [B, H, W]`
        with per-pixel weights `weight [B, H, W]` (None: every valid pixel counts 1); one that
        `mines_hard_pixels` also takes `mining_logits`."""
        raise NotImplementedError(f"{type(self).__name__} is not a per-pixel loss (per_pixel is False)")

    def zero(self, output: SegOutput) -> Tensor:
        """A 0 connected to every parameter the term would reach: what the Objective adds in its
        place while its weight is 0, so DDP sees every parameter used without the term's cost."""
        return output.logits.sum() * 0.0
