"""Sending images and run summaries to whichever configured loggers accept them, the W&B group
of a run, and closing W&B runs.

Only the process of global rank 0 talks to a logger's run (on the other ranks Lightning's
loggers hand out stand-ins whose attributes are no-op functions): every function here that uses a
logger's `experiment` is `rank_zero_only`, and the rest of segcon logs through these functions or
through Lightning's own rank-aware `log` / `log_hyperparams`. Call them after the Trainer exists:
it sets the rank they read."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def log_images(loggers: list[Logger], images: Mapping[str, np.ndarray], step: int) -> None:
    """Send `[H, W, 3] uint8` RGB images by key to the loggers that take images (W&B, TensorBoard)."""
    for logger in loggers:
        for key, image in images.items():
            if isinstance(logger, WandbLogger):
                logger.log_image(key, [image], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, image, step, dataformats="HWC")


def finish_wandb(exit_code: int) -> None:
    """Close any W&B run, so that the next job of a multirun (or command) starts a fresh one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def wandb_group(sweep_id: str | None, sweep_dir: str | None, log_dir: str | None, single: str) -> str:
    """The W&B group of a run: `sweep-<id>` for a run started by a W&B sweep agent; the sweep
    directory (relative to the log directory) for a job of a Hydra multirun or search, so its jobs
    group together; `single` (the dataset name) for a lone run."""
    if sweep_id:
        return f"sweep-{sweep_id}"
    if sweep_dir:
        path, root = Path(sweep_dir).resolve(), Path(log_dir or ".").resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else path.name
    return single


@rank_zero_only
def set_summary(loggers: list[Logger], values: Mapping[str, float]) -> None:
    """Put `values` in the W&B run summary (what the runs table and sweep views show)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(dict(values))


@rank_zero_only
def set_run_config(loggers: list[Logger], config: Mapping[str, object]) -> None:
    """The resolved run config as the W&B run config (nested, as composed), for filtering and
    grouping runs and for sweeps. (Given to the run when it starts, not through the logger's
    init arguments, which Hydra would instantiate: the config holds `_target_` nodes.)"""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update(dict(config), allow_val_change=True)
