"""Printing the resolved config as a tree (and saving it in the run directory)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rich.syntax
import rich.tree
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

ORDER = ("data", "model", "loss", "contrast", "method", "optim", "trainer", "logger", "callbacks", "paths")


@rank_zero_only
def print_config_tree(cfg: DictConfig, out_dir: Path | None = None, order: Sequence[str] = ORDER) -> None:
    """Print the groups of `cfg` (in `order`, then the rest) as a rich tree, resolved; write the
    same text to `<out_dir>/config_tree.log` and the resolved YAML to `<out_dir>/config.yaml`."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    Console().print(tree)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "config_tree.log").open("w") as f:
            Console(file=f, width=120).print(tree)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
