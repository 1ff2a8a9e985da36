"""MaskFormer's set criterion (`loss=mask_set`), written from its published definition
(METHODS.md §4(b)-(e)): per image, the semantic targets are one binary mask per class present;
Hungarian matching assigns them to queries by `class · (−p_q[c]) + focal · focal(m_q, M) + dice ·
dice(m_q, M)` (costs 1 / 20 / 1); the loss is a class-weighted CE over every query (unmatched ones
learn "no object", weight 0.1), plus sigmoid focal (20) and dice (1) on the matched masks, summed
over the last decoder layer and every earlier one (deep supervision).

Target masks are nearest-resized to the mask logits' resolution (1/4) for the costs and the
losses alike (MaskFormer resizes the predictions up for its loss instead; at 1/4 it is 16 times
cheaper). Ignore pixels (and crop padding) count in no mask cost or loss: MaskFormer counts them
as negatives of every mask. Mask losses are divided by the number of target masks of the batch
(per rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError


@dataclass
class ImageTargets:
    """One image's region targets at the mask resolution: `classes [T]`, binary `masks [T, P]`
    (P = h·w pixels) and `valid [P]` (pixels any loss may count)."""

    classes: Tensor
    masks: Tensor
    valid: Tensor


def semantic_targets(labels: Tensor, ignore_index: int, size: tuple[int, int]) -> list[ImageTargets]:
    """Per image of `labels [B, H, W]`: one mask per class present (ignore excluded), nearest-
    resized to `size`; a class whose pixels all vanish in the resize keeps no mask."""
    small = labels if tuple(labels.shape[-2:]) == tuple(size) else F.interpolate(
        labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    out = []
    for image in small.reshape(small.shape[0], -1):
        valid = image != ignore_index
        classes = image[valid].unique()
        masks = (image[None, :] == classes[:, None]).to(torch.float32)
        out.append(ImageTargets(classes, masks, valid))
    return out


def _focal_terms(logits: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-pixel sigmoid focal loss of `logits [N, P]` if the pixel were positive / negative."""
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = (1 - alpha) * prob**gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return pos, neg


def mask_costs(logits: Tensor, target: ImageTargets, alpha: float = 0.25, gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """Focal and dice costs `[N, T]` of every predicted mask `logits [N, P]` against every target
    mask, over the valid pixels: the mean focal loss, and `1 − (2 Σ p y + 1) / (Σ p + Σ y + 1)`."""
    v = target.valid.to(logits.dtype)
    y = target.masks.to(logits.dtype) * v
    pos, neg = _focal_terms(logits, alpha, gamma)
    focal = ((pos * v) @ y.T + (neg * v) @ ((1 - y) * v).T) / v.sum().clamp_min(1)
    p = logits.sigmoid() * v
    dice = 1 - (2 * p @ y.T + 1) / (p.sum(1)[:, None] + y.sum(1)[None, :] + 1)
    return focal, dice


def hungarian(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The assignment of least total cost of `cost [N, T]` (N >= T): matched query and target
    indices `[T]`, ordered by target (scipy's linear_sum_assignment on a float64 copy)."""
    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    order = np.argsort(cols)
    return (torch.as_tensor(rows[order], device=cost.device, dtype=torch.long),
            torch.as_tensor(cols[order], device=cost.device, dtype=torch.long))


class SetCriterion(Term):
    """MaskFormer's set criterion on `aux["mask_cls"]`, `aux["mask_logits"]` and `aux["aux_outputs"]`
    (see the module docstring); returns `{"ce", "focal", "dice"}` summed over the decoder layers.

    Args:
        num_classes: K (the class logits have K + 1 columns; the last is "no object").
        no_object_weight: the CE weight of "no object" (0.1).
        ce_weight, focal_weight, dice_weight: the loss weights (1, 20, 1).
        cost_class, cost_focal, cost_dice: the matching costs (1, 20, 1).
        focal_alpha, focal_gamma: the sigmoid focal loss's (0.25, 2).
        deep_supervision: also apply it to every earlier decoder layer's outputs.
        ignore_index: label value no mask counts.
    """

    reads: ClassVar[frozenset[str]] = frozenset({"logits", "aux"})

    def __init__(
        self,
        num_classes: int,
        no_object_weight: float = 0.1,
        ce_weight: float = 1.0,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        cost_class: float = 1.0,
        cost_focal: float = 20.0,
        cost_dice: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        deep_supervision: bool = True,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if min(no_object_weight, ce_weight, focal_weight, dice_weight, cost_class, cost_focal, cost_dice) < 0:
            raise ConfigError("loss mask_set: weights and costs must be >= 0")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.weights = (ce_weight, focal_weight, dice_weight)
        self.costs = (cost_class, cost_focal, cost_dice)
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.deep_supervision = deep_supervision
        self.no_object_weight = no_object_weight

    def zero(self, output: SegOutput) -> Tensor:
        return output.aux["mask_cls"].sum() * 0.0 + output.aux["mask_logits"].sum() * 0.0

    def match(self, mask_cls: Tensor, mask_logits: Tensor, targets: Sequence[ImageTargets]) -> list[tuple[Tensor, Tensor]]:
        """Per image: matched (query indices, target indices) of least total cost."""
        c_class, c_focal, c_dice = self.costs
        matches = []
        with torch.no_grad(), torch.autocast(mask_cls.device.type, enabled=False):  # float16 costs overflow
            for cls, masks, target in zip(mask_cls, mask_logits, targets, strict=True):
                if target.classes.numel() == 0:
                    empty = torch.zeros(0, dtype=torch.long, device=cls.device)
                    matches.append((empty, empty))
                    continue
                if target.classes.numel() > cls.shape[0]:
                    raise ConfigError(f"an image holds {target.classes.numel()} classes but the model has "
                                      f"{cls.shape[0]} queries: raise model.num_queries")
                prob = at_least_float32(cls).softmax(-1)[:, target.classes]
                focal, dice = mask_costs(at_least_float32(masks.flatten(1)), target, self.alpha, self.gamma)
                matches.append(hungarian(-c_class * prob + c_focal * focal + c_dice * dice))
        return matches

    def layer_losses(
        self,
        mask_cls: Tensor,
        mask_logits: Tensor,
        targets: Sequence[ImageTargets],
        matches: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """CE, focal and dice (unweighted) of one decoder layer's `mask_cls [B, N, K+1]` and
        `mask_logits [B, N, h, w]` (matched here unless `matches` are given)."""
        matches = self.match(mask_cls, mask_logits, targets) if matches is None else matches
        b, n = mask_cls.shape[:2]
        target_classes = torch.full((b, n), self.num_classes, dtype=torch.long, device=mask_cls.device)
        focal = dice = mask_logits.sum() * 0.0
        count = 0
        for i, ((queries, tgt), target) in enumerate(zip(matches, targets, strict=True)):
            if queries.numel() == 0:
                continue
            target_classes[i, queries] = target.classes[tgt]
            logits = mask_logits[i].flatten(1)[queries]  # [T, P]
            y = target.masks[tgt].to(logits.dtype)
            v = target.valid.to(logits.dtype)
            pos, neg = _focal_terms(logits, self.alpha, self.gamma)
            per_pixel = (pos * y + neg * (1 - y)) * v
            focal = focal + (per_pixel.sum(1) / v.sum().clamp_min(1)).sum()
            p, yv = logits.sigmoid() * v, y * v
            dice = dice + (1 - (2 * (p * yv).sum(1) + 1) / (p.sum(1) + yv.sum(1) + 1)).sum()
            count += queries.numel()
        logits = at_least_float32(mask_cls.transpose(1, 2))
        class_weight = torch.ones(self.num_classes + 1, dtype=logits.dtype, device=logits.device)
        class_weight[-1] = self.no_object_weight
        ce = F.cross_entropy(logits, target_classes, weight=class_weight)
        return {"ce": ce, "focal": focal / max(count, 1), "dice": dice / max(count, 1)}

    def forward(self, output: SegOutput, targets: Targets) -> dict[str, Tensor]:
        with torch.autocast(targets.labels.device.type, enabled=False):  # float16 sums over pixels overflow
            return self._forward(output, targets)

    def _forward(self, output: SegOutput, targets: Targets) -> dict[str, Tensor]:
        if "mask_cls" not in output.aux:
            raise ConfigError("loss mask_set reads a mask-classification head's outputs: use model=maskformer_*")
        layers = [(output.aux["mask_cls"], output.aux["mask_logits"])]
        if self.deep_supervision:
            layers += [(a["mask_cls"], a["mask_logits"]) for a in output.aux.get("aux_outputs", [])]
        layers = [(at_least_float32(c), at_least_float32(m)) for c, m in layers]
        size = tuple(output.aux["mask_logits"].shape[-2:])
        image_targets = semantic_targets(targets.reliable(), targets.ignore_index, size)
        total = dict.fromkeys(("ce", "focal", "dice"), output.aux["mask_cls"].sum() * 0.0)
        for mask_cls, mask_logits in layers:
            for key, value in self.layer_losses(mask_cls, mask_logits, image_targets).items():
                total[key] = total[key] + value
        return {key: w * total[key] for key, w in zip(("ce", "focal", "dice"), self.weights, strict=True)}
