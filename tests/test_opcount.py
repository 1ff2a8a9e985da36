"""segcon.utils.opcount: device ops and host syncs of constructed programs whose counts are known
by hand, and the per-step counter of scripts/benchmark.py on the shipped configs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from segcon.utils.opcount import OpCounter, counting

ROOT = Path(__file__).resolve().parents[1]


def _count(program, *device_tensors: torch.Tensor) -> tuple[int, int, dict[str, int]]:
    counter = OpCounter(device_tensors)
    with counting(counter):
        program()
    return counter.ops, counter.syncs, dict(counter.sync_ops)


def test_device_ops_and_syncs_are_counted_host_work_is_not() -> None:
    x, counts, host = torch.randn(8), torch.tensor([1, 2, 0, 1]), torch.arange(4)
    assert _count(lambda: x.sum().item(), x) == (2, 1, {"_local_scalar_dense.default": 1})
    assert _count(lambda: host.sum().item(), x) == (0, 0, {})  # a host tensor: no launch, no wait
    assert _count(lambda: x[x > 0], x) == (2, 1, {"index.Tensor": 1})  # boolean mask: size from the data
    assert _count(lambda: x[host], x)[1] == 0  # integer index: no sync
    assert _count(lambda: x.clone().masked_fill_(x > 0, 0.0), x) == (3, 0, {})
    assert _count(lambda: torch.zeros(3, device=x.device), x) == (1, 0, {})  # a factory given the device
    assert _count(lambda: x + torch.tensor(1.0), x) == (1, 0, {})  # the host constant is not a launch
    assert _count(lambda: x.tolist(), x) == (1, 1, {"Tensor.tolist": 1})
    assert _count(lambda: int(x.argmax()), x) == (2, 1, {"_local_scalar_dense.default": 1})
    dev_counts = counts.clone()
    assert _count(lambda: torch.repeat_interleave(x[:4], dev_counts), x, dev_counts)[1] == 1
    assert _count(lambda: torch.repeat_interleave(x[:4], dev_counts, output_size=4), x, dev_counts)[1] == 0
    for sync in (lambda: x.nonzero(), lambda: dev_counts.unique(), lambda: dev_counts.bincount(minlength=4),
                 lambda: torch.equal(x, x), lambda: x.cpu(), lambda: bool(x.any())):
        assert _count(sync, x, dev_counts)[1] == 1


def test_outputs_of_device_ops_are_device_tensors_and_pausing_stops_counting() -> None:
    x = torch.randn(4, 4)
    counter = OpCounter([x])
    with counting(counter):
        y = x @ x  # 1
        with counter.paused():
            z = y.relu()  # not counted, but z lives on the device
        _ = z.sum().item()  # 2, one of them a sync
    assert (counter.ops, counter.syncs) == (3, 1)


sys.path.insert(0, str(ROOT / "scripts"))


@pytest.mark.slow
def test_the_step_counter_counts_the_same_twice_and_sees_a_terms_syncs(data_dir: Path) -> None:
    """Counts are deterministic; the CE step holds the divergence check's one read; pixel contrast
    adds ops and syncs (its current sampler reads sizes from the data)."""
    import benchmark

    root = str(data_dir / "synthetic-tiny")
    ce = benchmark.count_step(["contrast=none"], data_root=root)
    assert ce == benchmark.count_step(["contrast=none"], data_root=root)
    assert ce["syncs"] == 1 and 300 < ce["ops"] < 800
    pixel = benchmark.count_step(["contrast=pixel"], data_root=root)
    assert pixel["ops"] > ce["ops"] and pixel["syncs"] > ce["syncs"]
