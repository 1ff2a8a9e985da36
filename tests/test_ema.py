"""The EMA teacher update against its formula, buffers included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segcon.utils.ema import ema_momentum, ema_update


def _toy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_momentum_ramp() -> None:
    assert ema_momentum(0, 0.99) == 0.0
    assert ema_momentum(1, 0.99) == pytest.approx(0.5)
    assert ema_momentum(9, 0.99) == pytest.approx(0.9)
    assert ema_momentum(10_000, 0.99) == 0.99


def test_ema_update_equals_the_formula_for_parameters_and_buffers() -> None:
    torch.manual_seed(0)
    student = _toy()
    teacher = copy.deepcopy(student)
    for _ in range(3):  # move the student: new weights and new BatchNorm statistics
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student.train()(torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = ema_momentum(7, 0.99)
    ema_update(teacher, student, m)
    after, s = teacher.state_dict(), student.state_dict()
    for k, old in before.items():
        if old.is_floating_point():
            assert torch.allclose(after[k], m * old + (1 - m) * s[k], atol=1e-6), k
            assert not torch.equal(after[k], old), k  # every float tensor moved, BN statistics too
        else:
            assert torch.equal(after[k], s[k]), k  # num_batches_tracked is copied
    assert int(after["1.num_batches_tracked"]) == 3


def test_first_update_copies_the_student_and_structure_must_match() -> None:
    student, teacher = _toy(), _toy()
    ema_update(teacher, student, ema_momentum(0, 0.999))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, student.state_dict()[k])
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.5)
