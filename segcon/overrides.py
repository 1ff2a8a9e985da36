"""The type a command-line value must have, checked before anything uses it.

Hydra reads `data.batch_size=abc` as the text "abc" and composes it without complaint; the run
then fails deep inside with `invalid literal for int()`, or (`trainer.max_steps=1.5`) does not
fail at all. A value set on the command line must have a type the key takes: the annotation of
the parameter it is passed to (the `_target_` class of the node that holds it: the Trainer for
`trainer.*`, the loss class for `loss.ce.*`, the datamodule for `data.*`, ...), or, where no
annotation says, the type of the value the key has without the override (an integer stays an
integer, a number a number, a boolean a boolean).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from segcon.build import DEFAULT_DATAMODULE
from segcon.utils.errors import ConfigError
from segcon.utils.targets import is_allowed, locate

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "text", list: "a list [...]",
          dict: "a mapping {...}", type(None): "null"}


def _kind(value: Any) -> type:
    if isinstance(value, ListConfig | list | tuple):
        return list
    if isinstance(value, DictConfig | Mapping):
        return dict
    return type(value)


def _types_of(hint: Any) -> set[type] | None:
    """The plain types an annotation admits (None: anything, or not understood)."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return None
    if origin in (typing.Union, types.UnionType):
        parts = [_types_of(a) for a in typing.get_args(hint)]
        return None if any(p is None for p in parts) else set().union(*parts)
    if origin is typing.Literal:
        return {_kind(a) for a in typing.get_args(hint)}
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple, collections.abc.Sequence):
        return {list}
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return {dict}
    if hint is type(None) or hint is None:
        return {type(None)}
    if hint in (bool, int, float, str):
        return {hint}
    return None


def parameter_types(cfg: DictConfig, key: str) -> set[type] | None:
    """The types the parameter `key` (e.g. `trainer.max_steps`) is passed to takes, from its
    class's annotations; None when no annotation says (no class, `**kwargs`, not annotated)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None, throw_on_resolution_failure=False) if parent else None
    if parent == "data" and isinstance(node, DictConfig):
        target = (node.get("datamodule") or {}).get("_target_", DEFAULT_DATAMODULE)
    elif isinstance(node, DictConfig) and "_target_" in node:
        target = node.get("_target_")
    else:
        return None
    if not is_allowed(target):
        return None  # the gate refuses it, naming the key, when the run builds it
    built = locate(target, f"{parent}._target_")
    callables = [vars(k).get("__init__") for k in inspect.getmro(built)] if inspect.isclass(built) else [built]
    for function in filter(None, callables):
        params = inspect.signature(function).parameters
        if leaf in params:
            try:
                hint = typing.get_type_hints(function).get(leaf)
            except Exception:  # an annotation that does not resolve tells nothing
                return None
            return _types_of(hint) if hint is not None else None
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return None
    return None


def type_problem(value: Any, accepted: set[type] | None, reference: Any) -> set[type] | None:
    """The types `value` should have had, or None when it is acceptable: `accepted` (from an
    annotation) if known, else the type of `reference` (the value without the override) for a
    boolean or a number, or null (switching a setting off)."""
    if accepted is None:
        if isinstance(reference, bool):
            accepted = {bool, type(None)}
        elif isinstance(reference, int):
            accepted = {int, type(None)}
        elif isinstance(reference, float):
            accepted = {float, type(None)}
        else:
            return None
    kind = _kind(value)
    ok = kind in accepted or (kind is int and float in accepted) or (kind is tuple and list in accepted)
    return None if ok else accepted


def check_value_types(cfg: DictConfig, overrides: Iterable[tuple[str, str]], reference: DictConfig | None) -> None:
    """One ConfigError for the first `(override text, key)` whose value in `cfg` has a type the
    key does not take (see the module docstring); `reference` is the config without the value
    overrides (None: annotations only)."""
    for key, text in {key: text for text, key in overrides}.items():  # the last override of a key holds
        before = (OmegaConf.select(reference, key, default=None, throw_on_resolution_failure=False)
                  if reference is not None else None)
        check_value_type(cfg, text, key, before)


def check_value_type(cfg: DictConfig, text: str, key: str, before: Any) -> None:
    """A ConfigError naming the override `text` when the value of `key` in `cfg` has a type the
    key does not take; `before` is its value without the override (None if it had none)."""
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    wanted = type_problem(value, parameter_types(cfg, key), before)
    if wanted is not None:
        names = " or ".join(name for t, name in _NAMES.items() if t in wanted)
        scalar = isinstance(before, bool | int | float | str) and _kind(before) in wanted
        example = f" (e.g. {key}={str(before).lower() if isinstance(before, bool) else before})" if scalar else ""
        raise ConfigError(f"{text}: {key} takes {names}, not {value!r}{example}")
