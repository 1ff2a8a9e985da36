"""The term contract (segcon.objectives.base.Term), the twin of the model-contract test: every
option of the `loss`, `pseudo_loss` and `contrast` groups, built from its shipped config

- computes the same value on `SegOutput.cat([output], only=term.reads)` as on the whole output
  (what a method that assembles an output from several passes gives it: a field read but not
  declared is missing there);
- has a `zero` that reaches exactly the parameters its value reaches (DDP sees the same used
  parameters while the term waits in its warm-up);
- survives a supervised warm-up: targets without a teacher and without labeled rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from segcon.build import build_module
from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.supervised import PixelLoss

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if p.stem != "none")


def _setting(group: str, option: str) -> list[str]:
    """Overrides that build a module whose objective holds `group=option`."""
    if group == "contrast" and option == "confidence":
        return ["method=confidence_ssl", "contrast=confidence"]
    if group == "contrast" and option == "rc2l":
        return ["model=maskformer_r18_light", "loss=mask_set", "method=rc2l", "contrast=rc2l",
                "contrast.rc2l.confidence_threshold=0.0", "contrast.rc2l.min_area=1"]
    if group == "contrast" and option == "contextrast_vit":
        from tests.test_dpt import TINY_DPT

        return [*TINY_DPT, "contrast=contextrast_vit"]
    if group == "loss" and option == "mask_set":
        return ["model=maskformer_r18_light", "loss=mask_set"]
    if group == "pseudo_loss":
        return ["method=mean_teacher", f"pseudo_loss={option}"]
    return [f"{group}={option}"]


CASES = [(g, o) for g in ("loss", "pseudo_loss", "contrast") for o in _options(g)]


def _case(tiny_cfg: Callable[..., DictConfig], overrides: list[str]):
    module = build_module(tiny_cfg(*overrides))
    net = module.net.train()
    k = module.num_classes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 64, 64, generator=g)
    labels = torch.randint(0, k, (4, 64, 64), generator=g)
    labels[:, :4] = IGNORE
    confidence = torch.rand(4, 64, 64, generator=g) * 0.4 + 0.6
    confidence[:2] = 1.0
    teacher = None
    if hasattr(module, "teacher"):
        with torch.no_grad():
            teacher = module.teacher.forward_features(x[2:])
        teacher.valid = torch.ones(2, 64, 64, dtype=torch.bool)
    targets = Targets(labels, IGNORE, confidence, labeled=torch.tensor([True, True, False, False]), teacher=teacher)
    return module, net, x, targets


def _forward(net: torch.nn.Module, x: torch.Tensor) -> SegOutput:
    torch.manual_seed(5)  # dropout (MaskFormer's decoder) draws alike in every pass
    return net(x)


def _value(term: Term, output: SegOutput, targets: Targets) -> torch.Tensor:
    torch.manual_seed(1)  # the samplers' draws
    value = term(output, targets)
    return sum(value.values()) if isinstance(value, dict) else value


def _reached(net: torch.nn.Module, loss: torch.Tensor) -> set[str]:
    net.zero_grad(set_to_none=True)
    loss.backward()
    return {name for name, p in net.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_term_keeps_the_contract(tiny_cfg: Callable[..., DictConfig], group: str, option: str) -> None:
    module, net, x, targets = _case(tiny_cfg, _setting(group, option))
    terms = {"loss": module.objective.supervised, "pseudo_loss": module.objective.pseudo,
             "contrast": module.objective.contrast}[group]
    assert terms, f"{group}={option} built no term"
    for name, term in terms.items():
        assert isinstance(term, Term)
        if term.needs_class_frequencies:
            term.set_class_frequencies([1.0 / module.num_classes] * module.num_classes)
        assert not term.needs_class_frequencies
        whole = _value(term, _forward(net, x), targets)
        only = _value(term, SegOutput.cat([_forward(net, x)], only=term.reads), targets)
        assert torch.isfinite(whole) and torch.allclose(whole, only), (name, whole, only)
        by_value = _reached(net, _value(term, _forward(net, x), targets))
        by_zero = _reached(net, term.zero(_forward(net, x)))
        assert by_value and by_value == by_zero, (name, sorted(by_value ^ by_zero)[:5])
        warm_up = _value(term, _forward(net, x), Targets(targets.labels, IGNORE))  # no teacher, no labeled rows
        assert torch.isfinite(warm_up), name


def test_per_pixel_terms_are_terms_on_the_logits() -> None:
    """A per-pixel loss as a term reads the logits, the labels and the weights, as its
    `pixel_loss` does."""
    from segcon.objectives.supervised import CrossEntropyLoss

    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)
    keep = torch.rand(2, 8, 8, generator=g) > 0.5
    ce = CrossEntropyLoss()
    assert isinstance(ce, PixelLoss) and ce.per_pixel and ce.reads == {"logits"}
    targets = Targets(labels, IGNORE, keep=keep)
    assert torch.equal(ce(SegOutput(logits=logits), targets), ce.pixel_loss(logits, labels, targets.weight))


def test_class_frequencies_reach_the_terms_a_term_applies(tiny_cfg: Callable[..., DictConfig]) -> None:
    """CAC's weight branch applies the supervised group: with loss=imbalance it needs the class
    frequencies too (before the capability was declared on Term, its imbalance loss never got
    them and training stopped with 'the class frequencies are not set')."""
    from segcon.train import train

    cfg = tiny_cfg("contrast=cac", "loss=imbalance", "trainer.max_steps=2")
    module = build_module(cfg)
    branch = module.objective.contrast["weight_branch"]
    assert branch.needs_class_frequencies and module.objective.supervised["imbalance"].needs_class_frequencies
    branch.set_class_frequencies([0.5, 0.2, 0.1, 0.1, 0.1])
    assert not branch.needs_class_frequencies
    assert torch.equal(branch.terms["imbalance"].frequencies, torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1]))
    train(cfg)  # the training module hands the counted frequencies to both
    assert (Path(cfg.paths.output_dir) / "metrics.json").is_file()
