"""The mask-classification family and its set criterion: semantic inference written out by hand,
the matcher against brute force (ties included), costs and losses against float64 loops, and a
supervised run (the model contract test covers export parity and the rest)."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from segcon.models.maskformer import MaskFormer, semantic_probs
from segcon.models.output import SegOutput
from segcon.objectives.base import Targets
from segcon.objectives.set_loss import SetCriterion, hungarian, mask_costs, semantic_targets

IGNORE = 255


def _light(k: int = 3) -> MaskFormer:
    torch.manual_seed(0)
    return MaskFormer("resnet18", k, num_queries=5, hidden_dim=16, mask_dim=16, conv_dim=16, dec_layers=3, nheads=2,
                      dim_feedforward=32)


def test_semantic_inference_is_the_sum_over_queries_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    cls, masks = torch.randn(2, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    s = semantic_probs(cls, masks)
    for b in range(2):
        for c in range(3):  # the 4th column is "no object"
            for y in range(3):
                for x in range(5):
                    by_hand = sum(math.exp(cls[b, q, c]) / sum(math.exp(cls[b, q, j]) for j in range(4))
                                  / (1 + math.exp(-masks[b, q, y, x])) for q in range(4))
                    assert float(s[b, c, y, x]) == pytest.approx(by_hand, rel=1e-12)
    net = _light().eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        mask_cls, mask_logits, _, _ = net.model.decode(net.model.encoder(x), True)
        semantic = F.interpolate(semantic_probs(mask_cls[-1], mask_logits[-1]), size=(64, 96), mode="bilinear")
        expected = torch.log(semantic / semantic.sum(1, keepdim=True))
        torch.testing.assert_close(net(x), expected)
        out = net.train().forward_features(x)
    assert len(out.earlier_mask_cls) == len(out.earlier_mask_logits) == 2 and out.mask_logits.shape == (1, 5, 16, 24)


def _brute_force(cost: torch.Tensor) -> float:
    n, t = cost.shape
    return min(sum(float(cost[q, j]) for j, q in enumerate(perm)) for perm in itertools.permutations(range(n), t))


@pytest.mark.parametrize("seed", range(6))
def test_the_matcher_finds_the_least_total_cost(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, t = 5, 1 + seed % 4
    # even seeds: integer costs in {0, 1, 2}, full of ties; odd seeds: continuous costs
    cost = torch.randint(0, 3, (n, t), generator=g).double() if seed % 2 == 0 else torch.rand(n, t, generator=g, dtype=torch.float64)
    rows, cols = hungarian(cost)
    assert cols.tolist() == list(range(t)) and len(set(rows.tolist())) == t  # every target, distinct queries
    assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force(cost), abs=1e-12)


def _setup(seed: int, b: int = 2, n: int = 4, k: int = 3, h: int = 4, w: int = 4):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(b, n, k + 1, generator=g, dtype=torch.float64, requires_grad=True)
    masks = torch.randn(b, n, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, k, (b, h, w), generator=g)
    labels[0, 0] = IGNORE
    labels[1] = labels[1].clamp(max=1)  # image 2 holds classes 0 and 1 only
    return cls, masks, labels


def _focal(x: float, y: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -0.25 * (1 - p) ** 2 * math.log(p) if y else -0.75 * p**2 * math.log(1 - p)


def test_mask_costs_against_a_loop() -> None:
    _, masks, labels = _setup(1)
    target = semantic_targets(labels, IGNORE, (4, 4), 3)
    focal, dice = mask_costs(masks.detach().flatten(2), target)
    focal, dice = focal[0], dice[0]  # the first image's [N, K]
    flat, valid = labels[0].flatten(), labels[0].flatten() != IGNORE
    assert target.present[0].tolist() == [c in flat.tolist() for c in range(3)]
    for q in range(4):
        for j in range(3):
            c = j
            xs = masks[0, q].detach().flatten()
            pix = [(float(xs[i]), float(flat[i] == c)) for i in range(16) if valid[i]]
            assert float(focal[q, j]) == pytest.approx(sum(_focal(x, y) for x, y in pix) / len(pix), rel=1e-12)
            p = [1 / (1 + math.exp(-x)) for x, _ in pix]
            inter = sum(pi * y for pi, (_, y) in zip(p, pix, strict=True))
            expected = 1 - (2 * inter + 1) / (sum(p) + sum(y for _, y in pix) + 1)
            assert float(dice[q, j]) == pytest.approx(expected, rel=1e-12)


def test_set_loss_against_a_loop_with_brute_force_matching() -> None:
    cls, masks, labels = _setup(2)
    criterion = SetCriterion(3, deep_supervision=False, ignore_index=IGNORE).double()
    out = SegOutput(logits=torch.zeros(2, 3, 4, 4), mask_cls=cls, mask_logits=masks)
    loss = criterion(out, Targets(labels, IGNORE))
    ce_num = ce_den = focal_sum = dice_sum = 0.0
    count = 0
    for i in range(2):
        flat = labels[i].flatten()
        valid = [j for j in range(16) if flat[j] != IGNORE]
        classes = sorted({int(flat[j]) for j in valid})
        prob = cls[i].detach().softmax(-1)

        def pair(q: int, c: int, i: int = i, flat: torch.Tensor = flat, valid: list[int] = valid) -> tuple[float, float]:
            xs = masks[i, q].detach().flatten()
            f = sum(_focal(float(xs[j]), float(flat[j] == c)) for j in valid) / len(valid)
            p = [1 / (1 + math.exp(-float(xs[j]))) for j in valid]
            y = [float(flat[j] == c) for j in valid]
            d = 1 - (2 * sum(a * b for a, b in zip(p, y, strict=True)) + 1) / (sum(p) + sum(y) + 1)
            return f, d

        best, assignment = math.inf, None
        for perm in itertools.permutations(range(4), len(classes)):
            total = sum(-float(prob[q, c]) + 20 * pair(q, c)[0] + pair(q, c)[1] for q, c in zip(perm, classes, strict=True))
            if total < best:
                best, assignment = total, dict(zip(perm, classes, strict=True))
        for q in range(4):
            target = assignment.get(q, 3)
            weight = 1.0 if target < 3 else 0.1
            ce_num += -weight * math.log(float(prob[q, target]))
            ce_den += weight
            if target < 3:
                f, d = pair(q, target)
                focal_sum, dice_sum, count = focal_sum + f, dice_sum + d, count + 1
    assert loss["ce"].item() == pytest.approx(ce_num / ce_den, rel=1e-10)
    assert loss["focal"].item() == pytest.approx(20 * focal_sum / count, rel=1e-10)
    assert loss["dice"].item() == pytest.approx(dice_sum / count, rel=1e-10)
    sum(loss.values()).backward()
    assert cls.grad is not None and masks.grad is not None


def test_deep_supervision_adds_every_layer() -> None:
    cls, masks, labels = _setup(3)
    layers = [(cls * s, masks * s) for s in (1.0, 0.5, 2.0)]
    out = SegOutput(logits=torch.zeros(2, 3, 4, 4), mask_cls=layers[0][0], mask_logits=layers[0][1],
                    earlier_mask_cls=[c for c, _ in layers[1:]], earlier_mask_logits=[m for _, m in layers[1:]])
    deep = SetCriterion(3, ignore_index=IGNORE).double()(out, Targets(labels, IGNORE))
    single = SetCriterion(3, deep_supervision=False, ignore_index=IGNORE).double()
    per_layer = [single(SegOutput(logits=out.logits, mask_cls=c, mask_logits=m), Targets(labels, IGNORE))
                 for c, m in layers]
    for key in ("ce", "focal", "dice"):
        assert deep[key].item() == pytest.approx(sum(p[key].item() for p in per_layer), rel=1e-12)


def test_maskformer_trains_with_the_set_criterion(tiny_cfg: Callable[..., DictConfig]) -> None:
    from segcon.train import train

    cfg = tiny_cfg("model=maskformer_r18_light", "loss=mask_set", "trainer.max_steps=3")
    train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    for key in ("train/loss_mask_set", "train/loss_mask_set/ce", "train/loss_mask_set/focal", "train/loss_mask_set/dice"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), key


def test_costs_and_losses_stay_finite_under_float16_autocast() -> None:
    """Sums over 40,000 mask pixels overflow float16 (65,504): the matcher and the set loss run in
    float32 whatever the autocast."""
    g = torch.Generator().manual_seed(5)
    cls = torch.randn(1, 4, 3, generator=g)
    masks = torch.full((1, 4, 200, 200), -20.0)
    labels = torch.zeros(1, 200, 200, dtype=torch.long)
    labels[0, :80] = 1
    out = SegOutput(logits=torch.zeros(1, 2, 200, 200), mask_cls=cls, mask_logits=masks)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = SetCriterion(2, ignore_index=IGNORE)(out, Targets(labels, IGNORE))
    assert all(torch.isfinite(v) for v in loss.values()) and loss["focal"].item() > 0
