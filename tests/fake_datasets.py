"""Tiny fake copies of real dataset layouts, with the per-class pixel counts a reader must find.

Each `make_*` writes a few small images (a different size each) and masks into `root` in the
dataset's real on-disk layout and returns an `Expected`: per split, the sorted sample ids, the
pixel count of every train id and the number of ignored pixels. Those numbers come from the raw
values drawn here, mapped with the label tables written out by hand below — never from segcon's
own label-mapping code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

IGNORE = None
"""Table entry for a raw value that must become the ignore index."""

Table = Mapping[int, int | None]

# Raw value -> train id, for the raw values the fakes draw (by hand, from REFERENCE.md).
CITYSCAPES_LABEL_IDS: Table = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
    # unlabeled, ego vehicle, ..., ground, parking, guard rail, bridge, tunnel, polegroup,
    # caravan, trailer: not evaluated.
    0: IGNORE, 1: IGNORE, 4: IGNORE, 6: IGNORE, 9: IGNORE, 10: IGNORE, 14: IGNORE, 15: IGNORE,
    16: IGNORE, 18: IGNORE, 29: IGNORE, 30: IGNORE,
}
VOC_INDICES: Table = {**{v: v for v in range(21)}, 255: IGNORE}
ADE20K_LABELS: Table = {
    0: IGNORE, 1: 0, 2: 1, 3: 2, 50: 49, 100: 99, 149: 148, 150: 149, 255: IGNORE,
}
CONTEXT_LABELS: Table = {0: IGNORE, 1: 0, 2: 1, 30: 29, 58: 57, 59: 58, 255: IGNORE}
# Raw stuffthingmap id -> train id: minus the number of unused ids (11, 25, 28, 29, 44, 65, 67,
# 68, 70, 82, 90) below it; unused ids and 255 are ignored.
COCO_STUFF_RAW: Table = {
    0: 0, 10: 10, 12: 11, 24: 23, 26: 24, 27: 25, 30: 26, 45: 40, 66: 60, 69: 61, 71: 62,
    91: 80, 181: 170, 11: IGNORE, 25: IGNORE, 90: IGNORE, 255: IGNORE,
}
CAMVID_LABELS: Table = {**{v: v for v in range(11)}, 11: IGNORE, 255: IGNORE}

# The VOC colour map (the palette stored in VOC's SegmentationClass PNGs), 21 colours + border.
VOC_PALETTE = [
    0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128, 0, 128, 128,
    128, 128, 128, 64, 0, 0, 192, 0, 0, 64, 128, 0, 192, 128, 0, 64, 0, 128, 192, 0, 128,
    64, 128, 128, 192, 128, 128, 0, 64, 0, 128, 64, 0, 0, 192, 0, 128, 192, 0, 0, 64, 128,
]
VOC_PALETTE += [0, 0, 0] * (255 - len(VOC_PALETTE) // 3) + [224, 224, 192]


@dataclass
class Expected:
    """What a reader must return for each split of a fake dataset."""

    num_classes: int
    ids: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    """split -> `[num_classes]` pixel count per train id."""
    ignore: dict[str, int] = field(default_factory=dict)
    """split -> number of pixels that map to the ignore index."""

    def add(self, split: str, sample_id: str, raw: np.ndarray, table: Table) -> None:
        """Count the mapped pixels of one sample's raw mask."""
        counts = self.counts.setdefault(split, np.zeros(self.num_classes, np.int64))
        self.ignore.setdefault(split, 0)
        self.ids.setdefault(split, []).append(sample_id)
        for value, n in zip(*np.unique(raw, return_counts=True), strict=True):
            train_id = table[int(value)]
            if train_id is IGNORE:
                self.ignore[split] += int(n)
            else:
                counts[train_id] += int(n)

    def sort_ids(self) -> Expected:
        for ids in self.ids.values():
            ids.sort()
        return self


class _Drawer:
    """Draws images of a different size each time, and masks from a set of raw values."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def size(self) -> tuple[int, int]:
        self.n += 1
        return 20 + 2 * self.n, 28 + 3 * self.n

    def image(self, path: Path, size: tuple[int, int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), self.rng.integers(0, 256, (*size, 3), dtype=np.uint8))

    def mask(self, size: tuple[int, int], values: Table) -> np.ndarray:
        return self.rng.choice(np.array(sorted(values), np.uint8), size)

    def pair(self, image: Path, values: Table) -> np.ndarray:
        """Write a random image to `image` and return a raw mask of the same size."""
        size = self.size()
        self.image(image, size)
        return self.mask(size, values)


def write_mask(path: Path, raw: np.ndarray, palette: list[int] | None = None) -> None:
    """An 8-bit grayscale PNG, or a palette ("P") PNG when `palette` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = np.ascontiguousarray(raw, np.uint8)
    if palette is None:
        Image.fromarray(raw).save(path)
        return
    im = Image.frombytes("P", raw.shape[::-1], raw.tobytes())
    im.putpalette(palette)
    im.save(path)


def to_train_ids(raw: np.ndarray, table: Table) -> np.ndarray:
    """A `*_labelTrainIds.png` payload: raw values mapped by `table`, ignore written as 255."""
    out = np.full(raw.shape, 255, np.uint8)
    for value, train_id in table.items():
        if train_id is not IGNORE:
            out[raw == value] = train_id
    return out


def write_id_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def make_cityscapes(root: Path, with_train_ids: bool, seed: int = 0) -> Expected:
    """Cityscapes: train has cities aachen (2 frames) and bochum (1), val has frankfurt (2).

    Every sample has a `_gtFine_labelIds.png`; `with_train_ids` adds the matching
    `_gtFine_labelTrainIds.png` files, whose counts after mapping are the same.
    """
    draw, expected = _Drawer(seed), Expected(19)
    cities = {"train": [("aachen", 2), ("bochum", 1)], "val": [("frankfurt", 2)]}
    for split, city_frames in cities.items():
        for city, frames in city_frames:
            for frame in range(frames):
                stem = f"{city}_{frame:06d}_{19 + frame:06d}"
                image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                raw = draw.pair(image, CITYSCAPES_LABEL_IDS)
                gt = root / "gtFine" / split / city / stem
                write_mask(Path(f"{gt}_gtFine_labelIds.png"), raw)
                if with_train_ids:
                    train_ids = to_train_ids(raw, CITYSCAPES_LABEL_IDS)
                    write_mask(Path(f"{gt}_gtFine_labelTrainIds.png"), train_ids)
                expected.add(split, stem, raw, CITYSCAPES_LABEL_IDS)
    return expected.sort_ids()


VOC_SPLITS = {
    "train": ["2007_000032", "2007_000039", "2008_000008"],
    "val": ["2007_000033", "2009_000001"],
}


def make_voc(root: Path, seed: int = 0) -> Expected:
    """VOC 2012: palette-PNG masks for 3 train + 2 val ids, plus a JPEG that no list names."""
    draw, expected = _Drawer(seed), Expected(21)
    for split, ids in VOC_SPLITS.items():
        write_id_list(root / "ImageSets" / "Segmentation" / f"{split}.txt", ids)
        for i in ids:
            raw = draw.pair(root / "JPEGImages" / f"{i}.jpg", VOC_INDICES)
            write_mask(root / "SegmentationClass" / f"{i}.png", raw, VOC_PALETTE)
            expected.add(split, i, raw, VOC_INDICES)
    draw.image(root / "JPEGImages" / "2007_000027.jpg", draw.size())  # detection-only image
    return expected.sort_ids()


VOC_AUG_ONLY = ["2008_000002", "2010_000003"]
"""SBD ids that VOC's segmentation lists do not have (part of the 10,582)."""


def make_voc_aug(root: Path, with_train_aug_list: bool, seed: int = 0) -> Expected:
    """VOC aug: the VOC fake, plus `SegmentationClassAug` masks (grayscale, other content) for
    the VOC train ids, 2 SBD-only ids and the first val id (the second val id is only in
    `SegmentationClass`).

    Without a list, train_aug = every Aug stem except the val ids (5 samples). With
    `with_train_aug_list`, `train_aug.txt` names 3 of them, and that list wins.
    """
    make_voc(root, seed)
    draw, expected = _Drawer(seed + 1), Expected(21)
    val_in_aug = VOC_SPLITS["val"][:1]
    aug_masks = {}
    for i in VOC_SPLITS["train"] + VOC_AUG_ONLY + val_in_aug:
        image = root / "JPEGImages" / f"{i}.jpg"
        if not image.exists():
            draw.image(image, draw.size())
        with Image.open(image) as im:
            aug_masks[i] = draw.mask(im.size[::-1], VOC_INDICES)
        write_mask(root / "SegmentationClassAug" / f"{i}.png", aug_masks[i])
    train_aug = VOC_SPLITS["train"] + VOC_AUG_ONLY
    if with_train_aug_list:
        train_aug = [VOC_SPLITS["train"][0], *VOC_AUG_ONLY]
        write_id_list(root / "ImageSets" / "Segmentation" / "train_aug.txt", train_aug)
    for i in train_aug:
        expected.add("train_aug", i, aug_masks[i], VOC_INDICES)
    for i in VOC_SPLITS["val"]:
        raw = aug_masks.get(i)
        if raw is None:
            raw = np.array(Image.open(root / "SegmentationClass" / f"{i}.png"))
        expected.add("val", i, raw, VOC_INDICES)
    return expected.sort_ids()


def make_ade20k(root: Path, seed: int = 0) -> Expected:
    """ADE20K: 3 training + 2 validation images."""
    draw, expected = _Drawer(seed), Expected(150)
    for split, prefix, n in (("training", "ADE_train", 3), ("validation", "ADE_val", 2)):
        for k in range(1, n + 1):
            stem = f"{prefix}_{k:08d}"
            raw = draw.pair(root / "images" / split / f"{stem}.jpg", ADE20K_LABELS)
            write_mask(root / "annotations" / split / f"{stem}.png", raw)
            expected.add(split, stem, raw, ADE20K_LABELS)
    return expected.sort_ids()


def make_pascal_context(root: Path, seed: int = 0) -> Expected:
    """PASCAL-Context: 3 train + 2 val ids, plus a JPEG that no list names."""
    draw, expected = _Drawer(seed), Expected(59)
    splits = {
        "train": ["2008_000002", "2008_000003", "2010_000001"],
        "val": ["2008_000009", "2008_000010"],
    }
    for split, ids in splits.items():
        write_id_list(root / "ImageSets" / "SegmentationContext" / f"{split}.txt", ids)
        for i in ids:
            raw = draw.pair(root / "JPEGImages" / f"{i}.jpg", CONTEXT_LABELS)
            write_mask(root / "SegmentationClassContext" / f"{i}.png", raw)
            expected.add(split, i, raw, CONTEXT_LABELS)
    draw.image(root / "JPEGImages" / "2008_000001.jpg", draw.size())
    return expected.sort_ids()


def make_coco_stuff(root: Path, with_train_ids: bool, seed: int = 0) -> Expected:
    """COCO-Stuff 164k: 3 train2017 + 2 val2017 images with raw stuffthingmaps `<stem>.png`;
    `with_train_ids` adds `<stem>_labelTrainIds.png` (same counts after mapping)."""
    draw, expected = _Drawer(seed), Expected(171)
    for split, stems in (("train2017", [9, 25, 30]), ("val2017", [139, 285])):
        for number in stems:
            stem = f"{number:012d}"
            raw = draw.pair(root / "images" / split / f"{stem}.jpg", COCO_STUFF_RAW)
            masks = root / "annotations" / split
            write_mask(masks / f"{stem}.png", raw)
            if with_train_ids:
                write_mask(masks / f"{stem}_labelTrainIds.png", to_train_ids(raw, COCO_STUFF_RAW))
            expected.add(split, stem, raw, COCO_STUFF_RAW)
    return expected.sort_ids()


def make_camvid(root: Path, seed: int = 0) -> Expected:
    """CamVid (SegNet layout): 3 train, 2 val and 2 test images."""
    draw, expected = _Drawer(seed), Expected(11)
    splits = {
        "train": ["0001TP_006690", "0001TP_006720", "Seq05VD_f00000"],
        "val": ["0016E5_07959", "0016E5_07961"],
        "test": ["0001TP_008550", "Seq05VD_f02370"],
    }
    for split, stems in splits.items():
        for stem in stems:
            raw = draw.pair(root / split / f"{stem}.png", CAMVID_LABELS)
            write_mask(root / f"{split}annot" / f"{stem}.png", raw)
            expected.add(split, stem, raw, CAMVID_LABELS)
    return expected.sort_ids()


def make_folder_dataset(
    root: Path,
    num_classes: int,
    splits: Mapping[str, int] | None = None,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
) -> Expected:
    """The generic folder layout: `images/<split>/<stem>.png` and `masks/<split>/<stem>.png`
    with values 0..K-1 and 255 (ignore); `splits` maps split -> image count (default 4 train,
    2 val); every image has `size` (H, W)."""
    table: Table = {**{v: v for v in range(num_classes)}, 255: IGNORE}
    draw, expected = _Drawer(seed), Expected(num_classes)
    for split, n in (splits or {"train": 4, "val": 2}).items():
        for k in range(n):
            stem = f"{split}_{k:04d}"
            draw.image(root / "images" / split / f"{stem}.png", size)
            raw = draw.mask(size, table)
            write_mask(root / "masks" / split / f"{stem}.png", raw)
            expected.add(split, stem, raw, table)
    return expected.sort_ids()
