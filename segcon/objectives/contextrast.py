"""Contextrast (Sung et al., CVPR 2024; METHODS.md §2): contextual contrast over several encoder
layers, with boundary-aware error pixels (BANE).

Per layer i (one projection head per encoder stage, listed from the finest to the deepest):
- the kept labels (`targets.reliable()`: ground truth and the pseudo-labels a method's filter
  keeps) and the main classifier's prediction (argmax at its own resolution, detached) are
  nearest-resized to the layer's resolution;
- the sampler picks the layer's pixels V_i; the anchor of class n is the mean of V_i's
  embeddings of class n (`anchor_pixels: sampled`) or of all of the layer's embeddings whose kept
  label is n (`all`, the paper's Eq. (1)): `a_i^n`, optionally L2-normalised; a class with fewer
  than `anchor_min_pixels` such pixels (one number, or one per layer) has no anchor at that layer;
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

from segcon.models.output import PixelEmbedding, SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.boundary import boundary_errors
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError
from segcon.utils.static import constant, group_counts, level_layout

LEVEL_ORDERS = ("deep_first", "fine_first")
ANCHOR_PIXELS = ("sampled", "all")
BANE_NEGATIVES = ("predicted", "other_classes")


def anchor_contrast(anchors: Tensor, keys: Tensor, pos: Tensor, neg: Tensor, temperature: float,
                    anchor_valid: Tensor) -> Tensor:
    """Per level, the mean over its anchors of each anchor's mean per-positive InfoNCE loss.

    anchors `[L, C, D]` (`anchor_valid [L, C]`: the real ones), keys `[L, M, D]`; key m is a
    positive of anchor c of level l where `pos[l, c, m]`, a negative where `neg[l, c, m]` (rows a
    fixed-size list pads are neither). An anchor without negatives contributes 0; one without
    positives is not counted. Returns `[L]` (0 for a level where no anchor has a positive; always
    connected to the graph). Similarities in float32, also under mixed precision.
    """
    with torch.autocast(anchors.device.type, enabled=False):
        sim = torch.bmm(at_least_float32(anchors) / temperature, at_least_float32(keys).transpose(1, 2))  # [L, C, M]
    log_neg = torch.logsumexp(sim.masked_fill(~neg, torch.finfo(sim.dtype).min), dim=2, keepdim=True)
    log_neg = torch.where(neg.any(2, keepdim=True), log_neg, float("-inf"))
    per_positive = F.softplus(log_neg - sim)  # -log(e^s / (e^s + Σ_neg e^s')), 0 without negatives
    n_pos = pos.sum(2)
    per_anchor = torch.where(pos, per_positive, 0.0).sum(2) / n_pos.clamp_min(1)
    has_pos = (n_pos > 0) & anchor_valid
    return (per_anchor * has_pos).sum(1) / has_pos.sum(1).clamp_min(1)


def _is_count(value: object) -> bool:
    """A whole number >= 1 (`2` or `2.0`; not `True`, `1.5` or `"2"`)."""
    return (isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
            and value >= 1)


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
        anchor_pixels: `sampled` (the sampler's pixels of the class) or `all` (every pixel of the
            layer with the class's kept label) form a class's anchor.
        anchor_min_pixels: a class forms an anchor at a layer from at least this many pixels: one
            number for every layer, or one per layer in the order of `embeddings`.
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
        anchor_pixels: str = "sampled",
        anchor_min_pixels: int | Sequence[int] = 1,
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
        if anchor_pixels not in ANCHOR_PIXELS:
            raise ConfigError(f"contrast.contextrast.anchor_pixels must be one of {ANCHOR_PIXELS}, got {anchor_pixels!r}")
        per_layer = isinstance(anchor_min_pixels, Sequence) and not isinstance(anchor_min_pixels, str)
        minimum = list(anchor_min_pixels) if per_layer else [anchor_min_pixels] * len(names)
        if len(minimum) != len(names) or not all(_is_count(v) for v in minimum):
            raise ConfigError(f"contrast.contextrast.anchor_min_pixels must be one whole number >= 1 or one per layer "
                              f"of {names}, got {anchor_min_pixels!r}")
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
        self.anchor_pixels, self.anchor_min_pixels = anchor_pixels, tuple(int(v) for v in minimum)

    def zero(self, output: SegOutput) -> Tensor:
        name = type(self).__name__
        return sum((output.embedding(e, name).zero() for e in self.embeddings), output.logits.new_zeros(()))

    def _anchors(self, z: Tensor, y: Tensor, valid: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Per level, the class means of the valid sampled embeddings `z [L, M, D]` with labels
        `y [L, M]`, one row per class: (anchors `[L, K, D]`, which classes have one `[L, K]`)."""
        levels, k = z.shape[0], num_classes
        group = (y + torch.arange(levels, device=y.device)[:, None] * k).reshape(-1)
        real = valid.reshape(-1).to(z.dtype)
        sums = z.new_zeros(levels * k, z.shape[2]).index_add(0, group, z.reshape(-1, z.shape[2]) * real[:, None])
        counts = z.new_zeros(levels * k).index_add(0, group, real)
        return self._means(sums.view(levels, k, -1), counts.view(levels, k))

    def _all_pixel_anchors(self, embs: Sequence[PixelEmbedding], labels: Sequence[Tensor], ignore: int,
                           num_classes: int) -> tuple[Tensor, Tensor]:
        """Per level, the class means of every embedding of the layer by its kept label
        (`labels[l] [B, h_l, w_l]`, ignore left out): (anchors `[L, K, D]`, which classes have one
        `[L, K]`). One segment sum per layer."""
        sums, counts = [], []
        for emb, lab in zip(embs, labels, strict=True):
            rows = emb.rows()  # [B * h * w, D], flat-index order
            group = torch.where(lab == ignore, num_classes, lab).reshape(-1)
            sums.append(rows.new_zeros(num_classes + 1, rows.shape[1]).index_add(0, group, rows)[:num_classes])
            counts.append(group_counts(group, num_classes + 1)[:num_classes])
        return self._means(torch.stack(sums), torch.stack(counts).to(sums[0].dtype))

    def _means(self, sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Anchors `[L, K, D]` from sums `[L, K, D]` over `counts [L, K]` pixels (normalised when
        `normalize_anchors`), and which classes have one (at least the level's `anchor_min_pixels`)."""
        anchors = sums / counts.clamp_min(1)[..., None]
        anchors = F.normalize(anchors, dim=2) if self.normalize_anchors else anchors
        return anchors, counts >= constant(self.anchor_min_pixels, counts.dtype, counts.device)[:, None]

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        """`Σ_i λ_i L_i` over the layers (see the module docstring): a scalar, 0 (connected to
        the graph) when no layer has a sampled pixel. Reads the embeddings `[B, D, h_i, w_i]`
        named by `embeddings`, the kept labels `[B, H, W]` and the main logits `[B, K, H, W]`.

        Every layer is handled in the same ops (segcon.utils.static.LevelLayout): the layers'
        label and prediction maps side by side, one sampler call and one BANE selection for all
        of them (each layer as if alone), anchors `[L, K, D]` with a mask of the classes present
        in each layer's sample, and one batched contrast."""
        name = type(self).__name__
        labels, ignore = targets.reliable(), targets.ignore_index
        b, k = labels.shape[0], output.logits.shape[1]
        embs = [output.embedding(e, name) for e in self.embeddings]
        sizes = tuple(e.size for e in embs)
        for i in range(1, len(sizes)):
            if sizes[i][0] > sizes[i - 1][0] or sizes[i][1] > sizes[i - 1][1]:
                raise ConfigError(f"contrast.contextrast.embeddings must run from the finest layer to the deepest; "
                                  f"{self.embeddings[i]} is {sizes[i]}, finer than the layer before it ({sizes[i - 1]})")
        layout = level_layout(sizes, b, labels.device)
        levels = len(sizes)
        with torch.no_grad():
            logits = output.logits.detach()
            preds = layout.gather(logits.max(1).indices)  # the main logits' argmax, nearest-resized per layer
            probs = None
            if getattr(self.sampler, "needs_probs", False):
                probs = torch.cat([output.logits_at(size).detach().softmax(1).reshape(b, k, -1) for size in sizes], 2)
        lab = layout.gather(labels)  # [B, N]
        index, valid = self.sampler(lab, preds, probs, num_classes=k, segments=(layout.column_level, levels))
        y = lab.reshape(-1)[index] * valid  # [L, M]; padding rows: label 0, not valid
        rows = index
        if self.bane:
            b_index, b_true, b_pred, b_valid = boundary_errors(lab, preds, k, ignore, self.bane_fraction, self.bane_max,
                                                               layout=layout)
            rows = torch.cat([index, b_index], 1)
        keys = PixelEmbedding.stack_at(embs, layout.image[rows], layout.pixel[rows])  # [L, M (+ E), D]
        m = index.shape[1]
        if self.anchor_pixels == "all":
            anchors, present = self._all_pixel_anchors(embs, layout.split(lab), ignore, k)
        else:
            anchors, present = self._anchors(keys[:, :m], y, valid, k)
        if levels > 1:  # the contextual update of the shallower layers' anchors
            deep, deep_present = anchors[-1:], present[-1:]
            contextual = self.w_low * anchors[:-1] + self.w_high * deep
            if self.normalize_anchors:
                contextual = F.normalize(contextual, dim=2)
            update = (present[:-1] & deep_present)[..., None]
            anchors = torch.cat([torch.where(update, contextual, anchors[:-1]), deep])
        cls = torch.arange(k, device=labels.device)[None, :, None]  # [1, K, 1]
        pos = (y[:, None, :] == cls) & valid[:, None, :]
        neg = pos ^ valid[:, None, :]  # the other valid pixels
        if self.bane:
            b_pos = (b_true[:, None, :] == cls) & b_valid[:, None, :]
            if self.bane_negatives == "predicted":
                b_neg = (b_pred[:, None, :] == cls) & b_valid[:, None, :]
            else:
                b_neg = b_pos ^ b_valid[:, None, :]
            pos, neg = torch.cat([pos, b_pos], 2), torch.cat([neg, b_neg], 2)
        per_level = anchor_contrast(anchors, keys, pos, neg, self.temperature, present)
        return (per_level * constant(tuple(self.level_weights), per_level.dtype, per_level.device)).sum()
