"""The multi-stage fusion network (`model=fusion_*`, arch `fusion`): our reconstruction of the
fusion architecture of Liu 2022 (METHODS.md §3(f)), in the HED / DeepCrack manner.

Every encoder stage (strides 2 to 32 of an smp encoder) gets a side output, a 1x1 convolution to
K class scores upsampled bilinearly to the input size; the side outputs, concatenated, are the
"decoder feature" `[B, S*K, H, W]`, and a 1x1 convolution fuses them into the final map. The
model is an smp `SegmentationModel` (encoder, decoder, segmentation_head), so SegNet hosts it like
any smp architecture: pretrained encoders, projection heads, export and every inference mode work
unchanged. SegNet returns the side outputs as `SegOutput.side_logits`, and the Objective
supervises each of them with the supervised loss terms (`model.side_weights`).

Initialisation (`model.fusion_init`): "hed", as HED (Xie & Tu 2015) starts its side outputs and
fusion: side weights drawn from N(0, 0.01²) with zero biases, and the fusion the mean of the side
outputs (weight 1/S from each side's score of the same class, zero bias). An ImageNet encoder's
stage outputs have std 4-6 and reach 48, so smp's ReLU-gain initialisation ("kaiming", the
choice before) gives side scores of std 4-9 and an untrained network that is certain (max
probability ≥ 0.95) on most pixels of a photograph, which a teacher then hands on as
pseudo-labels; under "hed" the untrained network has no opinion.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base.heads import SegmentationHead
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor, nn

from segcon.utils.errors import ConfigError

INITS = ("hed", "kaiming")
"""The initialisations of side outputs and fusion (`model.fusion_init`)."""

SIDE_STD = 0.01
"""HED's standard deviation of the side-output weights."""


class SideFusionDecoder(nn.Module):
    """Side outputs of the encoder stages `stages`: `features -> [B, S*K, H, W]` (the S side
    score maps at the size of `features[0]`, the input, concatenated in stage order)."""

    def __init__(self, encoder_channels: Sequence[int], num_classes: int, stages: Sequence[int]) -> None:
        super().__init__()
        self.stages, self.num_classes = list(stages), num_classes
        self.sides = nn.ModuleList(nn.Conv2d(encoder_channels[i], num_classes, kernel_size=1) for i in self.stages)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        sides = []
        for conv, i in zip(self.sides, self.stages, strict=True):
            side = conv(features[i])
            if side.shape[-2:] != size:
                side = F.interpolate(side, size=size, mode="bilinear", align_corners=False)
            sides.append(side)
        return torch.cat(sides, 1)

    def split(self, fused_input: Tensor) -> list[Tensor]:
        """The side outputs `[B, K, H, W]` of a decoder output, in stage order."""
        return list(fused_input.split(self.num_classes, 1))


class FusionModel(SegmentationModel):
    """An smp encoder with side outputs fused by a 1x1 convolution (see the module docstring).

    Args:
        encoder_name: smp encoder (`tu-<name>` for timm).
        encoder_weights: smp pretrained-weight name (downloads); None for random init.
        in_channels: image channels.
        classes: K.
        side_stages: the encoder stages with a side output (default: every stage of stride 2 to
            32 that has channels).
        fusion_init: "hed" (small side weights, the fusion the mean of the sides) or "kaiming" (smp's
            default for decoders and heads); see the module docstring.
    """

    def __init__(
        self,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        in_channels: int = 3,
        classes: int = 2,
        side_stages: Sequence[int] | None = None,
        fusion_init: str = "hed",
    ) -> None:
        super().__init__()
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=5, weights=encoder_weights)
        channels = list(self.encoder.out_channels)
        stages = list(side_stages) if side_stages is not None else [i for i in range(1, len(channels)) if channels[i] > 0]
        bad = [i for i in stages if not 1 <= i < len(channels) or channels[i] == 0]
        if not stages or bad:
            raise ConfigError(f"model.side_stages={list(stages)}: stages with a side output must be among "
                              f"{[i for i in range(1, len(channels)) if channels[i] > 0]} for {encoder_name}")
        self.decoder = SideFusionDecoder(channels, classes, stages)
        self.segmentation_head = SegmentationHead(len(stages) * classes, classes, kernel_size=1)
        self.classification_head = None
        self.name = f"fusion-{encoder_name}"
        if fusion_init not in INITS:
            raise ConfigError(f"model.fusion_init={fusion_init!r} must be one of {list(INITS)}")
        self.initialize()
        if fusion_init == "hed":
            self._hed_init()

    @torch.no_grad()
    def _hed_init(self) -> None:
        """Side convolutions from N(0, SIDE_STD²) with zero biases; the fusion the mean of the S
        side outputs: out_k = Σ_s side_{s,k} / S."""
        for conv in self.decoder.sides:
            nn.init.normal_(conv.weight, std=SIDE_STD)
            nn.init.zeros_(conv.bias)
        fuse = self.segmentation_head[0]
        k, sides = self.decoder.num_classes, len(self.decoder.stages)
        fuse.weight.zero_()
        fuse.bias.zero_()
        for s in range(sides):
            fuse.weight[torch.arange(k), s * k + torch.arange(k), 0, 0] = 1.0 / sides
