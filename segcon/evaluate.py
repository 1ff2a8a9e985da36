"""segcon-eval: evaluate a trained run's checkpoint on its val or test split.

    segcon-eval ckpt=<checkpoint file or run dir> [split=val|test] [branch=student|teacher]
                [eval.mode=whole|slide|ms_flip] [eval.crop=[h,w]] [eval.stride=[h,w]]
                [eval.scales=[0.75,1.0,1.25]] [eval.flip=true] [eval.chunk=8] [out_dir=<dir>]
                [trainer=gpu] [logger=csv] [data.root=<dir>] [data.<key>=<value> ...]

The data, model and loss come from the config stored in the checkpoint, with data.* (or other
run-config) overrides on top. Prints the inference mode with its forward passes per image and
cost relative to whole, then the per-class IoU table; writes config.yaml, metrics.json,
<split>_per_class.csv, <split>_confusion.png and <split>_iou.png to out_dir (default
<run dir>/eval/<split>_<mode>, with _teacher appended for branch=teacher) and logs the metrics
and figures to the logger (default W&B, offline).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from segcon.build import build_datamodule, build_evaluator, instantiate_all
from segcon.config import fill_data_defaults, prepare_data, validate_cfg
from segcon.engine.callbacks import FinalReport
from segcon.engine.evaluation import best_key
from segcon.methods.teacher_student import TEACHER
from segcon.restore import build_inference_net, compose_entry, rebuild_config, required
from segcon.utils.checkpoint import load_run_checkpoint
from segcon.utils.cli import run_command
from segcon.utils.errors import ConfigError
from segcon.utils.io import make_output_dir
from segcon.utils.loggers import finish_wandb
from segcon.utils.rich_config import print_config_tree
from segcon.utils.targets import instantiate

USAGE = __doc__.split("\n\n")[1]

# Taken from segcon-eval's own config, not from the run's: where and how this evaluation runs.
OWN_GROUPS = ("paths", "trainer", "logger", "task_name", "tags")


def run_dir_of(ckpt_file: Path) -> Path:
    """The run directory a checkpoint file belongs to (`<run>/checkpoints/x.ckpt` -> `<run>`)."""
    return ckpt_file.parent.parent if ckpt_file.parent.name == "checkpoints" else ckpt_file.parent


def evaluate(entry: DictConfig, run_overrides: Sequence[str] = ()) -> dict[str, float]:
    """Evaluate `entry.ckpt` as configured; return the logged metrics (`val/mIoU`, ...)."""
    start = time.time()
    ckpt = load_run_checkpoint(required(entry, "ckpt", "logs/train/runs/<date>_<time>"))
    split, branch = entry.split, entry.branch
    if split not in ("val", "test"):
        raise ConfigError(f"split={split!r}; use val or test")
    cfg = rebuild_config(ckpt, entry, run_overrides, OWN_GROUPS)
    if not cfg.data.splits.get(split):
        raise ConfigError(f"split={split}: the {cfg.data.name} config has no labelled {split} split (data.splits.{split} is null)")
    mode = cfg.data.eval.get("mode") or "whole"
    default_dir = run_dir_of(ckpt.path) / "eval" / f"{split}_{mode}{'_teacher' if branch == 'teacher' else ''}"
    out_dir = Path(entry.out_dir).expanduser() if entry.get("out_dir") else default_dir
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    OmegaConf.resolve(cfg)
    prepare_data(cfg)
    fill_data_defaults(cfg)
    validate_cfg(cfg, training=False)
    print_config_tree(cfg, make_output_dir(out_dir, "out_dir"))

    datamodule = build_datamodule(cfg, unlabeled=False)
    module = build_evaluator(cfg, build_inference_net(cfg, ckpt, branch))
    module.bests[""] = float(ckpt.segcon.get(best_key("" if branch == "student" else TEACHER), float("nan")))
    report = FinalReport(out_dir, branch, start, checkpoint=ckpt.path)
    trainer = instantiate(cfg.trainer, "trainer", callbacks=[report], logger=instantiate_all(cfg.get("logger"), "logger") or False)
    run = trainer.validate if split == "val" else trainer.test
    metrics: dict[str, float] = {}
    for result in run(module, datamodule=datamodule, verbose=False):
        metrics.update(result)
    return metrics


def _command(args: list[str]) -> int:
    entry, run_overrides = compose_entry("eval", args)
    try:
        evaluate(entry, run_overrides)
    except BaseException:
        finish_wandb(1)
        raise
    finish_wandb(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`segcon-eval`); returns the exit status."""
    return run_command(_command, USAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
