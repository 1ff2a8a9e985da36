"""segcon-train: compose the config, validate it, train, then evaluate the chosen checkpoint.

    segcon-train                                   # synthetic data, Unet-R18, CPU or GPU
    segcon-train data=cityscapes data.root=/data/cityscapes model=deeplabv3plus_r50 trainer=ddp
    segcon-train seed=1,2,3 optim.lr=1e-3,3e-4 -m  # multirun: one run dir per job
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from segcon.config import config_dir, fill_data_defaults, prepare_data, validate_cfg
from segcon.data.datamodule import SegDataModule
from segcon.methods.callbacks import FinalReport, ModelCheckpoint
from segcon.methods.optim import lr_for_batch
from segcon.objectives.objective import build_objective
from segcon.utils.checkpoint import AtomicCheckpointIO, read_segcon_state
from segcon.utils.errors import find_user_error
from segcon.utils.rich_config import print_config_tree

log = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def build_datamodule(cfg: DictConfig) -> SegDataModule:
    """The SegDataModule of `cfg.data` (seeded with `cfg.seed`)."""
    d = cfg.data
    return SegDataModule(
        dataset=_plain(d.dataset),
        root=str(Path(str(d.root)).expanduser()),
        splits=_plain(d.splits),
        num_classes=d.num_classes,
        ignore_index=d.ignore_index,
        mean=list(d.mean),
        std=list(d.std),
        train_transform=_plain(d.get("train_transform")) or [],
        val_transform=_plain(d.get("val_transform")) or [],
        batch_size=d.batch_size,
        val_batch_size=d.val_batch_size,
        num_workers=d.num_workers,
        subset=_plain(d.get("subset")),
        seed=cfg.seed,
        split=d.get("split"),
        labeled_fraction=d.get("labeled_fraction"),
        labeled_count=d.get("labeled_count"),
        split_seed=d.get("split_seed", 0),
        labeled_pool=d.get("labeled_pool"),
        unlabeled=bool(getattr(get_class(cfg.method._target_), "uses_unlabeled", False)),
        weak_transform=_plain(d.get("weak_transform")) or [],
        strong_transform=_plain(d.get("strong_transform")) or [],
        num_strong=d.get("num_strong", 1),
        unlabeled_batch_size=d.get("unlabeled_batch_size"),
    )


def build_module(cfg: DictConfig) -> L.LightningModule:
    """The method's LightningModule with its network and objective."""
    net = instantiate(cfg.model)
    objective = build_objective(_plain(cfg.loss), _plain(cfg.get("contrast")))
    method = _plain(cfg.method)
    # Called directly, not through instantiate: run_config holds _target_ nodes of its own.
    method_cls = get_class(method.pop("_target_"))
    d = cfg.data
    return method_cls(
        net=net,
        objective=objective,
        optim=_plain(cfg.optim),
        num_classes=d.num_classes,
        ignore_index=d.ignore_index,
        class_names=list(d.class_names),
        palette=_plain(d.palette),
        mean=list(d.mean),
        std=list(d.std),
        run_config=_plain(cfg),
        inference=_plain(d.get("eval")),
        **method,
    )


def instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a group that has a `_target_` (null entries are switched off)."""
    return [instantiate(spec) for spec in (group or {}).values() if spec is not None and "_target_" in spec]


def _resume_wandb(cfg: DictConfig) -> None:
    """When resuming from a checkpoint, continue its W&B run (id stored in the checkpoint)."""
    if not cfg.get("ckpt_path") or not cfg.get("logger") or "wandb" not in cfg.logger or cfg.logger.wandb is None:
        return
    run_id = read_segcon_state(cfg.ckpt_path).get("wandb_run_id")
    if run_id and not cfg.logger.wandb.get("id"):
        with open_dict(cfg):
            cfg.logger.wandb.id = run_id
            cfg.logger.wandb.resume = "allow"


def _eval_checkpoint(trainer: L.Trainer, cfg: DictConfig) -> str | None:
    """Path of the checkpoint to evaluate at the end (`eval_ckpt: best|last`)."""
    cb = trainer.checkpoint_callback
    if cfg.train and cb is not None:
        if cfg.eval_ckpt == "best":
            path = cb.best_model_path
        else:
            path = cb.last_model_path or (cb.final_path() if isinstance(cb, ModelCheckpoint) else "")
        if path and Path(path).is_file():
            return str(path)
        rank_zero_warn(f"no {cfg.eval_ckpt} checkpoint was written; evaluating the in-memory weights")
        return None
    return cfg.get("ckpt_path")


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job described by `cfg`; return the final evaluation metrics.

    Any W&B run it opened is closed when it returns or fails, so the next job (a multirun, a
    sweep, a notebook cell) starts a fresh one.
    """
    try:
        metrics = _train(cfg)
    except BaseException:
        finish_wandb(1)
        raise
    finish_wandb(0)
    return metrics


def _train(cfg: DictConfig) -> dict[str, float]:
    start = time.time()
    out_dir = Path(cfg.paths.output_dir)
    prepare_data(cfg)
    fill_data_defaults(cfg)
    print_config_tree(cfg, out_dir)
    validate_cfg(cfg)
    L.seed_everything(cfg.seed, workers=True)
    _resume_wandb(cfg)

    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    callbacks = [*instantiate_all(cfg.get("callbacks")), FinalReport(out_dir, cfg.eval_ckpt, start)]
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    global_batch = cfg.data.batch_size * trainer.world_size
    rank_zero_info(f"global batch = {cfg.data.batch_size} per device x {trainer.world_size} device(s) = {global_batch}")
    lr, note = lr_for_batch(
        float(cfg.optim.lr), cfg.optim.get("base_batch"), global_batch, str(cfg.optim.get("scale_lr", "none"))
    )
    if note:
        (rank_zero_info if lr != cfg.optim.lr else rank_zero_warn)(note)
    module.optim_cfg["lr"] = lr

    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    ckpt = _eval_checkpoint(trainer, cfg)
    metrics: dict[str, float] = {}
    for result in trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
        metrics.update(result)
    if cfg.data.splits.get("test"):
        for result in trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
            metrics.update(result)
    return metrics


def finish_wandb(exit_code: int) -> None:
    """Close any W&B run, so that the next job of a multirun starts a fresh one."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns `cfg.optimized_metric` for hyper-parameter sweepers."""
    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    # Resolve once, here: spawned DDP workers have no Hydra context to resolve ${hydra:...} in.
    OmegaConf.resolve(cfg)
    try:
        metrics = train(cfg)
    except Exception as exc:
        err = find_user_error(exc)
        if err is None:
            raise
        log.error(str(err))
        raise SystemExit(f"error: {err}") from None
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
