"""Teacher–student semi-supervised training (METHODS.md §0'): the shared machinery.

Every step sees a labeled batch and an unlabeled batch (`SegDataModule(unlabeled=True)`):
weak view `image`, strong views `strong [B, S, 3, H, W]` with the same geometry, `valid` (False
on crop padding), and `gt` when the dataset has unlabeled ground truth (for the pseudo-label
statistics only). The methods (mean_teacher.py, fixmatch.py, unimatch.py) say where the weak-view
probabilities come from and which views the student learns on; this class holds the rest: the
EMA teacher and its lifecycle, the pseudo-label pipeline (segcon.methods.pseudo_labels), the
sum of the Objective's groups, and the evaluation of student and teacher.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from segcon.engine.evaluation import metric_key
from segcon.evaluation.metrics import ConfusionMatrix
from segcon.methods.alignment import DistributionAlignment
from segcon.methods.pseudo_labels import (
    ConfidenceFilter,
    PseudoLabels,
    make_pseudo_labels,
    mix,
    pseudo_label_stats,
)
from segcon.methods.supervised import SupervisedModule
from segcon.models.base import SegModel
from segcon.models.output import SegOutput
from segcon.objectives.base import Targets
from segcon.utils.ema import ema_momentum, ema_update
from segcon.utils.errors import ConfigError

TEACHER = "teacher/"
"""The metric prefix of the teacher (`val/teacher/mIoU`)."""

# The teacher is in eval mode on purpose; Lightning's generic warning about it would only confuse.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class TeacherStudentModule(SupervisedModule):
    """The shared machinery; subclasses implement `unsupervised_step` with the helpers below.

    Args (beyond SupervisedModule's):
        ema_momentum: m_max of the teacher's EMA, `m = min(1 - 1/(t + 1), m_max)` with t the
            steps since the supervised warm-up ended. The EMA covers parameters and BatchNorm
            statistics of the inference network and of the train-only heads the teacher keeps.
            Every method keeps the teacher; the student-labelled methods use it for evaluation
            (and for terms that read it).
        sup_warmup_epochs, sup_warmup_steps: supervised-only training first, until both this
            many epochs and this many optimizer steps are done; the teacher is then copied from
            the student. Nothing reads the teacher before: no pseudo-labels, no term that reads
            it (its prototypes and bank fill from then on), so this is the one warm-up of every
            teacher-reading term (steps for the iteration-based presets).
        confidence: `{mode: threshold, threshold: 0.95}` keeps pixels whose top probability
            reaches the threshold; `{mode: entropy, drop_percent: 20}` drops the highest-entropy
            share of the batch's pixels, from drop_percent % at the start linearly to 0 at the end.
        distribution_alignment: rescale the pseudo-label probabilities by labeled class
            frequency / mean predicted probability before the argmax and the confidence filter
            (`segcon.methods.alignment`), against the rare-class confirmation bias of
            class-imbalanced data; alignment_momentum is the EMA momentum of both distributions.
        cutmix_prob: probability of a CutMix box per unlabeled image (the box's content comes
            from the previous image of the batch, with its pseudo-labels and confidences).
        teacher_heads: the student's train-only heads the teacher keeps (and averages), for terms
            that read the teacher's embeddings (`Targets.teacher`); none by default.

    The loss on pseudo-labels and its schedule are the Objective's `pseudo_loss` group (CE by
    default); its step counts from the end of the supervised warm-up.
    """

    uses_unlabeled = True

    def __init__(
        self,
        *args: Any,
        ema_momentum: float = 0.99,
        sup_warmup_epochs: int = 0,
        sup_warmup_steps: int = 0,
        confidence: Mapping[str, Any] | None = None,
        distribution_alignment: bool = False,
        alignment_momentum: float = 0.99,
        cutmix_prob: float = 0.5,
        teacher_heads: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher: SegModel = copy.deepcopy(self.net)
        self.teacher.keep_heads(teacher_heads)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.ema_max = ema_momentum
        self.sup_warmup_epochs, self.sup_warmup_steps = sup_warmup_epochs, sup_warmup_steps
        self.confidence = ConfidenceFilter.from_config(confidence)
        self.alignment = (DistributionAlignment(self.num_classes, self.ignore_index, alignment_momentum)
                          if distribution_alignment else None)
        self.cutmix_prob = cutmix_prob
        self.metrics[metric_key("val", TEACHER)] = ConfusionMatrix(self.num_classes, self.ignore_index)
        self._warmup_end_step: int | None = 0 if sup_warmup_epochs == sup_warmup_steps == 0 else None

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        super().check_config(config)
        ConfidenceFilter.from_config(config.get("confidence"))
        for key, where in (("ema_momentum", " (default: data.teacher_ema_momentum)"), ("alignment_momentum", "")):
            momentum = config.get(key, 0.0)
            if not 0.0 <= float(momentum) < 1.0:
                raise ConfigError(f"method.{key}={momentum}{where} must lie in [0, 1) (an EMA momentum)")
        if not 0.0 <= float(config.get("cutmix_prob", 0.0)) <= 1.0:
            raise ConfigError(f"method.cutmix_prob={config['cutmix_prob']} must lie in [0, 1] (a probability)")
        for key in ("sup_warmup_epochs", "sup_warmup_steps"):
            if int(config.get(key, 0)) < 0:
                raise ConfigError(f"method.{key} must be >= 0, got {config[key]}")

    def train(self, mode: bool = True) -> TeacherStudentModule:
        """The teacher always stays in eval mode (BatchNorm statistics come from the EMA)."""
        super().train(mode)
        self.teacher.eval()
        return self

    # -- training ------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        if self._warmup_end_step is None:  # supervised-only warm-up
            return super().training_step(labeled, batch_idx)
        loss, logs = self.unsupervised_step(labeled, unlabeled)
        self.log_step(logs, labeled["image"].shape[0])
        return loss

    def step_images(self, batch: dict[str, Any]) -> tuple[Tensor, int]:
        """Two labeled images, and the labeled images plus every strong view of a step (the
        images that run with a gradient in the mean-teacher / FixMatch step)."""
        labeled, strong = batch["labeled"]["image"], batch["unlabeled"]["strong"]
        return labeled[:2], int(labeled.shape[0] + strong.shape[0] * strong.shape[1])

    def batch_keys(self) -> str:
        dm = self.trainer.datamodule
        return (f"data.batch_size ({dm.batch_size}), data.unlabeled_batch_size ({dm.unlabeled_batch_size}), "
                f"data.num_strong ({dm.num_strong})")

    def unsupervised_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """One semi-supervised step: the loss and its logs. By default the mean-teacher /
        FixMatch step on the weak views' probabilities (`weak_probs`): `strong_view_step`."""
        probs, teacher = self.weak_probs(unlabeled["image"])
        if teacher is not None:
            teacher.valid = unlabeled["valid"]
        return self.strong_view_step(labeled, unlabeled, probs, teacher)

    def weak_probs(self, weak: Tensor) -> tuple[Tensor, SegOutput | None]:
        """The class probabilities `[B, K, H, W]` the pseudo-labels of the weak views come from
        (no gradient), and the teacher's output on them when a term reads it."""
        raise NotImplementedError

    @property
    def unsup_step(self) -> int:
        """Steps since the unsupervised phase began (the `pseudo_loss` schedules' clock)."""
        return self.global_step - (self._warmup_end_step or 0)

    @torch.no_grad()
    def teacher_output(self, weak: Tensor, valid: Tensor | None = None) -> SegOutput | None:
        """The teacher's output on the weak views, when a term reads it (else None), with the
        views' valid pixels `[B, H, W]` (False on crop padding) as its `valid` when given."""
        if not self.objective.reads_teacher:
            return None
        out = self.teacher.forward_features(weak)
        if valid is not None:
            out.valid = valid
        return out

    def pseudo_labels(
        self, probs: Tensor, labeled: dict[str, Any], unlabeled: dict[str, Any]
    ) -> tuple[PseudoLabels, dict[str, Tensor]]:
        """The pipeline on weak-view probabilities `[B, K, H, W]` (detached): distribution
        alignment when enabled (the labeled masks feed the class prior), argmax, confidence, the
        confidence filter; returns the pseudo-labels and their statistics to log."""
        if self.alignment is not None:
            probs = self.alignment(probs, unlabeled["valid"], labeled["mask"])
        progress = 0.0
        if self.confidence.mode == "entropy":  # the share dropped decays over training
            progress = self.global_step / max(int(self.trainer.estimated_stepping_batches), 1)
        pseudo = make_pseudo_labels(probs, unlabeled["valid"], self.confidence, progress, self.ignore_index)
        if not self.logs_this_step():  # the statistics need a read of the device; only logged steps pay it
            return pseudo, {}
        stats = pseudo_label_stats(pseudo, unlabeled["valid"], unlabeled.get("gt"), self.ignore_index, self.class_names)
        return pseudo, stats

    def combine(
        self,
        output: SegOutput,
        labels: Tensor,
        unsup: Tensor,
        pseudo: Targets,
        logs: dict[str, Tensor],
        teacher: SegOutput | None = None,
        labeled_output: SegOutput | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss: the `loss` terms on the labeled rows (`labeled_output`, by default the
        first `len(labels)` rows of `output`), the already weighted pseudo-label loss `unsup`, and
        the `contrast` terms on every row of `output` with the labels followed by the pseudo-label
        targets `pseudo`."""
        n = labels.shape[0]
        truth = Targets(labels, self.ignore_index)
        labeled_output = output.take(slice(0, n)) if labeled_output is None else labeled_output
        sup, sup_logs = self.objective.supervised_loss(labeled_output, truth, self.global_step)
        targets = Targets.cat([truth, pseudo])
        targets.teacher = teacher
        con, con_logs = self.objective.contrast_loss(output, targets, self.global_step)
        total = sup + unsup + con
        return total, {**logs, **sup_logs, **con_logs, "loss": total.detach()}

    def strong_view_step(
        self, labeled: dict[str, Any], unlabeled: dict[str, Any], probs: Tensor, teacher: SegOutput | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The mean-teacher / FixMatch step, from the weak views' probabilities `[B, K, H, W]`:
        pseudo-labels, CutMix with the first strong view, the student on labeled images and
        strong views in one pass, the pseudo-label loss on the strong views, then `combine`."""
        pseudo, logs = self.pseudo_labels(probs, labeled, unlabeled)
        strong, mixed = mix(unlabeled["strong"][:, 0], pseudo, self.cutmix_prob)
        n = labeled["image"].shape[0]
        output = self.net(torch.cat([labeled["image"], strong]))
        targets = mixed.targets()
        unsup, unsup_logs = self.objective.pseudo_loss(output.take(slice(n, None)), targets, self.unsup_step)
        return self.combine(output, labeled["mask"], unsup, targets, {**logs, **unsup_logs}, teacher)

    def two_view_pseudo_loss(
        self, second: SegOutput, first_view: PseudoLabels, second_view: PseudoLabels
    ) -> tuple[Tensor, Tensor, Targets, dict[str, Tensor]]:
        """The `pseudo_loss` group on each half of `second` (the two strong views, batched) with
        its pseudo-labels: the two values (logged with `_s1` / `_s2`), both views' targets, logs."""
        m = first_view.label.shape[0]
        t1, t2 = first_view.targets(), second_view.targets()
        u1, logs1 = self.objective.pseudo_loss(second.take(slice(0, m)), t1, self.unsup_step, "_s1")
        u2, logs2 = self.objective.pseudo_loss(second.take(slice(m, None)), t2, self.unsup_step, "_s2")
        return u1, u2, Targets.cat([t1, t2]), {**logs1, **logs2}

    def _end_warmup_when_due(self) -> None:
        """Start the unsupervised phase, the teacher a copy of the student, once the supervised
        warm-up's epochs and steps are done (checked before each epoch and after each step)."""
        if self._warmup_end_step is None and self.current_epoch >= self.sup_warmup_epochs and (
            self.global_step >= self.sup_warmup_steps
        ):
            self._warmup_end_step = self.global_step
            ema_update(self.teacher, self.net, 0.0)

    def on_train_epoch_start(self) -> None:
        self._end_warmup_when_due()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._warmup_end_step is not None and not self.step_skipped:
            t = self.global_step - 1 - self._warmup_end_step
            ema_update(self.teacher, self.net, ema_momentum(max(t, 0), self.ema_max))
        self._end_warmup_when_due()

    # -- evaluation: student and teacher ----------------------------------------------------

    def evaluated_networks(self, split: str) -> dict[str, SegModel]:
        return {"": self.net, TEACHER: self.teacher} if split == "val" else {"": self.net}

    # -- checkpoint ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["segcon"]["warmup_end_step"] = self._warmup_end_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("segcon", {})
        if "warmup_end_step" in state:
            self._warmup_end_step = state["warmup_end_step"]
