"""Every bad input a user can cause gives one clear error naming the file or key, and loses nothing."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from segcon.config import validate_cfg
from segcon.data.folder import FolderDataset
from segcon.data.transforms import SegTransform
from segcon.utils.errors import ConfigError, DataError
from tests.conftest import compose_train


def _pair(root: Path, split: str, stem: str, image_hw=(16, 20), mask_hw=None, values=(0, 1)) -> tuple[Path, Path]:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    img_path = root / "images" / split / f"{stem}.png"
    mask_path = root / "masks" / split / f"{stem}.png"
    cv2.imwrite(str(img_path), np.full((*image_hw, 3), 100, np.uint8))
    mh, mw = mask_hw or image_hw
    mask = np.resize(np.array(values, np.uint8), mh * mw).reshape(mh, mw)
    Image.fromarray(mask).save(mask_path)
    return img_path, mask_path


def _ds(root: Path, split: str = "train", k: int = 3, **kw) -> FolderDataset:
    return FolderDataset(root, split, num_classes=k, ignore_index=255, **kw)


def test_missing_root_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist \(key data.root\).*images/<split>"):
        _ds(tmp_path / "nope")


def test_wrong_layout_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"missing .*masks/train"):
        _ds(tmp_path)


def test_image_without_mask_names_the_pair(tmp_path: Path) -> None:
    _pair(tmp_path, "train", "a")
    img, mask = _pair(tmp_path, "train", "b")
    mask.unlink()
    with pytest.raises(DataError, match=rf"1 image\(s\).*{img}.*{mask}"):
        _ds(tmp_path)


def test_size_mismatch_names_the_pair(tmp_path: Path) -> None:
    img, mask = _pair(tmp_path, "train", "a", image_hw=(16, 20), mask_hw=(16, 18))
    with pytest.raises(DataError, match=rf"size mismatch: image {img} is 20x16.*mask {mask} is 18x16"):
        _ds(tmp_path)[0]


def test_label_out_of_range_names_file_and_value(tmp_path: Path) -> None:
    _, mask = _pair(tmp_path, "train", "a", values=(0, 1, 7))
    with pytest.raises(DataError, match=rf"{mask} holds label value\(s\) \[7\]"):
        _ds(tmp_path)[0]


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    img, _ = _pair(tmp_path, "train", "a")
    img.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=rf"cannot decode image {img}"):
        _ds(tmp_path)[0]


def test_colour_mask_is_refused_with_the_fix(tmp_path: Path) -> None:
    _, mask = _pair(tmp_path, "train", "a")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(mask)
    with pytest.raises(DataError, match=rf"mask {mask} has shape \(16, 20, 3\).*single-channel index mask"):
        _ds(tmp_path)[0]


def test_binary_0_255_masks_warn_and_value_map_fixes(tmp_path: Path) -> None:
    _pair(tmp_path, "train", "a", values=(0, 255))
    with pytest.warns(UserWarning, match=r"value_map=\{255: 1\}"):
        ds = _ds(tmp_path, k=2)
    assert set(np.unique(ds.load(0)[1])) == {0, 255}  # as configured: 255 is ignore
    mapped = _ds(tmp_path, k=2, value_map={255: 1})
    assert set(np.unique(mapped.load(0)[1])) == {0, 1}
    thresh = _ds(tmp_path, k=2, mask_threshold=128)
    assert set(np.unique(thresh.load(0)[1])) == {0, 1}


def test_crop_larger_than_image_pads_with_ignore() -> None:
    t = SegTransform([{"random_crop": {"size": [40, 48]}}], [0.5] * 3, [0.25] * 3, ignore_index=255)
    image = np.full((16, 20, 3), 128, np.uint8)
    mask = np.ones((16, 20), np.int64)
    img_t, mask_t = t(image, mask)
    assert img_t.shape == (3, 40, 48) and mask_t.shape == (40, 48)
    assert int((mask_t == 1).sum()) == 16 * 20  # every original pixel kept
    assert int((mask_t == 255).sum()) == 40 * 48 - 16 * 20  # the rest is ignore
    assert torch.allclose(img_t[:, mask_t == 255], torch.tensor(0.0), atol=1e-2)  # mean colour -> 0


def _cfg(*overrides: str):
    return compose_train(["logger=csv", *overrides], output_dir=Path("/tmp/unused"))


def test_num_classes_mismatch_names_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"model.num_classes=7 but data.num_classes=5"):
        validate_cfg(_cfg("model.num_classes=7"), check_data=False)


def test_class_weights_length_mismatch() -> None:
    with pytest.raises(ConfigError, match=r"loss.ce.class_weights has 2 entries but data.num_classes=5"):
        validate_cfg(_cfg("loss.ce.class_weights=[1.0,2.0]"), check_data=False)


def test_ignore_index_inside_class_range() -> None:
    with pytest.raises(ConfigError, match=r"data.ignore_index=3 lies inside the class range \[0, 5\)"):
        validate_cfg(_cfg("data.ignore_index=3"), check_data=False)


def test_loss_ignore_index_must_match_data() -> None:
    """Terms take data.ignore_index from the build; one a user gives a term by hand must agree."""
    with pytest.raises(ConfigError, match=r"loss.ce.ignore_index=254 differs from data.ignore_index=255"):
        validate_cfg(_cfg("+loss.ce.ignore_index=254"), check_data=False)


def test_crop_not_multiple_of_output_stride() -> None:
    with pytest.raises(ConfigError, match=r"data.crop_size=100x128 is not a multiple of the model's input divisor 16 \(deeplabv3plus / resnet50.*112x128"):
        validate_cfg(_cfg("model=deeplabv3plus_r50", "data.crop_size=[100,128]"), check_data=False)


def test_data_root_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data root .*missing-dataset does not exist"):
        validate_cfg(_cfg("data=folder", "data.num_classes=3", f"data.root={tmp_path}/missing-dataset"))


def test_a_run_without_any_term_is_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="the loss and contrast groups define no term"):
        validate_cfg(_cfg("loss=none"), check_data=False)
    validate_cfg(_cfg("loss=none", "contrast=pixel"), check_data=False)  # a term on the whole output may supervise


def test_unknown_group_option_is_hydras_error() -> None:
    with pytest.raises(ConfigCompositionException, match="model"):
        _cfg("model=unet_r999")


def test_num_classes_override_against_a_fixed_label_mapping() -> None:
    with pytest.raises(ConfigError, match=r"data.num_classes=10, but the segcon.data.cityscapes.Cityscapes label mapping produces 19"):
        validate_cfg(_cfg("data=cityscapes", "data.num_classes=10"), check_data=False)


@pytest.mark.parametrize(("key", "value", "bound"), [("strong_weight", -0.25, ">= 0"), ("fp_weight", -1, ">= 0"),
                                                    ("loss_scale", 0, "> 0")])
def test_unimatch_loss_weights_are_checked(key: str, value: float, bound: str) -> None:
    with pytest.raises(ConfigError, match=rf"method.{key} must be {bound}, got {value} \(UniMatch's published value"):
        validate_cfg(_cfg("method=unimatch", f"method.{key}={value}"), check_data=False)


def test_semi_supervised_settings_checked_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"method.confidence.threshold=1.5 must lie in \[0, 1\]"):
        validate_cfg(_cfg("method=fixmatch", "method.confidence.threshold=1.5"), check_data=False)
    with pytest.raises(ConfigError, match=r"method.alignment_momentum=1.0 must lie in \[0, 1\)"):
        validate_cfg(_cfg("method=fixmatch", "method.alignment_momentum=1.0"), check_data=False)
    with pytest.raises(ConfigError, match=r"method.ema_momentum=1.5 \(default: data.teacher_ema_momentum\) must lie in"):
        validate_cfg(_cfg("method=mean_teacher", "data.teacher_ema_momentum=1.5"), check_data=False)
    with pytest.raises(ConfigError, match=r"data.weak_transform random_crop \(step 0\)=100x100 is not a multiple"):
        validate_cfg(_cfg("model=deeplabv3plus_r50", "data.crop_size=[96,96]",
                          "data.weak_transform=[{random_crop: {size: [100, 100]}}]"), check_data=False)
    with pytest.raises(ConfigError, match=r"learns from pseudo-labels, but the pseudo_loss group defines no term"):
        validate_cfg(_cfg("method=fixmatch", "pseudo_loss.ce=null"), check_data=False)
    with pytest.raises(DataError, match=r"data.split=.*no-split does not exist"):
        validate_cfg(_cfg("method=mean_teacher", f"data.split={tmp_path}/no-split", f"data.root={tmp_path}"))


def test_full_disk_mid_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from segcon.utils import checkpoint as ckpt_mod

    path = tmp_path / "run" / "last.ckpt"
    ckpt_mod.AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def full_disk(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last\.ckpt.*previous one is kept.*GiB are free"):
        ckpt_mod.AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"].item() == 1
