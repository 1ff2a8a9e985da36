"""contrast=confidence: anchors, class budget, prototypes, bank and loss against loop references;
the state across DDP ranks and in the checkpoint; a confidence_ssl run."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from segcon.models.output import PixelEmbedding, SegOutput
from segcon.objectives.base import Targets
from segcon.objectives.confidence import ConfidenceContrastLoss
from segcon.utils.errors import ConfigError

K, D, IGNORE = 3, 4, 255


def _output(seed: int, b: int, h: int = 4, w: int = 5) -> SegOutput:
    g = torch.Generator().manual_seed(seed)
    emb = PixelEmbedding.from_dense(torch.randn(b, D, h, w, generator=g, dtype=torch.float64))
    return SegOutput(logits=torch.randn(b, K, h, w, generator=g, dtype=torch.float64) * 2,
                     embeddings={"projection": emb})


def _term(**kwargs) -> ConfidenceContrastLoss:
    return ConfidenceContrastLoss(K, D, **{"threshold": 0.6, **kwargs}).double()


def test_anchors_are_exactly_the_low_confidence_pixels_with_their_labels() -> None:
    out = _output(0, b=3)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, K, (3, 4, 5), generator=g)
    labels[:, 0, :2] = IGNORE
    confidence = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    confidence[0] = 1.0  # row 0 is labeled: its confidence is the student's, not this one
    labeled = torch.tensor([True, False, False])
    term = _term(anchors_per_class=1000)
    term.prototype_set[:] = True
    term.prototype_set[2] = False  # a class without a prototype gives no anchor
    index, y, ok = term.anchors(out, Targets(labels, IGNORE, confidence=confidence, labeled=labeled))
    assert index.numel() == K * 1000  # a fixed-size list, the valid anchors first
    index, y = index[ok], y[ok]
    probs = out.logits.softmax(1)
    expected = set()
    for i in range(3):
        for r in range(4):
            for c in range(5):
                t = int(labels[i, r, c])
                if t == IGNORE or t == 2:
                    continue
                score = float(probs[i, t, r, c]) if i == 0 else float(confidence[i, r, c])
                if score < 0.6:
                    expected.add((i * 20 + r * 5 + c, t))
    assert set(zip(index.tolist(), y.tolist(), strict=True)) == expected and len(index) == len(expected)


def test_every_class_gets_the_same_anchor_budget() -> None:
    out = _output(2, b=2, h=8, w=8)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :2] = 1  # class 1: 32 pixels, class 2: 4, class 0: the remaining 92
    labels[0, 7, :4] = 2
    confidence = torch.zeros(2, 8, 8, dtype=torch.float64)  # every pixel a candidate
    term = _term(anchors_per_class=10)
    term.prototype_set[:] = True
    _, y, ok = term.anchors(out, Targets(labels, IGNORE, confidence=confidence, labeled=torch.tensor([False, False])))
    assert torch.bincount(y[ok], minlength=K).tolist() == [10, 10, 4]


def _teacher(seed: int, b: int = 2) -> SegOutput:
    out = _output(seed, b)
    valid = torch.ones(b, 4, 5, dtype=torch.bool)
    valid[:, :, -1] = False  # crop padding never feeds prototypes or bank
    out.valid = valid
    return out


def _confident(teacher: SegOutput) -> list[tuple[int, torch.Tensor]]:
    """(class, normalised embedding) of every valid teacher pixel with confidence >= 0.6."""
    probs = teacher.logits.softmax(1)
    dense = F.normalize(teacher.embeddings["projection"].dense(), dim=1)
    found = []
    for i in range(probs.shape[0]):
        for r in range(4):
            for c in range(5):
                conf, label = probs[i, :, r, c].max(0)
                if teacher.valid[i, r, c] and conf >= 0.6:
                    found.append((int(label), dense[i, :, r, c]))
    return found


def test_prototype_ema_and_bank_against_a_loop() -> None:
    term = _term(prototype_momentum=0.9, bank_size=1000, bank_updates_per_class=1000)
    expected = {}
    banked: dict[int, list[torch.Tensor]] = {c: [] for c in range(K)}
    for step in range(3):
        teacher = _teacher(10 + step)
        pending = term._teacher_entries(teacher)
        for name, (feats, labels) in pending.items():
            term.enqueue(name, feats, labels)
        pixels = _confident(teacher)
        for c in range(K):
            members = [e for k, e in pixels if k == c]
            banked[c] += members
            if not members:
                continue
            mean = F.normalize(torch.stack(members).mean(0), dim=0)
            expected[c] = mean if c not in expected else 0.9 * expected[c] + 0.1 * mean
    assert sorted(expected) == [c for c in range(K) if term.prototype_set[c]]
    for c, proto in expected.items():
        torch.testing.assert_close(term.prototypes[c], proto, atol=1e-12, rtol=0)
        stored = term.bank.ordered(c)
        assert stored.shape[0] == len(banked[c])  # every confident pixel (budget above the count)
        # the same embeddings, in a per-step random order
        mine, theirs = sorted(map(tuple, stored.tolist())), sorted(map(tuple, torch.stack(banked[c]).tolist()))
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-12, rtol=0)


def test_prototypes_combine_ranks_by_their_pixel_counts() -> None:
    """Two ranks' entries enqueued together give the prototype of all their pixels at once."""
    a, b = _teacher(20), _teacher(21)
    together, single = _term(), _term()
    pa, pb = together._teacher_entries(a)["prototype"], together._teacher_entries(b)["prototype"]
    together.enqueue("prototype", torch.cat([pa[0], pb[0]]), torch.cat([pa[1], pb[1]]))
    both = SegOutput(logits=torch.cat([a.logits, b.logits]),
                     embeddings={"projection": PixelEmbedding.from_dense(torch.cat(
                         [a.embeddings["projection"].dense(), b.embeddings["projection"].dense()]))},
                     valid=torch.cat([a.valid, b.valid]))
    feats, labels = single._teacher_entries(both)["prototype"]
    single.enqueue("prototype", feats, labels)
    torch.testing.assert_close(together.prototypes, single.prototypes, atol=1e-12, rtol=0)


def test_loss_against_a_loop_with_one_negative_in_the_bank() -> None:
    out = _output(30, b=2)
    labels = torch.zeros(2, 4, 5, dtype=torch.long)
    labels[1] = 1
    term = _term(temperature=0.5, negatives_per_anchor=7, anchors_per_class=1000)
    protos = F.normalize(torch.randn(K, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64), dim=1)
    term.prototypes.copy_(protos)
    term.prototype_set[:2] = True
    negatives = F.normalize(torch.randn(2, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64), dim=1)
    term.bank.push(negatives, torch.tensor([0, 1]))  # class 0's only negative is entry 1, and back
    targets = Targets(labels, IGNORE, confidence=torch.zeros(2, 4, 5, dtype=torch.float64),
                      labeled=torch.tensor([False, False]), teacher=_teacher(31))
    loss = term(out, targets)
    z = F.normalize(out.embeddings["projection"].dense(), dim=1)
    values = []
    for i in range(2):
        for r in range(4):
            for c in range(5):
                k = int(labels[i, r, c])
                pos = float(z[i, :, r, c] @ protos[k]) / 0.5
                neg = float(z[i, :, r, c] @ negatives[1 - k]) / 0.5
                values.append(-pos + math.log(math.exp(pos) + 7 * math.exp(neg)))
    assert loss.item() == pytest.approx(sum(values) / len(values), rel=1e-10)


def test_without_a_teacher_or_prototypes(tiny_cfg: Callable[..., DictConfig]) -> None:
    out = _output(40, b=1)
    # a supervised warm-up (ground truth only, no teacher yet): a connected zero
    assert _term()(out, Targets(torch.zeros(1, 4, 5, dtype=torch.long), IGNORE)).item() == 0.0
    targets = Targets(torch.zeros(1, 4, 5, dtype=torch.long), IGNORE, labeled=torch.tensor([False]))
    with pytest.raises(ConfigError, match="method=confidence_ssl"):
        _term()(out, targets)
    from segcon.build import build_module

    with pytest.raises(ConfigError, match=r"read the teacher's output, but method=.*SupervisedModule has no teacher"):
        build_module(tiny_cfg("contrast=confidence"))
    targets.teacher = _teacher(41, b=1)
    term = _term()
    loss = term(out, targets)  # no prototype yet: a connected zero, and this step's entries wait
    assert loss.item() == 0.0 and set(term.pending_entries()) == {"prototype", "bank"}


def test_confidence_ssl_warms_up_then_trains_and_checkpoints_prototypes_and_bank(
    tiny_cfg: Callable[..., DictConfig],
) -> None:
    """data.sup_warmup_steps=2 of 5: steps 0-1 train on ground truth only (no teacher: a zero term,
    no prototype or bank entry, no kept share logged); from step 2 the teacher's entries, its kept
    share and per-class shares; step 2's term is still 0, as nothing was admitted before it, and
    the last step's is positive; prototypes, bank and the teacher's projection head are saved."""
    from segcon.train import train
    from tests.test_teacher_student import _rows

    cfg = tiny_cfg("method=confidence_ssl", "contrast=confidence", "data.pseudo_label_threshold=0.5",
                   "contrast.confidence.threshold=0.3", "contrast.confidence.bank_size=50",
                   "data.labeled_count=4", "trainer.max_steps=5", "data.sup_warmup_steps=2", "+callbacks.dump_memory._target_=tests.helpers.DumpMemory")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    dump = torch.load(run / "memory_rank0.pt", weights_only=True)
    assert [sorted(step) for step in dump["steps"]] == [[], []] + [["bank", "prototype"]] * 3
    rows = [r for r in _rows(run) if r.get("train/loss_confidence")]
    loss = [float(r["train/loss_confidence"]) for r in rows]
    assert len(loss) == 5 and loss[:3] == [0.0, 0.0, 0.0] and loss[-1] > 0
    assert [bool(r.get("train/mask_ratio")) for r in rows] == [False, False, True, True, True]
    assert float(rows[2]["train/mask_ratio"]) > 0
    for r in rows[2:]:  # the per-class shares of the kept pixels
        assert sum(float(r[k]) for k in r if k.startswith("train/pl_share/") and r[k]) == pytest.approx(1.0)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    prefix = "objective.contrast.confidence."
    assert bool(state[prefix + "prototype_set"].any()) and int(state[prefix + "bank.count"].sum()) > 0
    assert any(k.startswith("teacher.heads.projection.") for k in state)


@pytest.mark.ddp
def test_ddp_sim_prototypes_and_bank_are_identical_on_both_ranks(data_dir: Path, tmp_path: Path) -> None:
    from tests.test_train import _cli, _tiny_cli_args

    extra = ["trainer=ddp_sim", "method=confidence_ssl", "contrast=confidence", "contrast.confidence.threshold=0.3",
             "contrast.confidence.bank_size=40", "contrast.confidence.bank_updates_per_class=8",
             "data.labeled_count=4", "data.unlabeled_batch_size=2", "trainer.max_steps=3",
             "+callbacks.dump_memory._target_=tests.helpers.DumpMemory"]
    proc = _cli([*_tiny_cli_args(data_dir), *extra, f"hydra.run.dir={tmp_path}/ddp"], Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ddp" / f"memory_rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k, v in ranks[0]["memory"].items():
        assert torch.equal(v, ranks[1]["memory"][k]), k
    replay = ConfidenceContrastLoss(5, 128, threshold=0.3, bank_size=40, bank_updates_per_class=8)
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        for name in ("prototype", "bank"):
            replay.enqueue(name, torch.cat([s0[name][0], s1[name][0]]), torch.cat([s0[name][1], s1[name][1]]))
    for k, v in replay.state_dict().items():
        torch.testing.assert_close(v, ranks[0]["memory"][k], atol=1e-6, rtol=0, msg=k)
    assert bool(ranks[0]["memory"]["prototype_set"].any())
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for k, v in ranks[0]["memory"].items():
        assert torch.equal(ckpt["state_dict"][f"objective.contrast.confidence.{k}"], v), k


def test_negatives_are_drawn_uniformly_from_the_other_classes_filled_slots() -> None:
    term = _term(bank_size=6)
    feats = torch.arange(K * 6 * D, dtype=torch.float64).reshape(K * 6, D)[:7]  # distinct rows
    term.bank.push(feats, torch.tensor([0, 0, 0, 1, 1, 2, 2]))  # filled: class 0: 3, class 1: 2, class 2: 2
    torch.manual_seed(0)
    drawn, found_any = term.draw_negatives(torch.ones(4000, dtype=torch.long), 5)
    drawn = drawn.reshape(-1, D)
    assert bool(found_any.all())
    allowed = {tuple(r) for r in feats[[0, 1, 2, 5, 6]].tolist()}  # classes 0 and 2, never 1 or an empty slot
    found = [tuple(r) for r in drawn.tolist()]
    assert set(found) == allowed
    share = torch.tensor([found.count(a) for a in sorted(allowed)], dtype=torch.float64) / len(found)
    assert torch.allclose(share, torch.full((5,), 0.2, dtype=torch.float64), atol=0.02)  # uniform over the union
    empty = _term()
    empty.bank.push(feats[:2], torch.tensor([1, 1]))
    _, found_any = empty.draw_negatives(torch.tensor([1, 1, 1, 0]), 2)
    assert found_any.tolist() == [False, False, False, True]  # class 0's other classes hold class 1's entries
