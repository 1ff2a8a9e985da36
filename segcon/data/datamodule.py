"""The LightningDataModule: datasets per split, seeded augmentation, DDP-correct samplers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from segcon.data.base import Sample, SegDataset, read_id_list
from segcon.data.sampling import ResumableSampler, TrainItems
from segcon.data.splits import Split, labeled_count, make_split, read_split
from segcon.data.ssl import UnlabeledViews
from segcon.data.stats import split_stats
from segcon.data.transforms import SegTransform
from segcon.utils.errors import ConfigError, DataError
from segcon.utils.targets import instantiate

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClassFrequencies:
    """Pixel counts `[K]` of each class over `images` labeled images; `path`: the cache file."""

    class_pixels: list[int]
    images: int
    path: Path | None
    from_cache: bool

    @property
    def frequencies(self) -> list[float]:
        """Each class's share of the labeled pixels `[K]` (sums to 1)."""
        total = sum(self.class_pixels)
        if total == 0:
            raise DataError("the labeled training images hold no labeled pixel: class frequencies are undefined")
        return [n / total for n in self.class_pixels]


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
    """Stack items of different sizes, padding at the bottom/right: images (`image`, `strong`)
    with 0 (the normalised mean), label maps (`mask`, `gt`) with `ignore_index`, `valid` with
    False — so padding never counts in losses or metrics. The `skipped` errors of replaced
    items (data.on_bad_file=skip) are gathered into one list."""
    h = max(item["image"].shape[-2] for item in batch)
    w = max(item["image"].shape[-1] for item in batch)
    out: dict[str, Any] = {"id": [item["id"] for item in batch]}
    for key, fill in (("image", 0.0), ("strong", 0.0), ("mask", ignore_index), ("gt", ignore_index), ("valid", False)):
        if all(key in it for it in batch):
            out[key] = torch.stack(
                [F.pad(it[key], (0, w - it[key].shape[-1], 0, h - it[key].shape[-2]), value=fill) for it in batch]
            )
    skipped = [err for it in batch for err in it.get("skipped", ())]
    if skipped:
        out["skipped"] = skipped
    return out


class _Collate:
    """Picklable collate function (spawned DDP workers pickle the data loader)."""

    def __init__(self, ignore_index: int) -> None:
        self.ignore_index = ignore_index

    def __call__(self, batch: Sequence[dict]) -> dict[str, Any]:
        return pad_collate(batch, self.ignore_index)


def _init_worker(worker_id: int) -> None:
    """Data-loader workers are processes already: OpenCV's own threads would oversubscribe.
    (Augmentation needs no per-worker seed: each training item carries its own, see
    segcon.data.sampling.)"""
    cv2.setNumThreads(0)


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
        seed: seeds shuffling and augmentation: each training item's order and augmentation are
            functions of (seed, epoch, position), whatever num_workers is (segcon.data.sampling).
        split: semi-supervised split of the train split: a directory with labeled.txt
            [+ unlabeled.txt] or a labeled list file (segcon.data.splits). Or, drawn on the fly
            with `split_seed`: `labeled_fraction` (0.0625, "1/16") or `labeled_count`, drawn from
            the ids listed in `labeled_pool` (a list file, e.g. VOC's train.txt for the classic
            protocol) or from all training images. None of them: every training image is labeled.
        unlabeled: also serve the unlabeled stream (teacher-student methods): training batches
            are then `{"labeled": batch, "unlabeled": batch}`, one epoch = one pass over the
            unlabeled images with the labeled ones repeated.
        weak_transform, strong_transform, num_strong: the unlabeled views (segcon.data.ssl).
        unlabeled_batch_size: per-device unlabeled batch (default: batch_size).
        cache_dir: where counted label statistics are kept (`class_frequencies`); None: not kept.
        on_bad_file: a training image or mask that cannot be read (or holds values outside the
            label space): "stop" the run naming the file, or "skip" it (the next image takes its
            place; the run counts and reports the files). Evaluation always stops.
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
        split: str | None = None,
        labeled_fraction: float | str | None = None,
        labeled_count: int | None = None,
        split_seed: int = 0,
        labeled_pool: str | None = None,
        unlabeled: bool = False,
        weak_transform: Sequence[Mapping[str, Any]] = (),
        strong_transform: Sequence[Mapping[str, Any]] = (),
        num_strong: int = 1,
        unlabeled_batch_size: int | None = None,
        cache_dir: str | None = None,
        on_bad_file: str = "stop",
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
        given = [k for k, v in (("split", split), ("labeled_fraction", labeled_fraction),
                                ("labeled_count", labeled_count)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"set only one of data.split, data.labeled_fraction, data.labeled_count (got {given})")
        if unlabeled and not given and not self.splits.get("unlabeled"):
            raise ConfigError(
                "a teacher-student method needs unlabeled images: set data.split=<dir> (segcon-data split) "
                "or data.labeled_fraction=1/16 or data.labeled_count=<n>, or point data.splits.unlabeled "
                "at a folder of images without masks"
            )
        self.split_source, self.split_amount, self.split_seed = split, labeled_fraction or labeled_count, split_seed
        self.labeled_pool = labeled_pool
        self.unlabeled = unlabeled
        self.weak_steps, self.strong_steps = list(weak_transform or []), list(strong_transform or [])
        self.num_strong = num_strong
        self.unlabeled_batch_size = unlabeled_batch_size or batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        if on_bad_file not in ("stop", "skip"):
            raise ConfigError(f"data.on_bad_file={on_bad_file!r}; use stop or skip")
        self.on_bad_file = on_bad_file
        self.split: Split | None = None
        self.datasets: dict[str, Dataset] = {}
        self._resume_position: tuple[int, int] | None = None

    def build_dataset(self, split: str, train: bool = False, labeled: bool = True) -> SegDataset:
        """The dataset of a logical split with the train or evaluation transform."""
        disk_split = self.splits.get(split)
        if disk_split is None:
            raise ConfigError(f"data.splits.{split} is not set for this dataset")
        steps = self.train_steps if train else self.val_steps
        transform = SegTransform(steps, self.mean, self.std, self.ignore_index)
        return instantiate(
            self.dataset_cfg,
            "data.dataset",
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
            if self.split_source is None and self.split_amount is None and not self.unlabeled:
                self.datasets["train"] = self._limit("train", self.build_dataset("train", train=True))
            else:
                self._setup_split()
        if "val" not in self.datasets:
            self.datasets["val"] = self._limit("val", self.build_dataset("val"))
        if stage in (None, "test") and self.splits.get("test") and "test" not in self.datasets:
            self.datasets["test"] = self._limit("test", self.build_dataset("test"))

    def _setup_split(self) -> None:
        """Labeled (and unlabeled) training datasets from the semi-supervised split."""
        full = self.build_dataset("train", train=True, labeled=False)
        ids = [sample.id for sample in full.samples]
        if self.split_source is not None:
            self.split = read_split(Path(str(self.split_source)), ids, type(full).id_from_path)
        elif self.split_amount is not None:
            pool = read_id_list(Path(self.labeled_pool).expanduser()) if self.labeled_pool else None
            n = labeled_count(self.split_amount, len(pool if pool is not None else ids))
            self.split = make_split(ids, n, int(self.split_seed), pool)
        else:  # every training image labeled; the unlabeled stream is data.splits.unlabeled alone
            self.split = Split(tuple(sorted(ids)), ())
        self.datasets["train"] = self._limit("train", full.select(self.split.labeled, labeled=True))
        if self.unlabeled:
            base = self._unlabeled_pool(full)
            weak = SegTransform(self.weak_steps, self.mean, self.std, self.ignore_index)
            strong = SegTransform(self.strong_steps, self.mean, self.std, self.ignore_index,
                                  photometric_only="data.strong_transform")
            self.datasets["unlabeled"] = self._limit("train", UnlabeledViews(base, weak, strong, self.num_strong))

    def _unlabeled_pool(self, full: SegDataset) -> SegDataset:
        """The unlabeled stream's images: the split's unlabeled training images, then the images
        of `data.splits.unlabeled` (a split of images without masks, e.g. `images/unlabeled/`).

        Masks, where an image has one, only feed the pseudo-label accuracy (the ground truth of
        images without one is all ignore there); training never reads them.
        """
        parts = [full.select(self.split.unlabeled, labeled=False)] if self.split.unlabeled else []
        if self.splits.get("unlabeled"):
            parts.append(self.build_dataset("unlabeled", labeled=False))
        if not parts:
            raise ConfigError(
                "the split leaves no unlabeled image; lower the labeled amount or point "
                "data.splits.unlabeled at a folder of images without masks"
            )
        pool = parts[0].joined(parts[1:])
        pool.samples = [s if s.mask is not None and s.mask.is_file() else Sample(s.id, s.image, None)
                        for s in pool.samples]
        pool.labeled = any(s.mask is not None for s in pool.samples)
        pool.transform = None
        return pool

    def split_info(self) -> dict[str, Any]:
        """What was trained on: the split's hash and counts (empty without a split); with an
        unlabeled stream, how many of its images have no mask at all."""
        if self.split is None:
            return {}
        info = {"split_hash": self.split.hash, "labeled_images": len(self.split.labeled),
                "unlabeled_images": len(self.split.unlabeled)}
        if "unlabeled" in self.datasets:
            stream = self.datasets["unlabeled"]  # what is used: after data.subset.train
            views = stream.dataset if isinstance(stream, Subset) else stream
            used = stream.indices if isinstance(stream, Subset) else range(len(views))
            info["unlabeled_stream_images"] = len(stream)
            info["unlabeled_without_mask"] = sum(views.dataset.samples[i].mask is None for i in used)
        return info

    def class_frequencies(self) -> ClassFrequencies:
        """Each class's pixel count over the labeled training images — after the split and
        `subset`, never an unlabeled image — from every mask at full size (no augmentation).

        Kept in `cache_dir/class_frequencies/<key>.json`, the key hashing the dataset format,
        root, split name, label mapping and the sorted labeled ids (so a split of its own hash
        has its own file), and read back from there. Bad masks are one DataError listing them.
        """
        if "train" not in self.datasets:
            self.setup("fit")
        labeled = self.datasets["train"]
        base = labeled.dataset if isinstance(labeled, Subset) else labeled
        assert isinstance(base, SegDataset)
        ids = sorted(base.samples[i].id for i in (labeled.indices if isinstance(labeled, Subset) else range(len(base))))
        key_fields = {
            "format": f"{type(base).__module__}.{type(base).__qualname__}", "root": str(base.root.resolve()),
            "split": base.split, "num_classes": self.num_classes, "ignore_index": self.ignore_index,
            "label_lut": hashlib.sha256(base._lut.tobytes()).hexdigest()[:16],
            "labeled_ids": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
        }
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
        path = None if self.cache_dir is None else self.cache_dir / "class_frequencies" / f"{key}.json"
        if path is not None and path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("key") == key_fields and len(cached.get("class_pixels", ())) == self.num_classes:
                return ClassFrequencies(cached["class_pixels"], cached["images"], path, from_cache=True)
        stats = split_stats(base.select(ids, labeled=True), workers=max(1, self.num_workers))
        if stats.problems:
            raise DataError(f"counting class frequencies: {len(stats.problems)} label file(s) have problems: "
                            + "; ".join(stats.problems[:3]))
        counted = ClassFrequencies(stats.class_pixels, stats.images, path, from_cache=False)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {"key": key_fields, "split_hash": self.split.hash if self.split else None,
                      "images": stats.images, "class_pixels": stats.class_pixels, "frequencies": counted.frequencies}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks may write at once
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, path)
        return counted

    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            # the loader draws its workers' base seed from this, not from the global generator,
            # which then holds the model-side draws only (dropout, samplers, CutMix: ResumeState)
            "generator": torch.Generator().manual_seed(self.seed),
            "num_workers": self.num_workers,
            "collate_fn": _Collate(self.ignore_index),
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": _init_worker,
        }

    # -- resuming ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint of a fit: where the training streams are, as (epoch, batches
        trained in it) — what training consumed, not what the loaders prefetched. The epoch is the
        last one started, not `current_epoch`: once an epoch has ended (a checkpoint written by a
        signal at its end) `current_epoch` already counts it, while its batches still do."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        loop = trainer.fit_loop
        started = max(loop.epoch_progress.current.ready - 1, 0)
        return {"train_position": [started, loop.epoch_loop.batch_progress.current.processed]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resuming: the next training loader starts where the checkpoint's fit was. (Lightning
        restores this before it first asks for the loader, so no worker prefetches a draw of the
        wrong place.)"""
        if "train_position" in state:
            epoch, batches = state["train_position"]
            self._resume_position = (int(epoch), int(batches))

    def _train_loader(self, dataset: Dataset, batch_size: int, length: int, stream: int) -> DataLoader:
        """A loader of `length` draws per rank and epoch (segcon.data.sampling), started at the
        resumed position when there is one."""
        sampler = ResumableSampler(len(dataset), length, self._rank(), self._world_size(), self.seed, stream)
        if self._resume_position is not None:
            sampler.resume_at(*self._resume_position, batch_size)
        # drop_last: a last batch of one image breaks BatchNorm (e.g. DeepLabV3+'s ASPP pooling).
        return DataLoader(TrainItems(dataset, skip_bad=self.on_bad_file == "skip"), batch_size=batch_size,
                          sampler=sampler, drop_last=True, **self._loader_kwargs())

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        if self.unlabeled:
            loader: DataLoader | CombinedLoader = self._semi_supervised_loader()
        else:
            dataset = self.datasets["train"]
            # one shuffled pass per epoch; a split smaller than a global batch (4 labeled images of a
            # supervised-only baseline, batch 8) cycles to one batch, as the labeled stream of a
            # teacher-student run does
            length = max(len(dataset) // self._world_size(), self.batch_size)
            if length > len(dataset) // self._world_size():
                rank_zero_info(f"the train split has {len(dataset)} images, fewer than one global batch "
                               f"(data.batch_size={self.batch_size} x {self._world_size()} devices): each epoch "
                               "is one batch, the images cycled through fresh permutations")
            loader = self._train_loader(dataset, self.batch_size, length, stream=0)
        self._resume_position = None  # a later loader (a new fit) starts at the beginning
        return loader

    def _semi_supervised_loader(self) -> CombinedLoader:
        """`{"labeled", "unlabeled"}` batches: one pass over the unlabeled images per epoch, the
        labeled images cycled through fresh permutations to the same number of batches."""
        unlabeled, labeled = self.datasets["unlabeled"], self.datasets["train"]
        world = self._world_size()
        steps = len(unlabeled) // (self.unlabeled_batch_size * world)
        if steps == 0:
            raise ConfigError(
                f"{len(unlabeled)} unlabeled images are fewer than one global unlabeled batch "
                f"(data.unlabeled_batch_size={self.unlabeled_batch_size} x {world} devices)"
            )
        loaders = {
            "labeled": self._train_loader(labeled, self.batch_size, steps * self.batch_size, stream=0),
            "unlabeled": self._train_loader(unlabeled, self.unlabeled_batch_size, len(unlabeled) // world, stream=1),
        }
        return CombinedLoader(loaders, mode="min_size")

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        sampler = ShardSampler(len(dataset), self._rank(), self._world_size())
        return DataLoader(dataset, batch_size=self.val_batch_size, sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
