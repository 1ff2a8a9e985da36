"""segcon.utils.static and the multi-level (segmented) sampling built on it, against loop
references: ranks inside groups, fixed-capacity lists per segment, several maps side by side,
and samplers and BANE that treat each level of a layout as if it were alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from segcon.objectives.boundary import boundary_errors
from segcon.objectives.samplers import HardEasySampler, MarginalSampler, ViewsSampler
from segcon.utils.static import class_counts, compact, level_layout, rank_in_group

IGNORE = 255
SIZES = ((19, 15), (10, 8), (5, 4))  # nearest resizes of 37 x 29 at ratios that are not whole numbers


def test_rank_in_group_equals_a_loop_with_ties_broken_by_position() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        group = torch.randint(0, 6, (50,), generator=g)
        priority = torch.randint(0, 4, (50,), generator=g).float()  # many ties
        expected = [sum(1 for j in range(50) if group[j] == group[i] and
                        (priority[j] < priority[i] or (priority[j] == priority[i] and j < i))) for i in range(50)]
        assert rank_in_group(group, priority).tolist() == expected
    assert rank_in_group(torch.zeros(0, dtype=torch.long), torch.zeros(0)).numel() == 0


def test_class_counts_equal_bincount_of_the_masked_labels_with_ignore_values_left_out() -> None:
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 5, (3, 7, 9), generator=g)
    labels[:, :2] = IGNORE  # outside [0, K): only ever where the mask is False
    mask = (labels != IGNORE) & (torch.rand(3, 7, 9, generator=g) < 0.6)
    assert class_counts(labels, mask, 5).tolist() == torch.bincount(labels[mask], minlength=5).tolist()


def test_compact_lists_each_segments_true_elements_in_order_up_to_capacity() -> None:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(40, generator=g) < 0.5
    segment = torch.randint(0, 3, (40,), generator=g)
    index, valid = compact(mask, 6, segment, 3)
    assert index.shape == valid.shape == (3, 6)
    for s in range(3):
        members = [i for i in range(40) if mask[i] and segment[i] == s][:6]
        assert index[s][valid[s]].tolist() == members
        assert valid[s].sum() == len(members) and (index[s][~valid[s]] == 0).all()
    flat, ok = compact(mask, 100)  # one list: every True element, the rest padding
    assert flat[ok].tolist() == torch.nonzero(mask)[:, 0].tolist() and ok.sum() == mask.sum()


def _maps(seed: int = 2, batch: int = 3, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (batch, 37, 29), generator=g)
    labels[:, :4] = IGNORE
    labels[0, 10:30, 5:20] = 1  # a large region, so that every level has errors with a distance > 1
    preds = torch.where(torch.rand(batch, 37, 29, generator=g) < 0.3, (labels + 1) % k, labels.clamp(max=k - 1))
    preds[0, 12:26, 7:18] = 0
    return labels, preds


def test_level_layout_puts_the_nearest_resized_maps_side_by_side() -> None:
    labels, _ = _maps()
    layout = level_layout(SIZES, 3, labels.device)
    side = layout.gather(labels)
    assert side.shape == (3, sum(h * w for h, w in SIZES))
    for level, (size, part) in enumerate(zip(SIZES, layout.split(side), strict=True)):
        resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        assert torch.equal(part, resized)
        # each element's level, image and pixel point at the same value in that level's map
        at = (layout.element_level == level).nonzero()[:, 0]
        assert torch.equal(side.reshape(-1)[at], resized.reshape(3, -1)[layout.image[at], layout.pixel[at]])


def _per_level(layout, side: torch.Tensor) -> list[torch.Tensor]:
    return [m.reshape(side.shape[0], -1) for m in layout.split(side)]


def _local(layout, index: torch.Tensor) -> torch.Tensor:
    """Flat indices into the layout -> flat indices into each level's own `[B * h * w]`."""
    sizes = torch.tensor([h * w for h, w in layout.sizes])
    return layout.image[index] * sizes[layout.element_level[index]] + layout.pixel[index]


@pytest.mark.parametrize("sampler", [MarginalSampler(max_samples=40, max_views=6, ignore_index=IGNORE),
                                     MarginalSampler(max_samples=500, max_views=500, ignore_index=IGNORE)])
def test_a_segmented_sampler_picks_what_it_picks_for_each_level_alone(sampler) -> None:
    labels, preds = _maps()
    layout = level_layout(SIZES, 3, labels.device)
    lab, pred = layout.gather(labels), layout.gather(preds)
    probs = torch.rand(3, 4, lab.shape[1], generator=torch.Generator().manual_seed(5))
    index, valid = sampler(lab, pred, probs, num_classes=4, segments=(layout.column_level, len(SIZES)))
    assert index.shape == valid.shape == (len(SIZES), sampler.capacity(3, 4))
    offsets = layout.offsets
    for level, (l_lab, l_pred) in enumerate(zip(_per_level(layout, lab), _per_level(layout, pred), strict=True)):
        n = l_lab.shape[1]
        l_probs = probs[:, :, offsets[level]:offsets[level] + n]
        alone, ok = sampler(l_lab, l_pred, l_probs, num_classes=4)
        assert (layout.element_level[index[level][valid[level]]] == level).all()
        assert sorted(_local(layout, index[level][valid[level]]).tolist()) == sorted(alone[ok].tolist())


@pytest.mark.parametrize("sampler", [ViewsSampler(min_pixels=3, max_views=7, max_total=60, ignore_index=IGNORE),
                                     HardEasySampler(max_samples=50, max_views=5, ignore_index=IGNORE)])
def test_random_segmented_samplers_take_each_levels_own_counts(sampler) -> None:
    labels, preds = _maps()
    layout = level_layout(SIZES, 3, labels.device)
    lab, pred = layout.gather(labels), layout.gather(preds)
    torch.manual_seed(0)
    index, valid = sampler(lab, pred, num_classes=4, segments=(layout.column_level, len(SIZES)))
    for level, (l_lab, l_pred) in enumerate(zip(_per_level(layout, lab), _per_level(layout, pred), strict=True)):
        alone, ok = sampler(l_lab, l_pred, num_classes=4)  # other draws, the same counts per (image, class[, hard])
        local = _local(layout, index[level][valid[level]])

        def counts(flat: torch.Tensor, l_lab=l_lab, l_pred=l_pred) -> list[tuple[int, int, bool]]:
            n, y, p = l_lab.shape[1], l_lab.reshape(-1), l_pred.reshape(-1)
            split = getattr(sampler, "split", False)  # hard / easy quotas (HardEasySampler) or none
            return sorted((int(i) // n, int(y[i]), split and bool(p[i] != y[i])) for i in flat)

        assert counts(local) == counts(alone[ok])
        assert (l_lab.reshape(-1)[local] != IGNORE).all()


def test_bane_over_a_layout_keeps_each_levels_nearest_error_pixels() -> None:
    labels, preds = _maps()
    layout = level_layout(SIZES, 3, labels.device)
    lab, pred = layout.gather(labels), layout.gather(preds)
    fraction, cap = 0.4, 1000
    index, true, predicted, valid = boundary_errors(lab, pred, 4, IGNORE, fraction, cap, layout=layout)
    assert index.shape == (len(SIZES), 4 * cap)
    for level, (l_lab, l_pred) in enumerate(zip(layout.split(lab), layout.split(pred), strict=True)):
        picked = index[level][valid[level]]
        assert torch.equal(true[level][valid[level]], lab.reshape(-1)[picked])
        assert torch.equal(predicted[level][valid[level]], pred.reshape(-1)[picked])
        local = _local(layout, picked)
        lab_np, pred_np = l_lab.numpy(), l_pred.numpy()
        for c in range(4):
            region = (lab_np == c) & (pred_np != c)
            # scipy per image: distance of each error pixel to the edge of its class's region
            dist = np.stack([ndimage.distance_transform_edt(r) for r in region]).reshape(-1)
            members = np.nonzero(region.reshape(-1))[0]
            mine = [int(i) for i in local if lab_np.reshape(-1)[i] == c]
            assert len(mine) == int(np.ceil(fraction * len(members)))
            if mine and len(mine) < len(members):  # the nearest ones: none left out is nearer
                assert dist[mine].max() <= dist[np.setdiff1d(members, mine)].min()
