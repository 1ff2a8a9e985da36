"""The model contract (segcon.models.base), run for every model family: two smp models (one whose
head upsamples, with every train-only head) and a family that is not smp (tests.toy_model), which
then trains, evaluates, exports and predicts through segcon's commands unchanged."""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from segcon.evaluation.inference import InferenceSettings, infer
from segcon.export import check_parity, export_onnx, export_torchscript
from segcon.models.base import SegModel
from segcon.models.output import SegOutput
from segcon.restore import build_inference_net
from segcon.utils.checkpoint import load_run_checkpoint
from segcon.utils.ema import ema_update
from segcon.utils.errors import ConfigError

K = 4
FAMILIES = {
    "unet": {"_target_": "segcon.models.segnet.SegNet", "arch": "unet", "encoder_name": "resnet18", "num_classes": K,
             "projection": {"dim": 8}},
    "fpn": {"_target_": "segcon.models.segnet.SegNet", "arch": "fpn", "encoder_name": "resnet18", "num_classes": K,
            "projection": {"dim": 8, "kind": "residual"}, "weight_branch": {"depth": "head"},
            "projections": {"enc": {"source": "encoder", "stages": [2, 3], "dim": 8}}},
    "tiny": {"_target_": "tests.toy_model.TinyNet", "num_classes": K, "width": 6, "projection": {"dim": 8}},
    "fusion": {"_target_": "segcon.models.segnet.SegNet", "arch": "fusion", "encoder_name": "resnet18",
               "num_classes": K, "side_stages": [1, 2, 3, 4, 5], "side_weights": [1.0] * 5,
               "projection": {"dim": 8, "source": "encoder", "stages": [2, 3, 4, 5]}},
    "maskformer": {"_target_": "segcon.models.maskformer.MaskFormer", "encoder_name": "resnet18", "num_classes": K,
                   "num_queries": 6, "hidden_dim": 16, "mask_dim": 16, "conv_dim": 16, "dec_layers": 2, "nheads": 2,
                   "dim_feedforward": 32, "projection": {"dim": 8}},
    "dpt": {"_target_": "segcon.models.dpt.DPTDinoV2", "encoder_name": "vit_small_patch14_dinov2", "num_classes": K,
            "encoder_kwargs": {"depth": 4, "embed_dim": 48, "num_heads": 2}, "layers": [0, 1, 2, 3], "features": 16,
            "out_channels": [8, 16, 32, 32], "projection": {"dim": 8},
            "projections": {"tokens": {"source": "encoder", "stages": [2, 3], "dim": 8}}},
}
# two input sizes per family, multiples of its divisor (1, 32, 4, 32, 32, 1: DPT pads to multiples of 14 itself)
SIZES = {"unet": [(48, 40), (37, 53)], "fpn": [(64, 96), (96, 64)], "tiny": [(36, 44), (44, 28)],
         "fusion": [(64, 96), (96, 64)], "maskformer": [(64, 96), (96, 64)], "dpt": [(56, 42), (45, 61)]}


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request: pytest.FixtureRequest) -> tuple[str, SegModel]:
    torch.manual_seed(0)
    return request.param, instantiate(FAMILIES[request.param])


def test_losses_and_outputs_import_no_model_library() -> None:
    """SegOutput and every loss term are importable without smp (and without Lightning)."""
    import subprocess
    import sys

    code = ("import sys, segcon.models.output, segcon.objectives.cac, segcon.objectives.contrast, "
            "segcon.objectives.objective; bad = {'segmentation_models_pytorch', 'lightning'} & set(sys.modules); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_check_config_gives_the_divisor_without_building(family: tuple[str, SegModel]) -> None:
    name, net = family
    assert type(net).check_config(FAMILIES[name]) == net.input_divisor
    assert all(h % net.input_divisor == 0 and w % net.input_divisor == 0 for h, w in SIZES[name])


def test_training_output_and_eval_scores_at_any_divisible_size(family: tuple[str, SegModel]) -> None:
    name, net = family
    for h, w in SIZES[name]:
        x = torch.randn(2, 3, h, w)
        net.train()
        out = net(x)
        assert isinstance(out, SegOutput) and out.logits.shape == (2, K, h, w)
        emb = out.embeddings["projection"]
        assert out.logits_at(emb.size).shape == (2, K, *emb.size)
        assert emb.at(torch.tensor([0, emb.size[0] * emb.size[1] + 1])).shape == (2, 8)
        assert net.forward_features(x, heads=()).embeddings == {}
        net.eval()
        with torch.no_grad():
            scores = net(x)
            assert isinstance(scores, torch.Tensor) and scores.shape == (2, K, h, w)
            torch.testing.assert_close(scores, net.model(x))
            torch.testing.assert_close(scores, net.forward_features(x).logits)


def test_take_and_cat_round_trip(family: tuple[str, SegModel]) -> None:
    name, net = family
    out = net.train()(torch.randn(3, 3, *SIZES[name][0]))
    whole = SegOutput.cat([out.take(slice(0, 1)), out.take(slice(1, 3))])
    for field in ("logits", "decoder_logits", "decoder"):
        a, b = getattr(whole, field), getattr(out, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert all(torch.equal(a, b) for a, b in zip(whole.features, out.features, strict=True))
    assert sorted(whole.embeddings) == sorted(out.embeddings)
    for field in ("perturbed_logits", "weight_logits", "weight_decoder_logits", "mask_cls", "mask_logits", "mask_embed"):
        a, b = getattr(whole, field), getattr(out, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    for field in ("side_logits", "earlier_mask_cls", "earlier_mask_logits"):
        assert len(getattr(whole, field)) == len(getattr(out, field)), field
        assert all(torch.equal(a, b) for a, b in zip(getattr(whole, field), getattr(out, field), strict=True)), field
    index = torch.tensor([1, out.embeddings["projection"].hidden[0, 0].numel() * 2 + 3])
    torch.testing.assert_close(whole.embeddings["projection"].at(index), out.embeddings["projection"].at(index))
    only = SegOutput.cat([out, out], only={"embeddings"})
    assert only.logits.shape[0] == 6 and only.features == [] and only.decoder is None and only.mask_cls is None
    assert only.side_logits == [] and only.weight_logits is None


def test_perturbed_branch_is_a_second_decoding_of_the_same_batch(family: tuple[str, SegModel]) -> None:
    name, net = family
    x = torch.randn(2, 3, *SIZES[name][0])
    net.eval()
    with torch.no_grad():  # no dropout in eval mode: both halves are the plain prediction
        out = net.forward_features(x, perturb=0.5)
        torch.testing.assert_close(out.perturbed_logits, net(x))
        torch.testing.assert_close(out.logits, net(x))
    net.train()
    out = net.forward_features(x, perturb=0.5)
    assert out.logits.shape == out.perturbed_logits.shape == (2, K, *SIZES[name][0])
    assert not torch.allclose(out.logits, out.perturbed_logits)


@pytest.mark.parametrize("mode", ["whole", "slide", "ms_flip"])
def test_every_inference_mode_returns_log_probabilities(family: tuple[str, SegModel], mode: str) -> None:
    name, net = family
    h, w = SIZES[name][1]
    settings = InferenceSettings.from_config({"mode": mode, "crop": [h // 2 + 3, w // 2 + 5], "scales": [0.75, 1.0],
                                              "flip": True})
    x = torch.randn(2, 3, h, w)
    net.eval()
    logp = infer(net, x, settings, net.input_divisor)
    assert logp.shape == (2, K, h, w)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2, h, w))
    if mode == "whole":
        with torch.no_grad():
            torch.testing.assert_close(logp, net(x).log_softmax(1))


def test_parameter_groups_partition_every_parameter(family: tuple[str, SegModel]) -> None:
    _, net = family
    groups = net.parameter_groups()
    enc, head = ({id(p) for p in groups[g]} for g in ("encoder", "head"))
    assert enc and head and not enc & head
    assert enc | head == {id(p) for p in net.parameters()}
    assert len(groups["encoder"]) + len(groups["head"]) == len(list(net.parameters()))


def test_a_teacher_keeps_the_heads_asked_for_and_the_ema_covers_them(family: tuple[str, SegModel]) -> None:
    _, net = family
    bare, with_head = copy.deepcopy(net), copy.deepcopy(net)
    bare.keep_heads([])
    with_head.keep_heads(["projection"])
    assert list(bare.heads) == [] and list(with_head.heads) == ["projection"]
    with torch.no_grad():
        for p in with_head.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in with_head.state_dict().items()}
    ema_update(with_head, net, 0.5)  # the student may hold more heads than the teacher
    student = net.state_dict()
    for k, t in with_head.state_dict().items():
        expected = 0.5 * before[k] + 0.5 * student[k] if t.is_floating_point() else student[k]
        torch.testing.assert_close(t, expected, msg=k)  # averaged, the head included
    assert any(k.startswith("heads.projection.") for k in before)
    with pytest.raises(ConfigError, match=r"method\.teacher_heads names"):
        copy.deepcopy(net).keep_heads(["nope"])


def test_checkpoint_round_trip_rebuilds_the_inference_network(family: tuple[str, SegModel], tmp_path: Path) -> None:
    name, net = family
    state = {f"net.model.{k}": v for k, v in net.model.state_dict().items()}
    state.update({f"net.heads.{k}": v for k, v in net.heads.state_dict().items()})
    config = {"model": FAMILIES[name], "data": {"num_classes": K}}
    torch.save({"state_dict": state, "segcon": {"config": config}}, tmp_path / "run.ckpt")
    ckpt = load_run_checkpoint(tmp_path / "run.ckpt")
    torch.manual_seed(123)  # other initial weights: only the loaded ones can make the outputs equal
    rebuilt = build_inference_net(OmegaConf.create(config), ckpt, "student")
    x = torch.randn(1, 3, *SIZES[name][0])
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x))


@pytest.mark.slow
def test_onnx_and_torchscript_parity(family: tuple[str, SegModel], tmp_path: Path) -> None:
    name, net = family
    model = net.eval().model
    shapes = [(2, 3, *SIZES[name][0]), (1, 3, *SIZES[name][1])]
    example = torch.randn(*shapes[0])
    runners = {"onnx": export_onnx(model, example, tmp_path / "m.onnx", net.input_divisor, {}, None),
               "torchscript": export_torchscript(model, example, tmp_path / "m.pt", {})}
    for fmt, run in runners.items():
        results = check_parity(model, run, shapes, 1e-4)
        assert all(r.ok and r.argmax_agree > 0.999 for r in results), (fmt, results)


def _toy_cfg(tiny_cfg: Callable[..., DictConfig], *overrides: str) -> DictConfig:
    cfg = tiny_cfg(*overrides)
    projection = cfg.model.get("projection")
    with open_dict(cfg):
        cfg.model = OmegaConf.create({"_target_": "tests.toy_model.TinyNet", "num_classes": "${data.num_classes}",
                                      "width": 6, "projection": projection})
    return cfg


@pytest.mark.slow
def test_a_family_that_is_not_smp_trains_evaluates_exports_and_predicts(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Nothing outside segcon/models knows the library that built a network."""
    from segcon import evaluate, export, predict
    from segcon.train import train

    cfg = _toy_cfg(tiny_cfg, "contrast=pixel", "contrast.pixel.warmup_steps=0", "trainer.max_steps=4")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val/mIoU"] <= 1.0
    assert evaluate.main([f"ckpt={run}", "logger=csv", f"out_dir={tmp_path / 'eval'}"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["val/mIoU"] == metrics["val/mIoU"]
    assert export.main([f"ckpt={run}", "format=onnx", f"out={tmp_path / 'toy.onnx'}", "check_sizes=[[32,48]]"]) == 0
    assert "exporting the student TinyNet width 6" in capsys.readouterr().out
    images = Path(cfg.data.root) / "images" / "val"
    assert predict.main([f"ckpt={run}", f"input={images}", f"output={tmp_path / 'pred'}"]) == 0
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == len(list(images.glob("*.png")))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixmatch", "unimatch"])
def test_a_family_that_is_not_smp_trains_with_teacher_student_methods(
    method: str, tiny_cfg: Callable[..., DictConfig]
) -> None:
    from segcon.train import train

    cfg = _toy_cfg(tiny_cfg, f"method={method}", "data.labeled_count=4", "trainer.max_steps=3", "contrast=pixel",
                   "contrast.pixel.warmup_steps=0", "method.teacher_heads=[projection]")
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("teacher.heads.projection.") for k in ckpt["state_dict"])
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["val/teacher/mIoU"] >= 0.0


def test_offline_config_switches_off_every_weight_source_the_family_names(family: tuple[str, SegModel]) -> None:
    """Rebuilding a trained model (segcon-eval, -predict, -export) reads no weight file and
    downloads nothing: the config keys naming weights are null, every other key is kept."""
    name, net = family
    config = {**FAMILIES[name]}
    for key in ("weights_path", "encoder_weights"):
        if key in inspect.signature(type(net).__init__).parameters:
            config[key] = "/weights/file.pth" if key == "weights_path" else "imagenet"
    offline = type(net).offline_config(config)
    assert {k: v for k, v in offline.items() if v is not None} == \
        {k: v for k, v in config.items() if k not in ("weights_path", "encoder_weights")}
    assert offline.get("weights_path") is None and offline.get("encoder_weights") is None
