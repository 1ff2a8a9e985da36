"""SegNet's output contract, parameter groups, and loading local weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from segcon.models.segnet import SegNet, SegOutput, required_input_divisor
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
    assert out.decoder is not None and out.embedding is None
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
    torch.testing.assert_close(out.aux["perturbed_logits"].detach(), logits[2:])
    assert not torch.allclose(logits[:2], logits[2:], atol=1e-3)  # the dropout did perturb
    torch.testing.assert_close(out.embedding.hidden.detach(), hidden)  # heads read the clean half
    assert out.decoder.shape[0] == 2
    net.eval()  # no dropout in eval mode: both halves are the plain prediction
    with torch.no_grad():
        out = net.forward_features(x, perturb=0.5)
        torch.testing.assert_close(out.aux["perturbed_logits"], net(x))
        torch.testing.assert_close(out.logits, net(x))


def test_segoutput_take_and_cat_round_trip() -> None:
    torch.manual_seed(0)
    net = SegNet("fpn", "resnet18", num_classes=4, projection={"dim": 8}, weight_branch={"depth": "head"})
    net.train()
    out = net(torch.randn(3, 3, 64, 64))
    whole = SegOutput.cat([out.take(slice(0, 1)), out.take(slice(1, 3))])
    assert torch.equal(whole.logits, out.logits) and torch.equal(whole.decoder, out.decoder)
    assert all(torch.equal(a, b) for a, b in zip(whole.features, out.features, strict=True))
    assert torch.equal(whole.aux["weight_logits"], out.aux["weight_logits"])
    index = torch.tensor([0, 5, out.embedding.hidden[0, 0].numel() * 2 + 7])  # pixels of images 0 and 2
    torch.testing.assert_close(whole.embedding.at(index), out.embedding.at(index))
    part = out.take(slice(2, 3))
    torch.testing.assert_close(part.embedding.at(torch.tensor([7])), out.embedding.at(index[2:]))
    with pytest.raises(ValueError, match="different fields"):
        SegOutput.cat([out, SegOutput(logits=out.logits)])


def test_parameter_groups_partition_all_parameters(net: SegNet) -> None:
    enc = {id(p) for p in net.encoder_parameters()}
    head = {id(p) for p in net.head_parameters()}
    assert not enc & head
    assert enc | head == {id(p) for p in net.parameters()}
    assert enc == {id(p) for p in net.model.encoder.parameters()}


@pytest.mark.parametrize(("arch", "encoder", "stride"), [("fpn", "resnet18", 32), ("deeplabv3plus", "resnet18", 16), ("unet", "resnet18", 1), ("segformer", "mit_b0", 32)])
def test_required_input_divisor(arch: str, encoder: str, stride: int) -> None:
    assert required_input_divisor(arch, encoder) == stride


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
