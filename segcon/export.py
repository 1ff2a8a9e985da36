"""segcon-export: write a checkpoint's inference network as one file and check it against PyTorch.

    segcon-export ckpt=<checkpoint file or run dir> format=onnx|torchscript|safetensors out=<file>
                  [branch=student|teacher] [opset=<int>] [check_sizes=[[256,256],[192,320]]]
                  [tolerance=1e-4]

Only the inference graph is written: the inference network (`SegModel.model`) of the chosen
branch, without projection heads, weight branches or the other network of a teacher–student run. Its input
`image` is float32 [N, 3, H, W], RGB scaled to 0..1 and normalised with the run's data.mean and
data.std, H and W multiples of the model's input divisor; its output `logits` is
[N, K, H, W]. ONNX (torch.export-based exporter) has dynamic N, H and W. The run's config,
classes, palette and normalisation travel in the file (ONNX metadata and safetensors metadata
"segcon", TorchScript extra file "segcon.json"); segcon-predict and segcon-eval read the
safetensors file directly. A parity check then runs the written file (ONNX with onnxruntime on
CPU) and PyTorch on random inputs of every check size and prints the largest difference; the
exit status is 1 when it exceeds tolerance x max(1, max |logit|).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from segcon.config import validate_cfg
from segcon.engine.evaluation import best_key
from segcon.methods.teacher_student import TEACHER
from segcon.restore import build_inference_net, compose_entry, rebuild_config, required
from segcon.utils.checkpoint import (
    SAFETENSORS_KEY,
    RunCheckpoint,
    load_run_checkpoint,
    read_progress,
)
from segcon.utils.cli import run_command
from segcon.utils.errors import ConfigError
from segcon.utils.io import make_output_dir

USAGE = __doc__.split("\n\n")[1]
FORMATS = ("onnx", "torchscript", "safetensors")

Runner = Callable[[Tensor], Tensor]
"""Runs an exported file: images `[N, 3, H, W]` -> logits `[N, K, H, W]` (CPU tensors)."""


def model_card(cfg: DictConfig, ckpt: RunCheckpoint, branch: str, stride: int) -> dict[str, Any]:
    """What a user of the exported file needs, plus what segcon needs to rebuild the model."""
    data = cfg.data
    step, epoch = read_progress(ckpt.path)
    best = ckpt.segcon.get(best_key("" if branch == "student" else TEACHER))
    return {
        "format": "segcon inference model",
        "input": f"image float32 [N, 3, H, W]: RGB / 255, minus mean, over std; H, W multiples of {stride}",
        "output": "logits float32 [N, K, H, W]",
        "branch": branch,
        "output_stride": stride,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "palette": OmegaConf.to_container(data.palette),
        "mean": list(data.mean),
        "std": list(data.std),
        "ignore_index": data.ignore_index,
        "global_step": step,
        "epoch": epoch,
        "best_miou": None if best is None or math.isnan(best) else best,
        "source_checkpoint": str(ckpt.path),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def export_onnx(model: nn.Module, example: Tensor, out: Path, stride: int, card: dict, opset: int | None) -> Runner:
    """Export with torch.export (dynamic batch, height and width); return an onnxruntime runner."""
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
    except ImportError as err:
        raise ConfigError(f"format=onnx needs onnx, onnxscript and onnxruntime: {err}. pip install onnx onnxscript onnxruntime") from None
    dim = torch.export.Dim
    # H and W are multiples of the stride by construction, so the graph needs no padding logic.
    height = dim("height_blocks", min=1) * stride if stride > 1 else dim("height", min=1)
    width = dim("width_blocks", min=1) * stride if stride > 1 else dim("width", min=1)
    program = torch.onnx.export(
        model, (example,), input_names=["image"], output_names=["logits"], opset_version=opset,
        dynamic_shapes=({0: dim("batch", min=1), 2: height, 3: width},), dynamo=True, verbose=False,
    )
    program.model.metadata_props[SAFETENSORS_KEY] = json.dumps(card)
    program.save(str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])


def export_torchscript(model: nn.Module, example: Tensor, out: Path, card: dict) -> Runner:
    """Trace, save with the model card as the extra file segcon.json; return the reloaded module.
    (Tracing fixes Python-level control flow to the example's; the parity check at a second size
    is what shows the trace generalises.)"""
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates TorchScript, and the tracer warns about every shape-derived
        # Python value; both are expected here, and the parity check is the real test.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"segcon.json": json.dumps(card)})
        loaded = torch.jit.load(str(out), map_location="cpu")
    return loaded


def export_safetensors(model: nn.Module, out: Path, card: dict, branch: str) -> Runner:
    """Save the state_dict with the card as metadata; return the network rebuilt from the file
    the way segcon-predict reads it."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={SAFETENSORS_KEY: json.dumps(card)})
    ckpt = load_run_checkpoint(out)
    cfg = OmegaConf.create(ckpt.config)
    return build_inference_net(cfg, ckpt, branch).model


@dataclass(frozen=True)
class Parity:
    """One parity-check input: its shape, max |exported - PyTorch|, max |PyTorch logit|, the
    fraction of pixels whose argmax agrees, and whether the difference is within tolerance."""

    shape: tuple[int, ...]
    max_diff: float
    max_logit: float
    argmax_agree: float
    ok: bool


def check_parity(model: nn.Module, run: Runner, shapes: Sequence[tuple[int, ...]], tolerance: float) -> list[Parity]:
    """Compare `run` with `model` on seeded random inputs of every shape."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for shape in shapes:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            ref, out = model(x), run(x)
        if out.shape != ref.shape:
            raise RuntimeError(f"exported model returned {tuple(out.shape)} for input {shape}, PyTorch {tuple(ref.shape)}")
        diff, scale = float((out - ref).abs().max()), float(ref.abs().max())
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        results.append(Parity(tuple(shape), diff, scale, agree, diff <= tolerance * max(1.0, scale)))
    return results


def export(entry: DictConfig, console: Console | None = None) -> list[Parity]:
    """Write the export described by `entry`; return the parity-check results."""
    console = console or Console()
    fmt = str(entry.format)
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}; use one of {', '.join(FORMATS)}")
    ckpt = load_run_checkpoint(required(entry, "ckpt", "logs/train/runs/<date>_<time>"))
    out = Path(str(required(entry, "out", "model.onnx"))).expanduser()
    cfg = rebuild_config(ckpt, entry, ())
    validate_cfg(cfg, check_data=False, training=False)
    net = build_inference_net(cfg, ckpt, entry.branch)
    model, stride = net.model.eval(), net.input_divisor
    sizes = [tuple(int(v) for v in s) for s in entry.check_sizes]
    if len(sizes) < 1 or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ConfigError(f"check_sizes must be a list of [height, width] pairs, got {entry.check_sizes}")
    # Round up to the stride; the first shape has batch 2 (a batch of 1 would be fixed as a
    # constant by torch.export), the others batch 1, so the batch axis is checked dynamic too.
    shapes = [(2 if i == 0 else 1, 3, -(-h // stride) * stride, -(-w // stride) * stride) for i, (h, w) in enumerate(sizes)]
    card = model_card(cfg, ckpt, entry.branch, stride)
    make_output_dir(out.parent, "out")
    example = torch.randn(*shapes[0])
    name = type(net).describe(OmegaConf.to_container(cfg.model, resolve=True))
    console.print(f"exporting the {entry.branch} {name} of {ckpt.path} as {fmt} ...")
    if fmt == "onnx":
        run = export_onnx(model, example, out, stride, card, entry.get("opset"))
    elif fmt == "torchscript":
        run = export_torchscript(model, example, out, card)
    else:
        run = export_safetensors(model, out, card, entry.branch)
    results = check_parity(model, run, shapes, float(entry.tolerance))

    runtime = "onnxruntime (CPU)" if fmt == "onnx" else f"{fmt} reloaded"
    table = Table(title=f"parity: {out} ({runtime}) vs PyTorch, tolerance {entry.tolerance} x max(1, max |logit|)")
    for col in ("input", "max |diff|", "max |logit|", "argmax agree", ""):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row("x".join(map(str, r.shape)), f"{r.max_diff:.2e}", f"{r.max_logit:.2f}",
                      f"{100 * r.argmax_agree:.3f}%", "[green]ok[/green]" if r.ok else "[red]FAILED[/red]")
    console.print(table)
    n_params = sum(v.numel() for v in model.state_dict().values())
    console.print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; inference model only, {n_params:,} values)")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`segcon-export`); returns 0, or 1 when the parity check fails."""

    def command(args: list[str]) -> int:
        entry, run_overrides = compose_entry("export", args)
        if run_overrides:
            raise ConfigError(f"segcon-export takes no run-config overrides (got {run_overrides}); it exports the model as trained")
        return 0 if all(r.ok for r in export(entry)) else 1

    return run_command(command, USAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
