"""Mean ± std over seeds of a multirun, one row per configuration (Markdown table).

    python scripts/aggregate.py logs/train/multiruns/<date> [<more sweep dirs>] [--metrics val/mIoU val/IoU/crack ...]

Several sweep directories (e.g. one grid split over two parallel sweeps) are aggregated
together: jobs with the same overrides apart from the seed form one row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segcon.evaluation.sweep import aggregate, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+")
    parser.add_argument("--metrics", nargs="+", default=["val/mIoU", "val/mIoU_best"])
    parser.add_argument("--seed-key", default="seed")
    args = parser.parse_args()
    for d in args.sweep_dirs:
        if not d.is_dir():
            raise SystemExit(f"{d}: no such sweep directory")
    try:
        groups = aggregate(args.sweep_dirs, args.seed_key)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not groups:
        raise SystemExit(f"no finished job (a <job>/.hydra/overrides.yaml with metrics.json) under {', '.join(map(str, args.sweep_dirs))}")
    print(format_table(groups, args.metrics))


if __name__ == "__main__":
    main()
