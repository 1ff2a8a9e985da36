"""The memory estimate before the first step (segcon.engine.memory): saved activations counted
against a hand computation, the knobs named when a step will not fit, and no trace in the run."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import nn

from segcon.engine.memory import MemoryEstimate, check_fits, estimate_memory, saved_activation_bytes
from segcon.models.output import SegOutput
from segcon.utils.errors import ConfigError


class ConvReLU(nn.Module):
    """conv 3->4 (3x3, padding 1) then ReLU: the convolution saves its input, ReLU its output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward_features(self, x: torch.Tensor) -> SegOutput:
        return SegOutput(logits=torch.relu(self.conv(x)))


def test_saved_activations_are_counted_once_per_storage_and_without_the_weights() -> None:
    net = ConvReLU()
    x = torch.zeros(2, 3, 8, 8)
    exclude = {p.untyped_storage().data_ptr() for p in net.parameters()}
    # the input 2*3*8*8 floats and the ReLU output 2*4*8*8 floats, 4 bytes each
    assert saved_activation_bytes(lambda: net.forward_features(x), exclude) == 4 * (2 * 3 * 64 + 2 * 4 * 64)
    estimate = estimate_memory(net, None, "adamw", x, images=10)
    params = 4 * 3 * 9 + 4
    assert (estimate.parameters, estimate.weights, estimate.gradients, estimate.optimizer) == \
        (params, 4 * params, 4 * params, 8 * params)
    assert estimate.per_image == 4 * (3 * 64 + 4 * 64) and estimate.activations == 10 * estimate.per_image
    assert estimate.crop == (8, 8) and "activations" in estimate.describe()


def test_a_step_that_does_not_fit_names_the_knobs() -> None:
    estimate = MemoryEstimate(10, 10, 40, 40, 80, 0, 2**30, 8, (518, 518))
    check_fits(estimate, 9 * 2**30, "data.batch_size (8)")  # 8 GiB + 160 bytes fits in 9 GiB
    with pytest.raises(ConfigError, match=r"about 8\.0 GiB.*2\.0 GiB are free: lower data\.batch_size \(8\).*"
                                          r"crop_size=\[518, 518\].*bf16-mixed"):
        check_fits(estimate, 2 * 2**30, "data.batch_size (8)")


def test_the_estimate_leaves_no_trace_in_the_run(tiny_cfg: Callable[..., DictConfig],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The same seed with and without the estimate: every logged value identical (the extra
    forward pass restores the BatchNorm statistics and the random state)."""
    from segcon.train import train

    rows = []
    for flag in ("true", "false"):
        cfg = tiny_cfg(f"memory_estimate={flag}", "method=mean_teacher", "data.labeled_count=4", "trainer.max_steps=3",
                       "trainer.max_epochs=-1", "trainer.log_every_n_steps=1")
        with caplog.at_level(logging.INFO):
            train(cfg)
        rows.append(list(csv.DictReader(next((Path(cfg.paths.output_dir) / "csv").rglob("metrics.csv")).open())))
        printed = "memory estimate per device" in caplog.text
        assert printed == (flag == "true")
        caplog.clear()
    assert len(rows[0]) > 3 and rows[0] == rows[1]
