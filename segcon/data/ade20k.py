"""ADE20K (SceneParsing, ADEChallengeData2016): 150 classes."""

from __future__ import annotations

from pathlib import Path

from segcon.data.base import LabelMapping, Sample, SegDataset, list_files

NUM_CLASSES = 150


class ADE20K(SegDataset):
    """`images/<split>/ADE_*.jpg` with `annotations/<split>/ADE_*.png` (split: training |
    validation).

    Masks hold 0 = "other" (ignored) and 1..150 -> train ids 0..149; 255 is ignored; any other
    value is invalid.
    """

    layout = (
        "images/<training|validation>/ADE_*.jpg with annotations/<training|validation>/ADE_*.png "
        "(0 other, 1..150 classes)"
    )
    fixed_num_classes = NUM_CLASSES

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        return [root / "images" / split, root / "annotations" / split]

    def find_samples(self, split: str) -> list[Sample]:
        masks = self.root / "annotations" / split
        return [
            Sample(image.stem, image, masks / f"{image.stem}.png")
            for image in list_files(self.root / "images" / split, (".jpg",))
        ]

    def label_mapping(self) -> LabelMapping:
        return LabelMapping({v: v - 1 for v in range(1, NUM_CLASSES + 1)}, frozenset({0, 255}))
