"""UniMatch V2 (Yang et al., TPAMI 2025): the EMA teacher labels the weak view; the student learns
those labels on two strong views, each CutMixed with its own box, whose encoder features carry
complementary channel dropout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from segcon.methods.mean_teacher import MeanTeacher
from segcon.methods.pseudo_labels import mix
from segcon.models.base import complementary_masks
from segcon.models.output import SegOutput
from segcon.utils.errors import ConfigError


class UniMatchV2(MeanTeacher):
    """The EMA teacher (parameters and buffers, ratio `min(1 - 1/(t+1), ema_momentum)`; 0.996 published)
    labels each unlabeled image's weak view, kept at confidence ≥ `method.confidence.threshold`
    (0.95). Two strong views of it are CutMixed, each with its own box (the box content and its
    pseudo-labels from the previous image of the batch, as every segcon method mixes); the student
    runs once on the labeled images and once on both strong views together, where every encoder
    feature carries complementary channel dropout (`complementary_masks`: for each image one view
    keeps a random half of the channels ×2, the other the complement ×2; half of the images keep
    every channel). Loss `loss_scale * (L_x + (L_s1 + L_s2) / 2)`, published as
    `(L_x + (L_s1 + L_s2) / 2) / 2`: `L_x` holds the supervised and contrastive terms, each `L_s`
    the `pseudo_loss` group on one strong view, summed over the kept pixels and divided by the
    view's valid pixels (segcon's per-pixel losses normalise weighted pseudo-labels that way).
    Student and teacher are evaluated.

    Args:
        comp_drop: complementary channel dropout on the strong views (true); false decodes them
            unperturbed (an ablation).
        loss_scale: factor on the whole loss (0.5, as published).
    """

    def __init__(self, *args: Any, comp_drop: bool = True, loss_scale: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.comp_drop = comp_drop
        self.loss_scale = loss_scale
        if comp_drop:
            _ = self.net.feature_channels  # a ConfigError now for a family that cannot

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        super().check_config(config)
        if float(config.get("loss_scale", 0.5)) <= 0:
            raise ConfigError(f"method.loss_scale must be > 0, got {config['loss_scale']} (UniMatch V2's: 0.5)")

    def unsupervised_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        if unlabeled["strong"].shape[1] < 2:
            raise ConfigError("method=unimatch_v2 needs two strong views: data.num_strong=2 (its method file sets it)")
        probs, teacher = self.weak_probs(unlabeled["image"])
        if teacher is not None:
            teacher.valid = unlabeled["valid"]
        pseudo, logs = self.pseudo_labels(probs, labeled, unlabeled)
        s1, p1 = mix(unlabeled["strong"][:, 0], pseudo, self.cutmix_prob)
        s2, p2 = mix(unlabeled["strong"][:, 1], pseudo, self.cutmix_prob)
        labeled_output = self.net(labeled["image"])
        strong = torch.cat([s1, s2])
        m = s1.shape[0]
        if self.comp_drop:
            masks = complementary_masks(m, self.net.feature_channels, strong.device)
            second = self.net.forward_complementary(strong, masks)
        else:
            second = self.net(strong)
        u1, u2, strong_targets, strong_logs = self.two_view_pseudo_loss(second, p1, p2)
        logs.update(strong_logs)
        output = labeled_output
        if self.objective.contrast:
            output = SegOutput.cat([labeled_output, second], only=self.objective.contrast_reads())
        loss, logs = self.combine(output, labeled["mask"], (u1 + u2) / 2, strong_targets, logs, teacher,
                                  labeled_output)
        loss = loss * self.loss_scale
        return loss, {**logs, "loss": loss.detach()}
