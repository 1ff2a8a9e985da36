"""segcon's Optuna sweeper for Hydra: `hydra/sweeper=segcon_optuna` (set by `hparams_search=...`).

Why segcon has its own: hydra-optuna-sweeper 1.3.0 (the newest stable release for Hydra 1.3)
requires optuna<3 and SQLAlchemy 1.3 and cannot prune; its 1.4 candidates need Hydra 1.4. This
one drives a current Optuna through its ask/tell interface and keeps what users know from it:
the `hydra.sweeper.params` syntax (interval / tag(log, interval) / range / choice), sweeps on the
command line joining the space, the task's return value (`optimized_metric`) as the objective.
It adds pruning from the trials' validation metric, a study that survives interruption (and can
be shared by several machines through any database URL Optuna accepts), and trials run through
whatever launcher Hydra is configured with. The work is in `segcon.search`.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from segcon.utils.errors import ConfigError

log = logging.getLogger(__name__)

class SegconOptunaSweeper(Sweeper):
    """Runs `n_trials` trials of an Optuna study, `n_jobs` at a time, through Hydra's launcher."""

    def __init__(
        self,
        study_name: str,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: Any,
        pruner: Any,
        params: Any,
        heartbeat_interval: int,
        grace_period: int,
        max_retry: int | None,
        max_failures: int | None,
    ) -> None:
        super().__init__()
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.params = dict(params or {})
        self.heartbeat_interval, self.grace_period, self.max_retry = heartbeat_interval, grace_period, max_retry
        self.max_failures = int(max_failures) if max_failures is not None else self.n_trials

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        import optuna
        from optuna.storages import fail_stale_trials
        from optuna.trial import TrialState

        from segcon import search
        from segcon.train import INTERRUPTED_STATUSES
        from segcon.utils.targets import instantiate

        # heartbeats and stale-trial retries are used through ask/tell here, as designed for
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).expanduser().resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        fixed, swept = search.split_arguments(arguments)
        space_text = {**{k: str(v) for k, v in self.params.items()}, **swept}
        if not space_text:
            raise ConfigError("hydra.sweeper.params is empty: name the keys to search (see conf/hparams_search/)")
        space = {k: search.distribution(k, v) for k, v in space_text.items()}
        # Every key must exist in the composed config before the study is touched.
        self.validate_batch_is_legal([[*fixed, *(search.format_override(k, _first(d)) for k, d in space.items())]])

        storage_url = self.storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
        pruner = OmegaConf.to_container(self.pruner_cfg, resolve=True) if self.pruner_cfg else None
        search.make_pruner(pruner)  # the trials build it from the study: check it here, once
        settings = {"direction": self.direction, "pruner": pruner, "space": space_text,
                    "metric": str(self.config.get("optimized_metric"))}
        study = search.open_study(
            self.study_name, storage_url, direction=self.direction, settings=settings,
            heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period, max_retry=self.max_retry,
        )
        if self.sampler_cfg:
            sampler_cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
            if sampler_cfg.get("seed") is not None and study.trials:
                # a continued study: a sampler seeded as at its start would replay its first suggestions
                sampler_cfg["seed"] = int(sampler_cfg["seed"]) + len(study.trials)
            study.sampler = instantiate(sampler_cfg, "hydra.sweeper.sampler")
        log.info(f"study '{self.study_name}' in {storage_url}: {len(study.trials)} trial(s) so far")
        returns: list[JobReturn] = []
        failures = 0
        while failures < self.max_failures:
            fail_stale_trials(study)
            counted = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                          for t in study.get_trials(deepcopy=False))
            size = min(self.n_jobs, self.n_trials - counted)
            if size <= 0:
                break
            trials = [study.ask(space) for _ in range(size)]
            batch = [self._overrides(study, t, fixed, sweep_dir, storage_url) for t in trials]
            storage = study._storage
            try:
                beat = (search.Heartbeat(storage, [t._trial_id for t in trials], self.heartbeat_interval)
                        if self.heartbeat_interval else nullcontext())
                with beat:
                    results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except (SystemExit, KeyboardInterrupt) as stop:
                if isinstance(stop, SystemExit) and stop.code not in INTERRUPTED_STATUSES:
                    # a trial's own error in an in-process launcher (e.g. a diverged run): this
                    # batch's trials fail, the search goes on
                    failures += self._fail(study, trials, str(stop.code))
                    continue
                self._hand_back(study, trials)
                raise
            except Exception as err:
                # a launcher that reports a job which died (submitit: a trial's error ends its job)
                failures += self._fail(study, trials, f"{type(err).__name__}: {err}")
                continue
            for trial, result in zip(trials, results, strict=True):
                failures += self._tell(study, trial, result)
            returns.extend(results)
        self._report(study, sweep_dir)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if failures and TrialState.COMPLETE not in states and TrialState.PRUNED not in states:
            errors = [t.user_attrs.get("error", "") for t in study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
            raise ConfigError(f"study '{self.study_name}': every trial failed ({failures} this run); the last error: "
                              f"{errors[-1] if errors else '?'}")
        return returns

    def _overrides(self, study: Any, trial: Any, fixed: list[str], sweep_dir: Path, storage_url: str) -> list[str]:
        """The trial's command line: fixed overrides, its parameters, where it reports, and (for a
        retried trial) the checkpoint of the run it replaces."""
        from segcon import search
        from segcon.resume import checkpoint_if_any

        run_dir = sweep_dir / f"trial_{trial.number}"
        study._storage.set_trial_user_attr(trial._trial_id, search.RUN_DIR_ATTR, str(run_dir))
        out = [*fixed, *(search.format_override(k, v) for k, v in trial.params.items())]
        out += [search.format_override("++search.storage", storage_url),
                search.format_override("++search.study", self.study_name),
                f"++search.trial={trial.number}", f"hydra.sweep.subdir=trial_{trial.number}"]
        history = study._storage.get_trial(trial._trial_id).system_attrs.get("retry_history", [])
        for number in reversed(history):
            earlier = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, number)).user_attrs.get(search.RUN_DIR_ATTR)
            ckpt = checkpoint_if_any(Path(earlier)) if earlier else None
            if ckpt is not None:
                log.info(f"trial {trial.number} continues trial {number} from {ckpt}")
                out.append(search.format_override("ckpt_path", str(ckpt)))
                break
        return out

    def _fail(self, study: Any, trials: list[Any], error: str) -> int:
        """Record the still running trials of a batch that failed as a whole; how many."""
        from optuna.trial import TrialState

        failed = [t for t in trials if study._storage.get_trial(t._trial_id).state == TrialState.RUNNING]
        for t in failed:
            study._storage.set_trial_user_attr(t._trial_id, "error", error[-2000:])
            study.tell(t, state=TrialState.FAIL)
        log.error(f"trial(s) {[t.number for t in failed]} failed: {error[-2000:]}")
        return len(failed)

    def _tell(self, study: Any, trial: Any, result: JobReturn) -> int:
        """Record one finished trial; 1 if it failed."""
        from optuna.trial import TrialState

        from segcon import search

        if result.status != JobStatus.COMPLETED:
            study._storage.set_trial_user_attr(trial._trial_id, "error", repr(result._return_value))
            study.tell(trial, state=TrialState.FAIL)
            log.error(f"trial {trial.number} failed: {result._return_value!r}")
            return 1
        frozen = study._storage.get_trial(trial._trial_id)
        if search.PRUNED_ATTR in frozen.user_attrs:
            study.tell(trial, state=TrialState.PRUNED)
            return 0
        value = result.return_value
        if value is None or not math.isfinite(float(value)):
            study._storage.set_trial_user_attr(trial._trial_id, "error", f"objective {value!r}")
            study.tell(trial, state=TrialState.FAIL)
            log.error(f"trial {trial.number} returned {value!r} for {self.config.get('optimized_metric')}")
            return 1
        study.tell(trial, float(value))
        return 0

    def _hand_back(self, study: Any, trials: list[Any]) -> None:
        """The search itself is stopping (a signal, Ctrl-C): its running trials are failed and
        queued again, so the next run of the command continues them from their checkpoints."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        retry = RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)
        for t in trials:
            if study._storage.get_trial(t._trial_id).state == TrialState.RUNNING:
                study.tell(t, state=TrialState.FAIL)
                retry(study, study._storage.get_trial(t._trial_id))
        log.warning(f"search interrupted: trial(s) {[t.number for t in trials]} queued to continue when it is run again")

    def _report(self, study: Any, sweep_dir: Path) -> None:
        """trials.csv, trials.md and optimization_results.yaml in the sweep directory."""
        import csv

        from optuna.trial import TrialState

        from segcon import search
        from segcon.evaluation.sweep import markdown

        header, rows = search.trials_table(study)
        with open(sweep_dir / "trials.csv", "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
        table = markdown(header, rows)
        (sweep_dir / "trials.md").write_text(table + "\n")
        done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
        results: dict[str, Any] = {"study": self.study_name, "trials": counts}
        if done:
            results.update(best_trial=study.best_trial.number, best_value=study.best_value,
                           best_params=dict(study.best_params))
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
        log.info(f"{self.study_name}:\n{table}\n{OmegaConf.to_yaml(OmegaConf.create(results))}")


def _first(dist: Any) -> Any:
    """A value inside a distribution (to check that its key composes)."""
    from optuna.distributions import CategoricalDistribution

    return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low
