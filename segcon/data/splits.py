"""Labeled / unlabeled splits for semi-supervised training (REFERENCE.md, "Semi-supervised
protocol facts").

A split is two disjoint lists of sample ids of a dataset's training split. On disk it is a
directory with `labeled.txt` and `unlabeled.txt`, one id per line (as written by
`segcon-data split`); lines in the `image_path mask_path` format that the well-known SSL
repositories publish are read too (the id is taken from the image path). A split is identified
by its content hash, which does not depend on line order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from segcon.utils.errors import ConfigError, DataError

LABELED, UNLABELED, META = "labeled.txt", "unlabeled.txt", "split.json"


@dataclass(frozen=True)
class Protocol:
    """A published semi-supervised protocol: which dataset, how large its training set is, which
    labeled amounts it defines, and (VOC classic) the id list the labels are drawn from."""

    data: str
    pool_size: int
    amounts: tuple[str, ...]
    labeled_pool: str | None = None
    description: str = ""


PROTOCOLS: dict[str, Protocol] = {
    "voc_classic": Protocol(
        "voc_aug", 10_582, ("92", "183", "366", "732", "1464"), "ImageSets/Segmentation/train.txt",
        "labels drawn from the 1,464 fine VOC train ids, the rest of the 10,582 augmented set unlabeled",
    ),
    "voc_blended": Protocol(
        "voc_aug", 10_582, ("1/16", "1/8", "1/4", "1/2"), None, "fractions of all 10,582 augmented images",
    ),
    "cityscapes": Protocol(
        "cityscapes", 2_975, ("1/16", "1/8", "1/4", "1/2"), None, "fractions of the 2,975 train images",
    ),
}


@dataclass(frozen=True)
class Split:
    """Disjoint labeled and unlabeled sample ids."""

    labeled: tuple[str, ...]
    unlabeled: tuple[str, ...]

    def __post_init__(self) -> None:
        both = set(self.labeled) & set(self.unlabeled)
        if both:
            raise DataError(f"a split's labeled and unlabeled ids overlap: {sorted(both)[:5]} ...")

    @property
    def hash(self) -> str:
        """First 16 hex digits of the SHA-256 of the sorted ids of both lists (order-free)."""
        text = "labeled\n" + "\n".join(sorted(self.labeled)) + "\nunlabeled\n" + "\n".join(sorted(self.unlabeled))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def labeled_count(amount: str | int | float, pool_size: int) -> int:
    """The number of labeled images for `amount` out of `pool_size`: a count ("92", 92), or a
    fraction ("1/16", 0.0625) rounded up — 2975/16 -> 186 and 10582/16 -> 662, the published
    counts."""
    text = str(amount).strip()
    try:
        if "/" in text or "." in text:
            fraction = Fraction(text)
            if not 0 < fraction <= 1:
                raise ValueError
            count = math.ceil(fraction * pool_size)
        else:
            count = int(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"labeled={amount!r}: give a count (labeled=92) or a fraction in (0, 1] (labeled=1/16 or 0.0625)"
        ) from None
    if not 1 <= count <= pool_size:
        raise ConfigError(f"labeled={amount!r} asks for {count} labeled images, but the pool has {pool_size}")
    return count


def make_split(
    ids: Sequence[str],
    n_labeled: int,
    seed: int,
    labeled_pool: Sequence[str] | None = None,
    class_presence: Mapping[str, frozenset[int]] | None = None,
) -> Split:
    """Draw `n_labeled` ids from `labeled_pool` (default: all `ids`); the other `ids` are unlabeled.

    The draw depends only on the sorted pool and `seed`. With `class_presence` (id -> classes in
    its mask) the draw is class-balanced: classes are visited from rarest (fewest images) to most
    common and, while one is not yet covered, the first image of the seeded order that contains
    it is taken; the rest of the budget follows the seeded order. Every class is covered whenever
    the budget allows it.
    """
    pool = sorted(set(labeled_pool if labeled_pool is not None else ids))
    missing = set(pool) - set(ids)
    if missing:
        raise DataError(f"{len(missing)} id(s) of the labeled pool are not in the dataset, e.g. {sorted(missing)[:3]}")
    if not 1 <= n_labeled <= len(pool):
        raise ConfigError(f"cannot draw {n_labeled} labeled images from a pool of {len(pool)}")
    order = list(pool)
    random.Random(seed).shuffle(order)
    chosen: list[str] = []
    if class_presence is not None:
        taken: set[str] = set()
        covered: set[int] = set()
        images_with: dict[int, int] = {}
        for i in pool:
            for c in class_presence[i]:
                images_with[c] = images_with.get(c, 0) + 1
        for c in sorted(images_with, key=lambda c: (images_with[c], c)):
            if len(chosen) == n_labeled:
                break
            if c in covered:
                continue
            pick = next(i for i in order if i not in taken and c in class_presence[i])
            chosen.append(pick)
            taken.add(pick)
            covered |= class_presence[pick]
        chosen += [i for i in order if i not in taken][: n_labeled - len(chosen)]
    else:
        chosen = order[:n_labeled]
    labeled = set(chosen)
    return Split(tuple(sorted(labeled)), tuple(i for i in sorted(ids) if i not in labeled))


def write_split(split: Split, out: Path, overwrite: bool = False, meta: Mapping | None = None) -> None:
    """Write `labeled.txt`, `unlabeled.txt` and `split.json` (hash, counts, `meta`) to `out`.

    Refuses (ConfigError, nothing written) when any of them exists, unless `overwrite`. Each file
    is written to a temporary name first and renamed, so an interrupted run leaves no half file.
    """
    out = Path(out).expanduser()
    targets = [out / LABELED, out / UNLABELED, out / META]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"split files already exist: {', '.join(existing)}; pass overwrite=true to replace them")
    out.mkdir(parents=True, exist_ok=True)
    info = {"hash": split.hash, "labeled": len(split.labeled), "unlabeled": len(split.unlabeled), **(meta or {})}
    contents = ["\n".join(split.labeled) + "\n", "\n".join(split.unlabeled) + "\n", json.dumps(info, indent=2) + "\n"]
    for path, text in zip(targets, contents, strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def read_split(
    location: Path, dataset_ids: Sequence[str], id_from_path: Callable[[str], str] = lambda p: Path(p).stem
) -> Split:
    """Read a split directory (`labeled.txt` [+ `unlabeled.txt`]) or a single labeled list file.

    Each line is an id or `image_path [mask_path]` (`id_from_path` turns the image path into the
    dataset's id). Without an unlabeled list, every other id of the dataset is unlabeled. Ids that
    the dataset does not have are an error naming the file and a few of them.
    """
    location = Path(location).expanduser()
    labeled_file = location / LABELED if location.is_dir() else location
    unlabeled_file = location / UNLABELED if location.is_dir() else None
    if not labeled_file.is_file():
        raise DataError(f"split list {labeled_file} not found (key data.split); write one with segcon-data split")
    known = set(dataset_ids)
    labeled = _read_ids(labeled_file, known, id_from_path)
    if unlabeled_file is not None and unlabeled_file.is_file():
        unlabeled = _read_ids(unlabeled_file, known, id_from_path)
    else:
        taken = set(labeled)
        unlabeled = [i for i in sorted(known) if i not in taken]
    return Split(tuple(labeled), tuple(unlabeled))


def _read_ids(path: Path, known: set[str], id_from_path: Callable[[str], str]) -> list[str]:
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(id_from_path(line.split()[0]))
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DataError(
            f"{path}: {len(unknown)} of {len(ids)} ids are not in the dataset's training split, e.g. "
            f"{unknown[:3]}. Check data.root, data.splits.train and that the list belongs to this dataset."
        )
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: some ids are listed twice")
    return ids
