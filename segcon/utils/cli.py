"""The shared shape of segcon's non-Hydra-main console scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from segcon.utils.errors import find_user_error


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
        return 2
