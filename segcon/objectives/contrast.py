"""Supervised pixel contrast (Wang et al., ICCV 2021; METHODS.md §0) and its memory-bank variant.

Both are Objective terms (segcon.objectives.base.Term): `term(output: SegOutput, targets:
Targets) -> scalar`. They read one of `output.embeddings` (the projection head's PixelEmbedding at
`h x w`, finished only at the sampled pixels; the head named by the term's `embedding` key),
resize the kept labels (`targets.reliable()`: ground truth and the pseudo-labels the method's
filter keeps) to `h x w` with nearest neighbour, take predictions (and, for samplers that need
them, probabilities) from the logits at `h x w` (the decoder's own resolution where the model
has one), let the sampler choose anchors, and contrast every anchor with the other sampled
pixels of the whole batch (cross-image) — and, for the memory variant, with the per-class memory
bank as well.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.models.output import PixelEmbedding, SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.memory import ClassMemory
from segcon.objectives.samplers import pair_ids, random_priority
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError
from segcon.utils.maps import labels_at
from segcon.utils.static import arange, group_counts, off_diagonal, rank_in_group

DENOMINATORS = ("per_positive", "supcon")


def pair_contrast(
    anchors: Tensor,
    anchor_labels: Tensor,
    keys: Tensor,
    key_labels: Tensor,
    temperature: float,
    base_temperature: float,
    denominator: str = "per_positive",
    keys_include_anchors: bool = True,
    anchor_valid: Tensor | None = None,
    key_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Supervised InfoNCE of each anchor against a set of keys.

    Args:
        anchors: `[N, D]` L2-normalised; anchor_labels `[N]`.
        keys: `[M, D]` L2-normalised; key_labels `[M]`. When `keys_include_anchors`, the first N
            keys are the anchors themselves and key i is not a pair of anchor i.
        denominator: "per_positive" (ContrastiveSeg: each positive against itself plus all
            negatives) or "supcon" (all other keys in the partition).
        anchor_valid, key_valid: `[N]` / `[M]` which rows are real (fixed-size lists padded by a
            sampler or a memory); the others take no part. None: all.

    Returns:
        per-anchor losses `[N]` (0 where an anchor has no positive) and a `[N]` bool mask of the
        anchors that are valid and have at least one positive.

    ℓ_i = -(τ/τ_base) · mean_{p ∈ P(i)} [ s_ip - log( e^{s_ip} + Σ_{n ∈ Neg(i)} e^{s_in} ) ]
    (per_positive), or with log Σ_{k ≠ i} e^{s_ik} as the second term (supcon); s = z·z'/τ.
    """
    if denominator not in DENOMINATORS:
        raise ConfigError(f"contrast denominator must be one of {DENOMINATORS}, got {denominator!r}")
    anchors, keys = at_least_float32(anchors), at_least_float32(keys)
    # [N, M]; 1/τ on the N x D anchors, not the N x M matrix. No row-max shift: every quantity
    # below is shift-invariant per row, and logsumexp / softplus are stable on their own.
    with torch.autocast(anchors.device.type, enabled=False):  # float32 similarities under mixed precision
        sim = (anchors / temperature) @ keys.T
    same = anchor_labels[:, None] == key_labels[None, :]
    real = torch.ones_like(same[0]) if key_valid is None else key_valid  # [M]
    pos = same & real
    if keys_include_anchors:
        n = anchors.shape[0]
        pos[:, :n] &= off_diagonal(n, anchors.device)
    minus_inf = torch.finfo(sim.dtype).min
    if denominator == "per_positive":
        log_neg = torch.logsumexp(sim.masked_fill(same | ~real, minus_inf), dim=1, keepdim=True)  # [N, 1]
        # -(s_ip - log(e^{s_ip} + e^{log_neg})) = softplus(log_neg - s_ip): one pass over [N, M]
        neg_log_prob = F.softplus(log_neg - sim)
    else:
        others = real.expand_as(same).clone()
        if keys_include_anchors:
            others[:, :n] &= off_diagonal(n, anchors.device)
        neg_log_prob = torch.logsumexp(sim.masked_fill(~others, minus_inf), dim=1, keepdim=True) - sim
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    if anchor_valid is not None:
        has_pos = has_pos & anchor_valid
    loss = (temperature / base_temperature) * torch.where(pos, neg_log_prob, 0.0).sum(1) / n_pos.clamp_min(1)
    return loss, has_pos


@dataclass(frozen=True)
class Anchors:
    """A sampler's choice, gathered: a fixed-size list (the sampler's capacity `M`) of which only
    the `valid` rows are real.

    Attributes:
        z: embeddings `[M, D]`. y: labels `[M]` (0 in the padding). index: flat pixel indices
        `[M]` into `[B * h * w]`, and the same as each row's image and flat pixel into `h * w`.
        valid: `[M]` bool.
    """

    z: Tensor
    y: Tensor
    index: Tensor
    image: Tensor
    pixel: Tensor
    valid: Tensor


def sample_anchors(
    output: SegOutput, targets: Targets, sampler: Callable[..., tuple[Tensor, Tensor]], embedding: str, term: str
) -> Anchors:
    """Let `sampler` choose anchors at the resolution `h x w` of the embedding named `embedding`,
    from the kept labels (nearest-resized) and the main classifier's predictions (and, only for
    samplers that need them, probabilities) at that resolution, without gradient."""
    emb = output.embedding(embedding, term)
    b, (h, w) = targets.labels.shape[0], emb.size
    labels = labels_at(targets.reliable(), (h, w)).reshape(b, -1)
    with torch.no_grad():
        logits = output.logits_at((h, w)).detach()
        preds = logits.max(1).indices.reshape(b, -1)  # argmax (the first maximum), several times faster on CPU
        probs = logits.softmax(1).reshape(b, logits.shape[1], -1) if getattr(sampler, "needs_probs", False) else None
    index, valid = sampler(labels, preds, probs, num_classes=logits.shape[1])
    image, pixel = index // (h * w), index % (h * w)
    # a padding row reads pixel 0; its label is 0, a class, so that lookups by label stay in range
    return Anchors(emb.at_pixels(image, pixel), labels.reshape(-1)[index] * valid, index, image, pixel, valid)


@functools.lru_cache(maxsize=16)
def _slot_classes(slots: int, per_class: int, num_classes: int, device: torch.device, offset: int = 0) -> Tensor:
    """The class (+ `offset`) of each of `slots` slots laid out as (image or ring, class, rank <
    per_class): `[slots]`, built once."""
    return torch.arange(slots, device=device) // per_class % num_classes + offset


class PixelContrastLoss(Term):
    """ContrastiveSeg's pixel-to-pixel contrast over sampled anchors of the whole batch.

    Args:
        sampler: chooses the anchors (see segcon.objectives.samplers).
        temperature, base_temperature: τ and τ_base (the loss is scaled by τ / τ_base).
        denominator: "per_positive" (ContrastiveSeg) or "supcon".
        embedding: the projection head whose embeddings are contrasted.

    Ignore pixels and the pseudo-labels the method's filter drops are never sampled.
    """

    reads: ClassVar[frozenset[str]] = frozenset({"logits", "decoder_logits", "embeddings"})

    def __init__(
        self,
        sampler: Callable[..., Tensor],
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        denominator: str = "per_positive",
        embedding: str = "projection",
    ) -> None:
        super().__init__()
        if denominator not in DENOMINATORS:
            raise ConfigError(f"contrast denominator must be one of {DENOMINATORS}, got {denominator!r}")
        self.sampler = sampler
        self.temperature, self.base_temperature = temperature, base_temperature
        self.denominator = denominator
        self.embedding = embedding

    def sample(self, output: SegOutput, targets: Targets) -> Anchors:
        """The sampled anchors (a fixed-size list with a validity mask)."""
        return sample_anchors(output, targets, self.sampler, self.embedding, type(self).__name__)

    def contrast(self, anchors: Anchors, keys: Tensor | None = None, key_labels: Tensor | None = None,
                 key_valid: Tensor | None = None) -> Tensor:
        """Mean loss of the valid anchors against the batch's anchors plus optional extra keys
        (`[T, D]`, `[T]`, `[T]` valid)."""
        z, y, valid = anchors.z, anchors.y, anchors.valid
        if keys is not None:
            z_all, y_all, valid_all = torch.cat([z, keys]), torch.cat([y, key_labels]), torch.cat([valid, key_valid])
        else:
            z_all, y_all, valid_all = z, y, valid
        loss, has_pos = pair_contrast(z, y, z_all, y_all, self.temperature, self.base_temperature, self.denominator,
                                      anchor_valid=valid, key_valid=valid_all)
        # mean over anchors with a positive; a graph-connected 0 when there is none
        return (loss * has_pos).sum() / has_pos.sum().clamp_min(1)

    def zero(self, output: SegOutput) -> Tensor:
        return output.embedding(self.embedding, type(self).__name__).zero()

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        return self.contrast(self.sample(output, targets))


class PixelMemoryContrastLoss(PixelContrastLoss):
    """Pixel contrast against the batch plus a per-class memory of past embeddings.

    Two per-class FIFO memories of detached embeddings: pixel entries (up to
    `pixel_update_freq` random pixels per class per image per step) and segment entries (one
    L2-normalised region mean per class per image per step). Anchors contrast with the batch's
    anchors and every filled memory slot (no class is special, empty slots are not used). Both
    live in one `ClassMemory` of 2K rings (ring c < K: class c's pixel entries; ring K + c: its
    segment entries), so that a step writes and reads them in one program.

    New entries are not written by `forward`: the training method collects `pending_entries()`
    from every rank (tensor all_gather) and calls `enqueue`, so all ranks hold the same memory.
    """

    MEMORY = "memory"
    memories: ClassVar[tuple[str, ...]] = (MEMORY,)

    def __init__(
        self,
        sampler: Callable[..., Tensor],
        num_classes: int,
        dim: int = 256,
        memory_size: int = 5000,
        pixel_update_freq: int = 10,
        temperature: float = 0.07,
        base_temperature: float = 0.07,
        denominator: str = "per_positive",
        embedding: str = "projection",
    ) -> None:
        super().__init__(sampler, temperature, base_temperature, denominator, embedding)
        self.num_classes = num_classes
        self.pixel_update_freq = pixel_update_freq
        self.memory = ClassMemory(2 * num_classes, memory_size, dim)
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints written before the two memories shared one ClassMemory: pixel rings first
        old = [f"{prefix}memories.{name}." for name in ("pixel", "segment")]
        if f"{old[0]}feats" in state_dict:
            for buf in ("feats", "ptr", "count"):
                state_dict[f"{prefix}memory.{buf}"] = torch.cat([state_dict.pop(f"{o}{buf}") for o in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def zero(self, output: SegOutput) -> Tensor:
        self._pending = {}  # in warm-up nothing is computed, and nothing enters the memory
        return super().zero(output)

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        anchors = self.sample(output, targets)
        emb = output.embedding(self.embedding, type(self).__name__)
        self._pending = self._new_entries(emb, targets.reliable())
        keys, _, filled = self.memory.entries()
        classes = _slot_classes(keys.shape[0], self.memory.size, self.num_classes, keys.device)  # ring % K
        return self.contrast(anchors, keys, classes, filled)

    @torch.no_grad()
    def _new_entries(self, embedding: PixelEmbedding, target: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Fixed-size entries of this step (padded with label -1, so every rank gathers the same
        shapes), as one list with their rings: pixel entries `[B * K * freq, D]` (up to `freq`
        random pixels per image and class; ring = class) and segment entries `[B * K, D]` (each
        image's L2-normalised class means; ring = K + class). Region
        means read every pixel (`PixelEmbedding.group_means`: for the usual heads without forming
        the D-channel map), the pixel entries only the chosen ones; no graph."""
        b, (h, w) = target.shape[0], embedding.size
        k, f = self.num_classes, self.pixel_update_freq
        device = target.device
        pair, valid = pair_ids(labels_at(target, (h, w)).reshape(b, -1), k, -1)
        group = torch.where(valid, pair, b * k)  # (image, class) of every pixel; b * k: no class
        counts = group_counts(group, b * k + 1)[: b * k]
        seg = embedding.group_means(None, group, b * k + 1)[: b * k]
        seg_lab = torch.where(counts > 0, _slot_classes(b * k, 1, k, device, offset=k), -1)  # its ring, or padding
        # up to f random pixels of each (image, class), in slot (image, class, rank)
        rank = rank_in_group(group, random_priority(pair.numel(), device))
        slot = torch.where(valid & (rank < f), group * f + rank, b * k * f)
        source = torch.full((b * k * f + 1,), -1, dtype=torch.long, device=device)
        source = source.scatter_(0, slot, arange(pair.numel(), device))[:-1]
        filled = source >= 0
        pix = embedding.at(source.clamp_min(0))  # the rows of unfilled slots are read but labelled padding
        pix_lab = torch.where(filled, _slot_classes(b * k * f, f, k, device), -1)
        return {self.MEMORY: (torch.cat([pix, seg.to(pix.dtype)]), torch.cat([pix_lab, seg_lab]))}

    def pending_entries(self) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's entries per memory, to be gathered from all ranks and enqueued."""
        return self._pending

    @torch.no_grad()
    def enqueue(self, memory: str, feats: Tensor, labels: Tensor) -> None:
        """Append entries `[M, D]` with their rings `[M]` (-1 = padding, skipped) to the memory."""
        if memory != self.MEMORY:
            raise KeyError(f"{type(self).__name__} has one memory, {self.MEMORY!r}, not {memory!r}")
        self.memory.push(feats, labels)

