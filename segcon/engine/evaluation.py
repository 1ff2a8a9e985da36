"""EvaluationModule: validation and test of one or more networks with dataset-level scores,
overlays, running bests and the metrics.json extras. segcon-eval builds it around a trained
network; every training method (segcon.methods) extends it with its step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from segcon.evaluation.inference import InferenceSettings, infer
from segcon.evaluation.metrics import ConfusionMatrix, SegScores, scores_of
from segcon.evaluation.visualize import denormalize, panel
from segcon.models.base import SegModel
from segcon.utils.loggers import log_images

SPLIT_KEYS = ("split_hash", "labeled_images", "unlabeled_images", "unlabeled_stream_images", "unlabeled_without_mask")
"""The semi-supervised split's entries (`SegDataModule.split_info`) kept in checkpoints."""


def running_best(best: float, value: float) -> float:
    """The larger of `best` and `value`; NaN `best` means none yet (value must not be NaN)."""
    return value if np.isnan(best) else max(best, value)


def split_summary(info: Mapping[str, Any]) -> str:
    """The line a run prints about its semi-supervised split (`SegDataModule.split_info`)."""
    head = f"split {info['split_hash']}: {info['labeled_images']} labeled"
    if "unlabeled_stream_images" not in info:  # method=supervised: the labeled images alone
        return f"{head} training images; the other {info['unlabeled_images']} are not used (no unlabeled stream)"
    extra = info["unlabeled_stream_images"] - info["unlabeled_images"]
    return (f"{head}, {info['unlabeled_images']} unlabeled training images"
            + (f", and {extra} more images in the unlabeled stream (data.splits.unlabeled)" if extra > 0 else ""))


class EvaluationModule(L.LightningModule):
    """Validates and tests `net` (and the other networks of `evaluated_networks`) with a
    dataset-level mIoU; no training step.

    Args:
        net: the network (any SegModel).
        num_classes, ignore_index, class_names, palette, mean, std: from the data config.
        num_overlays: validation images drawn as image | ground truth | prediction each epoch.
        run_config: the resolved run config, stored in every checkpoint (for segcon-eval & co).
        inference: how validation and test predict (`data.eval`: whole | slide | ms_flip and
            their settings, see segcon.evaluation.inference); None is `whole`.
        detailed_metrics: also log precision, recall, F1 and the per-image scores of every
            class (`data.detailed_metrics`; metrics.json and the CSV always hold them).

    Logged every validation: `val/mIoU`, `val/mIoU_best`, `val/pixel_acc` and `val/IoU/<class>`
    (the same names under `test/`); with `detailed_metrics`, also
    `val/{precision,recall,F1,image_IoU,image_F1}/<class>` and `val/image_mIoU`.
    """

    def __init__(
        self,
        net: SegModel,
        num_classes: int,
        ignore_index: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
        num_overlays: int = 4,
        run_config: Mapping[str, Any] | None = None,
        inference: Mapping[str, Any] | None = None,
        detailed_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.palette = [list(c) for c in palette]
        self.mean, self.std = list(mean), list(std)
        self.num_overlays = num_overlays
        self.run_config = dict(run_config or {})
        self.inference = InferenceSettings.from_config(inference)
        self.detailed_metrics = detailed_metrics
        self.metrics = torch.nn.ModuleDict(
            {split: ConfusionMatrix(num_classes, ignore_index) for split in ("val", "test")}
        )
        # Running best val mIoU of every evaluated network, by metric prefix.
        self.bests: dict[str, float] = {}
        # The training run's own record, by metrics.json key: last validation and running best
        # of the fit. In memory, so the end-of-run evaluation of an earlier checkpoint (whose
        # restored best is the best up to *its* step) cannot overwrite it.
        self.fit_summary: dict[str, float] = {}
        self.last_scores: dict[str, SegScores] = {}
        self._overlay_batch: dict[str, Tensor] | None = None
        self._restored_split: dict[str, Any] = {}

    def evaluated_networks(self, split: str) -> dict[str, SegModel]:
        """The networks evaluated on `split` by metric prefix: "" is the trained network
        (`val/mIoU`), others log under their prefix (`val/teacher/mIoU`)."""
        return {"": self.net}

    def predict_logits(self, images: Tensor, net: SegModel | None = None) -> Tensor:
        """Class scores `[B, K, H, W]` at the input resolution, by the `inference` mode: log-
        probabilities (argmax is the prediction, softmax the probabilities averaged over slide
        windows or multi-scale/flip views). The network (default: the trained one) must be in
        eval mode."""
        net = self.net if net is None else net
        return infer(net, images, self.inference, net.input_divisor)

    def _eval_step(self, split: str, batch: dict[str, Any], batch_idx: int) -> None:
        for prefix, net in self.evaluated_networks(split).items():
            pred = self.predict_logits(batch["image"], net).max(1).indices  # argmax, faster on CPU
            self._metric(split, prefix).update(pred, batch["mask"])
            if prefix == "" and batch_idx == 0 and self.num_overlays > 0:
                n = self.num_overlays
                self._overlay_batch = {
                    "image": batch["image"][:n].cpu(),
                    "mask": batch["mask"][:n].cpu(),
                    "pred": pred[:n].cpu(),
                }

    def _metric(self, split: str, prefix: str) -> ConfusionMatrix:
        """The confusion matrix of one evaluated network on `split` (subclasses that evaluate
        more networks add theirs to `self.metrics` under `metric_key`)."""
        return self.metrics[metric_key(split, prefix)]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def _eval_epoch_end(self, split: str) -> None:
        logs: dict[str, float] = {}
        fitting = self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking
        for prefix in self.evaluated_networks(split):
            metric = self._metric(split, prefix)
            s = scores_of(metric.compute())  # summed over ranks
            metric.reset()
            self.last_scores[metric_key(split, prefix)] = s
            # The value is already global: every rank logs the same number, no further reduction.
            logs.update(_score_logs(f"{split}/{prefix}", s, self.class_names, self.detailed_metrics))
            if split == "val":
                if not self.trainer.sanity_checking and not np.isnan(s.miou):
                    self.bests[prefix] = running_best(self.bests.get(prefix, float("nan")), s.miou)
                best = self.bests.get(prefix, float("nan"))
                if fitting:
                    self.fit_summary.update({f"val/{prefix}mIoU_last": s.miou, f"val/{prefix}mIoU_best": best})
                logs[f"val/{prefix}mIoU_best"] = best
        self.log_dict(logs, sync_dist=False, rank_zero_only=False)
        if not self.trainer.sanity_checking:
            self._log_overlays(split)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _log_overlays(self, split: str) -> None:
        batch, self._overlay_batch = self._overlay_batch, None
        if batch is None or self.global_rank != 0:
            return
        rows = [
            panel(
                denormalize(batch["image"][i], self.mean, self.std),
                batch["mask"][i].numpy(),
                batch["pred"][i].numpy(),
                self.palette,
                self.ignore_index,
            )
            for i in range(batch["image"].shape[0])
        ]
        width = max(r.shape[1] for r in rows)
        grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
        out_dir = Path(self.trainer.default_root_dir) / "overlays"
        out_dir.mkdir(parents=True, exist_ok=True)
        # During fit: one file per epoch; the end-of-run evaluation of the chosen checkpoint: "final".
        tag = f"epoch{self.current_epoch:03d}" if self.trainer.state.fn == TrainerFn.FITTING else "final"
        cv2.imwrite(str(out_dir / f"{split}_{tag}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        log_images(self.loggers, {f"{split}/overlays": grid}, self.global_step)

    def report_extras(self, split: str) -> dict[str, Any]:
        """Entries added to metrics.json next to the scores: `val/mIoU_last` and `val/mIoU_best`
        (the training run's last validation and best, whatever checkpoint is evaluated; without
        a fit in this process the best is the evaluated checkpoint's record), the same and the
        scores of every other evaluated network under its prefix, and the semi-supervised split's
        hash and counts when the run trained on one."""
        extras = dict(self._split_info())
        if split == "val":
            extras.update(self.fit_summary)
            for prefix in self.evaluated_networks(split):
                extras.setdefault(f"val/{prefix}mIoU_best", self.bests.get(prefix, float("nan")))
                other = self.last_scores.get(metric_key(split, prefix))
                if prefix and other is not None:
                    extras.update(_score_logs(f"val/{prefix}", other, self.class_names, self.detailed_metrics))
        return extras

    def _split_info(self) -> dict[str, Any]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        info = datamodule.split_info() if hasattr(datamodule, "split_info") else {}
        return info or self._restored_split

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """`checkpoint["segcon"]`: the run config, every evaluated network's running best, the
        split's entries, the fit's record and the W&B run id."""
        bests = {best_key(prefix): self.bests.get(prefix, float("nan")) for prefix in self.evaluated_networks("val")}
        checkpoint["segcon"] = {"config": self.run_config, **bests, **self._split_info(),
                                "fit_summary": dict(self.fit_summary)}
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["segcon"]["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("segcon", {})
        self.bests = {prefix: float(state.get(best_key(prefix), float("nan"))) for prefix in self.evaluated_networks("val")}
        if self.resuming_fit():
            self.fit_summary = dict(state.get("fit_summary", {}))
        self._restored_split = {k: state[k] for k in SPLIT_KEYS if k in state}

    def resuming_fit(self) -> bool:
        """Whether the checkpoint being loaded resumes a fit (not an evaluation of it)."""
        return self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING


def metric_key(split: str, prefix: str) -> str:
    """The key of a split's confusion matrix and scores for one evaluated network: "val",
    "val_teacher", ..."""
    return split if not prefix else f"{split}_{prefix.rstrip('/')}"


def best_key(prefix: str) -> str:
    """Where a network's running best val mIoU is kept in `checkpoint["segcon"]`: "best_miou" for
    the trained network, "best_<prefix>_miou" for the others (e.g. best_teacher_miou)."""
    return "best_miou" if not prefix else f"best_{prefix.rstrip('/')}_miou"


def _score_logs(name: str, s: SegScores, class_names: Sequence[str], detailed: bool = False) -> dict[str, float]:
    """`<name>mIoU`, `<name>pixel_acc` and `<name>IoU/<class>`; `detailed`: also
    `<name>{precision,recall,F1,image_IoU,image_F1}/<class>` and `<name>image_mIoU`."""
    logs = {f"{name}mIoU": s.miou, f"{name}pixel_acc": s.pixel_acc}
    named = {"IoU": s.iou}
    if detailed:
        named.update(precision=s.precision, recall=s.acc, F1=s.f1, image_IoU=s.image_iou, image_F1=s.image_f1)
        logs[f"{name}image_mIoU"] = s.image_miou
    for key, values in named.items():
        logs.update({f"{name}{key}/{c}": float(values[k]) for k, c in enumerate(class_names)})
    return logs
