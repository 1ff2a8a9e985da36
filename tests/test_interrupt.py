"""A termination signal ends a run after the current step, with last.ckpt of that step and exit
status 143 ("interrupted"); a preemption signal from interrupt.signals does the same, and Ctrl-C
too (exit 130), a second Ctrl-C at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import _tiny_cli_args


def _training(data_dir: Path, run: Path, *extra: str) -> subprocess.Popen:
    """A long CLI run, returned once it has logged a few steps."""
    args = [*_tiny_cli_args(data_dir), "trainer.max_steps=100000", "trainer.max_epochs=1000",
            "trainer.check_val_every_n_epoch=1000", "trainer.limit_train_batches=2", f"hydra.run.dir={run}", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.Popen([sys.executable, "-m", "segcon.train", *args], cwd=run.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "csv" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") > 3):
        time.sleep(0.5)  # training has logged a few steps
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "status", "said"), [
    (signal.SIGUSR2, 143, "interrupted by a termination signal"),  # interrupt.signals: SIGTERM's own path
    (signal.SIGINT, 130, "interrupted by Ctrl-C (SIGINT)"),
])
def test_a_signal_checkpoints_the_current_step_and_exits_interrupted(
    sig: signal.Signals, status: int, said: str, data_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = _training(data_dir, run)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    assert said in err and "resume with ckpt_path=" in err
    step = int(re.search(r"state of step (\d+) is in", err).group(1))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == step >= 3  # the step the signal interrupted, not an earlier save


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_keeps_the_newest_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    """Two Ctrl-Cs in a row, while last.ckpt is written at every step: the run stops without
    finishing its step, exits 130 naming the newest checkpoint, and that file is whole (no
    temporary file is left beside it)."""
    run = tmp_path / "run"
    proc = _training(data_dir, run, "callbacks.model_checkpoint.last_every_n_steps=1",
                     "+callbacks.slow._target_=tests.helpers.SlowSteps", "+callbacks.slow.seconds=1.5")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)  # inside the same step: two signals sent at once would be delivered as one
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped at once by a second interrupt" in err, err[-3000:]
    step = int(re.search(r"state of step (\d+) is in", err).group(1))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == step and ckpt["state_dict"]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_ctrl_c_is_sigterm_inside_a_lightning_run_and_keyboard_interrupt_outside() -> None:
    """A first Ctrl-C becomes SIGTERM while a Lightning run has its handler installed (its stop
    then follows the agreed-step path) and KeyboardInterrupt before or after one; a second one
    raises StopNow; the exit status follows the first signal."""
    from segcon.utils.signals import StopNow, stop_signals

    received: list[int] = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with stop_signals([]) as request, pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert request.status == 130
        signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # as Lightning's
        with stop_signals([]) as request:
            os.kill(os.getpid(), signal.SIGINT)
            assert received == [signal.SIGTERM] and request.status == 130
            with pytest.raises(StopNow):
                os.kill(os.getpid(), signal.SIGINT)
        with stop_signals(["SIGUSR2"]) as request:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert received == [signal.SIGTERM] * 2 and request.status == 143
    finally:
        signal.signal(signal.SIGTERM, before)


def test_signal_names_are_checked_and_handlers_restored() -> None:
    from segcon.utils.errors import ConfigError
    from segcon.utils.signals import stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGINT)}
    with stop_signals(["SIGUSR2"]):
        assert all(signal.getsignal(s) is not h for s, h in before.items())
    assert all(signal.getsignal(s) is h for s, h in before.items())
    for bad in ("SIGKILL", "SIGTERM", "SIGINT", "SIGNOPE"):
        with pytest.raises(ConfigError, match=r"interrupt\.signals"), stop_signals([bad]):
            pass
