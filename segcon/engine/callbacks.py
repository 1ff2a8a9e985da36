"""Callbacks segcon adds to every run."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from segcon.evaluation.inference import InferenceSettings
from segcon.evaluation.report import iou_table, write_figures, write_metrics
from segcon.utils.checkpoint import read_progress
from segcon.utils.distributed import gather_objects
from segcon.utils.errors import ConfigError
from segcon.utils.loggers import log_images, set_summary
from segcon.utils.rng import rng_state, set_rng_state
from segcon.utils.signals import AgreedSigterm


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: `last.ckpt` always holds the final state of training,
    also of a run interrupted by a termination signal, and is also written every
    `last_every_n_steps` optimizer steps and/or every `last_every_minutes` minutes, which bounds
    the work a crash (kill -9, a lost node) loses.

    The periodic write happens at the start of a training batch, after the previous step and any
    validation that followed it, and never inside a gradient-accumulation group: a run resumed
    from it continues exactly where the writing run went on (see ResumeState).

    Lightning writes last.ckpt only together with another checkpoint (after a validation or an
    epoch), so a run stopped by max_steps between two validations would leave an older one. On
    SIGTERM (or Ctrl-C, or an `interrupt.signals` signal) every rank finishes the same step, and
    the validation due after it (StopTogether), and raises SIGTERMException; this writes last.ckpt
    of that step before the run ends (every rank takes part; the write is atomic, so a second
    Ctrl-C during it leaves the previous file). Every checkpoint resumes exactly, also one written
    at the end of an epoch (ResumeState).
    """

    def __init__(self, *args: Any, last_every_n_steps: int | None = None, last_every_minutes: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if (last_every_n_steps or last_every_minutes) and not self.save_last:
            raise ConfigError("callbacks.model_checkpoint.last_every_n_steps / last_every_minutes write last.ckpt: "
                              "they need save_last: true")
        self.last_every_n_steps, self.last_every_minutes = last_every_n_steps, last_every_minutes
        self._last_write = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_write = time.monotonic()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not (self.last_every_n_steps or self.last_every_minutes) or step in (0, self._last_global_step_saved):
            return
        if batch_idx % trainer.accumulate_grad_batches:
            return
        due = bool(self.last_every_n_steps) and step % int(self.last_every_n_steps) == 0
        if self.last_every_minutes:  # rank 0's clock decides for every rank (the write is collective)
            due |= bool(trainer.strategy.broadcast(time.monotonic() - self._last_write >= 60 * self.last_every_minutes))
        if due:
            self._write_last(trainer)
            self._last_global_step_saved, self._last_write = step, time.monotonic()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # StopTogether raises SIGTERMException only between steps, never inside a validation
        if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == TrainerFn.FITTING:
            self._write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._write_last(trainer)

    def _write_last(self, trainer: L.Trainer) -> None:
        # named before the write, so the checkpoint's own copy of this callback's state knows it
        # (a run resumed from it writes last.ckpt again, not a last-v1.ckpt beside it)
        path, before = self.final_path(), self.last_model_path
        self.last_model_path = str(path)
        try:
            trainer.save_checkpoint(path)
        except BaseException:
            self.last_model_path = before
            raise

    def final_path(self) -> Path:
        """Where last.ckpt is (also known to processes that did not save it, e.g. after spawn)."""
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"


class ResumeState(L.Callback):
    """Makes a resumed run continue with the random numbers the interrupted run would have used.

    Every checkpoint gets each rank's generator states (torch CPU and CUDA, numpy, Python: what
    dropout, the contrastive samplers and CutMix draw from) under `checkpoint["segcon_rng"]`; a
    resumed fit sets them back at its first training batch, after model set-up and the sanity
    check have drawn what they draw. The data order and augmentation need no state of this kind:
    they are functions of the position in the run (segcon.data.sampling), which Lightning keeps.
    A checkpoint written at the end of an epoch is resumed from the start of the next one
    (`start_next_epoch`).
    """

    KEY = "segcon_rng"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.KEY] = gather_objects(rng_state(), trainer.world_size)  # every rank dumps a checkpoint

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Called before Lightning restores its loops from the same dict.
        fit_loop = (checkpoint.get("loops") or {}).get("fit_loop")
        if trainer.state.fn == TrainerFn.FITTING and fit_loop is not None:
            start_next_epoch(fit_loop)
        states = checkpoint.get(self.KEY) or []
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random state of {len(states)} process(es), this run has "
                           f"{trainer.world_size}: the resumed run will not repeat the interrupted one exactly")
            return
        self._pending = states[trainer.global_rank]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None
            # Lightning's resume adds one to its logging step counter, assuming the checkpoint was
            # written at the end of a batch; ModelCheckpoint also writes at the start of one.
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


def start_next_epoch(fit_loop: dict[str, Any]) -> bool:
    """Rewrite a Lightning fit-loop state saved at the end of an epoch (every batch trained; saved
    in `on_train_epoch_end` after the epoch-end validation, or by a signal once the epoch had
    ended) as the state at the start of the next epoch; True if it was one. Other states are
    left as they are.

    Lightning 2.6 resumes such a state exactly only when training is bounded by epochs. With
    `max_steps` set, it replays the end of the saved epoch and counts it a second time: the
    samplers are told the epoch after the right one and `max_epochs` stops the run an epoch early
    (Lightning issue #19617 is the same state machine). From the start of the next epoch both
    bounds resume alike: the next epoch starts with its own hooks (`on_train_epoch_start`), and
    what the saved epoch's end had still to do after the save is the part Lightning's own
    epoch-bounded resume leaves out too (epoch-interval scheduler steps, which segcon does not
    use, and epoch-level logging).
    """
    epochs, batches = fit_loop["epoch_progress"], fit_loop["epoch_loop.batch_progress"]
    now = epochs["current"]
    ended = (batches.get("is_last_batch") and now["ready"] == now["started"] == now["processed"]
             and now["completed"] in (now["processed"] - 1, now["processed"]))
    if not ended:
        return False
    for counts in (epochs["current"], epochs["total"]):
        counts["completed"] = counts["processed"]
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False
    return True


class StopTogether(L.Callback):
    """Stops a fit after the same optimizer step on every rank when any of them receives SIGTERM
    (or Ctrl-C, or an `interrupt.signals` signal), and never inside a validation: every rank
    reaches the collective write of last.ckpt instead of one waiting in a step the others never
    start, and a validation that has begun ends and is checkpointed as in an uninterrupted run.

    It installs `AgreedSigterm` in place of Lightning's signal handling (at set-up, before
    Lightning registers the handlers), whose handler only records a request during a fit. After
    each batch that ends an optimizer step, and at the end of each validation of the fit, the
    ranks' requests are reduced: in a training step by segcon's module inside the reduction and
    host read its divergence check does anyway (`stop_agreed`: no collective or read of its own),
    at a validation's end with one boolean all-reduce (none in a one-process fit). If any rank
    asked, every rank's trainer sees `received_sigterm` and raises SIGTERMException when that
    step (and the validation that follows it, if one is due) is done. Lightning's validation loop
    would stop at its next batch on `received_sigterm`, so it is held back while a validation runs.
    """

    def __init__(self) -> None:
        self._held = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(trainer._signal_connector, AgreedSigterm):
            trainer._signal_connector = AgreedSigterm(trainer)

    @staticmethod
    def _agreed(trainer: L.Trainer) -> bool:
        requested = trainer._signal_connector.requested
        return trainer.strategy.reduce_boolean_decision(requested, all=False) if trainer.world_size > 1 else requested

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        # segcon's modules agree inside the step's one reduction (SupervisedModule.stop_agreed)
        agreed = getattr(pl_module, "stop_agreed", None)
        if agreed is None:
            agreed = self._agreed(trainer)
        if agreed:
            trainer._signal_connector.received_sigterm = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            connector = trainer._signal_connector
            self._held, connector.received_sigterm = connector.received_sigterm, False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            trainer._signal_connector.received_sigterm = self._agreed(trainer) or self._held
            self._held = False


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
        set_summary(trainer.loggers, {f"{split}/mIoU": scores.miou, **{
            k: v for k, v in extra.items() if isinstance(v, int | float) and not isinstance(v, bool)}})
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


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading a run bounded by steps (`trainer.max_steps` with
    `max_epochs: -1`: every iteration-based preset) as one bar of optimizer steps out of
    `max_steps`, with the time left, instead of one bar per epoch whose total reads "-2". Runs
    bounded by epochs show Lightning's per-epoch bar, and an epoch without a bound shows no total."""

    def by_steps(self) -> bool:
        """Whether `max_steps` bounds the run and epochs do not."""
        trainer = self.trainer
        return trainer.max_steps is not None and trainer.max_steps > 0 and (
            trainer.max_epochs is None or trainer.max_epochs < 0)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self.by_steps():
            text = "Steps"
        elif self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            text = f"Epoch {current_epoch}"
        else:
            text = f"Epoch {current_epoch}/{self.trainer.max_epochs - 1}"
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.by_steps():
            super().on_train_epoch_start(trainer, pl_module)
            return
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:  # one bar for the run, started where a resumed run is
            self.train_progress_bar_id = self._add_task(trainer.max_steps, self._get_train_description(0))
        self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.by_steps():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
