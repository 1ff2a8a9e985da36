"""A second model family that is not smp, for the model contract test: two strided convolution
stages (input divisor 4), a 1x1 classifier at 1/4 scale and a bilinear x4 upsampling, plus an
optional projection head on the decoder feature. Importable as tests.toy_model.TinyNet, so a
run config can name it as `model._target_`."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segcon.models.base import SegModel
from segcon.models.heads import projection_specs
from segcon.models.output import SegOutput
from segcon.utils.errors import ConfigError


class _Inference(nn.Module):
    """images `[B, 3, H, W]` -> logits `[B, K, H, W]`."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                    nn.ReLU())
        self.decoder = nn.Conv2d(3 * width, 2 * width, 3, padding=1)
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def stages(self, x: Tensor) -> list[Tensor]:
        s1 = self.stage1(x)
        return [s1, self.stage2(s1)]

    def decode(self, stages: list[Tensor]) -> Tensor:
        s1, s2 = stages
        up = F.interpolate(s2, size=s1.shape[-2:], mode="bilinear", align_corners=False)
        return F.relu(self.decoder(torch.cat([F.avg_pool2d(s1, 2), F.avg_pool2d(up, 2)], 1)))

    def scores(self, decoder: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        coarse = self.classifier(decoder)
        return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False), coarse

    def forward(self, x: Tensor) -> Tensor:
        return self.scores(self.decode(self.stages(x)), tuple(x.shape[-2:]))[0]


class TinyNet(SegModel):
    """The toy family (see the module docstring)."""

    def __init__(self, num_classes: int, width: int = 8, projection: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.model = _Inference(num_classes, width)
        self.build_projection_heads(projection, None, lambda spec: 2 * width)  # they read the decoder feature

    @property
    def input_divisor(self) -> int:
        return 4

    def forward_features(self, x: Tensor, perturb: float = 0.0, heads: Collection[str] | None = None) -> SegOutput:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise RuntimeError(f"TinyNet needs sizes divisible by 4, got {tuple(x.shape[-2:])}")
        stages = self.model.stages(x)
        if perturb > 0:
            stages_in = [torch.cat([s, F.dropout2d(s, perturb, self.training)]) for s in stages]
        else:
            stages_in = stages
        decoder = self.model.decode(stages_in)
        logits, coarse = self.model.scores(decoder, tuple(x.shape[-2:]))
        out = SegOutput(logits=logits, decoder_logits=coarse, features=stages, decoder=decoder)
        if perturb > 0:
            b = x.shape[0]
            out.perturbed_logits = logits[b:]
            out.logits, out.decoder_logits, out.decoder = logits[:b], coarse[:b], decoder[:b]
        self.run_projection_heads(out, heads)
        return out

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        encoder = [*self.model.stage1.parameters(), *self.model.stage2.parameters()]
        ids = {id(p) for p in encoder}
        return {"encoder": encoder, "head": [p for p in self.parameters() if id(p) not in ids]}

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> int:
        if int(config.get("width", 8)) < 1:
            raise ConfigError(f"model.width must be >= 1, got {config['width']}")
        projection_specs(config.get("projection"), None)
        return 4

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        return f"TinyNet width {config.get('width', 8)}"
