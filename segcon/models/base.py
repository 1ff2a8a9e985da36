"""The model contract: what every model family gives the rest of segcon.

Nothing outside `segcon/models/` knows which library built a network; methods, losses,
evaluation, checkpoints and export only use what `SegModel` declares:

- `model`: the inference network, `images [B, 3, H, W] -> scores [B, K, H, W]` whose softmax over
  K is the class distribution (logits or log-probabilities), so whole / slide / ms_flip inference
  can average it. It is what segcon-export writes, what evaluation runs, and what a checkpoint
  holds under `<branch>.model.*` (segcon.utils.checkpoint.BRANCHES).
- `heads`: train-only heads (projection heads, CAC's weight branch, ...). They never reach the
  inference graph; a teacher keeps only the ones its method reads (`keep_heads`).
- `forward(x)`: in training a `SegOutput` (segcon.models.output), in eval mode `model(x)`.
- `forward_features(x, perturb, heads)`: the `SegOutput` in any mode.
- `forward_complementary(x, masks, heads)` and `feature_channels` (optional): the same with
  UniMatch V2's complementary channel dropout on the encoder features, for families whose
  features share one width (a ViT); the others raise a ConfigError naming one that can.
- `input_divisor`: H and W of an input must be multiples of it.
- `parameter_groups()`: the backbone (base learning rate) and everything else.
- `check_config(config)`: the family checks its own settings before anything is built and
  returns the input divisor; `describe(config)` names the network in messages;
  `offline_config(config)` switches off every pretrained-weight source (rebuilding a model
  whose weights come from a checkpoint must neither download nor read other files).
- Config key `input_norm: {mean, std}` (optional): the input normalisation a family's pretrained
  weights expect; the data settings follow it (`data.mean`/`data.std` default to it). A family
  whose config carries it accepts it as a constructor argument and may ignore it.

tests/test_model_contract.py runs one shared contract test for every family.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from segcon.models.heads import ProjectionHead, projection_specs
from segcon.models.output import SegOutput
from segcon.utils.errors import ConfigError

WEIGHT_SOURCES = ("weights_path", "encoder_weights")
"""The model config keys that name pretrained weights (a file, a download)."""


class SegModel(nn.Module):
    """Base class of segcon's model families (see the module docstring for the contract).

    Subclasses set `self.model`, `self.heads` and `self.num_classes` in `__init__` and implement
    `forward_features`, `input_divisor` and `check_config`. The base builds and runs the
    projection heads (`build_projection_heads`, `run_projection_heads`), splits the parameters
    when the inference network has an `encoder` (`parameter_groups`), and builds networks on the
    meta device for checks (`on_meta`): a family writes its network.
    """

    model: nn.Module
    heads: nn.ModuleDict
    num_classes: int
    projections: dict[str, dict[str, Any]]

    @property
    def input_divisor(self) -> int:
        """Input height and width must be multiples of this."""
        raise NotImplementedError

    def forward_features(self, x: Tensor, perturb: float = 0.0, heads: Collection[str] | None = None) -> SegOutput:
        """Full forward pass `[B, 3, H, W]` -> SegOutput, in any mode.

        Args:
            perturb: > 0 adds UniMatch's feature-perturbation branch (Dropout2d with this
                probability on the features the decoder reads, decoded in the same batch as the
                clean ones): `SegOutput.perturbed_logits [B, K, H, W]`. A family that cannot do it
                raises a ConfigError.
            heads: the train-only heads to run (None: all of them; () none, for gradient-free
                passes that only need the logits).
        """
        raise NotImplementedError

    @property
    def feature_channels(self) -> int:
        """The one width C of every encoder feature the decoder reads, for families that have one
        (a ViT's embedding); the others raise a ConfigError (the default)."""
        raise ConfigError(f"{type(self).__name__} has no complementary channel dropout (UniMatch V2's feature "
                          "perturbation): its encoder features differ in width; use model=dpt_dinov2_*")

    def forward_complementary(self, x: Tensor, masks: Tensor, heads: Collection[str] | None = None) -> SegOutput:
        """`forward_features` with UniMatch V2's complementary channel dropout: every encoder
        feature the decoder reads is multiplied, image by image, by the channel scales `masks
        [B, feature_channels]` (`complementary_masks`). Families without one feature width raise
        a ConfigError (the default)."""
        raise ConfigError(f"{type(self).__name__} has no complementary channel dropout (UniMatch V2's feature "
                          "perturbation): its encoder features differ in width; use model=dpt_dinov2_*")

    def forward(self, x: Tensor) -> SegOutput | Tensor:
        if not self.training:
            return self.model(x)
        return self.forward_features(x)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """`{"encoder": [...], "head": [...]}`: the backbone (base learning rate) and everything
        else (decoder, classifier, train-only heads: `head_lr_mult`); together every parameter
        once. Here: `self.model.encoder`'s parameters and the rest; a family whose backbone is
        elsewhere overrides it."""
        encoder = list(self.model.get_submodule("encoder").parameters())
        ids = {id(p) for p in encoder}
        return {"encoder": encoder, "head": [p for p in self.parameters() if id(p) not in ids]}

    def build_projection_heads(self, projection: Mapping[str, Any] | None,
                               projections: Mapping[str, Mapping[str, Any] | None] | None,
                               channels: Callable[[Mapping[str, Any]], int]) -> None:
        """`self.projections` (every projection head's checked settings by name: `model.projection`
        as "projection", then `model.projections`) and `self.heads` with one ProjectionHead each;
        `channels(spec)` is the width of what a head reads (its `source`: the decoder feature,
        or the concatenated encoder `stages`)."""
        self.projections = projection_specs(projection, projections)
        self.heads = nn.ModuleDict()
        for name, spec in self.projections.items():
            self.heads[name] = ProjectionHead(channels(spec), int(spec["dim"]), spec["kind"])

    def wanted_heads(self, heads: Collection[str] | None) -> set[str]:
        """The train-only heads a pass runs: all with None, else those of `heads` the model has."""
        return set(self.heads) if heads is None else set(heads) & set(self.heads)

    def run_projection_heads(self, out: SegOutput, heads: Collection[str] | None) -> None:
        """Put the wanted projection heads' embeddings into `out.embeddings`, each read from
        `out.decoder` or the encoder stages of `out.features` its `source` names."""
        wanted = self.wanted_heads(heads)
        for name, spec in self.projections.items():
            if name in wanted:
                source = out.decoder if spec["source"] == "decoder" else [out.features[i] for i in spec["stages"]]
                out.embeddings[name] = self.heads[name](source)

    def keep_heads(self, names: Collection[str]) -> None:
        """Delete the train-only heads not in `names` (a teacher keeps the ones its method
        reads); an unknown name is a ConfigError listing the heads there are."""
        unknown = sorted(set(names) - set(self.heads))
        if unknown:
            raise ConfigError(f"method.teacher_heads names {unknown}, but the model's train-only heads are "
                              f"{sorted(self.heads) or 'none'}")
        for name in list(self.heads):
            if name not in names:
                del self.heads[name]

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> int:
        """Check the `model` config node (plain containers) without building the network;
        return the input divisor. Raise one ConfigError naming the key and the fix."""
        raise NotImplementedError

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        """A short name of the network `config` builds, for messages."""
        return cls.__name__

    @classmethod
    def offline_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """`config` with every pretrained-weight source switched off: here `weights_path` and
        `encoder_weights` set to null where the config has them; a family with other sources
        extends it."""
        return {**config, **{k: None for k in WEIGHT_SOURCES if k in config}}


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` on the meta device (no memory, no initialisation: for checks that only need the
    structure), or on the CPU for the modules that cannot be built there."""
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError):  # some encoders (mit_b*) cannot be built on meta
        return build()


def complementary_masks(pairs: int, channels: int, device: torch.device | str = "cpu",
                        generator: torch.Generator | None = None) -> Tensor:
    """UniMatch V2's complementary channel dropout for a batch of two views of `pairs` images
    (`[view 1 of every image, view 2 of every image]`): channel scales `[2 * pairs, C]`. For each
    image, view 1 keeps a Bernoulli(0.5) set of channels and view 2 the complement, each kept
    channel scaled by 2 (so the two views together keep every channel once, and each view's
    expected scale is 1); `pairs // 2` images, drawn at random, keep every channel in both views."""
    first = torch.bernoulli(torch.full((pairs, channels), 0.5, device=device), generator=generator) * 2.0
    second = 2.0 - first
    kept = torch.randperm(pairs, generator=generator, device=device)[: pairs // 2]
    first[kept] = 1.0
    second[kept] = 1.0
    return torch.cat([first, second])
