"""`segcon-data check`: what a folder-layout dataset holds and the overrides it needs.

A newcomer's own data rarely matches a preset's: another class count, masks stored as 0/255, no
folder of unlabeled images. `check_folder` reads `<root>/images/<split>/` and
`<root>/masks/<split>/` as they are (every mask, before any value mapping) and works out the
splits, the mask values, whether the masks are binary 0/255, the classes and their pixel shares,
and the config overrides that make the data config agree with the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segcon.data.base import IMAGE_SUFFIXES, list_files, read_mask
from segcon.data.folder import read_class_names
from segcon.utils.errors import DataError

BINARY = {0: 0, 255: 1}
"""The mapping of binary masks stored as 0 (background) / 255 (foreground)."""


@dataclass
class SplitReport:
    """One folder of `images/`: its images, how many have a mask, and the raw mask values."""

    images: int
    masks: int
    values: list[int] = field(default_factory=list)


@dataclass
class FolderReport:
    """What `check_folder` found (see the module docstring).

    Attributes:
        splits: folder name -> its report, for every folder of `images/`.
        values: the raw values of every mask.
        binary: the masks hold 0 and 255 only (a binary foreground stored as 255).
        num_classes: the class count the masks imply (2 for binary masks; else the largest value
            other than the ignore value, plus one).
        class_names: from `classes.txt`, when present.
        pixel_shares: each class's share of the labeled pixels (after the binary mapping).
        overrides: the data overrides the files need against the given data config.
        problems: what no override fixes (images without masks in a labeled split, ...).
    """

    splits: dict[str, SplitReport]
    values: list[int]
    binary: bool
    num_classes: int
    class_names: list[str] | None
    pixel_shares: list[float]
    overrides: list[str]
    problems: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "splits": {k: v.__dict__ for k, v in self.splits.items()}}


def _mask_counts(path: Path) -> dict[int, int]:
    values, counts = np.unique(read_mask(path), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


def check_folder(root: str | Path, data: Mapping[str, Any], workers: int = 4) -> FolderReport:
    """Read the folder layout under `root` and compare it with the data config `data` (its
    `num_classes`, `ignore_index`, `splits`, `dataset.value_map` / `mask_threshold`)."""
    root = Path(root).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise DataError(f"{root} has no images/ folder: segcon-data check reads the folder layout "
                        "images/<split>/<stem>.<jpg|png|...> with masks/<split>/<stem>.png")
    ignore = int(data.get("ignore_index", 255))
    splits: dict[str, SplitReport] = {}
    counts: dict[int, int] = {}
    problems: list[str] = []
    configured = {k: v for k, v in (data.get("splits") or {}).items() if v}
    for folder in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        images = list_files(folder, IMAGE_SUFFIXES)
        masks = [masks_dir / folder.name / f"{p.stem}.png" for p in images]
        present = [m for m in masks if m.is_file()]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            per_mask = list(pool.map(_mask_counts, present))
        values: set[int] = set()
        for c in per_mask:
            values |= set(c)
            for v, n in c.items():
                counts[v] = counts.get(v, 0) + n
        splits[folder.name] = SplitReport(len(images), len(present), sorted(values))
        if present and len(present) < len(images):
            problems.append(f"images/{folder.name}: {len(images) - len(present)} of {len(images)} images have no "
                            f"mask in masks/{folder.name}/")
    all_values = sorted(counts)
    binary = bool(all_values) and set(all_values) <= {0, 255} and 255 in all_values
    mapping = BINARY if binary else {}
    classes = sorted({mapping.get(v, v) for v in all_values if binary or v != ignore})
    k = (max(classes) + 1) if classes else 0
    pixels = np.zeros(k, dtype=np.int64)
    for v, n in counts.items():
        c = mapping.get(v, v)
        if (binary or v != ignore) and c < k:
            pixels[c] += n
    shares = (pixels / max(int(pixels.sum()), 1)).round(6).tolist()
    names = read_class_names(root)
    overrides = _overrides(data, splits, binary, k, names, configured)
    if names is not None and len(names) != k:
        problems.append(f"classes.txt names {len(names)} classes, the masks hold {k}")
    return FolderReport(splits, all_values, binary, k, names, shares, overrides, problems)


def _overrides(data: Mapping[str, Any], splits: Mapping[str, SplitReport], binary: bool, k: int,
               names: list[str] | None, configured: Mapping[str, str]) -> list[str]:
    """The data overrides that make the config agree with what the files hold."""
    out: list[str] = []
    declared = data.get("num_classes")
    if k and declared != k:
        out.append(f"data.num_classes={k}")
    dataset = data.get("dataset") or {}
    value_map = dataset.get("value_map")
    if binary and not value_map and dataset.get("mask_threshold") is None:
        out.append('data.dataset.value_map="{255: 1}"')
    if not binary and value_map and value_map != "auto":  # auto settles itself from the masks
        out.append("data.dataset.value_map=null")
    class_names = data.get("class_names")
    if class_names is not None and len(class_names) != k and k:
        out.append(f"data.class_names={names}" if names and len(names) == k else "data.class_names=null")
    palette = data.get("palette")
    if palette is not None and len(palette) != k and k:
        out.append("data.palette=null")
    optional = set(data.get("optional_splits") or [])
    for logical, folder in configured.items():
        if folder not in splits and logical not in optional:  # an optional one is dropped by itself
            out.append(f"data.splits.{logical}=null")
    if "unlabeled" not in configured:
        image_only = [name for name, s in splits.items() if s.masks == 0 and name not in configured.values()]
        if image_only:
            out.append(f"data.splits.unlabeled={image_only[0]}")
    return out


def detect_value_map(root: str | Path, split: str, ignore_index: int, num_classes: int,
                     probe: int = 16) -> dict[int, int] | None:
    """`data.dataset.value_map: auto` of a folder dataset: {255: 1} when the first `probe` masks
    of `split` hold 0 and 255 only (binary masks stored as 0/255), None when they hold class
    indices (values in [0, K) and the ignore value); a DataError naming the values otherwise."""
    folder = Path(root).expanduser() / "masks" / split
    values: set[int] = set()
    for path in list_files(folder, (".png",))[:probe]:
        values |= set(_mask_counts(path))
    if not values:
        raise DataError(f"data.dataset.value_map=auto reads the masks of {folder}, and there are none")
    if values <= {0, 255} and 255 in values and num_classes == 2:
        return {255: 1}
    if all(0 <= v < num_classes or v == ignore_index for v in values):
        return None
    raise DataError(f"data.dataset.value_map=auto: the masks of {folder} hold the values {sorted(values)}, which "
                    f"are neither 0/255 binary masks nor class indices below data.num_classes={num_classes}; set "
                    "data.dataset.value_map={raw: class, ...} (segcon-data check shows the values)")
