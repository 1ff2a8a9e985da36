"""What segcon-eval, segcon-predict and segcon-export share: composing a command's own entry
config, rebuilding the run config stored in a checkpoint with command-line overrides on top,
the inference network with the checkpoint's weights, and turning user errors into one line.

Command-line overrides are routed by their first key: keys of the command's entry config
(`conf/<command>.yaml`: ckpt, split, eval, trainer, logger, ...) compose that config with Hydra;
every other key (`data.root=...`, `data.val_batch_size=4`, `model.arch=...`) changes the run
config stored in the checkpoint, which must already have that key (`+key=value` adds one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from segcon.config import config_dir
from segcon.models.segnet import SegNet
from segcon.utils.checkpoint import RunCheckpoint
from segcon.utils.errors import ConfigError


def compose_entry(config_name: str, argv: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """(the command's entry config composed with its overrides, the overrides for the run config)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(argv))
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=config_name):
            own_keys = set(compose(config_name))
            own = [o.input_line for o in parsed if o.get_key_element().lstrip("+~").split(".")[0] in own_keys]
            entry = compose(config_name, overrides=own)
    except (HydraException, OmegaConfBaseException) as err:
        # One line: Hydra's message without its config search path (options stay listed).
        text = " ".join(line.strip() for line in str(err).split("Config search path")[0].splitlines() if line.strip())
        raise ConfigError(f"bad command line for segcon-{config_name}: {text}") from None
    return entry, [o.input_line for o in parsed if o.input_line not in own]


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


def rebuild_config(
    ckpt: RunCheckpoint, entry: DictConfig, run_overrides: Sequence[str], own_groups: Sequence[str] = ()
) -> DictConfig:
    """The run config stored in `ckpt`, with `run_overrides` applied, the entry's `own_groups`
    (e.g. trainer, logger, paths) in place of the run's, and the entry's non-null `eval.*` keys
    over `data.eval`. Model weights come from the checkpoint, so the rebuilt model reads no
    pretrained-weight file and downloads nothing (`model.weights_path` and
    `model.encoder_weights` are cleared)."""
    cfg = OmegaConf.create(ckpt.config)
    OmegaConf.set_struct(cfg, True)
    for override in run_overrides:
        _apply(cfg, override, str(ckpt.path))
    with open_dict(cfg):
        for key in own_groups:
            cfg[key] = entry[key]
        if cfg.data.get("eval") is None:  # checkpoints from before data.eval existed
            cfg.data.eval = {}
        for key, value in (entry.get("eval") or {}).items():
            if value is not None:
                cfg.data.eval[key] = value
        cfg.model.weights_path = None
        cfg.model.encoder_weights = None
    return cfg


def build_inference_net(cfg: DictConfig, ckpt: RunCheckpoint, branch: str) -> SegNet:
    """The SegNet of `cfg.model` in eval mode, its inference model holding the checkpoint's
    `branch` weights (train-only heads are built but keep their initial weights: eval mode and
    export never use them)."""
    net: SegNet = instantiate(cfg.model)
    ckpt.load_into(net.model, branch)
    return net.eval()
