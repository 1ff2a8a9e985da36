"""End-to-end runs of segcon-train on the tiny synthetic dataset (in-process and as a CLI)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig

from segcon.build import build_datamodule, build_module
from segcon.evaluation.metrics import confusion_matrix, scores
from segcon.train import train
from tests.conftest import TINY_SYNTHETIC

pytestmark = pytest.mark.slow


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _independent_miou(cfg: DictConfig, ckpt: Path) -> tuple[float, float, int]:
    """Evaluate a checkpoint with a plain loop (no Lightning): load weights, predict every val
    image, sum one confusion matrix; and the mean over images of each image's mIoU (over the
    classes in its ground truth or prediction); and the number of images."""
    module = build_module(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.eval()
    dm = build_datamodule(cfg)
    dm.setup("validate")
    ds = dm.datasets["val"]
    cm = torch.zeros(cfg.data.num_classes, cfg.data.num_classes, dtype=torch.long)
    image_mious = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            pred = module.net(item["image"][None]).argmax(1)
            one = confusion_matrix(pred, item["mask"][None], cfg.data.num_classes, cfg.data.ignore_index)
            cm += one
            image_mious.append(scores(one).miou)
    return scores(cm).miou, sum(image_mious) / len(image_mious), len(image_mious)


def test_fast_run_writes_metrics_checkpoints_overlays(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg()
    run_dir = Path(cfg.paths.output_dir)
    results = train(cfg)
    m = _metrics(run_dir)
    best = Path(m["val/checkpoint"])
    assert best.parent == run_dir / "checkpoints" and best.name.startswith("best-")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert m["val/checkpoint_kind"] == "best"
    assert set(m["val/IoU"]) == set(cfg.data.class_names)
    assert m["val/mIoU"] == pytest.approx(results["val/mIoU"])
    assert m["val/mIoU_best"] >= m["val/mIoU"] - 1e-9  # best-by-val checkpoint is evaluated
    # fit stops at step 6, inside epoch 1; it validated only after epoch 0 (step 4)
    assert m["wall_time_s"] > 0 and m["val/checkpoint_step"] == 4 and m["val/checkpoint_epoch"] == 0
    rows = list(csv.DictReader((run_dir / "val_per_class.csv").open()))
    assert [r["class"] for r in rows] == list(cfg.data.class_names)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config_tree.log").is_file()
    # fit validates after epoch 0 only (max_steps=6 stops in epoch 1); then the final evaluation
    assert sorted(p.name for p in (run_dir / "overlays").glob("*.png")) == ["val_epoch000.png", "val_final.png"]
    # every loss term is logged every step
    logged = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    steps = {int(r["step"]) for r in logged if r.get("train/loss_ce")}
    assert steps == set(range(6))
    # the last validation of the training run (here the only one) is reported next to the best
    fit_vals = [float(r["val/mIoU"]) for r in logged if r.get("val/mIoU")][:-1]  # the last row: final eval
    assert len(fit_vals) == 1 and m["val/mIoU_last"] == pytest.approx(fit_vals[-1])
    # the reported mIoU is the checkpoint's, recomputed here without Lightning, and so is the
    # per-image mIoU; F1 = 2 IoU / (1 + IoU) per class, recall = the accuracy column
    miou, image_miou, images = _independent_miou(cfg, best)
    assert miou == pytest.approx(m["val/mIoU"], abs=1e-12) and image_miou == pytest.approx(m["val/image_mIoU"], abs=1e-12)
    for c, iou in m["val/IoU"].items():
        if not math.isnan(iou):
            assert m["val/F1"][c] == pytest.approx(2 * iou / (1 + iou), abs=1e-6)
    assert [float(r["acc"] or "nan") for r in rows] == pytest.approx(list(m["val/recall"].values()), nan_ok=True)
    assert set(rows[0]) >= {"precision", "f1", "image_iou", "image_f1"} and m["val/images"] == images
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["segcon"]["config"]["data"]["num_classes"] == 5


def test_eval_last_checkpoint(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg("eval_ckpt=last", "trainer.max_steps=4", "data.detailed_metrics=true")
    train(cfg)
    m = _metrics(Path(cfg.paths.output_dir))
    assert m["val/checkpoint"].endswith("last.ckpt") and m["val/checkpoint_kind"] == "last"
    # data.detailed_metrics: the logger gets precision / recall / F1 and the per-image scores too
    logged = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    last = [r for r in logged if r.get("val/image_mIoU")][-1]
    assert float(last["val/image_mIoU"]) == pytest.approx(m["val/image_mIoU"])
    for c in cfg.data.class_names:
        assert f"val/F1/{c}" in last and f"val/image_F1/{c}" in last and f"val/precision/{c}" in last


def test_overfit_one_batch_drives_the_loss_down(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg("debug=overfit", "trainer.max_epochs=40", "trainer.check_val_every_n_epoch=40", "optim.lr=3e-3")
    train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 40
    assert min(losses[-5:]) < 0.25 * losses[0]


def test_resume_continues_steps_and_wandb_run(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    import segcon.train

    seen: dict = {}
    finish = segcon.train.finish_wandb

    def read_run_then_finish(code: int) -> None:  # the live run, as the W&B service receives it
        if wandb.run is not None and not seen:
            seen.update(summary=dict(wandb.run.summary), config=wandb.run.config.as_dict())
        finish(code)

    monkeypatch.setattr(segcon.train, "finish_wandb", read_run_then_finish)
    first = tiny_cfg("logger=wandb", "trainer.max_steps=4", "trainer.max_epochs=4")
    train(first)
    # the run's summary holds the final, best and last mIoU; its config is the resolved run config
    m = _metrics(Path(first.paths.output_dir))
    for key in ("val/mIoU", "val/mIoU_best", "val/mIoU_last"):
        assert seen["summary"][key] == pytest.approx(m[key])
    assert seen["config"]["optim"]["lr"] == first.optim.lr and seen["config"]["data"]["name"] == "synthetic"
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    run_id = torch.load(last, map_location="cpu", weights_only=True)["segcon"]["wandb_run_id"]
    assert run_id
    second = tiny_cfg("logger=wandb", "trainer.max_steps=6", "trainer.max_epochs=4", f"ckpt_path={last}", "eval_ckpt=last")
    second.paths.output_dir = str(tmp_path / "resumed")
    train(second)
    m = _metrics(tmp_path / "resumed")
    assert m["val/checkpoint_step"] == 6
    offline = list((tmp_path / "resumed" / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(run_id) for p in offline)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "-m", "segcon.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _tiny_cli_args(data_dir: Path) -> list[str]:
    return ["debug=fast", "logger=csv", f"paths.data_dir={data_dir}", f"data.root={data_dir}/synthetic-tiny", *TINY_SYNTHETIC]


def test_cli_run_prints_table_and_final_miou(data_dir: Path, tmp_path: Path) -> None:
    proc = _cli([*_tiny_cli_args(data_dir), f"hydra.run.dir={tmp_path}/cli"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val per-class IoU" in proc.stdout and "final val mIoU:" in proc.stdout
    assert "crack" in proc.stdout
    assert (tmp_path / "cli" / "metrics.json").is_file()


def test_cli_user_error_is_one_line_not_a_traceback(data_dir: Path, tmp_path: Path) -> None:
    proc = _cli([*_tiny_cli_args(data_dir), "model.num_classes=3", f"hydra.run.dir={tmp_path}/bad"], tmp_path)
    assert proc.returncode == 2
    assert "error: model.num_classes=3 but data.num_classes=5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_multirun_two_jobs_two_run_dirs(data_dir: Path, tmp_path: Path) -> None:
    proc = _cli(["-m", *_tiny_cli_args(data_dir), "seed=1,2", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in (("0", 1), ("1", 2)):
        run = tmp_path / "sweep" / job
        assert _metrics(run)["val/checkpoint_step"] == 2
        assert f"seed: {seed}" in (run / "config.yaml").read_text()


def test_tensorboard_overlays_and_mixed_precision(tiny_cfg: Callable[..., DictConfig]) -> None:
    """bf16 autocast (Lightning's precision flag, on CPU here) through the losses, and the
    overlay images reaching TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("logger=tensorboard", "trainer.precision=bf16-mixed", "trainer.max_steps=4")
    metrics = train(cfg)
    assert 0.0 <= metrics["val/mIoU"] <= 1.0
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "val/overlays" in events.Tags()["images"]
    assert "train/loss_ce" in events.Tags()["scalars"]


@pytest.mark.parametrize("overrides", [
    ("contrast=cac", "model.projection.kind=residual", "contrast.cac.warmup_steps=0"),
    ("contrast=pixel_memory", "contrast.pixel_memory.warmup_steps=0", "method=fixmatch", "data.labeled_count=4"),
    ("contrast=contextrast", "contrast.contextrast.warmup_steps=0"),
], ids=["cac-residual", "fixmatch-memory", "contextrast"])
def test_a_16_mixed_run_trains_with_float16_autocast_and_a_grad_scaler(
    overrides: tuple[str, ...], tiny_cfg: Callable[..., DictConfig]
) -> None:
    """float16 autocast with a GradScaler (Lightning's 16-mixed; on CPU the plugin is given
    explicitly, as Lightning's precision flag would switch to bf16 there): the heads' sums over
    every pixel (batch statistics of the folded projection stem, region means of the memory)
    must not overflow float16, every loss stays finite and the scaler's state is checkpointed."""
    from lightning.pytorch.plugins import MixedPrecision

    from segcon.config import prepare_data
    from segcon.utils.checkpoint import AtomicCheckpointIO

    cfg = tiny_cfg(*overrides, "sampler.max_views=20", "trainer.max_steps=3", "trainer.max_epochs=1", "logger=csv")
    prepare_data(cfg)
    module, dm = build_module(cfg), build_datamodule(cfg)
    seen: list[torch.dtype] = []
    module.net.register_forward_hook(lambda m, i, out: seen.append(out.logits.dtype) if m.training else None)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu"), AtomicCheckpointIO()],
                        default_root_dir=cfg.paths.output_dir, logger=L.pytorch.loggers.CSVLogger(cfg.paths.output_dir),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    assert seen and set(seen) == {torch.float16}
    rows = list(csv.DictReader(next(Path(cfg.paths.output_dir).rglob("metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    term = next(iter(cfg.contrast))
    assert all(math.isfinite(float(r[f"train/loss_{term}"])) for r in rows if r.get(f"train/loss_{term}"))
    ckpt = torch.load(next(Path(cfg.paths.output_dir).rglob("*.ckpt")), map_location="cpu", weights_only=True)
    assert "MixedPrecision" in ckpt and ckpt["MixedPrecision"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_profile_preset_writes_a_report(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg("debug=profile", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1")
    train(cfg)
    reports = list(Path(cfg.paths.output_dir).glob("*profile*.txt"))
    assert reports and "run_training_batch" in reports[0].read_text()


def test_contrast_terms_train_end_to_end(tiny_cfg: Callable[..., DictConfig]) -> None:
    runs = (["contrast=pixel", "sampler=hard_easy"], ["contrast=pixel_memory", "sampler=random"],
            ["contrast=pixel", "sampler=marginal"], ["contrast=cac", "sampler=hard_easy"], ["contrast=cac", "loss=ohem"],
            ["contrast=contextrast", "method=fixmatch", "data.labeled_count=4"])
    for i, overrides in enumerate(runs):
        term = overrides[0].split("=")[1]
        cfg = tiny_cfg(*overrides, "sampler.max_views=20", "trainer.max_steps=3", "trainer.max_epochs=1",
                       f"contrast.{term}.warmup_steps=0")
        cfg.paths.output_dir = str(Path(cfg.paths.output_dir).parent / f"run{i}")  # no file of an earlier run read
        name = next(iter(cfg.contrast))
        train(cfg)
        rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
        for term in cfg.contrast:
            values = [float(r[f"train/loss_{term}"]) for r in rows if r.get(f"train/loss_{term}")]
            assert len(values) == 3 and all(v > 0 for v in values), (overrides, term)
        state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        heads = [f"ctx_{i}" for i in range(1, 5)] if name == "contextrast" else ["projection"]
        assert all(any(k.startswith(f"net.heads.{h}.") for k in state) for h in heads), heads
        assert any(k.startswith("net.heads.weight_branch.") for k in state) == (name == "cac")
        if name == "pixel_memory":
            count = state["objective.contrast.pixel_memory.memory.count"]
            assert int(count[: cfg.data.num_classes].sum()) > 0 and int(count[cfg.data.num_classes:].sum()) > 0


@pytest.mark.ddp
def test_ddp_sim_cac_trains_every_head(data_dir: Path, tmp_path: Path) -> None:
    """contrast=cac under 2-process DDP: projection head, weight branch and network all get
    gradients on both ranks (DDP would fail on an unused parameter), also in the warm-up step
    where CAC is replaced by its connected zero, and the terms are logged."""
    extra = ["trainer=ddp_sim", "contrast=cac", "sampler.max_views=20", "contrast.cac.warmup_steps=1",
             "trainer.max_steps=3", "trainer.max_epochs=3"]
    proc = _cli([*_tiny_cli_args(data_dir), *extra, f"hydra.run.dir={tmp_path}/ddp"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "ddp" / "csv" / "metrics.csv").open()))
    for term, steps in (("cac", 2), ("weight_branch", 3)):  # in its warm-up step CAC is not computed
        values = [float(r[f"train/loss_{term}"]) for r in rows if r.get(f"train/loss_{term}")]
        assert len(values) == steps and all(v > 0 for v in values), term
    weights = [float(r["train/weight_cac"]) for r in rows if r.get("train/weight_cac")]
    assert weights == pytest.approx([0.0, 0.4, 0.4])  # warm-up: 0 at step 0
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("net.heads.weight_branch.") for k in state)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_lr_is_rescaled_to_the_global_batch(accumulate: int, tiny_cfg: Callable[..., DictConfig]) -> None:
    """The global batch is 4 images per device x 1 device x the batches accumulated into a step."""
    cfg = tiny_cfg("optim.base_batch=8", "optim.scale_lr=linear", "trainer.max_steps=1",
                   f"trainer.accumulate_grad_batches={accumulate}")
    train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    lrs = [float(r["lr-AdamW/encoder"]) for r in rows if r.get("lr-AdamW/encoder")]
    assert lrs[0] == pytest.approx(1e-3 * 4 * accumulate / 8)


def test_wandb_group_of_sweeps_multiruns_and_lone_runs(tmp_path: Path) -> None:
    from segcon.utils.loggers import wandb_group

    logs = tmp_path / "logs"
    assert wandb_group("abc123", str(logs / "train/multiruns/x"), str(logs), "synthetic") == "sweep-abc123"
    assert wandb_group(None, str(logs / "train/multiruns/2026-12-02_10-00-00"), str(logs), "synthetic") == \
        "train/multiruns/2026-12-02_10-00-00"
    assert wandb_group(None, "/elsewhere/search/pixel_contrast", str(logs), "synthetic") == "pixel_contrast"
    assert wandb_group(None, None, str(logs), "synthetic") == "synthetic"
