"""Checkpoint writing that never leaves a half-written file behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves to a temporary file in the target directory, then renames it into place: a crash or
    a full disk mid-save leaves the previous checkpoint intact (remote paths use Lightning's IO)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _load_lazily(path: str | Path) -> dict[str, Any]:
    """A checkpoint loaded without unpickling code and without reading tensors into memory."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_segcon_state(path: str | Path) -> dict[str, Any]:
    """The `segcon` entry of a checkpoint (config, best mIoU, W&B run id)."""
    return dict(_load_lazily(path).get("segcon", {}))


def read_progress(path: str | Path) -> tuple[int, int]:
    """(global_step, epoch) at which a Lightning checkpoint was saved."""
    ckpt = _load_lazily(path)
    return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0))
