"""Teacher–student semi-supervised training (METHODS.md §0'): mean teacher, FixMatch, UniMatch.

Every step sees a labeled batch and an unlabeled batch (`SegDataModule(unlabeled=True)`):
weak view `image`, strong views `strong [B, S, 3, H, W]` with the same geometry, `valid` (False
on crop padding), and `gt` when the dataset has unlabeled ground truth (for the pseudo-label
accuracy only). Pseudo-labels come from the weak view — the EMA teacher's (mean teacher) or the
student's own (FixMatch, UniMatch) — are filtered by confidence, CutMixed together with the
strong view, and supervise the student's prediction of the strong view. Contrastive terms of the
Objective see the student's output on the labeled and strong views together, with the labels
and the confident pseudo-labels (everything else ignore).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from segcon.evaluation.inference import infer
from segcon.evaluation.metrics import ConfusionMatrix, scores
from segcon.methods.alignment import DistributionAlignment
from segcon.methods.mixing import cutmix, cutmix_masks
from segcon.methods.supervised import SupervisedModule, running_best
from segcon.models.segnet import SegOutput
from segcon.objectives.objective import TermSchedule
from segcon.utils.ema import ema_momentum, ema_update
from segcon.utils.errors import ConfigError

CONFIDENCE_MODES = ("threshold", "entropy")

# The teacher is in eval mode on purpose; Lightning's generic warning about it would only confuse.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class TeacherStudentModule(SupervisedModule):
    """The shared machinery; subclasses say where pseudo-labels come from and which views the
    student learns on (`unsupervised_loss`).

    Args (beyond SupervisedModule's):
        ema_momentum: m_max of the teacher's EMA, `m = min(1 - 1/(t + 1), m_max)` with t the
            steps since the supervised warm-up ended. The EMA covers parameters and BatchNorm
            statistics. Every method keeps the teacher; the student-labelled methods use it for
            evaluation only.
        sup_warmup_epochs: epochs of supervised-only training first; the teacher is then copied
            from the student.
        confidence: `{mode: threshold, threshold: 0.95}` keeps pixels whose top probability
            reaches the threshold; `{mode: entropy, drop_percent: 20}` drops the highest-entropy
            share of the batch's pixels, from drop_percent % at the start linearly to 0 at the end.
        distribution_alignment: rescale the pseudo-label probabilities by labeled class
            frequency / mean predicted probability before the argmax and the confidence filter
            (`segcon.methods.alignment`), against the rare-class confirmation bias of
            class-imbalanced data; alignment_momentum is the EMA momentum of both distributions.
        unsup_weight, unsup_warmup_steps, unsup_ramp_steps: the unsupervised term's schedule.
        cutmix_prob: probability of a CutMix box per unlabeled image (the box's content comes
            from the next image of the batch, with its pseudo-labels and confidences).
    """

    uses_unlabeled = True

    def __init__(
        self,
        *args: Any,
        ema_momentum: float = 0.99,
        sup_warmup_epochs: int = 0,
        confidence: Mapping[str, Any] | None = None,
        distribution_alignment: bool = False,
        alignment_momentum: float = 0.99,
        unsup_weight: float = 1.0,
        unsup_warmup_steps: int = 0,
        unsup_ramp_steps: int = 0,
        cutmix_prob: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = copy.deepcopy(self.net)
        self.teacher.heads = torch.nn.ModuleDict()  # the teacher only predicts: no train-only heads
        self.teacher.projection = None
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.ema_max = ema_momentum
        self.sup_warmup_epochs = sup_warmup_epochs
        self.confidence = {"mode": "threshold", "threshold": 0.95, "drop_percent": 20.0, **(confidence or {})}
        if self.confidence["mode"] not in CONFIDENCE_MODES:
            raise ConfigError(f"method.confidence.mode must be one of {CONFIDENCE_MODES}, got {self.confidence['mode']!r}")
        self.alignment = (DistributionAlignment(self.num_classes, self.ignore_index, alignment_momentum)
                          if distribution_alignment else None)
        self.unsup_schedule = TermSchedule(unsup_weight, unsup_warmup_steps, unsup_ramp_steps)
        self.cutmix_prob = cutmix_prob
        self.metrics["val_teacher"] = ConfusionMatrix(self.num_classes, self.ignore_index)
        self.best_teacher_miou = float("nan")
        self._warmup_end_step: int | None = 0 if sup_warmup_epochs == 0 else None

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
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=labeled["image"].shape[0])
        return loss

    def unsupervised_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The default (mean teacher / FixMatch) step: pseudo-labels of the weak view, CutMix,
        the student on labeled + strong views in one pass. Returns the loss and its logs."""
        probs = self.weak_probs(labeled, unlabeled)
        label = probs.argmax(1)
        keep = self.confident(probs, unlabeled["valid"])
        logs = self.pseudo_label_stats(label, keep, unlabeled)
        strong, label, keep, valid = self.mix(unlabeled["strong"][:, 0], label, keep, unlabeled["valid"])
        n = labeled["image"].shape[0]
        output = self.net(torch.cat([labeled["image"], strong]))
        unsup = masked_ce(output.logits[n:], label, keep, valid)
        return self.combine(output, labeled["mask"], label, keep, {"unsup": (unsup, 1.0)}, logs)

    def weak_probs(self, labeled: dict[str, Any], unlabeled: dict[str, Any], probs: Tensor | None = None) -> Tensor:
        """The probabilities `[B, K, H, W]` pseudo-labels and confidences are taken from: those of
        the weak view (`pseudo_labels`, unless the caller already has them as `probs`),
        distribution-aligned when enabled (the labeled masks feed the class prior)."""
        if probs is None:
            probs = self.pseudo_labels(unlabeled["image"])
        if self.alignment is not None:
            probs = self.alignment(probs, unlabeled["valid"], labeled["mask"])
        return probs

    @torch.no_grad()
    def pseudo_labels(self, weak: Tensor) -> Tensor:
        """Class probabilities `[B, K, H, W]` of the weak view (the teacher's by default)."""
        return self.teacher(weak).softmax(1)

    def confident(self, probs: Tensor, valid: Tensor) -> Tensor:
        """Boolean `[B, H, W]`: the pseudo-labels that are used (never on crop padding)."""
        if self.confidence["mode"] == "threshold":
            return (probs.max(1).values >= float(self.confidence["threshold"])) & valid
        # entropy: drop the most uncertain share of the valid pixels, decaying linearly to 0
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        drop = float(self.confidence["drop_percent"]) / 100.0 * max(0.0, 1.0 - self.global_step / total)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        n = int(valid.sum())
        kept = n - int(drop * n)
        if kept >= n:
            return valid.clone()
        if kept == 0:
            return torch.zeros_like(valid)
        cutoff = entropy[valid].float().kthvalue(kept).values
        return (entropy <= cutoff) & valid

    def mix(self, strong: Tensor, *maps: Tensor) -> tuple[Tensor, ...]:
        """CutMix each image with the next one of the batch: the strong view and the per-pixel
        `maps` (pseudo-labels, keep and valid masks) get the same box, so they stay aligned."""
        if self.cutmix_prob <= 0:
            return (strong, *maps)
        boxes = cutmix_masks(strong.shape[0], tuple(strong.shape[-2:]), self.cutmix_prob, device=strong.device)
        return tuple(cutmix(boxes, t, t.roll(1, dims=0)) for t in (strong, *maps))

    def pseudo_label_stats(self, label: Tensor, keep: Tensor, unlabeled: dict[str, Any]) -> dict[str, Tensor]:
        """mask_ratio (confident share of the valid pixels), pl_share/<class> (each class's share
        of the confident pseudo-labels) and, with unlabeled ground truth, pseudo-label accuracy on
        the confident pixels (pl_acc) and on all valid ones (pl_acc_all), and pl_recall/<class>
        (share of the class's pixels that got a confident, correct pseudo-label: where rare
        classes vanish from self-training, this is what shows it). A ratio with an empty
        denominator in this step is left out rather than logged as 0, so early steps under a
        strict threshold do not drag the curves down."""
        valid = unlabeled["valid"]
        k = self.num_classes
        logs = {"mask_ratio": keep.sum() / valid.sum().clamp_min(1)}
        kept = keep & valid
        shares = torch.bincount(label[kept].flatten(), minlength=k)[:k]
        denominators = [kept.sum().view(1)]
        gt = unlabeled.get("gt")
        if gt is not None:
            right = (label == gt) & (gt != self.ignore_index)
            scored = valid & (gt != self.ignore_index)
            confident = (keep & scored).sum()
            logs["pl_acc_all"] = (right & scored).sum() / scored.sum().clamp_min(1)
            gt_counts = torch.bincount(gt[scored].flatten(), minlength=k)[:k]
            hits = torch.bincount(gt[scored & right & keep].flatten(), minlength=k)[:k]
            denominators += [confident.view(1), gt_counts]
        # Which ratios have something to count: one device-to-host copy per step for all of them.
        counts = torch.cat(denominators).tolist()
        if counts[0] > 0:
            logs.update({f"pl_share/{name}": shares[c] / counts[0] for c, name in enumerate(self.class_names)})
        if gt is not None:
            if counts[1] > 0:
                logs["pl_acc"] = (right & keep).sum() / confident
            for c, (name, n) in enumerate(zip(self.class_names, counts[2:], strict=True)):
                if n > 0:
                    logs[f"pl_recall/{name}"] = hits[c] / n
        return logs

    def combine(
        self,
        output: Any,
        labels: Tensor,
        pseudo: Tensor,
        keep: Tensor,
        unsup_terms: Mapping[str, tuple[Tensor, float]],
        logs: dict[str, Tensor],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Supervised terms on the labeled part of `output`, the weighted unsupervised terms,
        and the contrastive terms on the whole output with labels + confident pseudo-labels."""
        n = labels.shape[0]
        target = torch.cat([labels, pseudo.masked_fill(~keep, self.ignore_index)])
        sup, sup_logs = self.objective.supervised_loss(output.logits[:n], labels, self.global_step)
        con, con_logs = self.objective.contrast_loss(output, target, self.global_step)
        weight = self.unsup_schedule(self.global_step - (self._warmup_end_step or 0))
        unsup = sum(w * v for v, w in unsup_terms.values())
        total = sup + weight * unsup + con
        logs = {**logs, **sup_logs, **con_logs, **{f"loss_{k}": v.detach() for k, (v, _) in unsup_terms.items()}}
        logs["weight_unsup"] = unsup.new_tensor(weight)
        logs["loss"] = total.detach()
        return total, logs

    def on_train_epoch_start(self) -> None:
        if self._warmup_end_step is None and self.current_epoch >= self.sup_warmup_epochs:
            self._warmup_end_step = self.global_step
            ema_update(self.teacher.model, self.net.model, 0.0)  # the teacher starts as the student

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._warmup_end_step is not None:
            t = self.global_step - 1 - self._warmup_end_step
            ema_update(self.teacher.model, self.net.model, ema_momentum(max(t, 0), self.ema_max))

    # -- evaluation: student and teacher ----------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        pred = infer(self.teacher, batch["image"], self.inference, self.net.output_stride).argmax(1)
        self.metrics["val_teacher"].update(pred, batch["mask"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        cm = self.metrics["val_teacher"].compute()
        self.metrics["val_teacher"].reset()
        s = scores(cm)
        self.last_scores["val_teacher"] = s
        if not self.trainer.sanity_checking and not np.isnan(s.miou):
            self.best_teacher_miou = running_best(self.best_teacher_miou, s.miou)
            if self.trainer.state.fn == TrainerFn.FITTING:
                self.fit_summary.update({"val/teacher/mIoU_last": s.miou, "val/teacher/mIoU_best": self.best_teacher_miou})
        logs = {"val/teacher/mIoU": s.miou, "val/teacher/mIoU_best": self.best_teacher_miou}
        logs.update({f"val/teacher/IoU/{name}": float(s.iou[k]) for k, name in enumerate(self.class_names)})
        self.log_dict(logs, sync_dist=False, rank_zero_only=False)

    def report_extras(self, split: str) -> dict[str, Any]:
        extras = super().report_extras(split)
        teacher = self.last_scores.get("val_teacher")
        if split == "val" and teacher is not None:
            extras.setdefault("val/teacher/mIoU_best", self.best_teacher_miou)  # no fit here: the checkpoint's
            extras.update({"val/teacher/mIoU": teacher.miou,
                           **{f"val/teacher/IoU/{n}": float(teacher.iou[k]) for k, n in enumerate(self.class_names)}})
        return extras

    # -- checkpoint ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["segcon"]["best_teacher_miou"] = self.best_teacher_miou
        checkpoint["segcon"]["warmup_end_step"] = self._warmup_end_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("segcon", {})
        self.best_teacher_miou = float(state.get("best_teacher_miou", float("nan")))
        if "warmup_end_step" in state:
            self._warmup_end_step = state["warmup_end_step"]


class MeanTeacher(TeacherStudentModule):
    """Mean teacher (U²PL-style base): the EMA teacher labels the weak view."""


class FixMatch(TeacherStudentModule):
    """FixMatch: the student labels its own weak view (train mode, no gradient) and learns to
    predict those labels on the strong view."""

    @torch.no_grad()
    def pseudo_labels(self, weak: Tensor) -> Tensor:
        return self.net(weak).logits.softmax(1)


class UniMatch(FixMatch):
    """UniMatch: FixMatch with two strong views and a feature-perturbation branch (dropout on the
    encoder features of the weak view). Loss
    `loss_scale * (L_x + strong_weight * (L_s1 + L_s2) + fp_weight * L_fp)`, published as
    `(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`; `L_x` holds the supervised and contrastive
    terms, `unsup_weight` (and its ramp) multiplies the three unsupervised ones.

    The student runs in two passes, batched as the published code batches them (so BatchNorm
    sees the same mixtures): the labeled images with the weak views, whose decoder also decodes
    the perturbed features (`SegNet.forward_features(perturb=fp_dropout)`), and the two strong
    views together. The weak views' predictions of the first pass, detached, are the
    pseudo-labels. Contrastive terms see the labeled images of the first pass and the strong
    views of the second.

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

    def unsupervised_step(self, labeled: dict[str, Any], unlabeled: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        if unlabeled["strong"].shape[1] < 2:
            raise ConfigError("method=unimatch needs two strong views: data.num_strong=2 (the unimatch preset sets it)")
        n = labeled["image"].shape[0]
        perturb = self.fp_dropout if self.fp_weight > 0 else 0.0
        first = self.net.forward_features(torch.cat([labeled["image"], unlabeled["image"]]), perturb)
        fp_logits = first.aux.pop("perturbed_logits", None)
        probs = self.weak_probs(labeled, unlabeled, first.logits[n:].detach().softmax(1))
        label = probs.argmax(1)
        valid = unlabeled["valid"]
        keep = self.confident(probs, valid)
        logs = self.pseudo_label_stats(label, keep, unlabeled)
        s1, l1, k1, v1 = self.mix(unlabeled["strong"][:, 0], label, keep, valid)
        s2, l2, k2, v2 = self.mix(unlabeled["strong"][:, 1], label, keep, valid)
        second = self.net.forward_features(torch.cat([s1, s2]))
        m = s1.shape[0]
        terms = {
            "unsup_s1": (masked_ce(second.logits[:m], l1, k1, v1), self.strong_weight),
            "unsup_s2": (masked_ce(second.logits[m:], l2, k2, v2), self.strong_weight),
        }
        if fp_logits is not None:
            terms["unsup_fp"] = (masked_ce(fp_logits[n:], label, keep, valid), self.fp_weight)
        # supervised terms read the labeled images, contrast terms the labeled images + both strong
        # views; without contrast terms the concatenated copy of every field would go unread
        output = first.take(slice(0, n))
        if self.objective.contrast:
            output = SegOutput.cat([output, second])
        pseudo, kept = torch.cat([l1, l2]), torch.cat([k1, k2])
        loss, logs = self.combine(output, labeled["mask"], pseudo, kept, terms, logs)
        loss = loss * self.loss_scale
        return loss, {**logs, "loss": loss.detach()}


def masked_ce(logits: Tensor, label: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
    """Cross-entropy on the kept pixels, summed and divided by the number of valid pixels (not of
    kept ones, as UniMatch does: confident-poor batches weigh less). `logits [B, K, H, W]`."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, label, reduction="none")
    return (ce * keep).sum() / valid.sum().clamp_min(1)
