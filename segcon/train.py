"""segcon-train: compose the config, validate it, train, then evaluate the chosen checkpoint.

    segcon-train                                   # synthetic data, Unet-R18, CPU or GPU
    segcon-train data=cityscapes data.root=/data/cityscapes model=deeplabv3plus_r50 trainer=ddp
    segcon-train seed=1,2,3 optim.lr=1e-3,3e-4 -m  # multirun: one run dir per job
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from segcon.build import build_datamodule, build_module, instantiate_all
from segcon.config import config_dir, fill_data_defaults, prepare_data, validate_cfg
from segcon.engine.callbacks import FinalReport, ModelCheckpoint, ResumeState, StopTogether
from segcon.engine.optim import global_batch
from segcon.overrides import check_value_types
from segcon.resume import resume_checkpoint
from segcon.search import trial_reporter
from segcon.utils.checkpoint import AtomicCheckpointIO, read_progress, read_segcon_state
from segcon.utils.cli import USER_ERROR, hydra_error_line
from segcon.utils.errors import find_user_error
from segcon.utils.loggers import finish_wandb, set_run_config, wandb_group
from segcon.utils.rich_config import print_config_tree
from segcon.utils.signals import StopNow, StopRequest, stop_signals
from segcon.utils.targets import instantiate

log = logging.getLogger(__name__)

INTERRUPTED_STATUSES = (130, 143)
"""The exit statuses of a run stopped from outside (128 + SIGINT, 128 + SIGTERM: the shell's
convention): the run is unfinished, not failed; running it again with ckpt_path resumes it."""


class Interrupted(RuntimeError):
    """A run stopped by a signal (see segcon.utils.signals); `status` is its exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _resume_loggers(cfg: DictConfig) -> None:
    """When resuming from a checkpoint: continue its W&B run (id stored in the checkpoint), and
    keep a CSV log already in the run directory (resuming in place): the resumed part is written
    next to it, to `csv/resumed-step<N>/metrics.csv`."""
    if not cfg.get("ckpt_path") or not cfg.get("logger"):
        return
    wandb, csv = cfg.logger.get("wandb"), cfg.logger.get("csv")
    if wandb is not None:
        run_id = read_segcon_state(cfg.ckpt_path).get("wandb_run_id")
        if isinstance(run_id, str) and run_id and not wandb.get("id"):
            with open_dict(cfg):
                wandb.id = run_id
                wandb.resume = "allow"
    existing = csv is not None and (Path(csv.save_dir) / str(csv.get("name") or "") / "metrics.csv").is_file()
    if existing and not csv.get("version"):
        with open_dict(cfg):
            csv.version = f"resumed-step{read_progress(cfg.ckpt_path)[0]}"


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


def _interrupted(trainer: L.Trainer, request: StopRequest, at_once: bool = False) -> Interrupted:
    """What a stopped fit left: the step and file of its newest checkpoint, and how to resume."""
    cb = trainer.checkpoint_callback
    last = cb.final_path() if isinstance(cb, ModelCheckpoint) else None
    what = ("stopped at once by a second interrupt (Ctrl-C)" if at_once else
            "interrupted by Ctrl-C (SIGINT)" if request.status == 130 else
            "interrupted by a termination signal (SIGTERM or interrupt.signals)")
    if last is None:
        where = "no checkpoint was written (callbacks.model_checkpoint is off)"
    elif not last.is_file():
        where = f"no checkpoint had been written yet (nothing to resume: {last} does not exist)"
    else:
        where = (f"the {'newest checkpoint, ' if at_once else ''}state of step {read_progress(last)[0]} is in {last}; "
                 f"resume with ckpt_path={last}")
    return Interrupted(f"{what}: {where}", request.status)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job described by `cfg`; return the final evaluation metrics.

    Any W&B run it opened is closed when it returns or fails, so the next job (a multirun, a
    sweep, a notebook cell) starts a fresh one.
    """
    try:
        with stop_signals(list((cfg.get("interrupt") or {}).get("signals") or [])) as request:
            metrics = _train(cfg, request)
    except BaseException:
        finish_wandb(1)
        raise
    finish_wandb(0)
    return metrics


def _train(cfg: DictConfig, request: StopRequest) -> dict[str, float]:
    start = time.time()
    out_dir = Path(cfg.paths.output_dir)
    prepare_data(cfg)
    fill_data_defaults(cfg)
    print_config_tree(cfg, out_dir)
    validate_cfg(cfg)
    if cfg.train and cfg.get("ckpt_path"):
        with open_dict(cfg):
            cfg.ckpt_path = resume_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True)
    _resume_loggers(cfg)

    datamodule = build_datamodule(cfg)
    module = build_module(cfg)
    callbacks = [*instantiate_all(cfg.get("callbacks"), "callbacks"), ResumeState(), StopTogether(), FinalReport(out_dir, cfg.eval_ckpt, start)]
    reporter = trial_reporter(cfg)
    if reporter is not None:
        callbacks.append(reporter)
    loggers = instantiate_all(cfg.get("logger"), "logger")
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=bool((cfg.get("slurm") or {}).get("auto_requeue", False))))
    trainer: L.Trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins)
    set_run_config(loggers, OmegaConf.to_container(cfg, resolve=True))
    accumulate = trainer.accumulate_grad_batches
    rank_zero_info(f"global batch = {cfg.data.batch_size} per device x {trainer.world_size} device(s)"
                   + (f" x {accumulate} accumulated batches" if accumulate > 1 else "")
                   + f" = {global_batch(cfg.data.batch_size, trainer)}")

    if cfg.train:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        except SIGTERMException:
            raise _interrupted(trainer, request) from None
        except StopNow:
            raise _interrupted(trainer, request, at_once=True) from None
        if getattr(trainer._signal_connector, "requested", False):  # a signal in the last step: it is in last.ckpt
            raise _interrupted(trainer, request)
        if reporter is not None and reporter.pruned:
            rank_zero_info(f"search trial {cfg.search.trial} pruned at step {trainer.global_step}: not evaluated again")
            return {}
    ckpt = _eval_checkpoint(trainer, cfg)
    metrics: dict[str, float] = {}
    try:
        for result in trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
            metrics.update(result)
        if cfg.data.splits.get("test"):
            for result in trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
                metrics.update(result)
    except (SIGTERMException, StopNow):  # SIGTERMException: a SystemExit without a status, which would exit 0
        raise Interrupted(f"interrupted during the final evaluation of {ckpt or 'the in-memory weights'}: "
                          "evaluate it with segcon-eval", request.status) from None
    return metrics


def _check_command_line(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """The types of the values set on the command line (segcon.overrides), against the config of
    the same config groups without them."""
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    groups = set(hydra_cfg.runtime.choices)
    selections = [o.input_line for o in parsed if o.get_key_element().lstrip("+~") in groups]
    values = [(o.input_line, o.get_key_element().lstrip("+~")) for o in parsed
              if o.input_line not in selections and not o.is_delete() and not o.get_key_element().startswith("hydra")]
    try:
        reference = compose(hydra_cfg.job.config_name, overrides=selections)
    except (ValueError, HydraException):  # no Hydra app in this process (e.g. a submitit job): annotations only
        reference = None
    check_value_types(cfg, values, reference)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns `cfg.optimized_metric` for hyper-parameter sweepers."""
    hydra_cfg = HydraConfig.get()
    with open_dict(cfg):
        cfg.paths.output_dir = hydra_cfg.runtime.output_dir
        wandb = (cfg.get("logger") or {}).get("wandb")
        if wandb is not None and wandb.get("group") is None:
            multirun = hydra_cfg.mode == RunMode.MULTIRUN
            wandb.group = wandb_group(os.environ.get("WANDB_SWEEP_ID"), hydra_cfg.sweep.dir if multirun else None,
                                      cfg.paths.get("log_dir"), cfg.data.name)
    # Resolve once, here: spawned DDP workers have no Hydra context to resolve ${hydra:...} in.
    OmegaConf.resolve(cfg)
    try:
        _check_command_line(cfg, hydra_cfg)
        metrics = train(cfg)
    except Interrupted as exc:
        log.error(str(exc))
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.status) from None
    except (KeyboardInterrupt, StopNow):  # Ctrl-C before or after the fit: nothing to save
        print("error: interrupted by Ctrl-C (SIGINT) before training began or after it ended", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:
        err = find_user_error(exc)
        if err is None:
            raise
        log.error(str(err))
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR) from None
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def cli() -> None:
    """Console entry point (`segcon-train`): Hydra's own errors (an unknown key or config group
    option, a malformed override, a missing value) end as every segcon user error does, in one
    `error:` line and exit status 2. With HYDRA_FULL_ERROR=1 set, Hydra reports as it does."""
    previous = os.environ.get("HYDRA_FULL_ERROR")
    if previous == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors instead of printing them
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        raise SystemExit(USER_ERROR) from None
    finally:
        if previous is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


if __name__ == "__main__":
    cli()
