"""Counting what a training step asks of an accelerator: ATen ops that compute (each one a kernel
launch on a GPU) and host-synchronising ops (each one makes the host wait until the device has
drained its queue). Counted on any device, a CPU included: the counts are a property of the
program, not of the hardware, and repeat exactly for the same inputs. Views (`view`, `t`,
`permute`, `expand`, `slice`, `detach`, ...: ops whose output aliases their input) launch nothing
and are counted apart.

Only device work counts. A tensor is a *device tensor* when it is a parameter or buffer of the
watched module, a tensor of the batch, a tensor a factory op built with an explicit `device=`
(as code does that means the accelerator), or the output of an op with a device-tensor input.
Everything else is host work — Python numbers wrapped in tensors (`torch.tensor(0.5)`), index
arithmetic on host tensors — which on a GPU would run on the CPU without a launch or a wait, and
is left out of both counts.

Host-synchronising ops (on CUDA): reading a value (`.item()`, `int()`, `float()`, `bool()`,
`.tolist()`, `.cpu()`, `.numpy()`), ops whose output size depends on the data (`nonzero`,
boolean-mask indexing and assignment, `masked_select`, `unique`, `bincount`, `repeat_interleave`
without `output_size`), and `equal`.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten

_SIZE_FROM_DATA = {
    aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.bincount.default, aten.equal.default, aten.is_nonzero.default,
    aten._local_scalar_dense.default,
}
_FACTORIES = {"empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint", "randperm", "linspace",
              "eye", "scalar_tensor", "empty_strided", "normal", "zeros_like", "ones_like", "empty_like",
              "full_like", "rand_like", "randn_like", "randint_like"}


_VIEWS = {aten._unsafe_view.default, aten._reshape_alias.default}
"""View ops that do not declare an aliasing output."""


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _SIZE_FROM_DATA:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    return False


def _segcon_site() -> str:
    """`<module path>:<line>` of the innermost frame in segcon's own code (not this module)."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/segcon/" in path and not path.endswith("/opcount.py"):
            return f"{path[path.rindex('/segcon/') + 1:]}:{frame.lineno}"
    return "outside segcon"


class OpCounter(TorchDispatchMode):
    """Counts device ATen ops and host-synchronising ops while `counting`.

    Args:
        device_tensors: the tensors that live on the device (parameters, buffers, the batch).

    Attributes:
        ops: device ops that compute (kernels). views: device view ops (no kernel). syncs:
            host-synchronising ops (among `ops`).
        by_op: how often each op name was counted (`ops`), and `sync_ops` the same for syncs.
        sync_sites: where the syncs come from: the innermost segcon source line of each.
    """

    def __init__(self, device_tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._device = WeakTensorKeyDictionary()
        self.mark(device_tensors)
        self.counting = True
        self.explicit_device = False  # set by _DeviceArguments while a factory given a device= runs
        self.ops = self.views = self.syncs = 0
        self.by_op: Counter[str] = Counter()
        self.sync_ops: Counter[str] = Counter()
        self.sync_sites: Counter[str] = Counter()

    def mark(self, tensors: Iterable[Any]) -> None:
        """Declare `tensors` (any nesting of containers) device tensors."""
        for t in tree_leaves(tensors):
            if isinstance(t, torch.Tensor):
                self._device[t] = True

    def is_device(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self._device

    def unmark(self, t: torch.Tensor) -> None:
        """`t` is host memory (a copy the host made of device values)."""
        self._device.pop(t, None)

    def reset(self) -> None:
        self.ops = self.views = self.syncs = 0
        self.by_op.clear()
        self.sync_ops.clear()
        self.sync_sites.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run in this block are not counted (their device outputs still are tracked)."""
        before, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = before

    def _count(self, name: str, sync: bool, view: bool = False) -> None:
        if not self.counting:
            return
        if view:
            self.views += 1
            return
        self.ops += 1
        self.by_op[name] += 1
        if sync:
            self.syncs += 1
            self.sync_ops[name] += 1
            self.sync_sites[_segcon_site()] += 1

    def count_read(self, t: torch.Tensor, how: str) -> None:
        """A read of a device tensor's values by the host that does not dispatch an op."""
        if self.is_device(t):
            self._count(how, sync=True)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(t in self._device for t in inputs)
        if not on_device and func.__name__.split(".")[0] in _FACTORIES:
            on_device = self.explicit_device
        out = func(*args, **kwargs)
        if on_device:
            self._count(func.__name__, _is_sync(func, args, kwargs), func.is_view or func in _VIEWS)
            self.mark(out)
        return out


_READS = {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}
"""Host reads of a tensor's values that dispatch no op on a CPU (a GPU copies, then waits)."""


class _PythonCalls(TorchFunctionMode):
    """What only the Python call shows: whether a factory was given `device=` by its caller (the
    dispatcher fills in the default device), and the host reads in `_READS`."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _READS:
            self.counter.count_read(args[0], f"Tensor.{func.__name__}")
        explicit = getattr(func, "__name__", "") in _FACTORIES and kwargs.get("device") is not None
        before, self.counter.explicit_device = self.counter.explicit_device, explicit or self.counter.explicit_device
        try:
            out = func(*args, **kwargs)
        finally:
            self.counter.explicit_device = before
        if func is torch.Tensor.cpu and self.counter.is_device(args[0]):  # the copy is host memory
            if out is args[0]:  # a CPU run hands the tensor itself back: a host alias of it instead
                with self.counter.paused():
                    out = out.view_as(out)
            self.counter.unmark(out)
        return out


@contextlib.contextmanager
def counting(counter: OpCounter) -> Iterator[OpCounter]:
    """`counter` active, with the host reads that dispatch no op (`Tensor.tolist`, `.cpu()` and
    `.numpy()` of a device tensor) counted as syncs, and factories told apart by their `device=`."""
    with _PythonCalls(counter), counter:
        yield counter
