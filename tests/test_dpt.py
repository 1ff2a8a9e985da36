"""The DPT-DINOv2 family (segcon.models.dpt): the head's shapes, padding to patches, DINOv2's key
names, its checks and a training run. The shared model contract runs in test_model_contract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from segcon.models.dpt import DPTDecoder, DPTDinoV2, dpt_classifier
from segcon.utils.errors import ConfigError

TINY = {"encoder_kwargs": {"depth": 4, "embed_dim": 48, "num_heads": 2}, "layers": [0, 1, 2, 3], "features": 16,
        "out_channels": [8, 16, 32, 32]}
TINY_DPT = ("model=dpt_dinov2_s", "model.encoder_kwargs={depth: 4, embed_dim: 48, num_heads: 2}",
            "model.layers=[0,1,2,3]", "model.features=16", "model.out_channels=[8,16,32,32]")
"""TINY as command-line overrides."""


def _net(**extra) -> DPTDinoV2:
    torch.manual_seed(0)
    return DPTDinoV2("vit_small_patch14_dinov2", 3, **{**TINY, **extra})


@pytest.mark.parametrize(("h", "w"), [(56, 56), (28, 70), (42, 98)])
def test_the_head_reassembles_at_4_2_1_half_and_fuses_at_8x_the_grid(h: int, w: int) -> None:
    head, classifier = DPTDecoder(48, 16, [8, 16, 32, 32]), dpt_classifier(16, 3)
    gh, gw = h // 14, w // 14  # DINOv2's patch size
    grids = [torch.randn(2, 48, gh, gw) for _ in range(4)]
    maps = [rn(resize(project(g))) for g, project, resize, rn in zip(grids, head.projects, head.resize, head.layer_rn,
                                                                      strict=True)]
    half = ((gh + 1) // 2, (gw + 1) // 2)  # a stride-2, padding-1, 3x3 convolution
    assert [tuple(m.shape[-2:]) for m in maps] == [(4 * gh, 4 * gw), (2 * gh, 2 * gw), (gh, gw), half]
    assert all(m.shape[1] == 16 for m in maps)
    decoder = head(grids)
    scores = classifier(decoder)
    assert decoder.shape == (2, 16, 8 * gh, 8 * gw) and scores.shape == (2, 3, 8 * gh, 8 * gw)


@pytest.mark.parametrize(("patch", "padded_size"), [(None, (56, 70)), (6, (48, 66))])
def test_sizes_off_the_patch_grid_are_padded_with_zeros_and_cropped_back(
        patch: int | None, padded_size: tuple[int, int]) -> None:
    """The scores of a 45 x 61 image are those of its copy zero-padded to the next multiples of
    the patch size (DINOv2's 14, or `encoder_kwargs.patch_size` 6 for a ViT from scratch), cropped
    (same tokens, same interpolation grid); the grids are the padded size / the patch size."""
    size = 14 if patch is None else patch
    net = _net(encoder_kwargs={**TINY["encoder_kwargs"], **({} if patch is None else {"patch_size": patch})}).eval()
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        scores = net(x)
        grids = net.model.grids(F.pad(x, (0, padded_size[1] - 61, 0, padded_size[0] - 45)))
        coarse = net.model.classifier(net.model.decoder(grids))
        padded = F.interpolate(coarse, size=padded_size, mode="bilinear", align_corners=True)
    assert scores.shape == (1, 3, 45, 61)
    assert torch.equal(scores, padded[..., :45, :61])
    assert [tuple(g.shape[-2:]) for g in grids] == [(padded_size[0] // size, padded_size[1] // size)] * 4


def _dinov2_checkpoint(dim: int, depth: int, grid: int = 37) -> dict[str, torch.Tensor]:
    """A backbone state dict written from DINOv2's published key names and shapes (the
    facebookresearch/dinov2 hub checkpoints `dinov2_vit{s,b,l}14_pretrain.pth`: unchunked blocks,
    LayerScale `ls1`/`ls2`, a 518-pixel position table of 37 x 37 + 1 tokens, `mask_token`),
    not from timm's model, so a renamed key on either side fails the load."""
    g = torch.Generator().manual_seed(3)
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        for name, shape in {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                            "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                            "ls1.gamma": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
                            "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                            "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,), "ls2.gamma": (dim,)}.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def test_dinov2_key_names_load_into_the_encoder(tmp_path: Path) -> None:
    """A backbone state dict under DINOv2's published names loads into every tensor of the
    encoder (`mask_token`, used only by DINOv2's masked-image pretraining, is skipped); the head
    keeps its own initialisation; a wrong shape is refused naming the key."""
    state = _dinov2_checkpoint(dim=48, depth=4)
    file = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, file)
    fresh, loaded = _net(), _net(weights_path=str(file))
    encoder = loaded.model.encoder.state_dict()
    assert set(encoder) == set(state) - {"mask_token"}  # every encoder tensor comes from the file
    for key, value in encoder.items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(loaded.model.classifier[-1].weight, fresh.model.classifier[-1].weight)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save(state, file)
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.qkv\.weight"):
        _net(weights_path=str(file))


def test_settings_are_checked_before_building() -> None:
    base = {"encoder_name": "vit_small_patch14_dinov2", "num_classes": 3}
    assert DPTDinoV2.check_config(base) == 1
    with pytest.raises(ConfigError, match="4 blocks"):
        DPTDinoV2.check_config({**base, "encoder_kwargs": {"depth": 4}})
    with pytest.raises(ConfigError, match="timm has no model"):
        DPTDinoV2.check_config({**base, "encoder_name": "vit_small_patch16_dinov3x"})
    with pytest.raises(ConfigError, match="encoder_weights"):
        DPTDinoV2.check_config({**base, "encoder_weights": "imagenet"})
    with pytest.raises(ConfigError, match="no DPT settings"):
        DPTDinoV2.check_config({**base, "encoder_name": "vit_small_patch16_224"})
    with pytest.raises(ConfigError, match=r"model\.projection\.stages=\[3, 4\]: .* 0, 1, 2, 3"):
        DPTDinoV2.check_config({**base, "projection": {"source": "encoder", "stages": [3, 4], "dim": 8}})
    with pytest.raises(ConfigError, match=r"model\.projections\.ctx_3\.stages=\[4\]: .*contrast=contextrast_vit"):
        DPTDinoV2.check_config({**base, "projections": {"ctx_3": {"source": "encoder", "stages": [4], "dim": 8}}})
    with pytest.raises(ConfigError, match=r"model\.encoder_kwargs\.patch_size=0: a positive integer"):
        DPTDinoV2.check_config({**base, "encoder_kwargs": {"patch_size": 0}})
    with pytest.raises(ConfigError, match=r"model\.encoder_kwargs=\{'depthh': 4\}: timm cannot build"):
        DPTDinoV2.check_config({**base, "encoder_kwargs": {"depthh": 4}})
    with pytest.raises(ConfigError, match=r"weight_branch\.depth"):
        DPTDinoV2.check_config({**base, "weight_branch": {"depth": "encoder"}})


def test_a_tiny_dinov2_trains_and_evaluates_through_segcon_train(tiny_cfg: Callable[..., DictConfig]) -> None:
    from segcon.train import train

    cfg = tiny_cfg(*TINY_DPT, "optim.head_lr_mult=40", "trainer.max_steps=2", "trainer.max_epochs=-1")
    metrics = train(cfg)
    assert 0.0 <= metrics["val/mIoU"] <= 1.0


def test_every_parameter_reaches_the_scores() -> None:
    """DDP without find_unused_parameters needs it: no head block without a gradient (the deepest
    fusion block has no skip, so no unit for one)."""
    net = _net(projection=None).train()
    net.forward_features(torch.randn(2, 3, 42, 56)).logits.sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("contrast", ["pixel", "pixel_memory", "cac", "contextrast_vit"])
def test_every_contrastive_term_trains_the_vit(contrast: str, tiny_cfg: Callable[..., DictConfig]) -> None:
    """Each contrast group on a tiny DPT as the user selects it: the module builds, the term's
    loss on a labeled batch (past its warm-up) is finite and positive, and its gradient reaches the
    ViT; CAC's weight branch reads detached features (no path from its scores to the network)."""
    from segcon.build import build_module
    from segcon.models.heads import WEIGHT_BRANCH
    from segcon.objectives.base import Targets

    cfg = tiny_cfg(*TINY_DPT, f"contrast={contrast}")
    torch.manual_seed(0)
    module = build_module(cfg).train()
    net, k = module.net, int(cfg.data.num_classes)
    labels = F.interpolate(torch.arange(16.0).reshape(1, 1, 4, 4).remainder(k).repeat(2, 1, 1, 1), size=(112, 112),
                           mode="nearest")[:, 0].long()  # 16 blocks of every class in each image
    out = net.forward_features(torch.randn(2, 3, 112, 112))  # 8 x 8 token grids: >= 5 pixels a class
    loss, logs = module.objective.contrast_loss(out, Targets(labels=labels), step=10**6)
    assert torch.isfinite(loss) and float(loss.detach()) > 0, logs
    encoder = list(net.model.encoder.parameters())
    grads = torch.autograd.grad(loss, encoder, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    if contrast == "cac":
        assert out.weight_logits is not None and out.weight_logits.shape == (2, k, 112, 112)
        weight_grads = torch.autograd.grad(out.weight_logits.sum(), [*encoder, *net.model.decoder.parameters()],
                                           allow_unused=True)
        assert all(g is None for g in weight_grads)
        assert all(p.requires_grad for p in net.heads[WEIGHT_BRANCH].parameters())
