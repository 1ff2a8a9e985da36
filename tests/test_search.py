"""Hyper-parameter search: the search-space syntax, the study's settings guard, heartbeats, and a
real search that prunes, is interrupted and continues a cut-off trial from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from segcon.search import Heartbeat, distribution, open_study, split_arguments
from segcon.utils.checkpoint import read_progress
from segcon.utils.errors import ConfigError
from tests.conftest import compose_train, tiny_overrides


def test_search_space_syntax() -> None:
    assert distribution("a", "interval(0.1, 2)") == FloatDistribution(0.1, 2.0)
    assert distribution("a", "tag(int, interval(1, 8))") == IntDistribution(1, 8)
    assert distribution("a", "tag(log, interval(0.01, 1.0))") == FloatDistribution(0.01, 1.0, log=True)
    assert distribution("a", "range(2, 11, 3)") == IntDistribution(2, 8, step=3)  # 2, 5, 8
    assert distribution("a", "choice(0.9, 0.99)") == CategoricalDistribution([0.9, 0.99])
    assert distribution("a", "pixel,cac") == CategoricalDistribution(["pixel", "cac"])
    assert distribution("a", [1, 2]) == CategoricalDistribution([1, 2])
    with pytest.raises(ConfigError, match="a fixed value belongs in the run's overrides"):
        distribution("contrast.pixel.weight", "0.3")
    fixed, swept = split_arguments(["seed=1", "contrast.pixel.weight=interval(0.1,1)", "optim.lr=1e-3,3e-4"])
    assert fixed == ["seed=1"]
    assert swept == {"contrast.pixel.weight": "interval(0.1,1)", "optim.lr": "1e-3,3e-4"}


def test_a_study_with_other_settings_is_refused_naming_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    settings = {"direction": "maximize", "pruner": None, "space": {"x": "interval(0, 1)"}, "metric": "val/mIoU_best"}
    study = open_study("s", url, settings=settings)
    study.tell(study.ask({"x": FloatDistribution(0, 1)}), 0.5)
    assert len(open_study("s", url, settings=settings).trials) == 1  # the same search continues
    with pytest.raises(ConfigError, match=r"space: .*interval\(0, 1\).* in the study, .*interval\(0, 2\).* now"):
        open_study("s", url, settings={**settings, "space": {"x": "interval(0, 2)"}})
    assert len(open_study("s", url, settings=settings).trials) == 1  # nothing was lost


def test_heartbeat_keeps_a_running_trial_alive_and_a_silent_one_is_queued_again(tmp_path: Path) -> None:
    study = open_study("h", f"sqlite:///{tmp_path}/h.db", heartbeat_interval=1, grace_period=2, max_retry=1)
    space = {"x": FloatDistribution(0, 1)}
    alive, dead = study.ask(space), study.ask(space)
    for trial in (alive, dead):  # both ran; then the process of `dead` died
        study._storage.record_heartbeat(trial._trial_id)
    with Heartbeat(study._storage, [alive._trial_id], interval=1):
        time.sleep(3.5)
        fail_stale_trials(study)
    states = [t.state for t in study.trials]
    assert states == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[2].params == study.trials[1].params
    assert study.trials[2].system_attrs["failed_trial"] == dead.number


def test_search_presets_name_keys_that_exist() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from segcon.config import config_dir

    for preset, extra in [("pixel_contrast", []), ("teacher_student", ["experiment=ssl_synthetic"])]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=[f"hparams_search={preset}", *extra], return_hydra_config=True)
        assert cfg.hydra.sweeper._target_.endswith("SegconOptunaSweeper")
        for key in cfg.hydra.sweeper.params:
            assert OmegaConf.select(cfg, key) is not None, f"{preset}: {key} is not in the composed config"
    assert compose_train(["hparams_search=teacher_student"]).optimized_metric == "val/teacher/mIoU_best"


def _search(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.run([sys.executable, "-m", "segcon.train", "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_search_prunes_survives_interruption_and_continues_the_cut_trial(data_dir: Path, tmp_path: Path) -> None:
    """Run 1 is stopped by SIGTERM in trial 0 at step 3 (as a scheduler would): exit 143, the trial
    failed and queued again. Run 2, the same command: the queued copy (trial 1, same parameters)
    continues from trial 0's newest checkpoint and completes; trial 2 is pruned at step 4 by the
    study's pruner and stops training there."""
    args = [
        *tiny_overrides(data_dir), "hparams_search=pixel_contrast", f"paths.log_dir={tmp_path}",
        "hydra.sweeper.n_trials=2", "trainer.max_epochs=-1", "trainer.max_steps=6", "trainer.val_check_interval=2",
        "~hydra.sweeper.pruner", "+hydra.sweeper.pruner={_target_:tests.helpers.PruneTrials,trials:[2],step:4}",
    ]
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAt", "+callbacks.crash.step=3", "+callbacks.crash.how=term"]
    first = _search([*args, *crash], tmp_path)
    assert first.returncode == 143, first.stderr[-3000:]
    sweep = tmp_path / "search" / "pixel_contrast"
    study = optuna.load_study(study_name="pixel_contrast", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    cut_step = read_progress(sweep / "trial_0" / "checkpoints" / "last.ckpt")[0]
    # the signal came at the start of step 3's batch: that step, and the validation due after it
    # (val_check_interval=2), end before the run stops
    assert cut_step == 4

    second = _search(args, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = optuna.load_study(study_name="pixel_contrast", storage=f"sqlite:///{sweep}/optuna.db").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED]
    cut, continued, pruned = trials
    assert continued.params == cut.params and continued.system_attrs["failed_trial"] == 0
    assert pruned.params != cut.params  # the continued study's sampler does not replay its first draws
    log = second.stdout + second.stderr
    assert f"resuming from {sweep / 'trial_0' / 'checkpoints' / 'last.ckpt'} (step {cut_step})" in log
    assert sorted(cut.intermediate_values) == [2, 4] and sorted(continued.intermediate_values) == [6]
    metrics = json.loads((sweep / "trial_1" / "metrics.json").read_text())
    assert continued.value == pytest.approx(metrics["val/mIoU_best"])
    assert continued.intermediate_values[6] == pytest.approx(metrics["val/mIoU_best"])
    # pruned at step 4: training stopped there, and the trial was not evaluated again
    assert pruned.user_attrs["pruned_at_step"] == 4 and sorted(pruned.intermediate_values) == [2, 4]
    assert read_progress(sweep / "trial_2" / "checkpoints" / "last.ckpt")[0] == 4
    assert "search trial 2 pruned at step 4: not evaluated again" in log
    assert (sweep / "trials.csv").read_text().count("\n") == 4
    assert "best_trial: 1" in (sweep / "optimization_results.yaml").read_text()


@pytest.mark.parametrize("sweep_file", sorted((Path(__file__).parents[1] / "scripts" / "sweeps").glob("*.yaml")))
def test_wandb_sweep_command_composes(sweep_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's command line for one parameter set, rendered by W&B's own agent code (macro
    expansion of ${env} and ${args_no_hyphens}), composes with Hydra to those values."""
    import yaml
    from wandb import wandb_agent

    sweep = yaml.safe_load(sweep_file.read_text())
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name in ("WANDB_SWEEP_PARAM_PATH", "WANDB_RUN_ID"):  # the agent sets these: put them back after
        monkeypatch.setenv(name, "")
    launched: list[list[str]] = []

    class Recorder:
        def __init__(self, command: list[str] | None = None, **_: object) -> None:
            launched.append(command)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="test")
    agent._sweep_command = list(sweep["command"])
    values = {}
    for key, spec in sweep["parameters"].items():
        values[key] = spec["values"][-1] if "values" in spec else (spec["min"] * 2 + spec["max"]) / 3
    agent._command_run({"run_id": "r1", "program": "segcon-train", "args": {k: {"value": v} for k, v in values.items()}})
    (command,) = launched
    assert command[:2] == ["/usr/bin/env", "segcon-train"]
    cfg = compose_train(command[2:])
    for key, value in values.items():
        assert OmegaConf.select(cfg, key) == pytest.approx(value), key
    assert cfg.logger.wandb.offline is False


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "trials"), [("local", 2), ("submitit_local", 1)])  # submitit jobs are slow
def test_failed_trials_are_recorded_and_a_search_where_all_fail_says_so(
    launcher: str, trials: int, data_dir: Path, tmp_path: Path
) -> None:
    """A trial that ends with a user error (here: no dataset at data.root) is a failed trial, not
    the end of the search - in this process (a SystemExit) or as a submitit job (a failed job);
    when every trial failed, the search exits non-zero with the last error."""
    args = [*tiny_overrides(data_dir), "hparams_search=pixel_contrast", f"paths.log_dir={tmp_path}",
            f"hydra.sweeper.n_trials={trials}", f"launcher={launcher}", f"data.root={tmp_path}/missing",
            "data.prepare=null"]
    out = _search(args, tmp_path)
    assert out.returncode != 0
    assert f"every trial failed ({trials} this run)" in out.stderr and "missing" in out.stderr
    study = optuna.load_study(study_name="pixel_contrast", storage=f"sqlite:///{tmp_path}/search/pixel_contrast/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * trials
