"""Pixel contrast, samplers and the class memory against slow float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segcon.models.heads import ProjectionHead
from segcon.models.output import PixelEmbedding, SegOutput
from segcon.models.segnet import SegNet
from segcon.objectives.base import Targets
from segcon.objectives.contrast import (
    PixelContrastLoss,
    PixelMemoryContrastLoss,
    labels_at,
    pair_contrast,
)
from segcon.objectives.memory import ClassMemory
from segcon.objectives.samplers import HardEasySampler, RandomSampler, split_counts

IGNORE = 255


def reference_loss(z: torch.Tensor, y: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                   tau: float, base: float, denominator: str) -> float:
    """The equations of METHODS.md §0(c), one anchor and one pair at a time, in float64.
    The first len(z) keys are the anchors themselves."""
    z, keys = z.double(), keys.double()
    n, m = z.shape[0], keys.shape[0]
    losses = []
    for i in range(n):
        s = [float(z[i] @ keys[j]) / tau for j in range(m)]
        pos = [j for j in range(m) if j != i and int(key_labels[j]) == int(y[i])]
        neg = [j for j in range(m) if int(key_labels[j]) != int(y[i])]
        if not pos:
            continue
        terms = []
        for p in pos:
            if denominator == "per_positive":
                denom = math.exp(s[p]) + sum(math.exp(s[k]) for k in neg)
            else:
                denom = sum(math.exp(s[k]) for k in range(m) if k != i)
            terms.append(s[p] - math.log(denom))
        losses.append(-(tau / base) * sum(terms) / len(terms))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("denominator", ["per_positive", "supcon"])
@pytest.mark.parametrize(("n", "m_extra", "k", "seed"), [(12, 0, 3, 0), (20, 7, 4, 1), (9, 15, 5, 2), (6, 0, 1, 3)])
def test_pair_contrast_matches_loop_reference(denominator: str, n: int, m_extra: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, k, (n,), generator=g)
    y[0] = k + 2  # a class with a single anchor: no positive, excluded from the mean
    extra = F.normalize(torch.randn(m_extra, 8, generator=g, dtype=torch.float64), dim=1)
    extra_y = torch.randint(0, k, (m_extra,), generator=g)
    keys, key_labels = torch.cat([z, extra]), torch.cat([y, extra_y])
    loss, has_pos = pair_contrast(z, y, keys, key_labels, 0.1, 0.07, denominator)
    assert not has_pos[0]
    got = float((loss * has_pos).sum() / has_pos.sum())
    assert got == pytest.approx(reference_loss(z, y, keys, key_labels, 0.1, 0.07, denominator), abs=1e-6)


def _output(seed: int, b: int = 2, d: int = 8, k: int = 4, h: int = 8, w: int = 8):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, d, h, w, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    logits = torch.randn(b, k, 2 * h, 2 * w, generator=g, dtype=torch.float64)
    target = torch.randint(0, k - 1, (b, 2 * h, 2 * w), generator=g)  # class k-1 absent
    target[:, :4] = IGNORE
    return SegOutput(logits=logits, embeddings={"projection": PixelEmbedding.from_dense(emb)}), Targets(target, IGNORE)


def test_pixel_contrast_term_equals_reference_on_its_samples() -> None:
    out, target = _output(0)
    loss_fn = PixelContrastLoss(RandomSampler(max_samples=64, max_views=5), 0.1, 0.07)
    torch.manual_seed(5)
    anchors = loss_fn.sample(out, target)
    z, y, index = anchors.z[anchors.valid], anchors.y[anchors.valid], anchors.index[anchors.valid]
    assert anchors.z.shape[0] == 64 and 0 < len(index) <= 64  # the sampler's capacity, valid rows first
    torch.manual_seed(5)
    loss = loss_fn(out, target)
    small = labels_at(target.labels, (8, 8)).reshape(-1)
    assert (small[index] != IGNORE).all() and torch.equal(small[index], y)
    assert loss.item() == pytest.approx(reference_loss(z.detach(), y, z.detach(), y, 0.1, 0.07, "per_positive"), abs=1e-6)
    loss.backward()
    hidden = out.embeddings["projection"].hidden
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_gradient_reaches_projection_head_and_backbone() -> None:
    torch.manual_seed(0)
    net = SegNet("fpn", "resnet18", num_classes=3, projection={"source": "decoder", "dim": 16})
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 3, (2, 64, 64))
    loss = PixelContrastLoss(RandomSampler(max_samples=128, max_views=10))(net(x), Targets(target))
    loss.backward()
    assert net.heads["projection"].stem[0].weight.grad.abs().sum() > 0
    assert net.heads["projection"].out.weight.grad.abs().sum() > 0
    assert net.model.encoder.conv1.weight.grad.abs().sum() > 0
    assert net.model.segmentation_head[0].weight.grad is None  # the classifier is not in this loss


@pytest.mark.parametrize("make_target", [lambda: torch.full((2, 16, 16), IGNORE), lambda: torch.zeros(2, 16, 16, dtype=torch.long)])
def test_degenerate_batches_give_a_connected_finite_zero(make_target) -> None:
    out, _ = _output(1)
    hidden = out.embeddings["projection"].hidden
    for loss_fn in (PixelContrastLoss(HardEasySampler(64, 5)), PixelMemoryContrastLoss(HardEasySampler(64, 5), num_classes=4, dim=8, memory_size=4)):
        hidden.grad = None
        loss = loss_fn(out, Targets(make_target()))
        assert loss.item() == 0.0  # all ignore: no anchor; one class: no negative
        loss.backward()
        assert torch.isfinite(hidden.grad).all()


def _constructed(n_per_class: dict[int, tuple[int, int]], ignore: int = 10):
    """One image: for class c, `hard` misclassified and `easy` correct pixels, then ignore pixels."""
    labels, preds = [], []
    for c, (hard, easy) in n_per_class.items():
        labels += [c] * (hard + easy)
        preds += [c + 100] * hard + [c] * easy
    labels += [IGNORE] * ignore
    preds += [0] * ignore
    return torch.tensor([labels]), torch.tensor([preds])


def test_hard_easy_exact_counts_and_fallbacks() -> None:
    # max_views 10, 3 pairs, max_samples 30 -> n_view = 10 per class
    labels, preds = _constructed({0: (20, 20), 1: (30, 3), 2: (2, 40)})
    idx, ok = HardEasySampler(max_samples=30, max_views=10)(labels, preds, num_classes=3,
                                                            generator=torch.Generator().manual_seed(0))
    assert idx.shape == ok.shape == (30,) and bool(ok.all())
    lab, pr = labels[0, idx], preds[0, idx]
    for c, (want_hard, want_easy) in {0: (5, 5), 1: (7, 3), 2: (2, 8)}.items():
        assert int(((lab == c) & (pr != c)).sum()) == want_hard
        assert int(((lab == c) & (pr == c)).sum()) == want_easy
    assert (lab != IGNORE).all() and idx.unique().numel() == idx.numel()
    n_hard, n_easy = split_counts(torch.tensor([3, 1, 9]), torch.tensor([3, 9, 1]), 5)
    assert n_hard.tolist() == [2, 1, 4] and n_easy.tolist() == [3, 4, 1]


def test_samplers_skip_small_classes_budget_and_determinism() -> None:
    labels, preds = _constructed({0: (50, 50), 1: (3, 4), 2: (60, 0)})  # class 1 has 7 <= max_views
    for sampler in (RandomSampler(max_samples=40, max_views=10), HardEasySampler(max_samples=40, max_views=10)):
        a = sampler(labels, preds, num_classes=3, generator=torch.Generator().manual_seed(1))
        b = sampler(labels, preds, num_classes=3, generator=torch.Generator().manual_seed(1))
        c = sampler(labels, preds, num_classes=3, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
        counts = torch.bincount(labels[0, a[0][a[1]]], minlength=3)
        assert counts.tolist() == [10, 0, 10]  # n_view = min(40 // 2, 10)
        assert int(a[1].sum()) == 20 and not a[1][20:].any()  # the valid rows come first


def test_sampler_flat_indices_address_the_right_image() -> None:
    labels = torch.tensor([[0] * 12 + [1] * 12, [1] * 24])
    preds = labels.clone()
    idx, ok = RandomSampler(max_samples=100, max_views=5)(labels, preds, num_classes=2)
    idx = idx[ok]
    flat = labels.reshape(-1)[idx]
    assert torch.bincount(idx // 24).tolist() == [10, 5]  # image 0: two classes, image 1: one
    assert (flat[idx // 24 == 1] == 1).all()


def test_memory_wraps_around_in_fifo_order_and_keeps_class_zero() -> None:
    mem = ClassMemory(num_classes=3, size=4, dim=2)
    def entries(vals, c):
        return torch.tensor([[v, 0.0] for v in vals]), torch.full((len(vals),), c)
    mem.push(*entries([1, 2, 3], 0))
    mem.push(*entries([4, 5], 0))  # wraps: 1 is overwritten
    assert mem.ordered(0)[:, 0].tolist() == [2, 3, 4, 5]
    assert int(mem.ptr[0]) == 1 and int(mem.count[0]) == 4
    mem.push(*entries(list(range(10, 17)), 1))  # more than size at once: the last 4 kept
    assert mem.ordered(1)[:, 0].tolist() == [13, 14, 15, 16]
    feats, labels = torch.tensor([[9.0, 9.0], [8.0, 8.0]]), torch.tensor([-1, 2])  # -1 = padding
    mem.push(feats, labels)
    all_feats, all_labels, filled = mem.entries()
    assert all_feats.shape == (12, 2) and filled.shape == all_labels.shape == (12,)
    all_feats, all_labels = all_feats[filled], all_labels[filled]
    assert sorted(all_labels.tolist()) == [0] * 4 + [1] * 4 + [2]
    assert [8.0, 8.0] in all_feats.tolist() and [9.0, 9.0] not in all_feats.tolist()


def test_memory_term_state_round_trip_gives_identical_bank_and_next_loss() -> None:
    def make():
        return PixelMemoryContrastLoss(RandomSampler(64, 5), num_classes=4, dim=8, memory_size=6, pixel_update_freq=3)
    term = make()
    for seed in range(3):
        out, target = _output(seed)
        term(out, target)
        for name, (f, lab) in term.pending_entries().items():
            term.enqueue(name, f, lab)
    state = {k: v.clone() for k, v in term.state_dict().items()}
    assert {"memory.feats", "memory.ptr", "memory.count"} <= state.keys()
    restored = make()
    restored.load_state_dict(state)
    for k, v in term.state_dict().items():
        assert torch.equal(v, restored.state_dict()[k]), k
    # a checkpoint of the earlier layout (two memories of K rings each) loads into the same bank
    old = make()
    old_state = {k: v for k, v in state.items() if not k.startswith("memory.")}
    for i, name in enumerate(("pixel", "segment")):
        for buf in ("feats", "ptr", "count"):
            old_state[f"memories.{name}.{buf}"] = state[f"memory.{buf}"][i * 4:(i + 1) * 4].clone()
    old.load_state_dict(old_state)
    for k, v in term.state_dict().items():
        assert torch.equal(v, old.state_dict()[k]), k
    out, target = _output(7)
    torch.manual_seed(3)
    a = term(out, target)
    torch.manual_seed(3)
    b = restored(out, target)
    assert a.item() == b.item()
    _, rings, filled = restored.memory.entries()
    assert (rings[filled] % 4 != 3).all()  # class 3 never appears in these targets: no fake entries
    assert (rings[filled] >= 4).any() and (rings[filled] < 4).any()  # segment and pixel entries


@pytest.mark.parametrize(("kind", "dim"), [("convmlp", 5), ("linear", 5), ("residual", 5), ("residual", 32)],
                         ids=["convmlp", "linear", "residual", "residual-widening"])
def test_projection_finished_at_gathered_pixels_equals_the_full_map(kind: str, dim: int) -> None:
    """The lazy embedding equals the head written as plain full-map convolutions, BatchNorm
    statistics included (they come from every pixel, not only the gathered ones) — also when
    the whole stem runs on gathered pixels (a widening residual stem, 6 -> 32 channels): same
    values, same gradients (through the batch statistics too), same running statistics."""
    torch.manual_seed(0)
    head = ProjectionHead(6, dim=dim, kind=kind).double().train()
    if kind != "linear":  # the same parameters, a separate running state
        ref_bn = torch.nn.BatchNorm2d(head.stem[1].num_features).double()
        ref_bn.load_state_dict(head.stem[1].state_dict())
        ref_bn.weight, ref_bn.bias = head.stem[1].weight, head.stem[1].bias
    x = (torch.randn(2, 6, 4, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    emb = head(x)
    # reference: every layer over the whole map, the last one as a 1x1 convolution
    h = x
    if kind != "linear":
        conv = head.stem[0]
        h = ref_bn(F.conv2d(x, conv.weight, conv.bias)).relu()
    out = F.conv2d(h, head.out.weight[:, :, None, None], head.out.bias)
    ref = F.normalize(h + out if kind == "residual" else out, dim=1)
    assert torch.allclose(emb.dense(), ref, atol=1e-12)
    index = torch.tensor([0, 7, 19, 20, 39])  # flat indices into 2 x 4 x 5, both images
    b, n = index // 20, index % 20
    got, want = emb.at(index), ref.flatten(2)[b, :, n]
    assert torch.allclose(got, want, atol=1e-12)
    assert emb.size == (4, 5)
    grads = torch.autograd.grad((got * torch.arange(dim)).sum(), [x, *head.parameters()])
    ref_grads = torch.autograd.grad((want * torch.arange(dim)).sum(), [x, *head.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-12)
    if kind != "linear":
        for buf in ("running_mean", "running_var"):  # updated once by the reference, once by the head
            torch.testing.assert_close(getattr(head.stem[1], buf), getattr(ref_bn, buf), atol=1e-12, rtol=0)


def test_stage_projection_equals_the_head_on_the_concatenated_stages() -> None:
    """With `source: encoder` the first 1x1 convolution runs on each stage at its own resolution
    and the results are upsampled and summed: the same map, values and gradients, as the head
    on `concat_stages` (float64), and it stays in autocast's dtype."""
    from segcon.models.heads import concat_stages

    torch.manual_seed(0)
    stages = [torch.randn(2, c, s, s, dtype=torch.float64, requires_grad=True) for c, s in ((3, 16), (5, 8), (7, 4))]
    head = ProjectionHead(15, dim=6, kind="convmlp").double().train()
    ref = ProjectionHead(15, dim=6, kind="convmlp").double().train()
    ref.load_state_dict(head.state_dict())
    got, want = head(stages).dense(), ref(concat_stages(stages, [0, 1, 2])).dense()
    assert torch.allclose(got, want, atol=1e-12)
    for buf in ("running_mean", "running_var"):  # the bias counts once, as in the convolution it replaces
        torch.testing.assert_close(getattr(head.stem[1], buf), getattr(ref.stem[1], buf), atol=1e-12, rtol=0)
    weights = torch.randn(got.shape, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), [*stages, *head.parameters()])
    ref_grads = torch.autograd.grad((want * weights).sum(), [*stages, *ref.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head.float()([s.detach().float() for s in stages]).hidden.dtype == torch.bfloat16


@pytest.mark.parametrize("dim", [6, 20], ids=["narrowing", "widening"])
def test_linear_stage_projection_equals_the_head_on_the_concatenated_stages(dim: int) -> None:
    """A linear head on encoder stages (`contrast=confidence`): narrowing (15 -> 6 channels) it is
    finished over the whole map at D channels, stage by stage, never forming the 15-channel
    concatenation; widening it keeps the concatenation. Either way the embeddings at gathered
    pixels, their gradients and the group means equal the head on `concat_stages` (float64)."""
    from segcon.models.heads import concat_stages

    torch.manual_seed(0)
    stages = [torch.randn(2, c, s, s, dtype=torch.float64, requires_grad=True) for c, s in ((3, 16), (5, 8), (7, 4))]
    head = ProjectionHead(15, dim=dim, kind="linear").double()
    emb, ref = head(stages), head(concat_stages(stages, [0, 1, 2]))
    assert emb.hidden.shape[1] == (dim if dim < 15 else 15)
    index = torch.tensor([0, 17, 255, 256, 300, 511])
    got, want = emb.at(index), ref.at(index)
    assert torch.allclose(got, want, atol=1e-12)
    weights = torch.randn(got.shape, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), [*stages, *head.parameters()])
    ref_grads = torch.autograd.grad((want * weights).sum(), [*stages, *head.parameters()])
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-10)
    group = torch.tensor([0, 0, 2, 2, 1, 0])
    torch.testing.assert_close(emb.group_means(index, group, 3), ref.group_means(index, group, 3), atol=1e-12, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(head.float()([s.detach().float() for s in stages]).at(index)).all()


def test_a_widening_stem_folds_only_with_a_plain_batch_norm_and_runs_in_half_weights() -> None:
    """A SyncBatchNorm (DDP with sync_batchnorm) needs every rank's pixels: the stem then runs
    over the whole map. In bfloat16 weights (bf16-true) the folded stem works in that dtype."""
    head = ProjectionHead(4, dim=16, kind="residual")
    assert head.folds and not ProjectionHead(4, dim=16, kind="convmlp").folds  # convmlp: 4 -> 4
    assert not torch.nn.SyncBatchNorm.convert_sync_batchnorm(ProjectionHead(4, dim=16, kind="residual")).folds
    half = head.bfloat16().train()
    out = half(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)).at(torch.tensor([0, 5, 100]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize(("kind", "dim"), [("convmlp", 5), ("linear", 5), ("residual", 5), ("residual", 32)])
def test_group_means_equal_the_means_of_the_finished_embeddings(kind: str, dim: int) -> None:
    """Region means for the memory: with an affine tail computed from each pixel's norm as a
    quadratic form of its hidden state (no D-channel map), otherwise from the finished rows; both
    equal the normalised mean of the full embedding map's rows, in float64."""
    torch.manual_seed(1)
    head = ProjectionHead(6, dim=dim, kind=kind).double().train()
    emb = head(torch.randn(2, 6, 4, 5, dtype=torch.float64) * 2 + 1)
    assert (emb.affine is None) == head.folds
    index = torch.tensor([0, 3, 4, 9, 21, 22, 39])
    group = torch.tensor([0, 0, 2, 2, 2, 3, 0])
    means = emb.group_means(index, group, 5)
    plain = emb.group_means(index, group, 5, normalize=False)
    rows = emb.dense().permute(0, 2, 3, 1).reshape(-1, dim)[index]
    for g in range(5):
        members = rows[group == g]
        mean = members.mean(0) if len(members) else torch.zeros(dim, dtype=torch.float64)
        torch.testing.assert_close(means[g], F.normalize(mean, dim=0), atol=1e-12, rtol=0)
        torch.testing.assert_close(plain[g], mean, atol=1e-12, rtol=0)


def test_folded_stem_statistics_do_not_overflow_float16() -> None:
    """Under float16 autocast the folded stem's batch statistics (sums of squares over every
    pixel: 65,536 here, far above float16's 65,504) are taken in float32."""
    torch.manual_seed(0)
    head = ProjectionHead(4, dim=16, kind="residual").train()
    x = torch.randn(4, 4, 128, 128) * 3
    index = torch.arange(0, 4 * 128 * 128, 997)
    with torch.no_grad():
        reference = head(x).at(index)
        with torch.autocast("cpu", dtype=torch.float16):
            half = head(x.half()).at(index)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), reference, atol=2e-2, rtol=0)


def test_empty_embedding_zero_reaches_every_head_parameter() -> None:
    head = ProjectionHead(4, dim=3, kind="convmlp")
    zero = head(torch.randn(2, 4, 3, 3)).zero()
    zero.backward()
    assert zero.item() == 0.0
    assert all(p.grad is not None and (p.grad == 0).all() for p in head.parameters())


@pytest.mark.parametrize("preset", ["pixel_contrast_cityscapes", "pixel_contrast_memory_cityscapes"])
def test_pixel_contrast_presets_project_the_720_channel_hrnet_concatenation(preset: str, tmp_path) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_train

    cfg = compose_train([f"experiment={preset}", f"data.root={tmp_path}"], output_dir=tmp_path / "run")
    with torch.device("meta"):
        net = instantiate(cfg.model)
    assert net.heads["projection"].stem[0].in_channels == 48 + 96 + 192 + 384


def test_half_precision_embeddings_are_contrasted_in_float32() -> None:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    y = torch.arange(16) % 3
    full, _ = pair_contrast(z, y, z, y, 0.07, 0.07)
    half, _ = pair_contrast(z.bfloat16(), y, z.bfloat16(), y, 0.07, 0.07)
    assert half.dtype == torch.float32
    assert torch.allclose(half, full, atol=0.05)  # only the bf16 rounding of the inputs remains


def test_memory_bank_entries_and_keys_against_an_independent_computation() -> None:
    """The entries one step adds: per image and class, the L2-normalised mean of its pixel
    embeddings (labels nearest-resized to the embedding) and up to `freq` of its pixel
    embeddings; the next step contrasts its anchors with the batch, the pixel memory *and* the
    segment memory (a float64 loop reference over exactly those keys)."""
    k, freq = 4, 3
    term = PixelMemoryContrastLoss(RandomSampler(64, 5), num_classes=k, dim=8, memory_size=50, pixel_update_freq=freq,
                                   temperature=0.1, base_temperature=0.07)
    out, targets = _output(3, k=k)
    term(out, targets)
    pending = term.pending_entries()
    emb = F.normalize(out.embeddings["projection"].hidden.detach(), dim=1)  # [B, D, 8, 8]
    small = labels_at(targets.labels, (8, 8))
    entries, rings = pending["memory"]
    b_k = emb.shape[0] * k
    pix, pix_labels = entries[:b_k * freq], rings[:b_k * freq]  # pixel entries: ring = class
    seg, seg_labels = entries[b_k * freq:], torch.where(rings[b_k * freq:] >= 0, rings[b_k * freq:] - k, -1)
    assert entries.shape[0] == rings.shape[0] == b_k * (freq + 1)
    for b in range(emb.shape[0]):
        for c in range(k):
            where = small[b] == c
            slot = b * k + c
            if not where.any():
                assert seg_labels[slot] == -1 and (pix_labels[slot * freq:(slot + 1) * freq] == -1).all()
                continue
            members = emb[b][:, where].T  # [n, D]
            mean = members.mean(0)
            torch.testing.assert_close(seg[slot], mean / mean.norm())
            assert seg_labels[slot] == c
            chosen = pix[slot * freq:(slot + 1) * freq][pix_labels[slot * freq:(slot + 1) * freq] == c]
            assert len(chosen) == min(freq, len(members))
            for row in chosen:  # each is one of the class's own pixel embeddings, none twice
                assert (members - row).abs().max(1).values.min() < 1e-6
            assert len({tuple(r.tolist()) for r in chosen}) == len(chosen)
    for name, (f, lab) in pending.items():
        term.enqueue(name, f, lab)

    out2, targets2 = _output(4, k=k)
    torch.manual_seed(9)
    anchors = term.sample(out2, targets2)
    z, y = anchors.z[anchors.valid], anchors.y[anchors.valid]
    torch.manual_seed(9)
    loss = term(out2, targets2)
    feats, rings, filled = term.memory.entries()
    keys = [z.detach(), feats[filled]]
    key_labels = [y, rings[filled] % k]  # pixel and segment rings of a class: that class
    assert int((seg_labels >= 0).sum()) == int((filled & (rings >= k)).sum()) > 0
    assert int((pix_labels >= 0).sum()) == int((filled & (rings < k)).sum()) > 0
    expected = reference_loss(z.detach(), y, torch.cat(keys), torch.cat(key_labels), 0.1, 0.07, "per_positive")
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_contrast_labels_are_nearest_resized_never_blended() -> None:
    """Labels reach the embedding's resolution by nearest neighbour: a sampled anchor's label is
    the label at its pixel's position in the full map (row 2i, column 2i here), never a value
    made by blending neighbours (bilinear between classes 0 and 4 would make 1, 2 or 3)."""
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(1, 8, 8, 8, generator=g), dim=1)
    logits = torch.randn(1, 5, 16, 16, generator=g)
    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[:, :, 1::2] = 4  # every other column: a blend would land between 0 and 4
    target[:, 5:9] = 2
    out = SegOutput(logits=logits, embeddings={"projection": PixelEmbedding.from_dense(emb)})
    anchors = PixelContrastLoss(RandomSampler(max_samples=200, max_views=2)).sample(out, Targets(target))
    y, index = anchors.y[anchors.valid], anchors.index[anchors.valid]
    rows, cols = index // 8, index % 8
    assert len(index) > 0 and torch.equal(y, target[0, 2 * rows, 2 * cols])
    assert set(y.tolist()) <= {0, 2}  # the even columns hold 0, the rows 5-8 band 2


def test_pair_and_cac_similarities_stay_float32_under_mixed_precision() -> None:
    """Autocast would run the similarity matmul in bfloat16 (about 1e-2 relative error in the
    loss); the contrast terms compute it in float32."""
    from segcon.objectives.cac import cac_per_anchor
    from segcon.objectives.contrast import pair_contrast

    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=1)
    q = torch.randn(300, 5, generator=g)
    y = torch.randint(0, 5, (300,), generator=g)
    plain = (pair_contrast(z, y, z, y, 0.1, 0.07)[0], cac_per_anchor(z, y, q, 0.1, 0.07))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = (pair_contrast(z, y, z, y, 0.1, 0.07)[0], cac_per_anchor(z, y, q, 0.1, 0.07))
    for a, b in zip(plain, mixed, strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
