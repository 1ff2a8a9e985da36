"""Training streams that a checkpoint can resume exactly, mid-epoch.

Every training item is a *draw*: a dataset index and an augmentation seed, both functions of
(run seed, stream, epoch, position in the epoch) and of nothing else — not of the data-loader
worker that reads it, nor of how many items the workers prefetched. So

- a run gives the same batches whatever `data.num_workers` is;
- a run resumed from a checkpoint of step n continues with the draws an uninterrupted run would
  have made: the datamodule records (epoch, batches trained) in the checkpoint and starts the
  samplers of the resumed epoch there (`ResumableSampler.resume_at`).

Bad training files can be replaced instead of stopping the run (`TrainItems`, data.on_bad_file).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset

from segcon.utils.errors import DataError

Draw = tuple[int, int]
"""(dataset index, augmentation seed) of one training item."""

MAX_REPLACEMENTS = 16
"""How many following images `TrainItems` tries in place of an unreadable one before giving up."""


def _seed_of(*words: int) -> int:
    """A 32-bit seed hashed from integers (numpy's SeedSequence: nearby inputs, unrelated seeds)."""
    return int(np.random.SeedSequence([int(w) % 2**63 for w in words]).generate_state(1)[0])


class ResumableSampler(Sampler[Draw]):
    """Draws of one training stream for one rank: fresh seeded permutations of `size` items,
    concatenated until `length × world_size` are drawn, rank r taking every world_size-th draw
    from r (disjoint items within a pass, like DistributedSampler with drop_last).

    With `length = size // world_size` this is one shuffled pass per epoch (the labeled images
    of a supervised run, the unlabeled ones of a teacher–student run); a larger `length` repeats
    the items (the labeled stream cycled to the unlabeled stream's length).

    Args:
        size: items in the dataset.
        length: draws per rank and epoch.
        rank, world_size: this process among the training processes.
        seed: the run's data seed.
        stream: tells the streams of one run apart (labeled 0, unlabeled 1).
    """

    def __init__(self, size: int, length: int, rank: int = 0, world_size: int = 1, seed: int = 0, stream: int = 0) -> None:
        self.size, self.length, self.rank, self.world_size = size, length, rank, world_size
        self.seed, self.stream = seed, stream
        self.epoch = 0
        self.start = 0  # draws of this epoch already consumed (a resumed epoch starts there)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch; a new epoch starts at its first draw."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def resume_at(self, epoch: int, batches: int, batch_size: int) -> None:
        """The next iteration starts after `batches` batches of `epoch` (all of its batches: at
        the next epoch's first draw; the draws a dropped last batch would hold are skipped)."""
        if batches >= self.length // batch_size:
            epoch, batches = epoch + 1, 0
        self.epoch, self.start = epoch, batches * batch_size

    def order(self, epoch: int) -> list[int]:
        """This rank's indices of `epoch`, in order `[length]`."""
        g = torch.Generator().manual_seed(_seed_of(self.seed, self.stream, epoch))
        need = self.length * self.world_size
        stream = torch.cat([torch.randperm(self.size, generator=g) for _ in range(-(-need // self.size))])
        return stream[self.rank : need : self.world_size].tolist()

    def __iter__(self) -> Iterator[Draw]:
        epoch, start = self.epoch, self.start
        self.start = 0  # the skip applies to one iteration only
        for k, index in enumerate(self.order(epoch)[start:], start):
            yield index, _seed_of(self.seed, self.stream, epoch, k * self.world_size + self.rank)

    def __len__(self) -> int:
        return self.length


class TrainItems(Dataset):
    """`items[(index, seed)]`: item `index` of `dataset` with its augmentation drawn from `seed`
    (`items[index]`: from a seed derived from the index).

    With `skip_bad=True`, an item whose file cannot be read or whose mask holds values outside
    the label space (a DataError) is replaced by the next readable item of the dataset, with the
    same seed, and the item carries `skipped`: the errors met (so the run can count and report
    them). Otherwise the DataError stops the run, naming the file.

    Args:
        dataset: a SegDataset or UnlabeledViews (or a Subset of one): what `set_seed` reseeds.
        skip_bad: replace unreadable items instead of raising.
    """

    def __init__(self, dataset: Dataset, skip_bad: bool = False) -> None:
        self.dataset, self.skip_bad = dataset, skip_bad
        base = dataset
        while isinstance(base, Subset):
            base = base.dataset
        self._reseed: Callable[[int], None] = base.set_seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: Draw | int) -> dict[str, Any]:
        # a bare index comes from a sampler Lightning put in place (overfit_batches): then the
        # item's augmentation is a function of the index alone
        index, seed = (draw, _seed_of(draw)) if isinstance(draw, int) else draw
        errors: list[str] = []
        for k in range(min(MAX_REPLACEMENTS, len(self.dataset)) if self.skip_bad else 1):
            self._reseed(seed)
            try:
                item = self.dataset[(index + k) % len(self.dataset)]
            except DataError as err:
                if not self.skip_bad:
                    raise
                errors.append(str(err))
                continue
            if errors:
                item["skipped"] = errors
            return item
        raise DataError(
            f"data.on_bad_file=skip: {len(errors)} training images in a row could not be read, the "
            f"last: {errors[-1]}. Check the dataset (segcon-data check) before training on it."
        )
