"""Framework overhead and data-loader throughput.

    python scripts/benchmark.py [--model unet_r18] [--batch 8] [--size 128] [--steps 40]
                                [--warmup 5] [--precision 32-true] [--accelerator auto]
                                [--loader-batches 30] [--json out.json]
    python scripts/benchmark.py --compare contrast=none contrast=pixel contrast=pixel_memory

`--compare` times segcon's step under each set of config overrides (space-separated sets;
commas inside one set separate its overrides) and reports step-time and peak-memory ratios
against the first set.

Each measurement runs in a fresh Python process (clean peak-memory numbers):

  bare    a plain PyTorch loop: the same SegNet, CE loss, AdamW + per-step poly schedule
  segcon  the same model, batch, precision and optimizer through SupervisedModule and a
          Lightning Trainer (logging every 10 steps, as the default config does; no validation,
          no checkpoints, no progress bar)
  loader  images/s of the synthetic training loader: PNG decoding + augmentation, the
          default data.num_workers

Both training loops read the same pre-generated in-memory batches, so the difference is the
framework's own cost. Step time is the mean wall time per step after `--warmup` steps. Peak
memory is the process's peak RSS on CPU, or torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


def _compose(args: argparse.Namespace, data_root: str, extra: list[str] | None = None):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from segcon.config import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"model={args.model}", f"data.root={data_root}", f"data.batch_size={args.batch}", *(extra or [])],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(data_root).parent / "bench-run")
    OmegaConf.resolve(cfg)
    return cfg


def _batches(args: argparse.Namespace, device):
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device),
            "mask": torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size), generator=g).to(device),
        }
        for _ in range(4)
    ]


def _peak_memory(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _device(args: argparse.Namespace):
    import torch

    if args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def child_bare(args: argparse.Namespace) -> dict:
    import torch

    from segcon.methods.optim import poly_factor
    from segcon.models.segnet import SegNet
    from segcon.objectives.supervised import CrossEntropyLoss

    device = _device(args)
    torch.manual_seed(0)
    net = SegNet(**_model_kwargs(args)).to(device).train()
    loss_fn = CrossEntropyLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_factor(s, total))
    amp = args.precision.startswith(("16", "bf16"))
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision.startswith("16"))
    batches = _batches(args, device)
    start = 0.0
    for step in range(total):
        if step == args.warmup:
            _sync(device)
            start = time.perf_counter()
        b = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn(net(b["image"]).logits, b["mask"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    _sync(device)
    return {"step_s": (time.perf_counter() - start) / args.steps, "peak_gib": _peak_memory(device)}


def child_segcon(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from segcon.train import build_module

    device = _device(args)
    torch.manual_seed(0)
    cfg = _compose(args, args.data_root, [o for o in (args.overrides or "").split(",") if o])
    module = build_module(cfg)
    batches = _batches(args, torch.device("cpu"))
    loader = DataLoader([batches[i % len(batches)] for i in range(args.warmup + args.steps)], batch_size=None)

    class Timer(L.Callback):
        start = end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                _sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(device)
            self.end = time.perf_counter()

    timer = Timer()
    trainer = L.Trainer(
        accelerator=device.type if device.type == "cpu" else "gpu",
        devices=1,
        precision=args.precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=L.pytorch.loggers.CSVLogger(cfg.paths.output_dir),
        log_every_n_steps=10,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return {"step_s": (timer.end - timer.start) / args.steps, "peak_gib": _peak_memory(device)}


def child_loader(args: argparse.Namespace) -> dict:
    from segcon.config import prepare_data
    from segcon.train import build_datamodule

    cfg = _compose(args, args.data_root)
    prepare_data(cfg)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    n = 0
    start = 0.0
    warm = 3
    for i, batch in enumerate(dm.train_dataloader()):
        if i == warm:
            start = time.perf_counter()
        elif i > warm:
            n += batch["image"].shape[0]
        if i == warm + args.loader_batches:
            break
    elapsed = time.perf_counter() - start
    return {"images_per_s": n / elapsed, "num_workers": cfg.data.num_workers, "crop": list(cfg.data.crop_size)}


def _model_kwargs(args: argparse.Namespace) -> dict:
    import yaml

    spec = yaml.safe_load((ROOT / "conf" / "model" / f"{args.model}.yaml").read_text())
    return {"arch": spec["arch"], "encoder_name": spec["encoder_name"], "num_classes": NUM_CLASSES}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


CHILDREN = {"bare": child_bare, "segcon": child_segcon, "loader": child_loader}


def _run_child(kind: str, argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {kind!r} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _argv_without(argv: list[str], flag: str, n_values: int) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + n_values :]


def compare(args: argparse.Namespace, argv: list[str]) -> None:
    """Time segcon's step under each override set; ratios against the first set."""
    from rich.console import Console
    from rich.table import Table

    runs: dict[str, list[dict]] = {c: [] for c in args.compare}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits all alike
        for c in args.compare:
            runs[c].append(_run_child("segcon", [*argv, "--overrides", c]))
    best = {c: min(r, key=lambda x: x["step_s"]) for c, r in runs.items()}
    base = best[args.compare[0]]
    table = Table(title=f"{args.model}, batch {args.batch} x {args.size}², {args.precision}")
    for col in ("overrides", "step time (s)", "peak memory (GiB)", "ratio time", "ratio memory"):
        table.add_column(col, justify="right")
    for c, r in best.items():
        table.add_row(c, f"{r['step_s']:.4f}", f"{r['peak_gib']:.2f}", f"{r['step_s'] / base['step_s']:.3f}",
                      f"{r['peak_gib'] / base['peak_gib']:.3f}")
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"},
                                               "best": best, "runs": runs}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_r18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--loader-batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="alternating bare/segcon runs; the fastest of each is kept")
    parser.add_argument("--data-root", default=str(ROOT / "data" / "synthetic"))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--compare", nargs="+", default=None, help="override sets to compare (see above)")
    parser.add_argument("--overrides", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    argv = [a for a in sys.argv[1:] if not a.startswith("--json") and a != args.json]
    if args.compare:
        compare(args, _argv_without(argv, "--compare", len(args.compare)))
        return
    runs: dict[str, list[dict]] = {"bare": [], "segcon": []}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        for kind in runs:
            runs[kind].append(_run_child(kind, argv))
    bare = min(runs["bare"], key=lambda r: r["step_s"])
    seg = min(runs["segcon"], key=lambda r: r["step_s"])
    loader = _run_child("loader", argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() and args.accelerator != "cpu" else (
        f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    )
    table = Table(title=f"{args.model}, batch {args.batch} x {args.size}², {args.precision}, {device}")
    for col in ("", "step time (s)", "peak memory (GiB)", "ratio time", "ratio memory"):
        table.add_column(col, justify="right")
    table.add_row("bare PyTorch loop", f"{bare['step_s']:.4f}", f"{bare['peak_gib']:.2f}", "1.000", "1.000")
    table.add_row(
        "segcon (Lightning)", f"{seg['step_s']:.4f}", f"{seg['peak_gib']:.2f}",
        f"{seg['step_s'] / bare['step_s']:.3f}", f"{seg['peak_gib'] / bare['peak_gib']:.3f}",
    )
    console = Console()
    console.print(table)
    console.print(
        f"data loader (synthetic, crop {loader['crop']}, {loader['num_workers']} workers): "
        f"{loader['images_per_s']:.1f} images/s"
    )
    if args.json:
        result = {
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
            "device": device,
            "platform": platform.platform(),
            "bare": bare,
            "segcon": seg,
            "runs": runs,
            "overhead_time": seg["step_s"] / bare["step_s"],
            "overhead_memory": seg["peak_gib"] / bare["peak_gib"],
            "loader": loader,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
