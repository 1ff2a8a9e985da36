"""segcon-export: ONNX / TorchScript / safetensors round trips against PyTorch, and nothing but
the chosen network's inference graph in the files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from segcon.export import Parity, check_parity, export, main
from segcon.models.segnet import SegNet
from segcon.restore import compose_entry
from segcon.utils.checkpoint import load_run_checkpoint

pytestmark = pytest.mark.slow

PROJECTION = {"source": "decoder", "dim": 32, "kind": "convmlp"}
SIZES = [(64, 96), (96, 64)]


@pytest.fixture(scope="module")
def rich_ckpt(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run's checkpoint as a contrastive teacher–student run would write it: the
    network has a projection head (`net.heads.*`), and a different teacher (`teacher.model.*`)."""
    ckpt = torch.load(json.loads((trained_run / "metrics.json").read_text())["val/checkpoint"],
                      map_location="cpu", weights_only=True)
    cfg = ckpt["segcon"]["config"]
    cfg["model"]["projection"] = PROJECTION
    torch.manual_seed(3)
    other = SegNet(cfg["model"]["arch"], cfg["model"]["encoder_name"], 5, projection=PROJECTION)
    ckpt["state_dict"].update({f"net.heads.{k}": v for k, v in other.heads.state_dict().items()})
    ckpt["state_dict"].update({f"teacher.model.{k}": v for k, v in other.model.state_dict().items()})
    path = tmp_path_factory.mktemp("rich") / "contrastive_ts.ckpt"
    torch.save(ckpt, path)
    return path


def _model(ckpt: Path, prefix: str) -> nn.Module:
    """The bare smp model with the checkpoint's weights under `prefix`, built without segcon's loaders."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    m = raw["segcon"]["config"]["model"]
    model = SegNet(m["arch"], m["encoder_name"], 5).model
    model.load_state_dict({k[len(prefix):]: v for k, v in raw["state_dict"].items() if k.startswith(prefix)})
    return model.eval()


def _export(ckpt: Path, out: Path, fmt: str, *extra: str) -> list[Parity]:
    sizes = "[" + ",".join(f"[{h},{w}]" for h, w in SIZES) + "]"
    entry, _ = compose_entry("export", [f"ckpt={ckpt}", f"format={fmt}", f"out={out}", f"check_sizes={sizes}", *extra])
    return export(entry)


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(2, 3, 64, 96, generator=g), torch.randn(1, 3, 96, 64, generator=g)]


@pytest.fixture(scope="module")
def onnx_file(rich_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    results = _export(rich_ckpt, out, "onnx")
    assert [r.shape for r in results] == [(2, 3, 64, 96), (1, 3, 96, 64)]
    # Not argmax_agree == 1: a pixel whose two best logits are within float error of each other
    # may flip on another CPU's kernels (CI saw it); a wrong graph disagrees on far more.
    assert all(r.ok and r.argmax_agree > 0.999 for r in results), results
    return out


def test_onnx_matches_pytorch_on_two_sizes_with_dynamic_axes(onnx_file: Path, rich_ckpt: Path) -> None:
    student, teacher = _model(rich_ckpt, "net.model."), _model(rich_ckpt, "teacher.model.")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and isinstance(image.shape[0], str) and isinstance(image.shape[2], str)
    for x in _inputs():
        with torch.no_grad():
            ref = student(x).numpy()
            other = teacher(x).numpy()
        out = session.run(["logits"], {"image": x.numpy()})[0]
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
        assert np.abs(out - other).max() > 0.1  # the student was exported, not the teacher


def test_onnx_graph_holds_only_the_inference_model(onnx_file: Path, rich_ckpt: Path) -> None:
    proto = onnx.load(str(onnx_file))
    graph = proto.graph
    student = _model(rich_ckpt, "net.model.")
    # Named initializers belong to the smp model's modules (BatchNorm is folded into the
    # convolutions as "<conv>.weight_bias"): nothing from net.heads.* or teacher.*.
    owners = {init.name.rsplit(".", 1)[0] for init in graph.initializer if "." in init.name}
    assert owners and owners <= set(dict(student.named_modules()))
    total = sum(int(np.prod(init.dims)) for init in graph.initializer)
    assert total <= sum(v.numel() for v in student.state_dict().values())
    card = json.loads({p.key: p.value for p in proto.metadata_props}["segcon"])
    assert card["num_classes"] == 5 and card["branch"] == "student" and card["output_stride"] == 1


def test_torchscript_matches_pytorch_on_two_sizes(rich_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert all(r.ok for r in _export(rich_ckpt, out, "torchscript"))
    extra = {"segcon.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    student = _model(rich_ckpt, "net.model.")
    assert set(scripted.state_dict()) == set(student.state_dict())  # nothing train-only
    assert json.loads(extra["segcon.json"])["class_names"] == ["background", "field", "block", "blob", "crack"]
    for x in _inputs():
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), student(x), atol=1e-4, rtol=0)


def test_safetensors_teacher_export_round_trips_through_segcon(rich_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher.safetensors"
    assert main([f"ckpt={rich_ckpt}", "format=safetensors", f"out={out}", "branch=teacher", "check_sizes=[[64,64]]"]) == 0
    from safetensors.torch import load_file

    teacher = _model(rich_ckpt, "teacher.model.").state_dict()
    saved = load_file(str(out))
    assert set(saved) == set(teacher)
    assert all(torch.equal(saved[k], teacher[k]) for k in teacher)
    again = load_run_checkpoint(out)  # what segcon-predict / segcon-eval read
    assert set(again.weights) == {"teacher"} and again.config["model"]["projection"] == PROJECTION
    raw = torch.load(rich_ckpt, map_location="cpu", weights_only=True)["segcon"]
    raw_best = raw.get("best_teacher_miou")
    assert again.segcon["best_miou"] == (None if raw_best is None or math.isnan(raw_best) else raw_best)
    assert raw["best_miou"] > 0 and again.segcon["best_miou"] != raw["best_miou"]  # the teacher's, not the student's


def test_parity_check_flags_differences_above_tolerance() -> None:
    model = nn.Conv2d(3, 2, 1).eval()
    shapes = [(1, 3, 8, 8)]
    (good,) = check_parity(model, lambda x: model(x) + 1e-6, shapes, 1e-4)
    (bad,) = check_parity(model, lambda x: model(x) + 1e-2, shapes, 1e-4)
    assert good.ok and not bad.ok and bad.max_diff == pytest.approx(1e-2, rel=1e-3)


def test_export_usage_errors(rich_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([f"ckpt={rich_ckpt}", "format=tflite", f"out={tmp_path / 'm'}"]) == 2
    assert "format='tflite'; use one of onnx, torchscript, safetensors" in capsys.readouterr().err
    assert main([f"ckpt={rich_ckpt}", "format=onnx"]) == 2
    assert "out= is required" in capsys.readouterr().err
