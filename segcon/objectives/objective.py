"""Objective: the weighted sum of named loss terms, each with its own warm-up schedule.

Three config groups feed it, each mapping a term name to `{_target_, weight, warmup_steps,
ramp_steps, <term kwargs>}`:

- `loss`: terms on labeled images and their ground truth (CE by default; may be empty when a
  `contrast` term supervises through the whole output, e.g. a set loss);
- `pseudo_loss`: terms on the unlabeled views of teacher–student methods and their pseudo-labels
  (CE by default; any per-pixel loss works, its per-pixel weight being the confidence filter's keep
  mask); their step counts from the end of the supervised warm-up;
- `contrast`: terms on every image of the step (contrastive, region and auxiliary terms), with
  ground truth and kept pseudo-labels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term
from segcon.utils.errors import ConfigError
from segcon.utils.targets import instantiate, locate

PSEUDO = "unsup"
"""The log name of the pseudo-label loss (`train/loss_unsup`, `train/weight_unsup`)."""


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


class TermGroup(nn.ModuleDict):
    """The terms of one config group by name, with their schedules (default: weight 1 always)."""

    def __init__(self, terms: Mapping[str, Term] | None = None,
                 schedules: Mapping[str, TermSchedule] | None = None) -> None:
        super().__init__(dict(terms or {}))
        self.schedules = {name: (schedules or {}).get(name, TermSchedule()) for name in self}


def _as_group(terms: TermGroup | Mapping[str, Term] | None) -> TermGroup:
    return terms if isinstance(terms, TermGroup) else TermGroup(terms)


class Objective(nn.Module):
    """total = sum over terms of weight(step) * term.

    Every term (segcon.objectives.base.Term) gets `(output, targets)` and returns a scalar or a
    dict of named scalars (summed, each logged). A term whose scheduled weight is 0 at a step (in its warm-up)
    is not computed: the Objective adds the term's connected zero (`Term.zero`) instead, so DDP
    still sees every parameter used and nothing is spent on it. Logged per step: `loss_<name>`
    (unweighted) for every computed term, `weight_<name>` for scheduled terms, `loss` (the total).

    Deep supervision: when the output carries side outputs (`side_logits`, a fusion
    network's), each supervised per-pixel term (`Term.per_pixel`) also applies to every side output s with weight
    `side_weights[s]`; `loss_<name>_side` logs that weighted sum, which joins the term's value
    (and its schedule).
    """

    def __init__(
        self,
        supervised: TermGroup | Mapping[str, Term] | None = None,
        contrast: TermGroup | Mapping[str, Term] | None = None,
        pseudo: TermGroup | Mapping[str, Term] | None = None,
        side_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.side_weights = None if side_weights is None else [float(w) for w in side_weights]
        self.supervised, self.contrast, self.pseudo = _as_group(supervised), _as_group(contrast), _as_group(pseudo)
        clash = sorted(set(self.supervised) & set(self.contrast))
        if clash:
            raise ConfigError(f"loss and contrast terms share the name(s) {clash}; rename one")
        if not self.supervised and not self.contrast:
            raise ConfigError("the objective has no term: choose a supervised loss (e.g. loss=ce), or a contrast "
                              "term that supervises through the whole output")
        for group, terms in (("loss", self.supervised), ("pseudo_loss", self.pseudo), ("contrast", self.contrast)):
            for name, term in terms.items():
                if not isinstance(term, Term):
                    raise ConfigError(f"{group}.{name}: {type(term).__name__} is not a Term (segcon.objectives.base)")
        for name, term in self.pseudo.items():
            if not term.per_pixel:
                raise ConfigError(f"pseudo_loss.{name}: {type(term).__name__} is not a per-pixel loss; the loss on "
                                  "pseudo-labels reads each view's logits (terms on the whole output belong in contrast)")

    def terms(self) -> Iterator[tuple[str, Term]]:
        """Every (name, term) of every group."""
        for group in (self.supervised, self.pseudo, self.contrast):
            yield from group.items()

    def contrast_reads(self) -> frozenset[str]:
        """The SegOutput fields the contrast terms read (a method assembling their output from
        several passes copies only these)."""
        return frozenset().union(*(t.reads for t in self.contrast.values()))

    @property
    def reads_teacher(self) -> bool:
        """Whether a term reads the teacher's output (`Targets.teacher`)."""
        return any(t.reads_teacher for _, t in self.terms())

    def forward(self, output: SegOutput, targets: Targets, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The supervised and contrast terms on one batch: the total loss and a dict of detached
        values to log."""
        sup, logs = self.supervised_loss(output, targets, step)
        con, con_logs = self.contrast_loss(output, targets, step)
        total = sup + con
        return total, {**logs, **con_logs, "loss": total.detach()}

    def supervised_loss(self, output: SegOutput, targets: Targets, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted `loss` terms (ground truth, and the side outputs' deep supervision) and
        their logs."""
        return self._group(self.supervised, output, targets, step, sides=True)

    def contrast_loss(self, output: SegOutput, targets: Targets, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted `contrast` terms (0 without any) and their logs."""
        return self._group(self.contrast, output, targets, step)

    def pseudo_loss(
        self, output: SegOutput, targets: Targets, step: int, view: str = ""
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted `pseudo_loss` terms on one unlabeled view (`step`: steps since the
        unsupervised phase began), logged as `loss_unsup<view>` (one term) or
        `loss_unsup_<name><view>` (several), with `weight_unsup[_<name>]` every step."""
        if not self.pseudo:
            raise ConfigError("the pseudo_loss group defines no term; a teacher-student method needs one "
                              "(pseudo_loss=ce is the default)")
        single = len(self.pseudo) == 1
        return self._group(self.pseudo, output, targets, step,
                           label=lambda name: PSEUDO if single else f"{PSEUDO}_{name}", suffix=view, always_weight=True)

    def _group(
        self,
        terms: TermGroup,
        output: SegOutput,
        targets: Targets,
        step: int,
        label: Callable[[str], str] = str,
        suffix: str = "",
        always_weight: bool = False,
        sides: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logs: dict[str, Tensor] = {}
        total: Tensor | None = None
        side_logits = self._side_logits(output) if sides else []
        for name, term in terms.items():
            schedule = terms.schedules[name]
            weight = schedule(step)
            value = self._value(term, output, targets, weight, logs, f"{label(name)}{suffix}")
            if side_logits and term.per_pixel and weight != 0.0:
                side = sum(w * term.pixel_loss(s, targets.labels, targets.weight)
                           for w, s in zip(self.side_weights, side_logits, strict=True))
                logs[f"loss_{label(name)}_side{suffix}"] = side.detach()
                value = value + side
            if always_weight or schedule.warmup_steps or schedule.ramp_steps:
                logs[f"weight_{label(name)}"] = value.new_tensor(weight).detach()
            weighted = value if weight == 1.0 else weight * value  # 1.0 * x is x: no kernel for it
            total = weighted if total is None else total + weighted
        return (output.logits.new_zeros(()) if total is None else total), logs

    def _side_logits(self, output: SegOutput) -> list[Tensor]:
        """The output's side outputs, checked against `side_weights` (none without them)."""
        sides = output.side_logits
        if not sides:
            return []
        if self.side_weights is None or len(self.side_weights) != len(sides):
            raise ConfigError(f"the model returns {len(sides)} side outputs; model.side_weights must give one weight "
                              f"each (got {self.side_weights})")
        return sides

    @staticmethod
    def _value(
        term: Term, output: SegOutput, targets: Targets, weight: float, logs: dict[str, Tensor], name: str
    ) -> Tensor:
        """The term's (unweighted) value, logged as `loss_<name>`; its connected zero, unlogged,
        while `weight` is 0."""
        if weight == 0.0:
            return term.zero(output)
        value = term(output, targets)
        if isinstance(value, Mapping):
            for sub, v in value.items():
                logs[f"loss_{name}/{sub}"] = v.detach()
            value = sum(value.values())
        logs[f"loss_{name}"] = value.detach()
        return value


def with_data_settings(spec: Any, settings: Mapping[str, Any], key: str) -> Any:
    """`spec` with the data-wide `settings` (`num_classes`, `ignore_index`) handed to every
    `_target_` in it (nested ones included: samplers, the weight branch's terms) whose constructor
    takes them and that does not set them itself: the values live in the data config alone."""
    if isinstance(spec, Mapping):
        out = {k: with_data_settings(v, settings, f"{key}.{k}") for k, v in spec.items()}
        if "_target_" in out:
            try:
                params = inspect.signature(locate(out["_target_"], f"{key}._target_")).parameters
            except (TypeError, ValueError):  # no signature to read: nothing is handed over
                return out
            out.update({k: v for k, v in settings.items() if k in params and k not in out})
        return out
    if isinstance(spec, list | tuple):
        return [with_data_settings(v, settings, f"{key}[{i}]") for i, v in enumerate(spec)]
    return spec


def build_terms(group: Mapping[str, Any] | None, key: str, settings: Mapping[str, Any] | None = None) -> TermGroup:
    """The terms of a config group with their schedules (`key` names the group in errors), each
    given the data-wide `settings` it takes (`with_data_settings`)."""
    terms: dict[str, Term] = {}
    schedules: dict[str, TermSchedule] = {}
    group = with_data_settings(dict(group or {}), settings or {}, key)
    for name, spec in group.items():
        if spec is None:  # switched off (e.g. an experiment replacing an inherited term)
            continue
        if isinstance(spec, Mapping) and "_target_" not in spec:
            # e.g. an experiment's warm-up for its term, left behind by `contrast=none`
            raise ConfigError(f"{key}.{name} sets {sorted(spec)} but no _target_: the {key} group chosen does not "
                              f"define {name!r}. Switch it off with {key}.{name}=null, or choose a {key} group "
                              "that defines it")
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key}.{name} must be a mapping with a _target_ (a loss class), or null")
        spec = dict(spec)
        schedules[name] = TermSchedule(
            weight=float(spec.pop("weight", 1.0)),
            warmup_steps=int(spec.pop("warmup_steps", 0)),
            ramp_steps=int(spec.pop("ramp_steps", 0)),
        )
        terms[name] = instantiate(spec, f"{key}.{name}", _convert_="all")
    return TermGroup(terms, schedules)


def build_objective(
    loss: Mapping[str, Any] | None,
    contrast: Mapping[str, Any] | None = None,
    pseudo: Mapping[str, Any] | None = None,
    side_weights: Sequence[float] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Objective:
    """An Objective from the `loss`, `contrast` and `pseudo_loss` config groups (and the
    model's deep-supervision weights), every term given the data-wide `settings` it takes
    (`{num_classes, ignore_index}` of the data config)."""
    return Objective(build_terms(loss, "loss", settings), build_terms(contrast, "contrast", settings),
                     build_terms(pseudo, "pseudo_loss", settings), side_weights)
