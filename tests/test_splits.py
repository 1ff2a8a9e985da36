"""Semi-supervised splits: the drawing rule, published counts, hashes, files, and `segcon-data split`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcon.data.cityscapes import Cityscapes
from segcon.data.splits import Split, labeled_count, make_split, read_split, write_split
from segcon.data_cli import main
from segcon.utils.errors import ConfigError, DataError
from tests.fake_datasets import make_folder_dataset, write_id_list

IDS = [f"img_{i:03d}" for i in range(40)]


def test_published_counts_from_fractions() -> None:
    assert [labeled_count(f, 2975) for f in ("1/16", "1/8", "1/4", "1/2")] == [186, 372, 744, 1488]
    assert [labeled_count(f, 10582) for f in ("1/16", "1/8", "1/4", "1/2")] == [662, 1323, 2646, 5291]
    assert labeled_count("0.0625", 2975) == 186 and labeled_count(92, 1464) == 92
    for bad in ("0", "3/2", "abc", 5000):
        with pytest.raises(ConfigError, match="labeled="):
            labeled_count(bad, 2975)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    a, b, c = make_split(IDS, 10, seed=1), make_split(list(reversed(IDS)), 10, seed=1), make_split(IDS, 10, seed=2)
    assert a == b  # depends on the set of ids and the seed only
    assert a.labeled != c.labeled
    assert len(a.labeled) == 10 and len(a.unlabeled) == 30
    assert not set(a.labeled) & set(a.unlabeled) and set(a.labeled) | set(a.unlabeled) == set(IDS)
    with pytest.raises(DataError, match="overlap"):
        Split(("x", "y"), ("y",))


def test_labeled_pool_restricts_the_draw() -> None:
    pool = IDS[:12]
    s = make_split(IDS, 5, seed=0, labeled_pool=pool)
    assert set(s.labeled) <= set(pool) and len(s.unlabeled) == 35
    with pytest.raises(DataError, match="not in the dataset"):
        make_split(IDS, 2, seed=0, labeled_pool=["nope"])


def test_class_balanced_draw_covers_every_class() -> None:
    # 40 images: all have class 0; class k (1..6) appears only in image 5k (rare classes)
    presence = {i: frozenset({0} | ({n // 5} if n % 5 == 0 and n > 0 and n // 5 <= 6 else set())) for n, i in enumerate(IDS)}
    classes = set().union(*presence.values())
    for seed in range(5):
        # 6 images are the minimum: each rare class lives in one image (class 0 comes with them),
        # so the rare classes must be visited first
        s = make_split(IDS, 6, seed=seed, class_presence=presence)
        assert set().union(*(presence[i] for i in s.labeled)) == classes
        assert s == make_split(IDS, 6, seed=seed, class_presence=presence)
    # the plain draw with the same budget misses some rare class for most seeds
    missed = sum(set().union(*(presence[i] for i in make_split(IDS, 6, seed=seed).labeled)) != classes for seed in range(5))
    assert missed >= 1


def test_hash_is_order_free_and_content_bound() -> None:
    s = make_split(IDS, 10, seed=0)
    assert Split(tuple(reversed(s.labeled)), s.unlabeled).hash == s.hash
    moved = Split(s.labeled[1:], (s.labeled[0], *s.unlabeled))
    assert moved.hash != s.hash and len(s.hash) == 16


def test_write_refuses_to_overwrite_and_read_round_trips(tmp_path: Path) -> None:
    s = make_split(IDS, 10, seed=0)
    write_split(s, tmp_path / "sp", meta={"seed": 0})
    before = (tmp_path / "sp" / "labeled.txt").read_text()
    other = make_split(IDS, 10, seed=5)
    with pytest.raises(ConfigError, match="overwrite=true"):
        write_split(other, tmp_path / "sp")
    assert (tmp_path / "sp" / "labeled.txt").read_text() == before  # nothing lost
    assert read_split(tmp_path / "sp", IDS) == s
    meta = json.loads((tmp_path / "sp" / "split.json").read_text())
    assert meta["hash"] == s.hash and meta["labeled"] == 10 and meta["seed"] == 0
    write_split(other, tmp_path / "sp", overwrite=True)
    assert read_split(tmp_path / "sp", IDS) == other
    assert not list((tmp_path / "sp").glob("*.tmp"))


def test_published_image_mask_lines_are_read_as_ids(tmp_path: Path) -> None:
    ids = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"]
    lines = [f"leftImg8bit/train/{i.split('_')[0]}/{i}_leftImg8bit.png gtFine/train/{i.split('_')[0]}/{i}_gtFine_labelTrainIds.png"
             for i in ids[:2]]
    (tmp_path / "published.txt").write_text("\n".join(lines) + "\n")
    s = read_split(tmp_path / "published.txt", ids, Cityscapes.id_from_path)
    assert s == Split(tuple(ids[:2]), (ids[2],))
    assert s.hash == Split(tuple(ids[:2]), (ids[2],)).hash
    (tmp_path / "wrong.txt").write_text("leftImg8bit/train/x/zurich_1_2_leftImg8bit.png\n")
    with pytest.raises(DataError, match=r"wrong.txt: 1 of 1 ids are not in the dataset"):
        read_split(tmp_path / "wrong.txt", ids, Cityscapes.id_from_path)


def test_cli_split_on_a_folder_dataset(tmp_path: Path, capsys) -> None:
    make_folder_dataset(tmp_path / "d", num_classes=4, splits={"train": 10, "val": 2})
    args = ["split", "data=folder", f"data.root={tmp_path}/d", "data.num_classes=4", "labeled=1/4", "seed=3",
            f"out={tmp_path}/sp"]
    assert main(args) == 0
    assert "3 labeled, 7 unlabeled" in capsys.readouterr().out  # ceil(10 / 4)
    first = (tmp_path / "sp" / "labeled.txt").read_text()
    assert main(args) == 2  # a usage error: refuses, names the files and the fix
    assert "overwrite=true" in capsys.readouterr().err
    assert (tmp_path / "sp" / "labeled.txt").read_text() == first
    assert main([*args, "overwrite=true", "class_balanced=true"]) == 0
    assert "covers 4 of 4 classes" in capsys.readouterr().out


def _fake_voc_aug(root: Path, n_fine: int, n_aug_only: int) -> tuple[list[str], list[str]]:
    """A VOC-aug tree of tiny images: `n_fine` ids in train.txt, `n_aug_only` SBD-only ids."""
    fine = [f"2007_{i:06d}" for i in range(n_fine)]
    aug_only = [f"2011_{i:06d}" for i in range(n_aug_only)]
    for d in ("JPEGImages", "SegmentationClassAug"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in [*fine, *aug_only, "2009_val"]:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "SegmentationClassAug" / f"{i}.png")
    write_id_list(root / "ImageSets" / "Segmentation" / "train.txt", fine)
    write_id_list(root / "ImageSets" / "Segmentation" / "val.txt", ["2009_val"])
    return fine, aug_only


def test_cli_voc_classic_protocol(tmp_path: Path, capsys) -> None:
    fine, aug_only = _fake_voc_aug(tmp_path / "voc", 100, 30)
    base = ["split", "data=voc_aug", f"data.root={tmp_path}/voc", "protocol=voc_classic", "seed=0"]
    assert main([*base, "labeled=92", f"out={tmp_path}/sp"]) == 0
    assert "expects 10,582 training images" in capsys.readouterr().err  # a partial dataset is flagged
    s = read_split(tmp_path / "sp", [*fine, *aug_only])
    assert len(s.labeled) == 92 and set(s.labeled) <= set(fine)
    assert set(s.unlabeled) == set(fine + aug_only) - set(s.labeled)
    assert main([*base, "labeled=100", f"out={tmp_path}/other"]) == 2
    assert "defines labeled=92|183|366|732|1464" in capsys.readouterr().err
    assert main([*base, "data=cityscapes", "labeled=92", f"out={tmp_path}/x"]) == 2
    assert "defined on data=voc_aug" in capsys.readouterr().err
