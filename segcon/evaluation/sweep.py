"""Aggregating multiruns: mean ± std over seeds of every configuration.

Each job directory of a Hydra multirun holds `.hydra/overrides.yaml` (its command-line
overrides) and, once finished, `metrics.json`. Jobs are grouped by their overrides without the
seed; each group reports the number of finished seeds and the mean and sample standard
deviation (ddof = 1) of each metric.
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
    """One configuration: its overrides (seed removed), the seeds found, and per-metric values."""

    overrides: tuple[str, ...]
    seeds: tuple[str, ...]
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


def aggregate(sweep_dirs: Path | Sequence[Path], seed_key: str = "seed") -> list[GroupStats]:
    """Group the finished jobs under one or more sweep directories by their overrides without `seed_key`.

    Jobs of several sweeps with the same overrides (e.g. the same grid run as two parallel
    sweeps, or more seeds added later) join one group. The same configuration and seed finished
    twice is refused, naming both jobs, rather than counted twice.
    """
    dirs = [sweep_dirs] if isinstance(sweep_dirs, Path) else list(sweep_dirs)
    groups: dict[tuple[str, ...], dict] = defaultdict(lambda: {"seeds": [], "values": defaultdict(list)})
    seen: dict[tuple[tuple[str, ...], str], Path] = {}
    for sweep_dir in dirs:
        for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
            job = overrides_file.parent.parent
            if not (job / "metrics.json").is_file():
                continue
            overrides = yaml.safe_load(overrides_file.read_text()) or []
            key = tuple(o for o in overrides if not o.startswith(f"{seed_key}="))
            seed = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{seed_key}=")), "?")
            if (key, seed) in seen:
                raise ValueError(
                    f"{job} and {seen[key, seed]} both finished {' '.join(key) or '(defaults)'} with "
                    f"{seed_key}={seed}; aggregate only one of them (move the other out of the sweep directory)"
                )
            seen[key, seed] = job
            group = groups[key]
            group["seeds"].append(seed)
            for metric, value in _flatten(json.loads((job / "metrics.json").read_text())).items():
                group["values"][metric].append(value)
    return [GroupStats(k, tuple(g["seeds"]), dict(g["values"])) for k, g in groups.items()]


def format_table(groups: Sequence[GroupStats], metrics: Sequence[str]) -> str:
    """A Markdown table: configuration, seeds, then `mean ± std` (in %) per metric."""
    head = "| configuration | seeds | " + " | ".join(metrics) + " |"
    rows = [head, "|" + "---|" * (len(metrics) + 2)]
    for g in groups:
        cells = []
        for m in metrics:
            mean, std = g.mean_std(m)
            cells.append("–" if math.isnan(mean) else f"{100 * mean:.2f} ± {100 * std:.2f}" if not math.isnan(std) else f"{100 * mean:.2f}")
        rows.append(f"| {' '.join(g.overrides) or '(defaults)'} | {len(g.seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
