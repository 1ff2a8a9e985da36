"""Every config file of every group composes, resolves and passes validate_cfg."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from segcon.config import config_dir, fill_data_defaults, validate_cfg
from tests.conftest import compose_train

CONF = config_dir()
# Groups whose options are swapped one at a time on top of the default config. Files starting
# with "_" are shared bases (e.g. data/_common.yaml), not options.
GROUPS = ["data", "model", "loss", "pseudo_loss", "contrast", "sampler", "method", "optim", "trainer", "logger", "callbacks",
          "debug", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_resolves_and_validates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "folder":
        overrides.append("data.num_classes=3")
    if group == "loss" and option == "none":  # a run needs a term: here one on the whole output
        overrides.append("contrast=pixel")
    if group == "pseudo_loss":
        overrides.append("method=fixmatch")
    if group == "contrast" and option == "contextrast_vit":  # the ViT family's levels
        overrides.append("model=dpt_dinov2_s")
    if group in ("data", "experiment"):
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_train(overrides, output_dir=tmp_path / "run")
    OmegaConf.resolve(cfg)
    fill_data_defaults(cfg)
    validate_cfg(cfg, check_data=False)
    assert cfg.model.num_classes == cfg.data.num_classes
    assert len(cfg.data.class_names) == cfg.data.num_classes


def test_default_config_is_the_documented_one(tmp_path: Path) -> None:
    cfg = compose_train([], output_dir=tmp_path)
    choices = {"data": "synthetic", "arch": "unet", "encoder": "resnet18"}
    assert cfg.data.name == choices["data"]
    assert (cfg.model.arch, cfg.model.encoder_name) == (choices["arch"], choices["encoder"])
    assert cfg.model.encoder_weights is None  # nothing is downloaded by default
    assert cfg.logger.wandb.offline is True


def test_any_key_is_overridable(tmp_path: Path) -> None:
    cfg = compose_train(["optim.lr=0.123", "data.batch_size=3", "trainer.max_epochs=7", "seed=9"], output_dir=tmp_path)
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.trainer.max_epochs, cfg.seed) == (0.123, 3, 7, 9)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_keeps_its_method_keys_valid_also_for_the_supervised_baseline(experiment: str, tmp_path: Path) -> None:
    """`experiment=X method=supervised` is how the baseline of a semi-supervised preset runs: the
    preset must not leave keys in `method` that the chosen class does not take."""
    import inspect

    from hydra.utils import get_class

    for method in (None, "supervised"):
        overrides = [f"experiment={experiment}", f"data.root={tmp_path}"] + ([f"method={method}"] if method else [])
        cfg = compose_train(overrides, output_dir=tmp_path / "run")
        cls = get_class(cfg.method._target_)
        accepted = {name for klass in cls.__mro__ if "__init__" in vars(klass)
                    for name in inspect.signature(klass.__init__).parameters}
        unknown = set(cfg.method) - {"_target_"} - accepted
        assert not unknown, (experiment, method, unknown)


def test_a_preset_sets_the_teacher_ema_and_the_command_line_still_wins(tmp_path: Path) -> None:
    from segcon.build import build_module

    base = ["experiment=ssl_synthetic", "method=mean_teacher", f"data.root={tmp_path}"]
    assert compose_train(["method=mean_teacher", f"data.root={tmp_path}"], output_dir=tmp_path).method.ema_momentum == 0.99
    assert build_module(compose_train(base, output_dir=tmp_path)).ema_max == 0.9
    assert build_module(compose_train([*base, "method.ema_momentum=0.5"], output_dir=tmp_path)).ema_max == 0.5


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_instantiates_its_model_objective_and_module(experiment: str, tmp_path: Path) -> None:
    """Composing is not enough: the preset's network, loss terms and method must build (on the
    meta device: no memory, no weights; MiT encoders cannot be built there)."""
    import torch

    from segcon.build import build_module

    cfg = compose_train([f"experiment={experiment}", f"data.root={tmp_path}"], output_dir=tmp_path / "run")
    OmegaConf.resolve(cfg)
    fill_data_defaults(cfg)
    validate_cfg(cfg, check_data=False)
    with torch.device("cpu" if "mit_b" in cfg.model.get("encoder_name", "") else "meta"):
        module = build_module(cfg)
    assert module.net.num_classes == cfg.data.num_classes
    on = {group: {k for k, v in (cfg.get(group) or {}).items() if v is not None} for group in ("loss", "contrast")}
    assert set(module.objective.supervised) == on["loss"] and set(module.objective.contrast) == on["contrast"]
    if getattr(module, "uses_unlabeled", False):
        assert module.objective.pseudo and module.teacher is not None


@pytest.mark.parametrize("experiment", ["ssl_cityscapes", "unimatch_v2_cityscapes"])
def test_the_unimatch_cityscapes_presets_slide_their_training_crop_at_two_thirds(experiment: str, tmp_path: Path) -> None:
    """UniMatch (V1 and V2) evaluate Cityscapes with windows of the training crop every 2/3 of it."""
    data = compose_train([f"experiment={experiment}", f"data.root={tmp_path}"], output_dir=tmp_path / "run").data
    assert data.eval.mode == "slide" and list(data.eval.crop) == list(data.crop_size)
    assert [int(c * 2 / 3) for c in data.crop_size] == list(data.eval.stride)


# The published UniMatch V2 settings (LiheYoung/UniMatch-V2: configs/{pascal,cityscapes,ade20k}.yaml
# and unimatch_v2.py), per preset: crop, epochs, images per GPU on the paper's 4 GPUs, frozen backbone.
UNIMATCH_V2 = {"unimatch_v2_voc": (518, 60, 4, False), "unimatch_v2_cityscapes": (798, 180, 2, False),
               "unimatch_v2_ade20k": (518, 60, 2, True)}


@pytest.mark.parametrize("experiment", sorted(UNIMATCH_V2))
def test_the_unimatch_v2_presets_carry_the_published_settings(experiment: str, tmp_path: Path) -> None:
    crop, epochs, per_gpu, frozen = UNIMATCH_V2[experiment]
    cfg = compose_train([f"experiment={experiment}", f"data.root={tmp_path}"], output_dir=tmp_path / "run")
    assert cfg.method._target_.endswith(".UniMatchV2") and cfg.model.encoder_name == "vit_small_patch14_dinov2"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.head_lr_mult, cfg.optim.weight_decay) == ("adamw", 5e-6, 40.0, 0.01)
    assert (cfg.optim.scheduler.name, cfg.optim.scheduler.power, cfg.optim.scheduler.warmup_steps) == ("poly", 0.9, 0)
    assert (cfg.data.pseudo_label_threshold, cfg.data.teacher_ema_momentum) == (0.95, 0.996)
    assert list(cfg.data.crop_size) == [crop, crop] and cfg.trainer.max_epochs == epochs and cfg.trainer.max_steps == -1
    assert cfg.data.batch_size == cfg.data.unlabeled_batch_size == per_gpu and cfg.optim.base_batch == 4 * per_gpu
    assert cfg.optim.scale_lr == "linear" and cfg.optim.freeze_encoder is frozen


@pytest.mark.parametrize("experiment", ["ssl_voc_classic", "ssl_cityscapes", "ssl_voc_classic_rc2l",
                                        "ssl_cityscapes_rc2l", *sorted(UNIMATCH_V2)])
def test_the_unimatch_presets_train_as_the_published_code(experiment: str, tmp_path: Path) -> None:
    """Full precision (UniMatch's and UniMatch V2's training has no autocast) and labeled images
    with the weak view's steps only: scale 0.5-2, crop, flip, no colour jitter. The RC²L presets on
    the same protocols train the same way."""
    cfg = compose_train([f"experiment={experiment}", f"data.root={tmp_path}"], output_dir=tmp_path / "run")
    assert cfg.trainer.precision == "32-true" and cfg.trainer.sync_batchnorm
    labeled = OmegaConf.to_container(cfg.data.train_transform, resolve=True)
    assert [next(iter(step)) for step in labeled] == ["random_scale", "random_crop", "hflip"]
    assert labeled[0]["random_scale"] == {"min": 0.5, "max": 2.0}
    assert labeled[1]["random_crop"]["size"] == list(cfg.data.crop_size)


@pytest.mark.parametrize("experiment", ["ssl_cityscapes", "unimatch_v2_cityscapes"])
def test_the_cityscapes_ohem_keeps_unimatchs_200000_pixels_per_call(experiment: str, tmp_path: Path) -> None:
    cfg = compose_train([f"experiment={experiment}", f"data.root={tmp_path}"], output_dir=tmp_path / "run")
    assert cfg.loss.ohem.min_kept * cfg.data.batch_size == 200_000  # min_kept counts per image


def test_every_trainer_key_is_a_lightning_trainer_argument_and_common_ones_need_no_plus(tmp_path: Path) -> None:
    """conf/trainer/default.yaml declares the Trainer keys users set by hand, so
    `trainer.val_check_interval=2` composes without `+`; a key Lightning does not take would only
    fail when the Trainer is built."""
    import inspect

    import lightning
    from omegaconf import OmegaConf

    declared = OmegaConf.load(CONF / "trainer" / "default.yaml")
    parameters = inspect.signature(lightning.pytorch.Trainer.__init__).parameters
    assert [k for k in declared if k != "_target_" and k not in parameters] == []
    for key in ("val_check_interval", "limit_train_batches", "limit_val_batches", "limit_test_batches",
                "accumulate_grad_batches", "gradient_clip_algorithm", "benchmark", "detect_anomaly", "profiler",
                "fast_dev_run"):
        assert key in declared, key
        assert declared[key] == parameters[key].default, key  # Lightning's: nothing changes unless a user sets it
    from tests.conftest import compose_train

    cfg = compose_train(["trainer.val_check_interval=2", "trainer.limit_val_batches=2", f"data.root={tmp_path}"])
    assert cfg.trainer.val_check_interval == 2 and cfg.trainer.limit_val_batches == 2
