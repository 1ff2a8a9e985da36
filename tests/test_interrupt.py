"""A termination signal ends a run after the current step, with last.ckpt of that step and exit
status 143 ("interrupted"); a preemption signal from interrupt.signals does the same."""

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


@pytest.mark.slow
def test_a_signal_checkpoints_the_current_step_and_exits_interrupted(data_dir: Path, tmp_path: Path) -> None:
    """SIGUSR2 (the default interrupt.signals) is turned into SIGTERM, so this covers both paths."""
    run = tmp_path / "run"
    args = [*_tiny_cli_args(data_dir), "trainer.max_steps=100000", "trainer.max_epochs=1000",
            "trainer.check_val_every_n_epoch=1000", "+trainer.limit_train_batches=2", f"hydra.run.dir={run}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.Popen([sys.executable, "-m", "segcon.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "csv" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") > 3):
        time.sleep(0.5)  # training has logged a few steps
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "interrupted by a termination signal" in err and "resume with ckpt_path=" in err
    step = int(re.search(r"the state of step (\d+) is in", err).group(1))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == step >= 3  # the step the signal interrupted, not an earlier save


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
