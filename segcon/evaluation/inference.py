"""Inference on whole images of any size: pad to the network's stride, predict, crop back."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad `[B, C, H, W]` at the bottom/right so H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def predict_whole(net: nn.Module, images: Tensor, output_stride: int) -> Tensor:
    """Logits `[B, K, H, W]` for images `[B, 3, H, W]` of any size, in one pass per batch.

    The input is zero-padded (zero = the normalised mean) to a multiple of `output_stride`; the
    logits are resized to the padded size if the network returns them smaller, then cropped.
    """
    h, w = images.shape[-2:]
    x = pad_to_multiple(images, output_stride)
    logits = net(x)
    if logits.shape[-2:] != x.shape[-2:]:
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :h, :w]
