"""Stopping a run from outside: SIGTERM, Ctrl-C (SIGINT) and the preemption signals that end a
run as SIGTERM does (`interrupt.signals`), each honoured at a step every rank agrees on.

    first SIGTERM / SIGINT / interrupt.signals   finish the current optimizer step (and a
                                                 validation that has begun), write last.ckpt of
                                                 that step, exit 128 + the signal (143, 130)
    second SIGINT                                stop at once (`StopNow`); the newest checkpoint
                                                 is kept as it was (writes are atomic)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

import lightning as L
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn

from segcon.utils.errors import ConfigError


class StopNow(BaseException):
    """Raised by a second Ctrl-C: the run stops where it is, without writing a checkpoint.

    A BaseException other than KeyboardInterrupt, so Lightning runs its `on_exception` hooks and
    re-raises it instead of turning it into `sys.exit(1)`."""


@dataclass
class StopRequest:
    """The first signal that asked the run to stop (None: none did), and how many Ctrl-Cs came."""

    signum: int | None = None
    interrupts: int = 0

    @property
    def status(self) -> int:
        """The exit status of a run this request stopped: 128 + the signal (SIGINT 130; SIGTERM and
        the preemption signals, which stand for it, 143)."""
        return 128 + (signal.SIGINT if self.signum == signal.SIGINT else signal.SIGTERM)


def signal_number(name: str) -> int:
    """`signal.SIGUSR2` from "SIGUSR2"; a ConfigError naming the key for anything segcon cannot
    catch besides SIGTERM and SIGINT."""
    number = getattr(signal, str(name).upper(), None)
    if not isinstance(number, signal.Signals) or number in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT):
        raise ConfigError(f"interrupt.signals: {name!r} is not a signal segcon can catch besides SIGTERM and SIGINT "
                          "(e.g. SIGUSR1, SIGUSR2)")
    return int(number)


def _lightning_handles_sigterm() -> bool:
    """Whether a Lightning fit / validate / test has its SIGTERM handler installed now."""
    return callable(signal.getsignal(signal.SIGTERM))


@contextlib.contextmanager
def stop_signals(names: Sequence[str]) -> Iterator[StopRequest]:
    """While the block runs: each named signal sends this process SIGTERM (during a fit the run
    then stops after the agreed step and writes last.ckpt; elsewhere SIGTERM ends the process);
    a first Ctrl-C does the same inside a Lightning run and raises KeyboardInterrupt outside one;
    a second Ctrl-C raises `StopNow`. Yields the request record; the previous handlers are put
    back afterwards (only the main thread can install handlers)."""
    request = StopRequest()
    numbers = [signal_number(n) for n in names]
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def as_sigterm(signum: int, frame: FrameType | None) -> None:
        request.signum = request.signum or signum
        os.kill(os.getpid(), signal.SIGTERM)

    def interrupt(signum: int, frame: FrameType | None) -> None:
        request.interrupts += 1
        if request.interrupts > 1:
            raise StopNow("stopped at once by a second interrupt (Ctrl-C)")
        request.signum = request.signum or signum
        if not _lightning_handles_sigterm():
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {n: signal.signal(n, as_sigterm) for n in numbers}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield request
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)


class AgreedSigterm(_SignalConnector):
    """Lightning's SIGTERM handling, except that a fit stops where every rank agrees, after an
    optimizer step and never inside a validation.

    Lightning 2.6's handler forwards the signal to the other local ranks, broadcasts from inside
    the handler, and each rank raises SIGTERMException at the end of whatever step it is in when
    its own signal arrives; a rank one step ahead then waits forever in that step's collectives
    for a rank that has stopped (Lightning issue #20806; it hung segcon's CI). Its validation
    loop also stops at the next batch, so a signal during (or just before) an in-fit validation
    ends the run with that validation half done and nothing saved. Here the handler only records
    the request during a fit; `segcon.engine.callbacks.StopTogether` decides, on every rank at
    once, after each optimizer step and at the end of each validation. Outside a fit (validate,
    test) the request takes effect at once, as in Lightning.
    """

    def __init__(self, trainer: L.Trainer) -> None:
        super().__init__(trainer)
        self.requested = False

    def register_signal_handlers(self) -> None:
        self.requested = False
        super().register_signal_handlers()

    def _sigterm_notifier_fn(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.trainer.state.fn == TrainerFn.FITTING:
            return  # StopTogether sets received_sigterm on every rank at the same point
        launcher = self.trainer.strategy.launcher
        if not self.received_sigterm and launcher is not None:
            launcher.kill(signum)
        self.received_sigterm = True
