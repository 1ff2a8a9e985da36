"""UniMatch (Yang et al., CVPR 2023; METHODS.md §0'): FixMatch with two strong views and a
feature-perturbation branch, batched as the published code batches it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from segcon.methods.fixmatch import FixMatch
from segcon.methods.pseudo_labels import mix
from segcon.models.output import SegOutput
from segcon.utils.errors import ConfigError

# (key, published value, must be > 0 rather than >= 0)
_WEIGHTS = (("strong_weight", 0.25, False), ("fp_weight", 0.5, False), ("loss_scale", 0.5, True))


class UniMatch(FixMatch):
    """FixMatch with two strong views and a feature-perturbation branch (dropout on the encoder
    features of the weak view). Loss `loss_scale * (L_x + strong_weight * (L_s1 + L_s2) +
    fp_weight * L_fp)`, published as `(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`; `L_x` holds
    the supervised and contrastive terms, and each of the three unsupervised ones is the
    `pseudo_loss` group (with its schedule) on one view.

    The student runs in two passes, batched as the published code batches them (so BatchNorm
    sees the same mixtures): the labeled images with the weak views, whose decoder also decodes
    the perturbed features (`forward_features(perturb=fp_dropout)`), and the two strong views
    together. The weak views' predictions of the first pass, detached, are the pseudo-labels.
    Contrastive terms see the labeled images of the first pass and the strong views of the second.

    Args:
        fp_dropout: Dropout2d probability on every encoder stage (0.5).
        strong_weight: weight of each strong view's term (0.25).
        fp_weight: weight of the feature-perturbation term (0.5); 0 leaves the branch out.
        loss_scale: factor on the whole loss (0.5). Under SGD it scales the step as the learning
            rate does (the published learning rates assume it); AdamW's step does not depend on it
            (up to eps).
    """

    def __init__(
        self,
        *args: Any,
        fp_dropout: float = 0.5,
        strong_weight: float = 0.25,
        fp_weight: float = 0.5,
        loss_scale: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fp_dropout = fp_dropout
        self.strong_weight = strong_weight
        self.fp_weight = fp_weight
        self.loss_scale = loss_scale

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        super().check_config(config)
        for key, published, positive in _WEIGHTS:
            value = config.get(key)
            if value is not None and (float(value) <= 0 if positive else float(value) < 0):
                raise ConfigError(f"method.{key} must be {'> 0' if positive else '>= 0'}, got {value} "
                                  f"(UniMatch's published value: {published})")
        if not 0.0 <= float(config.get("fp_dropout", 0.5)) < 1.0:
            raise ConfigError(f"method.fp_dropout={config['fp_dropout']} must lie in [0, 1) (a dropout probability)")

    def step_images(self, batch: dict[str, Any]) -> tuple[Tensor, int]:
        """Two labeled images; the labeled images, the weak views (with the perturbed decoding
        counted once more by the decoder only, left out here) and both strong views."""
        labeled, strong = batch["labeled"]["image"], batch["unlabeled"]["strong"]
        return labeled[:2], int(labeled.shape[0] + strong.shape[0] * (1 + strong.shape[1]))

    def unsupervised_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        if unlabeled["strong"].shape[1] < 2:
            raise ConfigError("method=unimatch needs two strong views: data.num_strong=2 (the unimatch preset sets it)")
        n = labeled["image"].shape[0]
        perturb = self.fp_dropout if self.fp_weight > 0 else 0.0
        first = self.net.forward_features(torch.cat([labeled["image"], unlabeled["image"]]), perturb)
        fp_logits, first.perturbed_logits = first.perturbed_logits, None  # the second pass has none
        pseudo, logs = self.pseudo_labels(first.logits[n:].detach().softmax(1), labeled, unlabeled)
        s1, p1 = mix(unlabeled["strong"][:, 0], pseudo, self.cutmix_prob)
        s2, p2 = mix(unlabeled["strong"][:, 1], pseudo, self.cutmix_prob)
        second = self.net.forward_features(torch.cat([s1, s2]))
        u1, u2, strong_targets, strong_logs = self.two_view_pseudo_loss(second, p1, p2)
        unsup = self.strong_weight * u1 + self.strong_weight * u2
        logs.update(strong_logs)
        if fp_logits is not None:
            ufp, logs_fp = self.objective.pseudo_loss(SegOutput(logits=fp_logits[n:]), pseudo.targets(),
                                                      self.unsup_step, "_fp")
            unsup = unsup + self.fp_weight * ufp
            logs.update(logs_fp)
        # supervised terms read the labeled images, contrast terms the labeled images + both strong
        # views: only the fields the contrast terms read are copied into one batch
        labeled_output = first.take(slice(0, n))
        output = labeled_output
        if self.objective.contrast:
            output = SegOutput.cat([labeled_output, second], only=self.objective.contrast_reads())
        teacher = self.teacher_output(unlabeled["image"], unlabeled["valid"])
        loss, logs = self.combine(output, labeled["mask"], unsup, strong_targets, logs, teacher, labeled_output)
        loss = loss * self.loss_scale
        return loss, {**logs, "loss": loss.detach()}
