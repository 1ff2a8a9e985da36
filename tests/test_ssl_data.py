"""Semi-supervised data: weak and strong views aligned pixel for pixel, padding marked, the
labeled stream cycling to the unlabeled stream's length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segcon.data.datamodule import SegDataModule
from segcon.data.folder import FolderDataset
from segcon.data.sampling import ResumableSampler
from segcon.data.splits import make_split
from segcon.data.ssl import UnlabeledViews
from segcon.data.transforms import SegTransform
from segcon.engine.evaluation import split_summary
from segcon.utils.errors import ConfigError, DataError, find_user_error
from tests.fake_datasets import make_folder_dataset

MEAN, STD = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # to_tensor = value / 255; padding fills with 0
GEOMETRY = [{"random_crop": {"size": [48, 48]}}, {"hflip": {"p": 0.5}}]


def _coordinate_dataset(root: Path, h: int = 40, w: int = 60) -> FolderDataset:
    """One image whose pixels encode their own coordinates (R = 10 + 4y, G = 10 + 3x, B = 200),
    and a mask whose class is the column band x // 15."""
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([10 + 4 * y, 10 + 3 * x, np.full_like(y, 200)], -1).astype(np.uint8)
    for d in ("images/train", "masks/train"):
        (root / d).mkdir(parents=True)
    Image.fromarray(image).save(root / "images/train/a.png")
    Image.fromarray((x // 15).astype(np.uint8)).save(root / "masks/train/a.png")
    return FolderDataset(root, "train", num_classes=4)


def _views(dataset: FolderDataset, strong_steps: list, n: int = 2) -> UnlabeledViews:
    weak = SegTransform(GEOMETRY, MEAN, STD, 255)
    strong = SegTransform(strong_steps, MEAN, STD, 255, photometric_only="data.strong_transform")
    return UnlabeledViews(dataset, weak, strong, num_strong=n)


def test_strong_views_share_the_weak_geometry_and_padding_is_marked(tmp_path: Path) -> None:
    views = _views(_coordinate_dataset(tmp_path), [{"color_jitter": {"brightness": 0.5, "p": 0.0}}])
    for seed in range(6):
        views.set_seed(seed)
        item = views[0]
        weak = (item["image"] * 255).round()
        for s in item["strong"]:  # photometric steps that did not fire: exactly the weak pixels
            assert torch.equal((s * 255).round(), weak)
        # the crop (48 high, image 40 high) pads: padding is exactly where B = 0
        assert torch.equal(item["valid"], weak[2] > 0) and not item["valid"].all()
        # the ground truth moved with the image: its band equals the one read from G
        col = (weak[1] - 10) / 3
        band = torch.div(col, 15, rounding_mode="floor").long()
        assert torch.equal(item["gt"][item["valid"]], band[item["valid"]])
        assert (item["gt"][~item["valid"]] == 255).all()


def test_strong_colour_changes_keep_the_pixels_in_place(tmp_path: Path) -> None:
    views = _views(_coordinate_dataset(tmp_path), [{"grayscale": {"p": 1.0}}], n=1)
    views.set_seed(3)
    item = views[0]
    weak, strong = item["image"] * 255, item["strong"][0] * 255
    gray = 0.299 * weak[0] + 0.587 * weak[1] + 0.114 * weak[2]  # ITU-R 601 luma of the weak pixel
    assert (strong[0] - gray).abs().max() <= 1.0 and torch.equal(strong[0], strong[1])


def test_strong_steps_must_not_move_pixels() -> None:
    with pytest.raises(ConfigError, match=r"data\.strong_transform may only change colours.*HorizontalFlip"):
        SegTransform([{"hflip": {"p": 0.5}}], MEAN, STD, 255, photometric_only="data.strong_transform")


def _indices(sampler: ResumableSampler) -> list[int]:
    return [index for index, _ in sampler]


def test_cycling_sampler_repeats_passes_and_splits_ranks() -> None:
    ranks = [_indices(ResumableSampler(5, 7, rank=r, world_size=2, seed=1)) for r in (0, 1)]
    assert all(len(r) == 7 for r in ranks)
    stream = [v for pair in zip(*ranks, strict=True) for v in pair]  # 14 draws: 2 full passes + 4
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    again = ResumableSampler(5, 7, rank=0, world_size=2, seed=1)
    assert _indices(again) == ranks[0]
    again.set_epoch(1)
    assert _indices(again) != ranks[0]


def _ssl_datamodule(root: Path, unlabeled_folder: str | None = None, batch_size: int = 2, **kwargs) -> SegDataModule:
    splits = {"train": "train", "val": "val", "unlabeled": unlabeled_folder}
    return SegDataModule(
        dataset={"_target_": "segcon.data.folder.FolderDataset"}, root=str(root), splits=splits,
        num_classes=3, ignore_index=255, mean=[0.5] * 3, std=[0.25] * 3,
        train_transform=[{"random_crop": {"size": [32, 32]}}], batch_size=batch_size, val_batch_size=2, num_workers=0,
        weak_transform=[{"random_crop": {"size": [32, 32]}}, {"hflip": {"p": 0.5}}],
        strong_transform=[{"grayscale": {"p": 0.5}}], seed=0, **kwargs,
    )


def test_semi_supervised_loader_pairs_labeled_and_unlabeled_batches(tmp_path: Path) -> None:
    expected = make_folder_dataset(tmp_path, num_classes=3, splits={"train": 14, "val": 2})
    dm = _ssl_datamodule(tmp_path, labeled_count=4, split_seed=2, unlabeled=True, num_strong=2, unlabeled_batch_size=3)
    dm.setup("fit")
    split = make_split(expected.ids["train"], 4, seed=2)
    assert dm.split == split and dm.split_info()["split_hash"] == split.hash
    batches = list(dm.train_dataloader())
    assert len(batches) == 10 // 3  # one pass over the 10 unlabeled images (drop_last)
    seen_labeled = []
    for batch, _, _ in batches:
        lab, unl = batch["labeled"], batch["unlabeled"]
        assert lab["image"].shape == (2, 3, 32, 32) and lab["mask"].shape == (2, 32, 32)
        assert unl["strong"].shape == (3, 2, 3, 32, 32) and unl["valid"].dtype == torch.bool
        assert set(unl["id"]) <= set(split.unlabeled) and set(lab["id"]) <= set(split.labeled)
        assert "gt" in unl  # the folder dataset has masks for every image: pseudo-label accuracy
        seen_labeled += lab["id"]
    assert sorted(seen_labeled[:4]) == sorted(split.labeled)  # the labeled set cycles by passes


def test_supervised_baseline_on_a_split_uses_the_labeled_images_only(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path, num_classes=3, splits={"train": 14, "val": 2})
    dm = _ssl_datamodule(tmp_path, labeled_fraction="1/4")
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and "unlabeled" not in dm.datasets  # ceil(14 / 4)
    assert split_summary(dm.split_info()) == (f"split {dm.split.hash}: 4 labeled training images; the other 10 "
                                              "are not used (no unlabeled stream)")
    with pytest.raises(ConfigError, match="only one of"):
        _ssl_datamodule(tmp_path, labeled_fraction="1/4", labeled_count=3)
    with pytest.raises(ConfigError, match="needs unlabeled images"):
        _ssl_datamodule(tmp_path, unlabeled=True)


def test_a_supervised_split_smaller_than_a_batch_cycles_to_one_batch_per_epoch(tmp_path: Path) -> None:
    # 4 labeled CrackForest images and batch 8 in the supervised-only baseline of a 3.5 % split
    expected = make_folder_dataset(tmp_path, num_classes=3, splits={"train": 14, "val": 2})
    dm = _ssl_datamodule(tmp_path, labeled_count=3, split_seed=1, batch_size=8)
    dm.setup("fit")
    labeled = make_split(expected.ids["train"], 3, seed=1).labeled
    orders = []
    for epoch in range(2):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 1 and batches[0]["image"].shape == (8, 3, 32, 32)
        ids = batches[0]["id"]
        # fresh permutations of the 3 images, concatenated: each pass of 3 holds every image once
        assert sorted(ids[:3]) == sorted(ids[3:6]) == sorted(labeled) and set(ids[6:]) < set(labeled)
        orders.append(ids)
    assert orders[0] != orders[1]


def test_on_the_fly_split_draws_labels_from_the_pool_list(tmp_path: Path) -> None:
    expected = make_folder_dataset(tmp_path, num_classes=3, splits={"train": 14, "val": 2})
    pool = expected.ids["train"][:6]
    (tmp_path / "pool.txt").write_text("\n".join(pool) + "\n")
    dm = _ssl_datamodule(tmp_path, labeled_count=3, labeled_pool=str(tmp_path / "pool.txt"), unlabeled=True)
    dm.setup("fit")
    assert set(dm.split.labeled) <= set(pool) and len(dm.split.labeled) == 3
    assert len(dm.split.unlabeled) == 11 and dm.split == make_split(expected.ids["train"], 3, 0, pool)


def _unlabeled_folder(root: Path, n: int, size: tuple[int, int]) -> list[str]:
    """`images/unlabeled/` with `n` images of (H, W) `size` and no masks folder at all."""
    (root / "images/unlabeled").mkdir(parents=True)
    rng = np.random.default_rng(5)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"images/unlabeled/u_{k}.png")
    return [f"u_{k}" for k in range(n)]


def test_an_unlabeled_folder_without_masks_joins_the_unlabeled_stream(tmp_path: Path) -> None:
    # a landscape train split and portrait images without masks in one stream, as in CrackForest
    expected = make_folder_dataset(tmp_path, num_classes=3, splits={"train": 6, "val": 2}, size=(32, 48))
    pool_ids = _unlabeled_folder(tmp_path, 4, (48, 32))
    dm = _ssl_datamodule(tmp_path, "unlabeled", labeled_count=2, unlabeled=True, unlabeled_batch_size=2)
    dm.setup("fit")
    split = make_split(expected.ids["train"], 2, seed=0)
    info = dm.split_info()
    assert info["unlabeled_stream_images"] == 4 + 4 and info["unlabeled_without_mask"] == 4
    assert split_summary(info) == (f"split {split.hash}: 2 labeled, 4 unlabeled training images, and 4 more "
                                   "images in the unlabeled stream (data.splits.unlabeled)")
    seen, scored = [], 0
    for batch, _, _ in dm.train_dataloader():
        unl = batch["unlabeled"]
        for i, image_id in enumerate(unl["id"]):
            seen.append(image_id)
            gt = unl["gt"][i][unl["valid"][i]]
            if image_id in pool_ids:  # no mask: its ground truth is ignore everywhere
                assert (gt == 255).all()
            else:
                assert (gt != 255).any()
                scored += 1
    assert sorted(seen) == sorted([*split.unlabeled, *pool_ids]) and scored == 4

    # every training image labeled: the folder alone is the unlabeled stream (no split needed)
    dm = _ssl_datamodule(tmp_path, "unlabeled", unlabeled=True, unlabeled_batch_size=2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["unlabeled"]) == 4


def test_a_missing_unlabeled_folder_is_named(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path, num_classes=3, splits={"train": 6, "val": 2})
    dm = _ssl_datamodule(tmp_path, "extra", labeled_count=2, unlabeled=True)
    with pytest.raises(Exception) as info:  # Hydra wraps the DataError; the user sees the cause
        dm.setup("fit")
    err = find_user_error(info.value)
    assert isinstance(err, DataError) and "missing" in str(err) and str(tmp_path / "images/extra") in str(err)


def test_landscape_and_portrait_images_in_one_split(tmp_path: Path) -> None:
    """CrackForest holds 480x320 and 320x480 images in one split: training crops them to one size;
    evaluation batches pad each to the batch's largest height and width with ignore."""
    make_folder_dataset(tmp_path, num_classes=3, splits={"train": 4, "val": 2}, size=(32, 48))
    make_folder_dataset(tmp_path / "portrait", num_classes=3, splits={"train": 2, "val": 1}, size=(48, 32), seed=1)
    for kind in ("images", "masks"):
        for split in ("train", "val"):
            for f in (tmp_path / "portrait" / kind / split).iterdir():
                f.rename(tmp_path / kind / split / f"p_{f.name}")
    dm = _ssl_datamodule(tmp_path, labeled_count=4, unlabeled=True, unlabeled_batch_size=2)
    dm.setup("fit")
    for batch, _, _ in dm.train_dataloader():
        assert batch["labeled"]["image"].shape[-2:] == batch["unlabeled"]["image"].shape[-2:] == (32, 32)
    (val,) = list(dm.val_dataloader())[:1]  # 3 images, batch 2: a landscape and a portrait one padded
    first = dm.datasets["val"]
    sizes = [tuple(first[i]["image"].shape[-2:]) for i in range(2)]
    assert sizes == [(48, 32), (32, 48)] and val["image"].shape[-2:] == (48, 48)
    for i, (h, w) in enumerate(sizes):
        assert (val["mask"][i, h:] == 255).all() and (val["mask"][i, :, w:] == 255).all()
        assert (val["mask"][i, :h, :w] != 255).any()


def test_fixmatch_trains_with_an_unlabeled_folder_without_masks(tmp_path: Path) -> None:
    """Every training image labeled, the unlabeled stream a folder of images only: a teacher-
    student run trains, and metrics.json counts the images without masks."""
    import json

    from segcon.train import train
    from tests.conftest import compose_train

    make_folder_dataset(tmp_path / "data", num_classes=3, splits={"train": 4, "val": 2}, size=(32, 48))
    _unlabeled_folder(tmp_path / "data", 4, (48, 32))
    cfg = compose_train(["data=folder", f"data.root={tmp_path / 'data'}", "data.num_classes=3", "data.crop_size=[32,32]",
                         "data.splits.unlabeled=unlabeled", "data.batch_size=2", "data.unlabeled_batch_size=2",
                         "data.num_workers=0", "method=fixmatch", "trainer.max_steps=2", "logger=csv",
                         "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"], output_dir=tmp_path / "run")
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["labeled_images"] == 4 and metrics["unlabeled_images"] == 0
    assert metrics["unlabeled_stream_images"] == metrics["unlabeled_without_mask"] == 4
    assert metrics["val/checkpoint_step"] == 2
