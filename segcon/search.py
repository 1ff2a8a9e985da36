"""Hyper-parameter search with Optuna: the search space, the study, and the trial's side.

    segcon-train -m hparams_search=pixel_contrast                 # 8 trials, pruned, resumable
    segcon-train -m hparams_search=pixel_contrast hydra.sweeper.n_trials=20 \\
        hydra.sweeper.storage=postgresql://user@host/db           # a study shared by machines

The sweeper (`hydra_plugins/segcon_optuna_sweeper`) asks Optuna for each trial's parameters and
runs the trial through Hydra's configured launcher (in this process, or a SLURM job with
`launcher=slurm`), as any run. A trial reports its validation metric to the study's storage at
every validation and stops when the study's pruner says so (`TrialReporter`); the pruner's
settings are kept in the study, so a trial on another machine prunes by the same rule. The
study lives in a database (SQLite file by default): a search that is interrupted continues
where it stopped when the same command is run again, and a trial that was cut off is run again
from its last checkpoint.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from segcon.utils.errors import ConfigError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

PRUNED_ATTR = "pruned_at_step"
"""Trial user attribute a pruned trial's run sets (the global step it stopped at)."""
RUN_DIR_ATTR = "run_dir"
"""Trial user attribute: the trial's run directory (where a retry finds its checkpoint)."""
SETTINGS_ATTR = "segcon_settings"
"""Study user attribute: the search's settings (direction, pruner, space, metric) as created."""


def distribution(key: str, value: Any) -> BaseDistribution:
    """The Optuna distribution of one search-space entry written in Hydra's sweep syntax.

    `interval(a, b)` is a float range, `tag(log, interval(a, b))` a log-uniform one,
    `tag(int, interval(a, b))` (and `tag(int, log, ...)`) an int range with b included;
    `range(a, b[, step])` an int range (b excluded, as in Python);
    `choice(x, y, ...)` or `x,y,...` a categorical choice.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    try:
        override = OverridesParser.create().parse_overrides([f"{key}={text}"])[0]
    except Exception as err:
        raise ConfigError(f"search space {key}={text}: not a sweep in Hydra's syntax ({err})") from None
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(sweep, IntervalSweep):
        log = "log" in sweep.tags
        if "int" in sweep.tags:
            return IntDistribution(int(sweep.start), int(sweep.end), log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if sweep.shuffle or not values or not all(isinstance(v, int) for v in values):
            return CategoricalDistribution(values)
        step = int(sweep.step or 1)
        return IntDistribution(min(values), max(values), step=abs(step))
    raise ConfigError(
        f"search space {key}={text}: give interval(a, b), tag(log, interval(a, b)), range(a, b) or "
        "choice(x, y, ...); a fixed value belongs in the run's overrides, not in the search space"
    )


def split_arguments(arguments: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Command-line overrides of a search: (fixed overrides, sweep overrides by key). A sweep on
    the command line (`contrast.pixel.weight=interval(0.01,1)`, `seed=1,2`) joins the space."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed: list[str] = []
    swept: dict[str, str] = {}
    for arg, override in zip(arguments, OverridesParser.create().parse_overrides(list(arguments)), strict=True):
        if override.is_sweep_override():
            swept[override.get_key_element()] = arg.split("=", 1)[1]
        else:
            fixed.append(arg)
    return fixed, swept


def format_override(key: str, value: Any) -> str:
    """`key=value` that Hydra's override parser reads back as `value` (strings quoted)."""
    if isinstance(value, str):
        return f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
    if isinstance(value, float) and math.isfinite(value):
        return f"{key}={value!r}"
    return f"{key}={value}"


def open_study(
    name: str,
    storage_url: str,
    *,
    direction: str = "maximize",
    sampler: Any = None,
    settings: Mapping[str, Any] | None = None,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = None,
) -> optuna.Study:
    """Create the study, or load it when it exists (a resumed or shared search).

    `settings` (direction, pruner, space, metric) are stored in a new study; an existing study
    created with other settings is refused with the differences named, so two searches cannot
    mix their trials. With `heartbeat_interval`, a trial whose run stops sending heartbeats for
    `grace_period` seconds (a killed process or node) is failed and queued again (at most
    `max_retry` times) with the same parameters.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if storage_url.startswith("sqlite:///"):
        Path(storage_url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        kwargs = {
            "heartbeat_interval": int(heartbeat_interval),
            "grace_period": int(grace_period) if grace_period else None,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
        }
    storage = RDBStorage(storage_url, engine_kwargs=_engine_kwargs(storage_url), **kwargs)
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction=direction, load_if_exists=True
    )
    if settings is not None:
        wanted = _plain(settings)
        saved = study.user_attrs.get(SETTINGS_ATTR)
        if saved is None:
            study.set_user_attr(SETTINGS_ATTR, wanted)
        elif saved != wanted:
            diff = [f"{k}: {saved.get(k)!r} in the study, {wanted.get(k)!r} now" for k in sorted(set(saved) | set(wanted))
                    if saved.get(k) != wanted.get(k)]
            raise ConfigError(
                f"study '{name}' in {storage_url} was created with other search settings ({'; '.join(diff)}). "
                "Continue it with its own settings, or start another study (hydra.sweeper.study_name=...)."
            )
    return study


def _engine_kwargs(url: str) -> dict[str, Any]:
    """SQLite waits for a lock held by another trial's process instead of failing at once."""
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def _plain(node: Any) -> Any:
    """A JSON-storable copy of a config value (DictConfig, tuples and all)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node


def make_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """The pruner a `{_target_: optuna.pruners..., ...}` spec describes (no pruning for None)."""
    import optuna

    from segcon.utils.targets import instantiate

    if not spec:
        return optuna.pruners.NopPruner()
    pruner = instantiate(dict(spec), "hydra.sweeper.pruner")
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise ConfigError(f"hydra.sweeper.pruner: {spec.get('_target_')} is not an Optuna pruner")
    return pruner


class Heartbeat:
    """Records heartbeats of running trials every `interval` seconds (in a thread), so a study
    can tell a running trial from one whose process died."""

    def __init__(self, storage: Any, trial_ids: Iterable[int], interval: int) -> None:
        self.storage, self.trial_ids, self.interval = storage, list(trial_ids), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for trial_id in self.trial_ids:
                self.storage.record_heartbeat(trial_id)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class TrialReporter(Callback):
    """The trial's side of a search: at each validation, report `monitor` at the global step to
    the study and stop training when the study's pruner prunes the trial.

    Rank 0 alone talks to the storage; its decision is broadcast, so every rank stops at the same
    step. A pruned run writes the step into the trial (`pruned_at_step`) for the sweeper, and is
    not evaluated again at the end (`pruned`).
    """

    def __init__(self, storage: str, study: str, trial: int, monitor: str) -> None:
        self.storage_url, self.study_name, self.number, self.monitor = storage, study, int(trial), monitor
        self.pruned = False
        self._study: optuna.Study | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.global_rank != 0 or self._study is not None:
            return
        import optuna

        self._study = optuna.load_study(
            study_name=self.study_name,
            storage=optuna.storages.RDBStorage(self.storage_url, engine_kwargs=_engine_kwargs(self.storage_url)),
        )
        storage = self._study._storage
        self._trial_id = storage.get_trial_id_from_study_id_trial_number(self._study._study_id, self.number)
        self._pruner = make_pruner(self._study.user_attrs.get(SETTINGS_ATTR, {}).get("pruner"))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        prune = False
        if trainer.global_rank == 0:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise ConfigError(
                    f"optimized_metric: '{self.monitor}' is not logged at validation (logged: "
                    f"{', '.join(sorted(k for k in trainer.callback_metrics if k.startswith('val/')))})"
                )
            storage = self._study._storage
            storage.set_trial_intermediate_value(self._trial_id, trainer.global_step, float(value))
            prune = bool(self._pruner.prune(self._study, storage.get_trial(self._trial_id)))
            if prune:
                storage.set_trial_user_attr(self._trial_id, PRUNED_ATTR, trainer.global_step)
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned = True
            trainer.should_stop = True


def trial_reporter(cfg: DictConfig) -> TrialReporter | None:
    """The reporter of a run started as a search trial (`search.trial` set by the sweeper)."""
    search = cfg.get("search") or {}
    if search.get("trial") is None:
        return None
    return TrialReporter(str(search.storage), str(search.study), int(search.trial), str(cfg.optimized_metric))


def trials_table(study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of every trial: number, state, value, pruned step, parameters, retry of."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({p for t in trials for p in t.params})
    header = ["trial", "state", "value", "pruned at step", *names, "retry of"]
    rows = []
    for t in trials:
        value = "" if t.value is None else f"{t.value:.4f}"
        pruned = str(t.user_attrs.get(PRUNED_ATTR, ""))
        params = [_short(t.params[n]) if n in t.params else "" for n in names]
        rows.append([str(t.number), t.state.name, value, pruned, *params, str(t.system_attrs.get("failed_trial", ""))])
    return header, rows


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

