"""Control code, tested the way the losses are: each test builds a small case where a plausible
one-line bug changes the answer (named in its docstring), with no training run. Covered here: the
set criterion's matching, the resume settings check and checkpoint discovery, the search study
(direction, pruning, settings guard, retried trials, the trial reporter), the agreed stop under
DDP, the resumable sampler, split generation and the W&B group / sweep overrides."""

from __future__ import annotations

import builtins
import copy
import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hydra_plugins.segcon_optuna_sweeper.segcon_optuna_sweeper import SegconOptunaSweeper
from segcon.data.sampling import ResumableSampler
from segcon.data.splits import LABELED, META, UNLABELED, labeled_count, make_split, write_split
from segcon.engine.callbacks import StopTogether
from segcon.objectives.set_loss import SetCriterion, mask_costs, semantic_targets
from segcon.resume import (
    FREE_KEYS,
    checkpoint_if_any,
    differing_settings,
    newest_checkpoint,
    resolve_checkpoint,
    resume_checkpoint,
)
from segcon.search import (
    PRUNED_ATTR,
    TrialReporter,
    format_override,
    make_pruner,
    open_study,
)
from segcon.utils.checkpoint import find_checkpoint
from segcon.utils.errors import ConfigError
from segcon.utils.loggers import wandb_group

SPACE = {"x": FloatDistribution(0.0, 1.0)}
MEDIAN = {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": 2, "n_warmup_steps": 0}


def _checkpoint(path: Path, step: int, epoch: int = 0, config: dict[str, Any] | None = None) -> Path:
    """A small checkpoint file as read_progress / read_segcon_state read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt: dict[str, Any] = {"global_step": step, "epoch": epoch}
    if config is not None:
        ckpt["segcon"] = {"config": config}
    torch.save(ckpt, path)
    return path


# -- the set criterion's matching -----------------------------------------------------------


def test_the_matcher_gives_each_target_the_query_that_prefers_its_class() -> None:
    """Catches the class cost's sign flipped in `SetCriterion.match` (`-c_class * prob` ->
    `+c_class * prob`): two queries with the same mask logits, query 0 preferring class 1 and
    query 1 class 0, against an image holding classes 0 and 1.

    By hand: the mask costs are equal in each target's column, so only the class cost decides.
    Class cost `-p_q[c_t]`: [[-0.1, -0.8], [-0.8, -0.1]] (rows queries, columns targets 0, 1);
    query 0 -> target 0 with query 1 -> target 1 costs -0.2, the swap costs -1.6: the matching
    is target 0 (class 0) -> query 1, target 1 (class 1) -> query 0.
    """
    probs = torch.tensor([[[0.1, 0.8, 0.1], [0.8, 0.1, 0.1]]], dtype=torch.float64)  # [B=1, N=2, K+1=3]
    mask_cls = probs.log()  # softmax gives the probabilities back
    g = torch.Generator().manual_seed(0)
    masks = torch.randn(1, 1, 2, 2, generator=g, dtype=torch.float64).expand(1, 2, 2, 2).contiguous()
    labels = torch.tensor([[[0, 0], [1, 1]]])
    target = semantic_targets(labels, 255, (2, 2), num_classes=2)
    assert target.present.tolist() == [[True, True]]
    focal, dice = mask_costs(masks.flatten(2), target)
    torch.testing.assert_close(focal[0, 0], focal[0, 1])  # equal masks: equal mask costs per target
    torch.testing.assert_close(dice[0, 0], dice[0, 1])

    (matching,) = SetCriterion(num_classes=2).match([(mask_cls, masks)], target)
    assert matching.matched.tolist() == [[True, True]] and matching.count == 2
    assert matching.query.tolist() == [[1, 0]]  # class 0 -> query 1, class 1 -> query 0
    assert matching.target_class.tolist() == [[1, 0]]


# -- resuming: the settings check and checkpoint discovery ----------------------------------


def test_differing_settings_names_added_and_removed_keys_and_honours_free_and_forced() -> None:
    """Catches the compared keys taken as an intersection (`old.keys() | new.keys()` ->
    `old.keys() & new.keys()`): a key only the checkpoint has, or only the run has, is a
    difference too. FREE_KEYS and `resume_force` (a key, or a group with its dot) leave keys out;
    groups other than model / data are not compared."""
    assert "data.root" in FREE_KEYS and "model.encoder_weights" in FREE_KEYS
    saved = {
        "model": {"name": "unet", "dropout": 0.1, "encoder_weights": "imagenet", "head": {"depth": 2}},
        "data": {"batch_size": 4, "root": "/a"},
        "optim": {"lr": 1.0},
    }
    current = {
        "model": {"name": "unet", "encoder_weights": None, "head": {"depth": 2, "width": 64}},
        "data": {"batch_size": 8, "root": "/b"},
        "optim": {"lr": 2.0},
    }
    assert differing_settings(saved, current) == [
        "model.dropout: 0.1 -> '<absent>'",
        "model.head.width: '<absent>' -> 64",
        "data.batch_size: 4 -> 8",
    ]
    assert differing_settings(saved, current, ["model.head.width", "data"]) == ["model.dropout: 0.1 -> '<absent>'"]
    assert differing_settings(saved, current, ["model.head"]) == ["model.dropout: 0.1 -> '<absent>'", "data.batch_size: 4 -> 8"]
    # a forced name is a key or a group, not a prefix of a key's name
    assert "model.dropout: 0.1 -> '<absent>'" in differing_settings(saved, current, ["model.drop"])
    assert differing_settings(saved, saved) == []


def test_the_checkpoint_with_most_steps_wins_and_last_ckpt_wins_a_tie(tmp_path: Path) -> None:
    """Catches `newest_checkpoint` preferring last.ckpt before the step count (a key of
    `(is_last, step)`: a stale last.ckpt beats a newer best checkpoint), and the tie-break
    dropped (`path.name == "last.ckpt"` -> `False`: then the name decides, and `step-...` sorts
    after `last`). Also: the `checkpoints/` folder itself may be given."""
    ckpts = tmp_path / "run" / "checkpoints"
    _checkpoint(ckpts / "last.ckpt", 8)
    _checkpoint(ckpts / "best-epoch003.ckpt", 12)
    assert newest_checkpoint(tmp_path / "run") == ckpts / "best-epoch003.ckpt"
    assert newest_checkpoint(ckpts) == ckpts / "best-epoch003.ckpt"

    tie = tmp_path / "tie"
    for name in ("best-epoch001.ckpt", "last.ckpt", "step-0012.ckpt"):
        _checkpoint(tie / name, 12)
    assert newest_checkpoint(tie) == tie / "last.ckpt"


def test_resolve_checkpoint_reads_last_a_run_dir_or_a_file(tmp_path: Path) -> None:
    """Catches `resolve_checkpoint` mixing up its three forms: `last` is the newest checkpoint of
    this run's own directory (not of the directory given elsewhere), a directory its newest, a
    file itself (even an older one), anything else a ConfigError; `checkpoint_if_any` is None
    where there is nothing readable (missing folder, only a broken file)."""
    own, other = tmp_path / "own", tmp_path / "other"
    _checkpoint(own / "checkpoints" / "last.ckpt", 5)
    older = _checkpoint(other / "checkpoints" / "best-epoch000.ckpt", 2)
    _checkpoint(other / "checkpoints" / "last.ckpt", 9)
    assert resolve_checkpoint("last", own) == own / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(str(other), own) == other / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(str(older), own) == older
    with pytest.raises(ConfigError, match="no such checkpoint file or run directory"):
        resolve_checkpoint(str(tmp_path / "nothing.ckpt"), own)

    assert checkpoint_if_any(own) == own / "checkpoints" / "last.ckpt"
    assert checkpoint_if_any(tmp_path / "missing") is None
    (tmp_path / "broken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "broken" / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="cannot be read as a checkpoint"):
        assert checkpoint_if_any(tmp_path / "broken") is None


def test_ckpt_path_auto_starts_fresh_or_resumes_and_checks_the_settings(tmp_path: Path) -> None:
    """Catches `resume_checkpoint`'s `auto` going wrong either way (resuming from nothing, or
    starting afresh although the run directory holds a checkpoint), and the settings check
    skipped for `auto`; `resume_force` accepts the named key."""
    run = tmp_path / "run"
    settings = {"model": {"name": "unet"}, "data": {"batch_size": 4}}
    cfg = OmegaConf.create({"ckpt_path": "auto", "paths": {"output_dir": str(run)}, **settings})
    assert resume_checkpoint(cfg) is None
    assert resume_checkpoint(OmegaConf.merge(cfg, {"ckpt_path": None})) is None
    ckpt = _checkpoint(run / "checkpoints" / "last.ckpt", 3, config=settings)
    assert resume_checkpoint(cfg) == str(ckpt)
    changed = OmegaConf.merge(cfg, {"data": {"batch_size": 2}})
    with pytest.raises(ConfigError, match=r"data\.batch_size: 4 -> 2.*resume_force=\[data\.batch_size\]"):
        resume_checkpoint(changed)
    assert resume_checkpoint(OmegaConf.merge(changed, {"resume_force": ["data.batch_size"]})) == str(ckpt)


def _metrics(run: Path, recorded: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps({"val/mIoU": 0.5, "val/checkpoint": str(recorded)}))


def test_find_checkpoint_takes_the_evaluated_checkpoint_also_of_a_moved_run(tmp_path: Path) -> None:
    """Catches `find_checkpoint` ignoring metrics.json's `val/checkpoint` (a single best-*
    would be taken instead of the recorded last.ckpt), and not looking for the recorded file
    under the run's own `checkpoints/` when the run directory was moved (candidates
    `(Path(recorded),)` only: the two best-* files are then an error)."""
    run = tmp_path / "run"
    _checkpoint(run / "checkpoints" / "best-epoch001.ckpt", 4)
    last = _checkpoint(run / "checkpoints" / "last.ckpt", 8)
    _metrics(run, last)
    assert find_checkpoint(run) == last

    moved = tmp_path / "moved"
    _checkpoint(moved / "checkpoints" / "best-epoch001.ckpt", 4)
    best = _checkpoint(moved / "checkpoints" / "best-epoch003.ckpt", 12)
    _metrics(moved, tmp_path / "where-it-ran" / "checkpoints" / best.name)
    assert find_checkpoint(moved) == best


def test_find_checkpoint_refuses_to_guess_between_best_checkpoints(tmp_path: Path) -> None:
    """Catches `find_checkpoint` picking one of several best-* checkpoints (e.g. the newest
    only, `sorted(...)[-1:]`) when nothing records which was evaluated; a single best-* wins
    over last.ckpt, last.ckpt is the fallback, a file is itself, an empty directory an error."""
    run = tmp_path / "run"
    last = _checkpoint(run / "checkpoints" / "last.ckpt", 8)
    assert find_checkpoint(run) == last
    best = _checkpoint(run / "checkpoints" / "best-epoch001.ckpt", 4)
    assert find_checkpoint(run) == best
    _checkpoint(run / "checkpoints" / "best-epoch002.ckpt", 6)
    with pytest.raises(ConfigError, match="several best checkpoints"):
        find_checkpoint(run)
    assert find_checkpoint(last) == last
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="directory without a checkpoint"):
        find_checkpoint(tmp_path / "empty")


# -- the search -------------------------------------------------------------------------------


def _completed(study: optuna.Study, values: list[float], step: int = 2) -> None:
    for value in values:
        trial = study.ask(SPACE)
        trial.report(value, step)
        study.tell(trial, value)


def test_a_maximised_study_prunes_the_worse_trial_and_keeps_the_better(tmp_path: Path) -> None:
    """Catches `open_study` not passing `direction` to optuna.create_study (the study then
    minimises): with completed trials at 0.6 / 0.7 / 0.8, the MedianPruner that `make_pruner`
    builds must prune a running trial at 0.1 and keep one at 0.9, and the best trial is the
    one at 0.8."""
    study = open_study("max", f"sqlite:///{tmp_path}/max.db", direction="maximize")
    pruner = make_pruner(MEDIAN)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    _completed(study, [0.6, 0.8, 0.7])
    worse, better = study.ask(SPACE), study.ask(SPACE)
    worse.report(0.1, 2)
    better.report(0.9, 2)
    assert pruner.prune(study, study._storage.get_trial(worse._trial_id))
    assert not pruner.prune(study, study._storage.get_trial(better._trial_id))
    assert study.best_trial.value == 0.8 and study.best_trial.number == 1
    assert study.direction == StudyDirection.MAXIMIZE


def test_a_reopened_study_with_other_settings_names_each_differing_key(tmp_path: Path) -> None:
    """Catches the settings guard of `open_study` naming only the keys the stored settings have
    (`set(saved) | set(wanted)` -> `set(saved)`): a key the new search adds (here `metric`) and
    a changed direction must both be named; equal settings load the study."""
    url = f"sqlite:///{tmp_path}/s.db"
    settings = {"direction": "maximize", "pruner": MEDIAN, "space": {"x": "interval(0, 1)"}}
    _completed(open_study("s", url, settings=settings), [0.5])
    assert len(open_study("s", url, settings=settings).trials) == 1
    with pytest.raises(ConfigError) as err:
        open_study("s", url, direction="minimize", settings={**settings, "direction": "minimize", "metric": "val/mIoU"})
    message = str(err.value)
    assert "direction: 'maximize' in the study, 'minimize' now" in message
    assert "metric: None in the study, 'val/mIoU' now" in message
    assert "space" not in message


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_second_retry_continues_the_newest_attempt_that_has_a_checkpoint(tmp_path: Path) -> None:
    """Catches the sweeper's `_overrides` walking the retry history oldest first (`reversed(...)`
    dropped): trial 0 failed with a checkpoint at step 3, its retry trial 1 continued it and
    failed at step 7, its retry trial 2 failed before any checkpoint. Trial 1 continues trial 0;
    trial 3 (history [0, 1, 2], as optuna's RetryHeartbeatStaleTrialCallback records it)
    continues trial 1's step-7 checkpoint, not trial 0's older one."""
    url = f"sqlite:///{tmp_path}/retry.db"
    study = open_study("retry", url)
    sweeper = SegconOptunaSweeper.__new__(SegconOptunaSweeper)
    sweeper.study_name = "retry"  # all of the sweeper that `_overrides` reads
    retry = RetryHeartbeatStaleTrialCallback()
    overrides = []
    for number, step in ((0, 3), (1, 7), (2, None)):
        trial = study.ask(SPACE)
        assert trial.number == number
        overrides.append(sweeper._overrides(study, trial, ["seed=1"], tmp_path, url))
        if step is not None:
            _checkpoint(tmp_path / f"trial_{number}" / "checkpoints" / "last.ckpt", step)
        study.tell(trial, state=TrialState.FAIL)
        retry(study, study._storage.get_trial(trial._trial_id))
    last = study.ask(SPACE)
    frozen = study._storage.get_trial(last._trial_id)
    assert frozen.system_attrs["retry_history"] == [0, 1, 2] and frozen.system_attrs["failed_trial"] == 0
    assert frozen.params == study.trials[0].params

    def ckpt(number: int) -> str:
        return format_override("ckpt_path", str(tmp_path / f"trial_{number}" / "checkpoints" / "last.ckpt"))

    out = sweeper._overrides(study, last, ["seed=1"], tmp_path, url)
    assert [o for o in out if o.startswith("ckpt_path=")] == [ckpt(1)]
    assert out[0] == "seed=1" and "++search.trial=3" in out and "hydra.sweep.subdir=trial_3" in out
    assert overrides[1][-1] == ckpt(0) and overrides[2][-1] == ckpt(1)
    assert not [o for o in overrides[0] if o.startswith("ckpt_path=")]  # a first attempt starts fresh


def _validating_trainer(rank: int, broadcast: Any, metrics: dict[str, Any], step: int = 4) -> SimpleNamespace:
    return SimpleNamespace(
        global_rank=rank, sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING), global_step=step,
        callback_metrics=metrics, should_stop=False, strategy=SimpleNamespace(broadcast=broadcast),
    )


def test_the_trial_reporter_prunes_by_the_studys_pruner_and_every_rank_stops(tmp_path: Path) -> None:
    """Catches `TrialReporter` acting on its own rank's decision instead of rank 0's broadcast
    (`if trainer.strategy.broadcast(prune, src=0):` -> `if prune:`): rank 1 never asks the
    study, so it must stop when rank 0's broadcast says so. Rank 0 reports the metric at the
    global step and is pruned by the pruner stored in the maximised study's settings."""
    url = f"sqlite:///{tmp_path}/r.db"
    study = open_study("r", url, direction="maximize", settings={"direction": "maximize", "pruner": MEDIAN})
    _completed(study, [0.6, 0.7], step=4)
    running = study.ask(SPACE)

    rank0 = _validating_trainer(0, lambda obj, src=0: obj, {"val/mIoU": torch.tensor(0.1)})
    reporter = TrialReporter(url, "r", running.number, "val/mIoU")
    reporter.setup(rank0, None, "fit")
    reporter.on_validation_end(rank0, None)
    assert rank0.should_stop and reporter.pruned
    frozen = study._storage.get_trial(running._trial_id)
    assert frozen.intermediate_values == {4: pytest.approx(0.1)} and frozen.user_attrs[PRUNED_ATTR] == 4

    rank1 = _validating_trainer(1, lambda obj, src=0: True, {})  # rank 0 decided to prune
    other = TrialReporter(url, "r", running.number, "val/mIoU")
    other.setup(rank1, None, "fit")
    other.on_validation_end(rank1, None)
    assert rank1.should_stop and other.pruned

    kept = _validating_trainer(1, lambda obj, src=0: False, {})
    TrialReporter(url, "r", running.number, "val/mIoU").on_validation_end(kept, None)
    assert not kept.should_stop


def test_sweep_overrides_read_back_as_the_values_they_were_made_from() -> None:
    """Catches `format_override` quoting every string with single quotes (a value holding a
    quote then does not parse) or not quoting at all (`'1e-3'` would come back a float,
    `'null'` None, `'a,b'` a sweep)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for value in ["1e-3", "null", "a,b", "it's", "resnet18", 3, 1e-05, 0.1, True]:
        text = format_override("k", value)
        (override,) = parser.parse_overrides([text])
        assert not override.is_sweep_override(), text
        assert override.value() == value and type(override.value()) is type(value), text


def test_the_wandb_group_of_an_empty_sweep_id_is_not_a_sweep(tmp_path: Path) -> None:
    """Catches `wandb_group` testing the sweep id against None (`if sweep_id is not None:`): an
    empty WANDB_SWEEP_ID (as an agent's environment may leave it) is no sweep; a multirun's
    group is its sweep directory relative to the log directory, a lone run's the dataset."""
    logs = tmp_path / "logs"
    assert wandb_group("", str(logs / "multiruns" / "m1"), str(logs), "voc") == "multiruns/m1"
    assert wandb_group("", None, str(logs), "voc") == "voc"
    assert wandb_group("s9", None, str(logs), "voc") == "sweep-s9"


# -- the agreed stop under DDP ------------------------------------------------------------------


class _Strategy:
    """A strategy whose boolean reduction runs over given per-rank flags: this process is rank 0
    (its flag is the decision passed in), `others` are the flags of ranks 1, 2, ..."""

    def __init__(self, others: list[bool]) -> None:
        self.others, self.calls = others, 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls += 1
        flags = [bool(decision), *self.others]
        return builtins.all(flags) if all else any(flags)


def _training_trainer(requested: bool, others: list[bool], accumulate: int = 1) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=1 + len(others), accumulate_grad_batches=accumulate, strategy=_Strategy(others),
        _signal_connector=SimpleNamespace(requested=requested, received_sigterm=False),
    )


@pytest.mark.parametrize(("requested", "others", "stop"), [
    (False, [True], True),  # another rank got SIGTERM: this one stops too
    (True, [False, False], True),
    (False, [False, False, False], False),
])
def test_every_rank_stops_when_any_rank_got_sigterm(requested: bool, others: list[bool], stop: bool) -> None:
    """Catches `StopTogether` reducing with "all ranks" (`all=False` -> `all=True`): rank 0
    without a signal must stop after the step in which another rank received SIGTERM (with
    "all" it goes on, and the rank that stopped waits in a collective until the timeout)."""
    trainer = _training_trainer(requested, others)
    StopTogether().on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.strategy.calls == 1
    assert trainer._signal_connector.received_sigterm is stop


def test_the_agreed_stop_waits_for_the_optimizer_step_and_skips_one_process() -> None:
    """Catches `StopTogether` deciding inside a gradient-accumulation group (the decision must
    come only after the batch that ends an optimizer step: batch_idx 1, 3, ... with 2 batches a
    step, e.g. `(batch_idx + 1)` -> `batch_idx`) and reducing in a one-process fit (nobody to
    agree with: the request decides, without a collective)."""
    trainer = _training_trainer(False, [True], accumulate=2)
    StopTogether().on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.strategy.calls == 0 and not trainer._signal_connector.received_sigterm
    StopTogether().on_train_batch_end(trainer, None, None, None, 1)
    assert trainer.strategy.calls == 1 and trainer._signal_connector.received_sigterm

    for requested in (True, False):
        alone = _training_trainer(requested, [])
        StopTogether().on_train_batch_end(alone, None, None, None, 0)
        assert alone.strategy.calls == 0 and alone._signal_connector.received_sigterm is requested


@pytest.mark.parametrize(("decided_before", "requested", "others", "stop"), [
    (True, False, [False], True),  # the step before the validation was the agreed stop
    (False, False, [True], True),  # another rank got the signal during the validation
    (False, True, [], True),  # one process, the signal came during the validation
    (False, False, [False], False),
])
def test_a_validation_in_a_fit_runs_to_its_end_before_the_agreed_stop(
    decided_before: bool, requested: bool, others: list[bool], stop: bool
) -> None:
    """Catches a stop decided inside a validation taking effect there (Lightning's validation
    loop stops at its next batch on `received_sigterm`: the run then ends without that
    validation's checkpoint) and a request that came during it being lost: during the validation
    the decision is held back, at its end it is the held one or a new agreed one."""
    from lightning.pytorch.trainer.states import TrainerFn

    trainer = _training_trainer(requested, others)
    trainer.state = SimpleNamespace(fn=TrainerFn.FITTING)
    trainer._signal_connector.received_sigterm = decided_before
    stopper = StopTogether()
    stopper.on_validation_start(trainer, None)
    assert trainer._signal_connector.received_sigterm is False
    stopper.on_validation_end(trainer, None)
    assert trainer._signal_connector.received_sigterm is stop
    assert trainer.strategy.calls == (1 if others else 0)


# -- the resumable sampler ----------------------------------------------------------------------


def test_resuming_after_an_epochs_last_full_batch_starts_the_next_epoch() -> None:
    """Catches `resume_at` comparing with `>` (or counting a partial last batch, ceil instead
    of floor): 5 draws in batches of 2 have 2 full batches (the fifth draw is dropped), so after
    2 batches the sampler is at the start of the next epoch, with no set_epoch call needed;
    after 1 batch it is at draw 2 of the same epoch."""
    fresh = ResumableSampler(5, 5, seed=3)
    fresh.set_epoch(1)
    next_epoch = list(fresh)
    done = ResumableSampler(5, 5, seed=3)
    done.resume_at(0, batches=2, batch_size=2)
    assert (done.epoch, done.start) == (1, 0)
    assert list(done) == next_epoch

    fresh.set_epoch(0)
    first_epoch = list(fresh)
    mid = ResumableSampler(5, 5, seed=3)
    mid.resume_at(0, batches=1, batch_size=2)
    assert list(mid) == first_epoch[2:]


def test_lightnings_set_epoch_of_the_resumed_epoch_keeps_the_position() -> None:
    """Catches `set_epoch` resetting the position whatever the epoch (`if epoch != self.epoch`
    dropped): Lightning calls set_epoch(e) before the resumed epoch e, which must not restart
    it; the epoch after it starts at its first draw."""
    whole = ResumableSampler(8, 8, seed=1)
    whole.set_epoch(2)
    epoch2 = list(whole)
    resumed = ResumableSampler(8, 8, seed=1)
    resumed.resume_at(2, batches=3, batch_size=2)
    resumed.set_epoch(2)
    assert list(resumed) == epoch2[6:]
    resumed.resume_at(2, batches=3, batch_size=2)
    resumed.set_epoch(3)
    assert resumed.start == 0 and len(list(resumed)) == 8


def test_two_ranks_resume_disjoint_items_with_their_own_augmentation_seeds() -> None:
    """Catches the augmentation seed of a draw missing the rank (`k * self.world_size +
    self.rank` -> `k`: rank 0 and rank 1 would augment their k-th items alike) and the streams
    of a run sharing one order (`self.stream` left out of the permutation's seed). 11 items on 2
    ranks: 5 draws each, one item dropped; resumed after a batch of 2, each rank continues its
    own draws, the two disjoint."""
    ranks = []
    for rank in (0, 1):
        whole = ResumableSampler(11, 11 // 2, rank, 2, seed=4)
        whole.set_epoch(1)
        draws = list(whole)
        resumed = ResumableSampler(11, 11 // 2, rank, 2, seed=4)
        resumed.resume_at(1, batches=1, batch_size=2)
        assert list(resumed) == draws[2:]
        ranks.append(draws)
    indices = [i for draws in ranks for i, _ in draws]
    seeds = [s for draws in ranks for _, s in draws]
    assert len(set(indices)) == 10 and len(set(seeds)) == 10

    labeled, unlabeled = ResumableSampler(11, 11, seed=4, stream=0), ResumableSampler(11, 11, seed=4, stream=1)
    assert labeled.order(0) != unlabeled.order(0)


# -- split generation -----------------------------------------------------------------------------

IDS = [f"img_{i:03d}" for i in range(40)]


def test_a_split_is_the_seeded_shuffle_of_the_sorted_pool() -> None:
    """Catches a split that depends on anything but the seed and the set of ids (e.g. the pool
    taken in set order, `sorted(set(...))` -> `list(set(...))`, which changes with
    PYTHONHASHSEED): the labeled ids are the first n of the sorted ids shuffled by
    `random.Random(seed)`. All of the pool may be labeled (`1/1`), not more."""
    order = sorted(IDS)
    random.Random(7).shuffle(order)
    split = make_split(list(reversed(IDS)), 5, seed=7)
    assert split.labeled == tuple(sorted(order[:5]))
    assert split.unlabeled == tuple(sorted(order[5:]))
    everything = make_split(IDS, labeled_count("1/1", len(IDS)), seed=0)
    assert everything.labeled == tuple(IDS) and everything.unlabeled == ()
    with pytest.raises(ConfigError, match="cannot draw 41 labeled images from a pool of 40"):
        make_split(IDS, 41, seed=0)


@pytest.mark.parametrize("present", [LABELED, UNLABELED, META])
def test_a_split_is_not_written_over_any_existing_split_file(present: str, tmp_path: Path) -> None:
    """Catches `write_split` checking only some of its files (`targets` -> `targets[:1]`): any
    one of labeled.txt, unlabeled.txt and split.json already there refuses the write, and
    nothing is written."""
    out = tmp_path / "split"
    out.mkdir()
    (out / present).write_text("kept\n")
    with pytest.raises(ConfigError, match=f"split files already exist: {out / present}"):
        write_split(make_split(IDS, 4, seed=0), out)
    assert sorted(p.name for p in out.iterdir()) == [present] and (out / present).read_text() == "kept\n"


# -- resuming an epoch-end checkpoint --------------------------------------------------------------


def _fit_loop(epoch: dict[str, int], batches: dict[str, int], last: bool) -> dict[str, Any]:
    counts = ("ready", "started", "processed", "completed")
    return {"epoch_progress": {"current": dict(zip(counts, [epoch[k] for k in counts], strict=True)),
                               "total": dict(zip(counts, [epoch[k] for k in counts], strict=True))},
            "epoch_loop.batch_progress": {"current": dict(batches), "total": dict(batches), "is_last_batch": last}}


@pytest.mark.parametrize(("epoch", "last", "rewritten"), [
    # saved in on_train_epoch_end after epoch 0's validation: processed, not yet completed
    ({"ready": 1, "started": 1, "processed": 1, "completed": 0}, True, True),
    # saved by a signal once epoch 0 had ended
    ({"ready": 1, "started": 1, "processed": 1, "completed": 1}, True, True),
    # saved at the validation of epoch 0's last batch, before the epoch's end: Lightning's own case
    ({"ready": 1, "started": 1, "processed": 0, "completed": 0}, True, False),
    # saved mid-epoch
    ({"ready": 2, "started": 2, "processed": 1, "completed": 1}, False, False),
])
def test_an_ended_epochs_loop_state_becomes_the_next_epochs_start(
    epoch: dict[str, int], last: bool, rewritten: bool
) -> None:
    """Catches `start_next_epoch` missing either state of an ended epoch (saved in its end hooks,
    or after them by a signal) or touching another state: an ended epoch's state becomes
    "epoch completed, no batch of the next one yet" (the totals keep their counts); every other
    state is left as saved."""
    from segcon.engine.callbacks import start_next_epoch

    batches = {"ready": 4, "started": 4, "processed": 4, "completed": 4 if last else 3}
    state = _fit_loop(epoch, batches, last)
    before = copy.deepcopy(state)
    assert start_next_epoch(state) is rewritten
    if not rewritten:
        assert state == before
        return
    for which in ("current", "total"):
        assert state["epoch_progress"][which] == {**epoch, "completed": epoch["processed"]}
    assert state["epoch_loop.batch_progress"] == {"current": dict.fromkeys(batches, 0), "total": batches,
                                                  "is_last_batch": False}


def test_the_agreed_stop_rides_on_the_modules_own_reduction_when_it_has_one() -> None:
    """Catches StopTogether reducing again after a segcon module's step (a second collective and
    host read per step): the module's `stop_agreed` (the any-rank request, read with its
    divergence check) decides, without a call to the strategy."""
    for agreed in (True, False):
        trainer = _training_trainer(False, [not agreed])  # the strategy would say the opposite
        StopTogether().on_train_batch_end(trainer, SimpleNamespace(stop_agreed=agreed), None, None, 0)
        assert trainer.strategy.calls == 0 and trainer._signal_connector.received_sigterm is agreed
