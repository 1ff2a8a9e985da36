"""Exact resume: a run that crashes at any step and is resumed from its last checkpoint ends with
the weights and metrics of the run that never stopped (same seed, same machine, CPU); the pieces
that make it so (position-determined draws, the loader's saved position, checkpoint choice and
the settings check); bad training files stopped or skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from segcon.data.sampling import ResumableSampler, TrainItems
from segcon.utils.checkpoint import read_progress
from segcon.utils.errors import ConfigError, DataError
from tests.helpers import SimulatedCrash

# metrics.json entries that differ between any two runs (time, where the files are)
VOLATILE = ("wall_time_s", "val/checkpoint")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def _metrics(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if k not in VOLATILE}


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert _metrics(a) == _metrics(b)


RUNS = {
    # supervised, validation at epoch ends, 2 epochs of 4 batches
    "supervised": ["trainer.max_steps=-1", "trainer.max_epochs=2"],
    # a memory bank filled from every step (its content and pointer live in the state dict)
    "memory_bank": ["trainer.max_steps=-1", "trainer.max_epochs=2", "contrast=pixel_memory",
                    "contrast.pixel_memory.memory_size=50", "contrast.pixel_memory.warmup_steps=0",
                    "contrast.pixel_memory.pixel_update_freq=2", "sampler.max_views=20"],
    # teacher-student: EMA teacher, labeled stream cycled across epochs, CutMix draws,
    # step-based schedule with validation every 3 steps (mid-epoch)
    "fixmatch": ["experiment=ssl_synthetic", "debug=fast", "trainer.max_steps=8", "trainer.val_check_interval=3",
                 "data.unlabeled_batch_size=4"],
    # bounded by steps, validation at epoch ends (Lightning's epoch-end resume goes wrong here):
    # the memory bank with 4 batches an epoch, FixMatch with 3 (15 unlabeled images in batches of 4)
    "memory_bank_by_steps": ["trainer.max_steps=8", "trainer.max_epochs=-1", "contrast=pixel_memory",
                             "contrast.pixel_memory.memory_size=50", "contrast.pixel_memory.warmup_steps=0",
                             "contrast.pixel_memory.pixel_update_freq=2", "sampler.max_views=20"],
    "fixmatch_epoch_end": ["experiment=ssl_synthetic", "debug=fast", "trainer.max_steps=6", "data.unlabeled_batch_size=4",
                           "trainer.val_check_interval=1.0", "trainer.check_val_every_n_epoch=1"],
}
EVERY_STEP = ["callbacks.model_checkpoint.last_every_n_steps=1", "data.num_workers=0"]
AT_VALIDATIONS = ["callbacks.model_checkpoint.last_every_minutes=null", "data.num_workers=0"]
"""Checkpoints only where Lightning writes them: at validations (epoch ends or mid-epoch)."""


def _config(data_dir: Path, run: Path, kind: str, *extra: str, periodic: bool = True) -> DictConfig:
    from tests.conftest import compose_train, tiny_overrides

    writes = EVERY_STEP if periodic else AT_VALIDATIONS
    return compose_train([*tiny_overrides(data_dir), *writes, *RUNS[kind], *extra], output_dir=run)


@pytest.fixture(scope="module")
def whole_supervised(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted supervised run (in-process, no loader workers)."""
    from segcon.train import train

    run = tmp_path_factory.mktemp("whole") / "run"
    train(_config(data_dir, run, "supervised"))
    return run


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "crash_step", "periodic"), [
    ("memory_bank", 4, True), ("fixmatch", 4, True),
    # from the checkpoint of the epoch-end validation itself, in runs bounded by steps
    ("memory_bank_by_steps", 4, False), ("fixmatch_epoch_end", 3, False),
])
def test_a_crashed_run_resumed_from_last_ends_as_the_uninterrupted_run(
    kind: str, crash_step: int, periodic: bool, data_dir: Path, tmp_path: Path
) -> None:
    """Crashes right after an epoch's end and its validation (memory bank; FixMatch with
    `periodic=False`), and between two mid-epoch validations of a step-based run (FixMatch). With
    `periodic`, last.ckpt is written at the start of every step; without, the resumed checkpoint is
    the one the epoch-end validation wrote (supervised runs are below)."""
    from segcon.train import train

    whole = tmp_path / "whole"
    train(_config(data_dir, whole, kind, periodic=periodic))
    crashed = tmp_path / "crashed"
    with pytest.raises(SimulatedCrash):
        train(_config(data_dir, crashed, kind, "+callbacks.crash._target_=tests.helpers.CrashAt",
                      f"+callbacks.crash.step={crash_step}", periodic=periodic))
    saved = torch.load(crashed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # written at the start of the batch that crashed, or at the validation just before it
    assert saved["global_step"] in ((crash_step - 1, crash_step) if periodic else (crash_step,))
    train(_config(data_dir, crashed, kind, "ckpt_path=last", periodic=periodic))
    _assert_same_run(whole, crashed)


BY_STEPS = ["trainer.max_steps=12", "trainer.max_epochs=-1", "data.subset.train=8", "data.batch_size=2"]
"""A supervised run of 12 steps, 4 an epoch, validated at each epoch end."""


def _stop_and_resume(data_dir: Path, tmp_path: Path, whole: Path, name: str, crash: list[str], settings: list[str],
                     resume_from: str = "last") -> int:
    """Stop a run as `crash` says, resume it from `resume_from` (`last`, or a file name in its
    checkpoints/) and check it against `whole`; returns the step of the checkpoint resumed from."""
    from segcon.train import Interrupted, train

    stopped = tmp_path / name
    crash = ["+callbacks.crash._target_=tests.helpers.CrashAt", *crash]
    with pytest.raises((SimulatedCrash, Interrupted)):
        train(_config(data_dir, stopped, "supervised", *settings, *crash, periodic=False))
    if "+callbacks.crash.how=term" in crash:  # a validation due when the signal came ran to its end
        logged = (stopped / "csv" / "metrics.csv").read_text().splitlines()
        column = logged[0].split(",").index("val/mIoU")
        assert any(row.split(",")[column] for row in logged[1:])
    resumed = stopped if resume_from == "last" else tmp_path / f"{name}-resumed"
    source = stopped / "checkpoints" / ("last.ckpt" if resume_from == "last" else resume_from)
    step = read_progress(source)[0]
    train(_config(data_dir, resumed, "supervised", *settings, f"ckpt_path={source}", periodic=False))
    _assert_same_run(whole, resumed)
    return step


@pytest.mark.slow
def test_every_checkpoint_of_a_run_bounded_by_steps_resumes_exactly(data_dir: Path, tmp_path: Path) -> None:
    """From every checkpoint a step-bounded run writes around an epoch end: the one written at the
    epoch-end validation (as last.ckpt and as best-*.ckpt), and the one a SIGTERM leaves when it
    comes during that validation or in the step before it; the loader has two workers, which
    prefetch the next epoch before Lightning names it."""
    from segcon.train import train

    settings = [*BY_STEPS, "data.num_workers=2"]
    whole = tmp_path / "whole"
    train(_config(data_dir, whole, "supervised", *settings, periodic=False))
    assert _stop_and_resume(data_dir, tmp_path, whole, "killed", ["+callbacks.crash.step=4"], settings) == 4
    assert _stop_and_resume(data_dir, tmp_path, whole, "best", ["+callbacks.crash.step=4"], settings,
                            resume_from="best-epoch000.ckpt") == 4
    for name, crash in (("term-in-validation", ["+callbacks.crash.at_validation=true"]), ("term-before-it", [])):
        signal_at = 4 if crash else 3
        # the step the signal came in and the validation after it end before the run stops
        assert _stop_and_resume(data_dir, tmp_path, whole, name, [f"+callbacks.crash.step={signal_at}",
                                                                  "+callbacks.crash.how=term", *crash], settings) == 4


@pytest.mark.slow
def test_checkpoints_of_mid_epoch_validations_resume_exactly(data_dir: Path, tmp_path: Path) -> None:
    """Validation every 2 steps of 4-step epochs: a crash right after the mid-epoch validation of
    step 2 (its checkpoint), and SIGTERM during the mid-epoch validation of step 6 (the
    checkpoint of that step, written once the validation has ended)."""
    from segcon.train import train

    settings = [*BY_STEPS, "trainer.val_check_interval=2"]
    whole = tmp_path / "whole"
    train(_config(data_dir, whole, "supervised", *settings, periodic=False))
    assert _stop_and_resume(data_dir, tmp_path, whole, "killed", ["+callbacks.crash.step=2"], settings) == 2
    assert _stop_and_resume(data_dir, tmp_path, whole, "term", ["+callbacks.crash.step=6", "+callbacks.crash.how=term",
                                                                "+callbacks.crash.at_validation=true"], settings) == 6


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.run([sys.executable, "-m", "segcon.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(("how", "status"), [("kill", -9), ("term", 143)])
def test_kill_9_or_sigterm_then_ckpt_path_last_resumes_exactly(
    how: str, status: int, data_dir: Path, tmp_path: Path, whole_supervised: Path
) -> None:
    """A real process end: SIGKILL (nothing runs after it) or SIGTERM (finish the step, save, exit
    143); then `segcon-train ... ckpt_path=last hydra.run.dir=<the run>` resumes it in place. With
    two loader workers, against the uninterrupted run read without workers: the draws do not
    depend on the workers."""
    from tests.conftest import tiny_overrides

    args = [*tiny_overrides(data_dir), *EVERY_STEP, *RUNS["supervised"], "data.num_workers=2"]
    stopped = tmp_path / "stopped"
    proc = _cli([*args, f"hydra.run.dir={stopped}", "+callbacks.crash._target_=tests.helpers.CrashAt",
                 "+callbacks.crash.step=3", f"+callbacks.crash.how={how}"], tmp_path)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert not (stopped / "metrics.json").exists()
    before = (stopped / "csv" / "metrics.csv").read_text()
    proc = _cli([*args, f"hydra.run.dir={stopped}", "ckpt_path=last"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(whole_supervised, stopped)
    assert (stopped / "csv" / "metrics.csv").read_text() == before  # the first part's log is kept


@pytest.mark.slow
def test_a_signal_during_the_final_evaluation_exits_143(data_dir: Path, tmp_path: Path) -> None:
    """SIGTERM after the fit, in the evaluation of the chosen checkpoint: Lightning ends it with a
    SystemExit without a status, which alone exits 0 (a scheduler or a search would count a run
    with no evaluation as done); the run says what was interrupted and exits 143."""
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    proc = _cli([*tiny_overrides(data_dir), "trainer.max_steps=2", f"hydra.run.dir={run}",
                 "+callbacks.crash._target_=tests.helpers.CrashAt", "+callbacks.crash.step=0",
                 "+callbacks.crash.how=term", "+callbacks.crash.final_eval=true"], tmp_path)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "during the final evaluation of" in proc.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()


# -- the pieces ---------------------------------------------------------------------------


def _draws(sampler: ResumableSampler) -> list[tuple[int, int]]:
    return list(sampler)


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_sampler_continues_the_epoch_with_the_same_draws(world: int) -> None:
    for rank in range(world):
        full = ResumableSampler(10, 10 // world, rank, world, seed=3, stream=1)
        full.set_epoch(2)
        whole_epoch = _draws(full)
        assert len({seed for _, seed in whole_epoch}) == len(whole_epoch)  # one seed per draw
        resumed = ResumableSampler(10, 10 // world, rank, world, seed=3, stream=1)
        resumed.resume_at(2, batches=1, batch_size=2)
        assert _draws(resumed) == whole_epoch[2:]
        assert _draws(resumed) == whole_epoch  # the skip applies once
    # all of an epoch's batches done (the odd draw of a dropped last batch too): the next epoch
    nxt = ResumableSampler(5, 5, seed=3)
    nxt.resume_at(0, batches=2, batch_size=2)
    nxt.set_epoch(1)
    fresh = ResumableSampler(5, 5, seed=3)
    fresh.set_epoch(1)
    assert _draws(nxt) == _draws(fresh)


def test_an_item_is_a_function_of_its_draw_not_of_what_was_read_before(tmp_path: Path) -> None:
    from segcon.data.datamodule import SegDataModule
    from tests.fake_datasets import make_folder_dataset

    make_folder_dataset(tmp_path, num_classes=3, splits={"train": 4, "val": 1}, size=(40, 40))
    dm = SegDataModule(dataset={"_target_": "segcon.data.folder.FolderDataset"}, root=str(tmp_path),
                       splits={"train": "train", "val": "val"}, num_classes=3, ignore_index=255,
                       mean=[0.5] * 3, std=[0.25] * 3, num_workers=0, batch_size=2,
                       train_transform=[{"random_scale": {"min": 0.5, "max": 2.0}}, {"random_crop": {"size": 32}}])
    dm.setup("fit")
    items = TrainItems(dm.datasets["train"])
    first = items[(1, 77)]["image"]
    for other in ((0, 5), (3, 9), (1, 78)):
        items[other]
    assert torch.equal(items[(1, 77)]["image"], first)
    assert not torch.equal(items[(1, 78)]["image"], first)


def _corrupt_dataset(root: Path) -> Path:
    from tests.fake_datasets import make_folder_dataset

    make_folder_dataset(root, num_classes=3, splits={"train": 6, "val": 2}, size=(32, 32))
    bad = root / "images" / "train" / "train_0002.png"
    bad.write_bytes(b"not a png")
    return bad


def test_a_bad_training_file_stops_by_default_and_is_replaced_with_skip(tmp_path: Path) -> None:
    from segcon.data.base import SegDataset
    from segcon.data.folder import FolderDataset

    bad = _corrupt_dataset(tmp_path)
    ds = FolderDataset(tmp_path, "train", num_classes=3)
    assert isinstance(ds, SegDataset)
    with pytest.raises(DataError, match=str(bad)):
        TrainItems(ds)[(2, 0)]
    item = TrainItems(ds, skip_bad=True)[(2, 0)]
    assert item["id"] == "train_0003" and len(item["skipped"]) == 1 and str(bad) in item["skipped"][0]
    assert "skipped" not in TrainItems(ds, skip_bad=True)[(1, 0)]


@pytest.mark.slow
def test_a_run_with_skip_names_the_replaced_file_in_metrics_json(tmp_path: Path) -> None:
    from segcon.train import train
    from tests.conftest import compose_train

    bad = _corrupt_dataset(tmp_path / "data")
    cfg = compose_train(["debug=fast", "logger=csv", "data=folder", f"data.root={tmp_path / 'data'}", "data.num_classes=3",
                         "data.crop_size=[32,32]", "data.on_bad_file=skip", "data.batch_size=2", "trainer.max_steps=3",
                         "trainer.max_epochs=1", "callbacks.rich_progress_bar=null", "callbacks.model_summary=null"],
                        output_dir=tmp_path / "run")
    train(cfg)
    recorded = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["train/skipped_files"]
    assert len(recorded) == 1 and str(bad) in recorded[0]


def test_the_newest_readable_checkpoint_is_resumed(tmp_path: Path) -> None:
    from segcon.resume import resolve_checkpoint

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name, step in (("best-epoch001.ckpt", 8), ("last.ckpt", 12)):
        torch.save({"global_step": step, "epoch": 1}, ckpts / name)
    assert resolve_checkpoint("last", tmp_path / "run").name == "last.ckpt"
    assert resolve_checkpoint(str(tmp_path / "run"), tmp_path / "elsewhere").name == "last.ckpt"
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:40])  # truncated copy
    with pytest.warns(UserWarning, match="last.ckpt: it cannot be read"):
        assert resolve_checkpoint("last", tmp_path / "run").name == "best-epoch001.ckpt"
    with pytest.raises(ConfigError, match="no readable checkpoint"):
        resolve_checkpoint("last", tmp_path / "empty")


def test_a_checkpoint_of_other_settings_is_refused_naming_the_keys(tiny_cfg, trained_run: Path) -> None:
    from segcon.resume import resume_checkpoint

    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(tiny_cfg(f"ckpt_path={ckpt}")) == ckpt
    # where the data is and how the first weights were found may change
    assert resume_checkpoint(tiny_cfg(f"ckpt_path={ckpt}", "data.num_workers=3", "model.weights_path=/x.pth"))
    changed = tiny_cfg(f"ckpt_path={ckpt}", "data.batch_size=2", "model.encoder_name=resnet34")
    with pytest.raises(ConfigError) as err:
        resume_checkpoint(changed)
    assert "data.batch_size: 4 -> 2" in str(err.value) and "model.encoder_name: 'resnet18' -> 'resnet34'" in str(err.value)
    assert "resume_force=[model.encoder_name,data.batch_size]" in str(err.value)
    forced = tiny_cfg(f"ckpt_path={ckpt}", "data.batch_size=2", "model.encoder_name=resnet34",
                      "resume_force=[data.batch_size,model]")
    assert resume_checkpoint(forced) == ckpt


def test_a_bad_file_met_in_a_loader_worker_is_reported_as_one_line(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from segcon.data.folder import FolderDataset
    from segcon.utils.errors import find_user_error

    bad = _corrupt_dataset(tmp_path)
    loader = DataLoader(TrainItems(FolderDataset(tmp_path, "train", num_classes=3)), sampler=[(2, 0)], num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # what torch re-raises
    err = find_user_error(caught.value)
    assert isinstance(err, DataError) and str(err).startswith(f"cannot decode image {bad}") and "\n" not in str(err)


def test_last_every_minutes_writes_last_ckpt_during_the_epoch(tiny_cfg, tmp_path: Path) -> None:
    """A minute interval shorter than a step: last.ckpt holds the step before the crash (the
    epoch's first validation, at step 4, has not come)."""
    from segcon.train import train

    cfg = tiny_cfg("callbacks.model_checkpoint.last_every_minutes=1e-6", "+callbacks.crash._target_=tests.helpers.CrashAt",
                   "+callbacks.crash.step=3")
    with pytest.raises(SimulatedCrash):
        train(cfg)
    saved = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
