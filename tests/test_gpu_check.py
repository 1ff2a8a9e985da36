"""scripts/gpu_check.py: its CPU dry run (every case runs, the JSON is written, the table's
ratios follow from the cases' own figures) and the rules a GPU run relies on (out-of-memory
retry at half the batch, a failed case does not stop the others, the time budget)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def _oom_above(limit: int, seen: list[int]):
    def run(batch: int) -> dict:
        seen.append(batch)
        if batch > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"step_median_s": 1.0}
    return run


def test_a_case_out_of_memory_is_retried_at_half_the_batch_and_says_so() -> None:
    seen: list[int] = []
    record = gpu_check.run_case(gpu_check.Case("t", "train", _oom_above(2, seen), batch=8, retry_batch=True),
                                deadline=time.monotonic() + 60)
    assert seen == [8, 4, 2]
    assert record["status"] == "ok" and record["batch"] == 2 and record["out_of_memory_at_batch"] == [8, 4]


def test_a_failed_case_is_recorded_and_other_errors_are_not_retried() -> None:
    seen: list[int] = []

    def broken(batch: int) -> dict:
        seen.append(batch)
        raise ValueError("contrast=rc2l needs model=maskformer_*")

    record = gpu_check.run_case(gpu_check.Case("t", "train", broken, batch=8, retry_batch=True),
                                deadline=time.monotonic() + 60)
    assert seen == [8] and record["status"] == "failed" and "maskformer" in record["error"]
    # out of memory at batch 1 is a failure too, not an endless retry
    record = gpu_check.run_case(gpu_check.Case("t", "train", _oom_above(0, []), batch=1, retry_batch=True),
                                deadline=time.monotonic() + 60)
    assert record["status"] == "failed" and "out of memory" in record["error"]


def test_the_budget_skips_cases_after_it_and_stops_a_case_that_runs_past_it() -> None:
    record = gpu_check.run_case(gpu_check.Case("t", "eval", lambda _: {}), deadline=time.monotonic() - 1)
    assert record["status"] == "skipped"
    start = time.monotonic()
    record = gpu_check.run_case(gpu_check.Case("t", "eval", lambda _: time.sleep(30) or {}),
                                deadline=time.monotonic() + 1.5)
    assert record["status"] == "failed" and "CaseTimeout" in record["error"]
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_the_dry_run_runs_every_case_and_its_table_follows_from_the_cases(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--budget-s", "900"], capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    cases = {c["name"]: c for c in report["cases"]}
    assert [c["name"] for c in report["cases"] if c["status"] != "ok"] == []
    sizes = gpu_check.Sizes(**report["sizes"])
    assert set(cases) == {c.name for c in gpu_check.plan(sizes, "d", "l", None)}
    assert {c["kind"] for c in report["cases"]} == {"train", "method", "overhead", "eval", "loader", "compile"}
    res = {n: c["result"] for n, c in cases.items()}
    rows = {r["case"]: r for r in report["summary"]}
    prefix = f"train {sizes.models[0]} {sizes.precisions[0]}"
    for contrast in gpu_check.CONTRASTS[1:]:
        row = rows[f"{prefix} contrast={contrast} (time)"]
        assert row["ratio"] == res[f"{prefix} contrast={contrast}"]["step_median_s"] / \
            res[f"{prefix} contrast=none"]["step_median_s"]
        assert row["goal"] == 1.10
        mem = rows[f"{prefix} contrast={contrast} (memory)"]
        assert mem["ratio"] == res[f"{prefix} contrast={contrast}"]["peak_gib"] / res[f"{prefix} contrast=none"]["peak_gib"]
    sup, fwd = res["method supervised"]["step_median_s"], res["method forward-only"]["forward_median_s"]
    for method, (_, fb, f) in gpu_check.METHODS.items():
        if method != "supervised":
            assert rows[f"method {method} (vs pass count)"]["ratio"] == \
                res[f"method {method}"]["step_median_s"] / (fb * sup + f * fwd)
    fb, f = gpu_check.UNIMATCH_V2
    assert rows["method unimatch_v2 (vs pass count)"]["ratio"] == res["method unimatch_v2"]["step_median_s"] / (
        fb * res["method dpt supervised"]["step_median_s"] + f * res["method dpt forward-only"]["forward_median_s"])
    overhead = f"{sizes.models[0]} {sizes.precisions[0]}"
    assert rows["overhead segcon / bare (time)"]["ratio"] == \
        res[f"overhead segcon {overhead}"]["step_median_s"] / res[f"overhead bare {overhead}"]["step_median_s"]
    assert res[f"loader workers={sizes.loader_workers[-1]}"]["batches"] == sizes.loader_batches
    assert res["eval slide"]["passes"] > res["eval whole"]["passes"] == 1
    assert all(res[f"loader workers={w}"]["images_per_s"] > 0 for w in sizes.loader_workers)
    assert "cases ok, 0 failed, 0 skipped" in proc.stdout
