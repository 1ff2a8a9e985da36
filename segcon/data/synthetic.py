"""The embedded default dataset: procedural, class-imbalanced scenes written in the folder layout.

Five classes, drawn so that colour alone does not separate them (every region's colour is drawn
from the same distribution); texture and shape do:

    0 background  smooth low-frequency colour field with pixel noise and dark speckles
    1 field       a large polygon with sinusoidal stripes (random period and orientation)
    2 block       rotated rectangles with a checkerboard texture
    3 blob        small, flat, low-noise ellipses
    4 crack       thin curves 1-3 px wide, darker than what they cross (< 2 % of pixels)

Each image is a pure function of (seed, split, index), so the dataset is identical on every
machine. `ensure_synthetic` writes it once, atomically, to `images/<split>/` and `masks/<split>/`
plus `classes.txt` and a `synthetic.json` manifest; it is then read by `FolderDataset`, the same
loader as real data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from segcon.utils.errors import DataError

CLASS_NAMES = ("background", "field", "block", "blob", "crack")
VERSION = 1
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def render(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image `[size, size, 3] uint8` RGB and mask `[size, size] uint8` (0..4)."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros((h, w), np.uint8)

    def colour() -> np.ndarray:
        return rng.uniform(50, 205, 3).astype(np.float32)

    # 0: background — colour field + noise + dark speckles (so "dark" alone is not "crack").
    field = cv2.resize(rng.normal(0, 28, (4, 4, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img = colour() + field + rng.normal(0, 9, (h, w, 3)).astype(np.float32)
    for _ in range(rng.integers(4, 12)):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        cv2.circle(img, (int(cx), int(cy)), int(rng.integers(1, 3)), (20.0, 20.0, 20.0), -1)

    # 1: field — one large convex polygon with stripes.
    if rng.random() < 0.9:
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        r = rng.uniform(0.25, 0.45) * size
        angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 9)))
        radii = r * rng.uniform(0.7, 1.2, len(angles))
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [cv2.convexHull(pts)], 1)
        theta, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
        stripes = 30 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        tex = colour() + stripes[..., None] + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        img[m > 0] = tex[m > 0]
        mask[m > 0] = 1

    # 2: block — rotated rectangles with a checkerboard.
    for _ in range(rng.integers(1, 4)):
        rect = (
            (float(rng.uniform(0, w)), float(rng.uniform(0, h))),
            (float(rng.uniform(0.12, 0.3) * size), float(rng.uniform(0.12, 0.3) * size)),
            float(rng.uniform(0, 90)),
        )
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [cv2.boxPoints(rect).astype(np.int32)], 1)
        period = rng.uniform(6, 10)
        checker = 24 * np.sign(np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
        tex = colour() + checker[..., None] + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        img[m > 0] = tex[m > 0]
        mask[m > 0] = 2

    # 3: blob — small flat ellipses with almost no noise.
    for _ in range(rng.integers(2, 6)):
        m = np.zeros((h, w), np.uint8)
        axes = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.ellipse(m, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        tex = colour() + rng.normal(0, 2, (h, w, 3)).astype(np.float32)
        img[m > 0] = tex[m > 0]
        mask[m > 0] = 3

    # 4: crack — smooth random walks, 1-3 px wide, darkening whatever they cross.
    for _ in range(rng.integers(1, 3)):
        m = np.zeros((h, w), np.uint8)
        n = int(rng.integers(12, 24))
        heading = rng.uniform(0, 2 * np.pi)
        p = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        pts = [p.copy()]
        for _ in range(n):
            heading += rng.normal(0, 0.35)
            p = p + 3.0 * np.array([np.cos(heading), np.sin(heading)])
            pts.append(p.copy())
        line = np.array(pts, np.int32)
        width = int(rng.choice([1, 1, 2, 3]))
        # OpenCV's thickness t draws 2t-1 pixels wide: t=2 gives 3 px; 2 px is two offset 1-px lines.
        cv2.polylines(m, [line], False, 1, 2 if width == 3 else 1)
        if width == 2:
            direction = line[-1] - line[0]
            normal = np.array([-direction[1], direction[0]], np.float64)
            offset = np.round(normal / max(np.abs(normal).max(), 1)).astype(np.int32)
            cv2.polylines(m, [line + offset], False, 1, 1)
        img[m > 0] *= rng.uniform(0.35, 0.55)
        mask[m > 0] = 4

    img += rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), mask


PALETTE = ((0, 0, 0), (60, 180, 75), (0, 130, 200), (245, 130, 48), (230, 25, 75))


def ensure_synthetic(
    root: str | Path,
    num_train: int = 240,
    num_val: int = 60,
    num_test: int = 0,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Write the synthetic dataset to `root` unless it is already there; return `root`.

    The data are written into a temporary sibling directory and renamed into place, so an
    interrupted run never leaves a half-written dataset, and concurrent callers (several DDP
    processes) all end up reading one complete copy.

    Raises:
        DataError: `root` exists but holds something else, or a synthetic dataset made with
            other parameters.
    """
    root = Path(root).expanduser()
    params = {
        "version": VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "seed": seed,
    }
    manifest = root / "synthetic.json"
    if root.exists():
        if not manifest.is_file():
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            else:
                raise DataError(
                    f"data.root={root} exists but is not a segcon synthetic dataset (no "
                    "synthetic.json). Point data.root at an empty or new directory."
                )
        else:
            found = json.loads(manifest.read_text())
            if found != params:
                raise DataError(
                    f"{root} holds a synthetic dataset generated with {found}, but the config asks "
                    f"for {params}. Delete {root} or choose another data.root."
                )
            return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        counts = {"train": num_train, "val": num_val, "test": num_test}
        for split, count in counts.items():
            if count == 0:
                continue
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "masks" / split).mkdir(parents=True)
            for i in range(count):
                rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
                img, mask = render(rng, image_size)
                stem = f"{split}_{i:05d}"
                cv2.imwrite(str(tmp / "images" / split / f"{stem}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
                cv2.imwrite(str(tmp / "masks" / split / f"{stem}.png"), mask)
        (tmp / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
        (tmp / "synthetic.json").write_text(json.dumps(params, indent=2) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process renamed its complete copy into place first; use that one.
            if not manifest.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
