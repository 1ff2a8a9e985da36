"""Reading images and index masks from a dataset's real on-disk layout.

Every dataset format is a small subclass of `SegDataset` that says where the files of a split
are (`find_samples`), which directories prove the layout is there (`expected_dirs`), and how raw
mask values become train ids (`label_mapping`). Reading, label mapping, the checks with their
error messages, and the transform call live here, once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from segcon.utils.errors import DataError

INVALID = np.iinfo(np.int32).min
"""LUT entry for a raw mask value that is neither a class nor ignore: reading it is an error."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

Transform = Callable[[np.ndarray, np.ndarray | None], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Sample:
    """One item of a split: its id, its image file and its mask file (None when unlabeled)."""

    id: str
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class LabelMapping:
    """How raw mask values map to train ids.

    `classes` maps raw value -> train id; raw values in `ignore` map to the ignore index; every
    other raw value maps to `default` (None: it is an error to meet it).
    """

    classes: Mapping[int, int]
    ignore: frozenset[int] = frozenset({255})
    default: int | None = None

    @classmethod
    def identity(cls, num_classes: int, ignore: Iterable[int] = (255,)) -> LabelMapping:
        """Raw values 0..K-1 are the train ids; `ignore` values are ignored; the rest invalid."""
        return cls({v: v for v in range(num_classes)}, frozenset(ignore))

    def lut(self, ignore_index: int, size: int = 256) -> np.ndarray:
        """A lookup table `[size] int32`: raw value -> train id, `ignore_index`, or INVALID."""
        fill = INVALID if self.default is None else self.default
        lut = np.full(size, fill, dtype=np.int32)
        for raw in self.ignore:
            if 0 <= raw < size:
                lut[raw] = ignore_index
        for raw, train_id in self.classes.items():
            if 0 <= raw < size:
                lut[raw] = train_id
        return lut


def read_image(path: Path) -> np.ndarray:
    """Read an image file as `[H, W, 3] uint8` RGB; a missing or undecodable file is a DataError."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        if not Path(path).is_file():
            raise DataError(f"image file not found: {path}")
        raise DataError(
            f"cannot decode image {path}: the file is corrupt or not an image. "
            "Re-extract it from the dataset archive, or delete it and its mask."
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    """Read a single-channel index mask as `[H, W]` integers (palette PNGs give their indices)."""
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except FileNotFoundError:
        raise DataError(f"mask file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot decode mask {path}: {err}. Re-extract or delete it.") from None
    if arr.ndim != 2:
        raise DataError(
            f"mask {path} has shape {arr.shape}: segcon expects a single-channel index mask "
            "(one class index per pixel, e.g. an 8-bit grayscale or palette PNG), not a colour "
            "image. Convert colour-coded masks to class indices first."
        )
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def map_labels(raw: np.ndarray, lut: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    """Map a raw mask `[H, W]` through `lut` to train ids `[H, W] int64`.

    Raises a DataError naming the file and the offending values when a value is neither a
    class nor ignore.
    """
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) >= len(lut)):
        bad = np.unique(raw[(raw < 0) | (raw >= len(lut))])[:10]
        raise DataError(_bad_values_message(path, bad, num_classes))
    out = lut[raw]
    invalid = out == INVALID
    if invalid.any():
        raise DataError(_bad_values_message(path, np.unique(raw[invalid])[:10], num_classes))
    return out.astype(np.int64)


def _bad_values_message(path: Path, values: np.ndarray, num_classes: int) -> str:
    return (
        f"mask {path} holds label value(s) {values.tolist()} that are neither a class in "
        f"[0, {num_classes}) nor the ignore value. Fix the mask, set data.num_classes, or map "
        "the values (folder format: data.dataset.value_map, e.g. {255: 1} for 0/255 binary masks)."
    )


class SegDataset(Dataset):
    """Images and index masks of one split, read from a dataset's on-disk layout.

    Items are dicts: `image` float tensor `[3, H, W]` (normalised by the transform), `mask` long
    tensor `[H, W]` with train ids and `ignore_index` (absent for unlabeled samples), `id` str.

    Args:
        root: dataset root directory.
        split: the split's name on disk (e.g. "training" for ADE20K's train split).
        num_classes: K; mask values map to 0..K-1 or `ignore_index`.
        ignore_index: the label value that losses and metrics skip.
        transform: callable (image, mask) -> (image tensor, mask tensor); None gives plain tensors.
        labeled: if False, masks are not required (unlabeled images for semi-supervised runs).
    """

    layout: ClassVar[str] = ""
    """Human-readable description of the on-disk layout, used in error messages."""

    fixed_num_classes: ClassVar[int | None] = None
    """The class count a format's label mapping produces (None: set by data.num_classes)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        num_classes: int,
        ignore_index: int = 255,
        transform: Transform | None = None,
        labeled: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.transform = transform
        self.labeled = labeled
        self.check_layout(self.root, split, labeled)
        self.samples = self.find_samples(split)
        if not self.samples:
            raise DataError(
                f"no images found for split {split!r} under {self.root}. Expected layout: "
                f"{self.layout}. Check data.root and data.splits."
            )
        if labeled:
            self._check_masks_exist()
        self._lut = self.label_mapping().lut(ignore_index)

    # -- what a format defines -------------------------------------------------------------

    def find_samples(self, split: str) -> list[Sample]:
        """List the samples of `split`, sorted by id; masks may be paths that do not exist."""
        raise NotImplementedError

    @classmethod
    def expected_dirs(cls, root: Path, split: str, labeled: bool = True) -> list[Path]:
        """Directories that must exist for `split` (read with or without masks); checked before
        any file is listed."""
        return [root]

    @classmethod
    def id_from_path(cls, path: str) -> str:
        """The sample id of an image path as published split lists write it (default: the file
        stem; `JPEGImages/2007_000032.jpg` -> `2007_000032`)."""
        return Path(path).stem

    def label_mapping(self) -> LabelMapping:
        """How raw mask values map to train ids. Default: values are train ids, 255 ignored."""
        return LabelMapping.identity(self.num_classes, {255, self.ignore_index} & set(range(256)))

    # -- shared machinery ------------------------------------------------------------------

    def select(self, ids: Sequence[str], labeled: bool) -> SegDataset:
        """A copy holding only the samples `ids` (in that order), read with or without masks;
        with masks, every selected sample must have its mask file."""
        by_id = {s.id: s for s in self.samples}
        part = copy.copy(self)
        part.samples = [by_id[i] for i in ids]
        part.labeled = labeled
        if labeled:
            part._check_masks_exist()
        return part

    def joined(self, others: Sequence[SegDataset]) -> SegDataset:
        """A copy holding this dataset's samples followed by those of `others` (same format)."""
        part = copy.copy(self)
        for other in others:
            if type(other) is not type(self):
                raise TypeError(f"cannot join a {type(other).__name__} to a {type(self).__name__}")
        part.samples = list(self.samples) + [s for other in others for s in other.samples]
        return part

    @classmethod
    def check_layout(cls, root: Path, split: str, labeled: bool = True) -> None:
        """Raise one DataError naming what was looked for when the layout is not under `root`."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(
                f"data root {root} does not exist (key data.root). Expected the {cls.__name__} "
                f"layout there: {cls.layout}. Pass data.root=<dir> or set SEGCON_DATA_DIR."
            )
        missing = [d for d in cls.expected_dirs(root, split, labeled) if not d.exists()]
        if missing:
            raise DataError(
                f"{root} does not have the {cls.__name__} layout for split {split!r}: missing "
                f"{', '.join(str(m) for m in missing)}. Expected: {cls.layout}. Check data.root "
                "(it must point at the dataset's top folder) and data.splits."
            )

    def _check_masks_exist(self) -> None:
        missing = [s for s in self.samples if s.mask is None or not s.mask.is_file()]
        if missing:
            pairs = "; ".join(f"{s.image} -> {s.mask}" for s in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise DataError(
                f"{len(missing)} image(s) of split {self.split!r} have no mask file: {pairs}{more}. "
                f"Expected layout: {self.layout}. Add the masks or remove those images."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image `[H, W, 3] uint8` and mapped mask `[H, W] int64` (None if unlabeled)."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if not self.labeled or sample.mask is None:
            return image, None
        mask = self.load_mask(index)
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"size mismatch: image {sample.image} is {image.shape[1]}x{image.shape[0]} (WxH) "
                f"but mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]}. "
                "Image and mask must have the same size; fix or remove the pair."
            )
        return image, mask

    def load_mask(self, index: int) -> np.ndarray:
        """The mapped mask `[H, W] int64` of sample `index`."""
        path = self.samples[index].mask
        assert path is not None
        return map_labels(read_mask(path), self._lut, path, self.num_classes)

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of sample `index`'s image, read from the file header only."""
        path = self.samples[index].image
        try:
            with Image.open(path) as im:
                w, h = im.size
        except FileNotFoundError:
            raise DataError(f"image file not found: {path}") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"cannot decode image {path}: {err}. Re-extract or delete it.") from None
        return h, w

    def set_seed(self, seed: int) -> None:
        """Seed the transform's random draws (a transform without any ignores it)."""
        if hasattr(self.transform, "set_seed"):
            self.transform.set_seed(seed)

    def __getitem__(self, index: int) -> dict:
        image, mask = self.load(index)
        if self.transform is not None:
            image_t, mask_t = self.transform(image, mask)
        else:
            image_t = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
            mask_t = None if mask is None else torch.from_numpy(mask)
        item = {"image": image_t, "id": self.samples[index].id}
        if mask_t is not None:
            item["mask"] = mask_t
        return item


def list_files(directory: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES, recursive: bool = False) -> list[Path]:
    """Files under `directory` whose suffix (case-insensitive) is in `suffixes`, sorted."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in directory.glob(pattern) if p.suffix.lower() in suffixes and p.is_file())


def read_id_list(path: Path) -> list[str]:
    """Ids from a split list file (one id per line; only the first column is used)."""
    if not path.is_file():
        raise DataError(f"split list {path} not found. Check data.root and data.splits.")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(Path(line.split()[0]).stem)
    return ids
