"""Distribution alignment against a pixel-by-pixel reference, and inside the unsupervised step."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig

from segcon.build import build_module
from segcon.methods.alignment import DistributionAlignment
from tests.helpers import capture_contrast_target

IGNORE = 255


def _reference(probs: torch.Tensor, prior: list[float], mean: list[float]) -> torch.Tensor:
    """Loop over pixels: p_k * prior_k / mean_k, renormalised."""
    out = torch.empty_like(probs)
    b, k, h, w = probs.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                raw = [float(probs[i, c, y, x]) * prior[c] / mean[c] for c in range(k)]
                for c in range(k):
                    out[i, c, y, x] = raw[c] / sum(raw)
    return out


def test_alignment_matches_a_hand_computation_over_two_steps() -> None:
    g = torch.Generator().manual_seed(0)
    da = DistributionAlignment(3, IGNORE, momentum=0.5)
    probs = torch.randn(2, 3, 2, 3, generator=g).softmax(1)
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[1, 1] = False  # padding: left out of the unlabeled mean
    labels = torch.tensor([[[0, 0, 1], [0, IGNORE, 2]]])
    counts = [3, 1, 1]  # class 0: three pixels, 1: one, 2: one (the ignored pixel is not counted)
    prior1 = [c / 5 for c in counts]
    pix = [probs[i, :, y, x] for i in range(2) for y in range(2) for x in range(3) if valid[i, y, x]]
    mean1 = [sum(float(p[c]) for p in pix) / len(pix) for c in range(3)]
    out = da(probs, valid, labels)
    assert torch.allclose(out, _reference(probs, prior1, mean1), atol=1e-6)  # step 1: initialised, no momentum
    # step 2: both distributions move half-way (momentum 0.5) to this step's values
    probs2 = torch.randn(1, 3, 2, 2, generator=g).softmax(1)
    labels2 = torch.tensor([[[2, 2], [2, 1]]])
    prior2 = [0.5 * prior1[c] + 0.5 * v for c, v in enumerate([0.0, 0.25, 0.75])]
    mean2 = [0.5 * mean1[c] + 0.5 * float(probs2[0, c].mean()) for c in range(3)]
    out2 = da(probs2, torch.ones(1, 2, 2, dtype=torch.bool), labels2)
    assert torch.allclose(out2, _reference(probs2, prior2, mean2), atol=1e-6)
    assert torch.allclose(da.labeled_prior, torch.tensor(prior2)) and int(da.steps) == 2
    assert torch.allclose(out2.sum(1), torch.ones(1, 2, 2))


def test_alignment_is_the_identity_when_predictions_match_the_labels() -> None:
    # a uniform prior and uniformly predicted classes: nothing to correct
    probs = torch.tensor([[0.7, 0.3], [0.3, 0.7]]).T.reshape(1, 2, 1, 2)  # mean [0.5, 0.5]
    labels = torch.tensor([[[0, 1]]])
    out = DistributionAlignment(2, IGNORE)(probs, torch.ones(1, 1, 2, dtype=torch.bool), labels)
    assert torch.allclose(out, probs)


def test_aligned_probabilities_give_the_pseudo_labels(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg("method=mean_teacher", "method.cutmix_prob=0", "method.confidence.threshold=0.4",
                   "method.distribution_alignment=true", "contrast=pixel", "sampler.max_views=5")
    module = build_module(cfg)
    module._trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=100, world_size=1, log_every_n_steps=1)
    captured = capture_contrast_target(module)
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[:, :8] = 3  # labeled: a quarter class 3, the rest class 0
    labeled = {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": mask}
    weak = torch.randn(2, 3, 32, 32, generator=g)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    unlabeled = {"image": weak, "strong": weak[:, None].clone(), "valid": valid}
    module.unsupervised_step(labeled, unlabeled)
    with torch.no_grad():
        p = module.teacher(weak).softmax(1)
    prior = torch.tensor([0.75, 0.0, 0.0, 0.25, 0.0])
    aligned = p * (prior / p.mean((0, 2, 3))).view(1, -1, 1, 1)
    aligned = aligned / aligned.sum(1, keepdim=True)
    conf, pseudo = aligned.max(1)
    expected = pseudo.masked_fill(conf < 0.4, IGNORE)
    assert torch.equal(captured["target"][2:], expected)
    assert set(expected.unique().tolist()) <= {0, 3, IGNORE} and (expected != IGNORE).any()
    plain = p.argmax(1).masked_fill(p.max(1).values < 0.4, IGNORE)
    assert not torch.equal(plain, expected)  # alignment made a difference here


def test_alignment_momentum_is_checked() -> None:
    with pytest.raises(ValueError, match="momentum"):
        DistributionAlignment(3, momentum=1.0)
