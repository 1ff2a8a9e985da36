"""The real-layout dataset readers, on tiny fake copies of each layout (tests/fake_datasets.py).

Every reader is built the way training builds it — class from the data config's
`dataset._target_`, on-disk split names from its `splits` — and must return exactly the sample
ids and per-class pixel counts that the fake layout was drawn with.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf
from PIL import Image

from segcon.data.base import SegDataset
from segcon.data.cityscapes import Cityscapes
from segcon.data.coco_stuff import COCOStuff
from segcon.data.folder import FolderDataset
from segcon.data.voc import VOC, VOCAug
from segcon.utils.errors import DataError
from tests import fake_datasets as fake
from tests.conftest import compose_train

DATA_CONFIGS = ("cityscapes", "voc", "voc_aug", "ade20k", "pascal_context", "coco_stuff", "camvid")


@pytest.fixture(scope="module")
def data_cfgs() -> dict[str, dict[str, Any]]:
    """Each new data config, composed through train.yaml, its `data` node resolved."""
    cfgs = {}
    for name in DATA_CONFIGS:
        data = OmegaConf.to_container(compose_train([f"data={name}"]).data, resolve=True)
        assert isinstance(data, dict)
        cfgs[name] = data
    return cfgs


def build(data: dict[str, Any], root: Path, split: str) -> SegDataset:
    """The reader of logical `split`, built from the data config as training builds it."""
    cls = get_class(data["dataset"]["_target_"])
    return cls(
        root,
        data["splits"][split],
        num_classes=data["num_classes"],
        ignore_index=data["ignore_index"],
    )


def tally(ds: SegDataset) -> tuple[np.ndarray, int]:
    """Per-class pixel counts `[K]` and ignored pixels over every sample, untransformed."""
    counts, ignored = np.zeros(ds.num_classes, np.int64), 0
    for i in range(len(ds)):
        item = ds[i]
        mask = item["mask"].numpy()
        assert mask.shape == tuple(item["image"].shape[1:])
        valid = mask != ds.ignore_index
        assert mask[valid].min(initial=0) >= 0 and mask[valid].max(initial=0) < ds.num_classes
        counts += np.bincount(mask[valid], minlength=ds.num_classes)
        ignored += int((~valid).sum())
    return counts, ignored


def assert_split(ds: SegDataset, expected: fake.Expected, disk_split: str) -> None:
    assert [s.id for s in ds.samples] == expected.ids[disk_split]
    counts, ignored = tally(ds)
    np.testing.assert_array_equal(counts, expected.counts[disk_split])
    assert ignored == expected.ignore[disk_split]


# (config, fake-layout writer, expected number of samples per logical split)
CASES: list[tuple[str, Callable[[Path], fake.Expected], dict[str, int]]] = [
    ("cityscapes", lambda r: fake.make_cityscapes(r, with_train_ids=True), {"train": 3, "val": 2}),
    ("cityscapes", lambda r: fake.make_cityscapes(r, with_train_ids=False), {"train": 3, "val": 2}),
    ("voc", fake.make_voc, {"train": 3, "val": 2}),
    ("voc_aug", lambda r: fake.make_voc_aug(r, with_train_aug_list=False), {"train": 5, "val": 2}),
    ("voc_aug", lambda r: fake.make_voc_aug(r, with_train_aug_list=True), {"train": 3, "val": 2}),
    ("ade20k", fake.make_ade20k, {"train": 3, "val": 2}),
    ("pascal_context", fake.make_pascal_context, {"train": 3, "val": 2}),
    ("coco_stuff", lambda r: fake.make_coco_stuff(r, with_train_ids=True), {"train": 3, "val": 2}),
    ("coco_stuff", lambda r: fake.make_coco_stuff(r, with_train_ids=False), {"train": 3, "val": 2}),
    ("camvid", fake.make_camvid, {"train": 3, "val": 2, "test": 2}),
]
CASE_IDS = [
    "cityscapes-trainids", "cityscapes-labelids", "voc", "voc_aug-derived", "voc_aug-list",
    "ade20k", "pascal_context", "coco_stuff-trainids", "coco_stuff-raw", "camvid",
]


@pytest.mark.parametrize(("name", "make", "sizes"), CASES, ids=CASE_IDS)
def test_reader_counts_every_class_pixel(
    data_cfgs: dict[str, dict[str, Any]],
    tmp_path: Path,
    name: str,
    make: Callable[[Path], fake.Expected],
    sizes: dict[str, int],
) -> None:
    data = data_cfgs[name]
    expected = make(tmp_path)
    assert expected.num_classes == data["num_classes"]
    labelled = {split: disk for split, disk in data["splits"].items() if disk is not None}
    assert set(labelled) == set(sizes)
    for split, disk_split in labelled.items():
        ds = build(data, tmp_path, split)
        assert len(ds) == sizes[split]
        assert_split(ds, expected, disk_split)


@pytest.mark.parametrize(
    ("cls", "make", "split", "num_classes", "train_ids", "fallback"),
    [
        (Cityscapes, fake.make_cityscapes, "train", 19, "_gtFine_labelTrainIds.png",
         "_gtFine_labelIds.png"),
        (COCOStuff, fake.make_coco_stuff, "train2017", 171, "_labelTrainIds.png", ".png"),
    ],
    ids=["cityscapes", "coco_stuff"],
)
def test_train_ids_are_used_only_when_every_sample_has_one(
    tmp_path: Path,
    cls: type[SegDataset],
    make: Callable[..., fake.Expected],
    split: str,
    num_classes: int,
    train_ids: str,
    fallback: str,
) -> None:
    # Both encodings give the same counts, so which files were read is checked by name.
    expected = make(tmp_path, with_train_ids=True)
    ds = cls(tmp_path, split, num_classes=num_classes)
    assert all(s.mask.name.endswith(train_ids) for s in ds.samples)
    assert_split(ds, expected, split)

    # One train-id file missing: the whole split falls back to the raw ids, same counts.
    next(tmp_path.glob(f"*/{split}/**/*{train_ids}")).unlink()
    ds = cls(tmp_path, split, num_classes=num_classes)
    assert all(s.mask.name.endswith(fallback) and train_ids not in s.mask.name for s in ds.samples)
    assert_split(ds, expected, split)


def test_cityscapes_label_ids_map_to_train_ids(tmp_path: Path) -> None:
    # One image whose columns hold labelIds 7 (road), 26 (car), 33 (bicycle), 0 and 6.
    raw = np.tile(np.array([7, 26, 33, 0, 6], np.uint8), (4, 1))
    image = tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (5, 4)).save(image)
    fake.write_mask(tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", raw)
    mask = Cityscapes(tmp_path, "val", num_classes=19, ignore_index=250)[0]["mask"]
    np.testing.assert_array_equal(mask[0].numpy(), [0, 13, 18, 250, 250])


def test_coco_stuff_raw_ids_skip_the_unused_ones(tmp_path: Path) -> None:
    # Columns: raw ids 0, 10, 11 (unused), 12, 91, 181, 255.
    raw = np.tile(np.array([0, 10, 11, 12, 91, 181, 255], np.uint8), (3, 1))
    (tmp_path / "images/val2017").mkdir(parents=True)
    Image.new("RGB", (7, 3)).save(tmp_path / "images/val2017/000000000139.jpg")
    fake.write_mask(tmp_path / "annotations/val2017/000000000139.png", raw)
    ds = COCOStuff(tmp_path, "val2017", num_classes=171)
    np.testing.assert_array_equal(ds[0]["mask"][0].numpy(), [0, 10, 255, 11, 80, 170, 255])

    raw[1, 1] = 182  # beyond the last stuff id: an error, not a silent ignore
    fake.write_mask(tmp_path / "annotations/val2017/000000000139.png", raw)
    with pytest.raises(DataError, match=r"000000000139\.png.*\[182\]"):
        COCOStuff(tmp_path, "val2017", num_classes=171)[0]


def test_voc_reads_palette_indices_not_colours(tmp_path: Path) -> None:
    fake.make_voc(tmp_path)
    ds = VOC(tmp_path, "val", num_classes=21)
    with Image.open(ds.samples[0].mask) as im:
        assert im.mode == "P"
        indices, colours = np.array(im), np.array(im.convert("RGB"))
    # The file shows VOC colours (aeroplane red, border cream); the reader must give indices.
    assert (colours[indices == 1] == [128, 0, 0]).all()
    assert (colours[indices == 255] == [224, 224, 192]).all()
    mask = ds[0]["mask"].numpy()
    assert (mask[indices == 1] == 1).all() and (mask[indices == 255] == 255).all()
    np.testing.assert_array_equal(mask, indices)


def test_voc_aug_train_is_aug_stems_minus_val(tmp_path: Path) -> None:
    fake.make_voc_aug(tmp_path, with_train_aug_list=False)
    aug_stems = {p.stem for p in (tmp_path / "SegmentationClassAug").glob("*.png")}
    val_ids = (tmp_path / "ImageSets/Segmentation/val.txt").read_text().split()
    train = VOCAug(tmp_path, "train_aug", num_classes=21)
    assert [s.id for s in train.samples] == sorted(aug_stems - set(val_ids))
    assert all(s.mask.parent.name == "SegmentationClassAug" for s in train.samples)

    val = VOCAug(tmp_path, "val", num_classes=21)
    assert [s.id for s in val.samples] == sorted(val_ids)
    # The first val id has an augmented mask; the second exists only in SegmentationClass.
    assert [s.mask.parent.name for s in val.samples] == ["SegmentationClassAug", "SegmentationClass"]


@pytest.mark.parametrize(
    ("name", "make", "invalid"),
    [
        ("cityscapes", lambda r: fake.make_cityscapes(r, with_train_ids=True), 19),
        ("voc", fake.make_voc, 77),
        ("voc_aug", lambda r: fake.make_voc_aug(r, with_train_aug_list=False), 21),
        ("ade20k", fake.make_ade20k, 151),
        ("pascal_context", fake.make_pascal_context, 60),
        ("coco_stuff", lambda r: fake.make_coco_stuff(r, with_train_ids=False), 200),
        ("camvid", fake.make_camvid, 12),
    ],
    ids=["cityscapes", "voc", "voc_aug", "ade20k", "pascal_context", "coco_stuff", "camvid"],
)
def test_invalid_raw_value_names_the_file_and_value(
    data_cfgs: dict[str, dict[str, Any]],
    tmp_path: Path,
    name: str,
    make: Callable[[Path], fake.Expected],
    invalid: int,
) -> None:
    make(tmp_path)
    ds = build(data_cfgs[name], tmp_path, "val")
    path = ds.samples[1].mask
    with Image.open(path) as im:
        raw, palette = np.array(im), im.getpalette() if im.mode == "P" else None
    raw[2, 3] = invalid
    fake.write_mask(path, raw, palette)
    ds[0]  # the other samples still read
    with pytest.raises(DataError, match=re.escape(f"{path} holds label value(s) [{invalid}]")):
        ds[1]


@pytest.mark.parametrize(
    ("cls", "make", "split", "remove"),
    [
        (Cityscapes, lambda r: fake.make_cityscapes(r, with_train_ids=False), "val", "gtFine"),
        (VOC, fake.make_voc, "val", "ImageSets/Segmentation/val.txt"),
        (VOCAug, lambda r: fake.make_voc_aug(r, with_train_aug_list=False), "train_aug",
         "SegmentationClassAug"),
        ("segcon.data.ade20k.ADE20K", fake.make_ade20k, "validation", "annotations/validation"),
        ("segcon.data.pascal_context.PascalContext", fake.make_pascal_context, "train",
         "SegmentationClassContext"),
        (COCOStuff, lambda r: fake.make_coco_stuff(r, with_train_ids=True), "train2017",
         "images/train2017"),
        ("segcon.data.camvid.CamVid", fake.make_camvid, "test", "testannot"),
    ],
    ids=["cityscapes", "voc", "voc_aug", "ade20k", "pascal_context", "coco_stuff", "camvid"],
)
def test_missing_directory_names_what_was_looked_for(
    tmp_path: Path, cls: type[SegDataset] | str, make: Callable[[Path], Any], split: str, remove: str
) -> None:
    cls = get_class(cls) if isinstance(cls, str) else cls
    make(tmp_path)
    target = tmp_path / remove
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(DataError, match=re.escape(f"missing {target}")):
        cls(tmp_path, split, num_classes=1)


def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Cityscapes(tmp_path / "nowhere", "train", num_classes=19)


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_config_is_consistent(data_cfgs: dict[str, dict[str, Any]], name: str) -> None:
    data = data_cfgs[name]
    k = data["num_classes"]
    assert data["name"] == name
    assert issubclass(get_class(data["dataset"]["_target_"]), SegDataset)
    assert data["splits"]["train"] and data["splits"]["val"]
    assert data["ignore_index"] == 255 and not 0 <= data["ignore_index"] < k
    names = data["class_names"]
    assert len(names) == k and len(set(names)) == k
    assert all(isinstance(n, str) and n == n.strip() for n in names)
    palette = data["palette"]
    assert palette is None or (
        len(palette) == k and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in palette)
    )
    assert all(s % 32 == 0 for s in data["crop_size"])
    crop = next(step["random_crop"] for step in data["train_transform"] if "random_crop" in step)
    assert crop["size"] == data["crop_size"]


def test_known_class_counts_and_palettes(data_cfgs: dict[str, dict[str, Any]]) -> None:
    counts = {n: data_cfgs[n]["num_classes"] for n in DATA_CONFIGS}
    assert counts == {
        "cityscapes": 19, "voc": 21, "voc_aug": 21, "ade20k": 150, "pascal_context": 59,
        "coco_stuff": 171, "camvid": 11,
    }
    assert data_cfgs["cityscapes"]["splits"]["test"] is None
    assert data_cfgs["camvid"]["splits"]["test"] == "test"
    assert data_cfgs["cityscapes"]["train_transform"][0] == {"random_scale": {"min": 0.5, "max": 2.0}}

    # VOC's colour map: class c's bits (b0 b1 b2) b3 b4 b5 ... fill r, g, b from the top bit down.
    def voc_colour(c: int) -> list[int]:
        rgb = [0, 0, 0]
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= (c & 1) << shift
                c >>= 1
        return rgb

    assert data_cfgs["voc"]["palette"] == [voc_colour(c) for c in range(21)]
    assert data_cfgs["voc_aug"]["palette"] == data_cfgs["voc"]["palette"]
    assert data_cfgs["voc"]["palette"] == [fake.VOC_PALETTE[3 * c : 3 * c + 3] for c in range(21)]
    assert data_cfgs["cityscapes"]["palette"][:2] == [[128, 64, 128], [244, 35, 232]]


def test_make_folder_dataset_counts(tmp_path: Path) -> None:
    expected = fake.make_folder_dataset(tmp_path, num_classes=4, splits={"train": 3, "val": 2})
    assert sum(int(c.sum()) + expected.ignore[s] for s, c in expected.counts.items()) == 5 * 32 * 32
    for split in ("train", "val"):
        assert_split(FolderDataset(tmp_path, split, num_classes=4), expected, split)
