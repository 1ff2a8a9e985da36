"""Aggregating a multirun directory: grouping without the seed, mean and sample std."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from segcon.evaluation.sweep import aggregate, format_table


def _job(root: Path, num: int, overrides: list[str], metrics: dict | None) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_groups_by_overrides_without_seed(tmp_path: Path) -> None:
    values = {"none": [0.60, 0.62, 0.64], "pixel": [0.61, 0.65]}
    n = 0
    for contrast, vals in values.items():
        for seed, v in enumerate(vals):
            _job(tmp_path, n, [f"seed={seed}", f"contrast={contrast}"], {"val/mIoU": v, "val/IoU": {"crack": v / 2}})
            n += 1
    _job(tmp_path, n, ["seed=9", "contrast=pixel"], None)  # unfinished: skipped
    groups = {g.overrides: g for g in aggregate(tmp_path)}
    assert set(groups) == {("contrast=none",), ("contrast=pixel",)}
    g = groups[("contrast=none",)]
    assert g.seeds == ("0", "1", "2")
    mean, std = g.mean_std("val/mIoU")
    assert mean == pytest.approx(0.62) and std == pytest.approx(statistics.stdev([0.60, 0.62, 0.64]))
    assert groups[("contrast=pixel",)].mean_std("val/IoU/crack")[0] == pytest.approx(0.315)
    table = format_table(list(groups.values()), ["val/mIoU"])
    assert "| contrast=none | 3 | 62.00 ± 2.00 |" in table
