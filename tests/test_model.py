"""SegNet (the smp family): its perturbed decoding, heads, configuration checks, and loading local
weights. The contract every family shares is tested in test_model_contract.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from segcon.models.output import SegOutput
from segcon.models.segnet import SegNet
from segcon.utils.errors import ConfigError


@pytest.fixture(scope="module")
def net() -> SegNet:
    torch.manual_seed(0)
    return SegNet("fpn", "resnet18", num_classes=4)


def test_train_mode_returns_segoutput_eval_returns_logits(net: SegNet) -> None:
    x = torch.randn(2, 3, 64, 96)
    net.train()
    out = net(x)
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 4, 64, 96)
    assert [f.shape[-1] for f in out.features] == [96, 48, 24, 12, 6, 3]
    assert out.decoder is not None and out.embeddings == {}
    net.eval()
    with torch.no_grad():
        logits = net(x)
        assert isinstance(logits, torch.Tensor)
        torch.testing.assert_close(logits, net.forward_features(x).logits)


def test_perturbed_branch_decodes_clean_and_dropped_stages_in_one_batch() -> None:
    torch.manual_seed(0)
    net = SegNet("fpn", "resnet18", num_classes=4, projection={"dim": 8})
    x = torch.randn(2, 3, 64, 64)
    net.train()
    torch.manual_seed(3)
    out = net.forward_features(x, perturb=0.5)
    with torch.no_grad():  # by hand: one encoder pass, the decoder on [clean; Dropout2d(clean)]
        torch.manual_seed(3)
        stages = net.model.encoder(x)
        decoded = net.model.decoder([torch.cat([f, torch.nn.functional.dropout2d(f, 0.5, True)]) for f in stages])
        logits = net.model.segmentation_head(decoded)
        hidden = net.heads["projection"].stem(decoded[:2])
    torch.testing.assert_close(out.logits.detach(), logits[:2])
    torch.testing.assert_close(out.perturbed_logits.detach(), logits[2:])
    assert not torch.allclose(logits[:2], logits[2:], atol=1e-3)  # the dropout did perturb
    torch.testing.assert_close(out.embeddings["projection"].hidden.detach(), hidden)  # heads read the clean half
    assert out.decoder.shape[0] == 2
    net.eval()  # no dropout in eval mode: both halves are the plain prediction
    with torch.no_grad():
        out = net.forward_features(x, perturb=0.5)
        torch.testing.assert_close(out.perturbed_logits, net(x))
        torch.testing.assert_close(out.logits, net(x))


def test_segoutput_take_and_cat_round_trip() -> None:
    torch.manual_seed(0)
    net = SegNet("fpn", "resnet18", num_classes=4, projection={"dim": 8}, weight_branch={"depth": "head"})
    net.train()
    out = net(torch.randn(3, 3, 64, 64))
    whole = SegOutput.cat([out.take(slice(0, 1)), out.take(slice(1, 3))])
    assert torch.equal(whole.logits, out.logits) and torch.equal(whole.decoder, out.decoder)
    assert all(torch.equal(a, b) for a, b in zip(whole.features, out.features, strict=True))
    assert torch.equal(whole.weight_logits, out.weight_logits)
    emb = out.embeddings["projection"]
    index = torch.tensor([0, 5, emb.hidden[0, 0].numel() * 2 + 7])  # pixels of images 0 and 2
    torch.testing.assert_close(whole.embeddings["projection"].at(index), emb.at(index))
    part = out.take(slice(2, 3))
    torch.testing.assert_close(part.embeddings["projection"].at(torch.tensor([7])), emb.at(index[2:]))
    with pytest.raises(ValueError, match="different fields"):
        SegOutput.cat([out, SegOutput(logits=out.logits)])


def test_encoder_group_is_the_smp_encoder(net: SegNet) -> None:
    assert {id(p) for p in net.parameter_groups()["encoder"]} == {id(p) for p in net.model.encoder.parameters()}


@pytest.mark.parametrize(("arch", "encoder", "stride"), [("fpn", "resnet18", 32), ("deeplabv3plus", "resnet18", 16), ("unet", "resnet18", 1), ("segformer", "mit_b0", 32)])
def test_input_divisor_from_the_config_alone(arch: str, encoder: str, stride: int) -> None:
    assert SegNet.check_config({"arch": arch, "encoder_name": encoder, "num_classes": 3}) == stride
    assert SegNet(arch, encoder, num_classes=3).input_divisor == stride


@pytest.mark.parametrize(("config", "message"), [
    ({"arch": "foo"}, r"model.arch='foo' is not an smp architecture; valid: deeplabv3, deeplabv3plus, dpt, fpn"),
    ({"encoder_name": "resnet19"}, r"model.encoder_name='resnet19' is not an smp encoder; closest: resnet18"),
    ({"encoder_name": "tu-convnext_tiniest"}, r"timm has no model 'convnext_tiniest'; closest: tu-convnext_tiny"),
    ({"projection": {"source": "neck"}}, r"model.projection.source must be one of \('decoder', 'encoder'\)"),
    ({"projections": {"s3": {"dims": 8}}}, r"model.projections.s3 has unknown key\(s\) \['dims'\]"),
    ({"weight_branch": {"depth": "all"}}, r"model.weight_branch.depth must be one of"),
    ({"projections": {"ctx_1": {"source": "encoder", "stages": [0], "dim": 8}}},
     r"model\.projections\.ctx_1\.stages=\[0\]: smp's stage 0 is the input image"),
    ({"decoder_channels": "wide"}, r"model: smp cannot build unet / resnet18 with these settings"),
    ({"encoder_weights": "imagenet-22k"}, r"model.encoder_weights: Wrong pretrained weights"),
])
def test_bad_settings_name_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings = {"arch": "unet", "encoder_name": "resnet18", "num_classes": 3, **config}
        SegNet.check_config(settings)
        SegNet(**{k: v for k, v in settings.items() if k != "_target_"})  # caught only when built


def test_named_projections_one_per_stage_and_heads_on_request() -> None:
    torch.manual_seed(0)
    net = SegNet("fpn", "resnet18", num_classes=3, projection={"dim": 8},
                 projections={"s3": {"source": "encoder", "stages": [3], "dim": 4}, "off": None}).train()
    out = net(torch.randn(2, 3, 64, 64))
    assert sorted(out.embeddings) == ["projection", "s3"]
    assert out.embeddings["s3"].size == (8, 8) and out.embeddings["projection"].size == (16, 16)  # 1/8 and 1/4
    assert out.embeddings["s3"].at(torch.tensor([0, 100])).shape == (2, 4)
    assert net.forward_features(torch.randn(2, 3, 64, 64), heads=()).embeddings == {}
    assert sorted(net.forward_features(torch.randn(2, 3, 64, 64), heads=["s3"]).embeddings) == ["s3"]
    with pytest.raises(ConfigError, match="the name 'projection' is taken"):
        SegNet("fpn", "resnet18", num_classes=3, projections={"projection": {"dim": 4}})


def test_decoder_logits_are_the_classifier_before_its_upsampling() -> None:
    """FPN's head upsamples x4 (align_corners=True): `decoder_logits` are its 1/4-scale scores, and
    `logits_at` returns them unchanged at that size instead of resizing the upsampled logits back
    (which shifts them: their argmax differs)."""
    torch.manual_seed(0)
    net = SegNet("fpn", "resnet18", num_classes=4).train()
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    head = net.model.segmentation_head
    assert out.decoder_logits is not None and out.decoder_logits.shape == (2, 4, 16, 16)
    torch.testing.assert_close(out.decoder_logits, head[0](out.decoder))
    torch.testing.assert_close(out.logits, head(out.decoder))
    assert out.logits_at((16, 16)) is out.decoder_logits and out.logits_at((64, 64)) is out.logits
    resized_back = torch.nn.functional.interpolate(out.logits, size=(16, 16), mode="bilinear", align_corners=False)
    assert not torch.allclose(resized_back, out.decoder_logits, atol=1e-3)
    unet = SegNet("unet", "resnet18", num_classes=4).train()  # no upsampling in the head: no second copy
    assert unet(x).decoder_logits is None


def test_full_weights_round_trip_from_lightning_style_checkpoint(net: SegNet, tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.model.{k}": v for k, v in net.model.state_dict().items()}, "epoch": 3}, path)
    other = SegNet("fpn", "resnet18", num_classes=4, weights_path=str(path))
    for (k, a), b in zip(net.model.state_dict().items(), other.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_encoder_weights_from_safetensors_leave_head_untouched(net: SegNet, tmp_path: Path) -> None:
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in net.model.encoder.state_dict().items()}, str(path))
    torch.manual_seed(123)
    other = SegNet("fpn", "resnet18", num_classes=7, weights_path=str(path))
    for k, v in net.model.encoder.state_dict().items():
        assert torch.equal(v, other.model.encoder.state_dict()[k]), k
    torch.manual_seed(123)
    fresh = SegNet("fpn", "resnet18", num_classes=7)
    assert torch.equal(fresh.model.segmentation_head[0].weight, other.model.segmentation_head[0].weight)


def test_class_count_mismatch_is_a_clear_error(net: SegNet, tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save(net.model.state_dict(), path)
    with pytest.raises(ConfigError, match=r"with other shapes.*segmentation_head.*weights_scope=encoder"):
        SegNet("fpn", "resnet18", num_classes=5, weights_path=str(path))
    # ... and loading only the backbone from the same file works
    other = SegNet("fpn", "resnet18", num_classes=5, weights_path=str(path), weights_scope="encoder")
    assert torch.equal(other.model.encoder.conv1.weight, net.model.encoder.conv1.weight)


def test_wrong_architecture_and_pickled_objects_are_refused(tmp_path: Path, net: SegNet) -> None:
    path = tmp_path / "r18.pt"
    torch.save(net.model.state_dict(), path)
    with pytest.raises(ConfigError, match="do not fit the encoder"):
        SegNet("fpn", "resnet34", num_classes=4, weights_path=str(path))
    evil = tmp_path / "evil.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, evil)  # a pickled module, not a state dict
    with pytest.raises(ConfigError, match="weights_only=True"):
        SegNet("fpn", "resnet18", num_classes=4, weights_path=str(evil))
    with pytest.raises(ConfigError, match="not found"):
        SegNet("fpn", "resnet18", num_classes=4, weights_path=str(tmp_path / "missing.pt"))
