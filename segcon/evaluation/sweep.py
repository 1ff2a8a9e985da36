"""Aggregating multiruns: mean ± std over the seeds (and labeled splits) of every configuration.

Each job directory of a Hydra multirun holds `.hydra/overrides.yaml` (its command-line
overrides) and, once finished, `metrics.json`. Jobs are grouped by their overrides without the
keys that vary over repetitions (`over`: the seed, and e.g. `data.split_seed` for seeds x
splits); each group reports its runs, the split hashes they trained on, and the mean and sample
standard deviation (ddof = 1) of each metric.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class GroupStats:
    """One configuration: its overrides (the `over` keys removed), its runs (their `over`
    overrides, e.g. `seed=1 data.split_seed=2`), the split hash of each run (None without a
    split), and per-metric values in run order."""

    overrides: tuple[str, ...]
    runs: tuple[str, ...]
    split_hashes: tuple[str | None, ...]
    values: dict[str, list[float]]

    def mean_std(self, metric: str) -> tuple[float, float]:
        vals = [v for v in self.values.get(metric, []) if not math.isnan(v)]
        if not vals:
            return float("nan"), float("nan")
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan")


def _flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
        elif v is None:
            out[f"{prefix}{k}"] = float("nan")
    return out


def aggregate(sweep_dirs: Path | Sequence[Path], over: Sequence[str] = ("seed",)) -> list[GroupStats]:
    """Group the finished jobs under one or more sweep directories by their overrides without
    the keys in `over`.

    Jobs of several sweeps with the same overrides (e.g. the same grid run as two parallel
    sweeps, or more seeds added later) join one group. The same configuration and run finished
    twice is refused, naming both jobs, rather than counted twice.
    """
    dirs = [sweep_dirs] if isinstance(sweep_dirs, Path) else list(sweep_dirs)
    groups: dict[tuple[str, ...], dict] = defaultdict(lambda: {"runs": [], "splits": [], "values": defaultdict(list)})
    seen: dict[tuple[tuple[str, ...], str], Path] = {}
    for sweep_dir in dirs:
        for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
            job = overrides_file.parent.parent
            if not (job / "metrics.json").is_file():
                continue
            overrides = yaml.safe_load(overrides_file.read_text()) or []
            varied = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in over]
            key = tuple(o for o in overrides if o not in varied)
            run = " ".join(varied) or "(defaults)"
            if (key, run) in seen:
                raise ValueError(
                    f"{job} and {seen[key, run]} both finished {' '.join(key) or '(defaults)'} with "
                    f"{run}; aggregate only one of them (move the other out of the sweep directory)"
                )
            seen[key, run] = job
            metrics = json.loads((job / "metrics.json").read_text())
            group = groups[key]
            group["runs"].append(run)
            group["splits"].append(metrics.get("split_hash"))
            for metric, value in _flatten(metrics).items():
                group["values"][metric].append(value)
    return [GroupStats(k, tuple(g["runs"]), tuple(g["splits"]), dict(g["values"])) for k, g in groups.items()]


def mean_std_cell(mean: float, std: float) -> str:
    """`mean ± std` in % (`mean` alone for one run, `–` for none)."""
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if not math.isnan(std) else f"{100 * mean:.2f}"


def table_rows(groups: Sequence[GroupStats], metrics: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): configuration, number of runs, the distinct split hashes, then
    `mean ± std` (in %) per metric."""
    header = ["configuration", "runs", "splits", *metrics]
    rows = []
    for g in groups:
        splits = sorted({h for h in g.split_hashes if h})
        rows.append([" ".join(g.overrides) or "(defaults)", str(len(g.runs)), " ".join(splits) or "–",
                     *(mean_std_cell(*g.mean_std(m)) for m in metrics)])
    return header, rows


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def format_table(groups: Sequence[GroupStats], metrics: Sequence[str]) -> str:
    """The Markdown table of `table_rows`."""
    return markdown(*table_rows(groups, metrics))
