"""Optimizers with a head learning-rate multiplier, the poly schedule with linear warm-up, and the
learning rate of a run's global batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from segcon.models.base import SegModel
from segcon.utils.errors import ConfigError


def poly_factor(
    step: int,
    total_steps: int,
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-6,
    min_lr_ratio: float = 0.0,
) -> float:
    """LR multiplier at optimizer step `step` (0-based).

    Poly decay `(1 - step / total_steps) ** power`, floored at `min_lr_ratio`; during the first
    `warmup_steps` steps it is further scaled by a linear ramp from `warmup_ratio` to 1 (mmseg's
    linear warm-up).
    """
    progress = min(step, total_steps) / max(total_steps, 1)
    factor = (1.0 - min_lr_ratio) * (1.0 - progress) ** power + min_lr_ratio
    if step < warmup_steps:
        factor *= warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    return factor


def build_optimizer(
    encoder_params: Sequence[nn.Parameter],
    head_params: Sequence[nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float,
    head_lr_mult: float = 1.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """SGD or AdamW over two groups: the backbone at `lr`, everything else at `lr * head_lr_mult`."""
    groups = [
        {"params": [p for p in encoder_params if p.requires_grad], "lr": lr, "name": "encoder"},
        {"params": [p for p in head_params if p.requires_grad], "lr": lr * head_lr_mult, "name": "head"},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    raise ConfigError(f"optim.name must be sgd or adamw, got {name!r}")


def optimization(net: SegModel, optim: Mapping[str, Any], total_steps: int, global_batch: int | None) -> dict[str, Any]:
    """What `configure_optimizers` returns for `net` (its `parameter_groups`) under the `optim`
    config: the optimizer at the learning rate of the run's `global_batch` (`lr_for_batch`, with
    the note it prints; None: `optim.lr` as it is), and the poly schedule stepped every optimizer
    step over `total_steps` (none with `scheduler.name: constant`)."""
    cfg = dict(optim)
    sched = dict(cfg.pop("scheduler", {}) or {})
    scale_lr, base_batch = str(cfg.pop("scale_lr", "none")), cfg.pop("base_batch", None)
    cfg.pop("freeze_encoder", None)  # applied when the module is built (`freeze_encoder`)
    if global_batch is not None:
        lr, note = lr_for_batch(float(cfg["lr"]), base_batch, global_batch, scale_lr)
        if note:
            (rank_zero_info if lr != cfg["lr"] else rank_zero_warn)(note)
        cfg["lr"] = lr
    groups = net.parameter_groups()
    optimizer = build_optimizer(groups["encoder"], groups["head"], **cfg)
    kind = sched.pop("name", "poly")
    if kind == "constant":
        return {"optimizer": optimizer}
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_factor(step, total_steps, **sched))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def freeze_encoder(net: SegModel) -> int:
    """Stop training the backbone (`optim.freeze_encoder`): its parameters need no gradient, so
    the optimizer leaves them out and DDP does not wait for them. Returns how many tensors."""
    params = net.parameter_groups()["encoder"]
    for p in params:
        p.requires_grad_(False)
    return len(params)


SCALE_MODES = ("none", "linear")


def global_batch(per_device: int, trainer: Any) -> int:
    """Images per optimizer step: the per-device batch x the devices x the batches accumulated
    into one step (`trainer.accumulate_grad_batches`)."""
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


def lr_for_batch(lr: float, base_batch: int | None, global_batch: int, scale_lr: str = "none") -> tuple[float, str | None]:
    """The learning rate for this run's global batch, and what to tell the user.

    `base_batch` is the global batch (per device x devices x nodes x batches accumulated into one
    optimizer step) the preset's `lr` was tuned for; None means unknown, and nothing is done.
    "linear" multiplies the lr by global_batch / base_batch; "none" keeps it and says so when the
    batches differ.
    """
    if scale_lr not in SCALE_MODES:
        raise ConfigError(f"optim.scale_lr must be one of {SCALE_MODES}, got {scale_lr!r}")
    if base_batch is None or base_batch == global_batch:
        return lr, None
    if scale_lr == "linear":
        new = lr * global_batch / base_batch
        return new, (f"optim.lr {lr:g} was tuned for a global batch of {base_batch}; this run's is {global_batch}: "
                     f"lr {new:g} (optim.scale_lr=linear)")
    return lr, (f"optim.lr {lr:g} was tuned for a global batch of {base_batch}, this run's is {global_batch}; "
                "the lr is kept. optim.scale_lr=linear rescales it.")
