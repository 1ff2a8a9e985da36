"""Resuming a training run: which checkpoint `ckpt_path` names, and whether it belongs to this
config.

    segcon-train ... ckpt_path=last hydra.run.dir=<run dir>   # resume in place (newest checkpoint)
    segcon-train ... ckpt_path=<run dir>                      # its newest checkpoint, new run dir
    segcon-train ... ckpt_path=<file.ckpt>
    segcon-train ... ckpt_path=auto hydra.run.dir=<run dir>   # resume if it has one, else start
                                                              # (a requeued cluster job)

A checkpoint trained with other model or data settings than the config is refused, naming the
keys that differ; `resume_force=[key, ...]` (a key or a whole group, e.g. `data`) accepts them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from segcon.utils.checkpoint import read_progress, read_segcon_state
from segcon.utils.errors import ConfigError
from segcon.utils.targets import check_stored_config

COMPARED = ("model", "data")
"""The config groups a resumed run must share with its checkpoint."""

FREE_KEYS = frozenset({
    # where the data is and how it is read: the same images from another disk or machine
    "data.root", "data.num_workers", "data.pin_memory", "data.cache_dir", "data.on_bad_file",
    "data.detailed_metrics", "data.val_batch_size",
    # how the first weights were found: a resumed run takes every weight from the checkpoint
    "model.encoder_weights", "model.weights_path", "model.weights_scope", "model.weights_match",
    "model.weights_skip", "model.weights_rename",
})
"""Keys of the compared groups that may differ: they change neither the trained network nor the
data it sees."""


def newest_checkpoint(directory: Path) -> Path:
    """The checkpoint of `directory` (a run dir or its `checkpoints/`) with the most training
    steps (last.ckpt on a tie); files that cannot be read (truncated, not a checkpoint) are
    skipped with a warning."""
    folder = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    found: list[tuple[int, bool, Path]] = []
    for path in sorted(folder.glob("*.ckpt")):
        try:
            step, _ = read_progress(path)
        except Exception as err:  # any unreadable file is passed over, and said so
            rank_zero_warn(f"skipping {path}: it cannot be read as a checkpoint ({type(err).__name__}: {err})")
            continue
        found.append((step, path.name == "last.ckpt", path))
    if not found:
        raise ConfigError(
            f"ckpt_path: no readable checkpoint (*.ckpt) in {folder}. Pass the run directory of the run to resume "
            "(or ckpt_path=last with hydra.run.dir=<that run directory>), or a checkpoint file."
        )
    step, _, path = max(found)
    rank_zero_info(f"resuming from {path} (step {step})")
    return path


def checkpoint_if_any(directory: Path) -> Path | None:
    """`newest_checkpoint(directory)`, or None when it holds no readable checkpoint."""
    try:
        return newest_checkpoint(directory)
    except ConfigError:
        return None


def resolve_checkpoint(ckpt_path: str, output_dir: str | Path) -> Path:
    """The file `ckpt_path` names: `last` (the newest checkpoint of this run's own directory),
    a run directory (its newest checkpoint), or a checkpoint file."""
    if ckpt_path == "last":
        return newest_checkpoint(Path(output_dir))
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        return newest_checkpoint(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file or run directory")
    return path


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}"))
        return out or {prefix: {}}
    return {prefix: node}


def _forced(key: str, force: Iterable[str]) -> bool:
    return any(key == f or key.startswith(f"{f}.") for f in force)


def differing_settings(saved: Mapping[str, Any], current: Mapping[str, Any], force: Iterable[str] = ()) -> list[str]:
    """`key: saved -> current` for each model/data key whose value differs between two resolved
    run configs (plain containers), leaving out FREE_KEYS and the `force`d keys or groups."""
    force = list(force)
    lines = []
    for group in COMPARED:
        old, new = _flat(saved.get(group, {}), group), _flat(current.get(group, {}), group)
        for key in sorted(old.keys() | new.keys()):
            if key in FREE_KEYS or _forced(key, force):
                continue
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                lines.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return lines


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint a training run resumes from (None: a fresh run), checked against `cfg`.
    `auto` is `last` when this run's directory holds a checkpoint, and a fresh start when not."""
    if not cfg.get("ckpt_path"):
        return None
    if cfg.ckpt_path == "auto":
        path = checkpoint_if_any(Path(cfg.paths.output_dir))
        if path is None:
            rank_zero_info(f"ckpt_path=auto: no checkpoint in {cfg.paths.output_dir} yet, starting a fresh run")
            return None
    else:
        path = resolve_checkpoint(str(cfg.ckpt_path), cfg.paths.output_dir)
    saved = read_segcon_state(path).get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} carries no segcon run config: it was not written by segcon-train and cannot be resumed")
    check_stored_config(saved, str(path))
    current = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(current, dict)
    force = list(cfg.get("resume_force") or [])
    lines = differing_settings(saved, current, force)
    if lines:
        keys = ",".join(line.split(":")[0] for line in lines)
        raise ConfigError(
            f"{path} was trained with other settings than this run ({len(lines)} differ, checkpoint -> now): "
            + "; ".join(lines) + ". Resume with the checkpoint's settings (drop those overrides), or accept the "
            f"changes with resume_force=[{keys}] (the resumed run then is not the run the checkpoint began)."
        )
    return str(path)
