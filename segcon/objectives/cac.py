"""CAC: confidence-aware contrastive loss (Lv et al., ACM MM 2023; METHODS.md §1).

Two Objective terms (segcon.objectives.base.Term), both reading the whole `SegOutput`:

- `ConfidenceAwareContrastLoss` (λ): SupCon-style contrast over sampled anchors in which every
  pair (i, j) is weighted by `W_ij = 1 - (q_i[y_j] + q_j[y_i]) / 2`, q the softmax of the weight
  branch (`output.weight_logits`, a classifier on detached features). Pairs the model is
  already sure about weigh little.
- `WeightBranchLoss` (β): the supervised loss group applied to the weight branch's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from segcon.models.output import SegOutput, pixels_at
from segcon.objectives.base import Targets, Term
from segcon.objectives.contrast import sample_anchors
from segcon.objectives.objective import build_terms
from segcon.utils.dtypes import at_least_float32
from segcon.utils.errors import ConfigError
from segcon.utils.static import arange, off_diagonal

CLASS_MEANS = ("scatter", "present")


def pair_weights(q: Tensor, y: Tensor, pairs: Tensor) -> Tensor:
    """`W [N, N]` with `W_ij = 1 - (q_i[y_j] + q_j[y_i]) / 2` where `pairs [N, N]` (bool) holds,
    0 elsewhere (the diagonal, and pairs with a row a fixed-size sample pads with), from class
    probabilities `q [N, K]` and labels `y [N]`."""
    a = q.gather(1, y[None, :].expand(len(y), -1))  # a[i, j] = q_i[y_j]
    return torch.where(pairs, torch.rsub(a + a.T, 1.0, alpha=0.5), 0.0)  # 1 - (a + a.T) / 2


def cac_per_anchor(
    z: Tensor,
    y: Tensor,
    q: Tensor,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
    detach_pair_weights: bool = False,
    valid: Tensor | None = None,
) -> Tensor:
    """CAC loss of each of N sampled pixels `[N]`.

    Args:
        z: `[N, D]` L2-normalised embeddings; y: `[N]` labels (no ignore); q: `[N, K]` weight-branch
            probabilities.
        detach_pair_weights: stop the CAC gradient into the weight branch.
        valid: `[N]` which rows are real (a fixed-size sample's padding takes no part; its own
            loss is 0). None: all.

    ℓ_i = -(τ/τ_base) Σ_{j∈P(i)} W_ij (s_ij - log Σ_{k≠i} W_ik e^{s_ik}) / |P(i)|, s = z·z'/τ,
    P(i) the other pixels of y_i's class (an anchor without positive has ℓ_i = 0). The positive
    count is unweighted, as in the authors' code.
    """
    z, q = at_least_float32(z), at_least_float32(q)
    pairs = off_diagonal(len(y), y.device)
    if valid is not None:
        pairs = pairs & (valid[:, None] & valid[None, :])
    w = pair_weights(q, y, pairs)
    if detach_pair_weights:
        w = w.detach()
    with torch.autocast(z.device.type, enabled=False):  # float32 similarities under mixed precision
        # shifted by the largest similarity of unit vectors, 1/τ: stability only, it cancels out
        s = (z / temperature) @ z.T - 1.0 / temperature
    pos = (y[:, None] == y[None, :]) & pairs
    log_partition = torch.log((w * s.exp()).sum(1, keepdim=True) + 1e-16)
    numer = (torch.where(pos, w, 0.0) * (s - log_partition)).sum(1)
    return numer * (-temperature / base_temperature) / (pos.sum(1) + 1e-16)


def class_balanced_mean(
    per_anchor: Tensor, y: Tensor, class_mean: str = "scatter", valid: Tensor | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Mean of the per-class mean losses (`per_anchor`, `y`: `[N]`; only the `valid [N]` rows).

    class_mean "scatter" averages over class indices 0..max(y), absent classes counting 0 (the
    authors' scatter_mean); "present" over the classes in y. `num_classes` (K) bounds the labels
    (default: the largest label + 1, read from the data); 0 when no row is valid.
    """
    if class_mean not in CLASS_MEANS:
        raise ConfigError(f"contrast.cac.class_mean must be one of {CLASS_MEANS}, got {class_mean!r}")
    k = num_classes if num_classes is not None else int(y.max()) + 1
    real = torch.ones_like(per_anchor) if valid is None else valid.to(per_anchor.dtype)
    sums = per_anchor.new_zeros(k).index_add(0, y, per_anchor * real)
    counts = per_anchor.new_zeros(k).index_add(0, y, real)
    per_class = sums / counts.clamp_min(1)  # an absent class: 0
    present = counts > 0
    if class_mean == "scatter":  # classes 0..max(y); those above are absent (0)
        top = (present * arange(k + 1, y.device)[1:]).amax()
        return per_class.sum() / top.clamp_min(1)
    return per_class.sum() / present.sum().clamp_min(1)


class ConfidenceAwareContrastLoss(Term):
    """The CAC term: anchors from the sampler (CAC uses `sampler=marginal`), pair weights from
    the weight branch's probabilities at the sampled pixels (at the embedding's resolution: the
    branch's decoder-resolution logits where the model has them), all sampled pixels of the batch
    contrasted with each other.

    Args:
        sampler: chooses the anchors (segcon.objectives.samplers).
        temperature, base_temperature: τ and τ_base.
        class_mean: "scatter" (the authors' reduction) or "present"; see `class_balanced_mean`.
        detach_pair_weights: False (the authors'): the weight branch also learns from this term.
        embedding: the projection head whose embeddings are contrasted.
    """

    reads: ClassVar[frozenset[str]] = frozenset(
        {"logits", "decoder_logits", "embeddings", "weight_logits", "weight_decoder_logits"})

    def __init__(
        self,
        sampler: Callable[..., Tensor],
        temperature: float = 0.1,
        base_temperature: float = 0.07,
        class_mean: str = "scatter",
        detach_pair_weights: bool = False,
        embedding: str = "projection",
    ) -> None:
        super().__init__()
        if class_mean not in CLASS_MEANS:
            raise ConfigError(f"contrast.cac.class_mean must be one of {CLASS_MEANS}, got {class_mean!r}")
        self.sampler = sampler
        self.temperature, self.base_temperature = temperature, base_temperature
        self.class_mean = class_mean
        self.detach_pair_weights = detach_pair_weights
        self.embedding = embedding

    def zero(self, output: SegOutput) -> Tensor:
        """0 with the projection head and the weight branch in the graph."""
        return output.embedding(self.embedding, "cac").zero() + _weight_logits(output, "cac").sum() * 0.0

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        weight_logits = _weight_logits(output, "cac")
        anchors = sample_anchors(output, targets, self.sampler, self.embedding, type(self).__name__)
        size = output.embeddings[self.embedding].size
        weight_logits = SegOutput(logits=weight_logits, decoder_logits=output.weight_decoder_logits).logits_at(size)
        q = pixels_at(weight_logits, anchors.image, anchors.pixel).softmax(1)
        per_anchor = cac_per_anchor(anchors.z, anchors.y, q, self.temperature, self.base_temperature,
                                    self.detach_pair_weights, anchors.valid)
        # no valid anchor: 0, with the projection head and the weight branch in the graph
        return class_balanced_mean(per_anchor, anchors.y, self.class_mean, anchors.valid, q.shape[1])


class WeightBranchLoss(Term):
    """The weight branch's supervision: the `loss` group's terms (same classes, same settings,
    each at its own weight) applied to `output.weight_logits` with the kept labels. OHEM
    terms keep the pixels that the *main* classifier finds hard, as the authors' code does.

    Args:
        loss: the supervised loss group, `{name: {_target_, weight, <kwargs>}}` (the cac preset
            passes `${loss}`).
    """

    reads: ClassVar[frozenset[str]] = frozenset({"logits", "weight_logits"})

    def __init__(self, loss: Mapping[str, Any]) -> None:
        super().__init__()
        group = build_terms(loss, "contrast.weight_branch.loss")
        if not group:
            raise ConfigError("contrast.weight_branch.loss defines no term; pass the supervised loss group (${loss})")
        not_pixel = [name for name, term in group.items() if not term.per_pixel]
        if not_pixel:
            raise ConfigError(f"contrast.weight_branch.loss: {not_pixel} are not per-pixel losses; the weight branch "
                              "applies the supervised loss group to its class scores")
        self.terms = nn.ModuleDict(dict(group.items()))
        self.weights = {name: group.schedules[name].weight for name in group}

    def zero(self, output: SegOutput) -> Tensor:
        return _weight_logits(output, "weight_branch").sum() * 0.0

    def forward(self, output: SegOutput, targets: Targets) -> Tensor:
        logits = _weight_logits(output, "weight_branch")
        target = targets.reliable()
        total: Tensor | None = None
        for name, term in self.terms.items():
            if term.mines_hard_pixels:
                value = term.pixel_loss(logits, target, mining_logits=output.logits.detach())
            else:
                value = term.pixel_loss(logits, target)
            weight = self.weights[name]
            value = value if weight == 1.0 else weight * value  # 1.0 * x is x: no kernel for it
            total = value if total is None else total + value
        assert total is not None  # the group is not empty (checked when built)
        return total


def _weight_logits(output: SegOutput, term: str) -> Tensor:
    if output.weight_logits is None:
        raise ConfigError(
            f"the contrast.{term} term needs CAC's weight branch: set model.weight_branch={{depth: head}} "
            "(contrast=cac does)"
        )
    return output.weight_logits
