"""Train-only heads. They live in `SegNet.heads` and never reach the inference graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcon.utils.errors import ConfigError

PROJECTION_KINDS = ("convmlp", "linear")


class ProjectionHead(nn.Module):
    """Maps a feature map `[B, C, h, w]` to L2-normalised embeddings `[B, D, h, w]`.

    kind "convmlp": 1x1 conv C->C, BatchNorm, ReLU, 1x1 conv C->D (ContrastiveSeg);
    kind "linear": a single 1x1 conv C->D.
    """

    def __init__(self, in_channels: int, dim: int = 256, kind: str = "convmlp") -> None:
        super().__init__()
        if kind == "convmlp":
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 1),
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(in_channels, dim, 1),
            )
        elif kind == "linear":
            self.proj = nn.Conv2d(in_channels, dim, 1)
        else:
            raise ConfigError(f"model.projection.kind must be one of {PROJECTION_KINDS}, got {kind!r}")

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(x), dim=1)


def concat_stages(features: list[Tensor], stages: list[int]) -> Tensor:
    """Encoder stages (indices into smp's feature list; zero-channel stages skipped) upsampled
    bilinearly to the largest of them and concatenated: `[B, sum C_i, h, w]`."""
    chosen = [features[i] for i in stages if features[i].shape[1] > 0]
    size = max((tuple(f.shape[-2:]) for f in chosen), key=lambda hw: hw[0] * hw[1])
    resized = [f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
               for f in chosen]
    return torch.cat(resized, dim=1)
