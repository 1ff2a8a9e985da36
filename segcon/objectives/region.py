"""RC²L's region-level consistency and contrast (`contrast=rc2l`): our reconstruction of Zhang et
al., IJCAI 2022 (METHODS.md §4(c)-(d)); no code was published.

On every unlabeled row (a strong view) the teacher's targets are, with `teacher_regions: semantic`,
its semantic masks: for each
class c present among the confident pixels (`Targets.confidence >= δ`) of the (CutMixed) pseudo-
label map at the mask resolution, the mask `M_c = [Ŷ = c]`, pixels below δ ignored, regions with
fewer than `min_area` confident pixels dropped; its teacher region feature `r_c` is the mean of
the teacher's mask features `F^t` (CutMixed with the same boxes) over the region. The student's
queries are matched to the regions as MaskFormer matches (segcon.objectives.set_loss). With
`teacher_regions: queries` (the default; the paper's Figure 2: "Nᵗ masks from the teacher model") the regions
are the teacher's own queries whose top class (not "no object") has probability >= δ, each mask
`σ(m_q) > 0.5` over the view's real pixels (those of the CutMix box taken from the previous
view's queries), kept from `min_area` pixels; their features are the teacher's mask embeddings
when `rfc_features: mask_embed` (the student's side then its matched queries' mask embeddings).
Then:

- RCC: CE of every query's class logits against its region's class, "no object" if unmatched
  (no-object weight 0.1);
- SMC: focal (20) + dice (1) of each matched mask against its region's mask (ignore excluded);
- RMC: `−log softmax_k(d(σ(p_j), M_k) / τ_m)[j]` over the image's regions, d the Dice similarity
  `(2 Σ a b + 1) / (Σ a + Σ b + 1)` on the valid pixels;
- RFC: `−log softmax_k(⟨r^s_j, r^t_k⟩ / τ_f)[j]`, r^s_j the student's mask features pooled by
  `σ(p_j)` over the valid pixels, both L2-normalised (or a projection head's embeddings pooled,
  `embedding`); with `cross_image`, the teacher regions of the other images whose class differs
  join as negatives.

RCC and SMC are normalised as MaskFormer's criterion is (RCC: the class-weighted mean over every
query of the unlabeled rows; SMC: summed over the matched regions of the batch, divided by their
number); RMC and RFC are averaged over the regions of an image, then over the images with at least
one region. An image with one region gives RMC and RFC a zero (one candidate) without NaN; an
image without regions teaches its queries "no object" (`empty_images: no_object`) or nothing
(`skip`). Labeled rows are left to the supervised loss. Logged on logging steps
(`diagnostics`), the collapse signal of the teacher's regions: `regions_per_image` and
`empty_images` (share of the unlabeled rows without a region), and `region_share/<class>` (each
class's share of the kept regions).

Static shapes: every row is computed, a region is one of K class slots per row (`SlotTargets`;
labeled rows hold none), and the per-image means are masked sums; the one host synchronisation is
the matcher's (segcon.objectives.set_loss.match_on_host).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.set_loss import Matching, SetCriterion, SlotTargets, mask_scores
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError
from segcon.utils.maps import cutmix, labels_at
from segcon.utils.static import arange, group_counts

TERMS = ("rcc", "smc", "rmc", "rfc")
TEACHER_REGIONS = ("semantic", "queries")
RFC_FEATURES = ("pooled", "mask_embed")
EMPTY_IMAGES = ("no_object", "skip")


def dice_similarity(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """`(2 Σ a b + 1) / (Σ a + Σ b + 1)` over the valid pixels, for masks `a [B, N, P]`,
    `b [B, M, P]` and `valid [B, P]`: `[B, N, M]`."""
    v = valid.to(a.dtype)[:, None, :]
    a, b = a * v, b.to(a.dtype) * v
    return (2 * a @ b.transpose(1, 2) + 1) / (a.sum(-1)[:, :, None] + b.sum(-1)[:, None, :] + 1)


def masked_average(features: Tensor, masks: Tensor) -> Tensor:
    """Mask average pooling: `Σ_x m(x) F(x) / (Σ_x m(x) + ε)` for features `[B, C, P]` and masks
    `[B, N, P]`: `[B, N, C]`."""
    masks = masks.to(features.dtype)
    return (masks @ features.transpose(1, 2)) / (masks.sum(-1)[..., None] + 1e-6)


def region_contrast(logits: Tensor, allowed: Tensor, target: Tensor, matched: Tensor) -> Tensor:
    """`−log softmax(logits[b, s])[target[b, s]]` over the `allowed` candidates `[B, K, M]`,
    averaged over the matched slots `[B, K]` of each image, then over the images with one; 0 (and
    no NaN) where there are none."""
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    loss = -logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]  # [B, K]
    m = matched.to(logits.dtype)
    regions = m.sum(1)
    per_image = (loss * m).sum(1) / regions.clamp_min(1)
    return per_image.sum() / (regions > 0).sum().clamp_min(1)


class RegionConsistencyContrast(Term):
    """RC²L's four terms on the unlabeled rows (see the module docstring); returns
    `{"rcc", "smc", "rmc", "rfc"}`, each with its weight applied.

    Args:
        num_classes: K.
        confidence_threshold: δ; teacher pixels below it are ignored.
        min_area: regions with fewer confident pixels at the mask resolution are dropped.
        rcc_weight, smc_weight, rmc_weight, rfc_weight: λ of each term (1, 1, 0.1, 0.1).
        mask_temperature, feature_temperature: τ_m and τ_f (0.1, 0.1).
        cross_image: RFC also takes the other images' teacher regions of other classes as negatives.
        embedding: None pools the mask features (the model's `decoder`); a projection head's name
            pools its per-pixel embeddings instead (student and teacher; the teacher keeps it via
            method.teacher_heads).
        set_loss: the matcher's costs and the RCC/SMC weights as SetCriterion's keyword arguments
            (`no_object_weight`, `focal_weight`, `cost_focal`, ...); None or absent keys: its
            defaults, MaskFormer's (loss=mask_set).
        teacher_regions: `queries` (the teacher's confident queries' masks, the default) or
            `semantic` (per-class masks of the teacher's semantic map); see the module docstring.
        rfc_features: `pooled` (region features pooled from per-pixel maps) or `mask_embed` (the
            queries' mask embeddings; needs `teacher_regions: queries`).
        empty_images: an unlabeled image without a region is left out of RCC (`skip`, the
            default) or teaches its queries "no object" (`no_object`).
    """

    reads: ClassVar[frozenset[str]] = frozenset(
        {"logits", "decoder", "embeddings", "mask_cls", "mask_logits", "mask_embed"})
    reads_teacher: ClassVar[bool] = True

    def __init__(
        self,
        num_classes: int,
        confidence_threshold: float = 0.7,
        min_area: int = 16,
        rcc_weight: float = 1.0,
        smc_weight: float = 1.0,
        rmc_weight: float = 0.1,
        rfc_weight: float = 0.1,
        mask_temperature: float = 0.1,
        feature_temperature: float = 0.1,
        cross_image: bool = False,
        embedding: str | None = None,
        set_loss: Mapping[str, Any] | None = None,
        teacher_regions: str = "queries",
        rfc_features: str = "pooled",
        empty_images: str = "skip",
    ) -> None:
        super().__init__()
        for key, value, choices in (("teacher_regions", teacher_regions, TEACHER_REGIONS),
                                    ("rfc_features", rfc_features, RFC_FEATURES),
                                    ("empty_images", empty_images, EMPTY_IMAGES)):
            if value not in choices:
                raise ConfigError(f"contrast rc2l: {key}={value!r} must be one of {list(choices)}")
        if rfc_features == "mask_embed" and (teacher_regions != "queries" or embedding is not None):
            raise ConfigError("contrast rc2l: rfc_features=mask_embed contrasts the teacher's query embeddings: "
                              "set teacher_regions=queries (and embedding=null)")
        self.teacher_regions, self.rfc_features, self.empty_images = teacher_regions, rfc_features, empty_images
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ConfigError(f"contrast rc2l: confidence_threshold={confidence_threshold} must lie in [0, 1]")
        if min(mask_temperature, feature_temperature) <= 0 or min_area < 1:
            raise ConfigError("contrast rc2l: temperatures must be > 0 and min_area >= 1")
        self.num_classes, self.threshold, self.min_area = num_classes, confidence_threshold, min_area
        self.weights = dict(zip(TERMS, (rcc_weight, smc_weight, rmc_weight, rfc_weight), strict=True))
        self.tau_m, self.tau_f = mask_temperature, feature_temperature
        self.cross_image, self.embedding = cross_image, embedding
        settings = dict(set_loss or {})
        for key in ("num_classes", "deep_supervision", "ignore_index"):
            if key in settings:
                raise ConfigError(f"contrast rc2l: set_loss.{key} is set by the term itself; remove it")
        self.set_loss = SetCriterion(num_classes, deep_supervision=False, **settings)
        self._last_regions: tuple[Tensor, Tensor, Tensor] | None = None  # for `diagnostics`

    def zero(self, output: SegOutput) -> Tensor:
        zero = self.set_loss.zero(output) + output.decoder.sum() * 0.0
        if self.embedding is not None:
            zero = zero + output.embedding(self.embedding, type(self).__name__).zero()
        return zero

    # -- targets ---------------------------------------------------------------------------

    @torch.no_grad()
    def regions(self, targets: Targets, size: tuple[int, int]) -> SlotTargets:
        """The teacher's region targets of every row at `size` (`teacher_regions`); rows with
        ground truth (`targets.labeled`) hold none.

        semantic: class k of a row is a region when at least `min_area` of its confident pixels
        (valid: not ignore, confidence >= δ) carry k. queries: `_query_regions`."""
        if self.teacher_regions == "queries":
            slots = self._query_regions(targets, size)
        else:
            labels = labels_at(targets.labels, size)
            valid = labels != targets.ignore_index
            if targets.confidence is not None:
                valid = valid & (labels_at(targets.confidence, size) >= self.threshold)
            slots = SlotTargets.of(labels, valid, self.num_classes, self.min_area)
        if targets.labeled is not None:
            slots.present = slots.present & ~targets.labeled[:, None]
        return slots

    def _teacher_rows(self, targets: Targets) -> tuple[Tensor, Tensor]:
        """For every row, the teacher row of its view and the previous one (whose content its
        CutMix box holds): the i-th unlabeled row reads the teacher's row i (modulo the teacher's
        batch: one per strong view); labeled rows read rows they never use."""
        assert targets.teacher is not None and targets.labeled is not None
        n = targets.teacher.logits.shape[0]
        index = ((~targets.labeled).cumsum(0) - 1).clamp_min(0) % n
        return index, (index - 1) % n

    def _query_regions(self, targets: Targets, size: tuple[int, int]) -> SlotTargets:
        """2N slots per row: the teacher's N queries of the row's own view (outside its CutMix
        box), then the N of the previous view (inside it); a slot is a region when its query's top
        class is not "no object" with probability >= δ and its mask holds `min_area` real pixels."""
        teacher = targets.teacher
        assert teacher is not None
        teacher_cls, logits = mask_scores(teacher, "contrast rc2l (teacher_regions=queries)")
        score, cls = at_least_float32(teacher_cls).softmax(-1).max(-1)  # [U, N]
        confident = (cls < self.num_classes) & (score >= self.threshold)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        masks = logits.flatten(2) > 0  # σ(m) > 0.5
        real = (masks.new_ones(masks.shape[0], masks.shape[2]) if teacher.valid is None
                else labels_at(teacher.valid, size).flatten(1))
        own, previous = self._teacher_rows(targets)
        box = (labels_at(targets.mix_boxes, size).flatten(1) if targets.mix_boxes is not None
               else real.new_zeros(own.shape[0], real.shape[1]))
        slot_masks = torch.cat([masks[own] & ~box[:, None], masks[previous] & box[:, None]], 1)  # [B, 2N, P]
        valid = torch.where(box, real[previous], real[own])
        present = (torch.cat([confident[own], confident[previous]], 1)
                   & ((slot_masks & valid[:, None]).sum(-1) >= self.min_area))
        classes = torch.cat([cls[own], cls[previous]], 1).clamp_max(self.num_classes - 1)
        return SlotTargets(present, slot_masks, valid, classes)

    def _teacher_maps(self, targets: Targets, size: tuple[int, int]) -> Tensor:
        """The teacher's pooled maps `[B, C, P]` for every row (`_teacher_rows`), CutMixed with
        its box (the box content from the previous teacher row)."""
        assert targets.teacher is not None
        maps = at_least_float32(self._pooled_maps(targets.teacher).detach())
        if maps.shape[-2:] != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        index, previous = self._teacher_rows(targets)
        own = maps[index]
        if targets.mix_boxes is not None:
            own = cutmix(labels_at(targets.mix_boxes, size), own, maps[previous])
        return own.flatten(2)

    def _pooled_maps(self, output: SegOutput) -> Tensor:
        """The per-pixel features region features pool: mask features, or a projection head's."""
        if self.embedding is None:
            if output.decoder is None:
                raise ConfigError("contrast rc2l pools the mask features: use model=maskformer_*")
            return output.decoder
        return output.embedding(self.embedding, type(self).__name__).dense()

    # -- the terms -------------------------------------------------------------------------

    def forward(self, output: SegOutput, targets: Targets) -> dict[str, Tensor]:
        mask_scores(output, "contrast rc2l")
        self._last_regions = None
        if targets.teacher is None and targets.labeled is None:  # a supervised warm-up: no teacher yet
            return dict.fromkeys(TERMS, self.zero(output))
        if targets.teacher is None:
            raise ConfigError("contrast rc2l reads the teacher's mask features: train it with a teacher-student "
                              "method (method=rc2l)")
        zero = self.zero(output)
        if targets.labeled is None:  # every row is ground truth
            return dict.fromkeys(TERMS, zero)
        with torch.autocast(targets.labels.device.type, enabled=False):  # float16 sums over pixels overflow
            return self._terms(output, targets, zero)

    def _terms(self, output: SegOutput, targets: Targets, zero: Tensor) -> dict[str, Tensor]:
        """The four terms on the unlabeled rows, in float32 or wider."""
        assert targets.labeled is not None
        mask_cls, mask_logits = (at_least_float32(t) for t in mask_scores(output, "contrast rc2l"))
        size = tuple(mask_logits.shape[-2:])
        slots = self.regions(targets, size)
        (matching,) = self.set_loss.match([(mask_cls, mask_logits)], slots, strict=self.teacher_regions == "semantic")
        rows = ~targets.labeled
        self._last_regions = (slots.present, slots.classes, rows)
        if self.empty_images == "skip":
            rows = rows & slots.present.any(1)
        set_terms = self.set_loss.layer_losses(mask_cls, mask_logits, slots, matching, rows=rows)
        flat = mask_logits.flatten(2)
        probs = flat.gather(1, matching.query[..., None].expand(-1, -1, flat.shape[-1])).sigmoid()  # [B, S, P]
        b, k = slots.present.shape
        slot = arange(k, slots.present.device)
        own = matching.matched[:, None, :].expand(b, k, k)  # candidates: the image's own regions
        target = slot.expand(b, k)
        rmc = region_contrast(dice_similarity(probs, slots.masks, slots.valid) / self.tau_m, own, target,
                              matching.matched)
        student_regions, teacher_regions = self._region_features(output, targets, slots, matching, probs, size)
        if self.cross_image:  # every image's regions; another image's only where its class differs
            keys = teacher_regions.flatten(0, 1)  # [B * S, C], image-major
            same_image = arange(b, slot.device)[:, None, None, None] == arange(b, slot.device)[None, None, :, None]
            other_class = slots.classes[:, :, None, None] != slots.classes[None, None, :, :]
            allowed = (matching.matched[None, None] & (same_image | other_class)).flatten(2)  # [B, S, B * S]
            rfc = region_contrast(student_regions @ keys.T / self.tau_f, allowed,
                                  target + k * arange(b, slot.device)[:, None], matching.matched)
        else:
            rfc = region_contrast(student_regions @ teacher_regions.transpose(1, 2) / self.tau_f, own, target,
                                  matching.matched)
        values = {"rcc": set_terms["ce"], "smc": set_terms["focal"] * self.set_loss.weights[1]
                  + set_terms["dice"] * self.set_loss.weights[2], "rmc": rmc, "rfc": rfc}
        return {name: self.weights[name] * (v + zero) for name, v in values.items()}

    @torch.no_grad()
    def diagnostics(self, class_names: Sequence[str]) -> dict[str, Tensor]:
        """Of the last computed step's unlabeled rows: `regions_per_image` (mean kept teacher
        regions), `empty_images` (the share of rows without one) and `region_share/<class>`
        (each class's share of the kept regions; all 0 when none was kept). None before the
        teacher's first step."""
        if self._last_regions is None:
            return {}
        present, classes, unlabeled = self._last_regions  # [B, S], [B, S], [B]: labeled rows hold no region
        images = unlabeled.sum().clamp_min(1)
        per_image = present.sum(1)
        counts = group_counts(classes.flatten(), self.num_classes, present.flatten())
        shares = counts / counts.sum().clamp_min(1)
        return {"regions_per_image": per_image.sum() / images,
                "empty_images": ((per_image == 0) & unlabeled).sum() / images,
                **{f"region_share/{name}": shares[c] for c, name in enumerate(class_names)}}

    def _region_features(self, output: SegOutput, targets: Targets, slots: SlotTargets, matching: Matching,
                         probs: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """L2-normalised region features `[B, S, C]` of the student (its matched queries) and the
        teacher (its regions): the matched queries' and the teacher queries' mask embeddings
        (`rfc_features: mask_embed`), or per-pixel maps pooled by the matched queries' masks
        `probs [B, S, P]` and by the regions' masks."""
        if self.rfc_features == "mask_embed":
            assert targets.teacher is not None
            embed = at_least_float32(output.mask_embed)  # [B, N, C]
            student = embed.gather(1, matching.query[..., None].expand(-1, -1, embed.shape[-1]))
            teacher_embed = at_least_float32(targets.teacher.mask_embed.detach())
            own, previous = self._teacher_rows(targets)
            teacher = torch.cat([teacher_embed[own], teacher_embed[previous]], 1)
            return F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
        student = at_least_float32(self._pooled_maps(output))
        if student.shape[-2:] != size:
            student = F.interpolate(student, size=size, mode="bilinear", align_corners=False)
        valid = slots.valid.to(probs.dtype)[:, None, :]
        teacher = self._teacher_maps(targets, size)
        return (F.normalize(masked_average(student.flatten(2), probs * valid), dim=-1),
                F.normalize(masked_average(teacher, slots.masks.to(teacher.dtype) * valid), dim=-1))
