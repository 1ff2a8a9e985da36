"""The errors a user can cause. Each message names the key or file, what was expected and the fix."""


class SegconError(Exception):
    """Base class: an error caused by the user's configuration or data, not a bug in segcon."""


class ConfigError(SegconError, ValueError):
    """An impossible or inconsistent configuration (names the config key)."""


class DataError(SegconError, ValueError):
    """Missing, malformed or inconsistent data on disk (names the file)."""


def find_user_error(exc: BaseException) -> SegconError | None:
    """The SegconError behind `exc`, if any: Hydra's instantiate wraps exceptions raised in a
    `_target_`'s constructor, so the entry points look through the cause chain; one raised in a
    data-loader worker comes back with the worker's traceback in its message, which is cut to
    the original message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, SegconError):
            return _without_worker_traceback(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _without_worker_traceback(err: SegconError) -> SegconError:
    """`err` with the message it had in the data-loader worker (torch re-raises it in the main
    process as "Caught X in DataLoader worker process N. Original Traceback ...: X: <message>")."""
    text = str(err)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return err
    marker = f"{type(err).__module__}.{type(err).__qualname__}: "
    start = text.rfind(marker)
    return type(err)(text[start + len(marker):].strip()) if start >= 0 else err
