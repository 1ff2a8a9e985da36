"""The wheel ships every package and every config, so installed console scripts find conf/;
Hydra finds segcon's sweeper plugin from any working directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_all_packages_and_configs(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("segcon-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in (ROOT / "segcon").rglob("__init__.py"):
        assert str(pkg.relative_to(ROOT)) in names, f"{pkg} missing from the wheel"
    for module in [*(ROOT / "segcon").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]:
        assert str(module.relative_to(ROOT)) in names, f"{module} missing from the wheel"
    for cfg in (ROOT / "conf").rglob("*.yaml"):
        assert f"segcon/conf/{cfg.relative_to(ROOT / 'conf')}" in names, f"{cfg} missing from the wheel"


def test_hydra_discovers_the_search_sweeper_from_any_directory(tmp_path: Path) -> None:
    """Hydra scans the hydra_plugins namespace with pkgutil, which does not see packages behind
    a strict editable install's import hook (hence `make install`'s editable_mode=compat)."""
    code = ("from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "print([p.__name__ for p in Plugins.instance().discover(Sweeper)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "SegconOptunaSweeper" in out.stdout
