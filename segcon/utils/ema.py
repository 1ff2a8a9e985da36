"""Exponential moving average of a network (the mean teacher of METHODS.md §0' and the shared
building blocks table)."""

from __future__ import annotations

import torch
from torch import nn


def ema_momentum(step: int, momentum_max: float) -> float:
    """`m = min(1 - 1 / (t + 1), m_max)`: 0 at t = 0 (the teacher starts as a copy of the student),
    then rising to `momentum_max`, so the early teacher follows the fast-changing student."""
    return min(1.0 - 1.0 / (step + 1), momentum_max)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """`teacher <- momentum * teacher + (1 - momentum) * student` for every parameter and every
    floating-point buffer of the teacher (BatchNorm running statistics included); integer buffers
    (BatchNorm's `num_batches_tracked`) are copied. The student must hold every tensor of the
    teacher under the same name (it may hold more: train-only heads the teacher does not keep)."""
    t_state, s_state = _tensors(teacher), _tensors(student)
    missing = sorted(t_state.keys() - s_state.keys())
    if missing:
        raise ValueError(f"the student lacks teacher tensors {missing[:5]}: teacher and student differ")
    floats = [k for k, v in t_state.items() if v.is_floating_point()]
    if floats:
        torch._foreach_lerp_([t_state[k] for k in floats], [s_state[k].to(t_state[k].dtype) for k in floats], 1.0 - momentum)
    for k, v in t_state.items():
        if not v.is_floating_point():
            v.copy_(s_state[k])


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}
