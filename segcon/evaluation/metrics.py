"""Dataset-level segmentation metrics from a confusion matrix.

mIoU is computed the way the field reports it (REFERENCE.md): one confusion matrix summed over
all pixels of all images on all ranks, per-class IoU = TP / (TP + FP + FN), then the mean over
the classes that appear in the ground truth or the prediction. Not per-image averaging, not
micro IoU. Pixels labelled `ignore_index` are excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """`[K, K]` int64 counts, rows = ground truth, columns = prediction, ignore pixels excluded."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target values outside [0, {num_classes}) that are not ignore_index={ignore_index}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class SegScores:
    """Scores of one confusion matrix. `iou`/`acc` are `[K]` with NaN for classes absent from both
    ground truth and prediction (IoU) or from the ground truth (accuracy); `confusion` is the
    `[K, K]` matrix itself (rows = ground truth, columns = prediction)."""

    iou: Tensor
    acc: Tensor
    miou: float
    pixel_acc: float
    gt_pixels: Tensor
    pred_pixels: Tensor
    confusion: Tensor


def scores(cm: Tensor) -> SegScores:
    """Per-class IoU and recall, mIoU and pixel accuracy from a `[K, K]` confusion matrix."""
    counts = cm.long().cpu()
    cm = cm.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
    present = union > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = float(cm.sum())
    pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
    return SegScores(iou.float(), acc.float(), miou, pixel_acc, gt.long(), pred.long(), counts)


class ConfusionMatrix(Metric):
    """Accumulates a `[K, K]` confusion matrix; `compute()` returns it summed over all ranks.

    `update(pred [B, H, W] int, target [B, H, W] int)`.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("mat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.mat += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> Tensor:
        return self.mat
