"""segcon-data stats: exact counts as one JSON object, and a non-zero exit listing bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcon.data_cli import main
from tests.fake_datasets import make_folder_dataset, make_voc


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segcon.data_cli", *args], capture_output=True, text=True, timeout=120
    )


def test_stats_json_is_one_object_with_exact_counts(tmp_path: Path, capsys) -> None:
    expected = make_folder_dataset(tmp_path, num_classes=4, splits={"train": 5, "val": 3})
    assert main(["stats", "data=folder", f"data.root={tmp_path}", "data.num_classes=4", "format=json"]) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout
    assert set(out) == {"train", "val"}
    for split in ("train", "val"):
        assert out[split]["images"] == len(expected.ids[split])
        assert out[split]["class_pixels"] == expected.counts[split].tolist()
        assert out[split]["ignore_pixels"] == expected.ignore[split]


def test_stats_uses_logical_split_names_whatever_the_folders(tmp_path: Path, capsys) -> None:
    expected = make_voc(tmp_path)
    assert main(["stats", "data=voc", f"data.root={tmp_path}", "format=json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["val"]["class_pixels"] == expected.counts["val"].tolist()
    assert out["train"]["ignore_pixels"] == expected.ignore["train"]


def test_stats_lists_every_bad_file_and_exits_non_zero(tmp_path: Path, capsys) -> None:
    make_folder_dataset(tmp_path, num_classes=3, splits={"train": 4, "val": 2})
    bad_value = tmp_path / "masks" / "train" / "train_0001.png"
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(bad_value)
    bad_size = tmp_path / "masks" / "val" / "val_0000.png"
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(bad_size)
    assert main(["stats", "data=folder", f"data.root={tmp_path}", "data.num_classes=3", "format=json"]) == 1
    out = capsys.readouterr()
    assert f"{bad_value} holds label value(s) [9]" in out.err
    assert f"size mismatch: image {tmp_path}/images/val/val_0000.png is 32x32" in out.err.replace("\n", "")
    assert "2 label file(s) have problems" in out.err
    json.loads(out.out)  # the counts of the good files are still one JSON object


def test_usage_and_user_errors(tmp_path: Path, capsys) -> None:
    assert main([]) == 2 and "segcon-data stats" in capsys.readouterr().out
    # the console entry as a process: a user error is one line and exit status 2, no traceback
    proc = _run("stats", "data=folder", f"data.root={tmp_path}/absent", "data.num_classes=3")
    assert proc.returncode == 2
    assert f"data root {tmp_path}/absent does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def _folder(root: Path, masks: dict[str, list[np.ndarray | None]], names: list[str] | None = None,
            size: int = 8) -> None:
    """A folder-layout dataset: per folder, one image (`size` square) per entry and its mask
    (None: none)."""
    for split, arrays in masks.items():
        (root / "images" / split).mkdir(parents=True)
        for i, mask in enumerate(arrays):
            Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(root / "images" / split / f"{i}.jpg")
            if mask is not None:
                (root / "masks" / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / split / f"{i}.png")
    if names:
        (root / "classes.txt").write_text("\n".join(names) + "\n")


def test_check_finds_binary_masks_and_a_missing_unlabeled_folder(tmp_path: Path, capsys) -> None:
    """Another crack dataset with the CrackForest preset: 0/255 masks (what the preset maps), no
    unlabeled folder (which the preset names): one override, data.splits.unlabeled=null."""
    crack = np.zeros((8, 8), np.uint8)
    crack[2, :] = 255  # 8 crack pixels of 64
    _folder(tmp_path, {"train": [crack, crack], "val": [np.zeros((8, 8))]})
    assert main(["check", "data=crackforest", f"data.root={tmp_path}", "format=json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["values"] == [0, 255] and report["binary"] and report["num_classes"] == 2
    assert report["pixel_shares"] == [round(176 / 192, 6), round(16 / 192, 6)]
    assert report["splits"]["train"] == {"images": 2, "masks": 2, "values": [0, 255]}
    assert report["overrides"] == ["data.splits.unlabeled=null"] and report["problems"] == []
    assert main(["check", "data=folder", f"data.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert 'data.num_classes=2 data.dataset.value_map="{255: 1}"' in out and "no classes.txt" in out


def test_check_counts_classes_names_an_image_folder_and_reports_images_without_masks(tmp_path: Path,
                                                                                      capsys) -> None:
    a = np.array([[0, 1, 3, 255]] * 4)  # 4 pixels of each of 0, 1, 3 and ignore
    _folder(tmp_path, {"train": [a, a, None], "val": [a], "extra": [None, None]}, names=["a", "b", "c", "d"])
    assert main(["check", "data=folder", f"data.root={tmp_path}", "format=json"]) == 1  # a train image lacks its mask
    report = json.loads(capsys.readouterr().out)
    assert report["num_classes"] == 4 and not report["binary"] and report["values"] == [0, 1, 3, 255]
    assert report["pixel_shares"] == [round(1 / 3, 6), round(1 / 3, 6), 0.0, round(1 / 3, 6)]
    assert report["class_names"] == ["a", "b", "c", "d"]
    assert report["overrides"] == ["data.num_classes=4", "data.splits.unlabeled=extra"]
    assert report["problems"] == ["images/train: 1 of 3 images have no mask in masks/train/"]


@pytest.mark.parametrize(("foreground", "unlabeled"), [(255, True), (1, False)])
def test_the_crack_preset_takes_any_binary_folder_dataset(tmp_path: Path, caplog, foreground: int,
                                                          unlabeled: bool) -> None:
    """experiment=crack_confidence_ssl on another crack dataset: 0/255 or 0/1 masks (detected,
    the mapping printed), with or without a folder of unlabeled images (skipped with one line)."""
    import logging

    from segcon.train import train
    from tests.conftest import compose_train

    g = np.random.default_rng(0)
    masks = []
    for _ in range(6):
        m = np.zeros((64, 64), np.uint8)
        m[g.integers(0, 64), :] = foreground  # a crack across the image
        masks.append(m)
    root = tmp_path / "data"
    _folder(root, {"train": masks[:4], "val": masks[4:], **({"unlabeled": [None, None]} if unlabeled else {})}, size=64)
    cfg = compose_train(["experiment=crack_confidence_ssl", f"data.root={root}", "logger=csv", "data.crop_size=[64,64]",
                         "data.batch_size=2", "data.unlabeled_batch_size=2", "data.num_workers=0", "trainer.max_steps=2",
                         "trainer.val_check_interval=2", "trainer.num_sanity_val_steps=0", "data.sup_warmup_steps=1",
                         "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"], output_dir=tmp_path / "run")
    with caplog.at_level(logging.INFO):
        train(cfg)
    said = caplog.text
    if foreground == 255:
        assert "value_map=auto: the masks hold 0 and 255 (binary): 255 -> class 1" in said
    else:
        assert "value_map=auto: the masks hold class indices: no mapping" in said
    assert ("running without a unlabeled split" in said) == (not unlabeled)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["labeled_images"] == 1 and metrics["unlabeled_images"] == 3
    assert metrics["unlabeled_stream_images"] == 3 + 2 * unlabeled


def test_an_automatic_value_map_refuses_masks_it_cannot_read(tmp_path: Path) -> None:
    from segcon.data.check import detect_value_map
    from segcon.utils.errors import DataError

    _folder(tmp_path, {"train": [np.array([[0, 7]] * 2)]})
    with pytest.raises(DataError, match=r"hold the values \[0, 7\], which are neither 0/255 binary masks"):
        detect_value_map(tmp_path, "train", 255, 2)
    assert detect_value_map(tmp_path, "train", 255, 8) is None  # class indices of an 8-class dataset
