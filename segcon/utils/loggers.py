"""Sending images to whichever configured loggers accept them, and closing W&B runs."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger


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
