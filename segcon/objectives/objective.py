"""Objective: the weighted sum of named loss terms, each with its own warm-up schedule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from torch import Tensor, nn

from segcon.models.segnet import SegOutput
from segcon.utils.errors import ConfigError


@dataclass(frozen=True)
class TermSchedule:
    """weight(step): 0 for the first `warmup_steps` steps, then a linear ramp over `ramp_steps`
    steps (none if 0) up to `weight`."""

    weight: float = 1.0
    warmup_steps: int = 0
    ramp_steps: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.0
        if self.ramp_steps > 0:
            return self.weight * min(1.0, (step - self.warmup_steps + 1) / self.ramp_steps)
        return self.weight


class Objective(nn.Module):
    """total = sum over terms of weight(step) * term.

    Supervised terms are plain losses `(logits [B, K, h, w], target [B, H, W]) -> scalar`.
    Contrastive terms read the whole `SegOutput`: `(output, target, confidence | None) -> scalar`
    or a dict of named scalars (summed). A term in warm-up is still computed and added with
    weight 0, so every parameter it touches stays in the graph (DDP needs no unused-parameter
    search).
    """

    def __init__(
        self,
        supervised: Mapping[str, nn.Module],
        contrast: Mapping[str, nn.Module] | None = None,
        schedules: Mapping[str, TermSchedule] | None = None,
    ) -> None:
        super().__init__()
        contrast = contrast or {}
        clash = set(supervised) & set(contrast)
        if clash:
            raise ConfigError(f"loss and contrast terms share the name(s) {sorted(clash)}; rename one")
        if not supervised:
            raise ConfigError("the loss group defines no term; choose e.g. loss=ce")
        self.supervised = nn.ModuleDict(supervised)
        self.contrast = nn.ModuleDict(contrast)
        self.schedules = dict(schedules or {})

    def forward(
        self, output: SegOutput, target: Tensor, step: int, confidence: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the total loss and a dict of detached values to log: `loss_<name>` for every
        term (unweighted), `weight_<name>` for scheduled weights, and `loss` (the total)."""
        sup, logs = self.supervised_loss(output.logits, target, step)
        con, con_logs = self.contrast_loss(output, target, step, confidence)
        total = sup + con
        logs = {**logs, **con_logs, "loss": total.detach()}
        return total, logs

    def supervised_loss(self, logits: Tensor, target: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted supervised terms on `logits [B, K, h, w]` and their logs."""
        logs: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, term in self.supervised.items():
            total = self._add(total, logs, name, term(logits, target), step)
        assert total is not None
        return total, logs

    def contrast_loss(
        self, output: SegOutput, target: Tensor, step: int, confidence: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted contrastive terms (0 without any) and their logs."""
        logs: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, term in self.contrast.items():
            value = term(output, target, confidence)
            if isinstance(value, Mapping):
                for sub, v in value.items():
                    logs[f"loss_{name}/{sub}"] = v.detach()
                value = sum(value.values())
            total = self._add(total, logs, name, value, step)
        return (output.logits.new_zeros(()) if total is None else total), logs

    def _add(self, total: Tensor | None, logs: dict[str, Tensor], name: str, value: Tensor, step: int) -> Tensor:
        schedule = self.schedules.get(name, TermSchedule())
        weight = schedule(step)
        logs[f"loss_{name}"] = value.detach()
        if schedule.warmup_steps or schedule.ramp_steps:
            logs[f"weight_{name}"] = value.new_tensor(weight)
        weighted = weight * value
        return weighted if total is None else total + weighted


def build_terms(group: Mapping[str, Any] | None, key: str) -> tuple[dict[str, nn.Module], dict[str, TermSchedule]]:
    """Loss modules and their schedules from a config group (`key` names it in errors)."""
    terms: dict[str, nn.Module] = {}
    schedules: dict[str, TermSchedule] = {}
    for name, spec in (group or {}).items():
        if spec is None:  # switched off (e.g. an experiment replacing an inherited term)
            continue
        if not isinstance(spec, Mapping) or "_target_" not in spec:
            raise ConfigError(f"{key}.{name} must be a mapping with a _target_ (a loss class)")
        spec = dict(spec)
        schedules[name] = TermSchedule(
            weight=float(spec.pop("weight", 1.0)),
            warmup_steps=int(spec.pop("warmup_steps", 0)),
            ramp_steps=int(spec.pop("ramp_steps", 0)),
        )
        terms[name] = instantiate(spec, _convert_="all")
    return terms, schedules


def build_objective(loss: Mapping[str, Any], contrast: Mapping[str, Any] | None = None) -> Objective:
    """An Objective from the `loss` and `contrast` config groups: each maps a term name to
    `{_target_: <loss class>, weight, warmup_steps, ramp_steps, <loss kwargs>}`."""
    supervised, s1 = build_terms(loss, "loss")
    contrastive, s2 = build_terms(contrast, "contrast")
    return Objective(supervised, contrastive, {**s1, **s2})
