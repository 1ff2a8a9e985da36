"""segcon-data: dataset utilities.

    segcon-data stats data=<name> data.root=<dir> [format=table|json] [workers=8]

`stats` prints, per split (train, val, and test where labels exist), the number of images, the
pixel count of every class and of ignore pixels. It reads every label file and exits with
status 1, listing the files, if any holds values outside [0, K) that are not ignore or does not
match its image's size. With `format=json` stdout holds exactly one JSON object:
`{"train": {"images": int, "class_pixels": [int] * K, "ignore_pixels": int}, "val": {...}}`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from segcon.config import config_dir, fill_data_defaults, prepare_data
from segcon.data.datamodule import SPLITS
from segcon.data.stats import SplitStats, split_stats
from segcon.utils.cli import run_command

USAGE = __doc__.split("\n\n")[1]


def _compose(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="segcon-data"):
        return compose("data_cli", overrides=list(overrides))


def stats(cfg: DictConfig) -> int:
    """Run `segcon-data stats`; return the exit status."""
    prepare_data(cfg)
    fill_data_defaults(cfg)
    data = cfg.data
    results: dict[str, SplitStats] = {}
    for split in SPLITS:
        disk_split = data.splits.get(split)
        if disk_split is None:
            continue
        dataset = instantiate(
            data.dataset, root=str(data.root), split=str(disk_split),
            num_classes=data.num_classes, ignore_index=data.ignore_index, transform=None,
        )
        results[split] = split_stats(dataset, cfg.workers)

    if cfg.format == "json":
        out = {s: {"images": r.images, "class_pixels": r.class_pixels, "ignore_pixels": r.ignore_pixels}
               for s, r in results.items()}
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        console = Console()
        for split, r in results.items():
            total = sum(r.class_pixels) + r.ignore_pixels
            table = Table(title=f"{data.name} / {split}: {r.images} images, {total:,} pixels")
            table.add_column("class")
            table.add_column("pixels", justify="right")
            table.add_column("%", justify="right")
            for name, n in zip(data.class_names, r.class_pixels, strict=True):
                table.add_row(str(name), f"{n:,}", f"{100 * n / max(total, 1):.3f}")
            table.add_row("[dim]ignore[/dim]", f"{r.ignore_pixels:,}", f"{100 * r.ignore_pixels / max(total, 1):.3f}")
            console.print(table)

    problems = [p for r in results.values() for p in r.problems]
    if problems:
        # Plain lines, never wrapped, so file names can be grepped.
        print(f"{len(problems)} label file(s) have problems:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"stats": stats}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, USAGE, argv)


def _run(args: list[str]) -> int:
    command, overrides = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}\n{USAGE}", file=sys.stderr)
        return 2
    cfg = _compose(overrides)
    OmegaConf.resolve(cfg.data)
    return COMMANDS[command](cfg)

if __name__ == "__main__":
    raise SystemExit(main())
