"""Supervised losses against slow, independently written references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segcon.objectives.supervised import CrossEntropyLoss, DiceLoss, FocalLoss, OhemCrossEntropyLoss

IGNORE = 255


def _inputs(seed: int, b: int = 2, k: int = 4, h: int = 5, w: int = 6, p_ignore: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < p_ignore] = IGNORE
    return logits, target


def _pixels(logits: torch.Tensor, target: torch.Tensor):
    """Yield (log-probabilities [K], label) for every valid pixel, one at a time."""
    b, _, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(target[i, y, x])
                if t != IGNORE:
                    yield torch.log_softmax(logits[i, :, y, x], 0), t


@pytest.mark.parametrize("seed", [0, 1])
def test_ce_matches_loop_with_class_weights(seed: int) -> None:
    logits, target = _inputs(seed)
    cw = [0.5, 1.0, 2.0, 3.0]
    num = den = 0.0
    for logp, t in _pixels(logits.detach(), target):
        num += -cw[t] * float(logp[t])
        den += cw[t]
    loss = CrossEntropyLoss(IGNORE, class_weights=cw).pixel_loss(logits, target)
    assert loss.item() == pytest.approx(num / den, rel=1e-9)
    plain = CrossEntropyLoss(IGNORE).pixel_loss(logits, target)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=IGNORE).item(), rel=1e-9)


def test_ohem_keeps_hard_pixels_and_min_kept() -> None:
    logits, target = _inputs(3, b=1, h=8, w=8)
    probs = []
    for logp, t in _pixels(logits.detach(), target):
        probs.append((float(logp[t].exp()), -float(logp[t])))
    probs.sort()
    for thresh, min_kept in [(0.3, 5), (0.9, 5), (0.05, 20)]:
        # threshold = max(thresh, the (min_kept)-th smallest probability, 0-based), keep p < threshold
        kth = probs[min(min_kept, len(probs) - 1)][0]
        threshold = max(thresh, kth)
        kept = [nll for p, nll in probs if p < threshold]
        loss = OhemCrossEntropyLoss(thresh=thresh, min_kept=min_kept, ignore_index=IGNORE).pixel_loss(logits, target)
        assert len(kept) >= min(min_kept, len(probs))
        assert loss.item() == pytest.approx(sum(kept) / len(kept), rel=1e-9)


def test_ohem_keeps_at_least_min_kept_pixels_per_image_of_the_batch() -> None:
    """With B images, the kept set is the pixels below max(thresh, the (min_kept * B)-th smallest
    probability of the whole batch): min_kept counts per image (UniMatch's Cityscapes recipe keeps
    200,000 pixels per call of 2 images, which is min_kept 100,000 here)."""
    logits, target = _inputs(5, b=3, h=8, w=8)
    probs = sorted((float(logp[t].exp()), -float(logp[t])) for logp, t in _pixels(logits.detach(), target))
    min_kept = 7
    threshold = max(0.05, probs[min(min_kept * 3, len(probs) - 1)][0])
    kept = [nll for p, nll in probs if p < threshold]
    assert len(kept) >= 3 * min_kept > min_kept
    loss = OhemCrossEntropyLoss(thresh=0.05, min_kept=min_kept, ignore_index=IGNORE).pixel_loss(logits, target)
    assert loss.item() == pytest.approx(sum(kept) / len(kept), rel=1e-9)


def test_ohem_on_pseudo_labels_mines_only_the_pixels_of_positive_weight() -> None:
    """Pixels a confidence filter dropped (weight 0) neither take the min_kept budget nor count:
    OHEM with weights = OHEM over the weighted pixels alone (their terms scaled)."""
    logits, target = _inputs(7, b=2, h=6, w=6, p_ignore=0.0)
    weight = (torch.rand(target.shape, generator=torch.Generator().manual_seed(2)) > 0.4).double()
    ohem = OhemCrossEntropyLoss(thresh=0.3, min_kept=5, ignore_index=IGNORE)
    only_kept = ohem.pixel_loss(logits, target.masked_fill(weight == 0, IGNORE))
    assert ohem.pixel_loss(logits, target, weight).item() == pytest.approx(only_kept.item(), rel=1e-9)
    assert ohem.pixel_loss(logits, target, weight).item() != pytest.approx(ohem.pixel_loss(logits, target).item(), rel=1e-3)


def test_per_pixel_weights_scale_the_numerator_only() -> None:
    """`weight` multiplies each pixel's loss; the normaliser stays the valid pixels (so a pixel
    with weight 0 still counts in the mean), for CE and focal; Dice masks its sums."""
    logits, target = _inputs(6, b=2, h=4, w=4)
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    valid = target != IGNORE
    ce = F.cross_entropy(logits, target.masked_fill(~valid, 0), reduction="none")
    assert CrossEntropyLoss(IGNORE).pixel_loss(logits, target, weight).item() == pytest.approx(
        float((ce * weight * valid).sum() / valid.sum()), rel=1e-9)
    focal = FocalLoss(gamma=0.0, ignore_index=IGNORE).pixel_loss(logits, target, weight)  # gamma 0: CE
    assert focal.item() == pytest.approx(float((ce * weight * valid).sum() / valid.sum()), rel=1e-9)
    ones = torch.ones_like(weight)
    for loss in (CrossEntropyLoss(IGNORE), DiceLoss(IGNORE), FocalLoss(ignore_index=IGNORE)):
        assert loss.pixel_loss(logits, target, ones).item() == pytest.approx(loss.pixel_loss(logits, target).item(), rel=1e-9)


def test_dice_matches_manual_formula() -> None:
    logits, target = _inputs(4, k=3)
    k = 3
    prob = logits.detach().softmax(1)
    losses = []
    for c in range(k):
        inter = card = 0.0
        present = False
        for i in range(target.shape[0]):
            for y in range(target.shape[1]):
                for x in range(target.shape[2]):
                    t = int(target[i, y, x])
                    if t == IGNORE:
                        continue
                    p = float(prob[i, c, y, x])
                    g = 1.0 if t == c else 0.0
                    present |= g > 0
                    inter += p * g
                    card += p + g
        if present:
            losses.append(1 - (2 * inter + 1.0) / (card + 1.0))
    loss = DiceLoss(IGNORE, smooth=1.0).pixel_loss(logits, target)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-9)


def test_focal_gamma0_is_ce_and_gamma2_matches_loop() -> None:
    logits, target = _inputs(5)
    assert FocalLoss(0.0, IGNORE).pixel_loss(logits, target).item() == pytest.approx(CrossEntropyLoss(IGNORE).pixel_loss(logits, target).item(), rel=1e-9)
    terms = [-((1 - math.exp(float(logp[t]))) ** 2) * float(logp[t]) for logp, t in _pixels(logits.detach(), target)]
    assert FocalLoss(2.0, IGNORE).pixel_loss(logits, target).item() == pytest.approx(sum(terms) / len(terms), rel=1e-9)


@pytest.mark.parametrize("loss_cls", [CrossEntropyLoss, OhemCrossEntropyLoss, DiceLoss, FocalLoss])
def test_all_ignore_batch_is_zero_finite_and_in_graph(loss_cls) -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE)
    loss = loss_cls(ignore_index=IGNORE).pixel_loss(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_logits_are_resized_to_the_label_size() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (1, 16, 16))
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    assert CrossEntropyLoss().pixel_loss(logits, target).item() == pytest.approx(F.cross_entropy(up, target).item(), rel=1e-6)
