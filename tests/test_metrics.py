"""Confusion-matrix metrics (dataset level and per image) against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcon.evaluation.metrics import ConfusionMatrix, confusion_matrix, scores, scores_of


def numpy_confusion(preds: list[np.ndarray], targets: list[np.ndarray], k: int, ignore: int) -> np.ndarray:
    """Pixel-by-pixel loop, the slow obvious way."""
    cm = np.zeros((k, k), np.int64)
    for p, t in zip(preds, targets, strict=True):
        for pv, tv in zip(p.ravel(), t.ravel(), strict=True):
            if tv != ignore:
                cm[tv, pv] += 1
    return cm


def numpy_miou(cm: np.ndarray) -> tuple[np.ndarray, float]:
    ious = []
    for c in range(cm.shape[0]):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c, :].sum() - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else np.nan)
    ious = np.array(ious)
    return ious, float(np.nanmean(ious))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_and_miou_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, ignore = 6, 255
    preds, targets = [], []
    for _ in range(3):
        t = rng.integers(0, k - 1, (7, 9))  # class k-1 never in the ground truth
        t[rng.random(t.shape) < 0.2] = ignore
        p = rng.integers(0, k - 2, (7, 9))  # classes k-2, k-1 never predicted
        preds.append(p)
        targets.append(t)
    metric = ConfusionMatrix(k, ignore)
    for p, t in zip(preds, targets, strict=True):
        metric.update(torch.from_numpy(p), torch.from_numpy(t))
    cm = metric.compute()["confusion"].numpy()
    ref = numpy_confusion(preds, targets, k, ignore)
    np.testing.assert_array_equal(cm, ref)

    s = scores(torch.from_numpy(cm))
    ref_iou, ref_miou = numpy_miou(ref)
    np.testing.assert_allclose(s.iou.numpy(), ref_iou, rtol=1e-6, equal_nan=True)
    assert math.isnan(float(s.iou[k - 1]))  # absent from ground truth and prediction: not averaged
    assert s.miou == pytest.approx(ref_miou, rel=1e-9)
    # per-class accuracy (the table's and CSV's "acc" column): recall TP / ground-truth pixels
    gt = ref.sum(1)
    ref_acc = np.where(gt > 0, np.diag(ref) / np.maximum(gt, 1), np.nan)
    np.testing.assert_allclose(s.acc.numpy(), ref_acc, rtol=1e-6, equal_nan=True)
    valid = sum((t != ignore).sum() for t in targets)
    correct = sum(((p == t) & (t != ignore)).sum() for p, t in zip(preds, targets, strict=True))
    assert s.pixel_acc == pytest.approx(correct / valid)


def test_a_class_predicted_but_absent_from_the_ground_truth_counts_with_iou_0() -> None:
    """mIoU averages the classes present in the ground truth *or* the prediction: a class only
    predicted (false positives, no ground truth) has IoU 0 and counts; a class in neither does
    not. Its accuracy (recall) is undefined, the others' is TP / ground-truth pixels."""
    t = torch.tensor([[0, 0, 0, 0, 1, 1]])
    p = torch.tensor([[0, 0, 0, 3, 1, 0]])  # class 3: predicted once, never in the ground truth; class 2: neither
    s = scores(confusion_matrix(p, t, 4, 255))
    # class 0: TP 3, FP 1, FN 1 -> 3/5; class 1: TP 1, FN 1 -> 1/2; class 3: FP 1 -> 0
    assert s.miou == pytest.approx((3 / 5 + 1 / 2 + 0) / 3)
    assert s.iou[3] == 0 and math.isnan(float(s.iou[2]))
    assert s.acc[0] == pytest.approx(3 / 4) and s.acc[1] == pytest.approx(1 / 2)
    assert math.isnan(float(s.acc[2])) and math.isnan(float(s.acc[3]))
    # precision TP / predicted pixels; F1 2 TP / (ground-truth + predicted pixels)
    assert s.precision.tolist()[:2] == pytest.approx([3 / 4, 1.0]) and s.precision[3] == 0
    assert s.f1.tolist()[:2] == pytest.approx([6 / 8, 2 / 3]) and s.f1[3] == 0
    assert math.isnan(float(s.precision[2])) and math.isnan(float(s.f1[2]))


def test_dataset_level_not_per_image_average() -> None:
    """Two images: per-image mIoU averaging would differ from the dataset-level value."""
    t1 = torch.tensor([[0, 0, 0, 1]])
    p1 = torch.tensor([[0, 0, 0, 0]])
    t2 = torch.tensor([[1, 1, 1, 1]])
    p2 = torch.tensor([[1, 1, 1, 1]])
    cm = confusion_matrix(p1, t1, 2, 255) + confusion_matrix(p2, t2, 2, 255)
    # dataset level: class 0 IoU 3/4, class 1 IoU 4/5 -> mean 0.775
    assert scores(cm).miou == pytest.approx((3 / 4 + 4 / 5) / 2)
    # per image (labelled image_*): image 1 has class 0 IoU 3/4, F1 6/7 and class 1 IoU 0, F1 0
    # (a missed class counts); image 2 has class 1 only (IoU 1, F1 1; class 0 is undefined there)
    for batched in (False, True):
        metric = ConfusionMatrix(2, 255)
        if batched:  # one batch, image 1 padded with ignore to image 2's size
            metric.update(torch.stack([torch.cat([p1, p1]), torch.cat([p2, p2])]),
                          torch.stack([torch.cat([t1, torch.full_like(t1, 255)]), torch.cat([t2, t2])]))
            t2_pixels = 8
        else:
            metric.update(p1[None], t1[None])
            metric.update(p2[None], t2[None])
            t2_pixels = 4
        s = scores_of(metric.compute())
        assert s.images == 2 and s.image_miou == pytest.approx(((3 / 4 + 0) / 2 + 1) / 2)
        assert s.image_iou.tolist() == pytest.approx([3 / 4, (0 + 1) / 2])
        assert s.image_f1.tolist() == pytest.approx([6 / 7, (0 + 1) / 2])
        assert int(s.gt_pixels[1]) == 1 + t2_pixels


def test_ignore_pixels_never_counted_and_other_ignore_values() -> None:
    t = torch.tensor([[0, -1, 1], [-1, 1, 0]])
    p = torch.tensor([[0, 1, 1], [0, 1, 1]])
    cm = confusion_matrix(p, t, 2, ignore_index=-1)
    assert int(cm.sum()) == 4
    assert cm.tolist() == [[1, 1], [0, 2]]


def test_out_of_range_target_is_an_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3, 255)
