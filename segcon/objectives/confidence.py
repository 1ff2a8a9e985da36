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
from every rank's entries (`MemoryUser`: the method gathers them as tensors), so all ranks hold the
same state; the loss of step t reads the state after step t - 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.models.output import PixelEmbedding, SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.contrast import labels_at
from segcon.objectives.memory import ClassMemory, MemoryUser
from segcon.objectives.samplers import first_per_group, random_priority
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError


class ConfidenceContrastLoss(Term, MemoryUser):
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
        index, labels = self.anchors(output, targets)
        z = at_least_float32(emb.at(index))
        if index.numel() == 0:
            return emb.zero()
        losses = []
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().squeeze(1)
            negatives = self.draw_negatives(c, (rows.numel(), self.negatives_per_anchor))
            if negatives is not None:
                losses.append(self._anchor_losses(z[rows], self.prototypes[c], negatives))
        if not losses:
            return emb.zero()
        return torch.cat(losses).mean()

    def draw_negatives(self, c: int, shape: tuple[int, int]) -> Tensor | None:
        """`shape` bank entries `[N, n, D]` drawn uniformly, with replacement, from the filled
        slots of the classes other than `c` (None when they hold none). A class's filled slots
        are its first `count` ones, so the draw indexes the bank without copying it."""
        counts = self.bank.count.clone()
        counts[c] = 0
        total = int(counts.sum())
        if total == 0:
            return None
        ends = torch.cumsum(counts, 0)
        u = torch.randint(total, shape, device=counts.device)
        cls = torch.searchsorted(ends, u, right=True)
        return self.bank.feats[cls, u - (ends[cls] - counts[cls])]

    def _anchor_losses(self, z: Tensor, prototype: Tensor, negatives: Tensor) -> Tensor:
        """ℓ for anchors `z [N, D]` of one class against its `prototype [D]` and their own
        `negatives [N, n, D]`: `[N]`."""
        with torch.autocast(z.device.type, enabled=False):  # float32 similarities under mixed precision
            pos = (z @ at_least_float32(prototype)) / self.temperature  # [N]
            neg = torch.einsum("nd,nkd->nk", z, at_least_float32(negatives)) / self.temperature  # [N, n]
            return torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos

    @torch.no_grad()
    def anchors(self, output: SegOutput, targets: Targets) -> tuple[Tensor, Tensor]:
        """The anchors: flat indices `[N]` into `[B * h * w]` (the embedding's resolution) and
        their labels `[N]`. Low-confidence pixels (module docstring) of the classes whose
        prototype is set, at most `anchors_per_class` per class, drawn uniformly."""
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
        low = valid & (score < self.threshold) & self.prototype_set[safe]
        candidates = low.reshape(-1).nonzero().squeeze(1)
        classes = safe.reshape(-1)[candidates]
        quota = torch.full((self.num_classes,), self.anchors_per_class, dtype=torch.long, device=labels.device)
        picked = first_per_group(classes, random_priority(classes.numel(), classes.device), quota)
        return candidates[picked], classes[picked]

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
        if "valid" in teacher.aux:
            high &= labels_at(teacher.aux["valid"], (h, w))
        index = high.reshape(-1).nonzero().squeeze(1)
        group = label.reshape(-1)[index]
        counts = torch.bincount(group, minlength=k).to(probs.dtype)
        means = emb.group_means(index, group, k, normalize=False) if index.numel() else probs.new_zeros(k, self.dim)
        proto = torch.cat([means * counts[:, None], counts[:, None]], 1)
        picked = first_per_group(group, random_priority(group.numel(), group.device),
                                 torch.full((k,), u, dtype=torch.long, device=group.device))
        chosen = group[picked]
        sizes = torch.bincount(chosen, minlength=k)
        slot = chosen * u + torch.arange(chosen.numel(), device=chosen.device) - (torch.cumsum(sizes, 0) - sizes)[chosen]
        bank = probs.new_zeros(k * u, self.dim)
        bank_labels = torch.full((k * u,), -1, dtype=torch.long, device=chosen.device)
        if chosen.numel():
            bank[slot] = at_least_float32(emb.at(index[picked])).to(bank.dtype)
            bank_labels[slot] = chosen
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
