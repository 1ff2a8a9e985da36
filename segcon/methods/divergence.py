"""What a training step does when its loss or gradients are not finite (`divergence` config).

The check runs after the backward pass and before the optimizer step, so a non-finite step never
reaches the weights: with `policy: stop` the run ends there with one DivergenceError naming the
step, the non-finite loss terms and the first parameters with non-finite gradients (the weights,
and every checkpoint written so far, hold the state before it); with `policy: skip` the step's
gradients are dropped (the optimizer leaves every parameter alone, moments included), the
BatchNorm statistics the forward pass moved are put back, nothing enters memory banks or the
teacher, the step is counted, and `max_consecutive` skipped steps in a row stop the run.

All ranks take the same decision (the flag is reduced across ranks). Under a GradScaler
(`16-mixed`) non-finite gradients are the scaler's business (it skips those steps and lowers its
scale): only the loss is checked there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from segcon.utils.errors import ConfigError, SegconError

POLICIES = ("stop", "skip")


class DivergenceError(SegconError, RuntimeError):
    """Training produced a non-finite loss or gradient (names the step and the terms)."""


@dataclass(frozen=True)
class DivergencePolicy:
    """`policy` (stop | skip), `max_consecutive` skipped steps in a row before stopping, and
    whether gradients are checked besides the loss."""

    policy: str = "stop"
    max_consecutive: int = 10
    check_gradients: bool = True

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> DivergencePolicy:
        """From the `divergence` config node, checked (errors name the key)."""
        node = dict(node or {})
        unknown = sorted(set(node) - {"policy", "max_consecutive", "check_gradients"})
        if unknown:
            raise ConfigError(f"divergence has unknown key(s) {unknown}; it takes policy, max_consecutive, check_gradients")
        p = cls(str(node.get("policy", "stop")), int(node.get("max_consecutive", 10)),
                bool(node.get("check_gradients", True)))
        if p.policy not in POLICIES:
            raise ConfigError(f"divergence.policy must be one of {POLICIES}, got {p.policy!r}")
        if p.max_consecutive < 1:
            raise ConfigError(f"divergence.max_consecutive must be >= 1, got {p.max_consecutive}")
        return p


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
