"""Clusters without a cluster: submitit's local executor requeues a signalled job that continues
from its checkpoint; the sbatch recipe requeues a job that segcon stopped at SLURM's notice; the
SLURM presets compose."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from segcon.utils.checkpoint import read_progress
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), **extra)


def test_slurm_presets_compose_with_one_requeue_owner() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from segcon.config import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["launcher=slurm", "hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2",
                                          "trainer=multinode"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 4 and launcher.nodes == 2
    assert launcher.max_num_timeout > 0  # submitit requeues at the time limit ...
    assert list(cfg.interrupt.signals) == [] and cfg.slurm.auto_requeue is False  # ... and only submitit
    assert cfg.ckpt_path == "auto"


@pytest.mark.slow
def test_submitit_requeues_a_signalled_job_which_continues_from_its_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    """A job of launcher=submitit_local gets SIGUSR2 (the time-limit notice) at step 3: submitit
    checkpoints its submission and the local controller restarts it; the restarted job finds the
    step-2 last.ckpt in its run directory (ckpt_path=auto) and trains to the end."""
    once = tmp_path / "signalled"
    args = [*tiny_overrides(data_dir), "launcher=submitit_local", f"hydra.sweep.dir={tmp_path}/sweep",
            "trainer.max_epochs=-1", "trainer.max_steps=6", "callbacks.model_checkpoint.last_every_n_steps=2",
            "+callbacks.crash._target_=tests.helpers.CrashAt", "+callbacks.crash.step=3", "+callbacks.crash.how=usr2",
            f"+callbacks.crash.once_file={once}"]
    out = subprocess.run([sys.executable, "-m", "segcon.train", "-m", *args], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert once.exists()
    job = tmp_path / "sweep" / "0"
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.err"))
    logs += "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.out"))
    assert "Requeued job" in logs
    assert f"resuming from {job / 'checkpoints' / 'last.ckpt'} (step 2)" in logs
    assert json.loads((job / "metrics.json").read_text())["val/checkpoint_step"] > 0
    assert read_progress(job / "checkpoints" / "last.ckpt")[0] == 6


def _fake_slurm(bin_dir: Path, record: Path) -> None:
    """`srun` runs its command as the one task; `scontrol` records its arguments."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {record}\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow
def test_sbatch_recipe_requeues_a_job_stopped_at_the_notice_and_the_requeued_job_resumes(
    data_dir: Path, tmp_path: Path
) -> None:
    """scripts/slurm/train.sbatch under SLURM variables, with srun/scontrol stand-ins: the notice
    (SIGUSR2) stops segcon after the step with last.ckpt (exit 143) and the script requeues the
    job; run again as the requeued job (same job id), it resumes in the same run directory."""
    record = tmp_path / "scontrol.txt"
    _fake_slurm(tmp_path / "bin", record)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "segcon", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NODELIST": "localhost", "SEGCON_LOG_DIR": str(tmp_path / "logs"),
             "PATH": f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = [*tiny_overrides(data_dir), "trainer=cpu", "trainer.max_epochs=-1", "trainer.max_steps=6"]
    # step 1 of an epoch of 4: the notice comes mid-epoch, not during a validation
    signal_at_1 = ["+callbacks.crash._target_=tests.helpers.CrashAt", "+callbacks.crash.step=1",
                   "+callbacks.crash.how=usr2", f"+callbacks.crash.once_file={tmp_path / 'signalled'}"]
    script = ROOT / "scripts" / "slurm" / "train.sbatch"
    first = subprocess.run(["bash", str(script), *args, *signal_at_1], cwd=tmp_path, env=_env(**slurm),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 143, first.stderr[-3000:]
    assert record.read_text().split() == ["requeue", "4242"]
    run = tmp_path / "logs" / "slurm" / "segcon-4242"
    step = read_progress(run / "checkpoints" / "last.ckpt")[0]
    assert step in (1, 2)
    second = subprocess.run(["bash", str(script), *args, *signal_at_1], cwd=tmp_path, env=_env(**slurm),
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} (step {step})" in second.stdout + second.stderr
    assert record.read_text().split() == ["requeue", "4242"]  # not requeued again
    assert read_progress(run / "checkpoints" / "last.ckpt")[0] == 6
