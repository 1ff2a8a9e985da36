"""CutMix: boxes, and images, pseudo-labels and confidences mixed with exactly the same box."""

from __future__ import annotations

import torch

from segcon.methods.mixing import cutmix_masks
from segcon.utils.maps import cutmix


def test_masks_are_single_boxes_of_the_requested_area() -> None:
    g = torch.Generator().manual_seed(0)
    masks = cutmix_masks(200, (40, 60), prob=0.5, generator=g)
    boxed = masks.flatten(1).any(1)
    assert 70 < int(boxed.sum()) < 130  # about half of the images get a box
    for m in masks[boxed]:
        rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
        # one filled rectangle: its bounding box is full
        assert bool(m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())
        assert int(m.sum()) == len(rows) * len(cols)
        assert 0.01 <= float(m.float().mean()) <= 0.45  # 2 %..40 % up to integer rounding
    again = cutmix_masks(200, (40, 60), prob=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_image_labels_and_confidence_share_the_box() -> None:
    g = torch.Generator().manual_seed(1)
    b, h, w = 6, 16, 20
    mask = cutmix_masks(b, (h, w), prob=1.0, generator=g)
    image, src_image = torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g) + 2.0
    labels, src_labels = torch.randint(0, 4, (b, h, w), generator=g), torch.randint(10, 14, (b, h, w), generator=g)
    conf, src_conf = torch.rand(b, h, w, generator=g), torch.rand(b, h, w, generator=g) + 5.0
    mixed_image, mixed_labels, mixed_conf = cutmix(mask, image, src_image), cutmix(mask, labels, src_labels), cutmix(mask, conf, src_conf)
    from_source_image = (mixed_image >= 2.0).all(1)  # the source's values are the only ones >= 2
    assert torch.equal(from_source_image, mask)
    assert torch.equal(mixed_labels >= 10, mask) and torch.equal(mixed_conf >= 5.0, mask)
    assert torch.equal(mixed_labels[mask], src_labels[mask]) and torch.equal(mixed_labels[~mask], labels[~mask])
    assert torch.equal(mixed_conf[mask], src_conf[mask]) and torch.equal(mixed_image.permute(0, 2, 3, 1)[~mask], image.permute(0, 2, 3, 1)[~mask])
