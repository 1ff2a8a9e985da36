"""Two-process DDP on CPU (trainer=ddp_sim): one run of FixMatch with distribution alignment and
the pixel memory bank, shared by the checks of what crosses ranks (spawning the pair costs more
than the steps): memory bank, teacher, and the all-reduced evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from segcon.objectives.memory import ClassMemory
from tests.test_train import _cli, _independent_miou, _metrics, _tiny_cli_args

SIZE, STEPS = 16, 4
OVERRIDES = [
    "method=fixmatch", "method.distribution_alignment=true", "data.labeled_count=4", "data.unlabeled_batch_size=2",
    "contrast=pixel_memory", "sampler.max_views=20", f"contrast.pixel_memory.memory_size={SIZE}",
    "contrast.pixel_memory.warmup_steps=0", "contrast.pixel_memory.pixel_update_freq=2",
    # 5 val images over 2 ranks (3 + 2, no padding)
    "data.subset.val=5", "data.val_batch_size=1", "trainer.limit_val_batches=1.0",
]
pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def ddp_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """With every logger at once (logger=many: W&B offline, the default, with CSV and
    TensorBoard): only rank 0 talks to them."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    extra = ["trainer=ddp_sim", *OVERRIDES, f"trainer.max_steps={STEPS}", "eval_ckpt=last",
             "+callbacks.dump_memory._target_=tests.helpers.DumpMemory",
             "+callbacks.dump_teacher._target_=tests.helpers.DumpTeacher"]
    args = [a for a in _tiny_cli_args(data_dir) if a != "logger=csv"] + ["logger=many"]
    proc = _cli([*args, *extra, f"hydra.run.dir={run}"], Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_every_logger_is_written_once_by_rank_zero(ddp_run: Path) -> None:
    """One W&B offline run holding the run config and the final summary, one CSV log, and
    TensorBoard event files of one process: rank 1 opened none."""
    runs = sorted((ddp_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    (log,) = runs[0].glob("run-*.wandb")  # W&B's own record file: the config update and summary as JSON text
    record = log.read_bytes()
    assert b'"accelerator":"cpu","devices":2' in record and b"val/mIoU_best" in record
    assert len(list(ddp_run.rglob("metrics.csv"))) == 1
    events = list(ddp_run.rglob("events.out.tfevents.*"))
    assert events and len({e.name.split(".")[-2] for e in events}) == 1  # ...<host>.<pid>.<n>: one process


def test_memory_bank_is_identical_on_both_ranks_and_holds_both_ranks_entries(ddp_run: Path) -> None:
    ranks = [torch.load(ddp_run / f"memory_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k, v in ranks[0]["memory"].items():
        assert torch.equal(v, ranks[1]["memory"][k]), k
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == STEPS
    memory = ranks[0]["memory"]
    expected = ClassMemory(2 * 5, SIZE, memory["memory.feats"].shape[-1])  # pixel and segment rings of 5 classes
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        expected.push(torch.cat([s0["memory"][0], s1["memory"][0]]), torch.cat([s0["memory"][1], s1["memory"][1]]))
    for buf in ("feats", "ptr", "count"):
        assert torch.equal(getattr(expected, buf), memory[f"memory.{buf}"]), buf
    for rings in (slice(0, 5), slice(5, 10)):  # pixel rings, segment rings
        own = sum(int(((s["memory"][1] >= rings.start) & (s["memory"][1] < rings.stop)).sum()) for s in ranks[0]["steps"])
        assert int(memory["memory.count"][rings].sum()) > min(own, SIZE)  # more than rank 0 alone


def test_teacher_is_identical_on_both_ranks(ddp_run: Path) -> None:
    """The teacher's parameters (an EMA of all-reduced student parameters) are equal on both
    ranks. BatchNorm statistics are not compared at the end: each rank's last EMA step averages
    its own student statistics, and DDP makes every rank use rank 0's at the next forward (it
    broadcasts the module's buffers), as it does for the student's; the checkpoint is rank 0's."""
    ranks = [torch.load(ddp_run / f"teacher_end_rank{r}.pt", weights_only=True) for r in (0, 1)]
    start = torch.load(ddp_run / "teacher_start_rank0.pt", weights_only=True)
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    compared = [k for k in ranks[0] if not k.endswith(statistics)]
    assert len(compared) > 80  # the Unet-R18 parameters
    for k in compared:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    assert any(not torch.equal(ranks[0][k], start[k]) for k in compared)


def test_miou_equals_single_process_evaluation(ddp_run: Path, tiny_cfg: Callable[..., DictConfig]) -> None:
    """The all-reduced mIoU of the two ranks equals a single-process evaluation of the same
    checkpoint (every val image counted once)."""
    m = _metrics(ddp_run)
    assert m["val/checkpoint_step"] == STEPS
    cfg = tiny_cfg(*OVERRIDES)
    assert _independent_miou(cfg, Path(m["val/checkpoint"]))[0] == pytest.approx(m["val/mIoU"], abs=1e-12)


@pytest.mark.slow
def test_a_ddp_run_crashed_and_resumed_ends_as_the_uninterrupted_one(
    ddp_run: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Both ranks stop at step 2 (an exception: a SIGKILL of one rank would leave the other
    waiting on a collective); the resumed pair gets each rank's own random state back and ends
    with the weights and metrics of the uninterrupted pair."""
    from tests.test_resume import _assert_same_run

    repo = Path(__file__).resolve().parents[1]
    args = [*_tiny_cli_args(data_dir), "trainer=ddp_sim", *OVERRIDES, f"trainer.max_steps={STEPS}", "eval_ckpt=last",
            "callbacks.model_checkpoint.last_every_n_steps=1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = _cli([*args, "+callbacks.crash._target_=tests.helpers.CrashAt", "+callbacks.crash.step=2"], repo)
    assert proc.returncode != 0 and "simulated crash at step 2" in proc.stderr, proc.stderr[-2000:]
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] in (1, 2) and len(saved["segcon_rng"]) == 2
    proc = _cli([*args, "ckpt_path=last"], repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(ddp_run, tmp_path / "run")


def _rank_1_pid(rank_0: int) -> int:
    """The process of rank 1 among the children of rank 0's (the subprocess launcher sets LOCAL_RANK)."""
    for child in Path(f"/proc/{rank_0}/task/{rank_0}/children").read_text().split():
        if b"LOCAL_RANK=1\0" in Path(f"/proc/{child}/environ").read_bytes():
            return int(child)
    raise AssertionError("rank 1 is not a child of rank 0's process")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds rank 1's process through Linux's /proc")
@pytest.mark.parametrize("rank", [0, 1])
def test_a_preemption_signal_to_one_rank_stops_both_ranks_with_a_checkpoint(data_dir: Path, tmp_path: Path,
                                                                            rank: int) -> None:
    """SIGUSR2 to one rank's process only (rank 0: what `kill` of the launched command does; rank
    1: a node's own signal): the ranks agree after a step to stop there, both take part in
    writing last.ckpt of that step (every rank's random state is gathered into it), and the run
    exits 143. Lightning 2.6's own handling hangs in the second case (a broadcast inside the
    handler of rank 1 alone) and, now and then, in the first (the ranks stop a step apart)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [*_tiny_cli_args(data_dir), "trainer=ddp_sim", *OVERRIDES, "trainer.max_steps=100000",
            "trainer.max_epochs=1000", "trainer.check_val_every_n_epoch=1000", f"hydra.run.dir={run}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    proc = subprocess.Popen([sys.executable, "-m", "segcon.train", *args], cwd=Path(__file__).resolve().parents[1],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "csv" / "metrics.csv"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") > 3):
        time.sleep(0.5)
    assert proc.poll() is None
    pids = [proc.pid, _rank_1_pid(proc.pid)]
    os.kill(pids[rank], signal.SIGUSR2)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        pytest.fail("the ranks did not stop within 120 s of the signal")
    assert proc.returncode == 143, err[-3000:]
    step = int(re.search(r"the state of step (\d+) is in", err).group(1))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == step >= 2 and len(ckpt["segcon_rng"]) == 2


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_ranks_before_the_step(data_dir: Path, tmp_path: Path) -> None:
    """The loss is NaN on rank 1 only: the flags are all-reduced, so both ranks stop at the same
    step (neither waits for the other in a collective), and no checkpoint holds a non-finite
    value."""
    run = tmp_path / "run"
    args = [*_tiny_cli_args(data_dir), "trainer=ddp_sim", "trainer.max_steps=8", "+loss.nan._target_=tests.helpers.NanAfter",
            "+loss.nan.calls=3", "+loss.nan.rank=1", f"hydra.run.dir={run}"]
    proc = _cli(args, Path(__file__).resolve().parents[1])
    assert proc.returncode != 0 and "step 2: the loss is not finite" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]  # no rank died waiting for the other
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] <= 2
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_skipped_bad_files_of_every_rank_reach_metrics_json(tmp_path: Path) -> None:
    """data.on_bad_file=skip under ddp_sim: each rank replaces the unreadable images it meets,
    and the end-of-run list gathers both ranks' (each epoch reads all 8 images, 4 per rank)."""
    import json

    from tests.fake_datasets import make_folder_dataset

    make_folder_dataset(tmp_path / "data", num_classes=3, splits={"train": 8, "val": 2}, size=(32, 32))
    bad = [tmp_path / "data" / "images" / "train" / f"train_000{i}.png" for i in (1, 4)]
    for path in bad:
        path.write_bytes(b"not a png")
    run = tmp_path / "run"
    args = ["debug=fast", "logger=csv", "trainer=ddp_sim", "data=folder", f"data.root={tmp_path / 'data'}",
            "data.num_classes=3", "data.crop_size=[32,32]", "data.on_bad_file=skip", "data.batch_size=2",
            "trainer.max_steps=4", "trainer.max_epochs=2", f"hydra.run.dir={run}"]
    proc = _cli(args, Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads((run / "metrics.json").read_text())["train/skipped_files"]
    assert len(recorded) == 2 and all(any(str(p) in r for r in recorded) for p in bad)


@pytest.mark.parametrize("logger", ["wandb", "csv", "tensorboard", "many", "none"])
def test_every_logger_composes_with_ddp_sim_and_only_rank_zero_writes(
    logger: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a run does with its loggers outside Lightning's own calls (the run config, the final
    summary, figures), on a rank other than 0 and on rank 0, for every logger option: rank 1
    writes nothing and raises nothing (it met `'function' object has no attribute 'update'`
    before); rank 0 writes its W&B run with the run config."""
    import numpy as np
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero
    from omegaconf import OmegaConf

    from segcon.build import instantiate_all
    from segcon.utils.loggers import finish_wandb, log_images, set_run_config, set_summary
    from tests.conftest import compose_train, tiny_overrides

    overrides = [o for o in tiny_overrides(data_dir) if o != "logger=csv"]
    cfg = compose_train([*overrides, "trainer=ddp_sim", f"logger={logger}"], output_dir=tmp_path / "run")
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp"
    config = OmegaConf.to_container(cfg, resolve=True)
    for rank in (1, 0):
        for holder in (fabric_rank_zero.rank_zero_only, utils_rank_zero.rank_zero_only):
            monkeypatch.setattr(holder, "rank", rank)
        loggers = instantiate_all(cfg.get("logger"), "logger")
        set_run_config(loggers, config)
        set_summary(loggers, {"val/mIoU": 0.5})
        log_images(loggers, {"val/overlays": np.zeros((4, 4, 3), np.uint8)}, step=1)
        if rank == 1:
            assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*"))
    finish_wandb(0)
    import wandb

    wandb.teardown()  # W&B keeps process-wide settings (its directory) that later tests must not inherit
    offline = list((tmp_path / "run").glob("wandb/offline-run-*"))
    assert len(offline) == (1 if logger in ("wandb", "many") else 0)
