"""Termination signals: the preemption signals that end a run as SIGTERM does
(`interrupt.signals`), and SIGTERM handling that stops every rank of a fit at the same step."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

import lightning as L
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn

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


class AgreedSigterm(_SignalConnector):
    """Lightning's SIGTERM handling, except that a multi-process fit stops where all ranks agree.

    Lightning 2.6's handler forwards the signal to the other local ranks, broadcasts from inside
    the handler, and each rank raises SIGTERMException at the end of whatever step it is in when
    its own signal arrives; a rank one step ahead then waits forever in that step's collectives
    for a rank that has stopped (Lightning issue #20806; it hung segcon's CI). Here the handler
    only records the request; `segcon.methods.callbacks.StopTogether` reduces the requests of all
    ranks (any rank's counts) after every optimizer step, and every rank stops after that same
    step. Outside a multi-process fit (one process; validate, test) the request takes effect at
    once, as in Lightning.
    """

    def __init__(self, trainer: L.Trainer) -> None:
        super().__init__(trainer)
        self.requested = False

    def register_signal_handlers(self) -> None:
        self.requested = False
        super().register_signal_handlers()

    def _sigterm_notifier_fn(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.trainer.world_size > 1 and self.trainer.state.fn == TrainerFn.FITTING:
            return  # StopTogether sets received_sigterm on every rank at the same step
        launcher = self.trainer.strategy.launcher
        if not self.received_sigterm and launcher is not None:
            launcher.kill(signum)
        self.received_sigterm = True
