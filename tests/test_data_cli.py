"""segcon-data stats: exact counts as one JSON object, and a non-zero exit listing bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
