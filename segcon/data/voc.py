"""PASCAL VOC 2012 and its SBD-augmented training set ("VOC aug"), read from `VOCdevkit/VOC2012`."""

from __future__ import annotations

from pathlib import Path

from segcon.data.base import LabelMapping, Sample, SegDataset, list_files, read_id_list

NUM_CLASSES = 21
TRAIN_AUG = "train_aug"


class VOC(SegDataset):
    """`JPEGImages/<id>.jpg` with `SegmentationClass/<id>.png`, ids from
    `ImageSets/Segmentation/<split>.txt` (split: train | val | trainval).

    Masks are palette PNGs: their *indices* are the labels (0 background, 1..20 objects, 255
    object borders -> ignore); any other index is invalid.
    """

    layout = (
        "JPEGImages/<id>.jpg with SegmentationClass/<id>.png (palette PNG, indices 0..20, "
        "255 ignore) and ids in ImageSets/Segmentation/<split>.txt"
    )
    fixed_num_classes = NUM_CLASSES
    mask_dir = "SegmentationClass"
    list_dir = "ImageSets/Segmentation"

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        return [root / "JPEGImages", root / cls.mask_dir, root / cls.list_dir / f"{split}.txt"]

    def split_ids(self, split: str) -> list[str]:
        """The sample ids of `split`."""
        return read_id_list(self.root / self.list_dir / f"{split}.txt")

    def mask_path(self, sample_id: str) -> Path:
        return self.root / self.mask_dir / f"{sample_id}.png"

    def find_samples(self, split: str) -> list[Sample]:
        return [
            Sample(i, self.root / "JPEGImages" / f"{i}.jpg", self.mask_path(i))
            for i in sorted(self.split_ids(split))
        ]

    def label_mapping(self) -> LabelMapping:
        return LabelMapping.identity(NUM_CLASSES)


class VOCAug(VOC):
    """VOC 2012 images with the SBD-augmented masks `SegmentationClassAug/<id>.png` (grayscale
    indices, same label rule as VOC).

    Split `train_aug`: the ids of `ImageSets/Segmentation/train_aug.txt` if that file exists,
    else every mask stem in `SegmentationClassAug/` that is not a VOC val id (the standard
    10,582). Any other split (`val`: the 1,449 VOC val ids) is read from
    `ImageSets/Segmentation/<split>.txt`. A sample's mask is `SegmentationClassAug/<id>.png`, or
    `SegmentationClass/<id>.png` where the augmented set lacks that id.
    """

    layout = (
        "JPEGImages/<id>.jpg with SegmentationClassAug/<id>.png (indices 0..20, 255 ignore); "
        "split train_aug = ImageSets/Segmentation/train_aug.txt, or all SegmentationClassAug "
        "stems minus ImageSets/Segmentation/val.txt; other splits from "
        "ImageSets/Segmentation/<split>.txt"
    )
    mask_dir = "SegmentationClassAug"

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        lists = root / cls.list_dir
        split_list = lists / f"{split}.txt"
        if split == TRAIN_AUG and not split_list.is_file():
            split_list = lists / "val.txt"  # train_aug is then derived by excluding val
        return [root / "JPEGImages", root / cls.mask_dir, split_list]

    def split_ids(self, split: str) -> list[str]:
        lists = self.root / self.list_dir
        if split != TRAIN_AUG or (lists / f"{split}.txt").is_file():
            return super().split_ids(split)
        val = set(read_id_list(lists / "val.txt"))
        aug = list_files(self.root / self.mask_dir, (".png",))
        return [p.stem for p in aug if p.stem not in val]

    def mask_path(self, sample_id: str) -> Path:
        aug = super().mask_path(sample_id)
        voc = self.root / VOC.mask_dir / f"{sample_id}.png"
        return aug if aug.is_file() or not voc.is_file() else voc
