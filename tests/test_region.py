"""contrast=rc2l: the teacher's region targets on a constructed case, RCC / SMC as the set loss on
those targets, RMC and RFC against float64 loops (CutMix and cross-image negatives included), one
region without NaN, and rc2l runs (single process and ddp_sim)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets
from segcon.objectives.region import RegionConsistencyContrast
from segcon.objectives.set_loss import SetCriterion
from segcon.utils.errors import ConfigError

IGNORE, K, N, C = 255, 3, 5, 4


def test_teacher_regions_keep_confident_classes_above_the_minimum_area() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, 1], [0, 0, 1, IGNORE], [2, 2, 2, 2]]])
    confidence = torch.full((1, 4, 4), 0.9)
    confidence[0, 3, 1:] = 0.5  # the row of class 2 is mostly unsure: 2 confident pixels of class 2 are left
    targets = Targets(labels, IGNORE, confidence)
    region = RegionConsistencyContrast(K, confidence_threshold=0.7, min_area=2, teacher_regions="semantic").regions(targets, (4, 4))
    assert region.present[0].tolist() == [True, True, True]  # class 2: exactly min_area confident pixels
    valid = (labels[0] != IGNORE) & (confidence[0] >= 0.7)
    assert torch.equal(region.valid[0], valid.flatten())
    for c in range(K):
        assert torch.equal(region.masks[0, c], (labels[0] == c).flatten())
    region = RegionConsistencyContrast(K, confidence_threshold=0.7, min_area=3, teacher_regions="semantic").regions(targets, (4, 4))
    assert region.present[0].tolist() == [True, True, False]
    targets.labeled = torch.tensor([True])  # a row with ground truth holds no region
    assert not RegionConsistencyContrast(K, confidence_threshold=0.7, min_area=2, teacher_regions="semantic").regions(targets, (4, 4)).present.any()


def _case(seed: int, mixed: bool = False):
    """2 labeled + 3 unlabeled rows at 4x4 (the mask resolution) and the teacher's 3 weak views."""
    g = torch.Generator().manual_seed(seed)
    out = SegOutput(logits=torch.zeros(5, K, 4, 4, dtype=torch.float64),
                    decoder=torch.randn(5, C, 4, 4, generator=g, dtype=torch.float64, requires_grad=True),
                    mask_cls=torch.randn(5, N, K + 1, generator=g, dtype=torch.float64, requires_grad=True),
                    mask_logits=torch.randn(5, N, 4, 4, generator=g, dtype=torch.float64, requires_grad=True))
    labels = torch.randint(0, K, (5, 4, 4), generator=g)
    labels[3, :] = 1  # the second unlabeled image: one region only
    confidence = torch.rand(5, 4, 4, generator=g, dtype=torch.float64) * 0.5 + 0.5
    boxes = None
    if mixed:
        boxes = torch.zeros(5, 4, 4, dtype=torch.bool)
        boxes[2, :2, :2] = True
    teacher = SegOutput(logits=torch.zeros(3, K, 4, 4, dtype=torch.float64),
                        decoder=torch.randn(3, C, 4, 4, generator=g, dtype=torch.float64))
    targets = Targets(labels, IGNORE, confidence, labeled=torch.tensor([True, True, False, False, False]),
                      teacher=teacher, mix_boxes=boxes)
    return out, targets


def _reference(term: RegionConsistencyContrast, out: SegOutput, targets: Targets, cross_image: bool) -> tuple[float, float]:
    """RMC and RFC by loops, with the term's matching (tested against brute force elsewhere)."""
    rows = [2, 3, 4]
    slots = term.regions(targets, (4, 4))
    (matching,) = term.set_loss.match([(out.mask_cls, out.mask_logits)], slots,
                                      strict=term.teacher_regions == "semantic")
    regions, matches = [], []  # per unlabeled row: its matched regions' classes, masks and valid pixels; queries and targets
    for r in rows:
        index = matching.matched[r].nonzero().flatten()  # semantic: every present slot is matched
        regions.append(SimpleNamespace(classes=slots.classes[r, index], masks=slots.masks[r, index].float(),
                                       valid=slots.valid[r]))
        matches.append((matching.query[r, index], torch.arange(index.numel())))
    teacher = targets.teacher.decoder.clone()
    mixed = teacher.clone()
    if targets.mix_boxes is not None:
        for i, r in enumerate(rows):
            box = targets.mix_boxes[r]
            mixed[i][:, box] = teacher[(i - 1) % 3][:, box]

    def pool(features: torch.Tensor, weights: list[float]) -> torch.Tensor:
        total = sum(weights)
        v = sum(w * features[:, p // 4, p % 4] for p, w in enumerate(weights)) / (total + 1e-6)
        return v / v.norm()

    t_feats = []
    for i, region in enumerate(regions):
        t_feats.append([pool(mixed[i], [float(m[p]) * float(region.valid[p]) for p in range(16)]) for m in region.masks])
    rmc, rfc = [], []
    for i, ((queries, tgt), region) in enumerate(zip(matches, regions, strict=True)):
        if queries.numel() == 0:
            continue
        valid = region.valid.tolist()
        l_rmc, l_rfc = [], []
        for j, q in enumerate(queries.tolist()):
            a = [1 / (1 + math.exp(-float(out.mask_logits[rows[i], q].flatten()[p]))) for p in range(16)]
            sims = []
            for m in region.masks:
                inter = sum(a[p] * float(m[p]) for p in range(16) if valid[p])
                sims.append((2 * inter + 1) / (sum(a[p] for p in range(16) if valid[p])
                                               + sum(float(m[p]) for p in range(16) if valid[p]) + 1) / 0.1)
            k = int(tgt[j])
            l_rmc.append(-sims[k] + math.log(sum(math.exp(s) for s in sims)))
            s_feat = pool(out.decoder[rows[i]].detach(), [a[p] * valid[p] for p in range(16)])
            keys = [float(s_feat @ t) / 0.1 for t in t_feats[i]]
            if cross_image:
                c = int(region.classes[k])
                keys += [float(s_feat @ t) / 0.1 for o in range(3) if o != i
                         for t, oc in zip(t_feats[o], regions[o].classes.tolist(), strict=True) if oc != c]
            l_rfc.append(-keys[k] + math.log(sum(math.exp(s) for s in keys)))
        rmc.append(sum(l_rmc) / len(l_rmc))
        rfc.append(sum(l_rfc) / len(l_rfc))
    return sum(rmc) / len(rmc), sum(rfc) / len(rfc)


@pytest.mark.parametrize(("mixed", "cross_image"), [(False, False), (True, False), (True, True)])
def test_rmc_and_rfc_against_loops(mixed: bool, cross_image: bool) -> None:
    out, targets = _case(0, mixed)
    term = RegionConsistencyContrast(K, confidence_threshold=0.6, min_area=1, rmc_weight=1.0, rfc_weight=1.0,
                                     cross_image=cross_image, teacher_regions="semantic")
    values = term(out, targets)
    rmc, rfc = _reference(term, out, targets, cross_image)
    assert values["rmc"].item() == pytest.approx(rmc, rel=1e-10)
    assert values["rfc"].item() == pytest.approx(rfc, rel=1e-10)
    sum(values.values()).backward()
    assert out.decoder.grad is not None and out.mask_logits.grad is not None


def _assert_set_loss_on(values: dict, out: SegOutput, targets: Targets, rows: list[int]) -> None:
    """RCC and SMC equal MaskFormer's set loss on `rows` with the teacher's confident (>= 0.6)
    pseudo-labels as targets."""
    masked = targets.labels[rows].masked_fill(targets.confidence[rows] < 0.6, IGNORE)
    reference = SetCriterion(K, deep_supervision=False, ignore_index=IGNORE)(
        SegOutput(logits=out.logits[rows], mask_cls=out.mask_cls[rows], mask_logits=out.mask_logits[rows]),
        Targets(masked, IGNORE))
    assert values["rcc"].item() == pytest.approx(reference["ce"].item(), rel=1e-12)
    assert values["smc"].item() == pytest.approx((reference["focal"] + reference["dice"]).item(), rel=1e-12)


def test_rcc_and_smc_are_the_set_loss_on_the_teachers_confident_masks() -> None:
    out, targets = _case(1)
    term = RegionConsistencyContrast(K, confidence_threshold=0.6, min_area=1, teacher_regions="semantic")
    _assert_set_loss_on(term(out, targets), out, targets, [2, 3, 4])


def test_an_image_with_one_region_gives_zero_contrast_without_nan() -> None:
    out, targets = _case(2)
    targets.labeled = torch.tensor([True, True, True, False, True])  # only the one-region image is unlabeled
    values = RegionConsistencyContrast(K, confidence_threshold=0.0, min_area=1, teacher_regions="semantic")(out, targets)
    assert values["rmc"].item() == 0.0 and values["rfc"].item() == 0.0
    assert all(torch.isfinite(v) for v in values.values())


@pytest.mark.parametrize("options", [["contrast.rc2l.teacher_regions=semantic"],
                                     ["contrast.rc2l.rfc_features=mask_embed", "contrast.rc2l.empty_images=no_object"]])
def test_rc2l_trains_with_maskformer(tiny_cfg: Callable[..., DictConfig], options: list[str]) -> None:
    from segcon.train import train
    from tests.test_teacher_student import SSL, _rows, _values

    cfg = tiny_cfg("model=maskformer_r18_light", "loss=mask_set", "method=rc2l", "contrast=rc2l",
                   "pseudo_loss.ce.weight=0", "contrast.rc2l.confidence_threshold=0.0", "contrast.rc2l.min_area=1",
                   *SSL, *options)
    train(cfg)
    rows = _rows(Path(cfg.paths.output_dir))
    for key in ("rcc", "smc", "rmc", "rfc"):
        values = _values(rows, f"train/loss_rc2l/{key}")
        assert len(values) == 3 and all(math.isfinite(v) for v in values), key
    empty, per_image = _values(rows, "train/rc2l/empty_images"), _values(rows, "train/rc2l/regions_per_image")
    assert len(empty) == len(per_image) == 3 and all(0 <= v <= 1 for v in empty)
    shares = [[float(r[k]) for k in r if k.startswith("train/rc2l/region_share/")] for r in rows
              if r.get("train/rc2l/empty_images")]
    assert all(len(s) == cfg.data.num_classes for s in shares)  # one per class
    for share, n in zip(shares, per_image, strict=True):  # the shares sum to 1 when a region was kept
        assert sum(share) == pytest.approx(1.0 if n > 0 else 0.0)
    if "contrast.rc2l.teacher_regions=semantic" in options:  # (an untrained teacher's queries may all say
        # "no object": no query region yet)
        assert all(v > 0 for v in _values(rows, "train/loss_rc2l/smc"))


@pytest.mark.ddp
def test_ddp_sim_rc2l_trains(data_dir: Path, tmp_path: Path) -> None:
    from tests.test_train import _cli, _tiny_cli_args

    extra = ["trainer=ddp_sim", "model=maskformer_r18_light", "loss=mask_set", "method=rc2l", "contrast=rc2l",
             "pseudo_loss.ce.weight=0", "contrast.rc2l.confidence_threshold=0.0", "contrast.rc2l.min_area=1",
             "data.labeled_count=4", "data.unlabeled_batch_size=2", "trainer.max_steps=2", "data.subset.val=2"]
    proc = _cli([*_tiny_cli_args(data_dir), *extra, f"hydra.run.dir={tmp_path}/ddp"], Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "metrics.json").is_file()


def test_the_teachers_kept_regions_are_counted_per_image_and_class() -> None:
    out, targets = _case(6)
    targets.confidence[3] = 0.1  # the second unlabeled image: nothing confident, no region
    targets.confidence[4][targets.labels[4] == 0] = 0.1  # the third: no region of class 0
    names = ["a", "b", "c"]
    term = RegionConsistencyContrast(K, confidence_threshold=0.6, min_area=2, teacher_regions="semantic")
    assert term.diagnostics(names) == {}  # no computed step yet
    term(out, targets)
    found = term.diagnostics(names)
    kept = [[c for c in range(K) if int(((targets.labels[r] == c) & (targets.confidence[r] >= 0.6)).sum()) >= 2]
            for r in (2, 3, 4)]  # the unlabeled rows' regions, counted here from the labels
    total = sum(map(len, kept))
    assert kept[1] == [] and 0 not in kept[2] and total >= 2
    assert found["regions_per_image"].item() == pytest.approx(total / 3)
    assert found["empty_images"].item() == pytest.approx(1 / 3)
    for c, name in enumerate(names):
        assert found[f"region_share/{name}"].item() == pytest.approx(sum(c in r for r in kept) / total)
    term(out, Targets(targets.labels, IGNORE))  # a supervised warm-up step: no teacher, nothing to log
    assert term.diagnostics(names) == {}


def test_rc2l_needs_a_mask_classification_head_and_a_teacher() -> None:
    out, targets = _case(3)
    term = RegionConsistencyContrast(K)
    with pytest.raises(ConfigError, match="maskformer"):
        term(SegOutput(logits=out.logits, decoder=out.decoder), targets)
    targets.teacher = None
    with pytest.raises(ConfigError, match="method=rc2l"):
        term(out, targets)


def _query_case(seed: int):
    """`_case` with a teacher that has queries: 3 teacher views, N = 5 queries each with known
    classes and confidences, masks from seeded logits, and a CutMix box on the first unlabeled row."""
    out, targets = _case(seed, mixed=True)
    g = torch.Generator().manual_seed(seed + 10)
    top = torch.tensor([[0, 1, 3, 2, 1], [2, 2, 0, 3, 1], [1, 0, 0, 2, 3]])  # 3 = "no object"
    score = torch.tensor([[0.9, 0.95, 0.9, 0.5, 0.8], [0.9, 0.7, 0.99, 0.9, 0.85], [0.9, 0.6, 0.9, 0.9, 0.9]],
                         dtype=torch.float64)
    probs = ((1 - score) / K)[..., None].expand(3, N, K + 1).clone()  # the rest shared by the other columns
    probs.scatter_(2, top[..., None], score[..., None])
    targets.teacher.mask_cls = probs.log()
    targets.teacher.mask_logits = torch.randn(3, N, 4, 4, generator=g, dtype=torch.float64)
    targets.teacher.mask_embed = torch.randn(3, N, C, generator=g, dtype=torch.float64)
    out.mask_embed = torch.randn(5, N, C, generator=g, dtype=torch.float64, requires_grad=True)
    return out, targets, top, score


def test_teacher_query_regions_are_its_confident_queries_split_by_the_cutmix_box() -> None:
    _, targets, top, score = _query_case(4)
    targets.teacher.valid = torch.ones(3, 4, 4, dtype=torch.bool)
    targets.teacher.valid[1, 3] = False  # the second view's last row is crop padding
    targets.teacher.mask_logits[1, 0] = -5.0  # a confident query whose mask is mostly padding:
    targets.teacher.mask_logits[1, 0, 3] = 5.0  # 4 padding pixels and 1 real one, under min_area
    targets.teacher.mask_logits[1, 0, 0, 0] = 5.0
    term = RegionConsistencyContrast(K, confidence_threshold=0.75, min_area=2, teacher_regions="queries")
    slots = term.regions(targets, (4, 4))
    masks = targets.teacher.mask_logits.flatten(2) > 0
    real = targets.teacher.valid.flatten(1)
    assert slots.masks.shape == (5, 2 * N, 16)
    for row in range(5):
        if row < 2:  # labeled rows hold no region
            assert not slots.present[row].any()
            continue
        u = row - 2
        box = targets.mix_boxes[row].flatten()
        for j in range(2 * N):
            v = u if j < N else (u - 1) % 3  # the row's own view, then the previous one (its box)
            q = j % N
            inside = ~box if j < N else box
            mask = masks[v, q] & inside
            assert torch.equal(slots.masks[row, j], mask), (row, j)
            valid = torch.where(box, real[(u - 1) % 3], real[u])
            confident = int(top[v, q]) < K and float(score[v, q]) >= 0.75
            assert bool(slots.present[row, j]) == (confident and int((mask & valid).sum()) >= 2), (row, j)
            if confident:
                assert int(slots.classes[row, j]) == int(top[v, q])
        assert torch.equal(slots.valid[row], torch.where(box, real[(u - 1) % 3], real[u]))
    assert slots.present.sum() > 0 and not slots.present[:, N:].all()


def test_region_feature_contrast_on_mask_embeddings_against_a_loop() -> None:
    out, targets, _, _ = _query_case(5)
    term = RegionConsistencyContrast(K, confidence_threshold=0.75, min_area=1, rfc_weight=1.0,
                                     teacher_regions="queries", rfc_features="mask_embed")
    values = term(out, targets)
    slots = term.regions(targets, (4, 4))
    (matching,) = term.set_loss.match([(out.mask_cls, out.mask_logits)], slots, strict=False)
    teacher = targets.teacher.mask_embed
    per_image = []
    for row in (2, 3, 4):
        u = row - 2
        matched = [j for j in range(2 * N) if matching.matched[row, j]]
        if not matched:
            continue
        keys = [teacher[u if j < N else (u - 1) % 3, j % N] for j in matched]
        keys = [k / k.norm() for k in keys]
        losses = []
        for j in matched:
            s = out.mask_embed[row, int(matching.query[row, j])].detach()
            s = s / s.norm()
            logits = [float(s @ k) / 0.1 for k in keys]
            losses.append(-logits[matched.index(j)] + math.log(sum(math.exp(x) for x in logits)))
        per_image.append(sum(losses) / len(losses))
    assert len(per_image) >= 2 and values["rfc"].item() == pytest.approx(sum(per_image) / len(per_image), rel=1e-10)
    values["rfc"].backward()
    assert out.mask_embed.grad is not None and out.mask_embed.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="teacher_regions=queries"):
        RegionConsistencyContrast(K, rfc_features="mask_embed", teacher_regions="semantic")
    with pytest.raises(ConfigError, match="empty_images"):
        RegionConsistencyContrast(K, empty_images="drop")


def _set_terms_reference(term: RegionConsistencyContrast, out: SegOutput, targets: Targets,
                         rows: list[int]) -> tuple[float, float]:
    """RCC and SMC by loops, with the term's matching: RCC the class-weighted mean over the queries of
    `rows` of −log p(class of the query's region, or "no object"); SMC the weighted sigmoid focal
    (α 0.25, γ 2) and dice of each matched query's mask against its region's over the valid
    pixels, summed over the batch's matched regions and divided by their number."""
    slots = term.regions(targets, (4, 4))
    (matching,) = term.set_loss.match([(out.mask_cls, out.mask_logits)], slots,
                                      strict=term.teacher_regions == "semantic")
    _, w_focal, w_dice = term.set_loss.weights
    nll = weight = 0.0
    for r in rows:
        region_of = {int(matching.query[r, s]): int(slots.classes[r, s])
                     for s in range(slots.present.shape[1]) if matching.matched[r, s]}
        for q in range(N):
            c = region_of.get(q, K)
            w = 1.0 if c < K else term.set_loss.no_object_weight
            nll += w * -float(out.mask_cls[r, q].log_softmax(-1)[c])
            weight += w
    focal = dice = 0.0
    count = 0
    for r in range(out.mask_cls.shape[0]):
        for s in range(slots.present.shape[1]):
            if not matching.matched[r, s]:
                continue
            count += 1
            x = out.mask_logits[r, int(matching.query[r, s])].flatten().tolist()
            pixels = [p for p in range(16) if slots.valid[r, p]]
            y = {p: bool(slots.masks[r, s, p]) for p in pixels}
            prob = {p: 1 / (1 + math.exp(-x[p])) for p in pixels}
            focal += sum(-0.25 * (1 - prob[p]) ** 2 * math.log(prob[p]) if y[p]
                         else -0.75 * prob[p] ** 2 * math.log(1 - prob[p]) for p in pixels) / len(pixels)
            dice += 1 - (2 * sum(prob[p] for p in pixels if y[p]) + 1) / (sum(prob.values()) + sum(y.values()) + 1)
    return nll / weight, (w_focal * focal + w_dice * dice) / count


@pytest.mark.parametrize(("cross_image", "empty_images"), [(False, "skip"), (True, "skip"), (True, "no_object")])
def test_the_default_query_regions_give_all_four_terms_of_the_loops(cross_image: bool, empty_images: str) -> None:
    """The default path (`teacher_regions: queries`, pooled region features, CutMix): RCC and SMC
    against `_set_terms_reference`, RMC and RFC against `_reference`; the third unlabeled row's
    teacher view (no CutMix box there) is unconfident, so it holds no region, and the first view has
    a row of crop padding and `empty_images` decides whether its
    queries are taught "no object"."""
    out, targets, _, _ = _query_case(7)
    targets.teacher.mask_cls[2] = torch.full((N, K + 1), 1.0 / (K + 1), dtype=torch.float64).log()
    targets.teacher.valid = torch.ones(3, 4, 4, dtype=torch.bool)
    targets.teacher.valid[0, 3] = False  # the first view's last row is crop padding
    term = RegionConsistencyContrast(K, confidence_threshold=0.75, min_area=2, rmc_weight=1.0, rfc_weight=1.0,
                                     cross_image=cross_image, empty_images=empty_images)
    assert term.teacher_regions == "queries" and term.rfc_features == "pooled"
    slots = term.regions(targets, (4, 4))
    assert slots.present[2].any() and slots.present[3].any() and not slots.present[4].any()
    values = term(out, targets)
    rcc, smc = _set_terms_reference(term, out, targets, [2, 3, 4] if empty_images == "no_object" else [2, 3])
    rmc, rfc = _reference(term, out, targets, cross_image)
    assert values["rcc"].item() == pytest.approx(rcc, rel=1e-10)
    assert values["smc"].item() == pytest.approx(smc, rel=1e-10)
    assert values["rmc"].item() == pytest.approx(rmc, rel=1e-10)
    assert values["rfc"].item() == pytest.approx(rfc, rel=1e-10)
    sum(values.values()).backward()
    assert out.mask_cls.grad[4].abs().sum() > 0 if empty_images == "no_object" else out.mask_cls.grad[4].abs().sum() == 0


@pytest.mark.parametrize("empty_images", ["no_object", "skip"])
def test_an_image_without_regions_teaches_no_object_or_nothing(empty_images: str) -> None:
    out, targets = _case(6)
    targets.confidence[3] = 0.1  # the second unlabeled image: nothing confident, no region
    term = RegionConsistencyContrast(K, confidence_threshold=0.6, min_area=1, empty_images=empty_images,
                                     teacher_regions="semantic")
    _assert_set_loss_on(term(out, targets), out, targets, [2, 3, 4] if empty_images == "no_object" else [2, 4])


def test_the_set_loss_settings_reach_the_matcher_and_the_terms_it_sets_are_refused() -> None:
    """contrast.rc2l.set_loss holds SetCriterion's keys (one source: loss=mask_set's defaults)."""
    default = RegionConsistencyContrast(K).set_loss
    term = RegionConsistencyContrast(K, set_loss={"no_object_weight": 0.3, "cost_focal": 5.0, "dice_weight": 2.0})
    assert term.set_loss.costs == (default.costs[0], 5.0, default.costs[2])
    assert term.set_loss.weights == (default.weights[0], default.weights[1], 2.0)
    assert term.set_loss.no_object_weight == pytest.approx(0.3)
    assert not term.set_loss.deep_supervision
    with pytest.raises(ConfigError, match=r"set_loss\.deep_supervision"):
        RegionConsistencyContrast(K, set_loss={"deep_supervision": True})
