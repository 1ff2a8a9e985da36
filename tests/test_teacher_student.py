"""Teacher-student methods: the unsupervised step against hand-computed targets, end-to-end runs
of every method, contrastive terms with pseudo-labels, DDP and resume of the teacher."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig

from segcon.build import build_module
from segcon.data.splits import make_split
from segcon.methods.pseudo_labels import PseudoLabels, pseudo_label_stats
from segcon.train import train
from tests.helpers import capture_contrast_target
from tests.test_evaluate import _eval

SSL = ["data.labeled_count=4", "trainer.max_steps=3"]
IGNORE = 255


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "csv" / "metrics.csv").open()))


def _values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_pseudo_label_stats_count_by_hand_and_skip_ratios_of_nothing() -> None:
    label = torch.tensor([[[0, 1, 2], [1, 1, 0]]])  # [1, 2, 3] pseudo-labels
    gt = torch.tensor([[[0, 2, 2], [1, IGNORE, 1]]])
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    keep = torch.tensor([[[True, True, False], [True, True, False]]])
    names = ["a", "b", "c"]

    def stats(keep: torch.Tensor, gt: torch.Tensor | None) -> dict:
        pseudo = PseudoLabels(label.masked_fill(~valid, IGNORE), torch.ones(label.shape), keep, IGNORE)
        return pseudo_label_stats(pseudo, valid, gt, IGNORE, names)

    logs = stats(keep, gt)
    # confident & valid: 4 of 5 valid pixels; scored confident: (0,0) right, (0,1) wrong, (1,0) right
    assert float(logs["mask_ratio"]) == pytest.approx(4 / 5)
    assert float(logs["pl_acc"]) == pytest.approx(2 / 3)
    # all scored (valid, gt not ignored): (0,0) (0,1) (0,2) (1,0) -> right: (0,0) (0,2) (1,0)
    assert float(logs["pl_acc_all"]) == pytest.approx(3 / 4)
    # the 4 confident pseudo-labels: one a, three b
    shares = {c: float(logs[f"pl_share/{c}"]) for c in "abc"}
    assert shares == pytest.approx({"a": 1 / 4, "b": 3 / 4, "c": 0.0})
    # scored gt pixels: a at (0,0), b at (1,0), c at (0,1) and (0,2); confident and right: (0,0), (1,0)
    recall = {c: float(logs[f"pl_recall/{c}"]) for c in "abc"}
    assert recall == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.0})
    none = stats(torch.zeros_like(keep), gt)
    assert "pl_acc" not in none and float(none["mask_ratio"]) == 0.0 and float(none["pl_acc_all"]) == pytest.approx(3 / 4)
    assert not any(k.startswith("pl_share/") for k in none) and float(none["pl_recall/c"]) == 0.0
    no_c = stats(keep, gt.clamp(max=1))
    assert "pl_recall/c" not in no_c  # no c pixel in the ground truth: no recall of it
    no_gt = stats(keep, None)
    assert set(no_gt) == {"mask_ratio", "pl_share/a", "pl_share/b", "pl_share/c"}


def test_metrics_json_keeps_the_runs_bests_when_an_earlier_checkpoint_is_evaluated(
    tiny_cfg: Callable[..., DictConfig],
) -> None:
    # mode=min: the evaluated "best" checkpoint is the student's *worst* validation, whose
    # restored running bests only cover the steps before it; metrics.json must still report
    # the bests over the whole fit (student and teacher), and the last validation.
    cfg = tiny_cfg("method=mean_teacher", "data.labeled_count=4", "trainer.max_steps=5", "trainer.max_epochs=-1",
                   "trainer.val_check_interval=1", "trainer.check_val_every_n_epoch=null",
                   "callbacks.model_checkpoint.mode=min", "method.ema_momentum=0.5")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = [r for r in _rows(run) if r.get("val/mIoU")]
    student = [float(r["val/mIoU"]) for r in rows][:-1]  # the last row: the final evaluation
    teacher = [float(r["val/teacher/mIoU"]) for r in rows][:-1]
    assert len(student) == 5
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/mIoU"] == pytest.approx(min(student))  # the evaluated checkpoint
    assert metrics["val/mIoU_best"] == pytest.approx(max(student))
    assert metrics["val/teacher/mIoU_best"] == pytest.approx(max(teacher))
    assert metrics["val/mIoU_last"] == pytest.approx(student[-1])
    assert metrics["val/teacher/mIoU_last"] == pytest.approx(teacher[-1])


@pytest.mark.parametrize("method", ["mean_teacher", "fixmatch", "unimatch"])
def test_methods_train_and_report_student_teacher_and_split(method: str, tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg(f"method={method}", *SSL)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    rows = _rows(run)
    unsup = ["train/loss_unsup"] if method != "unimatch" else ["train/loss_unsup_s1", "train/loss_unsup_s2", "train/loss_unsup_fp"]
    for key in [*unsup, "train/loss_ce", "train/mask_ratio", "train/pl_acc_all", "train/pl_recall/background"]:
        assert len(_values(rows, key)) == 3, key
    assert all(0.0 <= v <= 1.0 for v in _values(rows, "train/mask_ratio") + _values(rows, "train/pl_acc_all"))
    assert _values(rows, "val/teacher/mIoU") and _values(rows, "val/mIoU")
    metrics = json.loads((run / "metrics.json").read_text())
    ids = sorted(p.stem for p in (Path(cfg.data.root) / "images" / "train").glob("*.png"))[:16]
    expected = make_split(ids, 4, seed=0)
    assert metrics["split_hash"] == expected.hash and metrics["labeled_images"] == 4
    assert 0.0 <= metrics["val/teacher/mIoU"] <= 1.0 and "val/teacher/IoU/crack" in metrics
    fit_teacher = [float(r["val/teacher/mIoU"]) for r in rows if r.get("val/teacher/mIoU")][:-1]  # last: final eval
    assert metrics["val/teacher/mIoU_last"] == pytest.approx(fit_teacher[-1])
    assert "val/mIoU_last" in metrics
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["segcon"]["split_hash"] == expected.hash
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("teacher.model.") for k in keys) and not any(k.startswith("teacher.heads.") for k in keys)
    teacher = {k[len("teacher."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("teacher.model.")}
    student = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.model.")}
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)  # an average, not a copy
    if method == "mean_teacher":  # segcon-eval of the teacher branch reproduces the run's teacher numbers
        _eval(f"ckpt={run}", "branch=teacher", f"out_dir={run / 'eval_teacher'}")
        again = json.loads((run / "eval_teacher" / "metrics.json").read_text())
        assert again["val/mIoU"] == metrics["val/teacher/mIoU"] and again["val/checkpoint_kind"] == "teacher"


def test_supervised_baseline_trains_on_the_labeled_images_only(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg("method=supervised", *SSL)
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["labeled_images"] == 4 and metrics["unlabeled_images"] == 12
    assert "val/teacher/mIoU" not in metrics


def _module(tiny_cfg: Callable[..., DictConfig], *overrides: str):
    cfg = tiny_cfg(*overrides)
    module = build_module(cfg)
    module._trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=100, world_size=1, log_every_n_steps=1)
    return module


def _batch(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A labeled batch of 2 images 64x64 with masks, 2 weak views, and a generator for more."""
    g = torch.Generator().manual_seed(seed)
    labeled = {"image": torch.randn(2, 3, 64, 64, generator=g), "mask": torch.randint(0, 5, (2, 64, 64), generator=g)}
    return labeled, torch.randn(2, 3, 64, 64, generator=g), g


def test_contrast_target_is_labels_plus_confident_pseudo_labels(tiny_cfg: Callable[..., DictConfig]) -> None:
    module = _module(tiny_cfg, "method=mean_teacher", "method.cutmix_prob=0", "method.confidence.threshold=0.3",
                     "contrast=pixel", "sampler.max_views=5")
    captured = capture_contrast_target(module)
    labeled, weak, _ = _batch(0)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, :, 50:] = False  # crop padding
    unlabeled = {"image": weak, "strong": weak[:, None].clone(), "valid": valid}
    module.unsupervised_step(labeled, unlabeled)
    with torch.no_grad():
        conf, pseudo = module.teacher(weak).softmax(1).max(1)
    expected = pseudo.masked_fill(~((conf >= 0.3) & valid), IGNORE)
    target = captured["target"]
    assert torch.equal(target[:2], labeled["mask"]) and torch.equal(target[2:], expected)
    assert (target[2:] != IGNORE).any() and (target[2:, :, 50:] == IGNORE).all()


def test_low_confidence_pseudo_labels_reach_terms_with_their_confidence(tiny_cfg: Callable[..., DictConfig]) -> None:
    """Terms get every pseudo-label with its confidence and the filter's keep mask, not labels
    already erased: low-confidence pixels keep their class; only padding is unlabeled."""
    module = _module(tiny_cfg, "method=fixmatch", "method.cutmix_prob=0", "method.confidence.threshold=0.4",
                     "contrast=pixel")
    captured = capture_contrast_target(module)
    labeled, weak, _ = _batch(2)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, 60:] = False
    module.unsupervised_step(labeled, {"image": weak, "strong": weak[:, None].clone(), "valid": valid})
    with torch.no_grad():
        conf, label = module.net.forward_features(weak, heads=()).logits.softmax(1).max(1)
    t = captured["targets"]
    assert t.labeled.tolist() == [True, True, False, False]
    assert torch.equal(t.labels[2:], label.masked_fill(~valid, IGNORE)) and torch.equal(t.labels[:2], labeled["mask"])
    torch.testing.assert_close(t.confidence[2:], conf)
    assert (t.confidence[:2] == 1).all()
    assert torch.equal(t.keep[2:], (conf >= 0.4) & valid) and (~t.keep[2:] & valid).any()


def test_cutmix_mixes_images_pseudo_labels_and_confidences_with_the_same_boxes(
    tiny_cfg: Callable[..., DictConfig],
) -> None:
    """cutmix_prob 1: every strong view gets a box from the next image of the batch; the student
    sees the mixed image, and the pseudo-label loss and the contrastive targets the pseudo-labels,
    keep mask and confidences mixed with the same boxes (recomputed here from the same seed)."""
    from segcon.methods.mixing import cutmix_masks

    module = _module(tiny_cfg, "method=mean_teacher", "method.cutmix_prob=1", "method.confidence.threshold=0.3",
                     "contrast=pixel")
    captured = capture_contrast_target(module)
    labeled, weak, g = _batch(5)
    strong = weak + 0.5 * torch.randn(2, 3, 64, 64, generator=g)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    torch.manual_seed(11)
    _, logs = module.unsupervised_step(labeled, {"image": weak, "strong": strong[:, None], "valid": valid})

    torch.manual_seed(11)  # the mean teacher's step draws nothing else before the boxes
    boxes = cutmix_masks(2, (64, 64), 1.0)
    assert all(0 < int(b.sum()) < 64 * 64 for b in boxes)

    def mixed(t: torch.Tensor) -> torch.Tensor:
        m = boxes if t.dim() == 3 else boxes[:, None]
        return torch.where(m, t.roll(1, dims=0), t)

    with torch.no_grad():
        conf, label = module.teacher(weak).softmax(1).max(1)
        logits = module.net(torch.cat([labeled["image"], mixed(strong)])).logits  # train mode, as the step runs
    keep = mixed((conf >= 0.3) & valid)
    t = captured["targets"]
    assert torch.equal(t.labels[2:], mixed(label)) and torch.equal(t.keep[2:], keep)
    torch.testing.assert_close(t.confidence[2:], mixed(conf))
    torch.testing.assert_close(captured["output"].logits[2:].detach(), logits[2:], rtol=1e-4, atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits[2:], mixed(label), reduction="none")
    assert float(logs["loss_unsup"]) == pytest.approx(float((ce * keep).sum() / valid.sum()), rel=1e-4)


@pytest.mark.parametrize(("weights", "scale"), [((0.25, 0.5), 0.5), ((0.5, 0.0), 1.0)])
def test_unimatch_loss_is_the_weighted_sum_of_its_branches(
    weights: tuple[float, float], scale: float, tiny_cfg: Callable[..., DictConfig]
) -> None:
    strong_w, fp_w = weights
    module = _module(tiny_cfg, "method=unimatch", "method.cutmix_prob=0", "method.confidence.threshold=0.3",
                     f"method.strong_weight={strong_w}", f"method.fp_weight={fp_w}", f"method.loss_scale={scale}",
                     "contrast=pixel")
    captured = capture_contrast_target(module)  # a zero loss in place of the pixel contrast
    labeled, weak, g = _batch(0)
    strong = torch.stack([weak + 0.3 * torch.randn(2, 3, 64, 64, generator=g) for _ in range(2)], 1)
    valid = torch.ones(2, 64, 64, dtype=torch.bool)
    valid[:, :, 40:] = False
    torch.manual_seed(7)  # the feature-perturbation branch's dropout
    loss, logs = module.unsupervised_step(labeled, {"image": weak, "strong": strong, "valid": valid})

    # By hand, batched as the published code batches it: pass 1 = labeled + weak images through
    # the encoder once, the decoder on clean and dropped-out stages stacked (dropout under the same
    # seed); its weak rows, detached, give the pseudo-labels; pass 2 = both strong views.
    def ce_on(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        return (per_pixel * keep).sum() / valid.sum()

    model = module.net.model
    with torch.no_grad():
        torch.manual_seed(7)
        stages = model.encoder(torch.cat([labeled["image"], weak]))
        if fp_w > 0:
            stages = [torch.cat([f, torch.nn.functional.dropout2d(f, 0.5, True)]) for f in stages]
        first = model.segmentation_head(model.decoder(stages))
        conf, pseudo = first[2:4].softmax(1).max(1)
        keep = (conf >= 0.3) & valid
        second = model.segmentation_head(model.decoder(model.encoder(torch.cat([strong[:, 0], strong[:, 1]]))))
    assert keep.any() and not keep.all()
    sup = torch.nn.functional.cross_entropy(first[:2], labeled["mask"])
    s1, s2 = ce_on(second[:2], pseudo, keep), ce_on(second[2:], pseudo, keep)
    unsup = strong_w * (s1 + s2) + (fp_w * ce_on(first[6:], pseudo, keep) if fp_w > 0 else 0.0)
    expected = scale * (sup + unsup)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(logs["loss_unsup_s1"]) == pytest.approx(float(s1), rel=1e-5)
    assert ("loss_unsup_fp" in logs) == (fp_w > 0)  # a zero weight leaves the branch out
    # contrast sees the labeled rows of pass 1 and the strong views of pass 2, with their targets
    torch.testing.assert_close(captured["output"].logits.detach(), torch.cat([first[:2], second]), rtol=1e-4, atol=1e-5)
    filtered = pseudo.masked_fill(~keep, IGNORE)
    assert torch.equal(captured["target"], torch.cat([labeled["mask"], filtered, filtered]))


def test_entropy_filter_drops_the_most_uncertain_share(tiny_cfg: Callable[..., DictConfig]) -> None:
    module = _module(tiny_cfg, "method=mean_teacher", "method.confidence.mode=entropy", "method.confidence.drop_percent=20")
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 5, 8, 8, generator=g).mul(3).softmax(1)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[0, 0] = False
    labeled = {"mask": torch.zeros(1, 8, 8, dtype=torch.long)}
    pseudo, _ = module.pseudo_labels(probs, labeled, {"valid": valid})
    keep = pseudo.keep
    entropy = -(probs * probs.log()).sum(1)
    n = int(valid.sum())
    assert int(keep.sum()) == n - int(0.2 * n) and not (keep & ~valid).any()
    assert entropy[keep].max() <= entropy[valid & ~keep].min()  # the dropped ones are the most uncertain
    assert (pseudo.label[~keep & valid] != IGNORE).all()  # the dropped ones keep their label...
    assert torch.equal(pseudo.confidence, probs.max(1).values) and (pseudo.label[~valid] == IGNORE).all()
    module._trainer.global_step = 100  # end of training: nothing is dropped any more
    assert torch.equal(module.pseudo_labels(probs, labeled, {"valid": valid})[0].keep, valid)


def test_cac_joins_a_teacher_student_run(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg("method=mean_teacher", "contrast=cac", "sampler.max_views=20", "method.confidence.threshold=0.0",
                   "contrast.cac.warmup_steps=0", *SSL)
    train(cfg)
    rows = _rows(Path(cfg.paths.output_dir))
    for key in ("train/loss_cac", "train/loss_weight_branch", "train/loss_unsup"):
        values = _values(rows, key)
        assert len(values) == 3 and all(v > 0 for v in values), key


def test_resume_restores_the_teacher(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    first = tiny_cfg("method=mean_teacher", *SSL, "trainer.max_epochs=4", "method.distribution_alignment=true")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    second = tiny_cfg("method=mean_teacher", "data.labeled_count=4", "trainer.max_steps=5", "trainer.max_epochs=4",
                      "method.distribution_alignment=true", f"ckpt_path={last}",
                      "+callbacks.dump_teacher._target_=tests.helpers.DumpTeacher")
    second.paths.output_dir = str(tmp_path / "resumed")
    train(second)
    start = torch.load(Path(second.paths.output_dir) / "teacher_start_rank0.pt", weights_only=True)
    for k, v in start.items():
        assert torch.equal(v, saved[f"teacher.{k}"]), k  # restored, not re-copied from the student
    end = torch.load(Path(second.paths.output_dir) / "teacher_end_rank0.pt", weights_only=True)
    assert any(not torch.equal(end[k], start[k]) for k in start)  # and it kept averaging
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 5
    # the alignment's running distributions resumed too (2 steps on a fresh start would give 2)
    assert int(saved["alignment.steps"]) == 3 and int(resumed["state_dict"]["alignment.steps"]) == 5


@pytest.mark.parametrize("warmup", ["method.sup_warmup_epochs=1", "method.sup_warmup_steps=3"])
def test_the_ema_as_the_methods_schedule_it_after_a_supervised_warm_up(tiny_cfg: Callable[..., DictConfig],
                                                                         warmup: str) -> None:
    """A warm-up of one epoch of 3 steps, or of 3 steps: the teacher stays untouched during the
    warm-up, is the student's copy when the unsupervised phase starts, equals the student after
    its first EMA update (m = 0 at t = 0), and is the average with m = min(1 - 1/(t + 1), m_max)
    after that (t counted from the end of the warm-up, not from step 0)."""
    cfg = tiny_cfg("method=mean_teacher", "data.labeled_count=4", warmup, "trainer.max_epochs=2",
                   "trainer.max_steps=6", "method.ema_momentum=0.9",
                   "+callbacks.record._target_=tests.helpers.RecordTeacherAndStudent")
    train(cfg)
    records = torch.load(Path(cfg.paths.output_dir) / "networks.pt", weights_only=True)
    by_step = {r["step"]: r for r in records}  # the last record of a step wins: after training
    assert sorted(by_step) == list(range(7))

    def equal(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    def close(a: dict, b: dict) -> bool:
        return all(torch.allclose(a[k].double(), b[k].double(), atol=1e-6) for k in a if a[k].is_floating_point())

    start = by_step[0]["teacher"]
    assert equal(by_step[2]["teacher"], start) and not equal(start, by_step[2]["student"])  # warm-up: untouched
    assert equal(by_step[3]["teacher"], by_step[3]["student"])  # the copy when the unsupervised phase starts
    assert not equal(by_step[3]["student"], by_step[4]["student"])
    assert equal(by_step[4]["teacher"], by_step[4]["student"])  # first update after it: m = 0
    for step, t in ((5, 1), (6, 2)):  # the update at the end of step s - 1 uses t = s - 1 - 3
        m = min(1 - 1 / (t + 1), 0.9)
        prev, now = by_step[step - 1]["teacher"], by_step[step]["student"]
        expected = {k: m * prev[k].double() + (1 - m) * now[k].double() if prev[k].is_floating_point() else now[k]
                    for k in prev}
        assert close(by_step[step]["teacher"], expected), step


def test_pseudo_labels_come_from_the_teacher_or_the_student(tiny_cfg: Callable[..., DictConfig]) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    # (UniMatch takes its pseudo-labels from its first training pass: see its loss test)
    for method, source in (("mean_teacher", "teacher"), ("fixmatch", "student")):
        module = _module(tiny_cfg, f"method={method}")
        with torch.no_grad():
            for p in module.teacher.model.segmentation_head.parameters():
                p.add_(0.1)  # teacher and student now disagree
            want = module.teacher(x).softmax(1) if source == "teacher" else module.net(x).logits.softmax(1)
        got, teacher_output = module.weak_probs(x)
        assert teacher_output is None  # no term reads it
        assert torch.isfinite(got).all() and torch.allclose(got, want), method
        assert not module.teacher.training and module.net.training
