"""Contextrast (METHODS.md §2) against a float64 loop reference, its sampler, and its gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segcon.models.output import PixelEmbedding, SegOutput
from segcon.objectives.base import Targets
from segcon.objectives.contextrast import ContextrastLoss
from segcon.objectives.samplers import ViewsSampler
from segcon.utils.errors import ConfigError

IGNORE = 255


def every_valid_pixel(labels: torch.Tensor, preds: torch.Tensor, *_: object, segments: tuple[torch.Tensor, int],
                      **__: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic sampler for the reference: all labelled pixels, as one list of every pixel
    per layer, with the layer's labelled ones valid."""
    column_level, levels = segments
    level = column_level[None, :].expand_as(labels).reshape(-1)
    labelled = (labels != IGNORE).reshape(-1)
    valid = labelled[None, :] & (level[None, :] == torch.arange(levels)[:, None])
    return torch.arange(labels.numel()) * valid, valid  # padding rows: pixel 0, as samplers give


def every_other_valid_pixel(labels: torch.Tensor, preds: torch.Tensor, *args: object,
                            segments: tuple[torch.Tensor, int], **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """`every_valid_pixel` at the even flat indices only (the layers' offsets and sizes are even
    in `_case`: pixel (r, c) of an s x s layer is kept when r·s + c is even)."""
    index, valid = every_valid_pixel(labels, preds, *args, segments=segments, **kwargs)
    return index, valid & (torch.arange(labels.numel()) % 2 == 0)[None, :]


def _nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize `[B, H, W]` -> size, source index floor(dst · in / out)."""
    h, w = a.shape[1:]
    rows = (np.arange(size[0]) * h // size[0]).astype(int)
    cols = (np.arange(size[1]) * w // size[1]).astype(int)
    return a[:, rows][:, :, cols]


def _case() -> tuple[SegOutput, torch.Tensor]:
    """Labels 32 x 32 of 2 images, classes 0..2 (class 3 of the K = 4 absent), ignore pixels;
    class 2 is one pixel at the 1/4 layer and absent from the coarser ones; image 1 is predicted
    without any error. Embeddings (D = 5) at 8x8, 4x4, 2x2 from a seeded generator, float64."""
    g = torch.Generator().manual_seed(3)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, 8:24, 4:20] = 1
    labels[0, 12, 4] = 2  # sampled by the 1/4 layer's nearest grid (rows 12 = 4·3, cols 4 = 4·1)
    labels[0, 0:4, :] = IGNORE
    labels[1, 20:28, 20:32] = 0
    preds = labels.clamp(max=3).clone()
    preds[0, 10:22, 2:12] = 0  # image 0: part of class 1 (and the class-2 pixel) predicted 0
    preds[0, 26:32, 20:32] = 1  # background predicted 1
    preds[preds == IGNORE] = 0
    logits = torch.nn.functional.one_hot(preds, 4).permute(0, 3, 1, 2).double() * 3.0
    logits += 0.1 * torch.randn(logits.shape, generator=g, dtype=torch.float64)
    logits[1] = torch.nn.functional.one_hot(labels[1], 4).permute(2, 0, 1).double() * 5.0  # image 1: no errors
    embeddings = {f"l{i}": PixelEmbedding.from_dense(torch.randn(2, 5, s, s, generator=g, dtype=torch.float64,
                                                                 requires_grad=True))
                  for i, s in enumerate((8, 4, 2))}
    return SegOutput(logits=logits, embeddings=embeddings), labels


def _reference(output: SegOutput, labels: torch.Tensor, lam: list[float], wl: float, wh: float, tau: float,
               bane: bool, negatives: str, normalize: bool, half: bool = False, anchor_all: bool = False,
               min_pixels: int | list[int] = 1) -> float:
    """The loss by loops, float64, from the definitions (finest layer first in `lam`). `half`:
    the sampler keeps the pixels with r·s + c even; `anchor_all`: anchors average every labelled
    pixel of the layer, not the sampled ones; a class needs `min_pixels` of them for an anchor (one
    number, or one per layer, finest first)."""
    lab = labels.numpy()
    pred_full = output.logits.detach().argmax(1).numpy()
    layers = []
    for level, name in enumerate(("l0", "l1", "l2")):
        need = min_pixels[level] if isinstance(min_pixels, list) else min_pixels
        dense = output.embeddings[name].hidden.detach().numpy()  # [B, D, s, s]
        s = dense.shape[-1]
        y, p = _nearest(lab, (s, s)), _nearest(pred_full, (s, s))
        vec = {}
        for b in range(2):
            for r in range(s):
                for c in range(s):
                    v = dense[b, :, r, c]
                    vec[(b, r, c)] = v / np.linalg.norm(v)
        labelled = [(k, int(y[k])) for k in vec if y[k] != IGNORE]
        pixels = [(k, cls) for k, cls in labelled if not half or (k[1] * s + k[2]) % 2 == 0]
        anchors = {}
        for n in sorted({cls for _, cls in labelled}):
            members = [vec[k] for k, cls in (labelled if anchor_all else pixels) if cls == n]
            if len(members) < need:
                continue
            anchors[n] = sum(members) / len(members)
            if normalize:
                anchors[n] = anchors[n] / np.linalg.norm(anchors[n])
        errors = []  # (key, true, pred)
        if bane:
            for n in sorted({int(v) for v in y[(y != IGNORE) & (y != p)]}):
                region = (y == n) & (p != n)
                for b in range(2):
                    for r, c in zip(*np.nonzero(region[b]), strict=True):
                        errors.append(((b, r, c), n, int(p[b, r, c])))
        layers.append((vec, pixels, anchors, errors))
    deep_anchors = layers[-1][2]
    total = 0.0
    for i, (vec, pixels, anchors, errors) in enumerate(layers):
        losses = []
        for n, a in anchors.items():
            if i < len(layers) - 1 and n in deep_anchors:
                a = wl * a + wh * deep_anchors[n]
                if normalize:
                    a = a / np.linalg.norm(a)
            pos = [vec[k] for k, cls in pixels if cls == n] + [vec[k] for k, t, _ in errors if t == n]
            neg = [vec[k] for k, cls in pixels if cls != n]
            neg += [vec[k] for k, t, q in errors if (q == n if negatives == "predicted" else t != n)]
            neg_sum = sum(math.exp(float(a @ v) / tau) for v in neg)
            terms = [-math.log(math.exp(float(a @ v) / tau) / (math.exp(float(a @ v) / tau) + neg_sum)) for v in pos]
            if terms:  # an anchor without positives is not counted
                losses.append(sum(terms) / len(terms))
        total += lam[i] * sum(losses) / max(len(losses), 1)
    return total


@pytest.mark.parametrize(("order", "bane", "negatives", "normalize"), [
    ("deep_first", True, "predicted", False), ("fine_first", True, "predicted", False),
    ("deep_first", True, "other_classes", False), ("deep_first", False, "predicted", False),
    ("fine_first", True, "predicted", True),
])
def test_contextrast_equals_a_float64_loop_reference(order: str, bane: bool, negatives: str, normalize: bool) -> None:
    output, labels = _case()
    # logits at the decoder's own resolution that disagree with the main ones: BANE and the
    # samplers use the main logits (METHODS.md §2(b)), so they must change nothing
    output.decoder_logits = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    term = ContextrastLoss(every_valid_pixel, embeddings=["l0", "l1", "l2"], level_weights=[1.0, 0.6, 0.2],
                           level_weights_order=order, temperature=0.5, context_weights=[0.4, 0.6], bane=bane,
                           bane_fraction=1.0, bane_max_per_class=10_000, bane_negatives=negatives,
                           normalize_anchors=normalize)
    got = term(output, Targets(labels, IGNORE))
    lam = [0.2, 0.6, 1.0] if order == "deep_first" else [1.0, 0.6, 0.2]
    expected = _reference(output, labels, lam, 0.4, 0.6, 0.5, bane, negatives, normalize)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # the case covers what it claims: class 2 is one pixel at the finest layer only, and image 1
    # has no error at any layer while image 0 has some
    assert (_nearest(labels.numpy(), (8, 8)) == 2).sum() == 1
    assert (_nearest(labels.numpy(), (4, 4)) == 2).sum() == 0
    pred = output.logits.argmax(1).numpy()
    assert (pred[1] == labels.numpy()[1]).all() and (pred[0] != labels.numpy()[0]).any()


@pytest.mark.parametrize(("anchor_pixels", "min_pixels"), [("sampled", 1), ("all", 1), ("all", 2), ("sampled", 3),
                                                           ("all", [1, 1, 3]), ("all", [2, 4, 1])])
def test_anchors_of_all_pixels_or_the_sampled_ones_with_a_minimum_against_the_loop(anchor_pixels: str,
                                                                                    min_pixels: int | list[int]) -> None:
    """A sampler that keeps half of the pixels: `all` anchors average every labelled pixel of the
    layer, `sampled` ones the kept half; the contrast's pixels are the kept half either way. The
    class-2 pixel (one, at the finest layer, an error pixel BANE adds) is not sampled: under
    `all` it forms an anchor of one pixel, which `anchor_min_pixels: 2` drops; a list sets the
    minimum per layer (finest first), and the case tells it from the same number everywhere."""
    output, labels = _case()
    term = ContextrastLoss(every_other_valid_pixel, embeddings=["l0", "l1", "l2"], level_weights=[1.0, 0.6, 0.2],
                           temperature=0.5, context_weights=[0.4, 0.6], bane_fraction=1.0,
                           bane_max_per_class=10_000, anchor_pixels=anchor_pixels, anchor_min_pixels=min_pixels)
    got = term(output, Targets(labels, IGNORE))
    expected = _reference(output, labels, [0.2, 0.6, 1.0], 0.4, 0.6, 0.5, True, "predicted", False, half=True,
                          anchor_all=anchor_pixels == "all", min_pixels=min_pixels)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    others = {ContextrastLoss(every_other_valid_pixel, embeddings=["l0", "l1", "l2"], level_weights=[1.0, 0.6, 0.2],
                              temperature=0.5, context_weights=[0.4, 0.6], bane_fraction=1.0,
                              bane_max_per_class=10_000, anchor_pixels=a)(output, Targets(labels, IGNORE)).item()
              for a in ("sampled", "all")}
    assert len(others) == 2  # the case tells the two apart
    if isinstance(min_pixels, list):  # per layer: neither the layers' smallest nor their largest minimum everywhere
        for everywhere in {min(min_pixels), max(min_pixels)}:
            assert got.item() != pytest.approx(_reference(output, labels, [0.2, 0.6, 1.0], 0.4, 0.6, 0.5, True,
                                                          "predicted", False, half=True,
                                                          anchor_all=anchor_pixels == "all", min_pixels=everywhere))
    with pytest.raises(ConfigError, match="anchor_pixels"):
        ContextrastLoss(every_valid_pixel, anchor_pixels="some")
    for bad in (0, 1.5, True, "2", [1, 2], [1, 0, 1, 1], [1, 1.5, 2, 1]):
        with pytest.raises(ConfigError, match="anchor_min_pixels"):
            ContextrastLoss(every_valid_pixel, anchor_min_pixels=bad)
    assert ContextrastLoss(every_valid_pixel, anchor_min_pixels=2.0).anchor_min_pixels == (2, 2, 2, 2)


def test_bane_pixels_change_the_loss_and_the_fraction_selects_among_them() -> None:
    """(Which pixels K % keeps is tested in tests/test_boundary.py.)"""
    output, labels = _case()
    kwargs = dict(embeddings=["l0", "l1", "l2"], level_weights=[1.0, 0.6, 0.2])
    values = [ContextrastLoss(every_valid_pixel, bane=bane, bane_fraction=fraction, **kwargs)(output, Targets(labels, IGNORE)).item()
              for bane, fraction in ((False, 1.0), (True, 1.0), (True, 0.2))]
    assert len({round(v, 9) for v in values}) == 3


def test_gradients_reach_every_layer_head_and_the_encoder_but_not_the_classifier() -> None:
    from segcon.models.segnet import SegNet

    torch.manual_seed(0)
    spec = {f"ctx_{i - 1}": {"source": "encoder", "stages": [i], "dim": 16, "kind": "conv_relu_bn"} for i in range(2, 6)}
    net = SegNet("unet", "resnet18", num_classes=3, projections=spec).train()
    labels = torch.randint(0, 3, (2, 64, 64))
    term = ContextrastLoss(ViewsSampler(min_pixels=1, max_views=50, max_total=400))
    term(net(torch.randn(2, 3, 64, 64)), Targets(labels)).backward()
    for name, head in net.heads.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), name
    for stage in (net.model.encoder.layer1, net.model.encoder.layer4):
        assert stage[0].conv1.weight.grad.abs().sum() > 0
    assert net.model.segmentation_head[0].weight.grad is None
    assert all(p.grad is None for p in net.model.decoder.parameters())


def test_degenerate_batches_give_a_connected_zero() -> None:
    output, labels = _case()
    term = ContextrastLoss(every_valid_pixel, embeddings=["l0", "l1", "l2"], level_weights=[1.0, 0.6, 0.2])
    nothing = term(output, Targets(torch.full_like(labels, IGNORE), IGNORE))
    one_class = term(output, Targets(torch.ones_like(labels), IGNORE))  # no negatives
    for value in (nothing, one_class):
        assert value.item() == 0.0
        value.backward()
    assert all(e.hidden.grad is not None and torch.isfinite(e.hidden.grad).all() for e in output.embeddings.values())


def test_any_sampler_works_the_order_is_checked_and_mixed_precision_stays_float32() -> None:
    from segcon.objectives.samplers import MarginalSampler
    from segcon.utils.errors import ConfigError

    output, labels = _case()
    kwargs = dict(embeddings=["l0", "l1", "l2"], level_weights=[1.0, 0.6, 0.2])
    marginal = ContextrastLoss(MarginalSampler(max_samples=200, max_views=20, ignore_index=IGNORE), **kwargs)
    assert torch.isfinite(marginal(output, Targets(labels, IGNORE)))
    with pytest.raises(ConfigError, match="from the finest layer to the deepest"):
        ContextrastLoss(every_valid_pixel, embeddings=["l2", "l1", "l0"], level_weights=[1.0, 0.6, 0.2])(
            output, Targets(labels, IGNORE))
    single = SegOutput(logits=output.logits.float(),
                       embeddings={k: PixelEmbedding.from_dense(e.hidden.detach().float()) for k, e in output.embeddings.items()})
    term = ContextrastLoss(every_valid_pixel, bane=False, **kwargs)
    full = term(single, Targets(labels, IGNORE))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = term(single, Targets(labels, IGNORE))
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(full.item(), rel=1e-5)


def test_views_sampler_takes_the_same_count_from_every_kept_pair() -> None:
    labels = torch.full((2, 100), IGNORE)
    labels[0, :40], labels[0, 40:44] = 1, 2  # class 2 has 4 < 5 pixels in image 0: dropped
    labels[1, :30], labels[1, 30:90] = 0, 1
    sampler = ViewsSampler(min_pixels=5, max_views=2500, max_total=10_000, ignore_index=IGNORE)
    index, ok = sampler(labels, labels, num_classes=3, generator=torch.Generator().manual_seed(0))
    assert index.numel() == ok.numel() == 10_000  # max_total rows, the valid ones first
    index = index[ok]
    image, cls = index // 100, labels.reshape(-1)[index]
    counts = {(int(i), int(c)): int(((image == i) & (cls == c)).sum()) for i, c in {(0, 1), (1, 0), (1, 1)}}
    assert counts == {(0, 1): 30, (1, 0): 30, (1, 1): 30}  # the smallest kept pair has 30
    assert not ((image == 0) & (cls == 2)).any()
    _, capped = ViewsSampler(min_pixels=5, max_views=2500, max_total=60, ignore_index=IGNORE)(labels, labels,
                                                                                              num_classes=3)
    assert int(capped.sum()) == 60  # 60 // 3 pairs = 20 each
    assert int(ViewsSampler(max_views=7, ignore_index=IGNORE)(labels, labels, num_classes=3)[1].sum()) == 21
    _, one_each = ViewsSampler(min_pixels=5, max_total=2, ignore_index=IGNORE)(labels, labels, num_classes=3)
    assert one_each.numel() == 2 * 3 and int(one_each.sum()) == 3  # fewer rows than pairs: one per pair
    assert len(set(index.tolist())) == index.numel()


def test_views_sampler_global_caps_divide_by_the_device_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from segcon.utils.errors import ConfigError

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert ViewsSampler(max_views=2500, max_total=10_000, caps="global").limits() == (625, 2500)
    assert ViewsSampler(max_views=10, max_total=30, caps="global").limits() == (3, 8)  # rounded up
    assert ViewsSampler(max_views=2500, max_total=10_000, caps="device").limits() == (2500, 10_000)
    with pytest.raises(ConfigError, match="caps must be device or global"):
        ViewsSampler(caps="node")
