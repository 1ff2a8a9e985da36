"""What a network returns in training: `SegOutput`, and the lazily finished `PixelEmbedding`.

This module imports no model library, so losses and tests can build outputs by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError
from segcon.utils.static import group_counts


def gather_pixels(feature: Tensor, index: Tensor) -> Tensor:
    """Rows `[M, C]` of `feature [B, C, h, w]` at flat pixel indices `index [M]` into
    `[B * h * w]`, without materialising a permuted copy of the whole map."""
    n = feature.shape[2] * feature.shape[3]
    return feature.flatten(2)[index // n, :, index % n]


def pixels_at(feature: Tensor, image: Tensor, pixel: Tensor) -> Tensor:
    """Rows `[M, C]` of `feature [B, C, h, w]` at images `image [M]` and flat pixels `pixel [M]`
    into `h * w` (`gather_pixels` with the division done)."""
    return feature.flatten(2)[image, :, pixel]


def normalize_rows(rows: Tensor) -> Tensor:
    """Rows `[M, D]` L2-normalised (the whole tail of an embedding given as a dense map)."""
    return F.normalize(rows, dim=1)


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
        affine: `(W [D, C], b [D])` when the tail is `normalize(rows @ W.T + b)` (None otherwise):
            then means of many embeddings need no D-channel row per pixel (`group_means`).
    """

    hidden: Tensor
    finish: Callable[[Tensor], Tensor]
    affine: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_dense(cls, embedding: Tensor) -> PixelEmbedding:
        """Wrap a full embedding map `[B, D, h, w]` (it is L2-normalised row-wise on use)."""
        d = embedding.shape[1]
        eye = torch.eye(d, dtype=embedding.dtype, device=embedding.device)
        return cls(embedding, normalize_rows, (eye, eye.new_zeros(d)))

    @property
    def size(self) -> tuple[int, int]:
        """`(h, w)`, the embedding resolution."""
        return int(self.hidden.shape[2]), int(self.hidden.shape[3])

    def at(self, index: Tensor) -> Tensor:
        """Embeddings `[M, D]` at flat pixel indices `index [M]` into `[B * h * w]`."""
        n = self.hidden.shape[2] * self.hidden.shape[3]
        return self.at_pixels(index // n, index % n)

    def at_pixels(self, image: Tensor, pixel: Tensor) -> Tensor:
        """Embeddings `[M, D]` at images `image [M]` and flat pixels `pixel [M]` into `h * w`."""
        return self.finish(pixels_at(self.hidden, image, pixel))

    @staticmethod
    def stack_at(embeddings: Sequence[PixelEmbedding], image: Tensor, pixel: Tensor) -> Tensor:
        """Embeddings `[L, M, D]` of several heads of one dimension: `embeddings[l]` at the images
        `image[l]` and flat pixels `pixel[l]` (`[L, M]` each; pixel n of image b is flat index
        b·h·w + n). Where every tail is affine, the rows of all heads are L2-normalised together
        (one normalisation, not one per head)."""
        pairs = zip(embeddings, image, pixel, strict=True)
        if all(e.affine is not None for e in embeddings):
            rows = []
            for e, b, n in pairs:
                weight, bias = e.affine  # type: ignore[misc]
                gathered = pixels_at(e.hidden, b, n)
                # a dense map's tail is the normalisation alone (its affine map is the identity)
                rows.append(gathered if e.finish is normalize_rows else F.linear(gathered, weight, bias))
            return F.normalize(torch.stack(rows), dim=2)
        return torch.stack([e.at_pixels(b, n) for e, b, n in pairs])

    def rows(self) -> Tensor:
        """Every pixel's embedding `[B * h * w, D]`, in flat-index order (costly; losses use `at`)."""
        c = self.hidden.shape[1]
        return self.finish(self.hidden.permute(0, 2, 3, 1).reshape(-1, c))

    def dense(self) -> Tensor:
        """The full embedding map `[B, D, h, w]` (costly; losses use `at`)."""
        b, _, h, w = self.hidden.shape
        return self.rows().reshape(b, h, w, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def group_means(self, index: Tensor | None, group: Tensor, num_groups: int, normalize: bool = True) -> Tensor:
        """The L2-normalised mean embedding `[G, D]` (float32 or wider, no gradient) of the
        pixels `index [P]` (flat, into `[B * h * w]`; None: every pixel, in that order) of every
        group (`group [P]` in `[0, G)`); 0 for a group without pixels. `normalize=False`: the
        plain mean of the (normalised) pixel embeddings.

        With an affine tail widening C channels to D >= C the D-channel embeddings are never
        formed: each pixel's norm `|W h + b|` is a quadratic form of its C-channel state `h`, so
        the sum of the normalised embeddings of a group is `[W b] [sum h / |W h + b|; sum 1 /
        |W h + b|]`, at P C^2 instead of P C D operations (a narrowing tail forms the rows).
        """
        if self.affine is None or self.affine[0].shape[0] < self.affine[0].shape[1]:
            rows = at_least_float32(self.rows() if index is None else self.at(index))
            sums = rows.new_zeros(num_groups, rows.shape[1]).index_add_(0, group, rows)
        else:
            weight, bias = (at_least_float32(t) for t in self.affine)
            c = self.hidden.shape[1]
            if index is None:
                h = at_least_float32(self.hidden.permute(0, 2, 3, 1).reshape(-1, c))  # [P, C]
            else:
                h = at_least_float32(gather_pixels(self.hidden, index))
            # |W h + b|² = h·(WᵀW h + 2 Wᵀb) + b·b
            square = (torch.addmm(weight.T @ bias, h, weight.T @ weight, beta=2) * h).sum(1) + bias @ bias
            inv = square.clamp_min(1e-24).rsqrt()  # F.normalize's eps: 1 / max(|W h + b|, 1e-12)
            sums_aug = h.new_zeros(num_groups, c + 1).index_add_(0, group, torch.cat([h * inv[:, None], inv[:, None]], 1))
            sums = sums_aug @ torch.cat([weight.T, bias[None, :]])  # [G, D]
        if normalize:  # the mean's direction is the sum's: no division by the counts
            return F.normalize(sums, dim=1)
        counts = group_counts(group, num_groups)
        return sums / counts.clamp_min(1)[:, None].to(sums.dtype)

    def zero(self) -> Tensor:
        """A 0 connected to every parameter of the head (for batches without anchors, so DDP
        sees no unused parameter)."""
        return self.at(torch.zeros(0, dtype=torch.long, device=self.hidden.device)).sum() + self.hidden.sum() * 0.0

    def take(self, rows: slice) -> PixelEmbedding:
        """The embedding of the images `rows` (a slice without step)."""
        return PixelEmbedding(self.hidden[rows], self.finish, self.affine)

    @staticmethod
    def cat(parts: Sequence[PixelEmbedding]) -> PixelEmbedding:
        """The embeddings of several batches as one. Parts of one head whose tails are equal
        share it; parts whose tails differ (a head whose tail holds the batch statistics of its
        own pass) keep each their own (`StackedEmbedding`)."""
        if all(p.finish == parts[0].finish for p in parts) and not any(isinstance(p, StackedEmbedding) for p in parts):
            return PixelEmbedding(torch.cat([p.hidden for p in parts]), parts[0].finish, parts[0].affine)
        pieces = [q for p in parts for q in (p.pieces if isinstance(p, StackedEmbedding) else [p])]
        return StackedEmbedding(pieces)


class StackedEmbedding(PixelEmbedding):
    """Embeddings of several batches whose tails differ, as one batch: `at` finishes the rows of
    each batch with that batch's own tail."""

    def __init__(self, pieces: Sequence[PixelEmbedding]) -> None:
        self.pieces = list(pieces)
        super().__init__(torch.cat([p.hidden for p in self.pieces]), self.pieces[0].finish)

    def at_pixels(self, image: Tensor, pixel: Tensor) -> Tensor:
        # every piece finishes every row (its own images' rows are kept): no data-sized selection
        rows, start = None, 0
        for piece in self.pieces:
            b = piece.hidden.shape[0]
            mine = (image >= start) & (image < start + b)
            own = piece.at_pixels(torch.where(mine, image - start, 0), pixel)
            rows = own if rows is None else torch.where(mine[:, None], own, rows)
            start += b
        assert rows is not None
        return rows

    def rows(self) -> Tensor:
        return torch.cat([p.rows() for p in self.pieces])

    def zero(self) -> Tensor:
        return sum((p.zero() for p in self.pieces), self.hidden.new_zeros(()))

    def take(self, rows: slice) -> PixelEmbedding:
        if rows.step not in (None, 1):
            raise ValueError("StackedEmbedding.take takes a slice without step")
        start, stop, _ = rows.indices(self.hidden.shape[0])
        kept, offset = [], 0
        for piece in self.pieces:
            b = piece.hidden.shape[0]
            lo, hi = max(start - offset, 0), min(stop - offset, b)
            if lo < hi:
                kept.append(piece.take(slice(lo, hi)))
            offset += b
        return kept[0] if len(kept) == 1 else StackedEmbedding(kept)


@dataclass
class SegOutput:
    """What a model's training forward pass returns (the model contract, segcon.models.base).

    Attributes:
        logits: `[B, K, H, W]` class scores at the resolution the model predicts at for the loss
            (the input size for smp models).
        decoder_logits: the same scores at the decoder's own resolution `[B, K, h', w']` when the
            model upsamples them afterwards (smp's DeepLabV3+, FPN, SegFormer, UPerNet: x4), else
            None. Samplers and confidence maps at the decoder's resolution read these instead of
            resizing `logits` back (`logits_at`).
        features: encoder stages, `[B, C_i, H / 2^i, W / 2^i]` for i = 0..5 for smp encoders (some
            report zero-channel stages; they are kept so indices match the stride).
        decoder: `[B, C, h', w']` the feature the classifier reads.
        embeddings: one PixelEmbedding per train-only projection head, by head name ("projection"
            for the head `model.projection` configures).
        side_logits: a fusion network's side outputs `[B, K, H, W]`, one per encoder stage with
            one (deep-supervised by the Objective); empty for other models.
        perturbed_logits: `[B, K, H, W]` the scores of the decoder on feature-dropped encoder
            stages (UniMatch's perturbed branch, `forward_features(perturb=p)`), else None.
        weight_logits, weight_decoder_logits: CAC's weight branch (a classifier on detached
            features, `model.weight_branch`): its scores at the logits' and at the decoder's
            resolution (None when the same or absent).
        mask_cls, mask_logits, mask_embed: a mask-classification head's last decoder layer: class
            scores `[B, N, K+1]` (the last is "no object"), mask scores `[B, N, h, w]` and the
            queries' mask embeddings `[B, N, C]`; None for per-pixel models.
        earlier_mask_cls, earlier_mask_logits: the same scores of its earlier decoder layers
            (deep supervision), in order.
        valid: `[B, H, W]` the images' real pixels (False on crop padding) where a method knows
            them (the teacher's output on the weak views), else None.
    """

    logits: Tensor
    decoder_logits: Tensor | None = None
    features: list[Tensor] = field(default_factory=list)
    decoder: Tensor | None = None
    embeddings: dict[str, PixelEmbedding] = field(default_factory=dict)
    side_logits: list[Tensor] = field(default_factory=list)
    perturbed_logits: Tensor | None = None
    weight_logits: Tensor | None = None
    weight_decoder_logits: Tensor | None = None
    mask_cls: Tensor | None = None
    mask_logits: Tensor | None = None
    mask_embed: Tensor | None = None
    earlier_mask_cls: list[Tensor] = field(default_factory=list)
    earlier_mask_logits: list[Tensor] = field(default_factory=list)
    valid: Tensor | None = None

    def logits_at(self, size: tuple[int, int]) -> Tensor:
        """The class scores at `size` (h, w): the decoder-resolution or full-resolution logits
        when one of them has that size, else the logits bilinearly resized."""
        for logits in (self.decoder_logits, self.logits):
            if logits is not None and tuple(logits.shape[-2:]) == tuple(size):
                return logits
        return F.interpolate(self.logits, size=size, mode="bilinear", align_corners=False)

    def embedding(self, name: str, term: str) -> PixelEmbedding:
        """The embedding of the projection head `name`, or a ConfigError saying how to add it
        (`term` names the loss that needs it)."""
        if name not in self.embeddings:
            have = sorted(self.embeddings) or "none"
            raise ConfigError(
                f"the {term} term reads the embedding {name!r}, but the model has {have}: set "
                f"model.projection (the contrast presets do), e.g. model.projection={{source: decoder, dim: 256}}, "
                f"or name another head with the term's `embedding` key"
            )
        return self.embeddings[name]

    def take(self, rows: slice) -> SegOutput:
        """The output of the images `rows` of the batch (every field sliced alike; views, no copy)."""
        return SegOutput(**{f.name: _rows(getattr(self, f.name), rows) for f in fields(self)})

    @staticmethod
    def cat(parts: Sequence[SegOutput], only: Collection[str] | None = None) -> SegOutput:
        """The outputs of several forward passes of the same network as one batch, in order, so
        a loss can see images that were not in one pass (UniMatch: the labeled images of its
        first pass and the strong views of its second). `only` limits the copy to the named
        fields (the ones the losses read; `logits` is always kept); the others stay empty. The
        parts must carry the same fields (and the embeddings the same heads: their pointwise tails
        are shared)."""
        names = [f.name for f in fields(SegOutput) if only is None or f.name in only or f.name == "logits"]
        try:
            return SegOutput(**{name: _cat([getattr(p, name) for p in parts]) for name in names})
        except _Mismatch as err:
            raise ValueError(f"SegOutput.cat: the parts carry different fields ({err})") from None


class _Mismatch(Exception):
    pass


def _rows(value: Any, rows: slice) -> Any:
    """`value` (a tensor, PixelEmbedding, list or mapping of them, or None) for the batch `rows`."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[rows]
    if isinstance(value, PixelEmbedding):
        return value.take(rows)
    if isinstance(value, Mapping):
        return {k: _rows(v, rows) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rows(v, rows) for v in value]
    raise TypeError(f"SegOutput holds a {type(value).__name__}; only tensors, embeddings, lists and mappings")


def _cat(values: Sequence[Any]) -> Any:
    """The batch concatenation of same-shaped structures (see `_rows`)."""
    first = values[0]
    if any(_kind(v) != _kind(first) for v in values):
        raise _Mismatch(f"{sorted({type(v).__name__ for v in values})} at one place")
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, PixelEmbedding):
        return PixelEmbedding.cat(values)
    if isinstance(first, Mapping):
        if any(not isinstance(v, Mapping) or set(v) != set(first) for v in values):
            raise _Mismatch(f"keys {sorted(first)} vs {[sorted(v) for v in values if isinstance(v, Mapping)]}")
        return {k: _cat([v[k] for v in values]) for k in first}
    if isinstance(first, list | tuple):
        if any(len(v) != len(first) for v in values):
            raise _Mismatch("lists of different lengths")
        return [_cat(list(items)) for items in zip(*values, strict=True)]
    raise _Mismatch(f"a {type(first).__name__}")


def _kind(value: Any) -> Any:
    """What `_cat` may join: mappings with mappings, embeddings with embeddings, else one type."""
    if isinstance(value, Mapping):
        return Mapping
    if isinstance(value, PixelEmbedding):
        return PixelEmbedding
    return type(value)
