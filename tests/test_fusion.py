"""The multi-stage fusion network: side outputs recomputed by hand, their deep supervision in the
Objective, its settings' checks, and a run with loss=imbalance (the contract test covers the rest:
tests/test_model_contract.py)."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from segcon.models.output import SegOutput
from segcon.models.segnet import SegNet
from segcon.objectives.base import Targets
from segcon.objectives.objective import Objective
from segcon.objectives.supervised import CrossEntropyLoss
from segcon.utils.errors import ConfigError

K = 3


def test_side_outputs_are_upsampled_one_by_one_convolutions_of_the_stages_and_fuse_into_the_logits() -> None:
    torch.manual_seed(0)
    net = SegNet("fusion", "resnet18", K, side_stages=[2, 3, 5], side_weights=[1.0, 1.0, 1.0]).train()
    x = torch.randn(2, 3, 64, 96)
    out = net(x)
    stages = net.model.encoder(x)
    sides = out.side_logits
    assert len(sides) == 3
    for side, conv, stage in zip(sides, net.model.decoder.sides, [2, 3, 5], strict=True):
        by_hand = F.interpolate(conv(stages[stage]), size=(64, 96), mode="bilinear", align_corners=False)
        torch.testing.assert_close(side, by_hand)
    fuse = net.model.segmentation_head[0]  # the 1x1 conv over the concatenated side outputs
    assert fuse.kernel_size == (1, 1) and fuse.in_channels == 3 * K
    torch.testing.assert_close(out.logits, fuse(torch.cat(sides, 1)))


def test_every_side_output_is_supervised_with_the_loss_terms_and_their_weights() -> None:
    g = torch.Generator().manual_seed(1)
    logits, a, b = (torch.randn(2, K, 8, 8, generator=g, requires_grad=True) for _ in range(3))
    labels = torch.randint(0, K, (2, 8, 8), generator=g)
    labels[0, :2] = 255
    output = SegOutput(logits=logits, side_logits=[a, b])
    objective = Objective({"ce": CrossEntropyLoss()}, side_weights=[0.5, 2.0])
    total, logs = objective(output, Targets(labels), step=0)
    ce = [F.cross_entropy(t, labels, ignore_index=255) for t in (logits, a, b)]
    assert total.item() == pytest.approx((ce[0] + 0.5 * ce[1] + 2.0 * ce[2]).item(), rel=1e-6)
    assert logs["loss_ce_side"].item() == pytest.approx((0.5 * ce[1] + 2.0 * ce[2]).item(), rel=1e-6)
    total.backward()
    assert a.grad is not None and b.grad is not None
    with pytest.raises(ConfigError, match="side_weights must give one weight each"):
        Objective({"ce": CrossEntropyLoss()}, side_weights=[1.0])(output, Targets(labels), step=0)


def test_side_settings_are_checked() -> None:
    base = {"arch": "fusion", "encoder_name": "resnet18", "num_classes": K, "side_stages": [1, 2, 3, 4, 5]}
    assert SegNet.check_config({**base, "side_weights": [1.0] * 5}) == 32
    with pytest.raises(ConfigError, match="must list 5 weights"):
        SegNet.check_config({**base, "side_weights": [1.0] * 4})
    with pytest.raises(ConfigError, match=r"side_stages=.*must be among"):
        SegNet.check_config({**base, "side_stages": [0, 6], "side_weights": [1.0, 1.0]})
    with pytest.raises(ConfigError, match="this architecture has none"):
        SegNet.check_config({"arch": "unet", "encoder_name": "resnet18", "num_classes": K, "side_weights": [1.0]})


def test_fusion_net_trains_with_the_imbalance_loss_and_deep_supervision(tiny_cfg: Callable[..., DictConfig]) -> None:
    from segcon.train import train

    cfg = tiny_cfg("model=fusion_r18", "loss=imbalance", "trainer.max_steps=3")
    train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    for key in ("train/loss_imbalance", "train/loss_imbalance_side"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), key


def _crack_photo(n: int = 4, size: int = 128) -> torch.Tensor:
    """Road-surface-like images `[n, 3, size, size]` scaled to [-1, 1] (the EfficientNet-Lite
    normalisation): grey asphalt with low-frequency shading and grain, crossed by a thin dark
    curve, as in a CrackForest photograph."""
    g = torch.Generator().manual_seed(3)
    shade = F.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    grain = 0.08 * torch.randn(n, 1, size, size, generator=g)
    image = 0.45 + 0.2 * shade + grain
    rows = torch.arange(size).float().view(1, size, 1)
    cols = torch.arange(size).float().view(1, 1, size)
    phase = torch.rand(n, 1, 1, generator=g) * 6.28
    centre = size / 2 + size / 4 * torch.sin(cols / size * 6.28 + phase)
    crack = ((rows - centre).abs() < 1.5).unsqueeze(1)
    image = torch.where(crack, image * 0.3, image).clamp(0, 1).expand(n, 3, size, size)
    return (image - 0.5) / 0.5


def test_an_untrained_fusion_network_on_an_imagenet_encoder_has_no_opinion() -> None:
    """Under `fusion_init: hed` no pixel of a photograph reaches the presets' pseudo-label threshold
    0.95 before training (a teacher copied from it keeps nothing), where smp's initialisation is
    certain on a large share of them (on CrackForest photographs, measured: 70 % of the pixels,
    43 % of them crack). The bound: an untrained network should not prefer a class, and 0.95 is
    the confidence the teacher-student presets trust."""
    from tests.test_pretrained import LITE0_FILE

    x = _crack_photo()
    kept = {}
    for init in ("hed", "kaiming"):
        torch.manual_seed(0)
        net = SegNet("fusion", "tu-tf_efficientnet_lite0", 2, weights_path=LITE0_FILE, weights_scope="encoder",
                     weights_match="order", weights_skip=["_conv_head.", "_bn1.", "_fc."],
                     side_weights=[1.0] * 5, fusion_init=init).train()
        with torch.no_grad():
            kept[init] = (net(x).logits.softmax(1).amax(1) >= 0.95).float().mean().item()
    assert kept["hed"] == 0.0
    assert kept["kaiming"] > 0.2  # the batch is one on which the old start is certain


def test_hed_start_fuses_the_mean_of_the_sides_and_every_weight_gets_its_gradient() -> None:
    torch.manual_seed(0)
    net = SegNet("fusion", "resnet18", K, side_stages=[1, 3, 5], side_weights=[1.0] * 3).train()
    for conv in net.model.decoder.sides:
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.15) and not conv.bias.any()
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    sides = out.side_logits
    assert [tuple(s.shape) for s in sides] == [(2, K, 64, 64)] * 3 and out.logits.shape == (2, K, 64, 64)
    torch.testing.assert_close(out.logits, torch.stack(sides).mean(0))
    # d loss / d fusion weight [k, j] = sum over pixels of d loss / d logit_k * concatenated side j
    out.logits.retain_grad()
    labels = torch.randint(0, K, (2, 64, 64))
    F.cross_entropy(out.logits, labels).backward()
    fuse = net.model.segmentation_head[0]
    by_hand = torch.einsum("bkhw,bjhw->kj", out.logits.grad, torch.cat(sides, 1).detach())
    torch.testing.assert_close(fuse.weight.grad[:, :, 0, 0], by_hand)
    torch.testing.assert_close(fuse.bias.grad, out.logits.grad.sum((0, 2, 3)))
    assert all(conv.weight.grad.abs().sum() > 0 for conv in net.model.decoder.sides)
    with pytest.raises(ConfigError, match="fusion_init"):
        SegNet("fusion", "resnet18", K, side_weights=[1.0] * 5, fusion_init="xavier")
