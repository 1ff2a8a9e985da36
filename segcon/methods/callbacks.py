"""Callbacks segcon adds to every run."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from segcon.evaluation.inference import InferenceSettings
from segcon.evaluation.report import iou_table, write_figures, write_metrics
from segcon.utils.checkpoint import read_progress
from segcon.utils.loggers import log_images


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: `last.ckpt` always holds the final state of training,
    also of a run interrupted by a termination signal.

    Lightning writes last.ckpt only together with another checkpoint (after a validation or an
    epoch), so a run stopped by max_steps between two validations would leave an older one. On
    SIGTERM (or an `interrupt.signals` signal) Lightning finishes the step on every rank and
    raises SIGTERMException; this writes last.ckpt of that step before the run ends (every rank
    takes part; the write is atomic, so a second signal during it leaves the previous file).
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == TrainerFn.FITTING:
            path = self.final_path()
            trainer.save_checkpoint(path)
            self.last_model_path = str(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            path = self.final_path()
            trainer.save_checkpoint(path)
            self.last_model_path = str(path)

    def final_path(self) -> Path:
        """Where last.ckpt is (also known to processes that did not save it, e.g. after spawn)."""
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"


class FinalReport(L.Callback):
    """Reports a standalone `trainer.validate()` / `trainer.test()` (the end-of-run evaluation,
    and segcon-eval). At the start it prints the inference mode with its forward passes per
    image and expected cost relative to `whole`; at the end it prints the per-class IoU table and
    writes metrics.json, `<split>_per_class.csv`, `<split>_confusion.png` (row-normalised
    confusion matrix) and `<split>_iou.png` (per-class IoU bars), and sends the figures to the
    loggers.

    Validation inside `fit` is not reported here (it is logged every epoch instead).

    Args:
        out_dir: where the files go (the run directory).
        eval_ckpt: what was evaluated ("best" or "last" checkpoint; for segcon-eval the branch),
            recorded with the checkpoint path.
        start_time: `time.time()` at the start of the run, for the wall time.
        checkpoint: the checkpoint file, when its weights were loaded outside Lightning
            (segcon-eval); by default the trainer's `ckpt_path`.
    """

    def __init__(
        self, out_dir: str | Path, eval_ckpt: str, start_time: float | None = None, checkpoint: str | Path | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.eval_ckpt = eval_ckpt
        self.start_time = time.time() if start_time is None else start_time
        self.checkpoint = str(checkpoint) if checkpoint is not None else None

    def _announce(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        settings = getattr(pl_module, "inference", None)
        datasets = getattr(trainer.datamodule, "datasets", {})
        if not trainer.is_global_zero or not isinstance(settings, InferenceSettings) or split not in datasets:
            return
        h, w = datasets[split][0]["image"].shape[-2:]
        Console().print(settings.describe(int(h), int(w)), soft_wrap=True)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        scores = pl_module.last_scores.get(split)
        if scores is None:
            return
        ckpt = self.checkpoint or trainer.ckpt_path
        step, epoch = read_progress(ckpt) if ckpt else (trainer.global_step, trainer.current_epoch)
        settings = getattr(pl_module, "inference", None)
        extra = {
            f"{split}/checkpoint": str(ckpt) if ckpt else None,
            f"{split}/checkpoint_kind": self.eval_ckpt if ckpt else "in-memory weights",
            f"{split}/checkpoint_step": step,
            f"{split}/checkpoint_epoch": epoch,
            "wall_time_s": round(time.time() - self.start_time, 2),
        }
        if isinstance(settings, InferenceSettings):
            extra[f"{split}/inference"] = dataclasses.asdict(settings)
        if hasattr(pl_module, "report_extras"):
            extra.update(pl_module.report_extras(split))
        write_metrics(self.out_dir, split, scores, pl_module.class_names, extra)
        used = f"{self.eval_ckpt} checkpoint {ckpt}" if ckpt else "the in-memory weights"
        label = f"{self.eval_ckpt if ckpt else 'in-memory'} weights, step {step}" + (
            f", {settings.mode}" if isinstance(settings, InferenceSettings) else ""
        )
        figures = write_figures(self.out_dir, split, scores, pl_module.class_names, label)
        log_images(trainer.loggers, figures, trainer.global_step)
        console = Console()
        console.print(iou_table(scores, pl_module.class_names, f"{split} per-class IoU ({used})"))
        console.print(f"[bold]final {split} mIoU: {100 * scores.miou:.2f}%[/bold]  (evaluated {used})")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._announce(trainer, pl_module, "val")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._announce(trainer, pl_module, "test")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")
