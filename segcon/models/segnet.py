"""SegNet: an smp segmentation model plus train-only heads, implementing the model contract."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from segcon.models.base import SegModel, on_meta
from segcon.models.fusion import FusionModel
from segcon.models.heads import (
    DEFAULT_PROJECTION,
    WEIGHT_BRANCH,
    WeightBranch,
    head_scores,
    projection_specs,
    weight_branch_depth,
)
from segcon.models.output import SegOutput
from segcon.utils.checkpoint import BRANCHES
from segcon.utils.errors import ConfigError
from segcon.utils.weights import (
    LoadReport,
    load_checked,
    match_by_order,
    read_state_dict,
    resolve_weights_path,
    skip_and_rename,
)

FUSION = "fusion"
"""segcon's multi-stage fusion architecture (segcon.models.fusion), next to smp's."""

_OWN_KEYS = ("_target_", "arch", "encoder_name", "num_classes", "encoder_weights", "in_channels", "weights_path",
             "weights_scope", "weights_match", "weights_skip", "weights_rename", "input_norm", "projection",
             "projections", "weight_branch", "side_weights")
_SCOPES = ("auto", "full", "encoder")
_MATCHES = ("name", "order")


class SegNet(SegModel):
    """An smp model (`smp.create_model(arch, encoder_name, ...)`) with segcon's model contract.

    `self.model` is the bare smp model: the inference network, exported and checkpointed alone.
    In training mode `forward` returns a `SegOutput`; in eval mode the logits `[B, K, H, W]` of
    the smp model, so train-only heads cost nothing at inference.

    Args:
        arch: smp architecture name (unet, fpn, deeplabv3plus, segformer, upernet, dpt, ...), or
            `fusion` (segcon.models.fusion: side outputs of every encoder stage, fused; takes
            `side_stages` and `fusion_init`; its side outputs are `SegOutput.side_logits`).
        encoder_name: smp encoder name; `tu-<name>` for any timm encoder (e.g. tu-hrnet_w48).
        num_classes: K.
        encoder_weights: smp pretrained-weight name (downloads from a hub); None for random init.
        in_channels: image channels.
        weights_path: local file (.pt/.pth/.ckpt/.safetensors) with encoder or full-model weights.
            `pkg://<package>/<file>` names a file shipped inside an installed package.
        weights_scope: "auto" (by name: the full model if every key is there, else the encoder;
            by order: the encoder), "full" or "encoder".
        weights_match: "name" (keys, after `weights_rename`) or "order" (one to one in state-dict
            order with every shape checked: weights saved by another library under other names).
        weights_skip: prefixes of the tensor names stored in the file whose tensors are not
            loaded (e.g. a classifier the encoder lacks).
        weights_rename: `{stored-name prefix: model prefix}` replacements (longest prefix first)
            before matching by name.
        input_norm: the input normalisation these weights expect, `{mean, std}` on the 0..1 scale;
            the data settings read it (`data.mean`/`data.std` default to it), the net does not.
        projection: the train-only projection head "projection", None for none (the contrast
            presets set it): `{source: decoder | encoder, dim: 256, kind: convmlp | linear |
            residual, stages: [2, 3, 4, 5]}`. source "decoder" reads the feature the classifier
            reads; "encoder" reads the encoder stages listed in `stages` upsampled to the largest
            and concatenated; kind "residual" is CAC's head.
        projections: further projection heads by name, each configured as `projection` (one per
            level or source for multi-level terms); their embeddings are
            `SegOutput.embeddings[<name>]`.
        weight_branch: train-only CAC weight branch, None for none (contrast=cac sets it):
            `{depth: head | decoder}` — a fresh copy of the segmentation head, or of decoder and
            head, fed with detached features; its logits are `SegOutput.weight_logits` (and
            `weight_decoder_logits` at the decoder's resolution when the head upsamples).
        side_weights: arch `fusion`: the weight of each side output's deep supervision (read by
            the Objective, one per side output).
        **arch_kwargs: passed to the smp architecture (decoder_channels, encoder_depth, ...).
    """

    def __init__(
        self,
        arch: str,
        encoder_name: str,
        num_classes: int,
        encoder_weights: str | None = None,
        in_channels: int = 3,
        weights_path: str | None = None,
        weights_scope: str = "auto",
        weights_match: str = "name",
        weights_skip: Sequence[str] = (),
        weights_rename: Mapping[str, str] | None = None,
        input_norm: Mapping[str, Any] | None = None,
        projection: Mapping[str, Any] | None = None,
        projections: Mapping[str, Mapping[str, Any] | None] | None = None,
        weight_branch: Mapping[str, Any] | None = None,
        side_weights: Sequence[float] | None = None,
        **arch_kwargs: Any,
    ) -> None:
        super().__init__()
        self.model = _create(arch, encoder_name, encoder_weights=encoder_weights, in_channels=in_channels,
                             classes=num_classes, **arch_kwargs)
        self.num_classes = num_classes
        if weights_path:
            report = load_pretrained(self.model, str(weights_path), weights_scope, weights_match, weights_skip,
                                     weights_rename)
            rank_zero_info(f"model.weights_path: {report}")
        self.build_projection_heads(projection, projections, self._projection_channels)
        if weight_branch:
            depth = weight_branch_depth(weight_branch)
            self.heads[WEIGHT_BRANCH] = WeightBranch(self.model.decoder, self.model.segmentation_head, depth)

    def _projection_channels(self, spec: Mapping[str, Any]) -> int:
        if spec["source"] == "encoder":
            return sum(self.model.encoder.out_channels[i] for i in spec["stages"])
        # The classifier's first convolution reads the decoder feature.
        conv = next(m for m in self.model.segmentation_head.modules() if isinstance(m, nn.Conv2d))
        return conv.in_channels

    @property
    def input_divisor(self) -> int:
        return _divisor(self.model)

    def forward_features(self, x: Tensor, perturb: float = 0.0, heads: Collection[str] | None = None) -> SegOutput:
        """See SegModel.forward_features. With `perturb` > 0 the encoder runs once, the decoder and
        classifier on the clean stages and a copy with `Dropout2d(perturb)` on every stage,
        stacked into one batch of 2B (so their batch statistics see both), as UniMatch's code
        runs it; the train-only heads read the clean half only."""
        self.model.check_input_shape(x)
        features = self.model.encoder(x)
        if isinstance(features, tuple):  # ViT encoders (DPT) also return prefix tokens
            stages, *rest = features
        else:
            stages, rest = features, []
        decoder_inputs: tuple = (stages, *rest)
        if perturb > 0:
            dropped = [torch.cat([f, F.dropout2d(f, perturb, self.training)]) for f in stages]
            decoder = self.model.decoder(dropped, *(_twice(r) for r in rest))
        else:
            decoder = self.model.decoder(*decoder_inputs)
        logits, decoder_logits = head_scores(self.model.segmentation_head, decoder)
        out = SegOutput(logits=logits, decoder_logits=decoder_logits, features=list(stages), decoder=decoder)
        if isinstance(self.model, FusionModel):
            out.side_logits = self.model.decoder.split(decoder)
        if perturb > 0:
            b = x.shape[0]
            out.perturbed_logits = logits[b:]
            out.logits, out.decoder = logits[:b], decoder[:b]
            out.decoder_logits = None if decoder_logits is None else decoder_logits[:b]
            out.side_logits = [side[:b] for side in out.side_logits]
        self.run_projection_heads(out, heads)
        if WEIGHT_BRANCH in self.wanted_heads(heads):
            weight_logits, weight_coarse = self.heads[WEIGHT_BRANCH](decoder_inputs, out.decoder)
            out.weight_logits = weight_logits
            if weight_coarse is not None:
                out.weight_decoder_logits = weight_coarse
        return out

    # -- settings -------------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> int:
        """Checks the architecture and encoder names (listing the valid or closest ones), the
        train-only heads' settings, and that smp can build the network (on the meta device: no
        memory, no weights); returns the encoder's output stride (1 for architectures that take
        any size)."""
        arch, encoder = str(config.get("arch")), str(config.get("encoder_name"))
        archs = sorted([*smp.MODEL_ARCHITECTURES_MAPPING, FUSION])
        if arch.lower() not in archs:
            raise ConfigError(f"model.arch={arch!r} is not an smp architecture; valid: {', '.join(archs)}")
        check_encoder(encoder)
        for name, spec in projection_specs(config.get("projection"), config.get("projections")).items():
            if spec["source"] == "encoder" and 0 in spec["stages"]:
                key = "model.projection" if name == DEFAULT_PROJECTION else f"model.projections.{name}"
                raise ConfigError(f"{key}.stages={list(spec['stages'])}: smp's stage 0 is the input image; its feature "
                                  "stages are 1-5 (contrast=contextrast_vit is for model=dpt_dinov2_*; here use "
                                  "contrast=contextrast)")
        if config.get("weight_branch"):
            weight_branch_depth(config["weight_branch"])
        _check_weight_settings(config)
        kwargs = {k: v for k, v in config.items() if k not in _OWN_KEYS}
        model = on_meta(lambda: _create(arch, encoder, encoder_weights=None, classes=1, **kwargs))
        _check_side_weights(model, config.get("side_weights"))
        return _divisor(model)

    @classmethod
    def describe(cls, config: Mapping[str, Any]) -> str:
        return f"{config.get('arch')} / {config.get('encoder_name')}"


def _check_weight_settings(config: Mapping[str, Any]) -> None:
    """The pretrained-weight keys' types and values (before anything is read)."""
    for key, valid, default in (("weights_scope", _SCOPES, "auto"), ("weights_match", _MATCHES, "name")):
        if config.get(key, default) not in valid:
            raise ConfigError(f"model.{key} must be one of {', '.join(valid)}, got {config.get(key)!r}")
    skip = config.get("weights_skip") or []
    if isinstance(skip, str) or not all(isinstance(p, str) and p for p in skip):
        raise ConfigError(f"model.weights_skip must be a list of tensor-name prefixes, e.g. [fc.], got {skip!r}")
    rename = config.get("weights_rename") or {}
    if not isinstance(rename, Mapping) or not all(isinstance(v, str) for v in rename.values()):
        raise ConfigError(f"model.weights_rename must map stored-name prefixes to model prefixes, got {rename!r}")
    if rename and config.get("weights_match") == "order":
        raise ConfigError("model.weights_rename renames for matching by name; with model.weights_match=order "
                          "names are not matched: remove one of them")
    norm = config.get("input_norm")
    if norm is not None:
        channels = int(config.get("in_channels", 3))
        if not isinstance(norm, Mapping) or set(norm) != {"mean", "std"} or any(
            len(norm[k]) != channels for k in ("mean", "std")
        ) or any(float(v) <= 0 for v in norm["std"]):
            raise ConfigError(f"model.input_norm must be {{mean: [...], std: [...]}} with {channels} values each "
                              f"and std > 0, got {norm!r}")


def _check_side_weights(model: nn.Module, weights: Sequence[float] | None) -> None:
    """model.side_weights: one number per side output of a fusion model, absent otherwise."""
    if not isinstance(model, FusionModel):
        if weights is not None:
            raise ConfigError("model.side_weights weighs a fusion model's side outputs; this architecture has none "
                              "(use model.arch=fusion or remove the key)")
        return
    sides = len(model.decoder.stages)
    if weights is None or isinstance(weights, str | int | float) or len(weights) != sides or any(
        float(w) < 0 for w in weights
    ):
        raise ConfigError(f"model.side_weights must list {sides} weights >= 0, one per side output (stages "
                          f"{model.decoder.stages}); got {weights!r}")


def _divisor(model: nn.Module) -> int:
    """What an smp model needs its input sizes divisible by: its encoder's output stride (1 for
    architectures that take any size)."""
    if not getattr(model, "requires_divisible_input_shape", True):
        return 1
    return int(model.encoder.output_stride)


def _create(arch: str, encoder_name: str, **kwargs: Any) -> nn.Module:
    """`smp.create_model` (or segcon's own `fusion` architecture), its errors turned into
    ConfigErrors naming the key."""
    try:
        if arch.lower() == FUSION:
            return FusionModel(encoder_name=encoder_name, **kwargs)
        return smp.create_model(arch, encoder_name=encoder_name, **kwargs)
    except KeyError as err:
        text = str(err).strip("\"'")
        key = ("model.arch" if "architecture" in text else "model.encoder_weights" if "weights" in text
               else "model.encoder_name")
        raise ConfigError(f"{key}: {text}") from None
    except (TypeError, ValueError, AssertionError) as err:  # a bad arch_kwargs value or combination
        raise ConfigError(f"model: smp cannot build {arch} / {encoder_name} with these settings: {err}") from None


def check_encoder(name: str) -> None:
    """A ConfigError naming the closest smp encoders when `name` is neither one of them nor
    `tu-<a timm model>`."""
    if name.startswith("tu-"):
        import timm

        if not timm.is_model(name[3:]):
            close = difflib.get_close_matches(name[3:], timm.list_models(), n=3)
            raise ConfigError(f"model.encoder_name={name!r}: timm has no model {name[3:]!r}"
                              + (f"; closest: {', '.join('tu-' + c for c in close)}" if close else ""))
        return
    names = smp.encoders.get_encoder_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise ConfigError(
            f"model.encoder_name={name!r} is not an smp encoder"
            + (f"; closest: {', '.join(close)}" if close else "")
            + ". Any timm model works as tu-<name> (e.g. tu-convnext_tiny)."
        )


def _twice(tokens: list[Tensor | None]) -> list[Tensor | None]:
    """DPT's per-stage prefix tokens (None where the ViT has none) repeated for a batch of 2B."""
    return [None if t is None else torch.cat([t, t]) for t in tokens]


# Prefixes other tools put in front of an smp model's own keys: segcon checkpoints (each
# branch's inference network), DDP ("module."), or a bare wrapper ("model.", "net.").
_PREFIXES = (*BRANCHES.values(), "student.model.", "module.", "model.", "net.")


def _strip(state: dict[str, Tensor], wanted: set[str]) -> dict[str, Tensor]:
    """Drop the first known prefix that makes the keys match `wanted` best."""
    best, best_hits = state, len(wanted & state.keys())
    for prefix in _PREFIXES:
        cand = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        hits = len(wanted & cand.keys())
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def load_pretrained(
    model: nn.Module,
    path: str,
    scope: str = "auto",
    match: str = "name",
    skip: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
) -> LoadReport:
    """Load full-model or encoder weights from `path` (a file or `pkg://<package>/<file>`) into
    an smp `model`; return what was loaded.

    scope: "full" (every model key), "encoder" (the `model.encoder` keys, with or without an
    "encoder." prefix), or "auto" (by name: full when every model key is present, else encoder;
    by order: encoder). match: "name" (the keys, after `rename`'s prefix replacements) or
    "order" (one to one in state-dict order, every shape checked). skip: file-name prefixes not
    to load (a classifier the encoder does not have).
    """
    _check_weight_settings({"weights_scope": scope, "weights_match": match, "weights_skip": list(skip),
                            "weights_rename": dict(rename or {})})
    file = resolve_weights_path(path)
    state, skipped = skip_and_rename(read_state_dict(file), skip, rename)
    if match == "order":
        target, what = (model, "model") if scope == "full" else (model.encoder, "encoder")
        mapped, counters, examples = match_by_order(target, state, file, what)
        target.load_state_dict({**mapped, **counters}, strict=True)
        return LoadReport(file, what, match, tuple(mapped), skipped, len(counters), examples)
    full_keys = set(model.state_dict())
    full = _strip(state, full_keys)
    if scope == "full" or (scope == "auto" and full_keys <= full.keys()):
        load_checked(model, full, file, "model", _FIX)
        return LoadReport(file, "model", match, tuple(full), skipped)
    encoder = model.encoder
    enc_keys = set(encoder.state_dict())
    enc_state = _strip(state, {f"encoder.{k}" for k in enc_keys} | enc_keys)
    enc_state = {k.removeprefix("encoder."): v for k, v in enc_state.items() if not k.startswith(("decoder.", "segmentation_head."))}
    load_checked(encoder, enc_state, file, "encoder", _FIX)
    return LoadReport(file, "encoder", match, tuple(enc_state), skipped)



_FIX = (
    "Check model.arch, model.encoder_name and data.num_classes against the run that saved them, "
    "or set model.weights_scope=encoder to load the backbone only; for weights saved under other "
    "names see model.weights_match=order, model.weights_rename and model.weights_skip."
)
