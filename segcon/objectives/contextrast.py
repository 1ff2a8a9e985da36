"""Contextrast (Sung et al., CVPR 2024; METHODS.md §2): contextual contrast over several encoder
layers, with boundary-aware error pixels (BANE).

Per layer i (one projection head per encoder stage, listed from the finest to the deepest):
- the kept labels (`targets.reliable()`: ground truth and the pseudo-labels a method's filter
  keeps) and the main classifier's prediction (argmax at its own resolution, detached) are
  nearest-resized to the layer's resolution;
- the sampler picks the layer's pixels V_i; the anchor of class n is the mean of V_i's
  embeddings of class n (`a_i^n`, optionally L2-normalised);
- the contextual update moves the shallower layers' anchors toward the deepest layer's:
  `â_i^n = w_l·a_i^n + w_h·a_I^n` for i < I (a class absent from layer I keeps `a_i^n`);
- each anchor is the InfoNCE query against the layer's pixels, with the per-positive
  denominator: `L_a(â, v+) = -log(e^{â·v+/τ} / (e^{â·v+/τ} + Σ_{v-} e^{â·v-/τ}))`, averaged over
  the class's positives, then over the classes present (`1/N_i Σ_n`);
- BANE adds, per class, the error pixels (ground truth n, predicted otherwise) nearest the edge
  of their error region (`segcon.objectives.boundary.boundary_errors`): positives of their true
  class's anchor, negatives of the anchor of the class they were predicted as
  (`bane_negatives: predicted`) or of every other class's anchor (`other_classes`).
The term is `Σ_i λ_i L_i`; its weight α and warm-up are the Objective's. Anchors keep their
gradient (they are means of embeddings), so the shallower layers' losses also reach the deepest
layer's head through `w_h·a_I`. A boundary error pixel that the sampler also picked counts in
both roles. The loss is computed per device, on the device's batch, as in the authors' code
(anchors are not averaged across devices). Similarities are computed in float32 also under
mixed precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.boundary import boundary_errors
from segcon.objectives.contrast import labels_at
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError

LEVEL_ORDERS = ("deep_first", "fine_first")
BANE_NEGATIVES = ("predicted", "other_classes")


def anchor_contrast(
    anchors: Tensor,
    classes: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    temperature: float,
    extra: Tensor | None = None,
    extra_true: Tensor | None = None,
    extra_negative_of: Tensor | None = None,
    anchor_valid: Tensor | None = None,
    key_valid: Tensor | None = None,
    extra_valid: Tensor | None = None,
) -> Tensor:
    """Mean over the anchors of each anchor's mean per-positive InfoNCE loss.

    anchors `[C, D]` with their classes `[C]` (distinct); keys `[N, D]` with labels `[N]`: key k is
    a positive of anchor c when `key_labels[k] == classes[c]`, else a negative. `extra [E, D]`
    (BANE pixels) are positives of the anchor of `extra_true [E]` and negatives of the anchors
    where `extra_negative_of [C, E]` is True. An anchor without negatives contributes 0; one
    without positives is not counted. `anchor_valid [C]`, `key_valid [N]`, `extra_valid [E]`: the
    rows that are real (fixed-size lists; None: all). Returns a scalar (a graph-connected 0 when
    no anchor has a positive).
    """
    with torch.autocast(anchors.device.type, enabled=False):  # float32 similarities under mixed precision
        return _anchor_contrast(at_least_float32(anchors), classes, at_least_float32(keys), key_labels, temperature,
                                None if extra is None else at_least_float32(extra), extra_true, extra_negative_of,
                                anchor_valid, key_valid, extra_valid)


def _anchor_contrast(
    anchors: Tensor,
    classes: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    temperature: float,
    extra: Tensor | None,
    extra_true: Tensor | None,
    extra_negative_of: Tensor | None,
    anchor_valid: Tensor | None,
    key_valid: Tensor | None,
    extra_valid: Tensor | None,
) -> Tensor:
    same = classes[:, None] == key_labels[None, :]
    real = torch.ones_like(same[0]) if key_valid is None else key_valid
    pos, neg = same & real, ~same & real
    if extra is not None:
        assert extra_true is not None and extra_negative_of is not None
        extra_real = torch.ones_like(extra_true, dtype=torch.bool) if extra_valid is None else extra_valid
        keys = torch.cat([keys, extra])
        pos = torch.cat([pos, (classes[:, None] == extra_true[None, :]) & extra_real], 1)
        neg = torch.cat([neg, extra_negative_of & extra_real], 1)
    sim = (anchors / temperature) @ keys.T  # [C, N + E]
    log_neg = torch.logsumexp(sim.masked_fill(~neg, torch.finfo(sim.dtype).min), dim=1, keepdim=True)
    log_neg = torch.where(neg.any(1, keepdim=True), log_neg, torch.full_like(log_neg, float("-inf")))
    per_positive = F.softplus(log_neg - sim)  # -log(e^s / (e^s + Σ_neg e^s')), 0 without negatives
    n_pos = pos.sum(1)
    per_anchor = torch.where(pos, per_positive, 0.0).sum(1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    if anchor_valid is not None:
        has_pos = has_pos & anchor_valid
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1)


class ContextrastLoss(Term):
    """Contextrast's anchor-to-pixel contrast over several encoder layers (see the module
    docstring).

    Args:
        sampler: picks each layer's pixels (`sampler=views`, Pissas et al.'s, by default).
        embeddings: the projection heads of the layers, from the finest (shallowest) to the
            deepest; the last one is layer I of the contextual update.
        level_weights: λ, listed from the end `level_weights_order` names: `deep_first` puts the
            first value on the deepest layer (the paper's wording), `fine_first` on the finest
            (Pissas et al.'s code).
        temperature: τ.
        context_weights: (w_l, w_h) of the contextual update.
        normalize_anchors: L2-normalise the class means, and the contextually updated anchors
            again (the paper does not normalise).
        bane: add the boundary error pixels; bane_fraction (K), bane_max_per_class and
            bane_negatives as in the module docstring.
    """

    reads: ClassVar[frozenset[str]] = frozenset({"logits", "decoder_logits", "embeddings"})

    def __init__(
        self,
        sampler: Callable[..., Tensor],
        embeddings: Sequence[str] = ("ctx_1", "ctx_2", "ctx_3", "ctx_4"),
        level_weights: Sequence[float] = (1.0, 0.7, 0.4, 0.1),
        level_weights_order: str = "deep_first",
        temperature: float = 0.1,
        context_weights: Sequence[float] = (0.3, 0.7),
        normalize_anchors: bool = False,
        bane: bool = True,
        bane_fraction: float = 0.5,
        bane_max_per_class: int = 256,
        bane_negatives: str = "predicted",
    ) -> None:
        super().__init__()
        names = list(embeddings)
        if not names:
            raise ConfigError("contrast.contextrast.embeddings must name at least one projection head")
        if len(level_weights) != len(names):
            raise ConfigError(f"contrast.contextrast.level_weights has {len(level_weights)} values for "
                              f"{len(names)} embeddings {names}: give one per layer")
        if level_weights_order not in LEVEL_ORDERS:
            raise ConfigError(f"contrast.contextrast.level_weights_order must be one of {LEVEL_ORDERS}, "
                              f"got {level_weights_order!r}")
        if len(context_weights) != 2:
            raise ConfigError(f"contrast.contextrast.context_weights must be [w_l, w_h], got {list(context_weights)}")
        if bane_negatives not in BANE_NEGATIVES:
            raise ConfigError(f"contrast.contextrast.bane_negatives must be one of {BANE_NEGATIVES}, "
                              f"got {bane_negatives!r}")
        if not 0.0 < bane_fraction <= 1.0:
            raise ConfigError(f"contrast.contextrast.bane_fraction must be in (0, 1], got {bane_fraction}")
        self.sampler = sampler
        self.embeddings = names
        weights = [float(w) for w in level_weights]
        self.level_weights = weights[::-1] if level_weights_order == "deep_first" else weights  # finest first
        self.temperature = temperature
        self.w_low, self.w_high = (float(w) for w in context_weights)
        self.normalize_anchors = normalize_anchors
        self.bane, self.bane_fraction, self.bane_max = bane, bane_fraction, bane_max_per_class
        self.bane_negatives = bane_negatives

    def zero(self, output: SegOutput) -> Tensor:
        name = type(self).__name__
        return sum((output.embedding(e, name).zero() for e in self.embeddings), output.logits.new_zeros(()))

    def _anchors(self, z: Tensor, y: Tensor, valid: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Class means of the valid sampled embeddings `z [M, D]` with labels `y [M]`, one row per
        class: (anchors `[K, D]`, which classes are present `[K]`)."""
        real = valid.to(z.dtype)
        sums = z.new_zeros(num_classes, z.shape[1]).index_add(0, y, z * real[:, None])
        counts = z.new_zeros(num_classes).index_add(0, y, real)
        anchors = sums / counts.clamp_min(1)[:, None]
        return F.normalize(anchors, dim=1) if self.normalize_anchors else anchors, counts > 0

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        """`Σ_i λ_i L_i` over the layers (see the module docstring): a scalar, a graph-connected
        0 when no layer has a sampled pixel. Reads the embeddings `[B, D, h_i, w_i]` named by
        `embeddings`, the kept labels `[B, H, W]` and the main logits `[B, K, H, W]`. Anchors are
        one row per class (K), with a mask of the classes present in the layer's sample."""
        name = type(self).__name__
        labels, ignore = targets.reliable(), targets.ignore_index
        b, k = labels.shape[0], output.logits.shape[1]
        classes = torch.arange(k, device=labels.device)
        with torch.no_grad():
            logits = output.logits.detach()
            preds = logits.max(1).indices  # argmax of the main logits, nearest-resized per layer like the labels
        layers = []
        previous: tuple[int, int] | None = None
        for emb_name in self.embeddings:
            emb = output.embedding(emb_name, name)
            size = emb.size
            if previous is not None and (size[0] > previous[0] or size[1] > previous[1]):
                raise ConfigError(f"contrast.contextrast.embeddings must run from the finest layer to the deepest; "
                                  f"{emb_name} is {size}, finer than the layer before it ({previous})")
            previous = size
            lab, pred = labels_at(labels, size), labels_at(preds, size)
            probs = None
            if getattr(self.sampler, "needs_probs", False):
                with torch.no_grad():
                    probs = output.logits_at(size).detach().softmax(1).reshape(b, k, -1)
            index, valid = self.sampler(lab.reshape(b, -1), pred.reshape(b, -1), probs, num_classes=k)
            z, y = emb.at(index), lab.reshape(-1)[index] * valid  # padding rows: label 0, not valid
            bane = None
            if self.bane:
                b_index, b_true, b_pred, b_valid = boundary_errors(lab, pred, k, ignore, self.bane_fraction,
                                                                   self.bane_max)
                bane = (emb.at(b_index), b_true, b_pred, b_valid)
            layers.append((z, y, valid, bane))
        anchors_per_layer = [self._anchors(z, y, valid, k) for z, y, valid, _ in layers]
        deep_anchors, deep_present = anchors_per_layer[-1]
        total = self.zero(output)
        for i, ((z, y, valid, bane), weight, (anchors, present)) in enumerate(
            zip(layers, self.level_weights, anchors_per_layer, strict=True)
        ):
            if i < len(layers) - 1:
                contextual = self.w_low * anchors + self.w_high * deep_anchors
                if self.normalize_anchors:
                    contextual = F.normalize(contextual, dim=1)
                anchors = torch.where((present & deep_present)[:, None], contextual, anchors)
            extra = extra_true = negative_of = extra_valid = None
            if bane is not None:
                extra, extra_true, extra_pred, extra_valid = bane
                if self.bane_negatives == "predicted":
                    negative_of = classes[:, None] == extra_pred[None, :]
                else:
                    negative_of = classes[:, None] != extra_true[None, :]
            total = total + weight * anchor_contrast(anchors, classes, z, y, self.temperature, extra, extra_true,
                                                     negative_of, present, valid, extra_valid)
        return total
