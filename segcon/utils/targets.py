"""The one gate between a config and the objects it names: which `_target_`s segcon builds.

A config names classes by `_target_`, and Hydra's `instantiate` imports and calls whatever it
names. Configs also come from files a user did not write (a checkpoint's stored run config, a
.safetensors file's metadata, a study's stored pruner, a W&B sweep's arguments), so segcon builds
only what is allowed here, wherever the config came from:

- `SEGCON_TARGETS`: segcon's own classes (and the one function) its configs and code name;
- `LIBRARY_TARGETS`: the Lightning and Optuna classes its presets name, and their neighbours a
  user sets in the same place (other loggers, callbacks, profilers, samplers, pruners);
- `MOVED_TARGETS`: names earlier segcon versions stored in checkpoints, for classes since moved;
- the user's own, from the environment variable `SEGCON_TRUSTED_TARGETS` (comma-separated):
  `mypkg.models.MyNet` allows that name; `mypkg.` (ending in a dot) allows every class or
  function defined in a module of the package `mypkg` (by the module that defines it: a name
  re-exported from elsewhere, such as `mypkg.os.system`, is not allowed). The environment is the
  user's, not a file's: a stored config cannot widen the list.

Everything else is refused before anything is imported or called, with one ConfigError naming
the key. `instantiate`, `locate` and `check_targets` are the only ways segcon turns config
values into objects (a test holds the package to it).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from hydra.utils import get_object
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from segcon.utils.errors import ConfigError

ENV_VAR = "SEGCON_TRUSTED_TARGETS"

SEGCON_TARGETS = frozenset({
    # data: the datamodule, the on-disk formats, the synthetic dataset's prepare step
    "segcon.data.datamodule.SegDataModule",
    "segcon.data.ade20k.ADE20K", "segcon.data.camvid.CamVid", "segcon.data.cityscapes.Cityscapes",
    "segcon.data.coco_stuff.COCOStuff", "segcon.data.folder.FolderDataset",
    "segcon.data.pascal_context.PascalContext", "segcon.data.voc.VOC", "segcon.data.voc.VOCAug",
    "segcon.data.synthetic.ensure_synthetic",
    # model families
    "segcon.models.segnet.SegNet", "segcon.models.maskformer.MaskFormer", "segcon.models.dpt.DPTDinoV2",
    # supervised losses, contrastive and region terms, samplers
    "segcon.objectives.supervised.CrossEntropyLoss", "segcon.objectives.supervised.DiceLoss",
    "segcon.objectives.supervised.FocalLoss", "segcon.objectives.supervised.OhemCrossEntropyLoss",
    "segcon.objectives.imbalance.ImbalanceLoss", "segcon.objectives.set_loss.SetCriterion",
    "segcon.objectives.contrast.PixelContrastLoss", "segcon.objectives.contrast.PixelMemoryContrastLoss",
    "segcon.objectives.cac.ConfidenceAwareContrastLoss", "segcon.objectives.cac.WeightBranchLoss",
    "segcon.objectives.contextrast.ContextrastLoss", "segcon.objectives.confidence.ConfidenceContrastLoss",
    "segcon.objectives.region.RegionConsistencyContrast",
    "segcon.objectives.samplers.RandomSampler", "segcon.objectives.samplers.HardEasySampler",
    "segcon.objectives.samplers.MarginalSampler", "segcon.objectives.samplers.ViewsSampler",
    # methods and callbacks
    "segcon.methods.supervised.SupervisedModule", "segcon.methods.mean_teacher.MeanTeacher",
    "segcon.methods.fixmatch.FixMatch", "segcon.methods.unimatch.UniMatch", "segcon.methods.unimatch_v2.UniMatchV2",
    "segcon.engine.callbacks.ModelCheckpoint", "segcon.engine.callbacks.StepProgressBar",
})
"""segcon's own buildable classes: every one that a config in conf/ or segcon's code names."""

MOVED_TARGETS = {
    **{f"segcon.methods.teacher_student.{name}": f"segcon.methods.{module}.{name}"
       for module, name in (("mean_teacher", "MeanTeacher"), ("fixmatch", "FixMatch"), ("unimatch", "UniMatch"))},
    **{f"segcon.methods.callbacks.{name}": f"segcon.engine.callbacks.{name}"
       for name in ("ModelCheckpoint", "StepProgressBar")},
}
"""Names the run configs of earlier segcon versions store -> where the class is now (the methods
before 2026-12-01; the callbacks before segcon.engine, 2026-12-07)."""

_LIGHTNING = "lightning.pytorch"
LIBRARY_TARGETS = frozenset({
    f"{_LIGHTNING}.Trainer",
    f"{_LIGHTNING}.callbacks.ModelCheckpoint",
    *(f"{_LIGHTNING}.loggers.{n}" for n in ("WandbLogger", "CSVLogger", "TensorBoardLogger")),
    *(f"{_LIGHTNING}.callbacks.{n}" for n in (
        "RichProgressBar", "TQDMProgressBar", "RichModelSummary", "ModelSummary", "LearningRateMonitor",
        "EarlyStopping", "StochasticWeightAveraging", "DeviceStatsMonitor", "Timer")),
    *(f"{_LIGHTNING}.profilers.{n}" for n in ("SimpleProfiler", "AdvancedProfiler", "PyTorchProfiler")),
    f"{_LIGHTNING}.strategies.DDPStrategy",
    *(f"optuna.samplers.{n}" for n in (
        "TPESampler", "RandomSampler", "CmaEsSampler", "GPSampler", "NSGAIISampler", "QMCSampler")),
    *(f"optuna.pruners.{n}" for n in (
        "MedianPruner", "NopPruner", "PercentilePruner", "SuccessiveHalvingPruner", "HyperbandPruner",
        "ThresholdPruner", "PatientPruner", "WilcoxonPruner")),
})
"""Library classes a config may name: those the presets use, and their kind's usual neighbours."""


def _user_entries() -> list[str]:
    return [e.strip() for e in os.environ.get(ENV_VAR, "").split(",") if e.strip()]


def _defined_under(target: str, package: str) -> bool:
    """Whether `target` names a class or function defined (not re-exported) in a module whose
    name starts with `package` (which ends in a dot)."""
    if not target.startswith(package):
        return False
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name, None)
        return (callable(obj) and getattr(obj, "__module__", None) == module_name
                and getattr(obj, "__qualname__", None) == ".".join(parts[cut:])
                and f"{module_name}.".startswith(package))
    return False


def is_allowed(target: Any) -> bool:
    """Whether segcon builds `target` (a `_target_` value)."""
    if not isinstance(target, str):
        return False
    if target in SEGCON_TARGETS or target in LIBRARY_TARGETS or target in MOVED_TARGETS:
        return True
    entries = _user_entries()
    return target in entries or any(e.endswith(".") and _defined_under(target, e) for e in entries)


def _refusal(key: str, target: Any, source: str | None) -> ConfigError:
    where = f"{source}: its stored config sets" if source else "the config sets"
    origin = (" A config read from a file names only what segcon builds: this file was not written by "
              "segcon, or was changed since; do not use it." if source else
              f" To build a class of your own, name it in the environment variable {ENV_VAR} (e.g. "
              f"{ENV_VAR}=mypkg.models.MyNet, or mypkg. for every class defined in package mypkg).")
    return ConfigError(f"{where} {key}={target!r}, which is not a class segcon builds (segcon's own classes, the "
                       f"Lightning and Optuna classes in segcon.utils.targets, and {ENV_VAR}).{origin}")


def check_targets(node: Any, key: str, source: str | None = None) -> None:
    """Raise one ConfigError naming the first `<key>.<path>._target_` in `node` (a config, at any
    depth, in dicts and lists) that is not allowed; `source` names the file it was read from."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, Mapping):
        if "_target_" in node and not is_allowed(node["_target_"]):
            raise _refusal(f"{key}._target_" if key else "_target_", node["_target_"], source)
        for name, value in node.items():
            check_targets(value, f"{key}.{name}" if key else str(name), source)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            check_targets(value, f"{key}[{i}]", source)


def check_stored_config(config: Mapping[str, Any], source: str) -> None:
    """Check a run config read from a file (a checkpoint, a .safetensors file's metadata) before
    anything uses it: every `_target_` allowed, and no `${...}` interpolation (segcon stores
    resolved configs; a resolver such as `oc.env` would read the machine's environment)."""
    check_targets(config, "", source)
    _check_no_interpolation(config, "", source)


def _check_no_interpolation(node: Any, key: str, source: str) -> None:
    if isinstance(node, str) and "${" in node:
        raise ConfigError(f"{source}: its stored config sets {key}={node!r}, an interpolation; segcon stores resolved "
                          "configs, so this file was not written by segcon, or was changed since; do not use it.")
    items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
    for name, value in items:
        _check_no_interpolation(value, f"{key}.{name}" if key else str(name), source)


def locate(target: Any, key: str) -> Any:
    """The class (or function) `target` names, if it is allowed; `key` names where it was set
    (e.g. `model._target_`) in the error."""
    if not is_allowed(target):
        raise _refusal(key, target, None)
    try:
        return get_object(MOVED_TARGETS.get(target, target))
    except Exception as err:  # Hydra wraps import errors of every kind
        raise ConfigError(f"{key}={target} cannot be imported: {err}") from None


def instantiate(spec: Any, key: str, **kwargs: Any) -> Any:
    """Hydra's `instantiate(spec, **kwargs)` once every `_target_` in `spec` (and in `kwargs`) is
    allowed; `key` names `spec` (e.g. `model`, `logger.wandb`) in the error."""
    check_targets(spec, key)
    check_targets({k: v for k, v in kwargs.items() if isinstance(v, Mapping | DictConfig | list)}, key)
    return hydra_instantiate(current_names(spec), **kwargs)


def current_names(spec: Any) -> Any:
    """`spec` with every `_target_` of `MOVED_TARGETS` replaced by the class's name now (a copy
    where one is replaced, `spec` itself otherwise)."""
    if isinstance(spec, DictConfig | ListConfig):  # resolved (against its root) only when a name changes
        plain = OmegaConf.to_container(spec, resolve=False)
        return spec if current_names(plain) is plain else current_names(OmegaConf.to_container(spec, resolve=True))
    if isinstance(spec, Mapping):
        items = {k: MOVED_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else current_names(v)
                 for k, v in spec.items()}
        return spec if all(items[k] is v for k, v in spec.items()) else items
    if isinstance(spec, list):
        items = [current_names(v) for v in spec]
        return spec if all(a is b for a, b in zip(items, spec, strict=True)) else items
    return spec
