"""What a training step does when its loss or gradients are not finite (`divergence` config).

The check runs after the backward pass and before the optimizer step, so a non-finite step never
reaches the weights: with `policy: stop` the run ends there with one DivergenceError naming the
step, the non-finite loss terms and the first parameters with non-finite gradients (the weights,
and every checkpoint written so far, hold the state before it); with `policy: skip` the step's
gradients are dropped (the optimizer leaves every parameter alone, moments included), the
BatchNorm statistics the forward pass moved are put back, nothing enters memory banks or the
teacher, the step is counted, and `max_consecutive` skipped steps in a row stop the run.

A loss that explodes but stays finite (`explode_factor` times the median of the last
`EXPLODE_WINDOW` steps' losses, and above 1) warns, at most once per window, or with
`on_explode: stop` ends the run there the same way (`LossWatch`).

All ranks take the same decision (the flag and the loss are reduced across ranks, with the
step's one host synchronisation). Under a GradScaler (`16-mixed`) non-finite gradients are the
scaler's business (it skips those steps and lowers its scale): only the loss is checked there.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from segcon.utils.errors import ConfigError, SegconError

POLICIES = ("stop", "skip")
EXPLODE_ACTIONS = ("warn", "stop")
EXPLODE_WINDOW = 50
"""How many of the latest finite step losses the running median of `LossWatch` is taken over."""
EXPLODE_WARMUP = 10
"""Steps seen before `LossWatch` judges (a median of fewer says little)."""


class DivergenceError(SegconError, RuntimeError):
    """Training produced a non-finite loss or gradient (names the step and the terms)."""


@dataclass(frozen=True)
class DivergencePolicy:
    """`policy` (stop | skip), `max_consecutive` skipped steps in a row before stopping, and
    whether gradients are checked besides the loss."""

    policy: str = "stop"
    max_consecutive: int = 10
    check_gradients: bool = True
    explode_factor: float | None = 1000.0
    on_explode: str = "warn"

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> DivergencePolicy:
        """From the `divergence` config node, checked (errors name the key)."""
        node = dict(node or {})
        keys = ("policy", "max_consecutive", "check_gradients", "explode_factor", "on_explode")
        unknown = sorted(set(node) - set(keys))
        if unknown:
            raise ConfigError(f"divergence has unknown key(s) {unknown}; it takes {', '.join(keys)}")
        factor = node.get("explode_factor", 1000.0)
        p = cls(str(node.get("policy", "stop")), int(node.get("max_consecutive", 10)),
                bool(node.get("check_gradients", True)), None if factor is None else float(factor),
                str(node.get("on_explode", "warn")))
        if p.policy not in POLICIES:
            raise ConfigError(f"divergence.policy must be one of {POLICIES}, got {p.policy!r}")
        if p.max_consecutive < 1:
            raise ConfigError(f"divergence.max_consecutive must be >= 1, got {p.max_consecutive}")
        if p.explode_factor is not None and p.explode_factor <= 1:
            raise ConfigError(f"divergence.explode_factor must be > 1 (or null: off), got {p.explode_factor}")
        if p.on_explode not in EXPLODE_ACTIONS:
            raise ConfigError(f"divergence.on_explode must be one of {EXPLODE_ACTIONS}, got {p.on_explode!r}")
        return p


@dataclass
class LossWatch:
    """Watches the step losses for one that explodes but stays finite: above `factor` times the
    median of the last `EXPLODE_WINDOW` finite losses (once `EXPLODE_WARMUP` were seen) and above
    1. Its state (the window and the step of the last warning) is saved in checkpoints.

    Args:
        factor: the factor over the running median (None: never judges).
    """

    factor: float | None
    history: list[float] = field(default_factory=list)
    warned_at: int | None = None

    def judge(self, step: int, loss: float) -> str | None:
        """Record `loss` of `step`; a sentence when it explodes (None otherwise, and for the
        steps after a warning within one window, so that a long explosion warns once)."""
        seen = len(self.history)
        median = statistics.median(self.history) if seen >= EXPLODE_WARMUP else None
        if loss == loss and abs(loss) != float("inf"):
            self.history = [*self.history, loss][-EXPLODE_WINDOW:]
        if median is None or self.factor is None or not (loss > max(self.factor * abs(median), 1.0)):
            return None
        if self.warned_at is not None and step - self.warned_at < EXPLODE_WINDOW:
            return None
        self.warned_at = step
        return (f"step {step}: the loss {loss:.4g} is {loss / max(abs(median), 1e-30):.3g}x the median of the last "
                f"{seen} steps ({median:.4g}): training is exploding "
                f"(divergence.explode_factor={self.factor:g})")

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "warned_at": self.warned_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = [float(v) for v in state.get("history", [])][-EXPLODE_WINDOW:]
        self.warned_at = state.get("warned_at")


def non_finite_flags(logs: Mapping[str, Tensor], params: Iterable[tuple[str, nn.Parameter]],
                     check_gradients: bool) -> tuple[Tensor, Tensor, list[str]]:
    """Whether each logged value `[L]` and each gradient `[P]` is non-finite (no host sync), and
    the names of the parameters with gradients."""
    values = [v.detach().float().reshape(-1)[:1] for v in logs.values()]
    bad_logs = ~torch.isfinite(torch.cat(values)) if values else torch.zeros(0, dtype=torch.bool)
    names, grads = [], []
    if check_gradients:
        for name, p in params:
            if p.grad is not None:
                names.append(name)
                grads.append(p.grad)
    if grads:
        norms = torch.stack(torch._foreach_norm(grads)).float()
        bad_grads = ~torch.isfinite(norms)
    else:
        bad_grads = torch.zeros(0, dtype=torch.bool, device=bad_logs.device)
    return bad_logs, bad_grads, names


def describe(step: int, logs: Mapping[str, Tensor], bad_logs: Tensor, bad_grads: Tensor, names: list[str]) -> str:
    """One sentence: which loss terms and which parameters' gradients are not finite at `step`."""
    keys = list(logs)
    terms = [f"{keys[i]} = {float(logs[keys[i]]):g}" for i in bad_logs.nonzero().flatten().tolist()]
    params = [names[i] for i in bad_grads.nonzero().flatten().tolist()]
    parts = []
    if terms:
        parts.append("the loss is not finite (" + ", ".join(terms) + ")")
    if params:
        more = f" and {len(params) - 3} more" if len(params) > 3 else ""
        parts.append(f"gradients are not finite in {', '.join(params[:3])}{more}")
    return f"step {step}: " + ("; ".join(parts) or "a non-finite value on another rank")


def buffer_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copies of the buffers (BatchNorm statistics and batch counts) of `module`."""
    return {k: b.detach().clone() for k, b in module.named_buffers()}


@torch.no_grad()
def restore_buffers(module: nn.Module, snapshot: Mapping[str, Tensor]) -> None:
    """Put the snapshot's buffers back."""
    buffers = dict(module.named_buffers())
    for k, v in snapshot.items():
        buffers[k].copy_(v)


class DivergenceGuard:
    """The divergence check of a training module: one per module, called from its hooks.

    `before_step` snapshots the BatchNorm statistics when steps may be skipped; `check` runs before
    the optimizer step: one reduction across ranks and one host read of the non-finite flag, the
    largest loss and whether any rank was asked to stop (a signal), then stops (DivergenceError),
    or drops the step's gradients and puts the statistics back. `skipped` says whether this step
    was dropped (memory banks and the teacher then leave it out). Its counters and the loss watch
    are checkpoint state (`state_dict`).

    Args:
        policy: the `divergence` config, checked (DivergencePolicy).
    """

    def __init__(self, policy: DivergencePolicy) -> None:
        self.policy = policy
        self.loss_watch = LossWatch(policy.explode_factor)
        self.skipped_steps = 0
        self.skips_in_a_row = 0
        self.skipped = False
        self._statistics: dict[str, Tensor] = {}

    def before_step(self, net: nn.Module) -> None:
        """At the start of a step: not skipped yet; under `policy: skip`, the buffers kept."""
        self.skipped = False
        if self.policy.policy == "skip":
            self._statistics = buffer_snapshot(net)

    def check(self, step: int, logs: Mapping[str, Tensor], net: nn.Module, optimizer: torch.optim.Optimizer,
              reduce_max: Any, check_gradients: bool, stop_requested: bool) -> bool:
        """Judge step `step` from its logged values `logs` (`train/loss` among them) and `net`'s
        gradients; return whether any rank was asked to stop.

        `reduce_max(tensor) -> tensor` is the strategy's max over ranks; `check_gradients` is off
        under a GradScaler (the scaler handles non-finite gradients)."""
        bad_logs, bad_grads, names = non_finite_flags(logs, net.named_parameters(),
                                                      self.policy.check_gradients and check_gradients)
        device = next(net.parameters()).device
        flag = torch.cat([bad_logs.to(device), bad_grads.to(device)]).any().float()
        loss = logs.get("train/loss", flag.new_zeros(())).detach().float().reshape(())
        requested = flag.new_tensor(float(stop_requested))
        # the largest loss of any rank, so that every rank watches the same values: one host sync per step
        bad, largest, stop = reduce_max(torch.stack([flag, loss, requested])).tolist()
        if bad == 0.0:
            self.skips_in_a_row = 0
            self._judge_explosion(step, largest)
            return stop > 0
        what = describe(step, logs, bad_logs, bad_grads, names)
        if self.policy.policy == "stop":
            raise DivergenceError(
                f"{what}. Stopped before the optimizer step: the weights and every checkpoint written so far hold "
                "the state before it. Lower optim.lr, check the data, or set divergence.policy=skip."
            )
        optimizer.zero_grad(set_to_none=True)  # the optimizer leaves every parameter (and its moments) alone
        restore_buffers(net, self._statistics)
        self.skipped = True
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        rank_zero_warn(f"{what}: step skipped ({self.skips_in_a_row} in a row, {self.skipped_steps} in all)")
        if self.skips_in_a_row >= self.policy.max_consecutive:
            raise DivergenceError(f"{what}: {self.skips_in_a_row} steps in a row were not finite "
                                  f"(divergence.max_consecutive={self.policy.max_consecutive}); stopping. "
                                  "Lower optim.lr or check the data.")
        return stop > 0

    def _judge_explosion(self, step: int, largest: float) -> None:
        exploding = self.loss_watch.judge(step, largest)
        if exploding and self.policy.on_explode == "stop":
            raise DivergenceError(f"{exploding}. Stopped before the optimizer step: the weights and every checkpoint "
                                  "written so far hold the state before it. Lower optim.lr or check the data.")
        if exploding:
            rank_zero_warn(f"{exploding}. Lower optim.lr or check the data; divergence.on_explode=stop stops such "
                           "a run, divergence.explode_factor=null silences this.")

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys (`checkpoint["segcon"]`): skipped_steps, skips_in_a_row, loss_watch."""
        return {"skipped_steps": self.skipped_steps, "skips_in_a_row": self.skips_in_a_row,
                "loss_watch": self.loss_watch.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], resuming: bool) -> None:
        """From `checkpoint["segcon"]`; the run of skips and the loss watch only when resuming a fit."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if resuming:
            self.skips_in_a_row = int(state.get("skips_in_a_row", 0))
            self.loss_watch.load_state_dict(state.get("loss_watch", {}))
