"""whole / slide / ms_flip inference on toy networks whose answers are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcon.evaluation.inference import InferenceSettings, infer, window_starts
from segcon.utils.errors import ConfigError

K = 4


def _settings(**kw) -> InferenceSettings:
    return InferenceSettings.from_config(kw)


class Pointwise(nn.Module):
    """A 1x1 convolution: translation- and flip-equivariant, any input size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, K, 1)

    def forward(self, x: Tensor) -> Tensor:
        return 3 * self.conv(x)


class Strided(nn.Module):
    """3x3 convolutions with zero padding and a stride-4 output: neither translation- nor
    flip-equivariant; inputs must be multiples of 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, K, 3, stride=4, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
        return 2 * self.body(x)


class MirrorSymmetric(nn.Module):
    """3x3 convolutions whose kernels are symmetric left-right (zero padding is too), so
    f(flip(x)) == flip(f(x)) while f still mixes neighbouring pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, K, 3, padding=1)
        with torch.no_grad():
            for conv in (self.c1, self.c2):
                conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)

    def forward(self, x: Tensor) -> Tensor:
        return 3 * self.c2(torch.tanh(self.c1(x)))


class Constant(nn.Module):
    """Ignores the pixels: the same logits everywhere, at 1/4 of the (multiple-of-4) input size."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
        b, _, h, w = x.shape
        return self.logits.view(1, -1, 1, 1).expand(b, -1, h // 4, w // 4)


class Counting(nn.Module):
    """Wraps a network and records the batch size of every call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        return self.net(x)


def _images(b: int, h: int, w: int) -> Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


def test_window_starts_cover_the_axis_and_end_at_its_edge() -> None:
    assert window_starts(48, 48, 32) == [0]
    assert window_starts(100, 48, 32) == [0, 32, 52]
    assert window_starts(96, 32, 32) == [0, 32, 64]
    assert window_starts(2048, 1024, 682) == [0, 682, 1024]


def test_slide_over_one_window_equals_whole() -> None:
    net, x = Strided(), _images(2, 32, 48)
    whole = infer(net, x, _settings(mode="whole"), input_divisor=4)
    slide = infer(net, x, _settings(mode="slide", crop=[32, 48], stride=[16, 24]), input_divisor=4)
    assert slide.shape == whole.shape == (2, K, 32, 48)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=0)
    assert torch.equal(slide.argmax(1), whole.argmax(1))


@pytest.mark.parametrize(("h", "w"), [(48, 64), (50, 70), (10, 12)], ids=["tiles", "overhang", "smaller-than-crop"])
def test_slide_with_stride_equal_to_crop_on_a_translation_equivariant_model_equals_whole(h: int, w: int) -> None:
    """Exact tiling, a last window moved back over its neighbour, and an image padded up to one
    window: for a pointwise network every case must give the whole-image answer."""
    net, x = Pointwise(), _images(2, h, w)
    whole = infer(net, x, _settings(mode="whole"), input_divisor=1)
    slide = infer(net, x, _settings(mode="slide", crop=16, stride=16, chunk=3), input_divisor=1)
    assert slide.shape == (2, K, h, w)
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=0)


def test_slide_is_not_whole_for_a_network_that_sees_context() -> None:
    """The previous test has teeth: with 3x3 context, windows differ from the whole image."""
    net, x = Strided(), _images(1, 48, 64)
    whole = infer(net, x, _settings(mode="whole"), input_divisor=4)
    slide = infer(net, x, _settings(mode="slide", crop=16, stride=16), input_divisor=4)
    assert (slide - whole).abs().max() > 1e-3


def test_flip_tta_on_a_flip_symmetric_model_equals_whole() -> None:
    x = _images(2, 24, 40)
    flip = _settings(mode="ms_flip", scales=[1.0], flip=True)
    whole = _settings(mode="whole")
    sym = MirrorSymmetric()
    torch.testing.assert_close(infer(sym, x, flip, 1), infer(sym, x, whole, 1), atol=1e-5, rtol=0)
    # ... and a network that is not mirror-symmetric is changed by flip TTA.
    with torch.no_grad():
        sym.c1.weight[..., 0] += 0.5
    assert (infer(sym, x, flip, 1) - infer(sym, x, whole, 1)).abs().max() > 1e-3


def test_slide_and_flip_average_probabilities_not_logits() -> None:
    """Two overlapping windows, and an image with its mirror: the result is the log of the mean
    of the views' softmax, recomputed here view by view (averaging logits gives another value:
    the networks' logits are large and differ between views)."""
    net, x = Strided(), _images(1, 16, 24)

    def up(t: Tensor, size: tuple[int, int]) -> Tensor:  # what inference does with 1/4-scale logits
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    with torch.no_grad():  # windows 16x16 at x = 0 and x = 8; the network sees context, so they differ
        left, right = up(net(x[..., :16]), (16, 16)), up(net(x[..., 8:]), (16, 16))

    def stitch(a: Tensor, b: Tensor) -> Tensor:  # the two windows' maps, averaged where they overlap
        out = torch.zeros(1, K, 16, 24)
        out[..., :16] += a
        out[..., 8:] += b
        out[..., 8:16] /= 2
        return out

    got = infer(net, x, _settings(mode="slide", crop=16, stride=8), input_divisor=4)
    torch.testing.assert_close(got, stitch(left.softmax(1), right.softmax(1)).log(), atol=1e-5, rtol=0)
    assert (got - stitch(left, right).log_softmax(1)).abs().max() > 1e-2  # averaging logits differs

    x = _images(1, 24, 40)
    with torch.no_grad():
        plain, mirrored = up(net(x), (24, 40)), up(net(x.flip(-1)), (24, 40)).flip(-1)
        expected = ((plain.softmax(1) + mirrored.softmax(1)) / 2).log()
        naive = ((plain + mirrored) / 2).log_softmax(1)
    got = infer(net, x, _settings(mode="ms_flip", scales=[1.0], flip=True), input_divisor=4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - naive).abs().max() > 1e-2


@pytest.mark.parametrize("ms_slide", [False, True])
def test_ms_flip_on_a_constant_model_returns_that_constant(ms_slide: bool) -> None:
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0])
    x = _images(2, 37, 53)  # odd sizes: padding, scaling and resizing back all take part
    settings = _settings(mode="ms_flip", scales=[0.5, 0.75, 1.0, 1.3], flip=True, ms_slide=ms_slide, crop=16)
    probs = infer(Constant(logits), x, settings, input_divisor=4).exp()
    assert probs.shape == (2, K, 37, 53)
    expected = logits.softmax(0).view(1, K, 1, 1).expand_as(probs)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["slide", "ms_flip"])
def test_windows_are_batched_in_chunks_and_counted_as_announced(mode: str) -> None:
    b, h, w = 2, 40, 56
    settings = {"mode": mode, "crop": [16, 24], "stride": [12, 16], "scales": [0.5, 1.0], "flip": True, "ms_slide": True}
    results = {}
    for chunk in (1, 5):
        net = Counting(Strided())
        s = _settings(**settings, chunk=chunk)
        results[chunk] = infer(net, _images(b, h, w), s, input_divisor=4)
        assert sum(net.calls) == b * s.passes(h, w)
        assert max(net.calls) <= chunk
    # slide: 3 x 3 windows; ms_flip: 2 x 2 windows at scale 0.5 (20x28) and 3 x 3 at scale 1, each twice
    assert _settings(**settings).passes(h, w) == (9 if mode == "slide" else 2 * (4 + 9))
    torch.testing.assert_close(results[1], results[5], atol=1e-6, rtol=0)


def test_cost_of_the_cityscapes_protocols() -> None:
    """1024x2048 images: slide 512x1024 / 341x682 is 3 x 3 windows of a quarter image each;
    six scales + flip process sum(2 s^2) = 17.375 images' worth of pixels."""
    slide = _settings(mode="slide", crop=[512, 1024], stride=[341, 682])
    assert slide.passes(1024, 2048) == 9
    assert slide.pixel_ratio(1024, 2048) == pytest.approx(2.25)
    ms = _settings(mode="ms_flip", scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True)
    assert ms.passes(1024, 2048) == 12
    assert ms.pixel_ratio(1024, 2048) == pytest.approx(17.375)
    assert "9 forward passes per 1024x2048 image, expected cost 2.25x whole" in slide.describe(1024, 2048)
    assert _settings().describe(64, 64).endswith("1 forward pass per 64x64 image, expected cost 1.00x whole")


def test_default_stride_is_two_thirds_of_the_crop() -> None:
    assert _settings(mode="slide", crop=[512, 1024]).stride == (341, 683)
    assert _settings(mode="slide", crop=769).stride == (513, 513)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"mode": "sliding"}, "data.eval.mode='sliding'"),
        ({"mode": "slide"}, "data.eval.crop is not set"),
        ({"mode": "slide", "crop": 32, "stride": 48}, "data.eval.stride=[48, 48] is larger than data.eval.crop"),
        ({"chunk": 0}, "data.eval.chunk must be a positive integer"),
        ({"scales": []}, "data.eval.scales must be a non-empty list"),
        ({"crop": [0, 8]}, "data.eval.crop must be a positive int"),
        ({"mod": "whole"}, "data.eval has unknown key(s) ['mod']"),
    ],
)
def test_bad_settings_name_the_key(node: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        InferenceSettings.from_config(node)
    assert message in str(err.value)


def test_validation_settings_reach_the_module(tiny_cfg) -> None:
    """build_module hands data.eval to the module, and validate_cfg checks it."""
    from segcon.build import build_module
    from segcon.config import validate_cfg

    cfg = tiny_cfg("data.eval.mode=slide", "data.eval.stride=[32,32]")
    module = build_module(cfg)
    assert (module.inference.mode, module.inference.crop, module.inference.stride) == ("slide", (64, 64), (32, 32))
    module.eval()
    x = _images(1, 64, 96)
    expected = infer(module.net, x, module.inference, module.net.input_divisor)
    torch.testing.assert_close(module.predict_logits(x), expected)
    assert F.softmax(expected, 1).sum(1).sub(1).abs().max() < 1e-5
    with pytest.raises(ConfigError, match=r"data\.eval\.stride"):
        validate_cfg(tiny_cfg("data.eval.stride=[80,80]"), check_data=False)
