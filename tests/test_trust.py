"""Nothing read from a file is built as given: a `_target_` outside segcon's allowlist is refused,
with one error naming the key, before anything runs (segcon.utils.targets).

The attack files hold only dicts, strings and tensors, so they pass torch's weights_only load;
their stored run config names a callable that writes to disk. Each is tried in a .ckpt and in a
.safetensors file's metadata, at the model, data and method levels, under segcon-eval,
segcon-predict and segcon-export: every one must exit 2 with an `error:` line and create nothing.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from segcon.utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Pickled into a second file: unpickling it (torch.load(weights_only=False)) makes a folder."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.makedirs, (self.path,)


def _attacks(tmp: Path) -> dict[str, tuple[dict[str, Any], Callable[[], bool]]]:
    """name -> (the node an attacker adds, whether the attack took effect)."""
    (tmp / "attacker.txt").write_text("attacker")
    (tmp / "victim.txt").write_text("victim")
    torch.save(_Payload(tmp / "pickle_ran"), tmp / "payload.pt")
    return {
        "open": ({"_target_": "builtins.open", "file": str(tmp / "opened"), "mode": "w"},
                 lambda: (tmp / "opened").exists()),
        "makedirs": ({"_target_": "os.makedirs", "name": str(tmp / "made")}, lambda: (tmp / "made").exists()),
        "copyfile": ({"_target_": "shutil.copyfile", "src": str(tmp / "attacker.txt"), "dst": str(tmp / "victim.txt")},
                     lambda: (tmp / "victim.txt").read_text() != "victim"),
        "torch_load": ({"_target_": "torch.load", "f": str(tmp / "payload.pt"), "weights_only": False},
                       lambda: (tmp / "pickle_ran").exists()),
    }


def _plant(config: dict[str, Any], level: str, node: dict[str, Any]) -> None:
    """Put `node` where the tool would build it: inside the model config (built with the
    network), inside the data prepare step (run first), or in the method config."""
    if level == "model":
        config["model"]["encoder_depth"] = node
    elif level == "data":
        config["data"]["prepare"]["num_train"] = node
    else:
        config["method"]["num_overlays"] = node


@pytest.fixture(scope="module")
def stored_config(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The resolved run config segcon-train stores, of a tiny synthetic run."""
    from segcon.config import fill_data_defaults, prepare_data
    from tests.conftest import compose_train, tiny_overrides

    cfg = compose_train(tiny_overrides(data_dir), output_dir=tmp_path_factory.mktemp("run"))
    prepare_data(cfg)
    fill_data_defaults(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def _write(config: dict[str, Any], path: Path) -> Path:
    weights = {"encoder.conv1.weight": torch.zeros(1)}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(path), metadata={"segcon": json.dumps({"config": config, "branch": "student"})})
    else:
        torch.save({"state_dict": {f"net.model.{k}": v for k, v in weights.items()}, "segcon": {"config": config},
                    "global_step": 1, "epoch": 0}, path)
    return path


def _tool_args(tool: str, ckpt: Path, tmp: Path) -> list[str]:
    if tool == "eval":
        return [f"ckpt={ckpt}", f"out_dir={tmp / 'eval'}", "logger=csv", "trainer.accelerator=cpu"]
    if tool == "predict":
        (tmp / "in").mkdir(exist_ok=True)
        return [f"ckpt={ckpt}", f"input={tmp / 'in'}", f"output={tmp / 'pred'}"]
    return [f"ckpt={ckpt}", f"out={tmp / 'model.onnx'}"]


def _main(tool: str) -> Callable[[list[str]], int]:
    from segcon import evaluate, export, predict

    return {"eval": evaluate.main, "predict": predict.main, "export": export.main}[tool]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("level", ["model", "data", "method"])
@pytest.mark.parametrize("attack", ["open", "makedirs", "copyfile", "torch_load"])
def test_a_crafted_checkpoint_is_refused_and_creates_nothing(
    attack: str, level: str, suffix: str, stored_config: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node, took_effect = _attacks(tmp_path)[attack]
    for tool in ("eval", "predict", "export"):
        config = json.loads(json.dumps(stored_config))
        _plant(config, level, node)
        ckpt = _write(config, tmp_path / f"crafted_{tool}{suffix}")
        status = _main(tool)(_tool_args(tool, ckpt, tmp_path))
        err = capsys.readouterr().err
        assert status == 2, f"segcon-{tool}: {err[-1500:]}"
        assert not took_effect(), f"segcon-{tool} ran the {attack} payload"
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert str(ckpt) in err and node["_target_"] in err, err
        key = {"model": "model.encoder_depth", "data": "data.prepare.num_train", "method": "method.num_overlays"}[level]
        assert f"{key}._target_=" in err, err
    assert not (tmp_path / "eval").exists() and not (tmp_path / "pred").exists()
    assert not (tmp_path / "model.onnx").exists()


def test_a_stored_interpolation_is_refused(stored_config: dict[str, Any], tmp_path: Path) -> None:
    """A resolver in a stored config would read the machine (`oc.env`) into the run's logs."""
    from segcon.utils.checkpoint import load_run_checkpoint

    config = json.loads(json.dumps(stored_config))
    config["tags"] = ["${oc.env:HOME}"]
    with pytest.raises(ConfigError, match=r"tags\.0=.*interpolation"):
        load_run_checkpoint(_write(config, tmp_path / "x.ckpt"))


def test_resuming_from_a_crafted_checkpoint_is_refused(stored_config: dict[str, Any], tmp_path: Path) -> None:
    """`segcon-train ckpt_path=<file>` reads the stored config to compare it: refused first."""
    from segcon.resume import resume_checkpoint

    config = json.loads(json.dumps(stored_config))
    _plant(config, "method", {"_target_": "os.makedirs", "name": str(tmp_path / "made")})
    ckpt = _write(config, tmp_path / "x.ckpt")
    with pytest.raises(ConfigError, match=r"method\.num_overlays\._target_='os\.makedirs'"):
        resume_checkpoint(OmegaConf.create({**stored_config, "ckpt_path": str(ckpt)}))


# -- the allowlist ------------------------------------------------------------------------------


def _conf_targets() -> set[str]:
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in (REPO / "conf").rglob("*.yaml"):
        walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
    return found


def test_every_target_the_configs_name_is_allowed_and_every_allowed_segcon_name_is_used() -> None:
    """The shipped configs build (every `_target_` in conf/ is allowed, Hydra's own plugins
    aside), and the list of segcon's classes holds nothing that no config or code names."""
    from segcon.build import DEFAULT_DATAMODULE
    from segcon.utils.targets import SEGCON_TARGETS, is_allowed

    named = _conf_targets()
    hydra_callbacks = OmegaConf.load(REPO / "conf" / "hydra" / "default.yaml").get("callbacks") or {}
    # Hydra's own plugins and callbacks, which Hydra builds from the command line
    plugins = {t for t in named if t.startswith("hydra_plugins.")} | {c["_target_"] for c in hydra_callbacks.values()}
    assert not [t for t in named - plugins if not is_allowed(t)]
    assert SEGCON_TARGETS - named == {DEFAULT_DATAMODULE} - named


def test_every_allowed_name_is_a_class_or_function_defined_there() -> None:
    from hydra.utils import get_object

    from segcon.utils.targets import LIBRARY_TARGETS, SEGCON_TARGETS

    for target in sorted(SEGCON_TARGETS | LIBRARY_TARGETS):
        obj = get_object(target)
        assert callable(obj), target
        if target.startswith("segcon."):
            assert f"{obj.__module__}.{obj.__qualname__}" == target


def test_names_of_moved_classes_still_build_the_class_now_in_their_place() -> None:
    """Run configs of earlier versions name the callbacks under segcon.methods.callbacks and the
    methods under segcon.methods.teacher_student: each still locates, to the class now allowed."""
    from segcon.utils.targets import MOVED_TARGETS, SEGCON_TARGETS, locate

    assert {"segcon.methods.callbacks.ModelCheckpoint", "segcon.methods.teacher_student.MeanTeacher"} <= set(MOVED_TARGETS)
    for old, new in MOVED_TARGETS.items():
        assert new in SEGCON_TARGETS, new
        cls = locate(old, "callbacks.x._target_")
        assert f"{cls.__module__}.{cls.__qualname__}" == new
    # built from a stored run config, interpolations resolved against the config's root
    from omegaconf import OmegaConf

    from segcon.engine.callbacks import ModelCheckpoint
    from segcon.utils.targets import instantiate

    cfg = OmegaConf.create({"out": "/tmp/run", "cb": {"_target_": "segcon.methods.callbacks.ModelCheckpoint",
                                                      "dirpath": "${out}/checkpoints", "monitor": "val/mIoU"}})
    built = instantiate(cfg.cb, "callbacks.model_checkpoint")
    assert type(built) is ModelCheckpoint and built.dirpath == "/tmp/run/checkpoints"


def test_the_users_own_targets_come_from_the_environment_by_defining_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SEGCON_TRUSTED_TARGETS`: an exact name, or a package prefix ending in a dot that allows
    what its modules define, not what they import (`tests.helpers.torch.load`, `tests.helpers.os`)."""
    from segcon.utils.targets import is_allowed

    monkeypatch.setenv("SEGCON_TRUSTED_TARGETS", "tests.")
    assert is_allowed("tests.helpers.CrashAt") and is_allowed("tests.toy_model.TinyNet")
    for reexported in ("tests.helpers.torch.load", "tests.helpers.Path", "tests.helpers.optuna.create_study",
                       "tests.helpersx.CrashAt", "builtins.open"):
        assert not is_allowed(reexported), reexported
    monkeypatch.setenv("SEGCON_TRUSTED_TARGETS", "tests.helpers.CrashAt, mypkg.Net")
    assert is_allowed("tests.helpers.CrashAt") and is_allowed("mypkg.Net")
    assert not is_allowed("tests.helpers.DumpMemory")
    monkeypatch.delenv("SEGCON_TRUSTED_TARGETS")
    assert not is_allowed("tests.helpers.CrashAt")
    assert is_allowed("segcon.models.segnet.SegNet") and not is_allowed("segcon.models.segnet.torch.load")
    assert not is_allowed(None) and not is_allowed(print)


def test_instantiate_checks_nested_targets_before_building_anything(tmp_path: Path) -> None:
    from segcon.utils.targets import instantiate

    spec = {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path / "logs"),
            "name": {"_target_": "os.makedirs", "name": str(tmp_path / "made")}}
    with pytest.raises(ConfigError, match=r"logger\.csv\.name\._target_='os\.makedirs'.*SEGCON_TRUSTED_TARGETS"):
        instantiate(spec, "logger.csv")
    listed = {"_target_": "optuna.pruners.PatientPruner", "patience": 1,
              "wrapped_pruner": [{"_target_": "builtins.exec", "_args_": ["1"]}]}
    with pytest.raises(ConfigError, match=r"p\.wrapped_pruner\[0\]\._target_='builtins\.exec'"):
        instantiate(listed, "p")
    assert not (tmp_path / "made").exists() and not (tmp_path / "logs").exists()


def test_a_studys_stored_pruner_and_a_sweep_argument_are_checked(data_dir: Path, tmp_path: Path) -> None:
    """The trials build the pruner stored in the study's database; a W&B sweep's arguments are
    command-line overrides: both reach the same gate."""
    from segcon.build import build_model
    from segcon.search import make_pruner
    from tests.conftest import compose_train, tiny_overrides

    with pytest.raises(ConfigError, match=r"hydra\.sweeper\.pruner\._target_='os\.makedirs'"):
        make_pruner({"_target_": "os.makedirs", "name": str(tmp_path / "made")})
    cfg = compose_train([*tiny_overrides(data_dir), f"+model.extra={{_target_: os.makedirs, name: {tmp_path / 'm2'}}}"],
                        output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"model\.extra\._target_='os\.makedirs'"):
        build_model(cfg)
    assert not (tmp_path / "made").exists() and not (tmp_path / "m2").exists()


def test_only_the_gate_imports_hydras_builders() -> None:
    """segcon and its sweeper turn configs into objects only through segcon.utils.targets."""
    builders = {"instantiate", "call", "get_class", "get_method", "get_object", "_locate"}
    offenders = []
    for path in [*(REPO / "segcon").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]:
        if path == REPO / "segcon" / "utils" / "targets.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hydra"):
                offenders += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names if a.name in builders]
    assert not offenders
