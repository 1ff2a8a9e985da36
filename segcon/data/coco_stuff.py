"""COCO-Stuff 164k: 171 classes (80 things + 91 stuff)."""

from __future__ import annotations

from pathlib import Path

from segcon.data.base import LabelMapping, Sample, SegDataset, list_files

NUM_CLASSES = 171
# Raw stuffthingmap ids (COCO category id - 1) that no annotation uses; the rest of 0..181 are
# the 171 classes, renumbered in order.
UNUSED_IDS = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})


class COCOStuff(SegDataset):
    """`images/<split>/<stem>.jpg` with masks in `annotations/<split>/` (split: train2017 |
    val2017).

    Masks are `<stem>_labelTrainIds.png` (0..170, 255 ignore, other values invalid) when that
    file exists for *every* sample of the split — one label mapping serves a whole split —
    otherwise the raw stuffthingmaps `<stem>.png` for all: ids 0..181 except the 11 unused ones
    renumber in order to 0..170, 255 and the unused ids are ignored, 182..254 are invalid.
    """

    layout = (
        "images/<train2017|val2017>/<stem>.jpg with annotations/<train2017|val2017>/"
        "<stem>_labelTrainIds.png (0..170) or the raw stuffthingmap <stem>.png (0..181)"
    )
    fixed_num_classes = NUM_CLASSES

    uses_train_ids: bool
    """True when this split's masks are the `*_labelTrainIds.png` files (find_samples decides)."""

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        return [root / "images" / split, root / "annotations" / split]

    def find_samples(self, split: str) -> list[Sample]:
        images = list_files(self.root / "images" / split, (".jpg",))
        masks = self.root / "annotations" / split
        train_ids = [masks / f"{image.stem}_labelTrainIds.png" for image in images]
        self.uses_train_ids = all(p.is_file() for p in train_ids)
        raw = [masks / f"{image.stem}.png" for image in images]
        chosen = train_ids if self.uses_train_ids else raw
        return [Sample(image.stem, image, mask) for image, mask in zip(images, chosen, strict=True)]

    def label_mapping(self) -> LabelMapping:
        if self.uses_train_ids:
            return LabelMapping.identity(NUM_CLASSES)
        used = [v for v in range(182) if v not in UNUSED_IDS]
        return LabelMapping({raw: i for i, raw in enumerate(used)}, UNUSED_IDS | {255})
