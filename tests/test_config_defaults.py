"""One source for each default: where a config file sets a key that the class it builds also
defaults, the two agree, unless the option departs from the class on purpose (listed below with
why). A changed constructor default that the configs silently override, or a config value that
drifts from the class, fails here."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]

DELIBERATE = {
    ("ModelCheckpoint", "last_every_minutes"): "the class writes last.ckpt only at the end; segcon's runs also every 30 min",
    ("ConfidenceContrastLoss", "bank_size"): "U²PL's 30,000 entries in the class; CPU-sized runs keep 5,000",
    ("PixelMemoryContrastLoss", "memory_size"): "ContrastiveSeg's 5,000 in the class; CPU-sized runs keep 1,000",
    ("MeanTeacher", "confidence"): "the filter's threshold comes from data.pseudo_label_threshold",
    ("SegNet", "side_weights"): "the fusion options weigh every side output",
    ("SegNet", "weights_path"): "the *_imagenet options load their packaged weights",
    ("SegNet", "weights_scope"): "the *_imagenet options load their packaged weights",
    ("SegNet", "weights_match"): "the *_imagenet options load their packaged weights",
    ("SegNet", "weights_skip"): "the *_imagenet options load their packaged weights",
    ("SegNet", "input_norm"): "the *_imagenet options' weights expect [-1, 1] inputs",
}


def _same(value: Any, default: Any) -> bool:
    if isinstance(default, tuple):
        default = list(default)
    return value == default or (default is None and value in ({}, []))


def _settings(node: Any, where: str) -> Iterator[tuple[str, str, str, Any, Any]]:
    """(file, class, key, config value, constructor default) of every key a config node sets
    whose constructor parameter has a default, through nested nodes and lists."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if isinstance(target, str) and target.startswith("segcon."):
            obj = get_object(target)
            params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
            for key, value in node.items():
                param = params.get(key)
                if param is None or param.default is inspect.Parameter.empty:
                    continue
                if isinstance(value, str) and "${" in value:  # an interpolation: another key's value
                    continue
                yield where, obj.__name__, key, value, param.default
        for value in node.values():
            yield from _settings(value, where)
    elif isinstance(node, list):
        for value in node:
            yield from _settings(value, where)


def _all_settings() -> list[tuple[str, str, str, Any, Any]]:
    found = []
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        found.extend(_settings(node, str(path.relative_to(REPO))))
    return found


def test_config_values_agree_with_the_constructors_defaults_or_are_listed() -> None:
    settings = _all_settings()
    assert len(settings) > 150  # the walk reaches the option files' keys
    drifted = [(f, c, k, v, d) for f, c, k, v, d in settings if not _same(v, d) and (c, k) not in DELIBERATE]
    assert not drifted, "config values that differ from the class's default (align them, or list why): " + \
        "; ".join(f"{f}: {c}.{k} = {v!r}, default {d!r}" for f, c, k, v, d in drifted)
    departed = {(c, k) for _, c, k, v, d in settings if not _same(v, d)}
    assert set(DELIBERATE) <= departed, f"listed but no longer different: {sorted(set(DELIBERATE) - departed)}"
