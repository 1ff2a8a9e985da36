"""The embedded synthetic dataset: deterministic, imbalanced, thin cracks, written atomically."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from segcon.data.folder import FolderDataset
from segcon.data.synthetic import CLASS_NAMES, ensure_synthetic, render
from segcon.utils.errors import DataError


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).tobytes() if p.suffix == ".png" else p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_dataset_other_seed_other(tmp_path: Path) -> None:
    a = ensure_synthetic(tmp_path / "a", num_train=6, num_val=2, image_size=64, seed=3)
    b = ensure_synthetic(tmp_path / "b", num_train=6, num_val=2, image_size=64, seed=3)
    c = ensure_synthetic(tmp_path / "c", num_train=6, num_val=2, image_size=64, seed=4)
    assert _tree_hash(a) == _tree_hash(b)
    assert _tree_hash(a) != _tree_hash(c)
    assert (a / "classes.txt").read_text().split() == list(CLASS_NAMES)


def test_class_statistics_imbalanced_with_thin_cracks() -> None:
    counts = np.zeros(len(CLASS_NAMES), np.int64)
    for i in range(60):
        _, mask = render(np.random.default_rng([0, 0, i]), 128)
        counts += np.bincount(mask.ravel(), minlength=len(CLASS_NAMES))
    frac = counts / counts.sum()
    assert len(CLASS_NAMES) >= 5 and (counts > 0).all()
    assert frac[4] < 0.02  # cracks cover under 2 % of pixels
    assert frac[0] > 0.5 and frac.max() / frac.min() > 30  # strong imbalance


def _run_lengths(line: np.ndarray) -> np.ndarray:
    """For a 1-D 0/1 array, the length of the run of ones each element belongs to (0 outside)."""
    out = np.zeros(len(line), np.int64)
    i = 0
    while i < len(line):
        if line[i]:
            j = i
            while j < len(line) and line[j]:
                j += 1
            out[i:j] = j - i
            i = j
        else:
            i += 1
    return out


def _local_thickness(mask: np.ndarray) -> np.ndarray:
    """Per foreground pixel: the shortest run through it over the 4 directions (0, 90, +-45
    degrees; diagonal runs count sqrt(2) per pixel) -- about the stroke width for thin lines."""
    h, w = mask.shape
    runs = np.full((4, h, w), np.inf)
    for y in range(h):
        runs[0, y] = _run_lengths(mask[y])
    for x in range(w):
        runs[1, :, x] = _run_lengths(mask[:, x])
    for d, m in ((2, mask), (3, mask[:, ::-1])):
        diag = np.full((h, w), np.inf)
        for off in range(-h + 1, w):
            ys = np.arange(max(0, -off), min(h, w - off))
            diag[ys, ys + off] = _run_lengths(m[ys, ys + off]) * np.sqrt(2)
        runs[d] = diag if d == 2 else diag[:, ::-1]
    return runs.min(0)[mask > 0]


def test_cracks_are_one_to_three_pixels_wide() -> None:
    widths = []
    for i in range(20):
        _, mask = render(np.random.default_rng([0, 0, i]), 128)
        crack = (mask == 4).astype(np.uint8)
        if crack.sum():
            widths.append(float(np.median(_local_thickness(crack))))
    assert len(widths) >= 15
    assert min(widths) >= 1.0 and max(widths) <= 3.5, widths


def test_colour_alone_does_not_separate_classes() -> None:
    """Mean colours of all classes span overlapping ranges (every region's colour is random)."""
    per_class: dict[int, list[np.ndarray]] = {c: [] for c in range(5)}
    for i in range(40):
        img, mask = render(np.random.default_rng([0, 0, i]), 96)
        for c in range(5):
            if (mask == c).sum() > 20:
                per_class[c].append(img[mask == c].mean(0))
    lo = {c: np.min(v, 0) for c, v in per_class.items()}
    hi = {c: np.max(v, 0) for c, v in per_class.items()}
    for c in (1, 2, 3):  # textured/flat regions against the background, channel by channel
        assert (np.minimum(hi[c], hi[0]) - np.maximum(lo[c], lo[0]) > 40).all()


def test_read_back_through_the_folder_loader(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path / "s", num_train=3, num_val=2, image_size=64)
    ds = FolderDataset(root, "val", num_classes=5, ignore_index=255)
    assert len(ds) == 2
    img, mask = ds.load(0)
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64) and set(np.unique(mask)) <= set(range(5))


def test_existing_dataset_with_other_parameters_is_refused_and_kept(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path / "s", num_train=3, num_val=1, image_size=32)
    before = _tree_hash(root)
    with pytest.raises(DataError, match="Delete"):
        ensure_synthetic(root, num_train=4, num_val=1, image_size=32)
    assert _tree_hash(root) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("user data")
    with pytest.raises(DataError, match="not a segcon synthetic dataset"):
        ensure_synthetic(tmp_path / "other", num_train=1, num_val=1, image_size=32)
    assert (tmp_path / "other" / "x.txt").read_text() == "user data"


def test_concurrent_writers_leave_one_complete_copy(tmp_path: Path) -> None:
    root = tmp_path / "race"
    code = (
        "import sys; from segcon.data.synthetic import ensure_synthetic; "
        "ensure_synthetic(sys.argv[1], num_train=20, num_val=5, image_size=64)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)]) for _ in range(3)]
    assert all(p.wait() == 0 for p in procs)
    assert len(list((root / "images" / "train").glob("*.png"))) == 20
    assert json.loads((root / "synthetic.json").read_text())["num_train"] == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".race.tmp")]
