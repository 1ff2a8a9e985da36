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


def test_several_sweep_dirs_form_one_group_and_a_repeated_seed_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _job(a, 0, ["seed=1", "method=fixmatch"], {"val/mIoU": 0.50})
    _job(a, 1, ["seed=1", "method=unimatch"], {"val/mIoU": 0.70})
    _job(b, 0, ["seed=2", "method=fixmatch"], {"val/mIoU": 0.54})
    groups = {g.overrides: g for g in aggregate([a, b])}
    assert groups[("method=fixmatch",)].seeds == ("1", "2")
    assert groups[("method=fixmatch",)].mean_std("val/mIoU")[0] == pytest.approx(0.52)
    assert groups[("method=unimatch",)].seeds == ("1",)
    _job(b, 1, ["seed=1", "method=fixmatch"], {"val/mIoU": 0.9})  # seed 1 of fixmatch again
    with pytest.raises(ValueError, match=r"both finished method=fixmatch with seed=1") as err:
        aggregate([a, b])
    assert str(a / "0") in str(err.value) and str(b / "1") in str(err.value)
