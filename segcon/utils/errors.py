"""The errors a user can cause. Each message names the key or file, what was expected and the fix."""


class SegconError(Exception):
    """Base class: an error caused by the user's configuration or data, not a bug in segcon."""


class ConfigError(SegconError, ValueError):
    """An impossible or inconsistent configuration (names the config key)."""


class DataError(SegconError, ValueError):
    """Missing, malformed or inconsistent data on disk (names the file)."""


def find_user_error(exc: BaseException) -> SegconError | None:
    """The SegconError behind `exc`, if any: Hydra's instantiate wraps exceptions raised in a
    `_target_`'s constructor, so the entry points look through the cause chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SegconError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
