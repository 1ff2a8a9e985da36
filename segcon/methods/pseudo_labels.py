"""The pseudo-label pipeline every teacher–student method uses (METHODS.md §0').

weak-view probabilities -> (distribution alignment) -> argmax -> confidence -> the confidence
filter's keep mask -> statistics -> CutMix together with the strong view -> `Targets` for the
pseudo-label loss and the contrastive terms. Low-confidence pixels keep their pseudo-label and
confidence; `keep` says which ones the filter trusts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from segcon.methods.mixing import cutmix_masks
from segcon.objectives.base import Targets
from segcon.utils.errors import ConfigError
from segcon.utils.maps import cutmix
from segcon.utils.static import class_counts

CONFIDENCE_MODES = ("threshold", "entropy")


@dataclass
class PseudoLabels:
    """Pseudo-labels of a batch of unlabeled views.

    Attributes:
        label: `[B, H, W]` long, the argmax class; `ignore_index` on crop padding.
        confidence: `[B, H, W]` the top probability.
        keep: `[B, H, W]` bool, the pixels the confidence filter trusts (never on padding).
        ignore_index: the label value of padding.
        boxes: `[B, H, W]` bool, the CutMix boxes these labels were mixed with (None: unmixed).
    """

    label: Tensor
    confidence: Tensor
    keep: Tensor
    ignore_index: int
    boxes: Tensor | None = None

    def targets(self) -> Targets:
        """As the `Targets` of unlabeled rows."""
        labeled = torch.zeros(self.label.shape[0], dtype=torch.bool, device=self.label.device)
        return Targets(self.label, self.ignore_index, self.confidence, self.keep, labeled, mix_boxes=self.boxes)

    def mixed(self, boxes: Tensor) -> PseudoLabels:
        """CutMixed with `boxes [B, H, W]` (the box content from the previous image of the batch,
        `roll(1)`), as the strong view is."""
        label, confidence, keep = (cutmix(boxes, t, t.roll(1, dims=0)) for t in (self.label, self.confidence, self.keep))
        return PseudoLabels(label, confidence, keep, self.ignore_index, boxes)


@dataclass(frozen=True)
class ConfidenceFilter:
    """Which pseudo-labels are trusted.

    mode "threshold" keeps pixels whose top probability reaches `threshold`; "entropy" drops the
    highest-entropy `drop_percent` % of the batch's valid pixels at the start of training,
    decaying linearly to 0 at the end (U²PL).
    """

    mode: str = "threshold"
    threshold: float = 0.95
    drop_percent: float = 20.0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> ConfidenceFilter:
        """From `method.confidence`, checked (errors name the key)."""
        node = dict(node or {})
        unknown = sorted(set(node) - {"mode", "threshold", "drop_percent"})
        if unknown:
            raise ConfigError(f"method.confidence has unknown key(s) {unknown}; it takes mode, threshold, drop_percent")
        f = cls(str(node.get("mode", "threshold")), float(node.get("threshold", 0.95)),
                float(node.get("drop_percent", 20.0)))
        if f.mode not in CONFIDENCE_MODES:
            raise ConfigError(f"method.confidence.mode must be one of {CONFIDENCE_MODES}, got {f.mode!r}")
        if not 0.0 <= f.threshold <= 1.0:
            raise ConfigError(f"method.confidence.threshold={f.threshold} must lie in [0, 1] (a probability)")
        if not 0.0 <= f.drop_percent <= 100.0:
            raise ConfigError(f"method.confidence.drop_percent={f.drop_percent} must lie in [0, 100]")
        return f

    def keep(self, probs: Tensor, confidence: Tensor, valid: Tensor, progress: float) -> Tensor:
        """Boolean `[B, H, W]`: the trusted pixels of `probs [B, K, H, W]` with top probability
        `confidence [B, H, W]` (never outside `valid`); `progress` in [0, 1] is the share of
        training done (entropy mode)."""
        if self.mode == "threshold":
            return (confidence >= self.threshold) & valid
        drop = self.drop_percent / 100.0 * max(0.0, 1.0 - progress)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).float()
        n = valid.sum()
        kept = n - torch.floor(drop * n.double()).long()  # the lowest-entropy `kept` valid pixels
        ordered = torch.where(valid, entropy, float("inf")).flatten().sort().values
        cutoff = ordered[(kept - 1).clamp_min(0)]  # the kept-th smallest: no read of the count
        return (entropy <= cutoff) & valid & (kept > 0)


def make_pseudo_labels(probs: Tensor, valid: Tensor, confidence: ConfidenceFilter, progress: float,
                       ignore_index: int) -> PseudoLabels:
    """Pseudo-labels from (already aligned) weak-view probabilities `[B, K, H, W]`."""
    top, label = probs.max(1)  # the indices are argmax's: the first maximum
    return PseudoLabels(label.masked_fill(~valid, ignore_index), top, confidence.keep(probs, top, valid, progress),
                        ignore_index)


def mix(strong: Tensor, pseudo: PseudoLabels, prob: float) -> tuple[Tensor, PseudoLabels]:
    """CutMix each strong view `[B, 3, H, W]` with the previous one of the batch (`roll(1)`), with probability
    `prob` per image, and its pseudo-labels with the same box, so they stay aligned."""
    if prob <= 0:
        return strong, pseudo
    boxes = cutmix_masks(strong.shape[0], tuple(strong.shape[-2:]), prob, device=strong.device)
    return cutmix(boxes, strong, strong.roll(1, dims=0)), pseudo.mixed(boxes)


def pseudo_label_stats(
    pseudo: PseudoLabels, valid: Tensor, gt: Tensor | None, ignore_index: int, class_names: Sequence[str]
) -> dict[str, Tensor]:
    """mask_ratio (confident share of the valid pixels), pl_share/<class> (each class's share of
    the confident pseudo-labels) and, with unlabeled ground truth `gt`, pseudo-label accuracy on
    the confident pixels (pl_acc) and on all valid ones (pl_acc_all), and pl_recall/<class> (share
    of the class's pixels that got a confident, correct pseudo-label: where rare classes vanish
    from self-training, this is what shows it). A ratio with an empty denominator in this step is
    left out rather than logged as 0, so early steps under a strict threshold do not drag the
    curves down. One device-to-host copy per call: methods call it on the steps whose logs
    Lightning writes (`SupervisedModule.logs_this_step`)."""
    label, keep = pseudo.label, pseudo.keep
    k = len(class_names)

    logs = {"mask_ratio": keep.sum() / valid.sum().clamp_min(1)}
    kept = keep & valid
    shares = class_counts(label, kept, k)
    denominators = [kept.sum().view(1)]
    if gt is not None:
        right = (label == gt) & (gt != ignore_index)
        scored = valid & (gt != ignore_index) & (gt >= 0) & (gt < k)
        confident = (keep & scored).sum()
        gt_counts = class_counts(gt, scored, k)
        hits = class_counts(gt, scored & right & keep, k)
        denominators += [confident.view(1), scored.sum().view(1), gt_counts]
    counts = torch.cat(denominators).tolist()
    if counts[0] > 0:
        logs.update({f"pl_share/{name}": shares[c] / counts[0] for c, name in enumerate(class_names)})
    if gt is not None:
        if counts[1] > 0:
            logs["pl_acc"] = (right & keep).sum() / confident
        if counts[2] > 0:  # images without masks (all-ignore ground truth) score nothing
            logs["pl_acc_all"] = (right & scored).sum() / counts[2]
        for c, (name, n) in enumerate(zip(class_names, counts[3:], strict=True)):
            if n > 0:
                logs[f"pl_recall/{name}"] = hits[c] / n
    return logs
