"""Finding the configs, and checking a composed config before anything heavy starts.

`validate_cfg` turns the mistakes users make most (class counts that disagree between groups,
an ignore index inside the class range, crops the encoder cannot take, a data root without the
expected layout) into one error naming the key or path and the fix — before a model is built,
a dataset listed, or a GPU touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from segcon.utils.errors import ConfigError, DataError
from segcon.utils.targets import instantiate, locate

EVAL_CKPTS = ("best", "last")


def config_dir() -> Path:
    """The `conf/` directory: the repository's top level in a source checkout or editable
    install, `segcon/conf` inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"segcon's conf/ directory was not found next to {here}")


def _crop_sizes(steps: Any) -> Iterator[tuple[str, tuple[int, int]]]:
    """(step name, (h, w)) of every crop step in a transform list."""
    for i, step in enumerate(steps or []):
        if isinstance(step, Mapping):
            for name, kwargs in step.items():
                if name in ("random_crop", "center_crop") and isinstance(kwargs, Mapping) and "size" in kwargs:
                    size = kwargs["size"]
                    h, w = (size, size) if isinstance(size, int) else tuple(size)
                    yield f"{name} (step {i})", (int(h), int(w))


def _loss_terms(cfg: DictConfig) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for group in ("loss", "pseudo_loss", "contrast"):
        for name, spec in (cfg.get(group) or {}).items():
            if isinstance(spec, Mapping):
                yield f"{group}.{name}", spec


def prepare_data(cfg: DictConfig) -> None:
    """Run the data config's `prepare` step if it has one (the synthetic dataset writes itself
    to disk here, atomically, so concurrent DDP processes are safe)."""
    prepare = cfg.data.get("prepare")
    if prepare is not None:
        instantiate(prepare, "data.prepare", root=cfg.data.root)


def fill_data_defaults(cfg: DictConfig) -> None:
    """Fill `data.class_names` (from `<root>/classes.txt`, else class_<i>) and `data.palette`
    when the data config leaves them null; settle a folder dataset's `dataset.value_map: auto`
    from its masks and drop the `optional_splits` whose image folder is missing, each with one
    printed line."""
    from segcon.data.check import detect_value_map
    from segcon.data.folder import read_class_names
    from segcon.evaluation.visualize import default_palette

    data = cfg.data
    with open_dict(data):
        root = Path(str(data.root)).expanduser() if data.get("root") else None
        for split in data.get("optional_splits") or []:
            folder = data.splits.get(split)
            if folder and root is not None and not (root / "images" / folder).is_dir():
                data.splits[split] = None
                rank_zero_info(f"data.splits.{split}: {root / 'images' / folder} does not exist; running without "
                               f"a {split} split")
        dataset = data.get("dataset") or {}
        train_masks = root / "masks" / str(data.splits.train) if root is not None else None
        if dataset.get("value_map") == "auto" and train_masks is not None and train_masks.is_dir():
            found = detect_value_map(root, data.splits.train, int(data.ignore_index), int(data.num_classes))
            data.dataset.value_map = found
            rank_zero_info("data.dataset.value_map=auto: " + ("the masks hold 0 and 255 (binary): 255 -> class 1"
                                                             if found else "the masks hold class indices: no mapping"))
        if data.get("class_names") is None:
            names = read_class_names(data.root) if data.get("root") else None
            data.class_names = names or [f"class_{i}" for i in range(data.num_classes)]
        if data.get("palette") is None:
            data.palette = default_palette(data.num_classes)


def validate_cfg(cfg: DictConfig, check_data: bool = True, training: bool = True) -> None:
    """Raise one ConfigError (or DataError) naming the key or path when the config cannot work.

    Checks: the class count agrees across data/model/loss/class names/palette; ignore_index is
    outside [0, K) and the same in every loss; eval_ckpt is best|last; data.eval is a valid
    inference setting; the model family's own checks (`SegModel.check_config`: names, heads,
    buildable) and, for training, the crops are multiples of its input divisor; the method's own
    checks (`check_config` of the method class); and (check_data) the data root has the expected
    layout for every configured split and data.split exists. `training=False` (evaluation,
    prediction, export of a trained run) leaves out what only training uses: the method, the
    losses and the crops.
    """
    check_data_config(cfg.data)
    k = cfg.data.num_classes
    model_k = cfg.model.get("num_classes")
    if model_k != k:
        raise ConfigError(
            f"model.num_classes={model_k} but data.num_classes={k}: the classifier must have one "
            "output per class. Remove the model.num_classes override (it follows the data) or fix "
            "data.num_classes."
        )
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    divisor = _class_of(model, "model", "segcon.models.base.SegModel").check_config(model)
    _check_normalisation(cfg.data, model.get("input_norm"))
    if cfg.get("eval_ckpt", "best") not in EVAL_CKPTS:
        raise ConfigError(f"eval_ckpt must be one of {EVAL_CKPTS}, got {cfg.eval_ckpt!r}")
    if training:
        _check_losses(cfg)
        _check_crops(cfg.data, divisor, str(model["_target_"]), model)
        method = OmegaConf.to_container(cfg.method, resolve=True)
        assert isinstance(method, dict)
        method_cls = _class_of(method, "method", "a LightningModule with check_config")
        method_cls.check_config(method)
        if getattr(method_cls, "uses_unlabeled", False) and not any((cfg.get("pseudo_loss") or {}).values()):
            raise ConfigError(f"method {method['_target_']} learns from pseudo-labels, but the pseudo_loss group "
                              "defines no term; choose one, e.g. pseudo_loss=ce")
    if check_data:
        _check_layout(cfg.data)


def _check_normalisation(data: DictConfig, expected: Mapping[str, Any] | None) -> None:
    """Warn when the data normalisation differs from the one the model's weights expect
    (`model.input_norm`, which `data.mean`/`data.std` follow unless overridden)."""
    if not expected:
        return
    for key in ("mean", "std"):
        want, have = expected.get(key), list(data.get(key) or [])
        if want is not None and [round(float(v), 6) for v in want] != [round(float(v), 6) for v in have]:
            rank_zero_warn(
                f"data.{key}={have} differs from model.input_norm.{key}={list(want)}, the normalisation "
                "the model's pretrained weights were trained with; remove the data override unless "
                "this is intended."
            )


def check_data_config(data: DictConfig) -> None:
    """The data group's own settings: class count, ignore index, fixed label mappings, class
    names and palette, batch sizes, evaluation settings."""
    k = data.get("num_classes")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"data.num_classes must be a positive integer, got {k!r}")
    ignore = data.get("ignore_index")
    if not isinstance(ignore, int):
        raise ConfigError(f"data.ignore_index must be an integer (e.g. 255), got {ignore!r}")
    if 0 <= ignore < k:
        raise ConfigError(
            f"data.ignore_index={ignore} lies inside the class range [0, {k}) of data.num_classes: "
            "it would silently drop a real class. Use a value outside it (255 is the convention)."
        )
    fixed = getattr(locate(data.dataset._target_, "data.dataset._target_"), "fixed_num_classes", None)
    if fixed is not None and fixed != k:
        raise ConfigError(
            f"data.num_classes={k}, but the {data.dataset._target_} label mapping produces "
            f"{fixed} classes. Remove the data.num_classes override."
        )
    for key in ("class_names", "palette"):
        value = data.get(key)
        if value is not None and len(value) != k:
            raise ConfigError(f"data.{key} has {len(value)} entries but data.num_classes={k}")
    for key in ("batch_size", "val_batch_size"):
        if int(data.get(key, 1)) < 1:
            raise ConfigError(f"data.{key} must be >= 1")
    crop = data.get("crop_size")
    sizes = [crop] if isinstance(crop, int) else list(crop) if crop is not None else [1, 1]
    if len(sizes) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes):
        raise ConfigError(f"data.crop_size must be [height, width] (or one size) in positive integers, got "
                          f"{OmegaConf.to_container(crop) if OmegaConf.is_config(crop) else crop!r}; e.g. data.crop_size=[512,512]")
    from segcon.evaluation.inference import InferenceSettings

    InferenceSettings.from_config(OmegaConf.to_container(data.eval, resolve=True) if data.get("eval") else None)


def _class_of(node: Mapping[str, Any], key: str, what: str) -> Any:
    """The class a config node's `_target_` names, or a ConfigError naming `<key>._target_`."""
    target = node.get("_target_")
    if not target:
        raise ConfigError(f"{key} has no _target_ ({what})")
    return locate(target, f"{key}._target_")


def _check_losses(cfg: DictConfig) -> None:
    k, ignore = cfg.data.num_classes, cfg.data.ignore_index
    if not any((cfg.get("loss") or {}).values()) and not any((cfg.get("contrast") or {}).values()):
        raise ConfigError("the loss and contrast groups define no term: nothing would be trained. Choose a "
                          "supervised loss (loss=ce) or a contrast term that supervises through the whole output")
    for key, spec in _loss_terms(cfg):
        cw = spec.get("class_weights")
        if cw is not None and len(cw) != k:
            raise ConfigError(f"{key}.class_weights has {len(cw)} entries but data.num_classes={k}")
        if "ignore_index" in spec and spec["ignore_index"] != ignore:
            raise ConfigError(
                f"{key}.ignore_index={spec['ignore_index']} differs from data.ignore_index={ignore}; "
                "one ignore value must hold for losses, samplers and metrics. Remove the override."
            )


def _check_crops(data: DictConfig, divisor: int, target: str, model: Mapping[str, Any]) -> None:
    """Training and weak-view crops must be multiples of the model's input divisor."""
    crops = [("data.crop_size", tuple(data.crop_size))] if data.get("crop_size") is not None else []
    crops += [(f"data.train_transform {n}", s) for n, s in _crop_sizes(data.get("train_transform"))]
    crops += [(f"data.weak_transform {n}", s) for n, s in _crop_sizes(data.get("weak_transform"))]
    describe = locate(target, "model._target_").describe(model)
    for key, (h, w) in crops:
        if h % divisor or w % divisor:
            fix = (-(-h // divisor) * divisor, -(-w // divisor) * divisor)
            raise ConfigError(
                f"{key}={h}x{w} is not a multiple of the model's input divisor {divisor} "
                f"({describe}). Use e.g. {fix[0]}x{fix[1]}."
            )


def _check_layout(data: DictConfig) -> None:
    split = data.get("split")
    if split is not None and not Path(str(split)).expanduser().exists():
        raise DataError(
            f"data.split={split} does not exist: give a directory written by `segcon-data split` "
            "(labeled.txt [+ unlabeled.txt]) or a labeled list file"
        )
    dataset_cls = locate(data.dataset._target_, "data.dataset._target_")
    for split_name, disk_split in (data.get("splits") or {}).items():
        if disk_split is not None:
            # the unlabeled pool is images only: its masks are neither needed nor looked for
            labeled = split_name != "unlabeled"
            dataset_cls.check_layout(Path(str(data.root)).expanduser(), str(disk_split), labeled)
