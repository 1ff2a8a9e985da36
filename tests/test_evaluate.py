"""segcon-eval on a tiny trained run, and safe, checked checkpoint loading."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from segcon.evaluate import evaluate, main
from segcon.restore import compose_entry
from segcon.utils.checkpoint import load_run_checkpoint

pytestmark = pytest.mark.slow


def _metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def _eval(*args: str) -> dict[str, float]:
    return evaluate(*compose_entry("eval", ["logger=csv", *args]))


def test_eval_reproduces_the_runs_final_val_miou(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    metrics = _eval(f"ckpt={trained_run}", f"out_dir={out}")
    run = _metrics(trained_run)
    m = _metrics(out)
    # Same checkpoint, same mode: exactly the same float64 numbers (the logged value is float32).
    assert m["val/mIoU"] == run["val/mIoU"] and m["val/IoU"] == run["val/IoU"]
    assert metrics["val/mIoU"] == pytest.approx(run["val/mIoU"], abs=1e-7)
    assert m["val/checkpoint"] == run["val/checkpoint"] and m["val/checkpoint_kind"] == "student"
    assert m["val/inference"]["mode"] == "whole"
    rows = list(csv.DictReader((out / "val_per_class.csv").open()))
    assert [r["class"] for r in rows] == list(m["val/IoU"])
    for name in ("val_confusion.png", "val_iou.png"):
        image = cv2.imread(str(out / name))
        assert image is not None and min(image.shape[:2]) > 200
    logged = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    assert float(logged[-1]["val/mIoU"]) == pytest.approx(run["val/mIoU"])


def test_eval_cli_slide_mode_default_out_dir_and_cost_line(trained_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([f"ckpt={trained_run}", "logger=csv", "eval.mode=slide", "eval.crop=[48,48]", "eval.stride=16"]) == 0
    out = capsys.readouterr().out
    # 64x64 images, 48x48 windows every 16 px: 2 x 2 windows, 4 * 48^2 / 64^2 = 2.25x the pixels
    assert "4 forward passes per 64x64 image, expected cost 2.25x whole" in out
    m = _metrics(trained_run / "eval" / "val_slide")
    assert m["val/inference"]["crop"] == [48, 48] and m["val/inference"]["stride"] == [16, 16]
    assert 0.0 <= m["val/mIoU"] <= 1.0


def _hand_made_checkpoint(trained_run: Path, path: Path, **config_changes: dict) -> dict:
    """The trained run's best checkpoint, re-saved with a teacher and a projection head."""
    ckpt = torch.load(_metrics(trained_run)["val/checkpoint"], map_location="cpu", weights_only=True)
    student = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.model.")}
    teacher = {"teacher." + k[len("net."):]: v.clone() for k, v in student.items()}
    # The teacher predicts class 0 everywhere: a huge bias on the first logit.
    teacher["teacher.model.segmentation_head.0.bias"][0] = 1e4
    ckpt["state_dict"] = {**student, **teacher, "net.heads.projection.proj.0.weight": torch.ones(7, 16, 1, 1)}
    for group, changes in config_changes.items():
        ckpt["segcon"]["config"][group].update(changes)
    torch.save(ckpt, path)
    return ckpt


def test_teacher_branch_is_selected_and_train_only_keys_ignored(trained_run: Path, tmp_path: Path) -> None:
    ckpt_file = tmp_path / "ts.ckpt"
    # written by an earlier segcon, whose methods lived elsewhere: evaluation never builds the method
    _hand_made_checkpoint(trained_run, ckpt_file, method={"_target_": "segcon.methods.teacher_student.MeanTeacher"})
    assert set(load_run_checkpoint(ckpt_file).weights) == {"student", "teacher"}
    _eval(f"ckpt={ckpt_file}", f"out_dir={tmp_path / 's'}")
    assert _metrics(tmp_path / "s")["val/mIoU"] == _metrics(trained_run)["val/mIoU"]
    _eval(f"ckpt={ckpt_file}", "branch=teacher", f"out_dir={tmp_path / 't'}")
    # Class 0 everywhere: IoU_0 = (GT pixels of class 0) / (all labelled pixels), every other class
    # present in the ground truth scores 0, so mIoU = IoU_0 / (classes present).
    gt = torch.tensor([int(r["gt_pixels"]) for r in csv.DictReader((tmp_path / "s" / "val_per_class.csv").open())])
    expected = float(gt[0]) / float(gt.sum()) / int((gt > 0).sum())
    assert _metrics(tmp_path / "t")["val/mIoU"] == pytest.approx(expected, abs=1e-12)
    assert (tmp_path / "t" / "val_confusion.png").is_file()


def test_checkpoint_of_another_class_count_or_architecture_fails_clearly(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    three = {"num_classes": 3, "class_names": ["a", "b", "c"], "palette": [[0, 0, 0], [1, 1, 1], [2, 2, 2]]}
    bad = tmp_path / "three.ckpt"
    _hand_made_checkpoint(trained_run, bad, data=three, model={"num_classes": 3})
    assert main([f"ckpt={bad}", "logger=csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"error: weights in {bad} do not fit the student model" in err
    assert "segmentation_head.0.weight: file (5, 16, 3, 3) vs model (3, 16, 3, 3)" in err
    assert "trained as unet / resnet18 with 3 classes" in err

    assert main([f"ckpt={trained_run}", "logger=csv", "model.encoder_name=resnet34"]) == 2
    err = capsys.readouterr().err
    assert "do not fit the student model" in err and "missing" in err


class _Trap:
    """Unpickling this would create `marker`; weights_only loading must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from segcon import export, predict

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "segcon": {"config": {}}, "payload": _Trap(marker)}, evil)
    commands = {
        main: [f"ckpt={evil}"],
        predict.main: [f"ckpt={evil}", f"input={tmp_path}", f"output={tmp_path / 'out'}"],
        export.main: [f"ckpt={evil}", f"out={tmp_path / 'model.onnx'}"],
    }
    for command, args in commands.items():
        assert command(args) == 2
        err = capsys.readouterr().err
        assert f"refusing to load {evil}" in err and "weights_only=True" in err
    assert not marker.exists()


def test_run_dir_without_checkpoint_and_unknown_keys_are_user_errors(tmp_path: Path, trained_run: Path, capsys) -> None:
    assert main([f"ckpt={tmp_path}"]) == 2
    assert "is a directory without a checkpoint" in capsys.readouterr().err
    assert main([f"ckpt={trained_run}", "data.rooot=/x"]) == 2
    assert "data.rooot is not a key of the run config" in capsys.readouterr().err
    assert main([f"ckpt={trained_run}", "data=cityscapes"]) == 2
    assert "selects a config group" in capsys.readouterr().err
    assert main([f"ckpt={trained_run}", "split=test"]) == 2
    assert "no labelled test split" in capsys.readouterr().err


def test_hydras_own_overrides_are_accepted_by_eval_predict_and_export(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`hydra.*` overrides compose with the command's own config: hydra.run.dir is where
    segcon-eval writes (when out_dir is not given); Hydra checks the keys; predict and export
    take them too."""
    from segcon import export, predict

    assert main([f"ckpt={trained_run}", "logger=csv", f"hydra.run.dir={tmp_path / 'hr'}", "hydra.job.name=x"]) == 0
    assert _metrics(tmp_path / "hr")["val/mIoU"] == _metrics(trained_run)["val/mIoU"]
    images = next((trained_run / "overlays").parent.glob("overlays"))
    assert predict.main([f"ckpt={trained_run}", f"input={images}", f"output={tmp_path / 'p'}",
                         f"hydra.run.dir={tmp_path / 'x'}"]) == 0
    assert export.main([f"ckpt={trained_run}", "format=safetensors", f"out={tmp_path / 'm.safetensors'}",
                        "hydra.verbose=true"]) == 0
    capsys.readouterr()
    assert main([f"ckpt={trained_run}", "hydra.run.dirr=/x"]) == 2
    assert "bad command line for segcon-eval" in capsys.readouterr().err


def test_evaluation_does_not_import_training() -> None:
    """segcon-eval builds what evaluation needs (segcon.build) without loading segcon-train's
    entry point, and rebuilds any checkpoint's network without its training method."""
    code = "import sys, segcon.evaluate; assert 'segcon.train' not in sys.modules, 'segcon.train imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
