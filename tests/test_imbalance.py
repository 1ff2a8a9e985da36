"""loss=imbalance: class weights by hand, each kind against a per-pixel loop, and class frequencies
counted on the labeled images only (cached, printed, set before training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from segcon.data.datamodule import SegDataModule
from segcon.data.folder import FolderDataset
from segcon.data.splits import make_split
from segcon.objectives.imbalance import ImbalanceLoss, imbalance_class_weights
from segcon.utils.errors import ConfigError
from tests.fake_datasets import make_folder_dataset
from tests.test_losses import _pixels as loss_pixels

IGNORE = 255


def test_class_weights_by_hand() -> None:
    f = torch.tensor([0.9, 0.1])
    assert imbalance_class_weights("log_inverse", f).tolist() == pytest.approx([1 / math.log(1.92), 1 / math.log(1.12)])
    assert imbalance_class_weights("balanced_ce", f).tolist() == pytest.approx([0.1, 0.9])
    # a class absent from the labeled images: log_inverse's cap 1 / log(1.02); balanced_ce the rarest's weight
    f = torch.tensor([0.8, 0.2, 0.0])
    assert imbalance_class_weights("log_inverse", f)[2].item() == pytest.approx(1 / math.log(1.02))
    assert imbalance_class_weights("balanced_ce", f).tolist() == pytest.approx([1.25 / 11.25, 5 / 11.25, 5 / 11.25])


def _inputs(seed: int, k: int, absent: int | None = None, b: int = 2, h: int = 5, w: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g, dtype=torch.float64)
    target = torch.randint(0, k, (b, h, w), generator=g)
    if absent is not None:
        target[target == absent] = (absent + 1) % k
    target[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE
    weight = torch.rand(b, h, w, generator=g, dtype=torch.float64)
    return logits, target, weight


def _pixels(logits, target, weight):
    """(probabilities [K], label, pixel weight) of every valid pixel, one at a time."""
    weights = weight[target != IGNORE].tolist()  # the loop's (image, row, column) order
    for (logp, t), wt in zip(loss_pixels(logits, target), weights, strict=True):
        yield logp.exp(), t, wt


def _dice(pixels, c: int):
    """(soft Dice of class c with per-pixel weights on both sides, whether c is in the target)."""
    inter = card = 0.0
    present = False
    for p, t, wt in pixels:
        g = wt if t == c else 0.0
        present |= t == c
        inter += float(p[c]) * wt * g
        card += float(p[c]) * wt + g
    return (2 * inter + 1.0) / (card + 1.0), present


@pytest.mark.parametrize(("k", "absent"), [(2, None), (3, 2), (4, None)])
def test_log_inverse_and_balanced_ce_match_a_loop(k: int, absent: int | None) -> None:
    logits, target, weight = _inputs(k, k, absent)
    freqs = torch.tensor([0.7, 0.2, 0.1, 0.0][:k]) / sum([0.7, 0.2, 0.1, 0.0][:k])
    pixels = list(_pixels(logits, target, weight))
    for kind in ("log_inverse", "balanced_ce"):
        cw = imbalance_class_weights(kind, freqs).double().tolist()
        num = sum(-cw[t] * math.log(float(p[t])) * wt for p, t, wt in pixels)
        den = sum(cw[t] for _, t, _ in pixels)
        expected = num / den
        if kind == "log_inverse":  # + mean (1 - Dice) over the foreground classes present
            dices = [_dice(pixels, c) for c in range(1, k)]
            fg = [1 - d for d, present in dices if present]
            expected += sum(fg) / len(fg)
        loss = ImbalanceLoss(kind, k, frequencies=freqs.tolist(), ignore_index=IGNORE)
        assert loss.pixel_loss(logits, target, weight).item() == pytest.approx(expected, rel=1e-9)


def test_focal_matches_a_loop_with_alpha_on_the_foreground() -> None:
    logits, target, weight = _inputs(7, 3)
    pixels = list(_pixels(logits, target, weight))
    terms = [-(0.25 if t != 0 else 0.75) * (1 - float(p[t])) ** 2 * math.log(float(p[t])) * wt for p, t, wt in pixels]
    loss = ImbalanceLoss("focal", 3, alpha=0.25, gamma=2.0, ignore_index=IGNORE)
    assert loss.pixel_loss(logits, target, weight).item() == pytest.approx(sum(terms) / len(pixels), rel=1e-9)
    # two classes: the softmax focal loss is torchvision's sigmoid focal loss of the logit difference
    logits, target, _ = _inputs(8, 2)
    valid = target != IGNORE
    x = (logits[:, 1] - logits[:, 0])[valid]
    y = (target[valid] == 1).double()
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = 0.25 * y + 0.75 * (1 - y)
    sigmoid_focal = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).mean()
    assert ImbalanceLoss("focal", 2, ignore_index=IGNORE).pixel_loss(logits, target).item() == pytest.approx(sigmoid_focal.item(), rel=1e-9)


def test_bce_dice_is_half_bce_half_dice_of_the_foreground() -> None:
    logits, target, _ = _inputs(9, 2)
    valid = target != IGNORE
    p = torch.sigmoid(logits[:, 1] - logits[:, 0])[valid]
    y = (target[valid] == 1).double()
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    dice = (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    loss = ImbalanceLoss("bce_dice", 2, ignore_index=IGNORE).pixel_loss(logits, target)
    assert loss.item() == pytest.approx(0.5 * bce.item() + 0.5 * (1 - dice.item()), rel=1e-9)
    with pytest.raises(ConfigError, match="binary"):
        ImbalanceLoss("bce_dice", 3)


@pytest.mark.parametrize("kind", ["log_inverse", "balanced_ce", "focal", "bce_dice"])
def test_all_ignore_batch_is_finite_and_in_graph(kind: str) -> None:
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    loss = ImbalanceLoss(kind, 2, frequencies=[0.9, 0.1], ignore_index=IGNORE).pixel_loss(logits, torch.full((2, 4, 4), IGNORE))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_weighted_kinds_refuse_to_run_without_frequencies() -> None:
    loss = ImbalanceLoss("log_inverse", 2)
    assert loss.needs_class_frequencies and not ImbalanceLoss("focal", 2).needs_class_frequencies
    with pytest.raises(RuntimeError, match="frequencies are not set"):
        loss.pixel_loss(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    loss.set_class_frequencies([0.5, 0.5])
    assert not loss.needs_class_frequencies and "frequencies" in loss.state_dict()


def _datamodule(root: Path, cache: Path, **kwargs) -> SegDataModule:
    return SegDataModule(
        dataset={"_target_": "segcon.data.folder.FolderDataset"}, root=str(root),
        splits={"train": "train", "val": "val"}, num_classes=3, ignore_index=IGNORE, mean=[0.5] * 3, std=[0.25] * 3,
        batch_size=2, num_workers=0, cache_dir=str(cache), **kwargs,
    )


def test_class_frequencies_count_the_labeled_images_only_and_are_cached(tmp_path: Path) -> None:
    root = tmp_path / "data"
    expected = make_folder_dataset(root, num_classes=3, splits={"train": 8, "val": 2}, size=(12, 16))
    dm = _datamodule(root, tmp_path / "cache", labeled_count=3, split_seed=4, unlabeled=True)
    counted = dm.class_frequencies()
    labeled = make_split(expected.ids["train"], 3, seed=4).labeled
    by_hand = np.zeros(3, np.int64)
    reader = FolderDataset(root, "train", num_classes=3)
    for i, s in enumerate(reader.samples):
        if s.id in labeled:
            mask = reader.load_mask(i)
            by_hand += np.bincount(mask[mask != IGNORE], minlength=3)
    assert counted.class_pixels == by_hand.tolist() != expected.counts["train"].tolist()
    assert counted.images == 3 and not counted.from_cache
    assert sum(counted.frequencies) == pytest.approx(1.0)
    record = json.loads(counted.path.read_text())
    assert record["split_hash"] == dm.split.hash and record["class_pixels"] == by_hand.tolist()
    # a second run reads the file; another split has a file of its own
    again = _datamodule(root, tmp_path / "cache", labeled_count=3, split_seed=4, unlabeled=True).class_frequencies()
    assert again.from_cache and again.path == counted.path and again.class_pixels == counted.class_pixels
    other = _datamodule(root, tmp_path / "cache", labeled_count=3, split_seed=5, unlabeled=True).class_frequencies()
    assert not other.from_cache and other.path != counted.path
    full = _datamodule(root, tmp_path / "cache").class_frequencies()
    assert full.class_pixels == expected.counts["train"].tolist()


def test_imbalance_loss_trains_on_ground_truth_and_pseudo_labels(tiny_cfg, tmp_path: Path) -> None:
    from segcon.train import train
    from tests.test_teacher_student import SSL, _rows, _values

    cfg = tiny_cfg("method=fixmatch", "loss=imbalance", "pseudo_loss=imbalance", f"data.cache_dir={tmp_path}/cache", *SSL)
    train(cfg)
    rows = _rows(Path(cfg.paths.output_dir))
    for key in ("train/loss_imbalance", "train/loss_unsup"):
        values = _values(rows, key)
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), key
    # the frequencies both terms used: those of the 4 labeled images, as counted, kept and logged
    (cached,) = (tmp_path / "cache" / "class_frequencies").glob("*.json")
    record = json.loads(cached.read_text())
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["images"] == 4 and record["split_hash"] == metrics["split_hash"]
    hparams = (next(Path(cfg.paths.output_dir).rglob("hparams.yaml"))).read_text()
    names = list(cfg.data.class_names)
    for name, f in zip(names, record["frequencies"], strict=True):
        assert f"class_frequency/{name}: {f}" in hparams
