"""Per-class IoU tables (console), metrics.json, per-class CSV files and report figures."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.table import Table

from segcon.evaluation.metrics import SegScores
from segcon.evaluation.visualize import confusion_figure, iou_bar_figure
from segcon.utils.io import atomic_write_json, atomic_write_text


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.2f}"


def iou_table(scores: SegScores, class_names: Sequence[str], title: str) -> Table:
    """A rich table: class, IoU, accuracy (recall), precision, F1, per-image IoU and F1, ground-
    truth and predicted pixels; mIoU, pixel accuracy and per-image mIoU in the footer."""
    table = Table(title=title, show_footer=True)
    table.add_column("class", footer="mean")
    table.add_column("IoU %", justify="right", footer=_pct(scores.miou))
    table.add_column("Acc %", justify="right", footer=f"pixel acc {_pct(scores.pixel_acc)}")
    table.add_column("Prec %", justify="right")
    table.add_column("F1 %", justify="right")
    table.add_column("img IoU %", justify="right", footer=f"img mIoU {_pct(scores.image_miou)}")
    table.add_column("img F1 %", justify="right")
    table.add_column("GT pixels", justify="right")
    table.add_column("pred pixels", justify="right")
    for k, name in enumerate(class_names):
        table.add_row(
            name,
            *(_pct(float(v[k])) for v in (scores.iou, scores.acc, scores.precision, scores.f1,
                                          scores.image_iou, scores.image_f1)),
            f"{int(scores.gt_pixels[k]):,}",
            f"{int(scores.pred_pixels[k]):,}",
        )
    return table


CSV_FIELDS = ["class", "iou", "acc", "precision", "f1", "image_iou", "image_f1", "gt_pixels", "pred_pixels"]
"""Per-class CSV columns: dataset-level IoU, accuracy (= recall), precision and F1; per-image IoU
and F1 averaged over the images where the class is in the ground truth or the prediction."""


def per_class_records(scores: SegScores, class_names: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "class": name,
            "iou": float(scores.iou[k]),
            "acc": float(scores.acc[k]),
            "precision": float(scores.precision[k]),
            "f1": float(scores.f1[k]),
            "image_iou": float(scores.image_iou[k]),
            "image_f1": float(scores.image_f1[k]),
            "gt_pixels": int(scores.gt_pixels[k]),
            "pred_pixels": int(scores.pred_pixels[k]),
        }
        for k, name in enumerate(class_names)
    ]


def detailed_scores(split: str, scores: SegScores, class_names: Sequence[str]) -> dict[str, Any]:
    """metrics.json's entries besides IoU: `<split>/precision`, `/recall`, `/F1` (dataset level,
    class name -> value), `<split>/image_IoU`, `/image_F1` (per image, averaged) and
    `<split>/image_mIoU`, `<split>/images`."""
    named = {"precision": scores.precision, "recall": scores.acc, "F1": scores.f1,
             "image_IoU": scores.image_iou, "image_F1": scores.image_f1}
    out: dict[str, Any] = {f"{split}/{key}": {c: float(v[k]) for k, c in enumerate(class_names)}
                           for key, v in named.items()}
    out[f"{split}/image_mIoU"] = scores.image_miou
    out[f"{split}/images"] = scores.images
    return out


def write_per_class_csv(path: Path, scores: SegScores, class_names: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in per_class_records(scores, class_names):
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def write_metrics(
    out_dir: Path,
    split: str,
    scores: SegScores,
    class_names: Sequence[str],
    extra: Mapping[str, Any],
) -> Path:
    """Write `<out_dir>/metrics.json` (merged with what is there) and `<split>_per_class.csv`.

    metrics.json keys: `<split>/mIoU`, `<split>/pixel_acc`, `<split>/IoU` (class name -> IoU),
    the `detailed_scores` (precision, recall, F1, per-image IoU / F1 / mIoU), plus everything in
    `extra` (best mIoU, checkpoint, wall time, ...).
    """
    path = out_dir / "metrics.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    data[f"{split}/mIoU"] = scores.miou
    data[f"{split}/pixel_acc"] = scores.pixel_acc
    data[f"{split}/IoU"] = {name: float(scores.iou[k]) for k, name in enumerate(class_names)}
    data.update(detailed_scores(split, scores, class_names))
    data.update(extra)
    atomic_write_json(path, data)
    write_per_class_csv(out_dir / f"{split}_per_class.csv", scores, class_names)
    return path


def write_figures(out_dir: Path, split: str, scores: SegScores, class_names: Sequence[str], label: str) -> dict[str, np.ndarray]:
    """Write `<split>_confusion.png` (the row-normalised confusion matrix) and `<split>_iou.png`
    (per-class IoU bars) to `out_dir`; return the RGB images by logger key (`<split>/confusion`,
    `<split>/iou`). `label` goes into the titles (e.g. the checkpoint and mode)."""
    images = {
        "confusion": confusion_figure(scores.confusion.numpy(), class_names, f"{split} confusion, row-normalised ({label})"),
        "iou": iou_bar_figure(scores.iou.tolist(), class_names, scores.miou, f"{split} per-class IoU ({label})"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        cv2.imwrite(str(out_dir / f"{split}_{name}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return {f"{split}/{name}": image for name, image in images.items()}
