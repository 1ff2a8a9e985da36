"""The code in docs/architecture.md runs as written, and the term it adds keeps the term contract."""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_add_a_term_example_runs_and_keeps_the_contract(capsys) -> None:
    block = _python_blocks(ROOT / "docs" / "architecture.md")[0]
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(block, "docs/architecture.md", "exec"), namespace)  # our own page
    assert capsys.readouterr().out.strip() == "['loss', 'loss_ce', 'loss_entropy']"
    term = namespace["EntropyLoss"]()
    assert isinstance(term, Term) and not term.reads_teacher and not term.per_pixel
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[0, 0] = 255
    value = term(SegOutput(logits=logits), Targets(labels))
    p = logits.detach().softmax(1)
    entropy = -(p * p.log()).sum(1)
    expected = entropy[labels != 255].mean()  # the entropy of the valid pixels, by definition
    assert abs(value.item() - expected.item()) < 1e-12
    assert torch.equal(term(SegOutput.cat([SegOutput(logits=logits)], only=term.reads), Targets(labels)), value)


def test_the_add_a_method_example_averages_the_two_networks_and_trains(
    tiny_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The method of docs/architecture.md, imported as a user's module: its pseudo-label
    probabilities are the mean of the teacher's and the student's, and segcon-train runs it."""
    from segcon.build import build_module
    from segcon.train import train

    block = _python_blocks(ROOT / "docs" / "architecture.md")[1]
    module = types.ModuleType("docs_method")
    exec(compile(block, "docs/architecture.md", "exec"), module.__dict__)  # our own page
    monkeypatch.setitem(sys.modules, "docs_method", module)
    monkeypatch.setenv("SEGCON_TRUSTED_TARGETS", "docs_method.")
    overrides = ("method=mean_teacher", "method._target_=docs_method.AveragedTeacher", "data.labeled_count=4",
                 "trainer.max_steps=2", "trainer.max_epochs=-1", "method.sup_warmup_epochs=0")
    method = build_module(tiny_cfg(*overrides))
    assert type(method).__name__ == "AveragedTeacher"
    with torch.no_grad():
        method.teacher.model.segmentation_head[0].bias += 1.0  # the two networks now differ
        weak = torch.randn(2, 3, 32, 32)
        probs, _ = method.weak_probs(weak)
        expected = (method.teacher(weak).softmax(1) + method.net.forward_features(weak, heads=()).logits.softmax(1)) / 2
    assert torch.allclose(probs, expected, atol=1e-6) and not torch.allclose(probs, method.teacher(weak).softmax(1))
    metrics = train(tiny_cfg(*overrides))
    assert 0.0 <= metrics["val/mIoU"] <= 1.0


def test_the_configuration_reference_matches_conf() -> None:
    """docs/reference/config.md is what scripts/config_reference.py makes of conf/ now."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_reference
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    page = config_reference.reference()
    assert (ROOT / "docs" / "reference" / "config.md").read_text() == page, \
        "the configuration reference is stale: run `make docs` (python scripts/config_reference.py)"
    # every option file of every group has its section, with its keys and their comments
    for group in ("model", "contrast", "loss", "method", "data", "experiment"):
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            assert f"### `{group}={path.stem}`" in page, path
    assert "| `contrast.rc2l.confidence_threshold` | `0.7` | δ: teacher pixels below it are ignored |" in page


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: every page in the navigation, no broken link or anchor."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
