"""Building the pieces of a run from a composed, validated config: the datamodule, the network,
the objective and the LightningModule. Shared by segcon-train, segcon-eval and the benchmark."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from segcon.engine.evaluation import EvaluationModule
from segcon.models.base import SegModel
from segcon.objectives.objective import Objective, build_objective
from segcon.utils.errors import ConfigError
from segcon.utils.targets import instantiate, locate

DEFAULT_DATAMODULE = "segcon.data.datamodule.SegDataModule"
"""The datamodule of run configs written before `data.datamodule` existed."""


def plain(node: Any) -> Any:
    """A config node as plain containers (resolved), None as None."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build_datamodule(cfg: DictConfig, unlabeled: bool | None = None) -> L.LightningDataModule:
    """The datamodule `data.datamodule._target_` names, given every `data` key its constructor
    takes (by name), the run's seed, and whether to serve the unlabeled stream (default: when
    the method uses it)."""
    data = plain(cfg.data)
    target = (data.get("datamodule") or {}).get("_target_", DEFAULT_DATAMODULE)
    cls = locate(target, "data.datamodule._target_")
    if unlabeled is None:
        unlabeled = bool(getattr(locate(cfg.method._target_, "method._target_"), "uses_unlabeled", False))
    accepted = _init_parameters(cls)
    kwargs = {k: v for k, v in data.items() if k in accepted}
    kwargs.update(root=str(Path(str(data["root"])).expanduser()), seed=cfg.seed, unlabeled=unlabeled)
    return cls(**kwargs)


def _init_parameters(cls: type) -> set[str]:
    """The keyword arguments `cls(...)` takes: its `__init__`'s, and its bases' as long as each
    passes `**kwargs` on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def build_model(cfg: DictConfig) -> SegModel:
    """The network of `cfg.model` (any SegModel family)."""
    net = instantiate(cfg.model, "model")
    if not isinstance(net, SegModel):
        raise ConfigError(f"model._target_={cfg.model._target_} builds a {type(net).__name__}, not a "
                          "segcon.models.base.SegModel (the model contract)")
    return net


def _data_kwargs(cfg: DictConfig) -> dict[str, Any]:
    d = cfg.data
    return {
        "num_classes": d.num_classes,
        "ignore_index": d.ignore_index,
        "class_names": list(d.class_names),
        "palette": plain(d.palette),
        "mean": list(d.mean),
        "std": list(d.std),
        "run_config": plain(cfg),
        "inference": plain(d.get("eval")),
        "detailed_metrics": bool(d.get("detailed_metrics", False)),
    }


def build_objective_of(cfg: DictConfig) -> Objective:
    """The Objective of the `loss`, `contrast` and `pseudo_loss` groups."""
    settings = {"num_classes": int(cfg.data.num_classes), "ignore_index": int(cfg.data.ignore_index)}
    return build_objective(plain(cfg.get("loss")), plain(cfg.get("contrast")), plain(cfg.get("pseudo_loss")),
                           plain(cfg.model.get("side_weights")), settings)


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The method's LightningModule with its network and objective."""
    method = plain(cfg.method)
    # Called directly, not through instantiate: run_config holds _target_ nodes of its own.
    method_cls = locate(method.pop("_target_"), "method._target_")
    objective = build_objective_of(cfg)
    if objective.reads_teacher and not getattr(method_cls, "uses_unlabeled", False):
        readers = [name for name, t in objective.terms() if t.reads_teacher]
        raise ConfigError(f"the term(s) {readers} read the teacher's output, but method={cfg.method._target_} has no "
                          "teacher: use a teacher-student method (method=confidence_ssl for contrast=confidence, "
                          "method=rc2l for contrast=rc2l)")
    return method_cls(net=build_model(cfg), objective=objective, optim=plain(cfg.optim),
                      divergence=plain(cfg.get("divergence")), memory_estimate=bool(cfg.get("memory_estimate", True)),
                      **_data_kwargs(cfg), **method)


def build_evaluator(cfg: DictConfig, net: SegModel) -> EvaluationModule:
    """A module that only evaluates `net` (segcon-eval): validation and test as in training,
    whatever method trained it."""
    return EvaluationModule(net=net, num_overlays=int(cfg.method.get("num_overlays", 4)), **_data_kwargs(cfg))


def instantiate_all(group: DictConfig | None, key: str) -> list[Any]:
    """Instantiate every entry of the group `key` that has a `_target_` (null entries are
    switched off)."""
    return [instantiate(spec, f"{key}.{name}") for name, spec in (group or {}).items()
            if spec is not None and "_target_" in spec]
