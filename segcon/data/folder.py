"""The generic folder format: `images/<split>/<stem>.<ext>` and `masks/<split>/<stem>.png`.

Masks hold class indices 0..K-1 (and the ignore value). Binary masks stored as 0/255 — common
for cracks, roads, lesions — need `value_map: {255: 1}` (or `mask_threshold: 128`): without it
the value 255 is the ignore label and the foreground would silently vanish, so segcon warns when
the first masks of a split hold nothing but 0 and the ignore value.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from segcon.data.base import LabelMapping, Sample, SegDataset, list_files, read_mask
from segcon.utils.errors import ConfigError


class FolderDataset(SegDataset):
    """Images and masks in `images/<split>/` and `masks/<split>/`, paired by file stem.

    Args (besides SegDataset's):
        value_map: raw mask value -> train id, applied on top of the identity 0..K-1
            (e.g. {255: 1} for 0/255 binary masks).
        mask_threshold: binary masks: raw >= threshold -> class 1, else class 0.
        mask_suffix: suffix of mask files.
        recursive: also look in sub-folders of `images/<split>/`.
    """

    layout = "images/<split>/<stem>.<jpg|png|...> with masks/<split>/<stem>.png (class indices)"

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        value_map: Mapping[int, int] | None = None,
        mask_threshold: int | None = None,
        mask_suffix: str = ".png",
        recursive: bool = False,
        **kwargs,
    ) -> None:
        if isinstance(value_map, str):
            raise ConfigError(f"data.dataset.value_map={value_map!r} is settled from the masks of the train split "
                              f"before the dataset is built, and {Path(root).expanduser() / 'masks'} has none to read: "
                              "check data.root, or pass a mapping such as {255: 1}")
        if value_map and mask_threshold is not None:
            raise ConfigError(
                "data.dataset.value_map and data.dataset.mask_threshold are both set; "
                "use one of them (mask_threshold is for binary masks)."
            )
        self.value_map = {int(k): int(v) for k, v in (value_map or {}).items()}
        self.mask_threshold = mask_threshold
        self.mask_suffix = mask_suffix
        self.recursive = recursive
        super().__init__(root, split, **kwargs)
        for raw, train_id in self.value_map.items():
            if not (0 <= train_id < self.num_classes or train_id == self.ignore_index):
                raise ConfigError(
                    f"data.dataset.value_map maps {raw} -> {train_id}, which is neither a class "
                    f"in [0, {self.num_classes}) nor data.ignore_index={self.ignore_index}."
                )
        if self.labeled and not self.value_map and mask_threshold is None:
            self._warn_if_foreground_is_ignore()

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        return [root / "images" / split] + ([root / "masks" / split] if labeled else [])

    def _warn_if_foreground_is_ignore(self, probe: int = 4) -> None:
        """Warn when the first masks hold only 0 and the ignore value (a 0/255 binary layout)."""
        values: set[int] = set()
        for sample in self.samples[:probe]:
            if sample.mask is not None:
                values |= {int(v) for v in np.unique(read_mask(sample.mask))}
        if self.ignore_index in values and values <= {0, self.ignore_index}:
            warnings.warn(
                f"the first masks under {self.root / 'masks' / self.split} hold only the values 0 "
                f"and {self.ignore_index} (= data.ignore_index): if {self.ignore_index} marks the "
                "foreground of binary masks, set data.dataset.value_map={" + str(self.ignore_index)
                + ": 1} (or data.dataset.mask_threshold=128), otherwise it is ignored in training.",
                stacklevel=2,
            )

    def find_samples(self, split: str) -> list[Sample]:
        image_dir, mask_dir = self.root / "images" / split, self.root / "masks" / split
        samples = []
        for image in list_files(image_dir, recursive=self.recursive):
            rel = image.relative_to(image_dir).with_suffix("")
            samples.append(Sample(str(rel), image, mask_dir / f"{rel}{self.mask_suffix}"))
        return samples

    def label_mapping(self) -> LabelMapping:
        if self.mask_threshold is not None:
            t = int(self.mask_threshold)
            return LabelMapping({v: int(v >= t) for v in range(256)}, frozenset())
        classes = {v: v for v in range(self.num_classes)}
        ignore = {self.ignore_index} & set(range(256))
        for raw, train_id in self.value_map.items():
            ignore.discard(raw)
            if train_id == self.ignore_index:
                ignore.add(raw)
                classes.pop(raw, None)
            else:
                classes[raw] = train_id
        return LabelMapping(classes, frozenset(ignore))


def read_class_names(root: str | Path) -> list[str] | None:
    """Class names from `<root>/classes.txt` (one per line), or None if there is no such file."""
    path = Path(root).expanduser() / "classes.txt"
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
