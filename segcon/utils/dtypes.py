"""Precision helpers for code that must stay accurate under mixed precision."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32 if it is in a half-precision type (exp/log sums and sums over many pixels
    stay accurate under mixed precision); float32 and float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
