"""A mask-classification family (`model=maskformer_*`): MaskFormer (Cheng et al., NeurIPS 2021) on
an smp encoder, as RC²L needs it (METHODS.md §4(b)); written here, no MaskFormer code used.

- Pixel decoder (MaskFormer's FPN "BasePixelDecoder"): from the deepest encoder stage down to
  stride 4, a lateral 1x1 conv (3x3 on the deepest) plus the nearest-upsampled coarser map, a 3x3
  conv, GroupNorm and ReLU; a last 3x3 conv gives the mask features `F [B, C_m, H/4, W/4]`.
- Transformer decoder (DETR's, post-norm): N learned queries attend to the deepest stage projected
  to `hidden_dim` with a 2-D sine position encoding; every layer's output, after the shared final
  LayerNorm, gives class logits `[B, N, K+1]` (the last class is "no object") and mask
  embeddings `[B, N, C_m]` (a 3-layer MLP); mask logits are `f · F` `[B, N, H/4, W/4]`.
- Semantic inference: `S[c] = Σ_q softmax(cls_q)[c] · sigmoid(mask_q)` (no-object column dropped),
  computed at the mask resolution and bilinearly upsampled to the input (K channels rather than
  N); the network returns `log(S / Σ_c S)`, log-probabilities whose softmax is S normalised over
  the classes, so whole / slide / ms_flip average them like any family's scores.

In training, `SegOutput.logits` are those log-probabilities (so pseudo-labels and pixel losses
work), `decoder_logits` the same at the mask resolution, `decoder` the mask features `F`, and
`mask_cls`, `mask_logits` and `mask_embed` the last layer's outputs and `earlier_mask_cls` /
`earlier_mask_logits` the earlier layers' for the set criterion (segcon.objectives.set_loss).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from segmentation_models_pytorch.encoders import get_encoder
from torch import Tensor, nn

from segcon.models.base import SegModel, on_meta
from segcon.models.heads import projection_specs
from segcon.models.output import SegOutput
from segcon.models.segnet import check_encoder, load_pretrained
from segcon.utils.errors import ConfigError

PUBLISHED_SIZES: dict[str, int] = {"num_queries": 100, "hidden_dim": 256, "mask_dim": 256, "conv_dim": 256,
                                   "dec_layers": 6, "nheads": 8, "dim_feedforward": 2048}
"""MaskFormer's published head sizes (Cheng et al. 2021): the defaults of the network and its checks."""

SEMANTIC_EPS = 1e-8
"""Floor of the normalised semantic map before the log (where every mask is off)."""


def semantic_probs(mask_cls: Tensor, mask_logits: Tensor) -> Tensor:
    """`S [B, K, h, w] = Σ_q softmax(mask_cls [B, N, K+1])[:K] · sigmoid(mask_logits [B, N, h, w])`."""
    probs = mask_cls.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.sigmoid())


def semantic_log_probs(semantic: Tensor) -> Tensor:
    """`log(S / Σ_c S)` of a semantic map `[B, K, H, W]` (floored at SEMANTIC_EPS)."""
    return torch.log((semantic / semantic.sum(1, keepdim=True).clamp_min(SEMANTIC_EPS)).clamp_min(SEMANTIC_EPS))


def sine_position(x: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised 2-D sine position encoding `[1, dim, h, w]` for a map `x [B, C, h, w]`
    (half the channels encode y, half x; 2π scale)."""
    h, w = x.shape[-2], x.shape[-1]
    half = dim // 2
    y = (torch.arange(h, device=x.device, dtype=torch.float32) + 1) / (h + 1e-6) * 2 * math.pi
    xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 1) / (w + 1e-6) * 2 * math.pi
    steps = torch.arange(half, device=x.device, dtype=torch.float32)
    freq = torch.pow(torch.full_like(steps, temperature), 2 * torch.div(steps, 2, rounding_mode="floor") / half)
    py, px = y[:, None] / freq, xs[:, None] / freq  # [h, half], [w, half]
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], 2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], 2).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, half), px[None, :, :].expand(h, w, half)], 2)
    return pos.permute(2, 0, 1)[None].to(x.dtype)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, channels // 4)), channels)


class _FPNBlock(nn.Module):
    """One FPN level: `output(lateral(x) + upsampled coarser map)` (the deepest: `output(x)`)."""

    def __init__(self, in_channels: int, conv_dim: int, deepest: bool) -> None:
        super().__init__()
        self.deepest = deepest
        self.lateral = nn.Identity() if deepest else nn.Sequential(nn.Conv2d(in_channels, conv_dim, 1, bias=False),
                                                                   _norm(conv_dim))
        self.output = nn.Sequential(nn.Conv2d(in_channels if deepest else conv_dim, conv_dim, 3, padding=1, bias=False),
                                    _norm(conv_dim), nn.ReLU(inplace=True))

    def forward(self, x: Tensor, coarser: Tensor) -> Tensor:
        if self.deepest:
            return self.output(x)
        return self.output(self.lateral(x) + F.interpolate(coarser, size=x.shape[-2:], mode="nearest"))


class PixelDecoder(nn.Module):
    """FPN over the encoder stages 2..5: mask features `[B, mask_dim, H/4, W/4]`."""

    def __init__(self, encoder_channels: list[int], conv_dim: int, mask_dim: int) -> None:
        super().__init__()
        stages = [i for i in range(2, len(encoder_channels)) if encoder_channels[i] > 0]
        self.order = list(reversed(stages))  # deepest first
        self.blocks = nn.ModuleList(_FPNBlock(encoder_channels[i], conv_dim, k == 0) for k, i in enumerate(self.order))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)

    def forward(self, stages: list[Tensor]) -> Tensor:
        y = stages[self.order[0]]
        for k, block in enumerate(self.blocks):
            y = block(stages[self.order[k]], y)
        return self.mask_features(y)


class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer: self-attention over the queries, cross-attention to the
    memory, feed-forward; query and memory position encodings added to queries and keys."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norms[1](tgt + self.dropout(attended))
        return self.norms[2](tgt + self.dropout(self.ffn(tgt)))


class MaskFormerNet(nn.Module):
    """The inference network: `images [B, 3, H, W] -> log(S / Σ S) [B, K, H, W]` (see the module
    docstring); `decode(stages, all_layers)` gives the per-layer class and mask logits."""

    def __init__(
        self,
        encoder_name: str,
        classes: int,
        encoder_weights: str | None = None,
        in_channels: int = 3,
        num_queries: int = PUBLISHED_SIZES["num_queries"],
        hidden_dim: int = PUBLISHED_SIZES["hidden_dim"],
        mask_dim: int = PUBLISHED_SIZES["mask_dim"],
        conv_dim: int = PUBLISHED_SIZES["conv_dim"],
        dec_layers: int = PUBLISHED_SIZES["dec_layers"],
        nheads: int = PUBLISHED_SIZES["nheads"],
        dim_feedforward: int = PUBLISHED_SIZES["dim_feedforward"],
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = get_encoder(encoder_name, in_channels=in_channels, depth=5, weights=encoder_weights)
        channels = list(self.encoder.out_channels)
        self.pixel_decoder = PixelDecoder(channels, conv_dim, mask_dim)
        self.input_proj = nn.Conv2d(channels[-1], hidden_dim, 1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, nheads, dim_feedforward, dropout) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, mask_dim))
        self.hidden_dim = hidden_dim

    def decode(self, stages: list[Tensor], all_layers: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Class logits `[L, B, N, K+1]`, mask logits `[L, B, N, H/4, W/4]` and mask embeddings
        `[L, B, N, C_m]` of every decoder layer (`all_layers`) or the last one (L = 1), and the
        mask features `[B, C_m, H/4, W/4]`."""
        mask_features = self.pixel_decoder(stages)
        deepest = self.input_proj(stages[-1])
        pos = sine_position(deepest, self.hidden_dim).flatten(2).transpose(1, 2)  # [1, hw, C]
        memory = deepest.flatten(2).transpose(1, 2)  # [B, hw, C]
        b = memory.shape[0]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, pos)
            outputs.append(self.decoder_norm(tgt))
        hs = torch.stack(outputs) if all_layers else outputs[-1][None]
        embed = self.mask_embed(hs)
        masks = torch.einsum("lbqc,bchw->lbqhw", embed, mask_features)
        return self.class_embed(hs), masks, embed, mask_features

    def forward(self, x: Tensor) -> Tensor:
        mask_cls, mask_logits, _, _ = self.decode(self.encoder(x), False)
        semantic = semantic_probs(mask_cls[-1], mask_logits[-1])
        semantic = F.interpolate(semantic, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return semantic_log_probs(semantic)


_OWN_KEYS = ("_target_", "encoder_name", "num_classes", "encoder_weights", "in_channels", "weights_path",
             "projection", "projections")
_SIZES = tuple(PUBLISHED_SIZES)


class MaskFormer(SegModel):
    """The MaskFormer family with segcon's model contract (see the module docstring).

    Args:
        encoder_name: smp encoder (`tu-<name>` for timm).
        num_classes: K.
        encoder_weights: smp pretrained-weight name (downloads); None for random init.
        in_channels: image channels.
        weights_path: a local file with encoder or full weights (as SegNet's, by name).
        projection, projections: train-only projection heads as SegNet's (`source: decoder` reads
            the mask features).
        num_queries, hidden_dim, mask_dim, conv_dim, dec_layers, nheads, dim_feedforward, dropout:
            the head's sizes (defaults: PUBLISHED_SIZES, and dropout 0.1).
    """

    def __init__(
        self,
        encoder_name: str,
        num_classes: int,
        encoder_weights: str | None = None,
        in_channels: int = 3,
        weights_path: str | None = None,
        projection: Mapping[str, Any] | None = None,
        projections: Mapping[str, Mapping[str, Any] | None] | None = None,
        **sizes: Any,
    ) -> None:
        super().__init__()
        self.model = MaskFormerNet(encoder_name, num_classes, encoder_weights, in_channels, **sizes)
        self.num_classes = num_classes
        if weights_path:
            rank_zero_info(f"model.weights_path: {load_pretrained(self.model, str(weights_path))}")
        self.build_projection_heads(projection, projections, lambda spec: (
            sum(self.model.encoder.out_channels[i] for i in spec["stages"]) if spec["source"] == "encoder"
            else self.model.pixel_decoder.mask_features.out_channels))

    @property
    def input_divisor(self) -> int:
        return int(self.model.encoder.output_stride)

    def forward_features(self, x: Tensor, perturb: float = 0.0, heads: Collection[str] | None = None) -> SegOutput:
        """See SegModel.forward_features; with `perturb` > 0 the head decodes the clean stages and
        a Dropout2d copy of them in one batch of 2B (as SegNet does)."""
        stages = list(self.model.encoder(x))
        decoded = [torch.cat([f, F.dropout2d(f, perturb, self.training)]) for f in stages] if perturb > 0 else stages
        mask_cls, mask_logits, embed, mask_features = self.model.decode(decoded, True)
        semantic = semantic_probs(mask_cls[-1], mask_logits[-1])
        coarse = semantic_log_probs(semantic)
        logits = semantic_log_probs(F.interpolate(semantic, size=x.shape[-2:], mode="bilinear", align_corners=False))
        b = x.shape[0]
        out = SegOutput(logits=logits[:b], decoder_logits=coarse[:b], features=stages, decoder=mask_features[:b],
                        mask_cls=mask_cls[-1][:b], mask_logits=mask_logits[-1][:b], mask_embed=embed[-1][:b],
                        earlier_mask_cls=[c[:b] for c in mask_cls[:-1]],
                        earlier_mask_logits=[m[:b] for m in mask_logits[:-1]],
                        perturbed_logits=logits[b:] if perturb > 0 else None)
        self.run_projection_heads(out, heads)
        return out

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> int:
        """Checks the encoder name, the projection heads and the head's sizes; returns the encoder's
        output stride."""
        check_encoder(str(config.get("encoder_name")))
        projection_specs(config.get("projection"), config.get("projections"))
        unknown = sorted(set(config) - set(_OWN_KEYS) - set(_SIZES) - {"dropout"})
        if unknown:
            raise ConfigError(f"model has unknown key(s) {unknown} for MaskFormer; it takes {sorted(_SIZES)}, dropout")
        sizes = {k: config.get(k, v) for k, v in PUBLISHED_SIZES.items()}
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"model: {bad} must be positive integers")
        if sizes["hidden_dim"] % sizes["nheads"] or sizes["hidden_dim"] % 4:
            raise ConfigError(f"model.hidden_dim={sizes['hidden_dim']} must be a multiple of 4 (the sine position "
                              f"encoding) and of model.nheads={sizes['nheads']}")
        if sizes["conv_dim"] % _norm(sizes["conv_dim"]).num_groups:
            raise ConfigError(f"model.conv_dim={sizes['conv_dim']} must be a multiple of its GroupNorm groups "
                              f"({_norm(sizes['conv_dim']).num_groups}); use a multiple of 32, or of 4 below 128")
        encoder = on_meta(lambda: get_encoder(str(config["encoder_name"]), in_channels=int(config.get("in_channels", 3)),
                                              depth=5, weights=None))
        return int(encoder.output_stride)

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        sizes = {**PUBLISHED_SIZES, **{k: config[k] for k in _SIZES if k in config}}
        return f"MaskFormer / {config.get('encoder_name')} ({sizes['num_queries']} queries, {sizes['dec_layers']} layers)"
