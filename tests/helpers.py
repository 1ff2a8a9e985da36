"""Callbacks used by tests that run the CLI in subprocesses (importable as tests.helpers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import optuna
import torch

from segcon.data.datamodule import SegDataModule
from segcon.engine.callbacks import StepProgressBar
from segcon.objectives.base import Term
from segcon.objectives.supervised import PixelLoss


class DumpMemory(L.Callback):
    """Per rank: record every step's own pending memory entries, and at the end save them with
    the memory term's final buffers (its state dict) to `<run dir>/memory_rank<r>.pt`."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def _term(self, pl_module: L.LightningModule) -> Term:
        return next(t for _, t in pl_module.objective.terms() if t.memories)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pending = self._term(pl_module).pending_entries()
        self.steps.append({k: (f.detach().clone(), lab.clone()) for k, (f, lab) in pending.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        term = self._term(pl_module)
        state = {k: v.clone() for k, v in term.state_dict().items()}  # memories, prototypes, ...
        path = Path(trainer.default_root_dir) / f"memory_rank{trainer.global_rank}.pt"
        torch.save({"steps": self.steps, "memory": state}, path)


class DumpTeacher(L.Callback):
    """Per rank: save the teacher's state when training starts and ends to
    `<run dir>/teacher_<start|end>_rank<r>.pt`."""

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.teacher.state_dict().items()}
        torch.save(state, Path(trainer.default_root_dir) / f"teacher_{when}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "end")


def capture_contrast_target(module: L.LightningModule) -> dict[str, Any]:
    """Replace `module`'s contrastive loss by a zero loss that records the targets, their kept
    labels (`target`, B x H x W) and the SegOutput it is given; the returned dict holds them
    under "targets", "target" and "output" after a training step."""
    captured: dict[str, Any] = {}

    def capture(output, targets, step):
        captured["targets"] = targets
        captured["target"] = targets.reliable()
        captured["output"] = output
        return output.logits.sum() * 0, {}

    module.objective.contrast_loss = capture
    return captured


class RecordTeacherAndStudent(L.Callback):
    """At the start of every training batch (and at the end of training), record the global
    step and copies of the teacher's and the student's inference networks; saved to
    `<run dir>/networks.pt`."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        copy = lambda net: {k: v.detach().clone() for k, v in net.model.state_dict().items()}  # noqa: E731
        self.records.append({"step": trainer.global_step, "teacher": copy(pl_module.teacher),
                             "student": copy(pl_module.net)})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)
        torch.save(self.records, Path(trainer.default_root_dir) / "networks.pt")


class ExtraKeyDataModule(SegDataModule):
    """A user's own datamodule (named by `data.datamodule._target_`) that takes one more data key."""

    def __init__(self, *args: Any, shards: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shards = shards


class NanAfter(PixelLoss):
    """A test loss term: a connected 0 until its `calls`-th call (1-based), then for `times` calls
    a NaN value (`mode: value`), a finite value whose gradient is NaN (`mode: grad`) or a finite
    5e13 with a zero gradient (`mode: huge`, an exploding loss); with `rank`, only on that rank of
    a distributed run."""

    def __init__(self, calls: int, times: int = 10**9, mode: str = "value", ignore_index: int = 255,
                 rank: int | None = None) -> None:
        super().__init__(ignore_index)
        self.calls, self.times, self.mode, self.count, self.rank = calls, times, mode, 0, rank

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        self.count += 1
        zero = logits.sum() * 0.0
        if not self.calls <= self.count < self.calls + self.times:
            return zero
        if self.rank is not None and torch.distributed.is_initialized() and torch.distributed.get_rank() != self.rank:
            return zero
        if self.mode == "huge":
            return zero + 5e13
        return zero + float("nan") if self.mode == "value" else zero.clamp_min(0).sqrt()


class CrashAt(L.Callback):
    """Ends the process at the start of the batch after optimizer step `step`: with `how="kill"`
    by SIGKILL (nothing runs after it, as with kill -9 or a lost node), `how="term"` by SIGTERM
    (a scheduler's stop: the run finishes the step and saves), `how="usr2"` by SIGUSR2 (a
    cluster's time-limit notice), `how="raise"` by an exception (in-process runs: only the files
    written so far survive into the resumed run). With `once_file`, only the first time. With
    `final_eval=True`, at the first batch of the evaluation after the fit instead (`step` unused)."""

    def __init__(self, step: int, how: str = "raise", once_file: str | None = None, final_eval: bool = False,
                 at_validation: bool = False) -> None:
        self.step, self.how, self.once_file, self.final_eval = step, how, once_file, final_eval
        self.at_validation = at_validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.final_eval and not self.at_validation and trainer.global_step == self.step:
            self._end()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.at_validation and trainer.state.fn == "fit" and not trainer.sanity_checking \
                and trainer.global_step == self.step:
            self._end()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.final_eval and not trainer.training and trainer.state.fn != "fit" and batch_idx == 0:
            self._end()

    def _end(self) -> None:
        if self.once_file is not None:  # a restarted job passes the step again: fire once
            if Path(self.once_file).exists():
                return
            Path(self.once_file).touch()
        if self.how in ("kill", "term", "usr2"):
            import os
            import signal

            sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "usr2": signal.SIGUSR2}[self.how]
            os.kill(os.getpid(), sig)
            return
        raise SimulatedCrash(f"simulated crash at step {self.step}")


class SimulatedCrash(RuntimeError):
    """Raised by CrashAt."""


class PruneTrials(optuna.pruners.BasePruner):
    """An Optuna pruner for tests: prunes the trials numbered in `trials` once they reported a
    step >= `step` (which trials stop is known in advance)."""

    def __init__(self, trials: list[int], step: int) -> None:
        self.trials, self.step = set(trials), step

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.number in self.trials and trial.last_step is not None and trial.last_step >= self.step


class NotATerm(torch.nn.Module):
    """A module a config may name as a loss term that is not a Term."""


class SlowSteps(L.Callback):
    """Sleeps `seconds` at the start of every training batch: a step long enough for a test to
    send signals inside it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        time.sleep(self.seconds)


class RecordedStepBar(StepProgressBar):
    """The progress bar, writing what its training bar was given at the end of training
    (description, total, completed) to `<run dir>/train_bar.json`."""

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        task = self.progress.tasks[self.train_progress_bar_id]
        record = {"description": task.description, "total": task.total, "completed": task.completed}
        (Path(trainer.default_root_dir) / "train_bar.json").write_text(json.dumps(record))
        super().on_train_end(trainer, pl_module)
