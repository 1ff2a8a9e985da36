"""Objective (weighted, scheduled terms), optimizer groups and the poly schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from segcon.methods.optim import build_optimizer, poly_factor
from segcon.models.segnet import SegOutput
from segcon.objectives.objective import Objective, TermSchedule, build_objective
from segcon.objectives.supervised import CrossEntropyLoss, DiceLoss
from segcon.utils.errors import ConfigError


def test_schedule_warmup_then_ramp() -> None:
    s = TermSchedule(weight=2.0, warmup_steps=3, ramp_steps=4)
    assert [s(t) for t in range(9)] == [0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert TermSchedule(0.1, warmup_steps=2)(1) == 0 and TermSchedule(0.1, warmup_steps=2)(2) == 0.1


class _Contrast(nn.Module):
    """A toy contrastive term reading the SegOutput: mean of the decoder feature, in two parts."""

    def forward(self, out: SegOutput, target: torch.Tensor, confidence: torch.Tensor | None) -> dict:
        return {"a": out.decoder.mean(), "b": 2 * out.decoder.mean()}


def test_total_is_weighted_sum_and_every_term_is_logged() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    decoder = torch.randn(2, 8, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    out = SegOutput(logits=logits, decoder=decoder)
    obj = Objective(
        {"ce": CrossEntropyLoss(), "dice": DiceLoss()},
        {"con": _Contrast()},
        {"dice": TermSchedule(0.5), "con": TermSchedule(0.1, warmup_steps=10)},
    )
    ce, dice, con = CrossEntropyLoss()(logits, target), DiceLoss()(logits, target), 3 * decoder.mean()
    total, logs = obj(out, target, step=3)
    torch.testing.assert_close(total, ce + 0.5 * dice)  # contrast still in warm-up
    assert set(logs) == {"loss", "loss_ce", "loss_dice", "loss_con", "loss_con/a", "loss_con/b", "weight_con"}
    assert float(logs["weight_con"]) == 0.0
    total.backward()
    assert decoder.grad is not None  # a term in warm-up stays in the graph (weight 0)
    total, logs = obj(out, target, step=10)
    torch.testing.assert_close(total, ce + 0.5 * dice + 0.1 * con)
    torch.testing.assert_close(logs["loss_con"], con.detach())


def test_build_objective_from_config_groups() -> None:
    loss = {"ce": {"_target_": "segcon.objectives.supervised.CrossEntropyLoss", "weight": 1.0, "ignore_index": 255},
            "dice": {"_target_": "segcon.objectives.supervised.DiceLoss", "weight": 0.5, "warmup_steps": 7}}
    obj = build_objective(loss, {})
    assert set(obj.supervised) == {"ce", "dice"} and obj.schedules["dice"] == TermSchedule(0.5, 7, 0)
    with pytest.raises(ConfigError, match="no term"):
        build_objective({}, {})
    with pytest.raises(ConfigError, match="share the name"):
        build_objective(loss, {"ce": loss["ce"]})


def test_poly_factor_values() -> None:
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(50, 100, power=1.0) == pytest.approx(0.5)
    assert poly_factor(100, 100) == 0.0
    assert poly_factor(50, 100, power=0.9, min_lr_ratio=0.1) == pytest.approx(0.9 * 0.5**0.9 + 0.1)
    # linear warm-up from warmup_ratio, multiplied with the poly decay
    assert poly_factor(0, 100, warmup_steps=10, warmup_ratio=0.1) == pytest.approx(0.1)
    assert poly_factor(5, 100, power=1.0, warmup_steps=10, warmup_ratio=0.0) == pytest.approx(0.5 * 0.95)


def test_head_lr_multiplier_groups() -> None:
    enc, head = nn.Linear(2, 2), nn.Linear(2, 3)
    opt = build_optimizer(list(enc.parameters()), list(head.parameters()), "sgd", lr=0.01, weight_decay=1e-4, head_lr_mult=10)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("encoder", 0.01), ("head", 0.1)]
    assert isinstance(build_optimizer(list(enc.parameters()), [], "adamw", 1e-3, 0.01), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="sgd or adamw"):
        build_optimizer(list(enc.parameters()), [], "lamb", 1e-3, 0.01)


def test_lr_for_batch_scales_linearly_or_warns() -> None:
    from segcon.methods.optim import lr_for_batch

    assert lr_for_batch(0.01, 16, 8, "linear") == (0.005, lr_for_batch(0.01, 16, 8, "linear")[1])
    assert "lr 0.005" in lr_for_batch(0.01, 16, 8, "linear")[1]
    lr, note = lr_for_batch(0.01, 16, 8, "none")
    assert lr == 0.01 and "optim.scale_lr=linear rescales" in note
    assert lr_for_batch(0.01, None, 8, "linear") == (0.01, None) and lr_for_batch(0.01, 8, 8, "none") == (0.01, None)
    with pytest.raises(ConfigError, match="scale_lr"):
        lr_for_batch(0.01, 8, 4, "sqrt")
