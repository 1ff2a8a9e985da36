"""Shared fixtures: composing the real configs, shrunk to tiny CPU-sized runs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from segcon.config import config_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# the test helpers (tests.helpers, tests.toy_model) are classes a config may build in the tests
# (and in the CLI runs they start: the environment is inherited)
os.environ["SEGCON_TRUSTED_TARGETS"] = "tests."
# counted label statistics (loss=imbalance) go to a temporary folder, not the user's cache
os.environ["SEGCON_CACHE_DIR"] = tempfile.mkdtemp(prefix="segcon-test-cache-")

# A small synthetic dataset shared by the whole session: 16 train / 6 val images of 64x64.
TINY_SYNTHETIC = [
    "data.prepare.num_train=16",
    "data.prepare.num_val=6",
    "data.prepare.image_size=64",
    "data.crop_size=[64,64]",
]


def compose_train(overrides: Sequence[str] = (), output_dir: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml with `overrides`, as segcon-train would, without running Hydra.

    `paths.output_dir` is set to `output_dir` (the ${hydra:...} interpolation needs a running
    app otherwise).
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide data dir (the tiny synthetic dataset is written there once)."""
    return tmp_path_factory.mktemp("data")


def tiny_overrides(data_dir: Path) -> list[str]:
    """debug=fast on the tiny synthetic dataset, CSV logging, no progress bar or model summary."""
    return [
        "debug=fast",
        "logger=csv",
        f"paths.data_dir={data_dir}",
        f"data.root={data_dir}/synthetic-tiny",
        *TINY_SYNTHETIC,
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
    ]


@pytest.fixture
def tiny_cfg(data_dir: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """Factory: a composed debug=fast config on the tiny synthetic dataset, writing to tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_train([*tiny_overrides(data_dir), *overrides], output_dir=tmp_path / "run")

    return make


@pytest.fixture(scope="session")
def trained_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of one tiny trained run (debug=fast, Unet-R18), shared by the
    evaluation, prediction and export tests. Treat it as read-only."""
    from segcon.train import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(compose_train(tiny_overrides(data_dir), output_dir=run_dir))
    return run_dir
