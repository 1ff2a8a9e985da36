"""segcon-data: dataset utilities.

    segcon-data check data=<folder|crackforest|...> data.root=<dir> [format=table|json]
    segcon-data stats data=<name> data.root=<dir> [format=table|json] [workers=8]
    segcon-data split data=<name> data.root=<dir> labeled=<count|fraction> out=<dir> [seed=0]
                      [class_balanced=true] [protocol=voc_classic|voc_blended|cityscapes] [overwrite=true]

`check` reads a dataset in the folder layout (images/<split>/, masks/<split>/) as it is on disk
and prints on one screen its splits (images, masks, raw mask values), its classes with their
pixel shares (binary 0/255 masks detected and mapped 255 -> 1), and the overrides the chosen data
config needs for these files (class count, value map, class names, palette, the unlabeled
folder); with `format=json`, one JSON object. Exit status 1 when something no override fixes
was found (images without masks in a labeled split).

`stats` prints, per split (train, val, and test where labels exist), the number of images, the
pixel count of every class and of ignore pixels. It reads every label file and exits with
status 1, listing the files, if any holds values outside [0, K) that are not ignore or does not
match its image's size. With `format=json` stdout holds exactly one JSON object:
`{"train": {"images": int, "class_pixels": [int] * K, "ignore_pixels": int}, "val": {...}}`.

`split` draws a labeled subset of the training split (a count, `labeled=92`, or a fraction
rounded up, `labeled=1/16`) with a seed and writes `<out>/labeled.txt`, `<out>/unlabeled.txt`
(the rest) and `<out>/split.json` (content hash, counts, settings); it never replaces existing
files unless `overwrite=true`. `class_balanced=true` reads the masks and makes sure every class
appears in the labeled set when the budget allows. `protocol=` checks the dataset and amount
against a published protocol: `voc_classic` (data=voc_aug, labeled=92|183|366|732|1464 drawn
from ImageSets/Segmentation/train.txt), `voc_blended` (data=voc_aug, 1/16..1/2 of 10,582),
`cityscapes` (1/16..1/2 of 2,975).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from segcon.config import config_dir, fill_data_defaults, prepare_data
from segcon.data.base import SegDataset, read_id_list
from segcon.data.check import check_folder
from segcon.data.datamodule import SPLITS
from segcon.data.splits import PROTOCOLS, Protocol, labeled_count, make_split, write_split
from segcon.data.stats import SplitStats, split_stats
from segcon.utils.cli import run_command
from segcon.utils.errors import ConfigError
from segcon.utils.targets import instantiate

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
            data.dataset, "data.dataset", root=str(data.root), split=str(disk_split),
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


def split(cfg: DictConfig) -> int:
    """Run `segcon-data split`; return the exit status."""
    if cfg.labeled is None or cfg.out is None:
        raise ConfigError("segcon-data split needs labeled=<count|fraction> and out=<dir>, e.g. labeled=1/16 out=splits/cs_1_16")
    prepare_data(cfg)
    fill_data_defaults(cfg)
    data = cfg.data
    protocol = _protocol(cfg)
    dataset = instantiate(
        data.dataset, "data.dataset", root=str(data.root), split=str(data.splits.train), num_classes=data.num_classes,
        ignore_index=data.ignore_index, transform=None, labeled=bool(cfg.class_balanced),
    )
    ids = [s.id for s in dataset.samples]
    if protocol is not None and len(ids) != protocol.pool_size:
        print(f"warning: protocol={cfg.protocol} expects {protocol.pool_size:,} training images, "
              f"{data.root} has {len(ids):,}: the split is not the published protocol's", file=sys.stderr)
    pool = None
    if protocol is not None and protocol.labeled_pool:
        pool = read_id_list(Path(str(data.root)) / protocol.labeled_pool)
    n_labeled = labeled_count(cfg.labeled, len(pool if pool is not None else ids))
    presence = _class_presence(dataset, pool, cfg.workers) if cfg.class_balanced else None
    result = make_split(ids, n_labeled, int(cfg.seed), pool, presence)
    meta = {"data": str(data.name), "root": str(data.root), "train_split": str(data.splits.train),
            "protocol": cfg.protocol, "labeled_amount": str(cfg.labeled), "seed": int(cfg.seed),
            "class_balanced": bool(cfg.class_balanced)}
    write_split(result, Path(str(cfg.out)), bool(cfg.overwrite), meta)
    covered = ""
    if presence is not None:
        have = set().union(*(presence[i] for i in result.labeled))
        covered = f", labeled set covers {len(have)} of {len(set().union(*presence.values()))} classes"
    print(f"split {result.hash}: {len(result.labeled)} labeled, {len(result.unlabeled)} unlabeled{covered} -> {cfg.out}")
    return 0


def _protocol(cfg: DictConfig) -> Protocol | None:
    if cfg.protocol is None:
        return None
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={cfg.protocol!r} is not known; choose one of {sorted(PROTOCOLS)} or leave it out")
    protocol = PROTOCOLS[cfg.protocol]
    if cfg.data.name != protocol.data:
        raise ConfigError(f"protocol={cfg.protocol} is defined on data={protocol.data}, not data={cfg.data.name}")
    amounts = {labeled_count(a, protocol.pool_size) for a in protocol.amounts}
    pool_size = int(protocol.amounts[-1]) if protocol.labeled_pool else protocol.pool_size
    if labeled_count(cfg.labeled, pool_size) not in amounts:
        raise ConfigError(f"protocol={cfg.protocol} ({protocol.description}) defines labeled="
                          f"{'|'.join(protocol.amounts)}, not {cfg.labeled}")
    return protocol


def _class_presence(dataset: SegDataset, pool: list[str] | None, workers: int) -> dict[str, frozenset[int]]:
    """id -> the classes in its mask, for the labeled pool (reads those masks)."""
    wanted = set(pool) if pool is not None else None
    indices = [i for i, s in enumerate(dataset.samples) if wanted is None or s.id in wanted]

    def one(index: int) -> tuple[str, frozenset[int]]:
        values = np.unique(dataset.load_mask(index))
        return dataset.samples[index].id, frozenset(int(v) for v in values if v != dataset.ignore_index)

    with ThreadPoolExecutor(max(1, workers)) as threads:
        return dict(threads.map(one, indices))


def check(cfg: DictConfig) -> int:
    """Run `segcon-data check`; return the exit status."""
    data = OmegaConf.to_container(cfg.data, resolve=False, throw_on_missing=False)
    if data.get("num_classes") == "???":
        data["num_classes"] = None
    report = check_folder(cfg.data.root, data, int(cfg.workers))
    if cfg.format == "json":
        print(json.dumps(report.as_dict()))
        return 1 if report.problems else 0
    console = Console()
    table = Table(title=f"{cfg.data.root}: folder layout")
    for col in ("folder", "images", "masks", "mask values"):
        table.add_column(col, justify="left" if col in ("folder", "mask values") else "right")
    for name, s in report.splits.items():
        values = ", ".join(map(str, s.values)) if s.masks else "(no masks: unlabeled images)"
        table.add_row(name, str(s.images), str(s.masks), values)
    console.print(table)
    names = report.class_names or [f"class_{i}" for i in range(report.num_classes)]
    shares = ", ".join(f"{n} {100 * f:.2f} %" for n, f in zip(names, report.pixel_shares, strict=False))
    mapping = " (binary masks stored as 0/255: 255 is the foreground, class 1)" if report.binary else ""
    console.print(f"classes: {report.num_classes}{mapping}; pixel shares of the labeled splits: {shares}")
    if report.class_names is None:
        console.print("class names: no classes.txt (one name per line) in the root; class_0 ... are used")
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}")
    if report.overrides:
        console.print(f"overrides this data needs with data={cfg.data.name}:\n  " + " ".join(report.overrides), soft_wrap=True)
    else:
        console.print(f"data={cfg.data.name} fits these files as it is")
    return 1 if report.problems else 0


COMMANDS = {"check": check, "stats": stats, "split": split}


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
