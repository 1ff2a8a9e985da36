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

Static shapes (DESIGN.md "Speed on a GPU"): an image's targets are K slots, one per class, with a
`present` flag, so every cost and loss is one batched tensor program. The matching itself is
scipy's, on the host: the costs of every decoder layer and image go there in one copy (the one
host synchronisation of the term), and the assignment comes back in one upload.
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
from segcon.utils.static import arange, constant


@dataclass
class SlotTargets:
    """The region targets of a batch at the mask resolution in S fixed slots per image: slot s of
    image b is a mask `masks[b, s] [P]` (P = h·w pixels; True on its pixels) of class
    `classes[b, s]`, a target only where `present[b, s]`; `valid [B, P]` marks the pixels any cost
    or loss may count. Semantic targets have one slot per class (slot k is class k)."""

    present: Tensor
    masks: Tensor
    valid: Tensor
    classes: Tensor

    @classmethod
    def of(cls, labels: Tensor, valid: Tensor, num_classes: int, min_area: int = 1) -> SlotTargets:
        """From label maps `[B, h, w]` and their countable pixels `valid [B, h, w]`: class k is a
        target of an image when at least `min_area` of its valid pixels carry k."""
        flat, valid = labels.flatten(1), valid.flatten(1)
        classes = arange(num_classes, labels.device)
        masks = flat[:, None, :] == classes[None, :, None]
        present = (masks & valid[:, None, :]).sum(-1) >= min_area
        return cls(present, masks, valid, classes.expand(flat.shape[0], num_classes))


@dataclass
class Matching:
    """One decoder layer's matching: `query [B, S]`, the query matched to each slot (0 where
    `matched [B, S]` is False), `target_class [B, N]`, the class of each query's slot or K ("no
    object"), and `count`, the number of matched slots of the batch (known on the host)."""

    query: Tensor
    matched: Tensor
    target_class: Tensor
    count: int


def semantic_targets(labels: Tensor, ignore_index: int, size: tuple[int, int], num_classes: int) -> SlotTargets:
    """The slot targets of `labels [B, H, W]` (one per class present; ignore excluded), nearest-
    resized to `size`; a class whose pixels all vanish in the resize is not present."""
    small = labels if tuple(labels.shape[-2:]) == tuple(size) else F.interpolate(
        labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return SlotTargets.of(small, small != ignore_index, num_classes)


def _focal_terms(logits: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-pixel sigmoid focal loss of `logits` (any shape) if the pixel were positive / negative."""
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** gamma * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = (1 - alpha) * prob**gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return pos, neg


def mask_costs(logits: Tensor, targets: SlotTargets, alpha: float = 0.25, gamma: float = 2.0) -> tuple[Tensor, Tensor]:
    """Focal and dice costs `[B, N, S]` of every predicted mask `logits [B, N, P]` against every
    slot's mask, over the valid pixels: the mean focal loss, and `1 − (2 Σ p y + 1) / (Σ p + Σ y + 1)`."""
    v = targets.valid.to(logits.dtype)[:, None, :]  # [B, 1, P]
    y = targets.masks.to(logits.dtype) * v  # [B, S, P]
    pos, neg = _focal_terms(logits, alpha, gamma)
    focal = ((pos * v) @ y.transpose(1, 2) + (neg * v) @ (v - y).transpose(1, 2)) / v.sum(-1, keepdim=True).clamp_min(1)
    p = logits.sigmoid() * v
    dice = 1 - (2 * p @ y.transpose(1, 2) + 1) / (p.sum(-1)[:, :, None] + y.sum(-1)[:, None, :] + 1)
    return focal, dice


def hungarian(cost: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The assignment of least total cost of `cost [N, T]`: matched query and target indices
    `[min(N, T)]`, ordered by target (scipy's linear_sum_assignment on a float64 copy)."""
    cost = cost.detach().double().cpu().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    rows, cols = linear_sum_assignment(cost)
    order = np.argsort(cols)
    return rows[order], cols[order]


def match_on_host(costs: Tensor, targets: SlotTargets, num_classes: int, strict: bool = True) -> list[Matching]:
    """The least-cost matchings of `costs [L, B, N, S]` (L decoder layers) to the present slots
    of `targets`: one copy to the host for all of them, one upload back. An image with more
    present slots than queries is an error when `strict` (semantic targets: raise the query
    count); otherwise its N best-matching slots are matched and the rest left out."""
    layers, b, n, k = costs.shape
    host = torch.cat([costs.detach().flatten(), targets.present.flatten().to(costs.dtype),
                      targets.classes.flatten().to(costs.dtype)]).cpu().double().numpy()
    cost = host[:-2 * b * k].reshape(layers, b, n, k)
    flags, classes = host[-2 * b * k:-b * k].reshape(b, k) > 0, host[-b * k:].reshape(b, k).astype(np.int64)
    slots = [np.flatnonzero(f) for f in flags]
    if strict and max(s.size for s in slots) > n:
        raise ConfigError(f"an image holds {max(s.size for s in slots)} classes but the model has {n} queries: "
                          "raise model.num_queries")
    query = np.full((layers, b, k), -1, dtype=np.int64)
    target_class = np.full((layers, b, n), num_classes, dtype=np.int64)
    for layer in range(layers):
        for i, cols in enumerate(slots):
            if cols.size:
                rows, picked = hungarian(cost[layer, i][:, cols])
                query[layer, i, cols[picked]] = rows
                target_class[layer, i, rows] = classes[i, cols[picked]]
    upload = torch.from_numpy(np.concatenate([query, target_class], axis=-1))
    if costs.device.type == "cuda":
        upload = upload.pin_memory()
    upload = upload.to(costs.device, non_blocking=True)
    count = sum(min(s.size, n) for s in slots)
    return [Matching(u[:, :k].clamp_min(0), u[:, :k] >= 0, u[:, k:], count) for u in upload]


def mask_scores(output: SegOutput, who: str = "loss mask_set") -> tuple[Tensor, Tensor]:
    """The last decoder layer's class and mask scores, or a ConfigError naming `who` needs them."""
    if output.mask_cls is None or output.mask_logits is None:
        raise ConfigError(f"{who} reads a mask-classification head's outputs: use model=maskformer_*")
    return output.mask_cls, output.mask_logits


class SetCriterion(Term):
    """MaskFormer's set criterion on `SegOutput.mask_cls` / `mask_logits` and the earlier layers'
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

    reads: ClassVar[frozenset[str]] = frozenset(
        {"logits", "mask_cls", "mask_logits", "earlier_mask_cls", "earlier_mask_logits"})

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
        return mask_scores(output)[0].sum() * 0.0 + mask_scores(output)[1].sum() * 0.0

    def cost(self, mask_cls: Tensor, mask_logits: Tensor, targets: SlotTargets) -> Tensor:
        """The matching cost `[B, N, S]` of every query against every slot:
        `−cost_class · p_q[class of the slot] + cost_focal · focal + cost_dice · dice`."""
        c_class, c_focal, c_dice = self.costs
        with torch.no_grad(), torch.autocast(mask_cls.device.type, enabled=False):  # float16 costs overflow
            prob = at_least_float32(mask_cls).softmax(-1)
            prob = prob.gather(2, targets.classes[:, None, :].expand(-1, prob.shape[1], -1))
            focal, dice = mask_costs(at_least_float32(mask_logits.flatten(2)), targets, self.alpha, self.gamma)
            return -c_class * prob + c_focal * focal + c_dice * dice

    def match(self, layers: Sequence[tuple[Tensor, Tensor]], targets: SlotTargets, strict: bool = True) -> list[Matching]:
        """The matching of each decoder layer's `(mask_cls [B, N, K+1], mask_logits [B, N, h, w])`
        to the slots (one host round trip for all layers; `strict` as `match_on_host`'s)."""
        costs = torch.stack([self.cost(c, m, targets) for c, m in layers])
        return match_on_host(costs, targets, self.num_classes, strict)

    def layer_losses(
        self, mask_cls: Tensor, mask_logits: Tensor, targets: SlotTargets, matching: Matching,
        rows: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """CE, focal and dice (unweighted) of one decoder layer's `mask_cls [B, N, K+1]` and
        `mask_logits [B, N, h, w]` under `matching`: CE the class-weighted mean over the queries
        of the rows where `rows [B]` (default: all), focal and dice the sums over the matched slots
        divided by their number."""
        logits = mask_logits.flatten(2)
        chosen = logits.gather(1, matching.query[..., None].expand(-1, -1, logits.shape[-1]))  # [B, S, P]
        v = targets.valid.to(chosen.dtype)[:, None, :]
        y = targets.masks.to(chosen.dtype)
        pos, neg = _focal_terms(chosen, self.alpha, self.gamma)
        focal = ((pos * y + neg * (1 - y)) * v).sum(-1) / v.sum(-1).clamp_min(1)  # [B, S]
        p, yv = chosen.sigmoid() * v, y * v
        dice = 1 - (2 * (p * yv).sum(-1) + 1) / (p.sum(-1) + yv.sum(-1) + 1)
        matched = matching.matched.to(chosen.dtype)
        count = max(matching.count, 1)
        scores = at_least_float32(mask_cls.transpose(1, 2))
        class_weight = constant((1.0,) * self.num_classes + (self.no_object_weight,), scores.dtype, scores.device)
        if rows is None:
            ce = F.cross_entropy(scores, matching.target_class, weight=class_weight)
        else:  # the class-weighted mean over the queries of the chosen rows
            weight = class_weight[matching.target_class] * rows.to(scores.dtype)[:, None]
            nll = F.cross_entropy(scores, matching.target_class, reduction="none")
            ce = (weight * nll).sum() / weight.sum().clamp_min(torch.finfo(scores.dtype).tiny)
        return {"ce": ce, "focal": (focal * matched).sum() / count, "dice": (dice * matched).sum() / count}

    def forward(self, output: SegOutput, targets: Targets) -> dict[str, Tensor]:
        with torch.autocast(targets.labels.device.type, enabled=False):  # float16 sums over pixels overflow
            return self._forward(output, targets)

    def _forward(self, output: SegOutput, targets: Targets) -> dict[str, Tensor]:
        layers = [mask_scores(output)]
        if self.deep_supervision:
            layers += list(zip(output.earlier_mask_cls, output.earlier_mask_logits, strict=True))
        layers = [(at_least_float32(c), at_least_float32(m)) for c, m in layers]
        size = tuple(layers[0][1].shape[-2:])
        slots = semantic_targets(targets.reliable(), targets.ignore_index, size, self.num_classes)
        total = dict.fromkeys(("ce", "focal", "dice"), layers[0][0].sum() * 0.0)
        for (mask_cls, mask_logits), matching in zip(layers, self.match(layers, slots), strict=True):
            for key, value in self.layer_losses(mask_cls, mask_logits, slots, matching).items():
                total[key] = total[key] + value
        return {key: w * total[key] for key, w in zip(("ce", "focal", "dice"), self.weights, strict=True)}
