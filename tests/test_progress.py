"""The progress bar of runs bounded by steps (every iteration-based preset): steps out of
max_steps with the time left, never an epoch total of -2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from segcon.engine.callbacks import StepProgressBar
from segcon.utils.targets import instantiate
from tests.conftest import compose_train


def _bar(cfg: DictConfig) -> StepProgressBar:
    bar = instantiate(cfg.callbacks.rich_progress_bar, "callbacks.rich_progress_bar")
    trainer = L.Trainer(max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps, callbacks=[bar],
                        logger=False, enable_checkpointing=False, enable_model_summary=False)
    bar.setup(trainer, L.LightningModule(), "fit")
    return bar


def test_an_iteration_based_preset_gets_steps_out_of_max_steps(tmp_path: Path) -> None:
    steps = _bar(compose_train(["experiment=ssl_synthetic", f"data.root={tmp_path}"]))  # the shipped bar
    assert isinstance(steps, StepProgressBar) and steps.by_steps()
    assert steps.total_train_batches == 600 and steps._get_train_description(7).strip() == "Steps"


def test_epoch_bounded_runs_count_epochs_and_never_print_a_negative_total(tmp_path: Path) -> None:
    epochs = _bar(compose_train(["trainer.max_epochs=20", f"data.root={tmp_path}"]))
    assert not epochs.by_steps() and epochs._get_train_description(3).strip() == "Epoch 3/19"
    endless = _bar(compose_train(["trainer.max_epochs=-1", "trainer.max_steps=-1", f"data.root={tmp_path}"]))
    assert not endless.by_steps() and endless._get_train_description(3).strip() == "Epoch 3"


def test_a_run_by_steps_ends_with_its_bar_full(tiny_cfg: Callable[..., DictConfig]) -> None:
    """Two epochs of 2 batches with a validation between: one bar, 4 of 4 steps."""
    from segcon.train import train

    cfg = tiny_cfg("data.labeled_count=4", "data.batch_size=2", "trainer.max_epochs=-1", "trainer.max_steps=4",
                   "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=2",
                   "+callbacks.rich_progress_bar._target_=tests.helpers.RecordedStepBar")
    train(cfg)
    bar = json.loads((Path(cfg.paths.output_dir) / "train_bar.json").read_text())
    assert bar["description"].strip().endswith("Steps") and bar["total"] == 4 and bar["completed"] == 4
