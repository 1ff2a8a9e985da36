"""CamVid, 11 classes, in SegNet's layout (367 train / 101 val / 233 test images)."""

from __future__ import annotations

from pathlib import Path

from segcon.data.base import LabelMapping, Sample, SegDataset, list_files

NUM_CLASSES = 11
VOID = 11


class CamVid(SegDataset):
    """`<split>/<name>.png` with `<split>annot/<name>.png` (split: train | val | test).

    Masks hold 0..10 (the classes), 11 = void -> ignore, 255 -> ignore; any other value is
    invalid.
    """

    layout = "<split>/<name>.png with <split>annot/<name>.png (0..10 classes, 11 void)"
    fixed_num_classes = NUM_CLASSES

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        return [root / split, root / f"{split}annot"]

    def find_samples(self, split: str) -> list[Sample]:
        masks = self.root / f"{split}annot"
        return [
            Sample(image.stem, image, masks / image.name)
            for image in list_files(self.root / split, (".png",))
        ]

    def label_mapping(self) -> LabelMapping:
        return LabelMapping.identity(NUM_CLASSES, (VOID, 255))
