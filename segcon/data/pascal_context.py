"""PASCAL-Context, 59 classes, in mmseg's layout inside `VOCdevkit/VOC2010`."""

from __future__ import annotations

from segcon.data.base import LabelMapping
from segcon.data.voc import VOC

NUM_CLASSES = 59


class PascalContext(VOC):
    """`JPEGImages/<id>.jpg` with `SegmentationClassContext/<id>.png`, ids from
    `ImageSets/SegmentationContext/<split>.txt` (split: train | val).

    Masks hold 0 = background (ignored in the 59-class protocol) and 1..59 -> train ids 0..58;
    255 is ignored; any other value is invalid.
    """

    layout = (
        "JPEGImages/<id>.jpg with SegmentationClassContext/<id>.png (0 background, 1..59 "
        "classes) and ids in ImageSets/SegmentationContext/<split>.txt"
    )
    fixed_num_classes = NUM_CLASSES
    mask_dir = "SegmentationClassContext"
    list_dir = "ImageSets/SegmentationContext"

    def label_mapping(self) -> LabelMapping:
        return LabelMapping({v: v - 1 for v in range(1, NUM_CLASSES + 1)}, frozenset({0, 255}))
