"""Losses on a class-score map (PixelLoss, the `per_pixel` terms): `loss.pixel_loss(logits [B,
K, h, w], target [B, H, W], weight [B, H, W] | None) -> scalar`, for ground truth and
pseudo-labels alike; as a term, `loss(output, targets)` reads `output.logits`, `targets.labels`
and `targets.weight`.

Logits at another resolution than the target are bilinearly resized to it. Pixels equal to
`ignore_index` never contribute; a batch without a single valid pixel gives a zero that is still
connected to the graph (no NaN, no unused parameters under DDP). `weight` (per pixel, e.g. 1 on
the pseudo-labels a confidence filter keeps and 0 elsewhere, or the confidence itself)
multiplies each pixel's contribution while the normaliser stays what it is without weights: the
valid pixels, so a batch with few trusted pseudo-labels weighs less (UniMatch's unsupervised
loss is `loss_ce` with `weight = keep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term


def match_size(logits: Tensor, target: Tensor) -> Tensor:
    """Resize `logits [B, K, h, w]` bilinearly to the target's `[H, W]` if they differ."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def weighted_mean(values: Tensor, weights: Tensor, extra: Tensor | None = None) -> Tensor:
    """sum(values * weights * extra) / sum(weights), and a graph-connected 0 when every weight
    is 0. `extra` (per-pixel weights, see the module docstring) scales the numerator only.

    No host sync: the clamp only matters when the numerator is 0 as well.
    """
    numerator = values * weights if extra is None else values * weights * extra
    return numerator.sum() / weights.sum().clamp_min(1e-12)


class PixelLoss(Term):
    """Base of the losses on a class-score map (`per_pixel`): as a term they read
    `SegOutput.logits` and `Targets.labels` / `Targets.weight`; subclasses write `pixel_loss`."""

    per_pixel: ClassVar[bool] = True

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        return self.pixel_loss(output.logits, targets.labels, targets.weight)

    def __init__(self, ignore_index: int = 255, class_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        cw = None if class_weights is None else torch.as_tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", cw, persistent=False)

    def _pixel_weights(self, target: Tensor, valid: Tensor) -> Tensor:
        """Per-pixel weight `[B, H, W]`: class weight of the target (1 without), 0 on ignore."""
        if self.class_weights is None:
            return valid.float()
        return self.class_weights[target.clamp(min=0) * valid] * valid


class CrossEntropyLoss(PixelLoss):
    """Pixel-wise cross-entropy, mean over valid pixels (class-weighted mean with class_weights).

    Args:
        ignore_index: label value to skip.
        class_weights: optional `[K]` weights (a weighted mean, as torch's CE computes it).
        label_smoothing: as in torch.nn.functional.cross_entropy.
    """

    def __init__(
        self,
        ignore_index: int = 255,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(ignore_index, class_weights)
        self.label_smoothing = label_smoothing

    def pixel_loss(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        logits = match_size(logits, target)
        valid = target != self.ignore_index
        if self.class_weights is None and weight is None:  # the plain mean over valid pixels, in one reduction
            ce_sum = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum",
                                     label_smoothing=self.label_smoothing)
            return ce_sum / valid.sum().clamp_min(1)
        ce = F.cross_entropy(
            logits, target.masked_fill(~valid, 0), reduction="none", label_smoothing=self.label_smoothing
        )
        return weighted_mean(ce, self._pixel_weights(target, valid), weight)


class OhemCrossEntropyLoss(PixelLoss):
    """Online hard example mining CE (as mmseg's OHEMPixelSampler + CE).

    Keeps the valid pixels whose predicted probability of the true class is below
    `max(thresh, p_(k))`, where p_(k) is the k-th smallest such probability over the batch and
    k = `min_kept` x batch size, so at least `min_kept` pixels per image are kept. The loss is the
    (class-weighted) mean CE over the kept pixels. With per-pixel `weight`s (pseudo-labels), only
    pixels of positive weight are mined and their terms are scaled by the weight (the normaliser
    stays the kept pixels): pixels a confidence filter dropped neither take the budget nor count.
    """

    mines_hard_pixels: ClassVar[bool] = True

    def __init__(
        self,
        thresh: float = 0.7,
        min_kept: int = 100_000,
        ignore_index: int = 255,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(ignore_index, class_weights)
        self.thresh = thresh
        self.min_kept = min_kept

    def pixel_loss(
        self, logits: Tensor, target: Tensor, weight: Tensor | None = None, mining_logits: Tensor | None = None
    ) -> Tensor:
        """`mining_logits` (default: `logits`) choose the kept pixels: CAC's weight branch is
        trained on the pixels the main classifier finds hard."""
        logits = match_size(logits, target)
        valid = target != self.ignore_index
        safe_target = target.masked_fill(~valid, 0)
        if weight is not None:
            valid = valid & (weight > 0)
        with torch.no_grad():
            mining = logits if mining_logits is None else match_size(mining_logits, target)
            p_true = mining.softmax(1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
            valid_p = p_true[valid]
            keep = valid.clone()
            if valid_p.numel() > 0:
                k = min(self.min_kept * target.shape[0], valid_p.numel() - 1)
                threshold = valid_p.kthvalue(k + 1).values.clamp_min(self.thresh)
                keep &= p_true < threshold
        ce = F.cross_entropy(logits, safe_target, reduction="none")
        return weighted_mean(ce, self._pixel_weights(target, keep), weight)


class DiceLoss(PixelLoss):
    """Multi-class soft Dice: 1 - dice per class (softmax probabilities vs one-hot target over the
    valid pixels of the whole batch), averaged over the classes present in the target. Per-pixel
    `weight`s scale both the probabilities and the one-hot target of each pixel (a soft region).
    """

    def __init__(self, ignore_index: int = 255, smooth: float = 1.0) -> None:
        super().__init__(ignore_index, None)
        self.smooth = smooth

    def pixel_loss(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        dice, present = soft_dice(match_size(logits, target), target, self.ignore_index, weight, self.smooth)
        return weighted_mean(1 - dice, present.to(dice.dtype))


def soft_dice(
    logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None, smooth: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-class soft Dice `[K]` of the softmax probabilities of `logits [B, K, H, W]` against the
    one-hot `target [B, H, W]` over the valid pixels of the whole batch, and which classes the
    target holds (`[K]` bool). Per-pixel `weight`s scale both the probabilities and the one-hot
    target of each pixel (a soft region)."""
    valid = (target != ignore_index).unsqueeze(1)
    mask = valid if weight is None else valid * weight.unsqueeze(1)
    prob = logits.softmax(1) * mask
    classes = torch.arange(logits.shape[1], device=target.device).view(1, -1, 1, 1)
    onehot = (target.masked_fill(~valid.squeeze(1), 0).unsqueeze(1) == classes).to(prob.dtype) * mask  # no range check
    inter = (prob * onehot).sum((0, 2, 3))
    card = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return (2 * inter + smooth) / (card + smooth), onehot.sum((0, 2, 3)) > 0


class FocalLoss(PixelLoss):
    """Focal loss `-(1 - p_t)^gamma log p_t`, (class-weighted) mean over valid pixels.

    class_weights plays the role of the per-class alpha.
    """

    def __init__(self, gamma: float = 2.0, ignore_index: int = 255, class_weights: Sequence[float] | None = None) -> None:
        super().__init__(ignore_index, class_weights)
        self.gamma = gamma

    def pixel_loss(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        logits = match_size(logits, target)
        valid = target != self.ignore_index
        safe_target = target.masked_fill(~valid, 0)
        logp = logits.log_softmax(1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
        focal = -((1 - logp.exp()) ** self.gamma) * logp
        return weighted_mean(focal, self._pixel_weights(target, valid), weight)
