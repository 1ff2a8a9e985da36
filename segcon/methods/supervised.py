"""SupervisedModule: one network, one Objective, dataset-level validation metrics."""

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
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from segcon.evaluation.inference import InferenceSettings, infer
from segcon.evaluation.metrics import ConfusionMatrix, SegScores, scores
from segcon.evaluation.visualize import denormalize, panel
from segcon.methods.optim import build_optimizer, poly_factor
from segcon.models.segnet import SegNet
from segcon.objectives.memory import MemoryUser
from segcon.objectives.objective import Objective
from segcon.utils.loggers import log_images


def running_best(best: float, value: float) -> float:
    """The larger of `best` and `value`; NaN `best` means none yet (value must not be NaN)."""
    return value if np.isnan(best) else max(best, value)


class SupervisedModule(L.LightningModule):
    """Trains `net` on labelled batches with `objective`; validates with a dataset-level mIoU.

    Args:
        net: the SegNet.
        objective: supervised (+ contrastive) terms.
        optim: optimizer and schedule settings (see conf/optim/*.yaml).
        num_classes, ignore_index, class_names, palette, mean, std: from the data config.
        num_overlays: validation images drawn as image | ground truth | prediction each epoch.
        run_config: the resolved run config, stored in every checkpoint (for segcon-eval & co).
        inference: how validation and test predict (`data.eval`: whole | slide | ms_flip and
            their settings, see segcon.evaluation.inference); None is `whole`.

    Logged: `train/loss` and `train/loss_<term>` every step; `val/mIoU`, `val/mIoU_best`,
    `val/pixel_acc` and `val/IoU/<class>` every validation (same names under `test/`).
    """

    def __init__(
        self,
        net: SegNet,
        objective: Objective,
        optim: Mapping[str, Any],
        num_classes: int,
        ignore_index: int,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]],
        mean: Sequence[float],
        std: Sequence[float],
        num_overlays: int = 4,
        run_config: Mapping[str, Any] | None = None,
        inference: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.objective = objective
        self.optim_cfg = dict(optim)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.palette = [list(c) for c in palette]
        self.mean, self.std = list(mean), list(std)
        self.num_overlays = num_overlays
        self.run_config = dict(run_config or {})
        self.inference = InferenceSettings.from_config(inference)
        self.metrics = torch.nn.ModuleDict(
            {split: ConfusionMatrix(num_classes, ignore_index) for split in ("val", "test")}
        )
        self.best_miou = float("nan")
        # The training run's own record, by metrics.json key: last validation and running best
        # of the fit. In memory, so the end-of-run evaluation of an earlier checkpoint (whose
        # restored best is the best up to *its* step) cannot overwrite it.
        self.fit_summary: dict[str, float] = {}
        self.last_scores: dict[str, SegScores] = {}
        self._overlay_batch: dict[str, Tensor] | None = None
        self._restored_split: dict[str, Any] = {}

    # -- training ------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        output = self.net(batch["image"])
        loss, logs = self.objective(output, batch["mask"], self.global_step)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch["image"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Fill the memories of memory-using terms with this step's entries from all ranks."""
        for term in self.objective.contrast.values():
            if not isinstance(term, MemoryUser):
                continue
            for memory, (feats, labels) in term.pending_entries().items():
                feats, labels = self.all_gather(feats), self.all_gather(labels)
                if self.trainer.world_size > 1:  # [world, M, ...] -> [world * M, ...], rank order
                    feats, labels = feats.flatten(0, 1), labels.flatten(0, 1)
                term.enqueue(memory, feats, labels)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = dict(self.optim_cfg)
        sched = dict(cfg.pop("scheduler", {}) or {})
        cfg.pop("scale_lr", None)
        cfg.pop("base_batch", None)
        optimizer = build_optimizer(self.net.encoder_parameters(), self.net.head_parameters(), **cfg)
        total = int(self.trainer.estimated_stepping_batches)
        kind = sched.pop("name", "poly")
        if kind == "constant":
            return {"optimizer": optimizer}
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: poly_factor(step, total, **sched)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ----------------------------------------------------------------------

    def predict_logits(self, images: Tensor) -> Tensor:
        """Class scores `[B, K, H, W]` at the input resolution, by the `inference` mode: log-
        probabilities (argmax is the prediction, softmax the probabilities averaged over slide
        windows or multi-scale/flip views). The network must be in eval mode."""
        return infer(self.net, images, self.inference, self.net.output_stride)

    def _eval_step(self, split: str, batch: dict[str, Any], batch_idx: int) -> None:
        pred = self.predict_logits(batch["image"]).argmax(1)
        self.metrics[split].update(pred, batch["mask"])
        if batch_idx == 0 and self.num_overlays > 0:
            n = self.num_overlays
            self._overlay_batch = {
                "image": batch["image"][:n].cpu(),
                "mask": batch["mask"][:n].cpu(),
                "pred": pred[:n].cpu(),
            }

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)

    def _eval_epoch_end(self, split: str) -> None:
        cm = self.metrics[split].compute()  # summed over ranks
        self.metrics[split].reset()
        s = scores(cm)
        self.last_scores[split] = s
        # The value is already global: every rank logs the same number, no further reduction.
        logs = {f"{split}/mIoU": s.miou, f"{split}/pixel_acc": s.pixel_acc}
        logs.update({f"{split}/IoU/{name}": float(s.iou[k]) for k, name in enumerate(self.class_names)})
        if split == "val":
            if not self.trainer.sanity_checking and not np.isnan(s.miou):
                self.best_miou = running_best(self.best_miou, s.miou)
            if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
                self.fit_summary.update({"val/mIoU_last": s.miou, "val/mIoU_best": self.best_miou})
            logs["val/mIoU_best"] = self.best_miou
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
        a fit in this process the best is the evaluated checkpoint's record), and the
        semi-supervised split's hash and counts when the run trained on one."""
        extras = dict(self._split_info())
        if split == "val":
            extras.update(self.fit_summary)
            extras.setdefault("val/mIoU_best", self.best_miou)  # no fit here: the checkpoint's
        return extras

    def _split_info(self) -> dict[str, Any]:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        info = datamodule.split_info() if hasattr(datamodule, "split_info") else {}
        return info or self._restored_split

    def on_fit_start(self) -> None:
        info = self._split_info()
        if info:
            rank_zero_info(f"split {info['split_hash']}: {info['labeled_images']} labeled, "
                           f"{info['unlabeled_images']} unlabeled training images")
            for logger in self.loggers:
                logger.log_hyperparams(info)

    # -- checkpoint ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["segcon"] = {"config": self.run_config, "best_miou": self.best_miou, **self._split_info()}
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["segcon"]["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("segcon", {})
        self.best_miou = float(state.get("best_miou", float("nan")))
        self._restored_split = {k: state[k] for k in ("split_hash", "labeled_images", "unlabeled_images") if k in state}
