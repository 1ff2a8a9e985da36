"""Loading weights from local files, safely (no arbitrary unpickling) and with clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcon.utils.errors import ConfigError


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load` with weights_only=True: tensors and plain containers only. A file holding
    other pickled objects is refused (its code never runs) with a ConfigError naming it; so is a
    missing or unreadable file. `mmap` leaves tensors on disk until used (zipfile format only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain "
            f"containers ({first}). segcon reads torch files with weights_only=True and never "
            "runs code from a file; load it only if you trust it, and re-save its state_dict "
            "(torch.save(model.state_dict(), f)) or a .safetensors file."
        ) from None
    except (RuntimeError, OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file (see `safe_torch_load`)."""
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found (key model.weights_path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, fix: str) -> None:
    """`module.load_state_dict(state, strict=True)`, or one ConfigError naming `path`, examples of
    missing / unexpected / other-shaped keys, and `fix`."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & state.keys()
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})")
        raise ConfigError(f"weights in {path} do not fit the {what}: {'; '.join(parts)}. {fix}")
    module.load_state_dict(state, strict=True)
