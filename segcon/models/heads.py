"""Train-only heads. They live in `SegModel.heads` and never reach the inference graph."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.base.heads import SegmentationHead
from segmentation_models_pytorch.decoders.dpt.decoder import DPTSegmentationHead
from torch import Tensor, nn

from segcon.models.output import PixelEmbedding
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError

PROJECTION_KINDS = ("convmlp", "linear", "residual", "conv_relu_bn")
PROJECTION_SOURCES = ("decoder", "encoder")
PROJECTION_DEFAULTS: dict[str, Any] = {"source": "decoder", "dim": 256, "kind": "convmlp", "stages": [2, 3, 4, 5]}
WEIGHT_BRANCH_DEPTHS = ("head", "decoder")

WEIGHT_BRANCH = "weight_branch"
"""The name of CAC's weight branch among the train-only heads."""

DEFAULT_PROJECTION = "projection"
"""The name of the projection head `model.projection` configures."""


def projection_spec(spec: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A projection head's settings with the defaults filled in, checked (`key` names the config
    node in errors): `{source: decoder | encoder, dim, kind: convmlp | linear | residual |
    conv_relu_bn, stages}`."""
    unknown = sorted(set(spec) - set(PROJECTION_DEFAULTS))
    if unknown:
        raise ConfigError(f"{key} has unknown key(s) {unknown}; it takes {sorted(PROJECTION_DEFAULTS)}")
    full = {**PROJECTION_DEFAULTS, **spec}
    if full["source"] not in PROJECTION_SOURCES:
        raise ConfigError(f"{key}.source must be one of {PROJECTION_SOURCES}, got {full['source']!r}")
    if full["kind"] not in PROJECTION_KINDS:
        raise ConfigError(f"{key}.kind must be one of {PROJECTION_KINDS}, got {full['kind']!r}")
    if not isinstance(full["dim"], int) or full["dim"] < 1:
        raise ConfigError(f"{key}.dim must be a positive integer, got {full['dim']!r}")
    return full


def projection_specs(
    projection: Mapping[str, Any] | None, projections: Mapping[str, Mapping[str, Any] | None] | None
) -> dict[str, dict[str, Any]]:
    """Every projection head's full settings by name: `projection` as "projection", then the
    named `projections` (null entries are switched off)."""
    specs: dict[str, dict[str, Any]] = {}
    if projection:
        specs[DEFAULT_PROJECTION] = projection_spec(projection, "model.projection")
    for name, spec in (projections or {}).items():
        if not spec:
            continue
        if name in (DEFAULT_PROJECTION, WEIGHT_BRANCH):
            raise ConfigError(f"model.projections.{name}: the name {name!r} is taken; choose another head name")
        specs[str(name)] = projection_spec(spec, f"model.projections.{name}")
    return specs


def weight_branch_depth(spec: Mapping[str, Any]) -> str:
    """CAC's weight-branch depth from `model.weight_branch`, checked."""
    unknown = set(spec) - {"depth"}
    if unknown:
        raise ConfigError(f"model.weight_branch has unknown key(s) {sorted(unknown)}; it takes depth: head | decoder")
    depth = str(spec.get("depth", "head"))
    if depth not in WEIGHT_BRANCH_DEPTHS:
        raise ConfigError(f"model.weight_branch.depth must be one of {WEIGHT_BRANCH_DEPTHS}, got {depth!r}")
    return depth


def head_scores(head: nn.Module, feature: Tensor) -> tuple[Tensor, Tensor | None]:
    """An smp segmentation head applied to `feature [B, C, h, w]`, split at its final upsampling:
    (logits at the head's output size, logits at the feature's resolution or None when the head
    does not upsample). The first equals `head(feature)`: the same layers in the same order."""
    if isinstance(head, SegmentationHead):  # conv | upsampling (or identity) | activation
        coarse = head[0](feature)
        if isinstance(head[1], nn.Identity):
            return head[2](coarse), None
        return head[2](head[1](coarse)), coarse
    if isinstance(head, DPTSegmentationHead):
        coarse = head.head(feature)
        upsampled = F.interpolate(coarse, scale_factor=head.upsampling_factor, mode="bilinear", align_corners=True)
        return head.activation(upsampled), coarse
    return head(feature), None


class ProjectionHead(nn.Module):
    """Maps a feature map `[B, C, h, w]` to a `PixelEmbedding` of dimension D.

    kind "convmlp" (ContrastiveSeg): 1x1 conv C->C, BN, ReLU | linear C->D;
    kind "linear": | linear C->D;
    kind "residual" (CAC's head): 1x1 conv C->D, BN, ReLU | h + linear D->D;
    kind "conv_relu_bn" (Pissas et al.'s, Contextrast's): 1x1 conv C->C, ReLU, BN | linear C->D.
    The layers before "|" run over the whole map, the rest on gathered pixels; the output is
    L2-normalised.

    When the stem widens its input (C < D: the residual head on a narrow decoder feature, e.g.
    Unet's 16 channels -> 256), the stem runs on gathered pixels too: its batch normalisation
    needs only the mean and variance of `W x + b` over every pixel, which are `W mean(x) + b`
    and `diag(W cov(x) W^T)` — statistics of the narrow input — so no D-channel map is ever
    made. Same function, same gradients (through the batch statistics too) and the same
    running-statistics update as the layers over the whole map. A SyncBatchNorm (DDP with
    `sync_batchnorm`) keeps the layers over the whole map: its statistics span every rank.
    """

    def __init__(self, in_channels: int, dim: int = 256, kind: str = "convmlp") -> None:
        super().__init__()
        if kind not in PROJECTION_KINDS:
            raise ConfigError(f"a projection head's kind must be one of {PROJECTION_KINDS}, got {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.stem = nn.Identity()
            self.out = nn.Linear(in_channels, dim)
        else:
            width = dim if kind == "residual" else in_channels
            if kind == "conv_relu_bn":
                self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.ReLU(), nn.BatchNorm2d(width))
            else:
                self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            self.out = nn.Linear(width, dim)

    @property
    def folds(self) -> bool:
        """Whether the stem runs on gathered pixels (a widening stem with a plain BatchNorm)."""
        return (self.kind != "linear" and self.stem[0].in_channels < self.stem[0].out_channels
                and type(self.stem[1]) is nn.BatchNorm2d)

    def affine(self) -> tuple[Tensor, Tensor]:
        """`(W, b)` with `finish(rows) = normalize(rows @ W.T + b)` (the residual adds identity)."""
        weight = self.out.weight
        if self.kind == "residual":
            weight = weight + torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return weight, self.out.bias

    def finish(self, rows: Tensor) -> Tensor:
        """Pointwise tail on gathered rows `[M, C']` -> L2-normalised `[M, D]`."""
        out = self.out(rows)
        if self.kind == "residual":
            out = rows + out
        return F.normalize(out, dim=1)

    def forward(self, x: Tensor | list[Tensor]) -> PixelEmbedding:
        """`x`: a feature map `[B, C, h, w]`, or encoder stages whose concatenation after bilinear
        upsampling to the largest (`concat_stages`) is the feature map. For stages, the first
        1x1 layer runs on each stage at its own resolution and the results are upsampled and
        summed (`project_stages`): the same map, without the wide concatenation at the largest
        resolution. A narrowing linear head on stages is thereby finished over the whole map,
        at D channels, instead of keeping the C-channel concatenation for gathered rows."""
        if isinstance(x, Tensor):
            if self.folds:
                return PixelEmbedding(x, _FoldedStem(self, x))
            return PixelEmbedding(self.stem(x), self.finish, self.affine())
        stages = [f for f in x if f.shape[1] > 0]
        if self.kind == "linear":
            if self.out.out_features < self.out.in_features:
                return PixelEmbedding.from_dense(project_stages(stages, self.out.weight, self.out.bias))
            return PixelEmbedding(concat_stages(stages, list(range(len(stages)))), self.finish, self.affine())
        conv = self.stem[0]
        hidden = project_stages(stages, conv.weight.flatten(1), conv.bias)
        return PixelEmbedding(self.stem[1:](hidden), self.finish, self.affine())


class _FoldedStem:
    """A widening stem (1x1 conv, BN, ReLU) folded into one affine map on gathered input rows,
    with the batch statistics of the whole map `x [B, C, h, w]` (or the running ones in eval
    mode), followed by the head's tail: rows `[M, C]` -> `[M, D]`."""

    def __init__(self, head: ProjectionHead, x: Tensor) -> None:
        conv, bn = head.stem[0], head.stem[1]
        # float32 whatever the autocast: a sum of squares over every pixel overflows float16
        with torch.autocast(x.device.type, enabled=False):
            weight = at_least_float32(conv.weight.flatten(1))  # [D, C]
            if bn.training:
                flat = at_least_float32(x).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
                n = flat.shape[0]
                mean_x = flat.mean(0)
                centred = flat - mean_x
                cov = centred.T @ centred / n
                mean = weight @ mean_x + conv.bias
                var = ((weight @ cov) * weight).sum(1)
                with torch.no_grad():  # BatchNorm's own update: momentum 0.1, unbiased variance
                    bn.num_batches_tracked += 1
                    m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                    bn.running_mean.mul_(1 - m).add_(m * mean.detach())
                    bn.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
            else:
                mean, var = bn.running_mean, bn.running_var
            scale = bn.weight / torch.sqrt(var + bn.eps)
            self.weight = weight * scale[:, None]
            self.bias = (conv.bias - mean) * scale + bn.bias
        self.tail = head.finish

    def __call__(self, rows: Tensor) -> Tensor:
        return self.tail(F.relu(F.linear(rows, self.weight.to(rows.dtype), self.bias.to(rows.dtype))))


class WeightBranch(nn.Module):
    """CAC's weight branch (METHODS.md §1): a second classifier on **detached** features.

    depth "head": a fresh copy of the segmentation head, reading the detached decoder feature
    (the main classifier's input). depth "decoder": fresh copies of the decoder and the head,
    reading the detached encoder stages (as CAC does for SegFormer). Either way no gradient
    reaches the shared network through this branch.
    """

    def __init__(self, decoder: nn.Module, segmentation_head: nn.Module, depth: str = "head") -> None:
        super().__init__()
        if depth not in WEIGHT_BRANCH_DEPTHS:
            raise ConfigError(f"the weight branch's depth must be one of {WEIGHT_BRANCH_DEPTHS}, got {depth!r}")
        self.depth = depth
        self.decoder = _fresh_copy(decoder) if depth == "decoder" else None
        self.head = _fresh_copy(segmentation_head)

    def forward(self, decoder_inputs: tuple, decoder_feature: Tensor) -> tuple[Tensor, Tensor | None]:
        """`decoder_inputs`: what the main decoder was called with (the encoder stages, plus
        prefix tokens for ViT encoders); `decoder_feature`: `[B, C, h, w]`, the main head's input.
        Returns logits `[B, K, H, W]` at the main classifier's output size and, when the head
        upsamples, the same at the decoder's resolution (else None)."""
        if self.decoder is None:
            return head_scores(self.head, decoder_feature.detach())
        return head_scores(self.head, self.decoder(*(_detached(x) for x in decoder_inputs)))


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
    size = _largest(chosen)
    resized = [f if tuple(f.shape[-2:]) == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
               for f in chosen]
    return torch.cat(resized, dim=1)


def project_stages(stages: list[Tensor], weight: Tensor, bias: Tensor) -> Tensor:
    """A 1x1 layer `weight [D, sum C_i]`, `bias [D]` applied to `concat_stages(stages, ...)`:
    `[B, D, h, w]` at the largest stage's size, computed on each stage at its own resolution
    and then upsampled and summed (a pointwise linear map and bilinear resizing commute, and
    a bilinear resize's weights sum to 1, so the bias is added once). In autocast's dtype."""
    size = _largest(stages)
    out: Tensor | None = None
    for f, w in zip(stages, weight.split([f.shape[1] for f in stages], dim=1), strict=True):
        y = F.conv2d(f, w[:, :, None, None])
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        out = y if out is None else out + y
    assert out is not None
    return out + bias.to(out.dtype)[None, :, None, None]


def _largest(maps: list[Tensor]) -> tuple[int, int]:
    """The spatial size `(h, w)` of the largest of `maps`."""
    return max((tuple(f.shape[-2:]) for f in maps), key=lambda hw: hw[0] * hw[1])
