"""Small file helpers shared by data generation, reports and checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from segcon.utils.errors import ConfigError


def make_output_dir(path: str | Path, key: str) -> Path:
    """Create the folder `path` (set by the config key `key`) with its parents, or raise one
    ConfigError naming the key, the path and what is in the way."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        why = (f"{existing} is a file, not a folder" if existing is not None and not existing.is_dir()
               else f"{err.strerror.lower() if err.strerror else err}" + (f" in {existing}" if existing else ""))
        raise ConfigError(f"{key}={path}: the output folder cannot be created ({why}). Choose a folder you can "
                          f"write, e.g. {key}=./runs/<name>") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`atomic_write_text` of `obj` as indented JSON (NaN written as null)."""
    atomic_write_text(path, json.dumps(_nan_to_none(obj), indent=2) + "\n")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj
