"""SegNet: an smp segmentation model plus train-only heads, with one output contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcon.models.heads import PixelEmbedding, ProjectionHead, WeightBranch, concat_stages
from segcon.utils.errors import ConfigError
from segcon.utils.weights import load_weights


@dataclass
class SegOutput:
    """What a training forward pass returns.

    Attributes:
        logits: `[B, K, h, w]` classifier output (smp heads upsample to the input size).
        features: encoder stages, `[B, C_i, H / 2^i, W / 2^i]` for i = 0..5 (some encoders report
            zero-channel stages; keep them so indices match the stride).
        decoder: `[B, C, h', w']` the feature the classifier reads.
        embedding: the projection head's L2-normalised embeddings at `h' x w'`, evaluated where a
            loss gathers them (only when a projection head exists; see PixelEmbedding).
        aux: other train-only outputs by name: "weight_logits" `[B, K, h, w]` from CAC's weight
            branch when it exists.
    """

    logits: Tensor
    features: list[Tensor] = field(default_factory=list)
    decoder: Tensor | None = None
    embedding: PixelEmbedding | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)

    def take(self, rows: slice) -> SegOutput:
        """The output of the images `rows` of the batch (every field sliced alike)."""
        return SegOutput(
            logits=self.logits[rows],
            features=[f[rows] for f in self.features],
            decoder=None if self.decoder is None else self.decoder[rows],
            embedding=None if self.embedding is None else PixelEmbedding(self.embedding.hidden[rows], self.embedding.finish),
            aux={k: v[rows] for k, v in self.aux.items()},
        )

    @staticmethod
    def cat(parts: Sequence[SegOutput]) -> SegOutput:
        """The outputs of several forward passes of the same network as one batch, in order, so
        a loss can see images that were not in one pass (UniMatch: the labeled images of its
        first pass and the strong views of its second). The parts must carry the same fields
        (and the embeddings the same head: its pointwise tail is shared)."""
        first = parts[0]
        if any(set(p.aux) != set(first.aux) or (p.embedding is None) != (first.embedding is None)
               or (p.decoder is None) != (first.decoder is None) or len(p.features) != len(first.features)
               for p in parts):
            raise ValueError("SegOutput.cat: the parts carry different fields")
        return SegOutput(
            logits=torch.cat([p.logits for p in parts]),
            features=[torch.cat(stage) for stage in zip(*(p.features for p in parts), strict=True)],
            decoder=None if first.decoder is None else torch.cat([p.decoder for p in parts]),
            embedding=None if first.embedding is None else PixelEmbedding(
                torch.cat([p.embedding.hidden for p in parts]), first.embedding.finish),
            aux={k: torch.cat([p.aux[k] for p in parts]) for k in first.aux},
        )


class SegNet(nn.Module):
    """An smp model (`smp.create_model(arch, encoder_name, ...)`) with segcon's output contract.

    In training mode `forward` returns a `SegOutput`; in eval mode it returns the logits tensor
    `[B, K, H, W]` only, computed by the bare smp model, so train-only heads cost nothing at
    inference and `self.model` alone is the exportable inference graph.

    Args:
        arch: smp architecture name (unet, fpn, deeplabv3plus, segformer, upernet, dpt, ...).
        encoder_name: smp encoder name; `tu-<name>` for any timm encoder (e.g. tu-hrnet_w48).
        num_classes: K.
        encoder_weights: smp pretrained-weight name (downloads from a hub); None for random init.
        in_channels: image channels.
        weights_path: local file (.pt/.pth/.ckpt/.safetensors) with encoder or full-model weights.
        weights_scope: "auto" (full model if every key is there, else encoder), "full" or "encoder".
        projection: train-only projection head, None for none (the contrast presets set it):
            `{source: decoder | encoder, dim: 256, kind: convmlp | linear, stages: [2, 3, 4, 5]}`.
            source "decoder" reads the feature the classifier reads; "encoder" reads the encoder
            stages listed in `stages` upsampled to the largest and concatenated; kind "residual" is
            CAC's head.
        weight_branch: train-only CAC weight branch, None for none (contrast=cac sets it):
            `{depth: head | decoder}` — a fresh copy of the segmentation head, or of decoder and
            head, fed with detached features; its logits are `SegOutput.aux["weight_logits"]`.
        **arch_kwargs: passed to the smp architecture (decoder_channels, encoder_depth, ...).
    """

    def __init__(
        self,
        arch: str,
        encoder_name: str,
        num_classes: int,
        encoder_weights: str | None = None,
        in_channels: int = 3,
        weights_path: str | None = None,
        weights_scope: str = "auto",
        projection: Mapping[str, Any] | None = None,
        weight_branch: Mapping[str, Any] | None = None,
        **arch_kwargs,
    ) -> None:
        super().__init__()
        try:
            self.model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=encoder_weights,
                in_channels=in_channels,
                classes=num_classes,
                **arch_kwargs,
            )
        except KeyError as err:
            raise ConfigError(f"model.encoder_name={encoder_name!r} is not an smp encoder: {err}") from None
        self.num_classes = num_classes
        if weights_path:
            load_weights(self.model, Path(weights_path), weights_scope)
        self.heads = nn.ModuleDict()
        self.projection = None
        if projection:
            self.projection = {"source": "decoder", "dim": 256, "kind": "convmlp", "stages": [2, 3, 4, 5], **projection}
            self.heads["projection"] = ProjectionHead(
                self._projection_channels(), int(self.projection["dim"]), self.projection["kind"]
            )
        if weight_branch:
            unknown = set(weight_branch) - {"depth"}
            if unknown:
                raise ConfigError(f"model.weight_branch has unknown key(s) {sorted(unknown)}; it takes depth: head | decoder")
            self.heads["weight_branch"] = WeightBranch(
                self.model.decoder, self.model.segmentation_head, str(weight_branch.get("depth", "head"))
            )

    def _projection_channels(self) -> int:
        source = self.projection["source"]
        if source == "encoder":
            return sum(self.model.encoder.out_channels[i] for i in self.projection["stages"])
        if source == "decoder":
            # The classifier's first convolution reads the decoder feature.
            conv = next(m for m in self.model.segmentation_head.modules() if isinstance(m, nn.Conv2d))
            return conv.in_channels
        raise ConfigError(f"model.projection.source must be decoder or encoder, got {source!r}")

    @property
    def output_stride(self) -> int:
        """Input height and width must be multiples of this."""
        if not getattr(self.model, "requires_divisible_input_shape", True):
            return 1
        return int(self.model.encoder.output_stride)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Backbone parameters (the group that gets the base learning rate)."""
        return list(self.model.encoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything that is not the backbone (decoder, classifier, train-only heads)."""
        encoder = {id(p) for p in self.model.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in encoder]

    def forward_features(self, x: Tensor, perturb: float = 0.0) -> SegOutput:
        """Full forward pass `[B, C, H, W]` -> SegOutput, in any mode.

        `perturb` > 0 adds UniMatch's feature-perturbation branch as the published code runs it:
        the encoder runs once, the decoder and classifier on the clean stages and a copy with
        `Dropout2d(perturb)` on every stage, stacked into one batch of 2B (so their batch
        statistics see both); the copy's logits are `aux["perturbed_logits"] [B, K, H, W]`. The
        train-only heads read the clean half only."""
        self.model.check_input_shape(x)
        features = self.model.encoder(x)
        if isinstance(features, tuple):  # ViT encoders (DPT) also return prefix tokens
            stages, *rest = features
        else:
            stages, rest = features, []
        decoder_inputs: tuple = (stages, *rest)
        if perturb > 0:
            dropped = [torch.cat([f, F.dropout2d(f, perturb, self.training)]) for f in stages]
            decoder = self.model.decoder(dropped, *(_twice(r) for r in rest))
        else:
            decoder = self.model.decoder(*decoder_inputs)
        logits = self.model.segmentation_head(decoder)
        out = SegOutput(logits=logits, features=list(stages), decoder=decoder)
        if perturb > 0:
            b = x.shape[0]
            out.logits, out.decoder = logits[:b], decoder[:b]
            out.aux["perturbed_logits"] = logits[b:]
        if self.projection is not None:
            if self.projection["source"] == "decoder":
                feat = out.decoder
            else:
                feat = concat_stages(out.features, list(self.projection["stages"]))
            out.embedding = self.heads["projection"](feat)
        if "weight_branch" in self.heads:
            out.aux["weight_logits"] = self.heads["weight_branch"](decoder_inputs, out.decoder)
        return out

    def forward(self, x: Tensor) -> SegOutput | Tensor:
        if not self.training:
            return self.model(x)
        return self.forward_features(x)


def _twice(tokens: list[Tensor | None]) -> list[Tensor | None]:
    """DPT's per-stage prefix tokens (None where the ViT has none) repeated for a batch of 2B."""
    return [None if t is None else torch.cat([t, t]) for t in tokens]


def required_input_divisor(arch: str, encoder_name: str, **arch_kwargs) -> int:
    """The output stride an smp model needs its input divisible by, without allocating weights."""
    kwargs = dict(arch_kwargs, encoder_weights=None, classes=1)
    try:
        with torch.device("meta"):
            model = smp.create_model(arch, encoder_name=encoder_name, **kwargs)
    except (RuntimeError, NotImplementedError):  # some encoders (mit_b*) cannot be built on meta
        model = smp.create_model(arch, encoder_name=encoder_name, **kwargs)
    if not getattr(model, "requires_divisible_input_shape", True):
        return 1
    return int(model.encoder.output_stride)
