"""The code in docs/architecture.md runs as written, and the term it adds keeps the term contract."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from segcon.models.output import SegOutput
from segcon.objectives.base import Targets, Term

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_the_add_a_term_example_runs_and_keeps_the_contract(capsys) -> None:
    (block,) = _python_blocks(ROOT / "docs" / "architecture.md")
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
