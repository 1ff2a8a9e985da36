"""Sending images to whichever configured loggers accept them."""

from __future__ import annotations

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
