"""Samplers, collation and augmentation seeding of the datamodule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segcon.data.datamodule import SegDataModule, ShardSampler, pad_collate
from segcon.data.transforms import SegTransform
from tests.fake_datasets import make_folder_dataset


def test_shard_sampler_covers_each_index_exactly_once() -> None:
    for n, world in [(5, 2), (7, 3), (2, 4), (0, 2)]:
        seen = [i for r in range(world) for i in ShardSampler(n, r, world)]
        assert sorted(seen) == list(range(n))
        assert sum(len(ShardSampler(n, r, world)) for r in range(world)) == n


def test_pad_collate_pads_masks_with_ignore() -> None:
    batch = [
        {"id": "a", "image": torch.ones(3, 4, 5), "mask": torch.zeros(4, 5, dtype=torch.long)},
        {"id": "b", "image": torch.ones(3, 6, 3), "mask": torch.ones(6, 3, dtype=torch.long)},
    ]
    out = pad_collate(batch, ignore_index=255)
    assert out["image"].shape == (2, 3, 6, 5) and out["mask"].shape == (2, 6, 5)
    assert int((out["mask"][0] == 255).sum()) == 6 * 5 - 4 * 5
    assert int((out["mask"][1] == 255).sum()) == 6 * 5 - 6 * 3
    assert out["image"][0, :, 4:].abs().sum() == 0 and out["id"] == ["a", "b"]


def _aug_signature(transform: SegTransform) -> bytes:
    img = (np.arange(32 * 32 * 3) % 251).astype(np.uint8).reshape(32, 32, 3)
    out, _ = transform(img, np.zeros((32, 32), np.int64))
    return out.numpy().tobytes()


def test_augmentation_is_seeded() -> None:
    steps = [{"random_scale": {"min": 0.5, "max": 2.0}}, {"random_crop": {"size": 32}}, {"hflip": {"p": 0.5}}]
    a, b = SegTransform(steps, [0.5] * 3, [0.25] * 3), SegTransform(steps, [0.5] * 3, [0.25] * 3)
    a.set_seed(1)
    b.set_seed(1)
    assert [_aug_signature(a) for _ in range(4)] == [_aug_signature(b) for _ in range(4)]
    b.set_seed(2)
    assert [_aug_signature(a) for _ in range(4)] != [_aug_signature(b) for _ in range(4)]


def test_loader_workers_do_not_repeat_each_others_augmentation(tmp_path: Path) -> None:
    """albumentations 2 ignores numpy's global seed, so forked workers would share one stream
    unless each is re-seeded: two workers reading identical copies of an image must differ."""
    make_folder_dataset(tmp_path, num_classes=3, splits={"train": 1, "val": 1}, size=(40, 40))
    for sub in ("images", "masks"):
        src = tmp_path / sub / "train" / "train_0000.png"
        (tmp_path / sub / "train" / "train_0001.png").write_bytes(src.read_bytes())
    dm = SegDataModule(
        dataset={"_target_": "segcon.data.folder.FolderDataset"}, root=str(tmp_path),
        splits={"train": "train", "val": "val"}, num_classes=3, ignore_index=255,
        mean=[0.5] * 3, std=[0.25] * 3,
        train_transform=[{"random_scale": {"min": 0.5, "max": 2.0}}, {"random_crop": {"size": 32}}],
        batch_size=1, num_workers=2, seed=0,
    )
    dm.setup("fit")
    first, second = [b["image"] for b in dm.train_dataloader()]  # one item per worker
    assert not torch.equal(first, second)


def test_the_datamodule_is_the_class_data_datamodule_names(tmp_path: Path) -> None:
    """data.datamodule._target_ picks the class; every data key its constructor takes reaches it
    by name (a key of its own too), with the run's seed and the method's need for unlabeled images."""
    from segcon.build import build_datamodule
    from tests.conftest import compose_train
    from tests.helpers import ExtraKeyDataModule

    overrides = [f"data.root={tmp_path}", "data.datamodule._target_=tests.helpers.ExtraKeyDataModule",
                 "+data.shards=3", "data.batch_size=5", "seed=17"]
    dm = build_datamodule(compose_train(overrides, output_dir=tmp_path / "run"))
    assert isinstance(dm, ExtraKeyDataModule)
    assert (dm.shards, dm.batch_size, dm.seed, dm.unlabeled) == (3, 5, 17, False)
    ssl = compose_train([*overrides, "method=fixmatch", "data.labeled_count=4"], output_dir=tmp_path / "run")
    assert build_datamodule(ssl).unlabeled and not build_datamodule(ssl, unlabeled=False).unlabeled
