"""Callbacks used by tests that run the CLI in subprocesses (importable as tests.helpers)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from segcon.objectives.memory import MemoryUser


class DumpMemory(L.Callback):
    """Per rank: record every step's own pending memory entries, and at the end save them with
    the rank's final memory buffers to `<run dir>/memory_rank<r>.pt`."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def _term(self, pl_module: L.LightningModule) -> MemoryUser:
        return next(t for t in pl_module.objective.contrast.values() if isinstance(t, MemoryUser))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pending = self._term(pl_module).pending_entries()
        self.steps.append({k: (f.detach().clone(), lab.clone()) for k, (f, lab) in pending.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        term = self._term(pl_module)
        state = {k: v.clone() for k, v in term.memories.state_dict().items()}
        path = Path(trainer.default_root_dir) / f"memory_rank{trainer.global_rank}.pt"
        torch.save({"steps": self.steps, "memory": state}, path)
