"""segcon-table: the mean ± std table of a multirun over seeds (and labeled splits).

    segcon-train -m experiment=ssl_synthetic method=supervised,fixmatch seed=1,2,3 data.split_seed=1,2,3
    segcon-table logs/ssl_synthetic/multiruns/<date> --out results/ssl_synthetic [--wandb]

One row per configuration (the jobs' overrides without the repeated keys, `--over`, by default
the seed and `data.split_seed`): the number of runs, the split hashes they trained on, and
mean ± sample std (in %) of the student's and the teacher's best and last validation mIoU and
of each class's IoU (of the evaluated checkpoint). Printed, and written as `<out>.md` and
`<out>.csv` (mean and std as separate numeric columns); with `--wandb` also logged to W&B as a
table (offline unless WANDB_MODE says otherwise). Several sweep directories are read as one.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from segcon.evaluation.sweep import GroupStats, aggregate, format_table, table_rows
from segcon.utils.cli import USER_ERROR
from segcon.utils.errors import DataError, SegconError
from segcon.utils.io import make_output_dir

HEADLINE = ("val/mIoU_best", "val/mIoU_last", "val/teacher/mIoU_best", "val/teacher/mIoU_last")
"""The first columns, where the runs logged them: student and teacher, best and last."""


def default_metrics(groups: Sequence[GroupStats]) -> list[str]:
    """The headline metrics present in any run, then per-class IoU (student, then teacher)."""
    present = {m for g in groups for m in g.values}
    per_class = [m for m in sorted(present) if m.startswith("val/IoU/")]
    teacher = [m for m in sorted(present) if m.startswith("val/teacher/IoU/")]
    return [m for m in HEADLINE if m in present] + per_class + teacher


def write_csv(path: Path, groups: Sequence[GroupStats], metrics: Sequence[str]) -> None:
    """One row per configuration: runs, split hashes, then mean and std (fractions) per metric."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["configuration", "runs", "splits", *(f"{m} {s}" for m in metrics for s in ("mean", "std"))])
        for g in groups:
            stats = [v for m in metrics for v in g.mean_std(m)]
            out.writerow([" ".join(g.overrides) or "(defaults)", len(g.runs),
                          " ".join(sorted({h for h in g.split_hashes if h})), *stats])


def log_wandb(header: list[str], rows: list[list[str]], project: str, name: str) -> str:
    """Log the table to W&B (offline unless WANDB_MODE says otherwise); the run's directory."""
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    run = wandb.init(project=project, name=name, job_type="table", reinit="finish_previous")
    run.log({"seeds_x_splits": wandb.Table(columns=header, data=rows)})
    run.finish()
    return run.dir


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`segcon-table`); returns the exit status (2: a user error, one line)."""
    parser = argparse.ArgumentParser(prog="segcon-table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="multirun directories (one job per subfolder)")
    parser.add_argument("--over", nargs="+", default=["seed", "data.split_seed", "data.split"],
                        help="override keys repeated within a configuration (default: seed data.split_seed data.split)")
    parser.add_argument("--metrics", nargs="+", help="columns (default: best/last mIoU of student and teacher, per-class IoU)")
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.csv")
    parser.add_argument("--wandb", action="store_true", help="log the table to W&B")
    parser.add_argument("--wandb-project", default="segcon")
    args = parser.parse_args(argv)
    try:
        _table(args)
    except SegconError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
    return 0


def _table(args: argparse.Namespace) -> None:
    for d in args.sweep_dirs:
        if not d.is_dir():
            raise DataError(f"{d}: no such sweep directory")
    try:
        groups = aggregate(args.sweep_dirs, args.over)
    except ValueError as e:
        raise DataError(str(e)) from None
    if not groups:
        raise DataError(f"no finished job (a <job>/.hydra/overrides.yaml with metrics.json) under "
                        f"{', '.join(map(str, args.sweep_dirs))}")
    metrics = args.metrics or default_metrics(groups)
    table = format_table(groups, metrics)
    print(table)
    if args.out:
        make_output_dir(args.out.parent, "--out")
        args.out.with_suffix(".md").write_text(table + "\n")
        write_csv(args.out.with_suffix(".csv"), groups, metrics)
        print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.csv')}")
    if args.wandb:
        header, rows = table_rows(groups, metrics)
        print(f"logged to W&B: {log_wandb(header, rows, args.wandb_project, args.sweep_dirs[0].name)}")


if __name__ == "__main__":
    raise SystemExit(main())
