"""Cityscapes (fine annotations), read from the official `leftImg8bit/` + `gtFine/` layout."""

from __future__ import annotations

from pathlib import Path

from segcon.data.base import LabelMapping, Sample, SegDataset

NUM_CLASSES = 19
# labelIds of the 19 evaluated classes, in train-id order (cityscapesscripts' labels.py).
EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


class Cityscapes(SegDataset):
    """`leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png` with masks in `gtFine/<split>/<city>/`.

    The sample id is `<city>_<seq>_<frame>`. Masks are `<id>_gtFine_labelTrainIds.png` (0..18,
    255 ignore, other values invalid) when that file exists for *every* sample of the split —
    one label mapping serves a whole split, so a partly converted split must not mix encodings —
    otherwise `<id>_gtFine_labelIds.png` for all, with the 19 evaluated labelIds mapped to 0..18
    and every other id ignored.
    """

    layout = (
        "leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png with "
        "gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png "
        "(or _gtFine_labelIds.png)"
    )
    fixed_num_classes = NUM_CLASSES

    uses_train_ids: bool
    """True when this split's masks are the `*_gtFine_labelTrainIds.png` files (find_samples
    decides)."""

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        return [root / "leftImg8bit" / split, root / "gtFine" / split]

    def find_samples(self, split: str) -> list[Sample]:
        # Sorted paths are sorted ids: every file name starts with its city folder's name.
        images = sorted((self.root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        ids = [image.name.removesuffix("_leftImg8bit.png") for image in images]
        gt_dir = self.root / "gtFine" / split
        gt = [gt_dir / image.parent.name / i for image, i in zip(images, ids, strict=True)]
        train_ids = [Path(f"{p}_gtFine_labelTrainIds.png") for p in gt]
        self.uses_train_ids = all(p.is_file() for p in train_ids)
        masks = train_ids if self.uses_train_ids else [Path(f"{p}_gtFine_labelIds.png") for p in gt]
        return [Sample(*item) for item in zip(ids, images, masks, strict=True)]

    @classmethod
    def id_from_path(cls, path: str) -> str:
        """`leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png` -> `aachen_000000_000019`."""
        return Path(path).name.removesuffix(".png").removesuffix("_leftImg8bit")

    def label_mapping(self) -> LabelMapping:
        if self.uses_train_ids:
            return LabelMapping.identity(NUM_CLASSES)
        classes = {label_id: i for i, label_id in enumerate(EVAL_LABEL_IDS)}
        return LabelMapping(classes, frozenset(), default=self.ignore_index)
