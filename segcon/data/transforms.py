"""Augmentation pipelines from config, behind one small interface.

A pipeline is a list of steps in YAML, each a one-key mapping `{name: {kwargs}}`:

    train_transform:
      - random_scale: {min: 0.5, max: 2.0}
      - random_crop: {size: [512, 1024]}      # pads with the ignore label when the image is smaller
      - hflip: {p: 0.5}
      - color_jitter: {brightness: 0.25, contrast: 0.25, saturation: 0.25, hue: 0.05, p: 0.8}

The names below are segcon's; any other name is taken as an albumentations class
(`RandomBrightnessContrast: {p: 0.5}`). Normalisation (data.mean/std) and tensor conversion are
always appended. Only this module imports albumentations, so it can be swapped in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from segcon.utils.errors import ConfigError


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _random_scale(min: float = 0.5, max: float = 2.0, p: float = 1.0, **_: Any) -> A.BasicTransform:
    # albumentations' scale_limit is added to 1: factors in [min, max].
    return A.RandomScale(scale_limit=(min - 1.0, max - 1.0), interpolation=cv2.INTER_LINEAR, p=p)


def _parse_step(step: Any) -> tuple[str, Mapping[str, Any]]:
    if not isinstance(step, Mapping) or len(step) != 1:
        raise ConfigError(f"each transform step must be a one-key mapping like {{hflip: {{p: 0.5}}}}, got {step!r}")
    ((name, kwargs),) = step.items()
    return str(name), kwargs


def _build_step(name: str, kwargs: Mapping[str, Any], ignore_index: int, fill: tuple[float, ...]) -> A.BasicTransform:
    """One albumentations transform; padding fills the image with `fill` and the mask with ignore."""
    kw = dict(kwargs or {})
    if name == "random_scale":
        return _random_scale(**kw)
    if name == "random_crop":
        h, w = _size(kw.pop("size"))
        return A.RandomCrop(h, w, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT, fill=fill,
                            fill_mask=ignore_index, pad_position="random", **kw)
    if name == "center_crop":
        h, w = _size(kw.pop("size"))
        return A.CenterCrop(h, w, pad_if_needed=True, border_mode=cv2.BORDER_CONSTANT, fill=fill,
                            fill_mask=ignore_index, **kw)
    if name == "pad":
        h, w = _size(kw.pop("size"))
        return A.PadIfNeeded(h, w, border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=ignore_index,
                             position="top_left", **kw)
    if name == "resize":
        h, w = _size(kw.pop("size"))
        return A.Resize(h, w, **kw)
    if name == "resize_short":
        return A.SmallestMaxSize(max_size=int(kw.pop("size")), **kw)
    if name == "hflip":
        return A.HorizontalFlip(**kw)
    if name == "color_jitter":
        return A.ColorJitter(**kw)
    if name == "grayscale":
        return A.ToGray(**kw)
    if name == "gaussian_blur":
        return A.GaussianBlur(**kw)
    cls = getattr(A, name, None)
    if cls is None or not isinstance(cls, type):
        raise ConfigError(
            f"unknown transform {name!r} in a data.*_transform list. Use one of random_scale, "
            "random_crop, center_crop, pad, resize, resize_short, hflip, color_jitter, grayscale, "
            "gaussian_blur, or an albumentations class name such as RandomBrightnessContrast."
        )
    try:
        return cls(**kw)
    except TypeError as err:
        raise ConfigError(f"bad arguments for transform {name}: {err}") from None


class SegTransform:
    """(image `[H, W, 3] uint8`, mask `[H, W] int` | None) -> (`[3, h, w] float32`, `[h, w] int64` | None).

    Geometry is applied to image and mask together (nearest-neighbour for the mask; padding fills
    the mask with `ignore_index` and the image with the mean colour); photometric steps touch the
    image only.
    """

    def __init__(
        self,
        steps: Sequence[Mapping[str, Any]],
        mean: Sequence[float],
        std: Sequence[float],
        ignore_index: int = 255,
        photometric_only: str | None = None,
    ) -> None:
        # Padding uses the mean colour, which normalises to 0: the same value evaluation pads with.
        fill = tuple(255.0 * m for m in mean)
        built = [_build_step(*_parse_step(step), ignore_index, fill) for step in steps or []]
        if photometric_only is not None:
            moving = [type(t).__name__ for t in built if not isinstance(t, A.ImageOnlyTransform)]
            if moving:
                raise ConfigError(
                    f"{photometric_only} may only change colours, not geometry (it is applied to an "
                    f"already cropped view whose pixels must stay aligned): remove {', '.join(moving)}"
                )
        self.steps = A.Compose(built)
        self.pipeline = A.Compose([*built, A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)])
        self.normalize = A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0)
        self.ignore_index = ignore_index

    def set_seed(self, seed: int) -> None:
        """Re-seed the pipeline's random generators (albumentations 2 does not follow numpy's
        global seed; segcon.data.sampling seeds it for every training item)."""
        self.pipeline.set_random_seed(seed)
        self.steps.set_random_seed(seed)

    def augment(self, image: np.ndarray, masks: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
        """The steps without normalisation: image `[h, w, 3] uint8` and `masks` (`[H, W]` int,
        moved together with the image, padded with `ignore_index`)."""
        if not masks:
            return self.steps(image=image)["image"], []
        out = self.steps(image=image, masks=[m.astype(np.int32) for m in masks])
        return out["image"], [np.asarray(m).astype(np.int64) for m in out["masks"]]

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """Normalise a `[h, w, 3] uint8` image to a `[3, h, w]` float tensor."""
        return torch.from_numpy(self.normalize(image=image)["image"].transpose(2, 0, 1).copy())

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is None:
            out = self.pipeline(image=image)
            return torch.from_numpy(out["image"].transpose(2, 0, 1).copy()), None
        # int32 holds any ignore value (255, -1); cv2 cannot warp int64 masks.
        out = self.pipeline(image=image, mask=mask.astype(np.int32))
        img = torch.from_numpy(out["image"].transpose(2, 0, 1).copy())
        return img, torch.from_numpy(out["mask"].astype(np.int64))
