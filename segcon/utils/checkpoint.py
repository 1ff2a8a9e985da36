"""Checkpoints: writing that never leaves a half-written file behind, and reading without
unpickling code (weights_only=True, or safetensors) for resuming, evaluation, prediction, export.

A segcon checkpoint is a Lightning checkpoint whose `state_dict` holds each network's inference
network (`SegModel.model`) under the prefix `BRANCHES` names: the student (or the only network)
under `net.model.*` and, for teacher–student methods, the EMA teacher under `teacher.model.*`;
everything else (train-only heads under `net.heads.*`, memory banks, ...) is training state. `checkpoint["segcon"]["config"]` is the resolved run
config. segcon-export's `.safetensors` files hold one network's `net.model` weights with the same
`segcon` entry as JSON in the file's metadata, and are read the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn

from segcon.utils.errors import ConfigError
from segcon.utils.targets import check_stored_config
from segcon.utils.weights import load_checked, safe_torch_load

BRANCHES = {"student": "net.model.", "teacher": "teacher.model."}
"""state_dict prefix of each network's inference network in a segcon checkpoint: the methods keep
the networks as `net` and `teacher`, each SegModel its inference network as `model`."""

SAFETENSORS_KEY = "segcon"
"""The safetensors metadata entry holding the segcon state (config, branch, step) as JSON."""


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
        except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError
            free_gib = shutil.disk_usage(path.parent).free / 2**30
            kept = "the previous one is kept unchanged" if path.exists() else "no earlier one existed"
            raise OSError(
                f"could not write checkpoint {path} ({err}); {kept}. {free_gib:.1f} GiB are free on "
                f"{path.parent}: free space (or run in another directory with hydra.run.dir=...) and resume "
                "with ckpt_path=<the last checkpoint kept>."
            ) from err
        finally:
            tmp.unlink(missing_ok=True)


def _load_lazily(path: str | Path) -> dict[str, Any]:
    """A checkpoint loaded without unpickling code and without reading tensors into memory."""
    obj = safe_torch_load(path, mmap=True)
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} is not a Lightning checkpoint (it holds a {type(obj).__name__}, not a dict)")
    return obj


def _safetensors_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if SAFETENSORS_KEY not in meta:
        raise ConfigError(
            f"{path} has no '{SAFETENSORS_KEY}' metadata: it was not written by segcon-export, so "
            "the model cannot be rebuilt from it. Use it as model.weights_path in segcon-train."
        )
    return json.loads(meta[SAFETENSORS_KEY])


def read_segcon_state(path: str | Path) -> dict[str, Any]:
    """The `segcon` entry of a checkpoint (config, best mIoU, W&B run id; for a segcon-export
    .safetensors file also the branch, step and epoch it was exported from)."""
    if Path(path).suffix == ".safetensors":
        return _safetensors_state(Path(path))
    return dict(_load_lazily(path).get("segcon", {}))


def read_progress(path: str | Path) -> tuple[int, int]:
    """(global_step, epoch) at which a Lightning checkpoint (or the one a segcon-export
    .safetensors file came from) was saved."""
    if Path(path).suffix == ".safetensors":
        state = _safetensors_state(Path(path))
        return int(state.get("global_step", 0)), int(state.get("epoch", 0))
    ckpt = _load_lazily(path)
    return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0))


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file `path` names: the file itself, or for a run directory the checkpoint
    the run evaluated (metrics.json `val/checkpoint`), else its only `checkpoints/best-*.ckpt`,
    else `checkpoints/last.ckpt`."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise ConfigError(f"ckpt={path}: no such checkpoint file or run directory")
    metrics = p / "metrics.json"
    recorded = json.loads(metrics.read_text()).get("val/checkpoint") if metrics.is_file() else None
    if recorded:
        # The recorded path is absolute; a moved run dir still has the file under checkpoints/.
        for candidate in (Path(recorded), p / "checkpoints" / Path(recorded).name):
            if candidate.is_file():
                return candidate
    best = sorted((p / "checkpoints").glob("best-*.ckpt"))
    if len(best) > 1:
        raise ConfigError(f"run {p} has several best checkpoints ({[b.name for b in best]}); pass one as ckpt=<file>")
    if best:
        return best[0]
    if (p / "checkpoints" / "last.ckpt").is_file():
        return p / "checkpoints" / "last.ckpt"
    raise ConfigError(
        f"ckpt={path} is a directory without a checkpoint: looked for metrics.json's val/checkpoint, "
        f"{p / 'checkpoints' / 'best-*.ckpt'} and {p / 'checkpoints' / 'last.ckpt'}. Pass ckpt=<file>."
    )


@dataclass(frozen=True)
class RunCheckpoint:
    """What inference needs from a segcon checkpoint.

    Attributes:
        path: the checkpoint file.
        config: the resolved run config it was trained with (plain containers).
        weights: branch ("student" / "teacher") -> its inference network's state_dict.
        segcon: the checkpoint's `segcon` entry (best mIoU, W&B run id, ...).
    """

    path: Path
    config: dict[str, Any]
    weights: dict[str, dict[str, Tensor]]
    segcon: dict[str, Any]

    def load_into(self, model: nn.Module, branch: str = "student", trained_as: str = "") -> None:
        """Load the `branch` network's weights into an inference network `model`; a model of
        another architecture or class count is a ConfigError naming the checkpoint and what it
        was trained as (`trained_as`, e.g. "unet / resnet18 with 5 classes")."""
        if branch not in BRANCHES:
            raise ConfigError(f"branch={branch!r}; use one of {', '.join(BRANCHES)}")
        if branch not in self.weights:
            raise ConfigError(
                f"{self.path} holds no {branch} weights (no '{BRANCHES[branch]}*' keys; it has "
                f"{', '.join(self.weights) or 'none'}). A teacher exists only in teacher–student runs; "
                f"use branch={next(iter(self.weights), 'student')}."
            )
        load_checked(
            model, self.weights[branch], self.path, f"{branch} model",
            f"The checkpoint was trained as {trained_as or 'another network'}: drop the model.* / "
            "data.num_classes overrides, or pass the checkpoint of the architecture you want.",
        )


def load_run_checkpoint(path: str | Path) -> RunCheckpoint:
    """Read a segcon checkpoint (file or run directory, see `find_checkpoint`) without unpickling
    code: Lightning .ckpt files with weights_only=True, segcon-export .safetensors files as is."""
    file = find_checkpoint(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = _safetensors_state(file)
        weights = {state.get("branch", "student"): load_file(str(file))}
    else:
        ckpt = _load_lazily(file)
        state = dict(ckpt.get("segcon") or {})
        sd = ckpt.get("state_dict")
        if not isinstance(sd, dict):
            raise ConfigError(f"{file} has no state_dict: it is not a Lightning checkpoint")
        weights = {}
        for branch, prefix in BRANCHES.items():
            own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if own:
                weights[branch] = own
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in config or "data" not in config:
        raise ConfigError(
            f"{file} carries no segcon run config (checkpoint['segcon']['config']): it was not "
            "written by segcon-train, so the model cannot be rebuilt from it."
        )
    check_stored_config(config, str(file))
    return RunCheckpoint(file, config, weights, state)
