"""Aggregating a multirun directory: grouping without the seed (and split), mean and sample std;
segcon-table's CSV, Markdown and W&B table."""

from __future__ import annotations

import csv
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
    assert g.runs == ("seed=0", "seed=1", "seed=2")
    mean, std = g.mean_std("val/mIoU")
    assert mean == pytest.approx(0.62) and std == pytest.approx(statistics.stdev([0.60, 0.62, 0.64]))
    assert groups[("contrast=pixel",)].mean_std("val/IoU/crack")[0] == pytest.approx(0.315)
    table = format_table(list(groups.values()), ["val/mIoU"])
    assert "| contrast=none | 3 | – | 62.00 ± 2.00 |" in table


def test_several_sweep_dirs_form_one_group_and_a_repeated_seed_is_refused(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _job(a, 0, ["seed=1", "method=fixmatch"], {"val/mIoU": 0.50})
    _job(a, 1, ["seed=1", "method=unimatch"], {"val/mIoU": 0.70})
    _job(b, 0, ["seed=2", "method=fixmatch"], {"val/mIoU": 0.54})
    groups = {g.overrides: g for g in aggregate([a, b])}
    assert groups[("method=fixmatch",)].runs == ("seed=1", "seed=2")
    assert groups[("method=fixmatch",)].mean_std("val/mIoU")[0] == pytest.approx(0.52)
    assert groups[("method=unimatch",)].runs == ("seed=1",)
    _job(b, 1, ["seed=1", "method=fixmatch"], {"val/mIoU": 0.9})  # seed 1 of fixmatch again
    with pytest.raises(ValueError, match=r"both finished method=fixmatch with seed=1;") as err:
        aggregate([a, b])
    assert str(a / "0") in str(err.value) and str(b / "1") in str(err.value)


def test_seeds_x_splits_table(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two methods x 2 seeds x 2 splits: one row per method over its 4 runs, with both split
    hashes, student and teacher best/last and per-class IoU; CSV, Markdown and a W&B table."""
    from segcon.table import main

    sweep = tmp_path / "sweep"
    expected: dict[str, list[float]] = {"supervised": [], "fixmatch": []}
    n = 0
    for method in expected:
        for seed in (1, 2):
            for split in (1, 2):
                best = 0.40 + 0.1 * (method == "fixmatch") + 0.01 * seed + 0.02 * split
                expected[method].append(best)
                metrics = {"val/mIoU_best": best, "val/mIoU_last": best - 0.01, "split_hash": f"hash{split}",
                           "val/IoU": {"background": 0.9, "crack": best / 2}}
                if method == "fixmatch":
                    metrics.update({"val/teacher/mIoU_best": best + 0.005, "val/teacher/mIoU_last": best})
                _job(sweep, n, [f"method={method}", f"seed={seed}", f"data.split_seed={split}"], metrics)
                n += 1
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    main([str(sweep), "--out", str(tmp_path / "out" / "table"), "--wandb"])
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    by_method = {r["configuration"]: r for r in rows}
    fix = by_method["method=fixmatch"]
    assert fix["runs"] == "4" and fix["splits"] == "hash1 hash2"
    assert float(fix["val/mIoU_best mean"]) == pytest.approx(statistics.fmean(expected["fixmatch"]))
    assert float(fix["val/mIoU_best std"]) == pytest.approx(statistics.stdev(expected["fixmatch"]))
    assert float(fix["val/teacher/mIoU_last mean"]) == pytest.approx(statistics.fmean(expected["fixmatch"]))
    assert float(fix["val/IoU/crack mean"]) == pytest.approx(statistics.fmean(expected["fixmatch"]) / 2)
    assert by_method["method=supervised"]["val/teacher/mIoU_best mean"] == "nan"  # no teacher
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.splitlines()[0] == ("| configuration | runs | splits | val/mIoU_best | val/mIoU_last | val/teacher/mIoU_best "
                                  "| val/teacher/mIoU_last | val/IoU/background | val/IoU/crack |")
    assert md.strip() in printed
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/seeds_x_splits_*.table.json")
    logged = json.loads(table_file.read_text())
    assert logged["columns"][:3] == ["configuration", "runs", "splits"] and len(logged["data"]) == 2
