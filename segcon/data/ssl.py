"""Semi-supervised data: unlabeled items with aligned weak and strong views. (The labeled stream,
cycled to the unlabeled stream's length, is a segcon.data.sampling.ResumableSampler.)"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from segcon.data.base import SegDataset
from segcon.data.transforms import SegTransform


class UnlabeledViews(Dataset):
    """Unlabeled training items: one weak view and `num_strong` strong views of an image, with
    identical geometry.

    The weak steps (scale, crop, flip) run once; each strong view applies the photometric strong
    steps (colour jitter, grayscale, blur) to the weak view's pixels, so a pseudo-label made on
    the weak view lines up pixel for pixel with every strong view. CutMix, which mixes images of
    the batch, happens in the training step.

    Items: `image` `[3, h, w]` (weak view), `strong` `[num_strong, 3, h, w]`, `valid` `[h, w]`
    bool (False where the crop padded the image), `gt` `[h, w]` (ground truth, only when the
    dataset is read with masks; all ignore for an image that has none; used for pseudo-label
    accuracy, never for training), `id`.
    """

    def __init__(self, dataset: SegDataset, weak: SegTransform, strong: SegTransform, num_strong: int = 1) -> None:
        self.dataset, self.weak, self.strong, self.num_strong = dataset, weak, strong, num_strong

    def set_seed(self, seed: int) -> None:
        """Re-seed both pipelines (segcon.data.sampling does, for every training item)."""
        self.weak.set_seed(seed)
        self.strong.set_seed(seed + 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        image, gt = self.dataset.load(index)
        if gt is None and self.dataset.labeled:  # an image without a mask in a pool with some
            gt = np.full(image.shape[:2], self.weak.ignore_index, np.int64)
        marker = np.zeros(image.shape[:2], np.int64)  # becomes ignore wherever the crop pads
        weak, masks = self.weak.augment(image, [marker] if gt is None else [marker, gt])
        strong = [self.strong.to_tensor(self.strong.augment(weak)[0]) for _ in range(self.num_strong)]
        item = {
            "image": self.weak.to_tensor(weak),
            "strong": torch.stack(strong),
            "valid": torch.from_numpy(masks[0] != self.weak.ignore_index),
            "id": self.dataset.samples[index].id,
        }
        if gt is not None:
            item["gt"] = torch.from_numpy(masks[1])
        return item
