"""Segmentation metrics from confusion matrices.

mIoU is computed the way the field reports it (REFERENCE.md): one confusion matrix summed over
all pixels of all images on all ranks, per-class IoU = TP / (TP + FP + FN), then the mean over
the classes that appear in the ground truth or the prediction. Not per-image averaging, not
micro IoU. Pixels labelled `ignore_index` are excluded. Precision, recall and F1 per class come
from the same matrix.

Crack benchmarks also report per-image scores (the convention of Liu's crack code, METHODS.md
§3(g')), labelled `image_*`: each image's own confusion matrix gives its per-class IoU and F1
where the class is in its ground truth or prediction, and its mIoU over those classes; each is
averaged over the images where it is defined.
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
class ImageSums:
    """Per-image scores summed over images: `iou`, `f1` `[K]` (sums over the images where the
    class is in the ground truth or the prediction), `counts` `[K]` (how many such images),
    `miou` (sum of the images' mIoU) and `images` (images with a valid pixel)."""

    iou: Tensor
    f1: Tensor
    counts: Tensor
    miou: float
    images: int


def _nan_where(mask: Tensor, num: Tensor, den: Tensor) -> Tensor:
    return torch.where(mask, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


@dataclass(frozen=True)
class SegScores:
    """Scores of one confusion matrix. `iou`, `acc` (recall), `precision`, `f1` are `[K]`, NaN
    where undefined: a class absent from both ground truth and prediction (IoU, F1), from the
    ground truth (recall) or from the prediction (precision); `confusion` is the `[K, K]` matrix
    itself (rows = ground truth, columns = prediction). `image_iou`, `image_f1` `[K]`,
    `image_miou` and `images`: the per-image averages (see the module docstring; NaN / 0 when
    the scores were made without them)."""

    iou: Tensor
    acc: Tensor
    miou: float
    pixel_acc: float
    gt_pixels: Tensor
    pred_pixels: Tensor
    confusion: Tensor
    precision: Tensor
    f1: Tensor
    image_iou: Tensor
    image_f1: Tensor
    image_miou: float
    images: int


def scores(cm: Tensor, per_image: ImageSums | None = None) -> SegScores:
    """Per-class IoU, recall, precision and F1, mIoU and pixel accuracy from a `[K, K]` confusion
    matrix, and the per-image averages of `per_image`."""
    counts = cm.long().cpu()
    cm = cm.double().cpu()
    tp = cm.diag()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    iou = _nan_where(union > 0, tp, union)
    acc = _nan_where(gt > 0, tp, gt)
    precision = _nan_where(pred > 0, tp, pred)
    f1 = _nan_where(gt + pred > 0, 2 * tp, gt + pred)
    present = union > 0
    miou = float(iou[present].mean()) if present.any() else float("nan")
    total = float(cm.sum())
    pixel_acc = float(tp.sum() / total) if total > 0 else float("nan")
    k = cm.shape[0]
    if per_image is None:
        per_image = ImageSums(torch.zeros(k), torch.zeros(k), torch.zeros(k), float("nan"), 0)
    n = per_image.counts.double().cpu()
    image_iou = _nan_where(n > 0, per_image.iou.double().cpu(), n)
    image_f1 = _nan_where(n > 0, per_image.f1.double().cpu(), n)
    image_miou = per_image.miou / per_image.images if per_image.images else float("nan")
    return SegScores(iou.float(), acc.float(), miou, pixel_acc, gt.long(), pred.long(), counts,
                     precision.float(), f1.float(), image_iou.float(), image_f1.float(), image_miou, per_image.images)


def image_sums(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> ImageSums:
    """Per-image IoU / F1 of `pred`, `target` `[B, H, W]`, summed over the batch (see
    `ImageSums`)."""
    if target.dim() == 2:
        pred, target = pred[None], target[None]
    b, k = target.shape[0], num_classes
    valid = target != ignore_index
    index = torch.arange(b, device=target.device).view(b, 1, 1) * k * k + target.long() * k + pred.long()
    cms = torch.bincount(index[valid], minlength=b * k * k).reshape(b, k, k).double()
    tp = cms.diagonal(dim1=1, dim2=2)
    gt, pr = cms.sum(2), cms.sum(1)
    defined = gt + pr > 0
    iou = torch.where(defined, tp / (gt + pr - tp).clamp_min(1), 0.0)
    f1 = torch.where(defined, 2 * tp / (gt + pr).clamp_min(1), 0.0)
    has_pixels = defined.any(1)
    image_miou = iou.sum(1) / defined.sum(1).clamp_min(1)
    return ImageSums(iou.sum(0), f1.sum(0), defined.sum(0).double(), float(image_miou[has_pixels].sum()),
                     int(has_pixels.sum()))


class ConfusionMatrix(Metric):
    """Accumulates a `[K, K]` confusion matrix and the per-image sums; `compute()` returns both,
    summed over all ranks, as a dict (`confusion` and the `ImageSums` fields) that `scores_of`
    turns into SegScores.

    `update(pred [B, H, W] int, target [B, H, W] int)`.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state("mat", default=torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("image_iou", "image_f1", "image_counts"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("image_miou", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.mat += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        sums = image_sums(pred, target, self.num_classes, self.ignore_index)
        self.image_iou += sums.iou
        self.image_f1 += sums.f1
        self.image_counts += sums.counts
        self.image_miou += sums.miou
        self.images += sums.images

    def compute(self) -> dict[str, Tensor]:
        return {"confusion": self.mat, "iou": self.image_iou, "f1": self.image_f1, "counts": self.image_counts,
                "miou": self.image_miou, "images": self.images}


def scores_of(computed: dict[str, Tensor]) -> SegScores:
    """The SegScores of `ConfusionMatrix.compute()`'s output."""
    per_image = ImageSums(computed["iou"], computed["f1"], computed["counts"], float(computed["miou"]),
                          int(computed["images"]))
    return scores(computed["confusion"], per_image)
