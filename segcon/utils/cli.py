"""The shared shape of segcon's non-Hydra-main console scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segcon.utils.errors import ConfigError, find_user_error
from segcon.utils.io import make_output_dir

USER_ERROR = 2
"""The exit status of every segcon command stopped by a user error (one `error:` line on stderr)."""


class CheckOutputDir(Callback):
    """A Hydra callback (conf/hydra/default.yaml): the run's (or multirun's) output folder is
    created before Hydra does it itself, so a folder that cannot be created (no permission, a
    file in the way) ends in one `error:` line naming `hydra.run.dir` / `hydra.sweep.dir` and exit
    status 2 instead of a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            make_output_dir(str(OmegaConf.select(config, key)), key)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(USER_ERROR) from None


def hydra_error_line(err: BaseException) -> str:
    """Hydra's or OmegaConf's message on one line, without the config search path (the options
    it lists stay)."""
    return " ".join(line.strip() for line in str(err).split("Config search path")[0].splitlines() if line.strip())


def run_command(command: Callable[[list[str]], int], usage: str, argv: Sequence[str] | None) -> int:
    """Run `command(args)` as a console script: help on -h / no arguments; a user error (a
    SegconError anywhere in the cause chain) prints one `error: ...` line and returns 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage)
        return 0 if args else 2
    try:
        return command(args)
    except Exception as exc:
        err = find_user_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
