"""segcon-predict on a folder: output tree, skipped and corrupt files, exit status, and masks
equal to an independent forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from segcon.models.segnet import SegNet
from segcon.predict import main

pytestmark = pytest.mark.slow


def _independent_prediction(trained_run: Path, image_path: Path) -> tuple[np.ndarray, dict]:
    """Argmax of the checkpoint's network on the normalised image, without segcon's loaders."""
    ckpt = torch.load(json.loads((trained_run / "metrics.json").read_text())["val/checkpoint"],
                      map_location="cpu", weights_only=True)
    cfg = ckpt["segcon"]["config"]
    m = cfg["model"]
    net = SegNet(m["arch"], m["encoder_name"], cfg["data"]["num_classes"]).eval()
    net.model.load_state_dict({k[len("net.model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.model.")})
    rgb = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    x = (rgb - np.array(cfg["data"]["mean"], np.float32)) / np.array(cfg["data"]["std"], np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x).permute(2, 0, 1)[None])  # Unet takes any size
    return logits.argmax(1)[0].numpy(), cfg


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_predict_folder_mirrors_tree_skips_non_images_and_reports_corrupt_ones(
    trained_run: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    val_images = sorted((data_dir / "synthetic-tiny" / "images" / "val").glob("*.png"))
    shutil.copy(val_images[0], src / "a.png")
    shutil.copy(val_images[1], src / "sub" / "deeper" / "c.png")
    rgb = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(src / "sub" / "b.jpg"), rgb)  # another size and format
    (src / "notes.txt").write_text("not an image")
    (src / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG body")
    out = tmp_path / "out"

    assert main([f"ckpt={trained_run}", f"input={src}", f"output={out}"]) == 1
    captured = capsys.readouterr()
    assert f"skipped {src / 'notes.txt'} (not an image: .txt)" in captured.out
    assert "3 image(s) predicted" in captured.out and "1 failed" in captured.out
    assert "1 forward pass per 64x64 image" in captured.out
    assert f"cannot decode image {src / 'sub' / 'broken.png'}" in captured.err
    assert _files(out) == {
        "masks/a.png", "masks/sub/b.png", "masks/sub/deeper/c.png",
        "overlays/a.jpg", "overlays/sub/b.jpg", "overlays/sub/deeper/c.jpg",
    }

    for name in ("a", "sub/b", "sub/deeper/c"):
        source = next(src.glob(f"{name}.*"))
        expected, cfg = _independent_prediction(trained_run, source)
        with Image.open(out / "masks" / f"{name}.png") as mask:
            assert mask.mode == "P"
            assert mask.getpalette()[: 3 * 5] == [c for colour in cfg["data"]["palette"] for c in colour]
            np.testing.assert_array_equal(np.array(mask), expected)
        overlay = cv2.imread(str(out / "overlays" / f"{name}.jpg"))
        assert overlay.shape == (*expected.shape, 3)


def test_predict_single_file_with_slide_mode(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    image = sorted((data_dir / "synthetic-tiny" / "images" / "val").glob("*.png"))[2]
    out = tmp_path / "out"
    args = [f"ckpt={trained_run}", f"input={image}", f"output={out}", "eval.mode=slide", "eval.crop=[32,32]"]
    assert main(args) == 0
    assert _files(out) == {f"masks/{image.stem}.png", f"overlays/{image.stem}.jpg"}
    with Image.open(out / "masks" / f"{image.stem}.png") as mask:
        assert mask.size == (64, 64) and set(np.unique(np.array(mask))) <= set(range(5))


def test_predict_usage_errors_exit_2(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([f"ckpt={trained_run}", f"output={tmp_path}"]) == 2
    assert "error: input= is required" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([f"ckpt={trained_run}", f"input={tmp_path / 'empty'}", f"output={tmp_path / 'o'}"]) == 2
    assert "no image files" in capsys.readouterr().err
    clash = tmp_path / "clash"
    clash.mkdir()
    for suffix in (".png", ".jpg"):
        cv2.imwrite(str(clash / f"x{suffix}"), np.zeros((8, 8, 3), np.uint8))
    assert main([f"ckpt={trained_run}", f"input={clash}", f"output={tmp_path / 'o'}"]) == 2
    assert "would be written twice" in capsys.readouterr().err
