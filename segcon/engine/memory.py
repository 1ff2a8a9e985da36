"""The memory a training step needs, estimated before the first step: the parameters with their
gradients, optimizer moments and a teacher's copy, and the activations one image at the crop
saves for the backward pass, measured in one forward pass on the run's device and precision."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from segcon.utils.errors import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step (see the module docstring).

    Attributes:
        parameters, trainable: parameter counts of the trained network.
        weights, gradients, optimizer, teacher: bytes of the trained network's weights, their
            gradients, the optimizer's moments and a teacher's copy (0 without one).
        per_image: bytes saved for the backward pass by one image at the crop.
        images: images per step that run with a gradient (labeled + strong views).
        crop: the crop `(H, W)` measured.
    """

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    teacher: int
    per_image: int
    images: int
    crop: tuple[int, int]

    @property
    def activations(self) -> int:
        return self.per_image * self.images

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.teacher + self.activations

    def describe(self) -> str:
        """One line for the run's log."""
        gb = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        return (f"memory estimate per device: {self.parameters / 1e6:.1f} M parameters ({self.trainable / 1e6:.1f} M "
                f"trained): weights {gb(self.weights)}, gradients {gb(self.gradients)}, optimizer {gb(self.optimizer)}"
                + (f", teacher {gb(self.teacher)}" if self.teacher else "")
                + f"; activations {self.per_image / 2**20:.0f} MiB per image at {self.crop[0]}x{self.crop[1]} x "
                f"{self.images} images = {gb(self.activations)}; about {gb(self.total)} in all (without the "
                "framework's workspace)")


def saved_activation_bytes(forward: Callable[[], object], exclude: set[int]) -> int:
    """Bytes of the distinct tensor storages `forward()` saves for backward, those whose data
    pointer is in `exclude` (the parameters) left out."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def estimate_memory(net: nn.Module, teacher: nn.Module | None, optimizer: str, sample: Tensor, images: int,
                    context: AbstractContextManager | None = None) -> MemoryEstimate:
    """Measure `sample` (two images `[2, 3, H, W]` of a training batch: BatchNorm needs more than
    one) through `net.forward_features` in train mode under `context` (the run's precision), and
    add the parameter state; `optimizer` is `adamw` (two moments) or `sgd` (one). The network's
    buffers (BatchNorm statistics) and the random state are left as they were: the run that
    follows is the one it would have been."""
    params = list(net.parameters())
    trainable = [p for p in params if p.requires_grad]
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    exclude = {p.untyped_storage().data_ptr() for p in params}
    buffers = {k: b.detach().clone() for k, b in net.named_buffers()}
    was_training = net.training
    net.train()
    devices = [sample.device] if sample.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), context or nullcontext():
            per_image = saved_activation_bytes(lambda: net.forward_features(sample), exclude) // sample.shape[0]
    finally:
        net.train(was_training)
        with torch.no_grad():
            for k, b in net.named_buffers():
                b.copy_(buffers[k])
    teacher_bytes = 0 if teacher is None else size(teacher.parameters()) + sum(
        b.numel() * b.element_size() for b in teacher.buffers())
    moments = 2 if optimizer == "adamw" else 1
    return MemoryEstimate(sum(p.numel() for p in params), sum(p.numel() for p in trainable), size(params),
                          size(trainable), moments * size(trainable), teacher_bytes, per_image, images,
                          (int(sample.shape[-2]), int(sample.shape[-1])))


def check_fits(estimate: MemoryEstimate, free: int, batch: str) -> None:
    """A ConfigError naming the knobs when the estimate exceeds `free` bytes; `batch` names the
    batch keys and their values."""
    if estimate.total <= free:
        return
    raise ConfigError(f"this run needs about {estimate.total / GIB:.1f} GiB per device ({estimate.describe()}), "
                      f"but {free / GIB:.1f} GiB are free: lower {batch} or data.crop_size="
                      f"{list(estimate.crop)}, train in bf16 (trainer.precision=bf16-mixed), freeze the backbone "
                      "(optim.freeze_encoder=true), or use more devices with a smaller per-device batch")
