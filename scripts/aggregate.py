"""Mean ± std over seeds of a multirun, one row per configuration (Markdown table).

    python scripts/aggregate.py logs/train/multiruns/<date> [--metrics val/mIoU val/IoU/crack ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segcon.evaluation.sweep import aggregate, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metrics", nargs="+", default=["val/mIoU", "val/mIoU_best"])
    parser.add_argument("--seed-key", default="seed")
    args = parser.parse_args()
    groups = aggregate(args.sweep_dir, args.seed_key)
    if not groups:
        raise SystemExit(f"no finished job (a <job>/.hydra/overrides.yaml with metrics.json) under {args.sweep_dir}")
    print(format_table(groups, args.metrics))


if __name__ == "__main__":
    main()
