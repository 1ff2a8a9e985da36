"""Inference used by validation, test, segcon-eval, segcon-predict and the benchmark.

Three modes (the `data.eval` config node, parsed by `InferenceSettings.from_config`):

- `whole`: one pass per image, padded to the network's stride.
- `slide`: windows of `crop` every `stride` pixels over the image (padded to at least one
  window); windows of all images of a batch are batched together, `chunk` at a time, so memory
  is bounded by `chunk` windows whatever the image size.
- `ms_flip`: the image at each of `scales` (and mirrored, with `flip`), each view run `whole`
  (or `slide` with `ms_slide`), the probabilities resized to full resolution and averaged.

Every mode returns log-probabilities `[B, K, H, W]` at the input resolution, so argmax is the
prediction and softmax the probabilities in all of them. `slide` and `ms_flip` average
*probabilities*, not logits: one over-confident window or view would otherwise dominate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcon.utils.errors import ConfigError

MODES = ("whole", "slide", "ms_flip")


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad `[B, C, H, W]` at the bottom/right so H and W are multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def predict_whole(net: nn.Module, images: Tensor, input_divisor: int) -> Tensor:
    """Logits `[B, K, H, W]` for images `[B, 3, H, W]` of any size, in one pass per batch.

    The input is zero-padded (zero = the normalised mean) to a multiple of `input_divisor`; the
    logits are resized to the padded size if the network returns them smaller, then cropped.
    """
    h, w = images.shape[-2:]
    x = pad_to_multiple(images, input_divisor)
    logits = net(x)
    if logits.shape[-2:] != x.shape[-2:]:
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :h, :w]


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of length `crop` every `stride` along an axis of length
    `size >= crop`; the last window is moved back to end at `size` (no window hangs over)."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _pair(value: Any, key: str) -> tuple[int, int]:
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ConfigError(f"{key} must be a positive int or [height, width], got {value!r}")
    return h, w


def _scaled(h: int, w: int, scale: float) -> tuple[int, int]:
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


@dataclass(frozen=True)
class InferenceSettings:
    """How evaluation turns images into class scores (see the module docstring).

    Attributes:
        mode: whole | slide | ms_flip.
        crop: slide window (height, width).
        stride: slide step (height, width); windows overlap where stride < crop.
        scales: ms_flip image scales (1.0 = the input size).
        flip: ms_flip also predicts the horizontally mirrored image of every scale.
        ms_slide: ms_flip runs each view with slide instead of whole (large images, big scales).
        chunk: slide windows per forward pass.
    """

    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    ms_slide: bool = False
    chunk: int = 4

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, key: str = "data.eval") -> InferenceSettings:
        """Parse and check a config node; errors name `<key>.<field>`. A null stride is 2/3 of
        the crop (the common protocol); null entries keep the defaults."""
        node = {k: v for k, v in (node or {}).items() if v is not None}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ConfigError(f"{key} has unknown key(s) {unknown}; valid keys: {sorted(known)}")
        mode = node.get("mode", "whole")
        if mode not in MODES:
            raise ConfigError(f"{key}.mode={mode!r}; use one of {', '.join(MODES)}")
        crop = _pair(node["crop"], f"{key}.crop") if "crop" in node else None
        slides = mode == "slide" or (mode == "ms_flip" and bool(node.get("ms_slide", False)))
        if slides and crop is None:
            raise ConfigError(f"{key}.mode={mode} slides windows but {key}.crop is not set; set it, e.g. {key}.crop=[512,512]")
        stride = None
        if crop is not None:
            stride = _pair(node["stride"], f"{key}.stride") if "stride" in node else (
                max(1, round(2 * crop[0] / 3)), max(1, round(2 * crop[1] / 3)))
            if stride[0] > crop[0] or stride[1] > crop[1]:
                raise ConfigError(
                    f"{key}.stride={list(stride)} is larger than {key}.crop={list(crop)}: pixels between "
                    "windows would never be predicted. Use a stride <= crop (2/3 of it is usual)."
                )
        scales = tuple(float(s) for s in node.get("scales", (1.0,)))
        if not scales or min(scales) <= 0:
            raise ConfigError(f"{key}.scales must be a non-empty list of positive numbers, got {list(scales)}")
        chunk = node.get("chunk", 4)
        if not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"{key}.chunk must be a positive integer (windows per forward pass), got {chunk!r}")
        return cls(mode, crop, stride, scales, bool(node.get("flip", False)), bool(node.get("ms_slide", False)), chunk)

    @property
    def slides(self) -> bool:
        """Whether views are covered by sliding windows (else one whole pass per view)."""
        return self.mode == "slide" or (self.mode == "ms_flip" and self.ms_slide)

    def views(self, h: int, w: int) -> list[tuple[tuple[int, int], bool]]:
        """(size, mirrored) of every view of an `h x w` image."""
        if self.mode != "ms_flip":
            return [((h, w), False)]
        flips = (False, True) if self.flip else (False,)
        return [(_scaled(h, w, s), f) for s in self.scales for f in flips]

    def _windows(self, h: int, w: int) -> int:
        assert self.crop is not None and self.stride is not None
        (ch, cw), (sh, sw) = self.crop, self.stride
        return len(window_starts(max(h, ch), ch, sh)) * len(window_starts(max(w, cw), cw, sw))

    def passes(self, h: int, w: int) -> int:
        """Network passes (whole views or windows) per `h x w` image."""
        return sum(self._windows(*size) if self.slides else 1 for size, _ in self.views(h, w))

    def pixel_ratio(self, h: int, w: int) -> float:
        """Pixels the network processes per image, relative to one whole pass: the expected cost
        relative to `whole` (network cost grows about linearly with the pixel count)."""
        total = 0
        for vh, vw in (size for size, _ in self.views(h, w)):
            if self.slides:
                assert self.crop is not None
                total += self._windows(vh, vw) * self.crop[0] * self.crop[1]
            else:
                total += vh * vw
        return total / (h * w)

    def describe(self, h: int, w: int) -> str:
        """One line for the start of an evaluation: mode, passes per image, expected cost."""
        parts = [self.mode]
        if self.slides:
            assert self.crop is not None and self.stride is not None
            parts.append(f"crop {self.crop[0]}x{self.crop[1]}, stride {self.stride[0]}x{self.stride[1]}, chunk {self.chunk}")
        if self.mode == "ms_flip":
            parts.append(f"scales {list(self.scales)}{', flip' if self.flip else ''}")
        n = self.passes(h, w)
        return (
            f"inference: {'; '.join(parts)} -> {n} forward pass{'es' if n > 1 else ''} per {h}x{w} image, "
            f"expected cost {self.pixel_ratio(h, w):.2f}x whole"
        )


def slide_probs(
    net: nn.Module, images: Tensor, crop: Sequence[int], stride: Sequence[int], chunk: int, input_divisor: int
) -> Tensor:
    """Probabilities `[B, K, H, W]`: the softmax of every window, averaged where windows overlap.

    Images `[B, 3, H, W]` of any size are zero-padded at the bottom/right to at least one window;
    the windows of all B images go through the network `chunk` at a time.
    """
    b, _, h, w = images.shape
    ch, cw = crop
    x = F.pad(images, (0, max(cw - w, 0), 0, max(ch - h, 0)))
    hp, wp = x.shape[-2:]
    boxes = [(y, x0) for y in window_starts(hp, ch, stride[0]) for x0 in window_starts(wp, cw, stride[1])]
    count = torch.zeros(hp, wp, device=images.device)
    for y, x0 in boxes:
        count[y : y + ch, x0 : x0 + cw] += 1
    jobs = [(i, y, x0) for y, x0 in boxes for i in range(b)]
    probs: Tensor | None = None
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        windows = torch.stack([x[i, :, y : y + ch, x0 : x0 + cw] for i, y, x0 in part])
        p = predict_whole(net, windows, input_divisor).float().softmax(1)
        if probs is None:
            probs = p.new_zeros(b, p.shape[1], hp, wp)
        for (i, y, x0), pi in zip(part, p, strict=True):
            probs[i, :, y : y + ch, x0 : x0 + cw] += pi
    assert probs is not None
    return (probs / count)[..., :h, :w]


@torch.no_grad()
def infer(net: nn.Module, images: Tensor, settings: InferenceSettings, input_divisor: int) -> Tensor:
    """Log-probabilities `[B, K, H, W]` for normalised images `[B, 3, H, W]` by `settings.mode`.

    `net` maps `[B, 3, h, w]` (h, w multiples of `input_divisor`) to logits `[B, K, h', w']`
    (resized up if smaller) and must be in eval mode.
    """
    if settings.mode == "whole":
        return F.log_softmax(predict_whole(net, images, input_divisor).float(), dim=1)
    h, w = images.shape[-2:]
    views = settings.views(h, w)
    total: Tensor | None = None
    for size, mirrored in views:
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if mirrored:
            x = x.flip(-1)
        if settings.slides:
            assert settings.crop is not None and settings.stride is not None
            probs = slide_probs(net, x, settings.crop, settings.stride, settings.chunk, input_divisor)
        else:
            probs = predict_whole(net, x, input_divisor).float().softmax(1)
        if mirrored:
            probs = probs.flip(-1)
        if size != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        total = probs if total is None else total.add_(probs)
    assert total is not None
    # Clamped: a probability that underflowed to 0 would give -inf and NaNs downstream.
    return (total / len(views)).clamp_min_(torch.finfo(total.dtype).tiny).log_()
