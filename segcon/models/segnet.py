"""SegNet: an smp segmentation model plus train-only heads, with one output contract."""

from __future__ import annotations

from collections.abc import Mapping
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

    def forward_features(self, x: Tensor) -> SegOutput:
        """Full forward pass `[B, C, H, W]` -> SegOutput, in any mode."""
        self.model.check_input_shape(x)
        features = self.model.encoder(x)
        if isinstance(features, tuple):  # ViT encoders (DPT) also return prefix tokens
            decoder_inputs: tuple = features
            features = features[0]
        else:
            decoder_inputs = (features,)
        decoder = self.model.decoder(*decoder_inputs)
        logits = self.model.segmentation_head(decoder)
        out = SegOutput(logits=logits, features=list(features), decoder=decoder)
        if self.projection is not None:
            if self.projection["source"] == "decoder":
                feat = decoder
            else:
                feat = concat_stages(out.features, list(self.projection["stages"]))
            out.embedding = self.heads["projection"](feat)
        if "weight_branch" in self.heads:
            out.aux["weight_logits"] = self.heads["weight_branch"](decoder_inputs, decoder)
        return out

    def forward_perturbed(self, x: Tensor, dropout: float = 0.5) -> Tensor:
        """Logits `[B, K, H, W]` decoded from encoder features with channel dropout
        (`Dropout2d(dropout)` on every stage): UniMatch's feature-perturbation branch."""
        self.model.check_input_shape(x)
        features = self.model.encoder(x)
        if isinstance(features, tuple):
            stages, *rest = features
            decoder_inputs: tuple = ([F.dropout2d(f, dropout, self.training) for f in stages], *rest)
        else:
            decoder_inputs = ([F.dropout2d(f, dropout, self.training) for f in features],)
        return self.model.segmentation_head(self.model.decoder(*decoder_inputs))

    def forward(self, x: Tensor) -> SegOutput | Tensor:
        if not self.training:
            return self.model(x)
        return self.forward_features(x)


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
