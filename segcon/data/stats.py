"""Label statistics of a dataset split, checking every label file on the way."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from segcon.data.base import SegDataset
from segcon.utils.errors import DataError


@dataclass
class SplitStats:
    """Image count, per-class pixel counts `[K]`, ignore pixels, and the problems found."""

    images: int
    class_pixels: list[int]
    ignore_pixels: int
    problems: list[str] = field(default_factory=list)


def split_stats(dataset: SegDataset, workers: int = 4) -> SplitStats:
    """Count labels over every mask of `dataset`.

    Each mask is read and mapped (values that are neither a class nor ignore are a problem), and
    its size is compared with its image's (read from the image header only). Problems are
    collected, one message per file, instead of stopping at the first.
    """
    k, ignore = dataset.num_classes, dataset.ignore_index

    def one(index: int) -> tuple[np.ndarray, int, str | None]:
        try:
            h, w = dataset.image_size(index)
            mask = dataset.load_mask(index)
        except DataError as err:
            return np.zeros(k, np.int64), 0, str(err)
        sample = dataset.samples[index]
        if mask.shape != (h, w):
            return np.zeros(k, np.int64), 0, (
                f"size mismatch: image {sample.image} is {w}x{h} (WxH) but mask {sample.mask} is "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
        valid = mask != ignore
        return np.bincount(mask[valid], minlength=k), int((~valid).sum()), None

    counts = np.zeros(k, np.int64)
    ignored = 0
    problems = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for c, n_ignore, problem in pool.map(one, range(len(dataset))):
            counts += c
            ignored += n_ignore
            if problem:
                problems.append(problem)
    return SplitStats(len(dataset), counts.tolist(), ignored, problems)
