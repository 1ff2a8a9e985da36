"""divergence: a non-finite loss or gradient stops the run before the optimizer step (naming the
step and the term) or skips the step; checkpoints never hold a non-finite state."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from segcon.engine.divergence import DivergenceError, DivergencePolicy
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


def test_the_loss_watch_judges_against_the_running_median() -> None:
    """Constructed losses: no judgement before EXPLODE_WARMUP steps; a loss over factor x the
    median of the window (and over 1) is exploding, said once per window; below the factor, or
    under 1 whatever the factor, it is not; non-finite losses stay out of the window; the state
    round-trips."""
    from segcon.engine.divergence import EXPLODE_WARMUP, EXPLODE_WINDOW, LossWatch

    watch = LossWatch(factor=100.0)
    assert all(watch.judge(s, 1e9 if s == 3 else 2.0) is None for s in range(EXPLODE_WARMUP))  # warm-up
    assert watch.judge(10, 2.0 * 99) is None  # 99x the median (2.0 and a 1e9 outlier: median 2.0)
    said = watch.judge(11, 2.0 * 101)
    assert said is not None and said.startswith("step 11: the loss 202 is 101x the median") and "(2)" in said
    assert watch.judge(12, 1e6) is None  # within the window of the last warning
    assert watch.judge(11 + EXPLODE_WINDOW, 1e12) is not None
    small = LossWatch(factor=100.0, history=[1e-4] * EXPLODE_WARMUP)
    assert small.judge(0, 0.5) is None  # 5000x the median, but under 1
    watch.judge(100, float("nan"))
    assert all(v == v for v in watch.history) and len(watch.history) == 14  # the NaN was not kept
    again = LossWatch(100.0)
    again.load_state_dict(watch.state_dict())
    assert again == watch
    assert LossWatch(None, history=[1.0] * 20).judge(5, 1e30) is None  # off


@pytest.mark.parametrize("action", ["warn", "stop"])
def test_an_exploding_finite_loss_warns_or_stops(action: str, tiny_cfg: Callable[..., DictConfig]) -> None:
    """A loss of 5e13 from step 12 on (after 12 ordinary steps): a warning naming the step and
    the factor, once, and the run goes on; with on_explode=stop the run ends there, before the
    optimizer step."""
    cfg = tiny_cfg("+loss.nan._target_=tests.helpers.NanAfter", "+loss.nan.calls=13", "+loss.nan.mode=huge",
                   "trainer.max_steps=14", "trainer.max_epochs=-1", f"divergence.on_explode={action}")
    said = r"step 12: the loss 5e\+13 is [0-9.e+]+x the median of the last 12 steps .*explode_factor=1000"
    if action == "stop":
        with pytest.raises(DivergenceError, match=said):
            train(cfg)
        return
    with pytest.warns(UserWarning, match=said) as caught:
        train(cfg)
    assert sum("training is exploding" in str(w.message) for w in caught) == 1
