"""DPT on a DINOv2 ViT: the network of UniMatch V2 (Yang et al. 2025), with segcon's model contract.

The encoder is timm's `vit_{small,base,large}_patch14_dinov2` (random init, timm's hub weights
with `encoder_weights: timm`, or a local file of DINOv2's published checkpoint: its key names are
timm's, and its `mask_token` is skipped). Four intermediate layers (`layers`: 2, 5, 8, 11 for S and
B, 4, 11, 17, 23 for L), layer-normed, without the class token, are the encoder's stages: token
grids `[B, C, H/14, W/14]`. The DPT head reassembles them (a 1×1 projection to `out_channels[i]`,
then ×4, ×2, ×1 and ×½ resampling: 1/3.5 to 1/28 of the input, DPT's 1/4 to 1/32 at patch 16),
brings each to `features` channels, fuses them deepest first (residual conv units, ×2 bilinear
upsampling) into a map at 1/1.75 of the input, and classifies it (3×3 conv, ReLU, 1×1 conv); the
scores are upsampled bilinearly to the input.

Sizes that are not multiples of the patch size (14 for DINOv2; `encoder_kwargs.patch_size` sets
another for a ViT trained from scratch) are padded at the right and bottom with zeros (the
normalised mean) to the next multiple, and the scores are cropped back: any input size works
(`input_divisor` 1), and the patches see the image unresized.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from segcon.models.base import SegModel, on_meta
from segcon.models.heads import (
    DEFAULT_PROJECTION,
    WEIGHT_BRANCH,
    WeightBranch,
    projection_specs,
    weight_branch_depth,
)
from segcon.models.output import SegOutput
from segcon.models.segnet import load_pretrained
from segcon.utils.errors import ConfigError

VARIANTS: dict[str, dict[str, Any]] = {
    "vit_small_patch14_dinov2": {"layers": [2, 5, 8, 11], "features": 64, "out_channels": [48, 96, 192, 384]},
    "vit_base_patch14_dinov2": {"layers": [2, 5, 8, 11], "features": 128, "out_channels": [96, 192, 384, 768]},
    "vit_large_patch14_dinov2": {"layers": [4, 11, 17, 23], "features": 256, "out_channels": [256, 512, 1024, 1024]},
}
"""UniMatch V2's head settings per DINOv2 encoder (its small / base / large models)."""

ENCODER_WEIGHTS = (None, "timm")
_OWN_KEYS = ("_target_", "encoder_name", "num_classes", "encoder_weights", "encoder_kwargs", "weights_path",
             "weights_skip", "weights_rename", "layers", "features", "out_channels", "projection",
             "projections", "weight_branch", "input_norm")


class ResidualConvUnit(nn.Module):
    """`x + conv(relu(conv(relu(x))))` with 3×3 convolutions, `[B, F, h, w]` in and out."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT's feature fusion: the coarser path plus a residual unit of the skip, a second residual
    unit, bilinear upsampling (to `size`, else ×2) and a 1×1 convolution."""

    def __init__(self, features: int, skip: bool = True) -> None:
        super().__init__()
        self.skip_unit = ResidualConvUnit(features) if skip else None  # the deepest block has no skip
        self.unit = ResidualConvUnit(features)
        self.out = nn.Conv2d(features, features, 1)

    def forward(self, path: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            assert self.skip_unit is not None
            path = path + self.skip_unit(skip)
        path = self.unit(path)
        if size is None:
            path = F.interpolate(path, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            path = F.interpolate(path, size=size, mode="bilinear", align_corners=True)
        return self.out(path)


class DPTDecoder(nn.Module):
    """DPT's reassembly and fusion: four token grids `[B, C, h, w]` in, the fused decoder feature
    `[B, features, 8h, 8w]` out."""

    def __init__(self, embed_dim: int, features: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        oc = list(out_channels)
        self.projects = nn.ModuleList(nn.Conv2d(embed_dim, c, 1) for c in oc)
        self.resize = nn.ModuleList([nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                                     nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
                                     nn.Identity(),
                                     nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1)])
        self.layer_rn = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in oc)
        self.fusion = nn.ModuleList(FusionBlock(features, skip=i < 3) for i in range(4))  # shallowest first

    def forward(self, grids: Sequence[Tensor]) -> Tensor:
        maps = [rn(resize(project(g))) for g, project, resize, rn in
                zip(grids, self.projects, self.resize, self.layer_rn, strict=True)]
        path = self.fusion[3](maps[3], size=tuple(maps[2].shape[-2:]))
        path = self.fusion[2](path, maps[2], size=tuple(maps[1].shape[-2:]))
        path = self.fusion[1](path, maps[1], size=tuple(maps[0].shape[-2:]))
        return self.fusion[0](path, maps[0])


def dpt_classifier(features: int, num_classes: int) -> nn.Sequential:
    """DPT's segmentation head: `[B, features, h, w]` to scores `[B, K, h, w]` (3×3 conv, ReLU,
    1×1 conv)."""
    return nn.Sequential(nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(features, num_classes, 1))


class DPTNet(nn.Module):
    """The inference network: `images [B, 3, H, W] -> scores [B, K, H, W]` (any H, W: padded to
    multiples of the patch size and cropped back)."""

    def __init__(self, encoder_name: str, num_classes: int, layers: Sequence[int], features: int,
                 out_channels: Sequence[int], pretrained: bool = False,
                 encoder_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        import timm

        self.encoder = timm.create_model(encoder_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True,
                                         **dict(encoder_kwargs or {}))
        self.patch = int(self.encoder.patch_embed.patch_size[0])
        self.layers = [int(i) for i in layers]
        self.decoder = DPTDecoder(int(self.encoder.embed_dim), features, out_channels)
        self.classifier = dpt_classifier(features, num_classes)

    def grids(self, x: Tensor) -> list[Tensor]:
        """The four layers' normalised patch tokens as grids `[B, C, H/p, W/p]` (`x` padded to
        multiples of the patch size p)."""
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens = self.encoder.get_intermediate_layers(x, n=self.layers, reshape=False, norm=True)
        return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w) for t in tokens]

    def decode(self, grids: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """The fused decoder feature `[B, features, 8h, 8w]` of four grids `[B, C, h, w]` and its
        class scores `[B, K, 8h, 8w]`."""
        decoder = self.decoder(grids)
        return decoder, self.classifier(decoder)

    def forward(self, x: Tensor) -> Tensor:
        padded = pad_to_patches(x, self.patch)
        _, coarse = self.decode(self.grids(padded))
        return upsample_and_crop(coarse, padded.shape[-2:], x.shape[-2:])


def pad_to_patches(x: Tensor, patch: int) -> Tensor:
    """`x [B, C, H, W]` zero-padded at the right and bottom to multiples of `patch`."""
    # always padded (by 0 where it fits), so that an exported graph pads every size it is given
    return F.pad(x, (0, -x.shape[-1] % patch, 0, -x.shape[-2] % patch))


def upsample_and_crop(scores: Tensor, padded: Sequence[int], size: Sequence[int]) -> Tensor:
    """Scores at the padded input size (bilinear, corners aligned), cropped to `size`."""
    full = F.interpolate(scores, size=tuple(padded), mode="bilinear", align_corners=True)
    return full[..., : size[0], : size[1]]


class DPTDinoV2(SegModel):
    """The DPT-DINOv2 family (see the module docstring).

    Args:
        encoder_name: a timm DINOv2 ViT (`vit_{small,base,large}_patch14_dinov2`; others with
            `layers`, `features` and `out_channels` given).
        num_classes: K.
        encoder_weights: None (random init) or "timm" (timm's hub weights: downloads).
        encoder_kwargs: further `timm.create_model` arguments (`depth`, `embed_dim`, `num_heads`,
            `patch_size`: a small DINOv2-shaped ViT for CPU runs and tests).
        weights_path: a local file with DINOv2's published backbone weights (their key names),
            timm's, or a full model of this family.
        weights_skip: stored tensors not to load (`mask_token`: DINOv2's masked-image-modelling
            token, which a segmentation encoder has no use for).
        weights_rename: `{file prefix: model prefix}` for files that store the backbone under
            other names.
        layers, features, out_channels: the encoder layers read and the head's widths (default:
            UniMatch V2's for the encoder, `VARIANTS`).
        projection, projections: train-only projection heads as SegNet's; `source: decoder` reads
            the fused feature, `source: encoder` the token grids of `stages` (0-3).
        weight_branch: train-only CAC weight branch (`{depth: head}`: a fresh classifier on the
            detached fused feature; `{depth: decoder}`: a fresh reassembly, fusion and classifier
            on the detached token grids), None for none (contrast=cac sets it).
        input_norm: the input normalisation the weights expect (data.mean / data.std follow it).
    """

    def __init__(
        self,
        encoder_name: str,
        num_classes: int,
        encoder_weights: str | None = None,
        encoder_kwargs: Mapping[str, Any] | None = None,
        weights_path: str | None = None,
        weights_skip: Sequence[str] = ("mask_token",),
        weights_rename: Mapping[str, str] | None = None,
        layers: Sequence[int] | None = None,
        features: int | None = None,
        out_channels: Sequence[int] | None = None,
        projection: Mapping[str, Any] | None = None,
        projections: Mapping[str, Mapping[str, Any] | None] | None = None,
        weight_branch: Mapping[str, Any] | None = None,
        input_norm: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        settings = head_settings(encoder_name, layers, features, out_channels)
        self.model = DPTNet(encoder_name, num_classes, settings["layers"], settings["features"],
                            settings["out_channels"], encoder_weights == "timm", encoder_kwargs)
        self.num_classes = num_classes
        if weights_path:
            report = load_pretrained(self.model, str(weights_path), "auto", "name", list(weights_skip), weights_rename)
            rank_zero_info(f"model.weights_path: {report}")
        embed_dim = int(self.model.encoder.embed_dim)
        self.build_projection_heads(projection, projections, lambda spec: (
            embed_dim * len(spec["stages"]) if spec["source"] == "encoder" else settings["features"]))
        if weight_branch:
            self.heads[WEIGHT_BRANCH] = WeightBranch(self.model.decoder, self.model.classifier,
                                                     weight_branch_depth(weight_branch))

    @property
    def input_divisor(self) -> int:
        return 1

    def forward_features(self, x: Tensor, perturb: float = 0.0, heads: Collection[str] | None = None) -> SegOutput:
        """See SegModel.forward_features; `features` are the four token grids. With `perturb` > 0
        the head decodes the clean grids and a Dropout2d copy of them in one batch of 2B."""
        padded = pad_to_patches(x, self.model.patch)
        grids = self.model.grids(padded)
        decoded = [torch.cat([g, F.dropout2d(g, perturb, self.training)]) for g in grids] if perturb > 0 else grids
        decoder, coarse = self.model.decode(decoded)
        logits = upsample_and_crop(coarse, padded.shape[-2:], x.shape[-2:])
        b = x.shape[0]
        out = SegOutput(logits=logits[:b], decoder_logits=coarse[:b], features=grids, decoder=decoder[:b],
                        perturbed_logits=logits[b:] if perturb > 0 else None)
        return self._train_heads(out, padded.shape[-2:], heads)

    def forward_complementary(self, x: Tensor, masks: Tensor, heads: Collection[str] | None = None) -> SegOutput:
        """See SegModel.forward_complementary: the four token grids scaled by `masks [B, C]`
        (the same scales on every layer, as UniMatch V2 applies them) before the head."""
        padded = pad_to_patches(x, self.model.patch)
        scale = masks[:, :, None, None].to(x.dtype)
        grids = [g * scale for g in self.model.grids(padded)]
        decoder, coarse = self.model.decode(grids)
        out = SegOutput(logits=upsample_and_crop(coarse, padded.shape[-2:], x.shape[-2:]), decoder_logits=coarse,
                        features=grids, decoder=decoder)
        return self._train_heads(out, padded.shape[-2:], heads)

    def _train_heads(self, out: SegOutput, padded: Sequence[int], heads: Collection[str] | None) -> SegOutput:
        """`out` with the wanted projection heads' embeddings and CAC's weight-branch scores (at
        the logits' size and at the decoder's) added; `padded` is the padded input size."""
        self.run_projection_heads(out, heads)
        if WEIGHT_BRANCH in self.wanted_heads(heads):
            assert out.features is not None and out.decoder is not None
            weight_coarse, _ = self.heads[WEIGHT_BRANCH]((out.features,), out.decoder)
            out.weight_logits = upsample_and_crop(weight_coarse, padded, out.logits.shape[-2:])
            out.weight_decoder_logits = weight_coarse
        return out

    @property
    def feature_channels(self) -> int:
        """The width of every encoder feature (the ViT's embedding): what `masks` scales."""
        return int(self.model.encoder.embed_dim)

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> int:
        """Checks the encoder name and weights source, the head's settings and the projection
        heads (encoder stages 0-3); returns 1 (any input size)."""
        import timm

        name = str(config.get("encoder_name"))
        if not timm.is_model(name):
            raise ConfigError(f"model.encoder_name={name!r}: timm has no model of that name; the DINOv2 ones are "
                              f"{', '.join(sorted(VARIANTS))}")
        if config.get("encoder_weights") not in ENCODER_WEIGHTS:
            raise ConfigError(f"model.encoder_weights={config.get('encoder_weights')!r}: use null (random init, or a "
                              "local file as model.weights_path) or timm (timm's hub weights: downloads)")
        unknown = sorted(set(config) - set(_OWN_KEYS))
        if unknown:
            raise ConfigError(f"model has unknown key(s) {unknown} for DPTDinoV2; it takes {sorted(_OWN_KEYS[1:])}")
        settings = head_settings(name, config.get("layers"), config.get("features"), config.get("out_channels"))
        kwargs = dict(config.get("encoder_kwargs") or {})
        patch = kwargs.get("patch_size", 14)
        if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1:
            raise ConfigError(f"model.encoder_kwargs.patch_size={patch!r}: a positive integer (DINOv2's is 14)")
        try:
            encoder = on_meta(lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model.encoder_kwargs={kwargs}: timm cannot build {name} with them ({error}); they are "
                              "timm.create_model arguments such as depth, embed_dim, num_heads, patch_size") from None
        depth = len(encoder.blocks)
        if not all(0 <= int(i) < depth for i in settings["layers"]):
            raise ConfigError(f"model.layers={list(settings['layers'])}: the encoder has {depth} blocks (0-{depth - 1})")
        for name, spec in projection_specs(config.get("projection"), config.get("projections")).items():
            if spec["source"] == "encoder" and not set(spec["stages"]) <= {0, 1, 2, 3}:
                key = "model.projection" if name == DEFAULT_PROJECTION else f"model.projections.{name}"
                raise ConfigError(f"{key}.stages={list(spec['stages'])}: the DPT family's encoder stages are its four "
                                  "token grids 0, 1, 2, 3 (smp's are 2-5); for Contextrast on them use "
                                  "contrast=contextrast_vit")
        if config.get("weight_branch"):
            weight_branch_depth(config["weight_branch"])
        return 1

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        return f"DPT / {config.get('encoder_name')}"


def head_settings(encoder_name: str, layers: Sequence[int] | None, features: int | None,
                  out_channels: Sequence[int] | None) -> dict[str, Any]:
    """The encoder layers and head widths: those given, else UniMatch V2's for the encoder."""
    given = {"layers": layers, "features": features, "out_channels": out_channels}
    known = VARIANTS.get(encoder_name)
    if known is None and any(v is None for v in given.values()):
        raise ConfigError(f"model.encoder_name={encoder_name!r} has no DPT settings of UniMatch V2: give "
                          "model.layers (4 block indices), model.features and model.out_channels (4 widths)")
    settings = {k: v if v is not None else known[k] for k, v in given.items()}  # type: ignore[index]
    if len(settings["layers"]) != 4 or len(settings["out_channels"]) != 4:
        raise ConfigError(f"model.layers={settings['layers']} and model.out_channels={settings['out_channels']} "
                          "must name 4 encoder layers and 4 widths (the DPT head reassembles four)")
    return settings
