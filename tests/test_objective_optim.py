"""Objective (weighted, scheduled terms), optimizer groups and the poly schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from segcon.engine.optim import build_optimizer, poly_factor
from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term
from segcon.objectives.objective import Objective, TermGroup, TermSchedule, build_objective
from segcon.objectives.supervised import CrossEntropyLoss, DiceLoss
from segcon.utils.errors import ConfigError
from tests.conftest import compose_train

IGNORE = 255


def test_schedule_warmup_then_ramp() -> None:
    s = TermSchedule(weight=2.0, warmup_steps=3, ramp_steps=4)
    assert [s(t) for t in range(9)] == [0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert TermSchedule(0.1, warmup_steps=2)(1) == 0 and TermSchedule(0.1, warmup_steps=2)(2) == 0.1


class _Contrast(Term):
    """A toy term reading the SegOutput: mean of the decoder feature, in two parts."""

    reads = frozenset({"decoder"})
    calls = 0

    def forward(self, out: SegOutput, targets: Targets) -> dict:
        type(self).calls += 1
        return {"a": out.decoder.mean(), "b": 2 * out.decoder.mean()}

    def zero(self, out: SegOutput) -> torch.Tensor:
        return out.decoder.sum() * 0.0


def test_total_is_weighted_sum_and_every_term_is_logged() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    decoder = torch.randn(2, 8, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    out = SegOutput(logits=logits, decoder=decoder)
    obj = Objective(
        TermGroup({"ce": CrossEntropyLoss(), "dice": DiceLoss()}, {"dice": TermSchedule(0.5)}),
        TermGroup({"con": _Contrast()}, {"con": TermSchedule(0.1, warmup_steps=10)}),
    )
    ce, dice, con = CrossEntropyLoss().pixel_loss(logits, target), DiceLoss().pixel_loss(logits, target), 3 * decoder.mean()
    _Contrast.calls = 0
    total, logs = obj(out, Targets(target), step=3)
    torch.testing.assert_close(total, ce + 0.5 * dice)  # contrast still in warm-up
    # in warm-up the term is not computed (no loss_con), only its weight is logged
    assert set(logs) == {"loss", "loss_ce", "loss_dice", "weight_con"} and _Contrast.calls == 0
    assert float(logs["weight_con"]) == 0.0
    total.backward()
    assert decoder.grad is not None and (decoder.grad == 0).all()  # its connected zero keeps it in the graph
    total, logs = obj(out, Targets(target), step=10)
    torch.testing.assert_close(total, ce + 0.5 * dice + 0.1 * con)
    assert set(logs) == {"loss", "loss_ce", "loss_dice", "loss_con", "loss_con/a", "loss_con/b", "weight_con"}
    torch.testing.assert_close(logs["loss_con"], con.detach())
    assert obj.contrast_reads() == {"decoder"}


def test_pseudo_label_loss_is_weighted_by_the_kept_pixels_and_divided_by_all_valid_ones() -> None:
    """UniMatch's unsupervised loss: CE summed over the kept pseudo-labels, divided by every valid
    pixel (crop padding excluded); several terms are logged under unsup_<name>."""
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]]])  # [1, 2, 2, 2]
    label = torch.tensor([[[0, 1], [1, IGNORE]]])  # (1, 1) is crop padding
    keep = torch.tensor([[[True, False], [True, False]]])
    ce = F.cross_entropy(logits, label.clamp(max=1), reduction="none")[0]
    targets = Targets(label, IGNORE, keep=keep)
    obj = Objective({"ce": CrossEntropyLoss()}, pseudo=TermGroup({"ce": CrossEntropyLoss()}, {"ce": TermSchedule(2.0, 1)}))
    total, logs = obj.pseudo_loss(SegOutput(logits=logits), targets, step=1, view="_s1")
    assert float(logs["loss_unsup_s1"]) == pytest.approx(float(ce[0, 0] + ce[1, 0]) / 3)
    assert float(total) == pytest.approx(2.0 * float(ce[0, 0] + ce[1, 0]) / 3) and float(logs["weight_unsup"]) == 2.0
    total, logs = obj.pseudo_loss(SegOutput(logits=logits), targets, step=0)  # warm-up: nothing computed
    assert float(total) == 0.0 and set(logs) == {"weight_unsup"}
    two = Objective({"ce": CrossEntropyLoss()}, pseudo={"ce": CrossEntropyLoss(), "dice": DiceLoss()})
    _, logs = two.pseudo_loss(SegOutput(logits=logits), targets, step=0)
    assert {"loss_unsup_ce", "loss_unsup_dice", "weight_unsup_ce"} <= set(logs)


def test_build_objective_from_config_groups() -> None:
    loss = {"ce": {"_target_": "segcon.objectives.supervised.CrossEntropyLoss", "weight": 1.0, "ignore_index": 255},
            "dice": {"_target_": "segcon.objectives.supervised.DiceLoss", "weight": 0.5, "warmup_steps": 7}}
    obj = build_objective(loss, {}, loss)  # the pseudo-label group may reuse the loss group's names
    assert set(obj.supervised) == {"ce", "dice"} and obj.supervised.schedules["dice"] == TermSchedule(0.5, 7, 0)
    assert set(obj.pseudo) == {"ce", "dice"}
    with pytest.raises(ConfigError, match="no term"):
        build_objective({}, {})
    with pytest.raises(ConfigError, match="share the name"):
        build_objective(loss, {"ce": loss["ce"]})
    with pytest.raises(ConfigError, match=r"loss\.l1\._target_='torch\.nn\.L1Loss', which is not a class segcon builds"):
        build_objective({"l1": {"_target_": "torch.nn.L1Loss"}})
    # an experiment's schedule for a term whose group was then switched (contrast=none)
    with pytest.raises(ConfigError, match=r"contrast\.rc2l sets \['ramp_steps', 'warmup_steps'\] but no _target_: "
                                          r"the contrast group chosen does not define 'rc2l'\. Switch it off with "
                                          r"contrast\.rc2l=null"):
        build_objective(loss, {"rc2l": {"warmup_steps": 120, "ramp_steps": 60}})
    assert set(build_objective(loss, {"rc2l": None}).contrast) == set()
    with pytest.raises(ConfigError, match=r"loss\.ce must be a mapping with a _target_"):
        build_objective({"ce": 1.0})
    with pytest.raises(ConfigError, match="is not a Term"):  # a class the user allowed
        build_objective({"plain": {"_target_": "tests.helpers.NotATerm"}})
    with pytest.raises(ConfigError, match=r"pseudo_loss.con: _Contrast is not a per-pixel loss"):
        Objective({"ce": CrossEntropyLoss()}, pseudo={"con": _Contrast()})


def test_poly_factor_values() -> None:
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(50, 100, power=1.0) == pytest.approx(0.5)
    assert poly_factor(100, 100) == 0.0
    assert poly_factor(50, 100, power=0.9, min_lr_ratio=0.1) == pytest.approx(0.9 * 0.5**0.9 + 0.1)
    # linear warm-up from warmup_ratio, multiplied with the poly decay
    assert poly_factor(0, 100, warmup_steps=10, warmup_ratio=0.1) == pytest.approx(0.1)
    assert poly_factor(5, 100, power=1.0, warmup_steps=10, warmup_ratio=0.0) == pytest.approx(0.5 * 0.95)


def test_head_lr_multiplier_groups() -> None:
    enc, head = nn.Linear(2, 2), nn.Linear(2, 3)
    opt = build_optimizer(list(enc.parameters()), list(head.parameters()), "sgd", lr=0.01, weight_decay=1e-4, head_lr_mult=10)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("encoder", 0.01), ("head", 0.1)]
    assert isinstance(build_optimizer(list(enc.parameters()), [], "adamw", 1e-3, 0.01), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="sgd or adamw"):
        build_optimizer(list(enc.parameters()), [], "lamb", 1e-3, 0.01)


def test_lr_for_batch_scales_linearly_or_warns() -> None:
    from segcon.engine.optim import lr_for_batch

    assert lr_for_batch(0.01, 16, 8, "linear") == (0.005, lr_for_batch(0.01, 16, 8, "linear")[1])
    assert "lr 0.005" in lr_for_batch(0.01, 16, 8, "linear")[1]
    lr, note = lr_for_batch(0.01, 16, 8, "none")
    assert lr == 0.01 and "optim.scale_lr=linear rescales" in note
    assert lr_for_batch(0.01, None, 8, "linear") == (0.01, None) and lr_for_batch(0.01, 8, 8, "none") == (0.01, None)
    with pytest.raises(ConfigError, match="scale_lr"):
        lr_for_batch(0.01, 8, 4, "sqrt")


@pytest.mark.parametrize("option", ["ce", "ce_dice", "dice", "focal", "imbalance", "ohem"])
def test_every_loss_option_takes_its_schedule_keys_without_a_plus(option: str) -> None:
    """`pseudo_loss.<term>.warmup_steps=N` (and the loss group's) is a key the group defines, as the
    README says, not one a user must append with `+`; it reaches the term's schedule."""
    terms = list(OmegaConf.to_container(compose_train([f"pseudo_loss={option}"]).pseudo_loss))
    overrides = [f"pseudo_loss={option}", f"loss={option}"]
    for i, term in enumerate(terms):
        overrides += [f"pseudo_loss.{term}.warmup_steps={5 + i}", f"pseudo_loss.{term}.ramp_steps={9 + i}",
                      f"loss.{term}.warmup_steps={2 + i}"]
    cfg = compose_train(overrides)
    obj = build_objective(OmegaConf.to_container(cfg.loss, resolve=True), {},
                          OmegaConf.to_container(cfg.pseudo_loss, resolve=True))
    for i, term in enumerate(terms):
        assert obj.pseudo.schedules[term] == TermSchedule(cfg.pseudo_loss[term].weight, 5 + i, 9 + i)
        assert obj.supervised.schedules[term] == TermSchedule(cfg.loss[term].weight, 2 + i, 0)


def test_mask_set_loss_takes_its_schedule_keys() -> None:
    assert compose_train(["loss=mask_set", "loss.mask_set.warmup_steps=3"]).loss.mask_set.warmup_steps == 3


def test_terms_and_their_samplers_take_num_classes_and_ignore_index_from_the_data(tiny_cfg) -> None:
    """The values live in the data config alone: the build hands them to every term and nested
    _target_ whose constructor takes them (the loss, the sampler inside a contrast term, the
    weight branch's copy of the loss group), and a value a spec sets itself stays."""
    from segcon.build import build_objective_of
    from segcon.objectives.objective import with_data_settings

    cfg = tiny_cfg("contrast=cac", "loss=imbalance", "data.ignore_index=250")
    objective = build_objective_of(cfg)
    assert objective.supervised["imbalance"].ignore_index == 250
    assert objective.supervised["imbalance"].num_classes == cfg.data.num_classes == 5
    assert objective.contrast["cac"].sampler.ignore_index == 250
    assert objective.contrast["weight_branch"].terms["imbalance"].ignore_index == 250
    spec = {"a": {"_target_": "segcon.objectives.supervised.CrossEntropyLoss", "ignore_index": 7},
            "b": {"_target_": "torch.nn.Identity", "x": [{"_target_": "segcon.objectives.samplers.RandomSampler"}]}}
    out = with_data_settings(spec, {"ignore_index": 250, "num_classes": 5}, "loss")
    assert out["a"]["ignore_index"] == 7 and "num_classes" not in out["a"]  # set by hand; not a parameter
    assert "ignore_index" not in out["b"] and out["b"]["x"][0]["ignore_index"] == 250


def test_a_frozen_encoder_gets_no_gradient_and_stays_out_of_the_optimizer(tiny_cfg) -> None:
    """optim.freeze_encoder=true (UniMatch V2's lock_backbone on ADE20K): after training steps the
    encoder's weights are the initial ones, the head's moved, and AdamW holds only head tensors."""
    from segcon.build import build_module
    from segcon.train import train

    cfg = tiny_cfg("optim.freeze_encoder=true", "trainer.max_steps=2", "trainer.max_epochs=-1")
    torch.manual_seed(cfg.seed)
    module = build_module(cfg)
    groups = module.net.parameter_groups()
    assert all(not p.requires_grad for p in groups["encoder"]) and all(p.requires_grad for p in groups["head"])
    train(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    encoder = {k: v for k, v in module.net.named_parameters() if k.startswith("model.encoder.")}
    assert encoder and all(torch.equal(state["state_dict"][f"net.{k}"], v) for k, v in encoder.items())
    head = {k: v for k, v in module.net.named_parameters() if k.startswith("model.decoder.")}
    assert any(not torch.equal(state["state_dict"][f"net.{k}"], v) for k, v in head.items())
    (group,) = state["optimizer_states"][0]["param_groups"]
    assert len(group["params"]) == len(groups["head"])
