"""divergence: a non-finite loss or gradient stops the run before the optimizer step (naming the
step and the term) or skips the step; checkpoints never hold a non-finite state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from segcon.methods.divergence import DivergenceError, DivergencePolicy
from segcon.train import train
from segcon.utils.errors import ConfigError

NAN = ["+loss.nan._target_=tests.helpers.NanAfter", "trainer.max_steps=8"]


def _finite_checkpoints(run: Path) -> dict[str, int]:
    """Every checkpoint's step, after checking all its floating-point tensors are finite."""
    steps = {}
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k, v in state["state_dict"].items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), (ckpt.name, k)
        steps[ckpt.name] = state["global_step"]
    return steps


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_term(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg(*NAN, "+loss.nan.calls=6")  # the 6th step (index 5), after the epoch-0 checkpoint at step 4
    with pytest.raises(DivergenceError, match=r"step 5: the loss is not finite \(.*train/loss_nan = nan"):
        train(cfg)
    steps = _finite_checkpoints(Path(cfg.paths.output_dir))
    assert steps and max(steps.values()) == 4  # the last good state; nothing was written after


def test_a_nan_gradient_with_a_finite_loss_stops_the_run(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg(*NAN, "+loss.nan.calls=2", "+loss.nan.mode=grad")
    with pytest.raises(DivergenceError, match=r"step 1: gradients are not finite in model\.encoder\."):
        train(cfg)


def test_skip_drops_the_step_and_counts_it(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg(*NAN, "+loss.nan.calls=2", "+loss.nan.times=2", "divergence.policy=skip", "eval_ckpt=last")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 2 and 0.0 <= metrics["val/mIoU"] <= 1.0
    assert max(_finite_checkpoints(run).values()) == 8


def test_skip_stops_after_max_consecutive_steps(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg(*NAN, "+loss.nan.calls=2", "divergence.policy=skip", "divergence.max_consecutive=3")
    with pytest.raises(DivergenceError, match=r"step 3: .*3 steps in a row"):
        train(cfg)


def test_skipped_steps_leave_weights_moments_and_batchnorm_statistics_alone(tiny_cfg: Callable[..., DictConfig]) -> None:
    """Every step non-finite from the first one on: after the run stops, the network equals its
    initial state (parameters and BatchNorm statistics) and AdamW holds no moment."""
    from segcon.build import build_module

    cfg = tiny_cfg(*NAN, "+loss.nan.calls=1", "divergence.policy=skip", "divergence.max_consecutive=3")
    torch.manual_seed(cfg.seed)
    initial = {k: v.clone() for k, v in build_module(cfg).net.state_dict().items()}
    captured = {}

    import segcon.methods.supervised as supervised

    original = supervised.SupervisedModule.on_before_optimizer_step

    def spy(self, optimizer):  # keep the module and optimizer the run used
        captured.update(module=self, optimizer=optimizer)
        return original(self, optimizer)

    supervised.SupervisedModule.on_before_optimizer_step = spy
    try:
        with pytest.raises(DivergenceError):
            train(cfg)
    finally:
        supervised.SupervisedModule.on_before_optimizer_step = original
    state = captured["module"].net.state_dict()
    for k, v in initial.items():
        assert torch.equal(state[k], v), k
    assert all(not s for s in captured["optimizer"].state.values())


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"divergence\.policy"):
        DivergencePolicy.from_config({"policy": "ignore"})
    with pytest.raises(ConfigError, match="unknown key"):
        DivergencePolicy.from_config({"patience": 3})
