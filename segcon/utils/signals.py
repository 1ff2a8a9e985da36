"""Preemption signals that end a run as SIGTERM does (`interrupt.signals`)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence

from segcon.utils.errors import ConfigError


def signal_number(name: str) -> int:
    """`signal.SIGUSR2` from "SIGUSR2"; a ConfigError naming the key for anything segcon cannot
    catch besides SIGTERM."""
    number = getattr(signal, str(name).upper(), None)
    if not isinstance(number, signal.Signals) or number in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM):
        raise ConfigError(f"interrupt.signals: {name!r} is not a signal segcon can catch besides SIGTERM "
                          "(e.g. SIGUSR1, SIGUSR2)")
    return int(number)


@contextlib.contextmanager
def as_sigterm(names: Sequence[str]) -> Iterator[None]:
    """While the block runs, each named signal sends this process SIGTERM: during a fit Lightning
    then finishes the step and segcon writes last.ckpt; elsewhere SIGTERM ends the process. The
    previous handlers are restored afterwards (only the main thread can install handlers)."""
    numbers = [signal_number(n) for n in names]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {n: signal.signal(n, lambda *_: os.kill(os.getpid(), signal.SIGTERM)) for n in numbers}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)
