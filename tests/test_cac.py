"""CAC (METHODS.md §1): the loss against a float64 loop reference, its invariants, gradient flow
through the weight branch, and the marginal sampler on a constructed example."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segcon.models.output import PixelEmbedding, SegOutput
from segcon.models.segnet import SegNet
from segcon.objectives.base import Targets
from segcon.objectives.cac import (
    ConfidenceAwareContrastLoss,
    WeightBranchLoss,
    cac_per_anchor,
    class_balanced_mean,
)
from segcon.objectives.contrast import pair_contrast
from segcon.objectives.samplers import MarginalSampler
from segcon.objectives.supervised import CrossEntropyLoss, OhemCrossEntropyLoss
from segcon.utils.maps import labels_at

IGNORE = 255
TAU, BASE = 0.1, 0.07


def reference_cac(z: torch.Tensor, y: torch.Tensor, q: torch.Tensor, class_mean: str) -> float:
    """METHODS.md §1(c) one pair at a time, in float64: weights, weighted partition, unweighted
    positive count, then the per-class mean averaged over 0..max(y) or over present classes."""
    z, q = z.double(), q.double()
    n = len(y)
    yl = [int(v) for v in y]

    def w(i: int, j: int) -> float:
        return 0.0 if i == j else 1 - 0.5 * (float(q[i, yl[j]]) + float(q[j, yl[i]]))

    losses = []
    for i in range(n):
        s = [float(z[i] @ z[j]) / TAU for j in range(n)]
        partition = sum(w(i, k) * math.exp(s[k]) for k in range(n) if k != i)
        pos = [j for j in range(n) if j != i and yl[j] == yl[i]]
        total = sum(w(i, j) * (s[j] - math.log(partition)) for j in pos)
        losses.append(-(TAU / BASE) * total / len(pos) if pos else 0.0)
    classes = range(max(yl) + 1) if class_mean == "scatter" else sorted(set(yl))
    per_class = []
    for c in classes:
        members = [losses[i] for i in range(n) if yl[i] == c]
        per_class.append(sum(members) / len(members) if members else 0.0)
    return sum(per_class) / len(per_class)


@pytest.mark.parametrize("class_mean", ["scatter", "present"])
@pytest.mark.parametrize(("n", "k", "seed"), [(10, 3, 0), (24, 6, 1), (7, 2, 2), (16, 5, 3)])
def test_cac_matches_loop_reference(class_mean: str, n: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, k, (n,), generator=g)
    y[y == 1] = k - 1  # class 1 absent (below the max): scatter counts it as 0, present skips it
    y[0] = k + 1  # a single anchor with no positive, and the largest index
    q = torch.randn(n, k + 2, generator=g, dtype=torch.float64).mul(2).softmax(1)
    got = class_balanced_mean(cac_per_anchor(z, y, q, TAU, BASE).double(), y, class_mean)
    assert float(got) == pytest.approx(reference_cac(z, y, q, class_mean), abs=1e-6)


def _anchors(n: int = 12, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 6, generator=g, dtype=torch.float64), dim=1)
    return z, torch.arange(n) % k


def test_correct_one_hot_confidence_gives_zero_loss() -> None:
    z, y = _anchors()
    q = F.one_hot(y, 3).double()
    assert float(class_balanced_mean(cac_per_anchor(z, y, q, TAU, BASE), y)) == 0.0


def test_uniform_confidence_is_scaled_supcon_plus_a_constant() -> None:
    z, y = _anchors(n=15, k=4, seed=1)
    k = 5  # q over 5 classes, labels use 4
    q = torch.full((15, k), 1 / k, dtype=torch.float64)
    c = 1 - 1 / k
    got = cac_per_anchor(z, y, q, TAU, BASE).double()
    supcon, has_pos = pair_contrast(z, y, z, y, TAU, BASE, "supcon")
    assert has_pos.all()
    expected = c * (supcon + (TAU / BASE) * math.log(c))
    assert torch.allclose(got, expected, atol=1e-6)


def _net(depth: str) -> SegNet:
    torch.manual_seed(0)
    return SegNet("fpn", "resnet18", num_classes=3, projection={"source": "decoder", "dim": 16, "kind": "residual"},
                  weight_branch={"depth": depth})


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("depth", ["head", "decoder"])
def test_weight_branch_never_sends_gradient_to_the_network(depth: str) -> None:
    net = _net(depth)
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    out = net(x)
    assert out.weight_logits.shape == out.logits.shape
    WeightBranchLoss({"ce": {"_target_": "segcon.objectives.supervised.CrossEntropyLoss"}})(out, Targets(target)).backward()
    assert _grads(net.heads["weight_branch"]) > 0
    assert _grads(net.model) == 0.0 and _grads(net.heads["projection"]) == 0.0


@pytest.mark.parametrize("detach", [False, True])
def test_cac_gradient_reaches_projection_backbone_and_weight_branch_unless_detached(detach: bool) -> None:
    net = _net("head")
    x, target = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    loss = ConfidenceAwareContrastLoss(MarginalSampler(128, 10), detach_pair_weights=detach)(net(x), Targets(target))
    loss.backward()
    assert loss.item() > 0
    assert _grads(net.heads["projection"]) > 0 and _grads(net.model.encoder) > 0
    assert (_grads(net.heads["weight_branch"]) > 0) is not detach
    assert net.model.segmentation_head[0].weight.grad is None  # the main classifier only feeds the sampler


def test_weight_branch_is_train_only_and_fresh() -> None:
    net = _net("decoder")
    branch = net.heads["weight_branch"]
    assert not torch.equal(branch.head[0].weight, net.model.segmentation_head[0].weight)  # re-initialised copy
    assert not any(k.startswith("heads.") for k in net.model.state_dict())
    net.eval()
    logits = net(torch.randn(1, 3, 64, 64))
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 3, 64, 64)


def test_cac_term_equals_reference_on_its_samples_with_ignore_pixels() -> None:
    g = torch.Generator().manual_seed(4)
    b, k, h, w = 2, 4, 8, 8
    emb = F.normalize(torch.randn(b, 6, h, w, generator=g, dtype=torch.float64), dim=1)
    logits = torch.randn(b, k, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    weight_logits = torch.randn(b, k, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    target = torch.randint(0, k - 1, (b, 2 * h, 2 * w), generator=g)
    target[:, :5] = IGNORE
    out = SegOutput(logits=logits, embeddings={"projection": PixelEmbedding.from_dense(emb)},
                    weight_logits=weight_logits)
    term = ConfidenceAwareContrastLoss(MarginalSampler(max_samples=60, max_views=6))
    got = float(term(out, Targets(target, IGNORE)))
    # the same anchors, recomputed from scratch: marginal choice is deterministic
    small = labels_at(target, (h, w)).reshape(b, -1)
    probs = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1).reshape(b, k, -1)
    index, ok = MarginalSampler(max_samples=60, max_views=6)(small, probs.argmax(1), probs)
    index = index[ok]
    assert len(index) > 0 and (small.reshape(-1)[index] != IGNORE).all()
    q_map = F.interpolate(weight_logits, size=(h, w), mode="bilinear", align_corners=False).softmax(1)
    q = q_map.permute(0, 2, 3, 1).reshape(-1, k)[index]
    z = emb.permute(0, 2, 3, 1).reshape(-1, 6)[index]
    assert got == pytest.approx(reference_cac(z, small.reshape(-1)[index], q, "scatter"), abs=1e-6)


def test_degenerate_batch_is_a_connected_zero() -> None:
    net = _net("head")
    out = net(torch.randn(2, 3, 64, 64))
    loss = ConfidenceAwareContrastLoss(MarginalSampler(128, 10))(out, Targets(torch.full((2, 64, 64), IGNORE)))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in net.heads.parameters())


def test_weight_branch_loss_uses_the_main_logits_to_mine_ohem_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    main = torch.randn(2, 3, 8, 8, generator=g)
    weight = torch.randn(2, 3, 8, 8, generator=g)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    out = SegOutput(logits=main, weight_logits=weight)
    spec = {"_target_": "segcon.objectives.supervised.OhemCrossEntropyLoss", "weight": 2.0, "thresh": 0.5, "min_kept": 10}
    got = WeightBranchLoss({"ohem": spec})(out, Targets(target))
    # by hand: keep the pixels whose main-head probability of the truth is below max(0.5, the 21st smallest)
    p_main = main.softmax(1).gather(1, target[:, None])[:, 0]
    keep = p_main < p_main.flatten().kthvalue(21).values.clamp_min(0.5)
    ce = F.cross_entropy(weight, target, reduction="none")
    assert float(got) == pytest.approx(2.0 * float(ce[keep].mean()), rel=1e-6)
    own = OhemCrossEntropyLoss(0.5, 10).pixel_loss(weight, target)  # mined on its own logits: another set
    assert float(got) != pytest.approx(2.0 * float(own), rel=1e-3)
    plain = WeightBranchLoss({"ce": {"_target_": "segcon.objectives.supervised.CrossEntropyLoss"}})(out, Targets(target))
    assert float(plain) == pytest.approx(float(CrossEntropyLoss().pixel_loss(weight, target)), rel=1e-6)


def test_marginal_sampler_picks_the_expected_pixels() -> None:
    # One image, 20 pixels. Class 0: pixels 0-9 (hard: 0-4, predicted 1; easy: 5-9).
    # Class 1: pixels 10-19, all easy. max_views 4, max_samples 8 -> n_view = 4 per class.
    labels = torch.tensor([[0] * 10 + [1] * 10])
    preds = torch.tensor([[1] * 5 + [0] * 5 + [1] * 10])
    p0 = torch.tensor([0.30, 0.45, 0.10, 0.45, 0.20, 0.90, 0.60, 0.99, 0.55, 0.70])
    p1 = torch.tensor([0.8, 0.6, 0.7, 0.9, 0.65, 0.95, 0.51, 0.75, 0.85, 0.52])
    probs = torch.zeros(1, 2, 20)
    probs[0, 0, :10], probs[0, 1, :10] = p0, 1 - p0
    probs[0, 1, 10:], probs[0, 0, 10:] = p1, 1 - p1
    idx, ok = MarginalSampler(max_samples=8, max_views=4)(labels, preds, probs)
    # class 0: 2 hard with the highest p0 (1 and 3, 0.45 each), 2 easy with the lowest (8, 6)
    # class 1: no hard pixel -> 4 easy with the lowest p1: 16 (0.51), 19 (0.52), 11 (0.6), 14 (0.65)
    assert bool(ok.all()) and idx.tolist() == [1, 3, 6, 8, 11, 14, 16, 19]  # in pixel order
    with pytest.raises(ValueError, match="probabilities"):
        MarginalSampler(8, 4)(labels, preds, None, num_classes=2)


@pytest.mark.parametrize(("preset", "channels", "lam", "beta"), [
    ("cac_cityscapes_hrnet", 720, 0.4, 1.5),
    ("cac_pascal_context", 720, 1.0, 1.5),
    ("cac_coco_stuff", 720, 3.5, 3.0),
    ("cac_ade20k_segformer_b0", 512, 1.8, 1.5),
])
def test_presets_build_the_published_heads(preset: str, channels: int, lam: float, beta: float, tmp_path) -> None:
    """The projection reads the 1/4-scale concatenation of the backbone stages (HRNet's four
    branches: 48+96+192+384; MiT-B0: 32+64+160+256), the weight branch duplicates the decoder,
    and λ, β, the sampler and the 5000-step warm-up are the authors'."""
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    cfg = compose_train([f"experiment={preset}", f"data.root={tmp_path}"], output_dir=tmp_path / "run")
    assert (cfg.contrast.cac.weight, cfg.contrast.weight_branch.weight) == (lam, beta)
    assert cfg.contrast.cac.warmup_steps == 5000 and cfg.sampler._target_.endswith("MarginalSampler")
    device = "cpu" if "segformer" in preset else "meta"  # MiT blocks cannot be built on meta
    with torch.device(device):
        net = instantiate(cfg.model)
    assert net.heads["projection"].stem[0].in_channels == channels
    assert net.heads["weight_branch"].depth == "decoder"
