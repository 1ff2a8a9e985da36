"""Helpers for what crosses training processes outside Lightning's tensor collectives."""

from __future__ import annotations

from typing import Any

import torch


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """`obj` of every rank, in rank order (a one-element list in a single process). Collective:
    every rank must call it. For small per-run state (random states, file lists), not per-step data."""
    if world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out
