"""Callbacks segcon adds to every run."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from rich.console import Console

from segcon.evaluation.report import iou_table, write_metrics
from segcon.utils.checkpoint import read_progress


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: `last.ckpt` always holds the final state of training.

    Lightning writes last.ckpt only together with another checkpoint (after a validation or an
    epoch), so a run stopped by max_steps between two validations would leave an older one.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            path = self.final_path()
            trainer.save_checkpoint(path)
            self.last_model_path = str(path)

    def final_path(self) -> Path:
        """Where last.ckpt is (also known to processes that did not save it, e.g. after spawn)."""
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"


class FinalReport(L.Callback):
    """After a standalone `trainer.validate()` / `trainer.test()` (the end-of-run evaluation),
    print the per-class IoU table and write metrics.json plus `<split>_per_class.csv`.

    Validation inside `fit` is not reported here (it is logged every epoch instead).

    Args:
        out_dir: the run directory.
        eval_ckpt: which checkpoint the run evaluates ("best" or "last"), recorded with its path.
        start_time: `time.time()` at the start of the run, for the wall time.
    """

    def __init__(self, out_dir: str | Path, eval_ckpt: str, start_time: float | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.eval_ckpt = eval_ckpt
        self.start_time = time.time() if start_time is None else start_time

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        scores = pl_module.last_scores.get(split)
        if scores is None:
            return
        ckpt = trainer.ckpt_path
        step, epoch = read_progress(ckpt) if ckpt else (trainer.global_step, trainer.current_epoch)
        extra = {
            f"{split}/checkpoint": str(ckpt) if ckpt else None,
            f"{split}/checkpoint_kind": self.eval_ckpt if ckpt else "in-memory weights",
            f"{split}/checkpoint_step": step,
            f"{split}/checkpoint_epoch": epoch,
            "wall_time_s": round(time.time() - self.start_time, 2),
        }
        if split == "val":
            extra["val/mIoU_best"] = pl_module.best_miou
        write_metrics(self.out_dir, split, scores, pl_module.class_names, extra)
        console = Console()
        used = f"{self.eval_ckpt} checkpoint {ckpt}" if ckpt else "the in-memory weights"
        console.print(iou_table(scores, pl_module.class_names, f"{split} per-class IoU ({used})"))
        console.print(f"[bold]final {split} mIoU: {100 * scores.miou:.2f}%[/bold]  (evaluated {used})")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")
