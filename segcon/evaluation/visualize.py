"""Colour-coded masks, overlays, image | ground truth | prediction panels, and report figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

IGNORE_COLOUR = (255, 255, 255)


def colorize(mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """`[H, W]` class indices -> `[H, W, 3] uint8` RGB with the palette; ignore pixels white."""
    lut = np.zeros((len(palette) + 1, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[-1] = IGNORE_COLOUR
    idx = np.where((mask >= 0) & (mask < len(palette)), mask, len(palette))
    return lut[idx]


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised `[3, H, W]` tensor -> `[H, W, 3] uint8` RGB."""
    img = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    img = img * np.asarray(std) + np.asarray(mean)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def panel(
    image: np.ndarray,
    target: np.ndarray | None,
    pred: np.ndarray,
    palette: Sequence[Sequence[int]],
    ignore_index: int,
) -> np.ndarray:
    """One row `[H, 3W (or 2W), 3]`: image | ground truth (if any) | prediction blended on the image."""
    blend = overlay(image, pred, palette, ignore_index)
    parts = [image] + ([colorize(target, palette, ignore_index)] if target is not None else []) + [blend]
    return np.concatenate(parts, axis=1)


def overlay(
    image: np.ndarray, pred: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int, alpha: float = 0.5
) -> np.ndarray:
    """`[H, W, 3] uint8` RGB image with the colour-coded prediction `[H, W]` blended on top."""
    return ((1 - alpha) * image + alpha * colorize(pred, palette, ignore_index)).astype(np.uint8)


def default_palette(num_classes: int) -> list[list[int]]:
    """A fixed, well-spread palette for datasets that do not define one (Pascal VOC's bit trick)."""
    palette = []
    for i in range(num_classes):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


def _figure(width: float, height: float):
    # The object API with the Agg canvas, not pyplot: no global figure state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _label_size(num_classes: int) -> float:
    return max(3.0, min(9.0, 300.0 / max(num_classes, 1)))


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str) -> np.ndarray:
    """`[H, W, 3] uint8` RGB heat map of a `[K, K]` confusion matrix (rows = ground truth), each
    row normalised by its ground-truth pixels (the diagonal is per-class recall); rows without
    ground truth are left blank. Cells are annotated when K <= 25."""
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    side = min(24.0, max(5.0, 2.5 + 0.3 * k))
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(norm), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of the ground-truth row")
    size = _label_size(k)
    ax.set_xticks(range(k), [str(n) for n in class_names], rotation=90, fontsize=size)
    ax.set_yticks(range(k), [str(n) for n in class_names], fontsize=size)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if not math.isnan(norm[i, j]) and norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=size,
                            color="white" if norm[i, j] > 0.5 else "black")
    return _to_rgb(fig)


def iou_bar_figure(iou: Sequence[float], class_names: Sequence[str], miou: float, title: str) -> np.ndarray:
    """`[H, W, 3] uint8` RGB horizontal bar chart of per-class IoU (%) with the mIoU as a line;
    classes absent from ground truth and prediction (NaN) are marked n/a."""
    k = len(class_names)
    values = np.asarray(iou, dtype=np.float64) * 100
    fig = _figure(7.0, min(30.0, max(3.0, 1.0 + 0.25 * k)))
    ax = fig.add_subplot()
    ys = np.arange(k)
    ax.barh(ys, np.nan_to_num(values), color="#3b75af")
    size = _label_size(k)
    for y, v in zip(ys, values, strict=True):
        ax.text(0.5 if math.isnan(v) else v + 0.5, y, "n/a" if math.isnan(v) else f"{v:.1f}", va="center", fontsize=size)
    if not math.isnan(miou):
        ax.axvline(100 * miou, color="#d62728", linestyle="--", label=f"mIoU {100 * miou:.2f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(ys, [str(n) for n in class_names], fontsize=size)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("IoU %")
    ax.set_title(title)
    return _to_rgb(fig)
