"""The one caller of the terms' declared capabilities (`Term`): the class frequencies the terms
that weigh classes need, the memories the memory-using terms fill after each step, and the
terms' diagnostics on logging steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from segcon.objectives.objective import Objective
from segcon.utils.errors import ConfigError


def give_class_frequencies(objective: Objective, datamodule: Any, class_names: Sequence[str]) -> dict[str, float]:
    """Give every term that `needs_class_frequencies` (loss=imbalance) the class frequencies of
    the labeled training images, counted by the datamodule (or read from its cache), and print
    them. Returns them as `{"class_frequency/<class>": share}` for the run's hyper-parameters
    (empty when no term needs them)."""
    terms = [(name, t) for name, t in objective.terms() if t.needs_class_frequencies]
    if not terms:
        return {}
    if not hasattr(datamodule, "class_frequencies"):
        raise ConfigError(f"the terms {[n for n, _ in terms]} need the labeled images' class frequencies, which "
                          f"{type(datamodule).__name__} cannot count; give them as <term>.frequencies=[...]")
    counted = datamodule.class_frequencies()
    for _, term in terms:
        term.set_class_frequencies(counted.frequencies)
    shares = ", ".join(f"{c} {100 * f:.3f} %" for c, f in zip(class_names, counted.frequencies, strict=True))
    source = f"read from {counted.path}" if counted.from_cache else "counted" + (f", kept in {counted.path}" if counted.path else "")
    rank_zero_info(f"class frequencies of the {counted.images} labeled images ({source}): {shares}")
    return {f"class_frequency/{c}": f for c, f in zip(class_names, counted.frequencies, strict=True)}


def fill_memories(objective: Objective, all_gather: Callable[[Tensor], Tensor], world_size: int) -> None:
    """Enqueue every memory-using term's pending entries of this step from all ranks, in rank
    order (`all_gather` is the module's: `[M, ...]` -> `[world, M, ...]` with several ranks)."""
    for _, term in objective.terms():
        for memory, (feats, labels) in term.pending_entries().items():
            feats, labels = all_gather(feats), all_gather(labels)
            if world_size > 1:  # [world, M, ...] -> [world * M, ...], rank order
                feats, labels = feats.flatten(0, 1), labels.flatten(0, 1)
            term.enqueue(memory, feats, labels)


def term_diagnostics(objective: Objective, class_names: Sequence[str]) -> dict[str, Tensor]:
    """Every term's diagnostics of its last computed step (`Term.diagnostics`), as
    `{"<term>/<name>": value}`."""
    return {f"{name}/{key}": value for name, term in objective.terms()
            for key, value in term.diagnostics(class_names).items()}
