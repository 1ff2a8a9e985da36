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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from segcon.evaluation.inference import InferenceSettings, infer
from segcon.evaluation.metrics import ConfusionMatrix, SegScores, scores_of
from segcon.evaluation.visualize import denormalize, panel
from segcon.methods.divergence import (
    DivergenceError,
    DivergencePolicy,
    LossWatch,
    buffer_snapshot,
    describe,
    non_finite_flags,
    restore_buffers,
)
from segcon.methods.optim import build_optimizer, poly_factor
from segcon.models.base import SegModel
from segcon.objectives.base import Targets
from segcon.objectives.objective import Objective
from segcon.utils.distributed import gather_objects
from segcon.utils.errors import ConfigError
from segcon.utils.loggers import log_images


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


class SupervisedModule(L.LightningModule):
    """Trains `net` on labelled batches with `objective`; validates with a dataset-level mIoU.

    Args:
        net: the network (any SegModel).
        objective: supervised (+ contrastive) terms; None for a module that only evaluates
            (segcon-eval).
        optim: optimizer and schedule settings (see conf/optim/*.yaml).
        num_classes, ignore_index, class_names, palette, mean, std: from the data config.
        num_overlays: validation images drawn as image | ground truth | prediction each epoch.
        run_config: the resolved run config, stored in every checkpoint (for segcon-eval & co).
        inference: how validation and test predict (`data.eval`: whole | slide | ms_flip and
            their settings, see segcon.evaluation.inference); None is `whole`.
        detailed_metrics: also log precision, recall, F1 and the per-image scores of every
            class (`data.detailed_metrics`; metrics.json and the CSV always hold them).
        divergence: what a step with a non-finite loss or gradient does (the `divergence`
            config: stop, or skip up to `max_consecutive` in a row; segcon.methods.divergence).

    Logged: `train/loss` and `train/loss_<term>` every step; `val/mIoU`, `val/mIoU_best`,
    `val/pixel_acc` and `val/IoU/<class>` every validation (same names under `test/`); with
    `detailed_metrics`, also `val/{precision,recall,F1,image_IoU,image_F1}/<class>` and
    `val/image_mIoU`.
    """

    def __init__(
        self,
        net: SegModel,
        objective: Objective | None,
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
        detailed_metrics: bool = False,
        divergence: Mapping[str, Any] | None = None,
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
        self.detailed_metrics = detailed_metrics
        self.divergence = DivergencePolicy.from_config(divergence)
        self.loss_watch = LossWatch(self.divergence.explode_factor)
        self.skipped_steps = 0
        self._skips_in_a_row = 0
        # Training files replaced because they could not be read (data.on_bad_file=skip): the errors.
        self.skipped_files: list[str] = []
        self._step_logs: dict[str, Tensor] = {}
        self._step_skipped = False
        self.stop_agreed: bool | None = None  # whether any rank was asked to stop, read with the step's check
        self._statistics: dict[str, Tensor] = {}
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
        self._class_frequencies: dict[str, float] = {}

    # -- training ------------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Check the `method` config node (plain containers) before anything is built; raise one
        ConfigError naming the key and the fix."""
        if int(config.get("num_overlays", 0)) < 0:
            raise ConfigError(f"method.num_overlays must be >= 0, got {config['num_overlays']}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.objective is None:
            raise RuntimeError("this module was built for evaluation only (objective=None)")
        output = self.net(batch["image"])
        loss, logs = self.objective(output, Targets(batch["mask"], self.ignore_index), self.global_step)
        self.log_step(logs, batch["image"].shape[0])
        return loss

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's logged values to the loggers (every
        `trainer.log_every_n_steps` steps, as its logger connector counts them): values that cost
        a read of the device are computed only then."""
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def log_step(self, logs: Mapping[str, Tensor], batch_size: int) -> None:
        """Log a training step's values as `train/<name>` on the steps whose values Lightning
        writes (`self.log` costs two copies on the device per value); the divergence check reads
        every step's values."""
        self._step_logs = {f"train/{k}": v for k, v in logs.items()}
        if self.logs_this_step():
            self.log_dict(self._step_logs, batch_size=batch_size)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_skipped = False
        parts = [batch] if "skipped" in batch else [p for p in batch.values() if isinstance(p, dict)]
        for err in (err for part in parts for err in part.get("skipped", ())):
            if err not in self.skipped_files:
                self.skipped_files.append(err)
                rank_zero_warn(f"data.on_bad_file=skip: replaced a training image ({len(self.skipped_files)} so far): {err}")
        if self.divergence.policy == "skip":  # a skipped step puts the BatchNorm statistics back
            self._statistics = buffer_snapshot(self.net)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The divergence check (segcon.methods.divergence): stop, or drop this step's gradients.

        Its one reduction and host read per step also carry whether any rank was asked to stop
        (a signal: `stop_agreed`, which StopTogether acts on after the step), so the agreement
        costs no collective or read of its own."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        check_gradients = self.divergence.check_gradients and scaler is None
        bad_logs, bad_grads, names = non_finite_flags(self._step_logs, self.net.named_parameters(), check_gradients)
        flag = torch.cat([bad_logs.to(self.device), bad_grads.to(self.device)]).any().float()
        loss = self._step_logs.get("train/loss", flag.new_zeros(())).detach().float().reshape(())
        requested = flag.new_tensor(float(getattr(self.trainer._signal_connector, "requested", False)))
        # the largest loss of any rank, so that every rank watches the same values: one host sync per step
        bad, largest, stop = self.trainer.strategy.reduce(torch.stack([flag, loss, requested]), reduce_op="max").tolist()
        self.stop_agreed = stop > 0
        if bad == 0.0:
            self._skips_in_a_row = 0
            exploding = self.loss_watch.judge(self.global_step, largest)
            if exploding and self.divergence.on_explode == "stop":
                raise DivergenceError(f"{exploding}. Stopped before the optimizer step: the weights and every checkpoint "
                                      "written so far hold the state before it. Lower optim.lr or check the data.")
            if exploding:
                rank_zero_warn(f"{exploding}. Lower optim.lr or check the data; divergence.on_explode=stop stops such "
                               "a run, divergence.explode_factor=null silences this.")
            return
        what = describe(self.global_step, self._step_logs, bad_logs, bad_grads, names)
        if self.divergence.policy == "stop":
            raise DivergenceError(
                f"{what}. Stopped before the optimizer step: the weights and every checkpoint written so far hold "
                "the state before it. Lower optim.lr, check the data, or set divergence.policy=skip."
            )
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves every parameter (and its moments) alone
        restore_buffers(self.net, self._statistics)
        self._step_skipped = True
        self.skipped_steps += 1
        self._skips_in_a_row += 1
        rank_zero_warn(f"{what}: step skipped ({self._skips_in_a_row} in a row, {self.skipped_steps} in all)")
        if self._skips_in_a_row >= self.divergence.max_consecutive:
            raise DivergenceError(f"{what}: {self._skips_in_a_row} steps in a row were not finite "
                                  f"(divergence.max_consecutive={self.divergence.max_consecutive}); stopping. "
                                  "Lower optim.lr or check the data.")

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Fill the memories of memory-using terms with this step's entries from all ranks (not
        after a skipped step)."""
        assert self.objective is not None
        if self._step_skipped:
            return
        for _, term in self.objective.terms():
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
        groups = self.net.parameter_groups()
        optimizer = build_optimizer(groups["encoder"], groups["head"], **cfg)
        total = int(self.trainer.estimated_stepping_batches)
        kind = sched.pop("name", "poly")
        if kind == "constant":
            return {"optimizer": optimizer}
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: poly_factor(step, total, **sched)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ----------------------------------------------------------------------

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
        if self.skipped_steps:
            extras["skipped_steps"] = self.skipped_steps
        if self.skipped_files:
            extras["train/skipped_files"] = self.skipped_files
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

    def setup(self, stage: str) -> None:
        """Before fitting: give the terms that weigh classes by frequency (loss=imbalance) the
        class frequencies of the labeled training images (the datamodule counts them)."""
        if stage != "fit" or self.objective is None:
            return
        terms = [(name, t) for name, t in self.objective.terms() if t.needs_class_frequencies]
        if not terms:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "class_frequencies"):
            raise ConfigError(f"the terms {[n for n, _ in terms]} need the labeled images' class frequencies, which "
                              f"{type(datamodule).__name__} cannot count; give them as <term>.frequencies=[...]")
        counted = datamodule.class_frequencies()
        for _, term in terms:
            term.set_class_frequencies(counted.frequencies)
        shares = ", ".join(f"{c} {100 * f:.3f} %" for c, f in zip(self.class_names, counted.frequencies, strict=True))
        source = f"read from {counted.path}" if counted.from_cache else "counted" + (f", kept in {counted.path}" if counted.path else "")
        rank_zero_info(f"class frequencies of the {counted.images} labeled images ({source}): {shares}")
        self._class_frequencies = {f"class_frequency/{c}": f for c, f in zip(self.class_names, counted.frequencies, strict=True)}

    def on_fit_start(self) -> None:
        if self.divergence.policy == "skip" and self.trainer.accumulate_grad_batches > 1:
            raise ConfigError("divergence.policy=skip drops one optimizer step's gradients and BatchNorm statistics; "
                              "with trainer.accumulate_grad_batches > 1 a step spans several batches: use "
                              "divergence.policy=stop, or accumulate_grad_batches=1")
        info = self._split_info()
        if info:
            rank_zero_info(split_summary(info))
        info = {**info, **self._class_frequencies}
        if info:
            for logger in self.loggers:
                logger.log_hyperparams(info)

    def on_train_end(self) -> None:
        """Every rank's replaced training files, gathered, and one warning listing them."""
        if self.trainer.world_size > 1:
            lists = gather_objects(self.skipped_files, self.trainer.world_size)
            self.skipped_files = sorted({err for part in lists for err in part})
        if self.skipped_files:
            listed = "\n  ".join(self.skipped_files)
            rank_zero_warn(f"{len(self.skipped_files)} training file(s) could not be read and were replaced by the "
                           f"next image (data.on_bad_file=skip; also in metrics.json train/skipped_files):\n  {listed}")

    # -- checkpoint ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bests = {best_key(prefix): self.bests.get(prefix, float("nan")) for prefix in self.evaluated_networks("val")}
        checkpoint["segcon"] = {"config": self.run_config, **bests, **self._split_info(),
                                "skipped_steps": self.skipped_steps, "skips_in_a_row": self._skips_in_a_row,
                                "loss_watch": self.loss_watch.state_dict(),
                                "skipped_files": list(self.skipped_files), "fit_summary": dict(self.fit_summary)}
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint["segcon"]["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("segcon", {})
        self.bests = {prefix: float(state.get(best_key(prefix), float("nan"))) for prefix in self.evaluated_networks("val")}
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:  # resuming a fit
            self._skips_in_a_row = int(state.get("skips_in_a_row", 0))
            self.loss_watch.load_state_dict(state.get("loss_watch", {}))
            self.skipped_files = list(state.get("skipped_files", []))
            self.fit_summary = dict(state.get("fit_summary", {}))
        keys = ("split_hash", "labeled_images", "unlabeled_images", "unlabeled_stream_images", "unlabeled_without_mask")
        self._restored_split = {k: state[k] for k in keys if k in state}


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
