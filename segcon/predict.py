"""segcon-predict: segment an image, or every image under a folder, with a trained checkpoint.

    segcon-predict ckpt=<checkpoint file or run dir> input=<image or folder> output=<dir>
                   [branch=student|teacher] [eval.mode=whole|slide|ms_flip ...]
                   [device=auto|cpu|cuda] [alpha=0.5] [data.<key>=<value> ...]

For every image (jpg, jpeg, png, bmp, tif, tiff, webp) under input, searched recursively, with
the folder tree mirrored under output:
  <output>/masks/<tree>/<stem>.png      class indices (palette PNG: pixel value = class id)
  <output>/overlays/<tree>/<stem>.jpg   the colour-coded prediction blended on the image
Other files are skipped with a warning. An image that cannot be read is reported by name and the
run goes on; a summary closes the run. Exit status 0; 1 if any image failed; 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from segcon.config import validate_cfg
from segcon.data.base import IMAGE_SUFFIXES, read_image
from segcon.data.transforms import SegTransform
from segcon.evaluation.inference import InferenceSettings, infer
from segcon.evaluation.visualize import overlay
from segcon.models.base import SegModel
from segcon.restore import build_inference_net, compose_entry, rebuild_config, required
from segcon.utils.checkpoint import load_run_checkpoint
from segcon.utils.cli import run_command
from segcon.utils.errors import ConfigError, DataError
from segcon.utils.io import make_output_dir

USAGE = __doc__.split("\n\n")[1]


def list_inputs(path: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) of a file or, recursively, a folder; sorted."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        raise ConfigError(f"input={path}: no such file or folder")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


def output_paths(image: Path, input_root: Path, output: Path) -> tuple[Path, Path]:
    """(index mask, overlay) paths of `image`, mirroring its place under `input_root`."""
    rel = image.relative_to(input_root) if input_root.is_dir() else Path(image.name)
    return output / "masks" / rel.with_suffix(".png"), output / "overlays" / rel.with_suffix(".jpg")


def write_index_png(path: Path, pred: np.ndarray, palette: Sequence[Sequence[int]]) -> None:
    """Class indices `[H, W]` as a palette PNG (pixel value = class id, shown in the palette's
    colours); more than 256 classes need 16-bit grayscale, which has no palette."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(palette) > 256:
        Image.fromarray(pred.astype(np.uint16)).save(path)
        return
    image = Image.fromarray(pred.astype(np.uint8))
    image.putpalette([c for colour in palette for c in colour])
    image.save(path)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r}: {err}. Use auto, cpu, cuda or cuda:<index>.") from None


class Predictor:
    """Image `[H, W, 3] uint8` RGB -> class indices `[H, W]`, with a run's evaluation transform
    and inference settings; predictions are resized back to the image if the transform resized."""

    def __init__(self, net: SegModel, cfg: DictConfig, device: torch.device) -> None:
        data = cfg.data
        self.net = net.to(device)
        self.device = device
        self.settings = InferenceSettings.from_config(OmegaConf.to_container(data.eval, resolve=True))
        steps: Any = OmegaConf.to_container(data.val_transform, resolve=True) if data.get("val_transform") else []
        self.transform = SegTransform(steps, list(data.mean), list(data.std), data.ignore_index)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x, _ = self.transform(image)
        scores = infer(self.net, x[None].to(self.device), self.settings, self.net.input_divisor)
        if scores.shape[-2:] != image.shape[:2]:
            scores = F.interpolate(scores, size=image.shape[:2], mode="bilinear", align_corners=False)
        return scores.argmax(1)[0].cpu().numpy()


def predict(entry: DictConfig, run_overrides: Sequence[str] = (), console: Console | None = None) -> int:
    """Run segcon-predict as configured; return the exit status (0, or 1 if an image failed)."""
    console = console or Console()
    ckpt = load_run_checkpoint(required(entry, "ckpt", "logs/train/runs/<date>_<time>"))
    source = Path(str(required(entry, "input", "photos/"))).expanduser()
    output = Path(str(required(entry, "output", "predictions/"))).expanduser()
    cfg = rebuild_config(ckpt, entry, run_overrides)
    validate_cfg(cfg, check_data=False, training=False)
    images, others = list_inputs(source)
    if not images:
        raise ConfigError(f"input={source}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    targets = {image: output_paths(image, source, output) for image in images}
    clashes: dict[Path, list[Path]] = defaultdict(list)
    for image, (mask, _) in targets.items():
        clashes[mask].append(image)
    clashes = {mask: srcs for mask, srcs in clashes.items() if len(srcs) > 1}
    if clashes:
        mask, srcs = next(iter(clashes.items()))
        raise ConfigError(
            f"{len(clashes)} output name(s) would be written twice, e.g. {mask} from {[str(s) for s in srcs]}: "
            "images in one folder must have different stems. Rename them, or predict them separately."
        )
    make_output_dir(output, "output")

    predictor = Predictor(build_inference_net(cfg, ckpt, entry.branch), cfg, _device(str(entry.device)))
    palette, ignore = [list(c) for c in cfg.data.palette], cfg.data.ignore_index
    for other in others:
        console.print(f"[yellow]warning:[/yellow] skipped {other} (not an image: {other.suffix or 'no suffix'})", soft_wrap=True)
    failures: list[str] = []  # one message per image, naming it
    announced = False
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("predict", total=len(images))
        for path in images:
            try:
                image = read_image(path)
            except DataError as err:
                failures.append(str(err))
                progress.console.print(f"[red]failed:[/red] {err}", soft_wrap=True)
            else:
                if not announced:
                    progress.console.print(f"{predictor.settings.describe(*image.shape[:2])} (first image)", soft_wrap=True)
                    announced = True
                pred = predictor(image)
                mask_path, overlay_path = targets[path]
                write_index_png(mask_path, pred, palette)
                overlay_path.parent.mkdir(parents=True, exist_ok=True)
                blended = overlay(image, pred, palette, ignore, float(entry.alpha))
                cv2.imwrite(str(overlay_path), cv2.cvtColor(blended, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            progress.advance(task)

    done = len(images) - len(failures)
    console.print(
        f"{done} image(s) predicted into {output} (masks/, overlays/); "
        f"{len(others)} non-image file(s) skipped; {len(failures)} failed",
        soft_wrap=True,
    )
    if failures:
        # Plain lines on stderr, never wrapped, so file names can be grepped.
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for reason in failures:
            print(f"  - {reason}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (`segcon-predict`); returns the exit status."""
    return run_command(lambda args: predict(*compose_entry("predict", args)), USAGE, argv)


if __name__ == "__main__":
    raise SystemExit(main())
