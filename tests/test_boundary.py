"""The exact distance transform against scipy, and Contextrast's boundary error pixels (BANE)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from segcon.objectives.boundary import boundary_errors, edt, squared_region_edt


def _masks() -> list[np.ndarray]:
    thin = np.zeros((17, 23), bool)
    thin[8, 2:21] = True  # a horizontal line
    thin[1:16, 11] = True  # crossed by a vertical one
    thin[np.arange(3, 14), np.arange(5, 16)] = True  # and a diagonal
    square = np.zeros((17, 23), bool)
    square[3:14, 4:19] = True
    touching = np.zeros((17, 23), bool)
    touching[0:9, 0:12] = True  # touches the image border
    touching[9:17, 12:23] = True  # touches the first region at a corner
    rng = np.random.default_rng(0)
    random = rng.random((17, 23)) < 0.7
    return [thin, square, touching, random]


@pytest.mark.parametrize("chunk", [1 << 24, 64])
def test_edt_equals_scipy(chunk: int) -> None:
    masks = _masks()
    got = edt(torch.from_numpy(np.stack(masks)), chunk_elements=chunk)
    for mask, dist in zip(masks, got, strict=True):
        np.testing.assert_allclose(dist.numpy(), distance_transform_edt(mask), rtol=1e-6, atol=1e-6)


def test_edt_of_an_image_without_background_is_inf_and_bad_input_is_refused() -> None:
    full = torch.ones(1, 4, 5, dtype=torch.bool)
    assert torch.isinf(edt(full)).all()
    with pytest.raises(ValueError, match="bool"):
        edt(torch.ones(4, 5, dtype=torch.bool))


@pytest.mark.parametrize("chunk", [1 << 24, 64])
def test_region_edt_equals_one_scipy_edt_per_region(chunk: int) -> None:
    """Every region of a label map at once (touching regions, an id on the border, a region of
    one pixel): each pixel's squared distance to the nearest pixel of another id is scipy's EDT
    of its own region's mask."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 3, (2, 17, 23))
    ids[0, 3:14, 4:19] = 5  # a large block
    ids[1, :, :] = np.where(rng.random((17, 23)) < 0.8, 7, ids[1])  # mostly one id
    ids[1, 8, 8] = 9  # one pixel
    got = squared_region_edt(torch.from_numpy(ids), chunk_elements=chunk).numpy()
    for b in range(2):
        for i in np.unique(ids[b]):
            region = ids[b] == i
            np.testing.assert_allclose(got[b][region], distance_transform_edt(region)[region] ** 2, rtol=1e-6)


def _reference(labels: np.ndarray, preds: np.ndarray, ignore: int) -> dict[int, dict[int, float]]:
    """Per true class: {flat index: distance to the region's edge} of its error pixels (scipy)."""
    out: dict[int, dict[int, float]] = {}
    for c in np.unique(labels[(labels != ignore) & (labels != preds)]):
        region = (labels == c) & (preds != c)
        dist = np.stack([distance_transform_edt(m) for m in region])
        out[int(c)] = {int(i): float(dist.reshape(-1)[i]) for i in np.flatnonzero(region)}
    return out


def test_boundary_errors_keep_the_nearest_fraction_of_each_class_region() -> None:
    labels = np.zeros((2, 20, 24), np.int64)
    labels[:, 4:16, 3:21] = 1
    labels[1, 8:12, 6:18] = 2  # touches class 1 inside image 1
    labels[0, 0, :] = 255  # an ignored row
    preds = labels.copy()
    preds[:, 2:18, 1:23] = 0  # class 1 and 2 wholly wrong, and background correct
    preds[0, 0, :] = 3  # wrong, but ignored
    preds[1, 18:, :] = 1  # background predicted as class 1
    ref = _reference(labels, preds, 255)
    for fraction in (0.5, 0.2, 1.0):
        index, true, pred, ok = boundary_errors(torch.from_numpy(labels), torch.from_numpy(preds), 4, 255, fraction,
                                                max_per_class=10_000, generator=torch.Generator().manual_seed(0))
        assert index.numel() == 4 * 10_000
        index, true, pred = index[ok], true[ok], pred[ok]
        flat_labels, flat_preds = labels.reshape(-1), preds.reshape(-1)
        assert np.array_equal(true.numpy(), flat_labels[index.numpy()])
        assert np.array_equal(pred.numpy(), flat_preds[index.numpy()])
        assert (flat_labels[index.numpy()] != flat_preds[index.numpy()]).all()
        assert (flat_labels[index.numpy()] != 255).all()
        assert len(set(index.tolist())) == len(index)
        for c, dist in ref.items():
            chosen = [i for i, t in zip(index.tolist(), true.tolist(), strict=True) if t == c]
            assert len(chosen) == math.ceil(fraction * len(dist)), (c, fraction)
            # the boundary band: no pixel left out is nearer the edge than one kept
            left = [d for i, d in dist.items() if i not in set(chosen)]
            if left:
                assert max(dist[i] for i in chosen) <= min(left)
    assert set(ref) == {0, 1, 2}


def test_boundary_errors_cap_and_degenerate_batches() -> None:
    labels = torch.zeros(1, 30, 30, dtype=torch.long)
    labels[0, 5:25, 5:25] = 1
    preds = torch.zeros_like(labels)  # the class-1 square is wholly wrong: 400 error pixels
    index, true, _, ok = boundary_errors(labels, preds, 2, fraction=1.0, max_per_class=37,
                                         generator=torch.Generator().manual_seed(0))
    assert int(ok.sum()) == 37 and (true[ok] == 1).all()
    again, _, _, _ = boundary_errors(labels, preds, 2, fraction=1.0, max_per_class=37,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(index, again)
    # the whole image wrong: no edge inside it, every pixel still a candidate
    _, _, _, ok = boundary_errors(torch.ones(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), 2,
                                  fraction=0.5)
    assert int(ok.sum()) == 8
    # no errors, or only ignored ones: nothing
    for lab, pred in ((labels, labels), (torch.full_like(labels, 255), preds)):
        index, true, pred_cls, ok = boundary_errors(lab, pred, 2)
        assert index.numel() == true.numel() == pred_cls.numel() == 2 * 256 and not ok.any()
