"""Losses for class-imbalanced segmentation (`loss=imbalance`): our reconstruction of the "data
imbalance loss" of Liu 2022 (METHODS.md §3(c)) and the menu of the same author's public crack
code (§3(g')). One PixelLoss with a `kind`:

- `log_inverse`: class-weighted CE with `w_k = 1 / log(1.02 + f_k)` (f_k: class k's share of the
  labeled pixels), plus `1 - Dice` averaged over the foreground classes present in the batch;
- `balanced_ce`: CE with `w_k = (1 / f_k)` normalised to sum 1 (total / class pixels);
- `focal`: `-alpha_t (1 - p_t)^gamma log p_t`, `alpha_t = alpha` on foreground classes and
  `1 - alpha` on the background (for two classes this is the sigmoid focal loss of the logit
  difference), mean over the valid pixels;
- `bce_dice`: `0.5 BCE + 0.5 (1 - Dice)` of the foreground of a binary task (K = 2).

Class-weighted CE terms are weighted means (as torch's `cross_entropy` computes them), so the
scale of the weights does not matter, only their ratios. The frequencies come from the labeled
training images only — never from unlabeled ground truth: `frequencies: null` has the training
module count them when training starts (`SegDataModule.class_frequencies`, cached) and call
`set_class_frequencies`; a list sets them by hand. Per-pixel `weight`s (pseudo-labels) scale
each pixel's contribution (the Dice terms: a soft region), as in every PixelLoss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.objectives.supervised import PixelLoss, match_size, soft_dice, weighted_mean
from segcon.utils.errors import ConfigError

KINDS = ("log_inverse", "balanced_ce", "focal", "bce_dice")
WEIGHTED = ("log_inverse", "balanced_ce")
"""The kinds whose class weights come from the class frequencies."""


def imbalance_class_weights(kind: str, frequencies: Tensor) -> Tensor:
    """Class weights `[K]` from class pixel frequencies `[K]` (shares of the labeled pixels).

    `log_inverse`: `1 / log(1.02 + f_k)` (at most 1 / log 1.02 = 50.5, for an absent class).
    `balanced_ce`: `(1 / f_k) / sum_j (1 / f_j)`; a class absent from the labeled images (f = 0)
    gets the largest weight of the present ones (it is at least as rare as the rarest seen).
    """
    f = frequencies.double()
    if kind == "log_inverse":
        return (1.0 / torch.log(1.02 + f)).float()
    if kind == "balanced_ce":
        if not (f > 0).any():
            raise ConfigError("loss imbalance (balanced_ce): the labeled images hold no labeled pixel")
        inverse = torch.where(f > 0, 1.0 / f.clamp_min(1e-300), torch.zeros_like(f))
        inverse = torch.where(f > 0, inverse, inverse.max())
        return (inverse / inverse.sum()).float()
    raise ConfigError(f"loss imbalance: kind {kind!r} has no frequency-based class weights; use one of {WEIGHTED}")


class ImbalanceLoss(PixelLoss):
    """A loss for class-imbalanced data (see the module docstring for the kinds).

    Args:
        kind: log_inverse | balanced_ce | focal | bce_dice.
        num_classes: K (the frequency buffer's size).
        frequencies: `[K]` class pixel frequencies; None: set from the labeled images before
            training (`set_class_frequencies`). Only the frequency-weighted kinds use them.
        background: the background class index (focal's 1 - alpha, excluded from the Dice of
            log_inverse; bce_dice takes the other class as foreground); None: every class is
            foreground.
        alpha, gamma: focal's class balance and focusing exponent (sigmoid focal: 0.25, 2).
        smooth: the Dice terms' smoothing constant.
        ignore_index: label value to skip.
    """

    def __init__(
        self,
        kind: str = "log_inverse",
        num_classes: int = 2,
        frequencies: Sequence[float] | None = None,
        background: int | None = 0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        smooth: float = 1.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(ignore_index, None)
        if kind not in KINDS:
            raise ConfigError(f"loss imbalance: kind={kind!r} is not one of {KINDS}")
        if kind == "bce_dice" and num_classes != 2:
            raise ConfigError(f"loss imbalance: kind=bce_dice is for binary tasks, but data.num_classes={num_classes}")
        if background is not None and not 0 <= background < num_classes:
            raise ConfigError(f"loss imbalance: background={background} is not a class in [0, {num_classes})")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"loss imbalance: alpha={alpha} must lie in [0, 1]")
        self.kind, self.num_classes, self.background = kind, num_classes, background
        self.alpha, self.gamma, self.smooth = alpha, gamma, smooth
        # NaN until set: saved with the module, so an evaluation or a resume has them
        self.register_buffer("frequencies", torch.full((num_classes,), float("nan")))
        foreground = torch.ones(num_classes, dtype=torch.bool)
        if background is not None:
            foreground[background] = False
        self.register_buffer("foreground", foreground, persistent=False)
        if frequencies is not None:
            self.set_class_frequencies(frequencies)

    @property
    def needs_class_frequencies(self) -> bool:
        """Whether the kind weighs classes by frequency and the frequencies are not set yet."""
        return self.kind in WEIGHTED and bool(torch.isnan(self.frequencies).any())

    def set_class_frequencies(self, frequencies: Sequence[float] | Tensor) -> None:
        """Set the class pixel frequencies `[K]` (shares of the labeled pixels, summing to 1)."""
        f = torch.as_tensor(frequencies, dtype=torch.float32).flatten()
        if f.numel() != self.num_classes or bool((f < 0).any()) or not torch.isfinite(f).all():
            raise ConfigError(f"loss imbalance: frequencies must be {self.num_classes} shares >= 0, got {f.tolist()}")
        self.frequencies.copy_(f.to(self.frequencies.device))

    def class_weights_now(self) -> Tensor:
        """The kind's class weights `[K]` from the frequencies."""
        if self.needs_class_frequencies:
            raise RuntimeError(
                "ImbalanceLoss: the class frequencies are not set; the training module counts them on the "
                "labeled images when training starts, or give loss.imbalance.frequencies=[...]"
            )
        return imbalance_class_weights(self.kind, self.frequencies)

    def pixel_loss(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        logits = match_size(logits, target)
        if logits.shape[1] != self.num_classes:
            raise ConfigError(f"loss imbalance: the logits have {logits.shape[1]} classes, num_classes={self.num_classes}")
        valid = target != self.ignore_index
        safe = target.masked_fill(~valid, 0)
        if self.kind in WEIGHTED:
            w = self.class_weights_now().to(logits.device, torch.promote_types(logits.dtype, torch.float32))
            ce = F.cross_entropy(logits, safe, reduction="none")
            loss = weighted_mean(ce, w[safe] * valid, weight)
            if self.kind == "log_inverse":
                dice, present = soft_dice(logits, target, self.ignore_index, weight, self.smooth)
                loss = loss + weighted_mean(1 - dice, (present & self.foreground).to(dice.dtype))
            return loss
        if self.kind == "focal":
            logp = logits.log_softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
            alpha_t = torch.where(self.foreground[safe], self.alpha, 1.0 - self.alpha)
            focal = -alpha_t * (1 - logp.exp()) ** self.gamma * logp
            return weighted_mean(focal, valid.to(focal.dtype), weight)
        # bce_dice: the two-class softmax is the sigmoid of the logit difference, so its CE is the BCE
        fg = 1 if self.background in (0, None) else 0
        bce = weighted_mean(F.cross_entropy(logits, safe, reduction="none"), valid.to(logits.dtype), weight)
        dice, _ = soft_dice(logits, target, self.ignore_index, weight, self.smooth)
        return 0.5 * bce + 0.5 * (1 - dice[fg])
