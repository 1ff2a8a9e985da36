"""Train-only heads. They live in `SegNet.heads` and never reach the inference graph."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcon.utils.errors import ConfigError

PROJECTION_KINDS = ("convmlp", "linear", "residual")
WEIGHT_BRANCH_DEPTHS = ("head", "decoder")


def gather_pixels(feature: Tensor, index: Tensor) -> Tensor:
    """Rows `[M, C]` of `feature [B, C, h, w]` at flat pixel indices `index [M]` into
    `[B * h * w]`, without materialising a permuted copy of the whole map."""
    n = feature.shape[2] * feature.shape[3]
    return feature.flatten(2)[index // n, :, index % n]


@dataclass
class PixelEmbedding:
    """A projection head's output, finished only where a loss looks.

    The head's layers up to its last pointwise (1x1) layer run over the whole map — so batch
    normalisation sees every pixel — and give `hidden`; `finish` applies the rest (the last
    linear layer, a residual, the L2 normalisation) to gathered rows. Because that rest is
    pointwise, `at(index)` equals gathering from the full embedding map, at a fraction of the
    cost: a contrastive loss reads about a thousand of the B·h·w pixels.

    Attributes:
        hidden: `[B, C, h, w]` the head's per-pixel state before its pointwise tail.
        finish: rows `[M, C]` -> L2-normalised embeddings `[M, D]`.
    """

    hidden: Tensor
    finish: Callable[[Tensor], Tensor]

    @classmethod
    def from_dense(cls, embedding: Tensor) -> PixelEmbedding:
        """Wrap a full embedding map `[B, D, h, w]` (it is L2-normalised row-wise on use)."""
        return cls(embedding, lambda rows: F.normalize(rows, dim=1))

    @property
    def size(self) -> tuple[int, int]:
        """`(h, w)`, the embedding resolution."""
        return int(self.hidden.shape[2]), int(self.hidden.shape[3])

    def at(self, index: Tensor) -> Tensor:
        """Embeddings `[M, D]` at flat pixel indices `index [M]` into `[B * h * w]`."""
        return self.finish(gather_pixels(self.hidden, index))

    def dense(self) -> Tensor:
        """The full embedding map `[B, D, h, w]` (costly; losses use `at`)."""
        b, c, h, w = self.hidden.shape
        rows = self.finish(self.hidden.permute(0, 2, 3, 1).reshape(-1, c))
        return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def zero(self) -> Tensor:
        """A 0 connected to every parameter of the head (for batches without anchors, so DDP
        sees no unused parameter)."""
        return self.at(torch.zeros(0, dtype=torch.long, device=self.hidden.device)).sum() + self.hidden.sum() * 0.0


class ProjectionHead(nn.Module):
    """Maps a feature map `[B, C, h, w]` to a `PixelEmbedding` of dimension D.

    kind "convmlp" (ContrastiveSeg): 1x1 conv C->C, BN, ReLU | linear C->D;
    kind "linear": | linear C->D;
    kind "residual" (CAC's head): 1x1 conv C->D, BN, ReLU | h + linear D->D.
    The layers before "|" run over the whole map, the rest on gathered pixels; the output is
    L2-normalised.
    """

    def __init__(self, in_channels: int, dim: int = 256, kind: str = "convmlp") -> None:
        super().__init__()
        if kind not in PROJECTION_KINDS:
            raise ConfigError(f"model.projection.kind must be one of {PROJECTION_KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.stem = nn.Identity()
            self.out = nn.Linear(in_channels, dim)
        else:
            width = in_channels if kind == "convmlp" else dim
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            self.out = nn.Linear(width, dim)

    def finish(self, rows: Tensor) -> Tensor:
        """Pointwise tail on gathered rows `[M, C']` -> L2-normalised `[M, D]`."""
        out = self.out(rows)
        if self.kind == "residual":
            out = rows + out
        return F.normalize(out, dim=1)

    def forward(self, x: Tensor) -> PixelEmbedding:
        return PixelEmbedding(self.stem(x), self.finish)


class WeightBranch(nn.Module):
    """CAC's weight branch (METHODS.md §1): a second classifier on **detached** features.

    depth "head": a fresh copy of the segmentation head, reading the detached decoder feature
    (the main classifier's input). depth "decoder": fresh copies of the decoder and the head,
    reading the detached encoder stages (as CAC does for SegFormer). Either way no gradient
    reaches the shared network through this branch. Returns logits `[B, K, h, w]` at the main
    classifier's resolution.
    """

    def __init__(self, decoder: nn.Module, segmentation_head: nn.Module, depth: str = "head") -> None:
        super().__init__()
        if depth not in WEIGHT_BRANCH_DEPTHS:
            raise ConfigError(f"model.weight_branch.depth must be one of {WEIGHT_BRANCH_DEPTHS}, got {depth!r}")
        self.depth = depth
        self.decoder = _fresh_copy(decoder) if depth == "decoder" else None
        self.head = _fresh_copy(segmentation_head)

    def forward(self, decoder_inputs: tuple, decoder_feature: Tensor) -> Tensor:
        """`decoder_inputs`: what the main decoder was called with (the encoder stages, plus
        prefix tokens for ViT encoders); `decoder_feature`: `[B, C, h, w]`, the main head's input."""
        if self.decoder is None:
            return self.head(decoder_feature.detach())
        return self.head(self.decoder(*(_detached(x) for x in decoder_inputs)))


def _detached(x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    return [t.detach() for t in x] if isinstance(x, list | tuple) else x.detach()


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A structural copy of `module` with newly initialised parameters (not the original's)."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return clone


def concat_stages(features: list[Tensor], stages: list[int]) -> Tensor:
    """Encoder stages (indices into smp's feature list; zero-channel stages skipped) upsampled
    bilinearly to the largest of them and concatenated: `[B, sum C_i, h, w]`."""
    chosen = [features[i] for i in stages if features[i].shape[1] > 0]
    size = max((tuple(f.shape[-2:]) for f in chosen), key=lambda hw: hw[0] * hw[1])
    resized = [f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
               for f in chosen]
    return torch.cat(resized, dim=1)
