"""UniMatch V2 (segcon.methods.unimatch_v2): complementary channel dropout, the loss against a
float64 reference, and runs of the method (with a contrastive term, under ddp_sim)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from segcon.models.base import complementary_masks
from segcon.models.output import SegOutput
from segcon.utils.errors import ConfigError
from tests.test_dpt import TINY_DPT

REPO = Path(__file__).resolve().parents[1]
V2 = ("method=unimatch_v2", *TINY_DPT, "data.labeled_count=4", "trainer.max_epochs=-1")


@pytest.mark.parametrize("pairs", [1, 4, 7])
def test_complementary_masks_partition_the_channels_and_keep_the_scale(pairs: int) -> None:
    g = torch.Generator().manual_seed(pairs)
    masks = complementary_masks(pairs, 64, generator=g)
    first, second = masks[:pairs], masks[pairs:]
    kept = (first == 1).all(1)
    assert int(kept.sum()) == pairs // 2 and torch.equal(kept, (second == 1).all(1))
    dropped_first, dropped_second = first[~kept], second[~kept]
    assert set(dropped_first.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(dropped_first + dropped_second, torch.full_like(dropped_first, 2.0))  # one view each
    assert torch.equal((dropped_first > 0) ^ (dropped_second > 0), torch.ones_like(dropped_first, dtype=torch.bool))
    many = torch.cat([complementary_masks(pairs, 64, generator=g) for _ in range(400)])
    assert abs(float(many.mean()) - 1.0) < 0.02  # each view's expected scale is 1


def _ce(logits: torch.Tensor, label: int) -> float:
    return -(logits[label] - math.log(sum(math.exp(v) for v in logits.tolist()))).item()


def test_the_loss_is_the_published_one_against_a_float64_loop(tiny_cfg: Callable[..., DictConfig],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructed logits for the labeled images and both strong views, constructed teacher
    probabilities: the step's loss is ((CE_x + (L_s1 + L_s2) / 2) / 2), each L_s summed over the
    confident pixels and divided by the view's valid pixels."""
    from segcon.build import build_module

    module = build_module(tiny_cfg(*V2, "method.cutmix_prob=0", "pseudo_loss.ce.weight=1")).double()
    g = torch.Generator().manual_seed(0)
    b, k, h, w = 2, 5, 6, 4
    lx, l1, l2 = (torch.randn(b, k, h, w, generator=g, dtype=torch.float64) for _ in range(3))
    probs = torch.softmax(3 * torch.randn(b, k, h, w, generator=g, dtype=torch.float64), 1)
    mask = torch.randint(0, k, (b, h, w), generator=g)
    mask[0, 0, :2] = 255
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, -2:] = False  # crop padding of the second unlabeled image
    monkeypatch.setattr(module.net, "forward", lambda x: SegOutput(logits=lx))
    monkeypatch.setattr(module.net, "forward_complementary", lambda x, masks: SegOutput(logits=torch.cat([l1, l2])))
    monkeypatch.setattr(module, "weak_probs", lambda weak: (probs, None))
    monkeypatch.setattr(module, "logs_this_step", lambda: False)
    labeled = {"image": torch.zeros(b, 3, h, w, dtype=torch.float64), "mask": mask}
    unlabeled = {"image": torch.zeros(b, 3, h, w, dtype=torch.float64), "valid": valid,
                 "strong": torch.zeros(b, 2, 3, h, w, dtype=torch.float64)}
    loss, logs = module.unsupervised_step(labeled, unlabeled)

    ce_x = [_ce(lx[i, :, y, x], int(mask[i, y, x])) for i in range(b) for y in range(h) for x in range(w)
            if mask[i, y, x] != 255]
    top, label = probs.max(1)
    views = []
    for view in (l1, l2):
        total = sum(_ce(view[i, :, y, x], int(label[i, y, x])) for i in range(b) for y in range(h) for x in range(w)
                    if valid[i, y, x] and top[i, y, x] >= 0.95)
        views.append(total / int(valid.sum()))
    assert any(0 < float((top >= 0.95)[i].float().mean()) < 1 for i in range(b))  # some pixels kept, some not
    expected = (sum(ce_x) / len(ce_x) + (views[0] + views[1]) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert logs["loss"].item() == pytest.approx(expected, rel=1e-12)


def test_a_family_without_one_feature_width_is_refused(tiny_cfg: Callable[..., DictConfig]) -> None:
    from segcon.build import build_module

    with pytest.raises(ConfigError, match="dpt_dinov2"):
        build_module(tiny_cfg("method=unimatch_v2", "data.labeled_count=4"))
    build_module(tiny_cfg("method=unimatch_v2", "data.labeled_count=4", "method.comp_drop=false"))  # the ablation


def test_two_steps_with_pixel_contrast_evaluate_student_and_teacher(tiny_cfg: Callable[..., DictConfig]) -> None:
    from segcon.train import train

    metrics = train(tiny_cfg(*V2, "contrast=pixel", "contrast.pixel.warmup_steps=0", "model.projection={dim: 8}",
                             "trainer.max_steps=2"))
    assert 0.0 <= metrics["val/mIoU"] <= 1.0 and 0.0 <= metrics["val/teacher/mIoU_best"] <= 1.0


@pytest.mark.parametrize("contrast", ["pixel", "pixel_memory", "cac", "contextrast_vit"])
def test_each_contrastive_term_reads_both_strong_views_with_their_pseudo_labels(
        contrast: str, tiny_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    """On UniMatch V2 a term sees the labeled images and both complementary-dropout strong views,
    the views labeled by the teacher's confident pseudo-labels; its loss (past its warm-up) is finite
    and positive and its gradient reaches the pixels of both strong views through the dropped features."""
    import torch.nn.functional as F

    from segcon.build import build_module

    cfg = tiny_cfg(*V2, f"contrast={contrast}", "method.cutmix_prob=0")
    torch.manual_seed(0)
    module = build_module(cfg).train()
    b, k, size = 2, int(cfg.data.num_classes), 112
    labels = F.interpolate(torch.arange(16.0).reshape(1, 1, 4, 4).remainder(k).repeat(b, 1, 1, 1), size=(size, size),
                           mode="nearest")[:, 0].long()  # 16 blocks of every class in each image
    probs = F.one_hot(labels, k).permute(0, 3, 1, 2).float() * 0.97 + 0.03 / k  # the teacher is sure: 0.97 + 0.03 / k
    monkeypatch.setattr(module, "weak_probs", lambda weak: (probs, None))
    monkeypatch.setattr(module, "logs_this_step", lambda: False)
    seen: dict = {}
    term_loss = module.objective.contrast_loss

    def spy(output: SegOutput, targets, step: int):
        seen["rows"], seen["labels"] = output.logits.shape[0], targets.labels
        seen["loss"], logs = term_loss(output, targets, 10**6)
        return seen["loss"], logs

    monkeypatch.setattr(module.objective, "contrast_loss", spy)
    strong = torch.randn(b, 2, 3, size, size, requires_grad=True)
    labeled = {"image": torch.randn(b, 3, size, size), "mask": labels}
    unlabeled = {"image": torch.randn(b, 3, size, size), "valid": torch.ones(b, size, size, dtype=torch.bool),
                 "strong": strong}
    module.unsupervised_step(labeled, unlabeled)
    assert seen["rows"] == 3 * b and torch.equal(seen["labels"], labels.repeat(3, 1, 1))
    assert torch.isfinite(seen["loss"]) and float(seen["loss"].detach()) > 0
    grad = torch.autograd.grad(seen["loss"], strong)[0]
    assert float(grad[:, 0].abs().sum()) > 0 and float(grad[:, 1].abs().sum()) > 0


@pytest.mark.slow
@pytest.mark.ddp
def test_two_steps_under_ddp_sim(data_dir: Path, tmp_path: Path) -> None:
    """Two processes (gloo): the complementary masks, both strong views and the EMA teacher run on
    every rank, and the run evaluates."""
    from tests.test_train import _cli, _tiny_cli_args

    proc = _cli([*_tiny_cli_args(data_dir), *V2, "trainer=ddp_sim", "trainer.max_steps=2",
                 f"hydra.run.dir={tmp_path / 'run'}"], REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["val/mIoU"] <= 1.0 and 0.0 <= metrics["val/teacher/mIoU_best"] <= 1.0
