"""The LightningDataModule: datasets per split, seeded augmentation, DDP-correct samplers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import cv2
import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset

from segcon.data.base import SegDataset
from segcon.data.transforms import SegTransform
from segcon.utils.errors import ConfigError

SPLITS = ("train", "val", "test")


class ShardSampler(Sampler[int]):
    """Evaluation sampler for distributed runs: rank r gets indices r, r+W, r+2W, ... and nothing
    else. Unlike DistributedSampler it never pads with duplicates, so a dataset-level confusion
    matrix summed over ranks counts every image exactly once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def pad_collate(batch: Sequence[dict], ignore_index: int) -> dict[str, Any]:
    """Stack items of different sizes: images padded with 0 (the normalised mean) and masks with
    `ignore_index` at the bottom/right, so padding never counts in losses or metrics."""
    h = max(item["image"].shape[-2] for item in batch)
    w = max(item["image"].shape[-1] for item in batch)
    out: dict[str, Any] = {"id": [item["id"] for item in batch]}
    out["image"] = torch.stack(
        [F.pad(it["image"], (0, w - it["image"].shape[-1], 0, h - it["image"].shape[-2])) for it in batch]
    )
    if all("mask" in it for it in batch):
        out["mask"] = torch.stack(
            [F.pad(it["mask"], (0, w - it["mask"].shape[-1], 0, h - it["mask"].shape[-2]), value=ignore_index)
             for it in batch]
        )
    return out


class _Collate:
    """Picklable collate function (spawned DDP workers pickle the data loader)."""

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        return pad_collate(batch, self.ignore_index)


def _seed_worker(worker_id: int) -> None:
    """Give each data-loader worker its own augmentation stream, derived from the loader's seed."""
    cv2.setNumThreads(0)  # workers are processes already; OpenCV threads would oversubscribe
    info = torch.utils.data.get_worker_info()
    dataset = info.dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    transform = getattr(dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_seed"):
        transform.set_seed(torch.initial_seed() % 2**32)


class SegDataModule(L.LightningDataModule):
    """Builds the train/val/test datasets of one dataset config and their loaders.

    Args:
        dataset: config node with `_target_` (a SegDataset subclass) and format-specific kwargs.
        root: dataset root directory.
        splits: logical split (train/val/test) -> split name on disk, or None if absent.
        num_classes, ignore_index: label space.
        mean, std: normalisation (0..1 scale).
        train_transform, val_transform: transform step lists (see segcon.data.transforms).
        batch_size: per-device training batch; val_batch_size likewise for evaluation.
        num_workers: loader processes per device.
        subset: optional {split: n}: use only the first n samples of a split (debugging).
        seed: seeds shuffling and augmentation.
    """

    def __init__(
        self,
        dataset: Mapping[str, Any],
        root: str,
        splits: Mapping[str, str | None],
        num_classes: int,
        ignore_index: int,
        mean: Sequence[float],
        std: Sequence[float],
        train_transform: Sequence[Mapping[str, Any]] = (),
        val_transform: Sequence[Mapping[str, Any]] = (),
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 2,
        subset: Mapping[str, int | None] | None = None,
        seed: int = 0,
        pin_memory: bool = True,
    ) -> None:
        super().__init__()
        self.dataset_cfg = dataset
        self.root = root
        self.splits = dict(splits)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mean, self.std = list(mean), list(std)
        self.train_steps, self.val_steps = list(train_transform or []), list(val_transform or [])
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers = num_workers
        self.subset = dict(subset or {})
        self.seed = seed
        self.pin_memory = pin_memory
        self.datasets: dict[str, Dataset] = {}

    def build_dataset(self, split: str, train: bool = False, labeled: bool = True) -> SegDataset:
        """The dataset of a logical split with the train or evaluation transform."""
        disk_split = self.splits.get(split)
        if disk_split is None:
            raise ConfigError(f"data.splits.{split} is not set for this dataset")
        steps = self.train_steps if train else self.val_steps
        transform = SegTransform(steps, self.mean, self.std, self.ignore_index)
        transform.set_seed(self.seed + SPLITS.index(split))
        return instantiate(
            self.dataset_cfg,
            root=self.root,
            split=disk_split,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
            transform=transform,
            labeled=labeled,
            _convert_="all",
        )

    def _limit(self, split: str, dataset: SegDataset) -> Dataset:
        n = self.subset.get(split)
        return Subset(dataset, range(min(n, len(dataset)))) if n else dataset

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = self._limit("train", self.build_dataset("train", train=True))
            n, b = len(self.datasets["train"]), self.batch_size * self._world_size()
            if n < b:
                raise ConfigError(
                    f"the train split has {n} images, fewer than one global batch "
                    f"(data.batch_size={self.batch_size} x {self._world_size()} devices); lower "
                    "data.batch_size or data.subset.train."
                )
        if "val" not in self.datasets:
            self.datasets["val"] = self._limit("val", self.build_dataset("val"))
        if stage in (None, "test") and self.splits.get("test") and "test" not in self.datasets:
            self.datasets["test"] = self._limit("test", self.build_dataset("test"))

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler, drop_last: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + self._rank())
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.ignore_index),
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            drop_last=drop_last,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=_seed_worker,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        world = self._world_size()
        if world > 1:
            sampler: Sampler = DistributedSampler(
                dataset, num_replicas=world, rank=self._rank(), shuffle=True, seed=self.seed, drop_last=True
            )
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        # drop_last: a last batch of one image breaks BatchNorm (e.g. DeepLabV3+'s ASPP pooling).
        return self._loader(dataset, self.batch_size, sampler, drop_last=True)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        sampler = ShardSampler(len(dataset), self._rank(), self._world_size())
        return self._loader(dataset, self.val_batch_size, sampler, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
