"""What segcon-eval, segcon-predict and segcon-export share: composing a command's own entry
config, rebuilding the run config stored in a checkpoint with command-line overrides on top,
the inference network with the checkpoint's weights, and turning user errors into one line.

Command-line overrides are routed by their first key: keys of the command's entry config
(`conf/<command>.yaml`: ckpt, split, eval, trainer, logger, ...) and Hydra's own settings
(`hydra.*`, `hydra/<group>=...`) compose that config with Hydra; every other key
(`data.root=...`, `data.val_batch_size=4`, `model.arch=...`) changes the run config stored in the
checkpoint, which must already have that key (`+key=value` adds one). `hydra.run.dir=<dir>` is
where a command writes when it has no own output setting for it (segcon-eval's `out_dir`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from segcon.build import build_model
from segcon.config import config_dir
from segcon.models.base import SegModel
from segcon.overrides import check_value_type
from segcon.utils.checkpoint import RunCheckpoint
from segcon.utils.cli import hydra_error_line
from segcon.utils.errors import ConfigError
from segcon.utils.targets import locate


def compose_entry(config_name: str, argv: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """(the command's entry config composed with its overrides, the overrides for the run config)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(argv))
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=config_name):
            own_keys = set(compose(config_name)) | {"hydra"}
            own = [o.input_line for o in parsed if _root_key(o.get_key_element()) in own_keys]
            entry = compose(config_name, overrides=own, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"bad command line for segcon-{config_name}: {hydra_error_line(err)}") from None
    run_dir = next((o.value() for o in parsed if o.get_key_element().lstrip("+") == "hydra.run.dir"), None)
    with open_dict(entry):
        del entry["hydra"]
        if run_dir is not None and "out_dir" in entry and entry.out_dir is None:
            entry.out_dir = str(run_dir)
    return entry, [o.input_line for o in parsed if o.input_line not in own]


def _root_key(key: str) -> str:
    """The top-level config key an override's key element addresses (`hydra/job_logging` and
    `hydra.run.dir` -> `hydra`)."""
    return key.lstrip("+~").split(".")[0].split("/")[0]


def required(entry: DictConfig, key: str, example: str) -> Any:
    """`entry[key]`, or a ConfigError asking for `key=<example>` when it is missing or null."""
    if OmegaConf.is_missing(entry, key) or entry.get(key) is None:
        raise ConfigError(f"{key}= is required, e.g. {key}={example}")
    return entry[key]


def _apply(cfg: DictConfig, override: str, source: str) -> None:
    (o,) = OverridesParser.create().parse_overrides([override])
    key = o.get_key_element().lstrip("+~")
    if o.is_sweep_override() or o.is_force_add():
        raise ConfigError(f"{override}: sweeps and ++ overrides are not supported here")
    if o.is_delete():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf not in node:
            raise ConfigError(f"{override}: {key} is not a key of the run config stored in {source}")
        with open_dict(node):
            del node[leaf]
        return
    value = o.value()
    current = OmegaConf.select(cfg, key, default=None)
    before = OmegaConf.to_container(current) if OmegaConf.is_config(current) else current
    if isinstance(current, DictConfig) and isinstance(value, str):
        raise ConfigError(
            f"{override} selects a config group, but the {key} config comes from the checkpoint "
            f"({source}). Override its keys instead, e.g. {key}.<key>=<value>."
        )
    try:
        if o.is_add():
            with open_dict(cfg):
                OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        else:
            OmegaConf.update(cfg, key, value, merge=True)
    except OmegaConfBaseException:
        raise ConfigError(
            f"{override}: {key} is not a key of the run config stored in {source} (keys: "
            f"{', '.join(sorted(cfg))}, ...); check the spelling, or add it with +{key}=..."
        ) from None
    check_value_type(cfg, override, key, before)


def rebuild_config(
    ckpt: RunCheckpoint, entry: DictConfig, run_overrides: Sequence[str], own_groups: Sequence[str] = ()
) -> DictConfig:
    """The run config stored in `ckpt`, with `run_overrides` applied, the entry's `own_groups`
    (e.g. trainer, logger, paths) in place of the run's, and the entry's non-null `eval.*` keys
    over `data.eval`. Model weights come from the checkpoint, so the rebuilt model reads no
    pretrained-weight file and downloads nothing (the model family's `offline_config`; for smp
    models `model.weights_path` and `model.encoder_weights` are cleared)."""
    cfg = OmegaConf.create(ckpt.config)
    OmegaConf.set_struct(cfg, True)
    for override in run_overrides:
        _apply(cfg, override, str(ckpt.path))
    trained = ckpt.config.get("data", {}).get("num_classes")
    if cfg.data.get("num_classes") != trained:
        names = ", ".join(map(str, ckpt.config["data"].get("class_names") or []))
        raise ConfigError(
            f"data.num_classes={cfg.data.get('num_classes')}: {ckpt.path} was trained with {trained} classes "
            f"({names}); its classifier has {trained} outputs. Drop the data.num_classes override (another class set "
            "needs a model trained on it)."
        )
    with open_dict(cfg):
        for key in own_groups:
            cfg[key] = entry[key]
        if cfg.data.get("eval") is None:  # checkpoints from before data.eval existed
            cfg.data.eval = {}
        for key, value in (entry.get("eval") or {}).items():
            if value is not None:
                cfg.data.eval[key] = value
        model = OmegaConf.to_container(cfg.model, resolve=True)
        cfg.model = _model_class(cfg.model._target_).offline_config(model)
    return cfg


def _model_class(target: str) -> type[SegModel]:
    cls = locate(target, "model._target_")
    if not (isinstance(cls, type) and issubclass(cls, SegModel)):
        raise ConfigError(f"model._target_={target} is not a segcon.models.base.SegModel (the model contract)")
    return cls


def build_inference_net(cfg: DictConfig, ckpt: RunCheckpoint, branch: str) -> SegModel:
    """The network of `cfg.model` in eval mode, its inference network holding the checkpoint's
    `branch` weights (train-only heads are built but keep their initial weights: eval mode and
    export never use them)."""
    net = build_model(cfg)
    trained = ckpt.config.get("model", {})
    trained_as = (f"{_model_class(trained.get('_target_', cfg.model._target_)).describe(trained)} with "
                  f"{ckpt.config.get('data', {}).get('num_classes')} classes")
    ckpt.load_into(net.model, branch, trained_as)
    return net.eval()
