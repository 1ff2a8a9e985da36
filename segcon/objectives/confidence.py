"""Confidence-level contrast (`contrast=confidence`): our reconstruction of the low-to-high-
confidence contrastive term of Liu 2022 (METHODS.md §3(c)-(d)), for class-imbalanced data.

Anchors are the student's low-confidence pixels: labeled pixels whose student probability of the
ground-truth class is below τ_h, and unlabeled pixels whose teacher confidence (the pseudo-label
source's, `Targets.confidence`) is below τ_h, with the teacher's label. Each anchor is pulled
toward its class's high-confidence prototype μ_k (an EMA over steps of the normalised mean teacher
embedding of the confident pixels of class k) and pushed from `negatives_per_anchor` high-
confidence teacher embeddings of the other classes, drawn from a per-class FIFO bank:

    ℓ_i = -log( e^{z_i·μ_k/τ} / (e^{z_i·μ_k/τ} + Σ_n e^{z_i·z_n/τ}) )

Every class gets the same anchor budget (`anchors_per_class`): the imbalance counter-measure
inside the term. A class whose prototype is still empty, or that has no negative in the bank yet,
gives no anchors. Prototypes and bank are buffers (checkpointed) and are updated after each step
from every rank's entries (`Term.pending_entries`: the method gathers them as tensors), so all ranks hold the
same state; the loss of step t reads the state after step t - 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.models.output import PixelEmbedding, SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.memory import ClassMemory
from segcon.objectives.samplers import first_per_group, random_priority
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError
from segcon.utils.maps import labels_at
from segcon.utils.static import compact, group_counts, rank_in_group


class ConfidenceContrastLoss(Term):
    """Low-confidence anchors against high-confidence prototypes and negatives (see the module
    docstring).

    Args:
        num_classes: K.
        dim: the projection head's output dimension D.
        threshold: τ_h, the confidence below which a pixel is an anchor and at or above which a
            teacher pixel feeds prototypes and bank.
        temperature: τ.
        prototype_momentum: m_p of the prototypes' EMA (a prototype starts as its first mean).
        normalize_prototypes: re-normalise each prototype after its EMA update.
        anchors_per_class: M, the anchor budget of every class per step (uniform draw).
        negatives_per_anchor: negatives drawn per anchor (uniformly, with replacement) from the
            bank entries of the other classes.
        bank_size: entries per class in the bank of high-confidence teacher embeddings.
        bank_updates_per_class: at most this many random confident teacher pixels per class and
            step enter the bank (per rank).
        embedding: the projection head read (the teacher must keep it: method.teacher_heads).
    """

    reads: ClassVar[frozenset[str]] = frozenset({"logits", "decoder_logits", "embeddings"})
    reads_teacher: ClassVar[bool] = True
    memories: ClassVar[tuple[str, ...]] = ("prototype", "bank")

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        threshold: float = 0.95,
        temperature: float = 0.5,
        prototype_momentum: float = 0.99,
        normalize_prototypes: bool = False,
        anchors_per_class: int = 256,
        negatives_per_anchor: int = 50,
        bank_size: int = 30000,
        bank_updates_per_class: int = 256,
        embedding: str = "projection",
    ) -> None:
        super().__init__()
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"contrast confidence: threshold={threshold} must lie in (0, 1]")
        if not 0.0 <= prototype_momentum < 1.0:
            raise ConfigError(f"contrast confidence: prototype_momentum={prototype_momentum} must lie in [0, 1)")
        if min(anchors_per_class, negatives_per_anchor, bank_size, bank_updates_per_class) < 1 or temperature <= 0:
            raise ConfigError("contrast confidence: anchors_per_class, negatives_per_anchor, bank_size and "
                              "bank_updates_per_class must be >= 1 and temperature > 0")
        self.num_classes, self.dim = num_classes, dim
        self.threshold, self.temperature = threshold, temperature
        self.prototype_momentum, self.normalize_prototypes = prototype_momentum, normalize_prototypes
        self.anchors_per_class, self.negatives_per_anchor = anchors_per_class, negatives_per_anchor
        self.bank_updates_per_class = bank_updates_per_class
        self.embedding = embedding
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("prototype_set", torch.zeros(num_classes, dtype=torch.bool))
        self.bank = ClassMemory(num_classes, bank_size, dim)
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}

    # -- the loss ------------------------------------------------------------------------

    def zero(self, output: SegOutput) -> Tensor:
        self._pending = {}  # in warm-up nothing is computed and nothing is updated
        return output.embedding(self.embedding, type(self).__name__).zero()

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        if targets.teacher is None and targets.labeled is None:  # a supervised warm-up: no teacher yet
            return self.zero(output)
        if targets.teacher is None:
            raise ConfigError("contrast=confidence reads the teacher's embeddings: train it with method=confidence_ssl "
                              "(or a teacher-student method with method.teacher_heads=[projection])")
        emb = output.embedding(self.embedding, type(self).__name__)
        self._pending = self._teacher_entries(targets.teacher)
        index, labels, valid = self.anchors(output, targets)
        z = at_least_float32(emb.at(index))
        negatives, found = self.draw_negatives(labels, self.negatives_per_anchor)
        valid = valid & found  # an anchor whose other classes have no bank entry yet takes no part
        losses = self._anchor_losses(z, self.prototypes[labels], negatives)
        return (losses * valid).sum() / valid.sum().clamp_min(1)  # a graph-connected 0 without anchors

    def draw_negatives(self, labels: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """For anchors of classes `labels [N]`: `n` bank entries each `[N, n, D]`, drawn
        uniformly, with replacement, from the filled slots of the classes other than the anchor's
        own, and whether it had any `[N]`. A class's filled slots are its first `count` ones, so
        the draw indexes the bank without copying it: a draw u among the other classes' slots is
        slot u of the bank's order, moved past the anchor's own class."""
        counts = self.bank.count
        ends = torch.cumsum(counts, 0)
        own, start = counts[labels], (ends - counts)[labels]  # [N]
        others = counts.sum() - own
        u = (torch.rand(labels.numel(), n, device=counts.device) * others[:, None]).long()
        u = torch.minimum(u, (others - 1).clamp_min(0)[:, None])  # rand < 1, but float rounding
        position = u + (u >= start[:, None]) * own[:, None]
        cls = torch.searchsorted(ends, position, right=True).clamp(max=counts.numel() - 1)
        return self.bank.feats[cls, position - (ends[cls] - counts[cls])], others > 0

    def _anchor_losses(self, z: Tensor, prototypes: Tensor, negatives: Tensor) -> Tensor:
        """ℓ for anchors `z [N, D]` against their classes' `prototypes [N, D]` and their own
        `negatives [N, n, D]`: `[N]`."""
        with torch.autocast(z.device.type, enabled=False):  # float32 similarities under mixed precision
            pos = (z * at_least_float32(prototypes)).sum(1) / self.temperature  # [N]
            neg = torch.einsum("nd,nkd->nk", z, at_least_float32(negatives)) / self.temperature  # [N, n]
            return torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos

    @torch.no_grad()
    def anchors(self, output: SegOutput, targets: Targets) -> tuple[Tensor, Tensor, Tensor]:
        """The anchors, a fixed-size list of `K × anchors_per_class`: flat indices into `[B * h *
        w]` (the embedding's resolution), their labels (0 in the padding) and which are valid.
        Low-confidence pixels (module docstring) of the classes whose prototype is set, at most
        `anchors_per_class` per class, drawn uniformly."""
        emb = output.embedding(self.embedding, type(self).__name__)
        b, (h, w) = targets.labels.shape[0], emb.size
        labels = labels_at(targets.labels, (h, w))
        valid = (labels != targets.ignore_index) & (labels >= 0) & (labels < self.num_classes)
        safe = labels.masked_fill(~valid, 0)
        student = output.logits_at((h, w)).detach().float().softmax(1).gather(1, safe[:, None])[:, 0]
        if targets.confidence is None:
            score = student
        else:
            confidence = labels_at(targets.confidence, (h, w))
            rows = torch.ones(b, dtype=torch.bool, device=labels.device) if targets.labeled is None else targets.labeled
            score = torch.where(rows[:, None, None], student, confidence)
        k, m = self.num_classes, self.anchors_per_class
        low = (valid & (score < self.threshold) & self.prototype_set[safe]).reshape(-1)
        group = torch.where(low, safe.reshape(-1), k)
        quota = torch.cat([torch.full((k,), m, dtype=torch.long, device=labels.device), group.new_zeros(1)])
        index, ok = compact(low & first_per_group(group, random_priority(group.numel(), group.device), quota), k * m)
        return index, safe.reshape(-1)[index] * ok, ok

    # -- prototypes and bank ---------------------------------------------------------------

    @torch.no_grad()
    def _teacher_entries(self, teacher: SegOutput) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's fixed-size entries from the teacher's confident pixels (valid, confidence
        >= τ_h): `prototype` `[K, D + 1]` (per class: the sum of the normalised embeddings and
        their count; label = class) and `bank` `[K * u, D]` (up to u random embeddings per class;
        label -1 pads)."""
        emb: PixelEmbedding = teacher.embedding(self.embedding, type(self).__name__)
        (h, w), k, u = emb.size, self.num_classes, self.bank_updates_per_class
        probs = teacher.logits_at((h, w)).detach().float().softmax(1)
        confidence, label = probs.max(1)
        high = confidence >= self.threshold
        if teacher.valid is not None:
            high &= labels_at(teacher.valid, (h, w))
        group = torch.where(high, label, k).reshape(-1)  # k: not confident
        every = torch.arange(group.numel(), device=group.device)
        counts = group_counts(group, k + 1)[:k].to(probs.dtype)
        means = emb.group_means(every, group, k + 1, normalize=False)[:k]
        proto = torch.cat([means * counts[:, None], counts[:, None]], 1)
        # up to u random confident pixels of each class, in slot (class, rank)
        rank = rank_in_group(group, random_priority(group.numel(), group.device))
        slot = torch.where((group < k) & (rank < u), group * u + rank.clamp(max=u - 1), k * u)
        source = torch.full((k * u + 1,), -1, dtype=torch.long, device=group.device).scatter_(0, slot, every)[:-1]
        filled = source >= 0
        bank = at_least_float32(emb.at(source.clamp_min(0))).to(probs.dtype) * filled[:, None]
        bank_labels = torch.where(filled, torch.arange(k * u, device=group.device) // u, -1)
        return {"prototype": (proto, torch.arange(k, device=proto.device)), "bank": (bank, bank_labels)}

    def pending_entries(self) -> dict[str, tuple[Tensor, Tensor]]:
        """This step's prototype sums and bank entries, to be gathered from all ranks."""
        return self._pending

    @torch.no_grad()
    def enqueue(self, memory: str, feats: Tensor, labels: Tensor) -> None:
        """Apply the entries of every rank: `bank` entries are pushed; `prototype` sums and
        counts `[W * K, D + 1]` are added up per class, and each class with a count moves its
        prototype toward the normalised mean (or starts there)."""
        if memory == "bank":
            self.bank.push(feats, labels)
            return
        totals = feats.new_zeros(self.num_classes, self.dim + 1).index_add_(0, labels, feats)
        counts = totals[:, -1]
        seen = counts > 0
        new = F.normalize(totals[:, :-1] / counts.clamp_min(1)[:, None], dim=1).to(self.prototypes.dtype)
        m = self.prototype_momentum
        updated = torch.where(self.prototype_set[:, None], m * self.prototypes + (1 - m) * new, new)
        if self.normalize_prototypes:
            updated = F.normalize(updated, dim=1)
        self.prototypes.copy_(torch.where(seen[:, None], updated, self.prototypes))
        self.prototype_set |= seen
