"""SupervisedModule: one network trained with one Objective on labelled batches; the base of every
method. What every run does besides the step comes from segcon.engine: evaluation and reporting
(EvaluationModule), the divergence check (DivergenceGuard), optimisation (`optimization`) and the
terms' class frequencies and memories (segcon.engine.terms)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from segcon.engine.divergence import DivergenceGuard, DivergencePolicy
from segcon.engine.evaluation import EvaluationModule, split_summary
from segcon.engine.memory import check_fits, estimate_memory
from segcon.engine.optim import freeze_encoder, global_batch, optimization
from segcon.engine.terms import fill_memories, give_class_frequencies, term_diagnostics
from segcon.models.base import SegModel
from segcon.objectives.base import Targets
from segcon.objectives.objective import Objective
from segcon.utils.distributed import gather_objects
from segcon.utils.errors import ConfigError


class SupervisedModule(EvaluationModule):
    """Trains `net` on labelled batches with `objective`; validates as EvaluationModule does.

    Args:
        net: the network (any SegModel).
        objective: supervised (+ contrastive) terms.
        optim: optimizer and schedule settings (see conf/optim/*.yaml); the learning rate is
            rescaled to the run's global batch when fitting starts (`optim.scale_lr`).
        divergence: what a step with a non-finite loss or gradient does (the `divergence`
            config: stop, or skip up to `max_consecutive` in a row; segcon.engine.divergence).
        memory_estimate: before the first step, print the memory a step needs (one extra forward
            pass of two images, leaving no trace) and, on a GPU, stop with the knobs to turn when
            it will not fit (segcon.engine.memory; the top-level `memory_estimate` key).
        **evaluation: EvaluationModule's arguments (data settings, overlays, run config,
            inference, detailed metrics).

    Logged: `train/loss` and `train/loss_<term>` on the steps Lightning writes, and what
    EvaluationModule logs.
    """

    def __init__(
        self,
        net: SegModel,
        objective: Objective,
        optim: Mapping[str, Any],
        divergence: Mapping[str, Any] | None = None,
        memory_estimate: bool = True,
        **evaluation: Any,
    ) -> None:
        super().__init__(net, **evaluation)
        self.objective = objective
        self.optim_cfg = dict(optim)
        if self.optim_cfg.get("freeze_encoder"):
            freeze_encoder(net)  # before a teacher copies the network, and before DDP wraps it
        self.guard = DivergenceGuard(DivergencePolicy.from_config(divergence))
        # Training files replaced because they could not be read (data.on_bad_file=skip): the errors.
        self.skipped_files: list[str] = []
        self._step_logs: dict[str, Tensor] = {}
        self.stop_agreed: bool | None = None  # whether any rank was asked to stop, read with the step's check
        self._class_frequencies: dict[str, float] = {}
        self.memory_estimate = memory_estimate
        self._memory_reported = False

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Check the `method` config node (plain containers) before anything is built; raise one
        ConfigError naming the key and the fix."""
        if int(config.get("num_overlays", 0)) < 0:
            raise ConfigError(f"method.num_overlays must be >= 0, got {config['num_overlays']}")

    # -- the step --------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        output = self.net(batch["image"])
        loss, logs = self.objective(output, Targets(batch["mask"], self.ignore_index), self.global_step)
        self.log_step(logs, batch["image"].shape[0])
        return loss

    def logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's logged values to the loggers (every
        `trainer.log_every_n_steps` steps, as its logger connector counts them): values that cost
        a read of the device are computed only then."""
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def log_step(self, logs: Mapping[str, Tensor], batch_size: int) -> None:
        """Log a training step's values as `train/<name>` on the steps whose values Lightning
        writes (`self.log` costs two copies on the device per value), with the terms' diagnostics
        (`Term.diagnostics`, computed only then); the divergence check reads every step's values."""
        self._step_logs = {f"train/{k}": v for k, v in logs.items()}
        if self.logs_this_step():
            diagnostics = {f"train/{k}": v for k, v in term_diagnostics(self.objective, self.class_names).items()}
            self.log_dict({**self._step_logs, **diagnostics}, batch_size=batch_size)

    # -- around the step: the engine's helpers ---------------------------------------------

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        parts = [batch] if "skipped" in batch else [p for p in batch.values() if isinstance(p, dict)]
        for err in (err for part in parts for err in part.get("skipped", ())):
            if err not in self.skipped_files:
                self.skipped_files.append(err)
                rank_zero_warn(f"data.on_bad_file=skip: replaced a training image ({len(self.skipped_files)} so far): {err}")
        self.guard.before_step(self.net)
        if self.memory_estimate and not self._memory_reported:
            self._memory_reported = True
            self.report_memory(batch)

    def step_images(self, batch: dict[str, Any]) -> tuple[Tensor, int]:
        """Two images of a training batch at its crop, and how many images a step runs with a
        gradient (here the batch)."""
        return batch["image"][:2], int(batch["image"].shape[0])

    def report_memory(self, batch: dict[str, Any]) -> None:
        """Print the step's memory estimate (segcon.engine.memory); on a GPU, a ConfigError naming
        the knobs when it exceeds what is free besides what the run already holds."""
        sample, images = self.step_images(batch)
        estimate = estimate_memory(self.net, getattr(self, "teacher", None), str(self.optim_cfg.get("name", "adamw")),
                                   sample, images, self.trainer.precision_plugin.forward_context())
        rank_zero_info(estimate.describe())
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            check_fits(estimate, free + torch.cuda.memory_allocated(self.device), self.batch_keys())

    def batch_keys(self) -> str:
        """The batch settings a user lowers when a step does not fit, with their values."""
        return f"data.batch_size ({self.trainer.datamodule.batch_size})"

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The divergence check (segcon.engine.divergence): stop, or drop this step's gradients.

        Its one reduction and host read per step also carry whether any rank was asked to stop
        (a signal: `stop_agreed`, which StopTogether acts on after the step), so the agreement
        costs no collective or read of its own."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.stop_agreed = self.guard.check(
            self.global_step, self._step_logs, self.net, optimizer,
            reduce_max=lambda t: self.trainer.strategy.reduce(t, reduce_op="max"),
            check_gradients=scaler is None,
            stop_requested=bool(getattr(self.trainer._signal_connector, "requested", False)))

    @property
    def step_skipped(self) -> bool:
        """Whether the divergence check dropped this step (`divergence.policy=skip`)."""
        return self.guard.skipped

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Fill the memories of memory-using terms with this step's entries from all ranks (not
        after a skipped step)."""
        if not self.step_skipped:
            fill_memories(self.objective, self.all_gather, self.trainer.world_size)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer and schedule (segcon.engine.optim.optimization), at the learning rate of
        the global batch: the datamodule's per-device batch times the devices times the batches
        accumulated into one optimizer step."""
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        return optimization(self.net, self.optim_cfg, int(self.trainer.estimated_stepping_batches),
                            None if batch is None else global_batch(int(batch), self.trainer))

    def setup(self, stage: str) -> None:
        """Before fitting: give the terms that weigh classes by frequency (loss=imbalance) the
        class frequencies of the labeled training images (the datamodule counts them)."""
        if stage == "fit":
            self._class_frequencies = give_class_frequencies(self.objective, self.trainer.datamodule, self.class_names)

    def on_fit_start(self) -> None:
        if self.guard.policy.policy == "skip" and self.trainer.accumulate_grad_batches > 1:
            raise ConfigError("divergence.policy=skip drops one optimizer step's gradients and BatchNorm statistics; "
                              "with trainer.accumulate_grad_batches > 1 a step spans several batches: use "
                              "divergence.policy=stop, or accumulate_grad_batches=1")
        info = self._split_info()
        if info:
            rank_zero_info(split_summary(info))
        info = {**info, **self._class_frequencies}
        if info:
            for logger in self.loggers:
                logger.log_hyperparams(info)

    def on_train_end(self) -> None:
        """Every rank's replaced training files, gathered, and one warning listing them."""
        if self.trainer.world_size > 1:
            lists = gather_objects(self.skipped_files, self.trainer.world_size)
            self.skipped_files = sorted({err for part in lists for err in part})
        if self.skipped_files:
            listed = "\n  ".join(self.skipped_files)
            rank_zero_warn(f"{len(self.skipped_files)} training file(s) could not be read and were replaced by the "
                           f"next image (data.on_bad_file=skip; also in metrics.json train/skipped_files):\n  {listed}")

    def report_extras(self, split: str) -> dict[str, Any]:
        """EvaluationModule's entries, and the skipped steps and replaced training files."""
        extras = super().report_extras(split)
        if self.guard.skipped_steps:
            extras["skipped_steps"] = self.guard.skipped_steps
        if self.skipped_files:
            extras["train/skipped_files"] = self.skipped_files
        return extras

    # -- checkpoint ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["segcon"].update(self.guard.state_dict(), skipped_files=list(self.skipped_files))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("segcon", {})
        self.guard.load_state_dict(state, resuming=self.resuming_fit())
        if self.resuming_fit():
            self.skipped_files = list(state.get("skipped_files", []))
