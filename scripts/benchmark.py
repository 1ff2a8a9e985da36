"""Framework overhead and data-loader throughput.

    python scripts/benchmark.py [--model unet_r18] [--batch 8] [--size 128 | --size 512 1024] [--steps 40]
                                [--warmup 5] [--precision 32-true] [--accelerator auto]
                                [--loader-batches 30] [--json out.json]
    python scripts/benchmark.py --compare contrast=none contrast=pixel contrast=pixel_memory
    python scripts/benchmark.py --ops [--compare contrast=none contrast=pixel ...] [--batch 4 --size 64]
    python scripts/benchmark.py --inference [--model segformer_b0] [--infer-size 1024 2048]
                                [--images 2] [--crop 512 1024] [--stride 341 683] [--chunk 4]
                                [--scales 0.5 0.75 1.0 1.25 1.5 1.75] [--modes whole slide ms_flip ms_slide]

`--ops` counts ATen ops and host-synchronising ops per training step (segcon.utils.opcount) of
each `--compare` set (default: every contrastive term and teacher-student method, OPS_SETS) in a
CPU Lightning fit with every term at full weight, and each set's difference to the first: what a
GPU step would launch and wait for, whatever device counts it. Only device tensors count (the
module's parameters and buffers, the batch, and what is computed from them or built with a
`device=`): host-only scalars are left out. The optimizer's own update is not counted.

`--inference` measures evaluation inference (segcon.evaluation.inference) on random images of
`--infer-size` with a `--infer-classes`-class head: images/s and peak memory of whole, slide and
ms_flip (scales + horizontal flip), each mode in its own process, next to the theoretical
number of forward passes and the pixels processed relative to whole. Each process builds the
model, runs `--infer-warmup` images, then times `--images` images; "working memory" is the peak
minus the memory right after the model was built.

`--compare` times segcon's step under each set of config overrides (space-separated sets;
commas inside one set separate its overrides) and reports step-time and peak-memory ratios
against the first set. Teacher-student methods (`method=mean_teacher` ...) get the same batch
as the labeled stream plus a batch of other images, of the same size, as the unlabeled stream.
Every loss term is timed at its full weight: warm-ups and ramps are set to 0 (a term in its
warm-up is not computed). `--against <checkout>` also runs every set with the segcon of another
checkout (e.g. a `git worktree` of an earlier commit; its own scripts/benchmark.py, alternating
with this one) and prints both in one table: before / after on the same machine in the same run.

Each measurement runs in a fresh Python process (clean peak-memory numbers):

  bare    a plain PyTorch loop: the same SegNet, CE loss, AdamW + per-step poly schedule
  segcon  the same model, batch, precision and optimizer through SupervisedModule and a
          Lightning Trainer (logging every 10 steps, as the default config does; no validation,
          no checkpoints, no progress bar)
  loader  images/s of the synthetic training loader: PNG decoding + augmentation, the
          default data.num_workers

Both training loops read the same pre-generated batches from host memory (pinned on a GPU, as
segcon's loaders pin) and copy one to the device each step, so the difference is the framework's
own cost. Step time is the mean wall time per step after `--warmup` steps. Peak
memory is the process's peak RSS on CPU, or torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import argparse
import itertools
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


def _overrides(args: argparse.Namespace) -> list[str]:
    """The child's config overrides: a list (scripts/gpu_check.py) or the command line's
    comma-separated string."""
    extra = getattr(args, "overrides", None) or []
    return list(extra) if isinstance(extra, list | tuple) else [o for o in extra.split(",") if o]


def _batches(args: argparse.Namespace, device):
    """Four seeded batches in host memory, as a training loader hands them over: pinned when
    `device` is a GPU (segcon's loaders pin), so each step's copy to the device is asynchronous."""
    import torch

    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if getattr(args, "channels_last", False) else torch.contiguous_format
    pin = device.type == "cuda"
    batches = [
        {
            "image": torch.randn(args.batch, 3, *args.size, generator=g).contiguous(memory_format=fmt),
            "mask": torch.randint(0, NUM_CLASSES, (args.batch, *args.size), generator=g),
        }
        for _ in range(4)
    ]
    return [{k: v.pin_memory() for k, v in b.items()} for b in batches] if pin else batches


def _to(batch: dict, device) -> dict:
    """`batch` on `device` (non-blocking from pinned memory, as Lightning moves a batch)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _with_unlabeled(labeled: dict, other: dict, num_strong: int) -> dict:
    """A teacher-student batch: `labeled`, and `other`'s images as the unlabeled stream (weak
    view, `num_strong` strong views, all pixels valid, ground truth for the accuracy logs)."""
    import torch

    image = other["image"]
    unlabeled = {"image": image, "strong": image[:, None].repeat(1, num_strong, 1, 1, 1).contiguous(),
                 "valid": torch.ones_like(other["mask"], dtype=torch.bool), "gt": other["mask"]}
    return {"labeled": labeled, "unlabeled": unlabeled}


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}²" if size[0] == size[1] else f"{size[0]}x{size[1]}"


def _device_text(args: argparse.Namespace) -> str:
    import torch

    if torch.cuda.is_available() and args.accelerator != "cpu":
        return "GPU " + torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def _peak_memory(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _device(args: argparse.Namespace):
    """The device of a measurement; on a GPU its peak-memory counter starts again here, so several
    measurements can share one process (scripts/gpu_check.py)."""
    import torch

    if args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available()):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.device("cuda")
    return torch.device("cpu")


def _step_times(stamps: list[float], warmup: int) -> dict:
    """Step-time statistics from synchronised time stamps taken at each step's start and after the
    last one: the first `warmup` steps left out; mean and median in seconds, and the first step
    (where cuDNN autotuning or torch.compile happen)."""
    import statistics

    steps = [b - a for a, b in itertools.pairwise(stamps)]
    timed = steps[warmup:]
    return {"step_s": statistics.fmean(timed), "step_median_s": statistics.median(timed), "first_step_s": steps[0],
            "steps": len(timed)}


def _net(args: argparse.Namespace, device):
    """`args.model` with a NUM_CLASSES head on `device` (channels_last if asked), seeded."""
    import torch

    from segcon.build import build_model

    torch.manual_seed(0)
    net = build_model(_compose(args, args.data_root, [f"data.num_classes={NUM_CLASSES}"])).to(device)
    return net.to(memory_format=torch.channels_last) if getattr(args, "channels_last", False) else net


def child_forward(args: argparse.Namespace) -> dict:
    """Median time of a gradient-free forward pass on the benchmark batch (the unit of a
    teacher's or weak view's pass)."""
    import statistics

    import torch

    device = _device(args)
    net = _net(args, device).eval()
    batches = [_to(b, device) for b in _batches(args, device)]
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=args.precision.startswith(("16", "bf16"))):
        for step in range(args.warmup + args.steps):
            _sync(device)
            start = time.perf_counter()
            net(batches[step % len(batches)]["image"])
            _sync(device)
            times.append(time.perf_counter() - start)
    return {"forward_median_s": statistics.median(times[args.warmup:]), "peak_gib": _peak_memory(device)}


def child_bare(args: argparse.Namespace) -> dict:
    import torch

    from segcon.engine.optim import poly_factor
    from segcon.objectives.supervised import CrossEntropyLoss

    device = _device(args)
    net = _net(args, device).train()
    compiled = getattr(args, "compile", False)
    step_fn = torch.compile(net, backend=getattr(args, "compile_backend", "inductor")) if compiled else net
    loss_fn = CrossEntropyLoss()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_factor(s, total))
    amp = args.precision.startswith(("16", "bf16"))
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision.startswith("16"))
    batches = _batches(args, device)
    stamps = []
    for step in range(total):
        _sync(device)
        stamps.append(time.perf_counter())
        b = _to(batches[step % len(batches)], device)  # each step copies its batch, as segcon's does
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = loss_fn.pixel_loss(step_fn(b["image"]).logits, b["mask"])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    _sync(device)
    stamps.append(time.perf_counter())
    return {**_step_times(stamps, args.warmup), "peak_gib": _peak_memory(device)}


def child_segcon(args: argparse.Namespace) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from segcon.build import build_module

    device = _device(args)
    torch.manual_seed(0)
    cfg = _compose(args, args.data_root, _overrides(args))
    module = build_module(cfg)
    _full_weights(module)
    if getattr(args, "channels_last", False):
        module = module.to(memory_format=torch.channels_last)
    batches = _batches(args, device)  # host memory; Lightning copies each to the device
    if getattr(module, "uses_unlabeled", False):  # teacher-student: a labeled + an unlabeled batch
        others = batches[1:] + batches[:1]
        batches = [_with_unlabeled(b, o, int(cfg.data.num_strong)) for b, o in zip(batches, others, strict=True)]
    loader = DataLoader([batches[i % len(batches)] for i in range(args.warmup + args.steps)], batch_size=None)

    class Timer(L.Callback):
        """Time stamps at each step's start and after the last (everything the loop does between
        two steps counts)."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync(device)
            self.stamps.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            _sync(device)
            self.stamps.append(time.perf_counter())

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
    return {**_step_times(timer.stamps, args.warmup), "peak_gib": _peak_memory(device),
            "batch": args.batch, "global_step": trainer.global_step}


def child_loader(args: argparse.Namespace) -> dict:
    """Images/s of the training loader in its steady state: one epoch of the real sampler long
    enough for every batch asked for (an epoch of the few prepared images would end before the
    workers are all busy, and its boundary would drain the queue), timed after the batches the
    workers prefetch at the start (2 per worker) have been taken."""
    from segcon.build import build_datamodule
    from segcon.config import prepare_data

    cfg = _compose(args, args.data_root, _overrides(args))
    prepare_data(cfg)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    warm = max(3, 2 * int(cfg.data.num_workers))
    batch = int(cfg.data.batch_size)
    # the loader train_dataloader() builds, with more draws of the images per epoch
    loader = dm._train_loader(dm.datasets["train"], batch, batch * (warm + args.loader_batches + 1), stream=0)
    n, start = 0, 0.0
    for i, images in enumerate(b["image"] for b in loader):
        if i == warm:
            start = time.perf_counter()
        elif i > warm:
            n += images.shape[0]
        if i == warm + args.loader_batches:
            break
    elapsed = time.perf_counter() - start
    return {"images_per_s": n / elapsed, "num_workers": cfg.data.num_workers, "crop": list(cfg.data.crop_size),
            "batches": args.loader_batches}


def _full_weights(module) -> None:
    """Every term of the module's objective at its full weight from step 0 (no warm-up or ramp),
    so its cost is measured."""
    from segcon.objectives.objective import TermSchedule

    objective = module.objective
    for group in (objective.supervised, objective.pseudo, objective.contrast):
        group.schedules = {name: TermSchedule(s.weight, 0, 0) for name, s in group.schedules.items()}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _infer_settings(args: argparse.Namespace, mode: str) -> dict:
    if mode == "slide":
        return {"mode": "slide", "crop": args.crop, "stride": args.stride, "chunk": args.chunk}
    if mode == "ms_flip":
        return {"mode": "ms_flip", "scales": args.scales, "flip": True}
    if mode == "ms_slide":  # ms_flip whose views are covered by slide windows
        return {"mode": "ms_flip", "scales": args.scales, "flip": True, "ms_slide": True,
                "crop": args.crop, "stride": args.stride, "chunk": args.chunk}
    return {"mode": "whole"}


def child_inference(args: argparse.Namespace) -> dict:
    import torch

    from segcon.build import build_model
    from segcon.evaluation.inference import InferenceSettings, infer

    device = _device(args)
    torch.manual_seed(0)
    net = build_model(_compose(args, args.data_root, [f"data.num_classes={args.infer_classes}"])).to(device).eval()
    settings = InferenceSettings.from_config(_infer_settings(args, args.infer_mode))
    h, w = args.infer_size
    images = torch.randn(1, 3, h, w, device=device)
    _sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _peak_memory(device)  # the peak so far: imports, the model and its weights
    for _ in range(args.infer_warmup):
        infer(net, images, settings, net.input_divisor)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.images):
        infer(net, images, settings, net.input_divisor)
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = _peak_memory(device)
    return {
        "mode": args.infer_mode, "settings": _infer_settings(args, args.infer_mode),
        "passes": settings.passes(h, w), "pixel_ratio": settings.pixel_ratio(h, w),
        "s_per_image": elapsed / args.images, "images_per_s": args.images / elapsed,
        "peak_gib": peak, "working_gib": peak - base,
    }


def count_step(overrides: list[str], model: str = "unet_r18", batch: int = 4, size: tuple[int, int] = (64, 64),
               steps: int = 3, data_root: str | None = None) -> dict:
    """ATen ops and host-synchronising ops (segcon.utils.opcount) of the last of `steps` training
    steps of segcon's module in a CPU Lightning fit, with every term at full weight: the step's
    forward, losses, backward and the checks before the optimizer step, and what the module does
    after it (teacher EMA, memory banks); the optimizer's own update is not counted."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from segcon.build import build_module
    from segcon.utils.opcount import OpCounter, counting

    args = argparse.Namespace(model=model, batch=batch, size=size)
    root = data_root or str(ROOT / "data" / "synthetic")
    torch.manual_seed(0)
    cfg = _compose(args, root, [*overrides, "trainer.accelerator=cpu"])
    module = build_module(cfg)
    _full_weights(module)
    batches = _batches(args, torch.device("cpu"))
    if getattr(module, "uses_unlabeled", False):
        others = batches[1:] + batches[:1]
        batches = [_with_unlabeled(b, o, int(cfg.data.num_strong)) for b, o in zip(batches, others, strict=True)]
    loader = DataLoader([batches[i % len(batches)] for i in range(steps)], batch_size=None)
    counter = OpCounter()
    counter.counting = False

    class Count(L.Callback):
        """Counting on in the last step, off during the optimizer's own update."""

        def on_train_start(self, trainer, pl_module) -> None:
            counter.mark([*pl_module.parameters(), *pl_module.buffers()])
            optimizer = trainer.optimizers[0]
            update = optimizer.step

            def step(closure=None, **kwargs):
                active = counter.counting

                def counted_closure():
                    counter.counting = active
                    try:
                        return closure()
                    finally:
                        counter.counting = False

                counter.counting = False
                try:
                    return update(closure=counted_closure, **kwargs)
                finally:
                    counter.counting = active

            optimizer.step = step
            after = pl_module.on_train_batch_end

            def on_train_batch_end(*a, **k):
                try:
                    return after(*a, **k)
                finally:
                    counter.counting = False

            pl_module.on_train_batch_end = on_train_batch_end

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == steps - 1:
                counter.reset()
                counter.mark(batch)
                counter.counting = True

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        logger=False, log_every_n_steps=1000, callbacks=[Count()])
    with counting(counter):
        trainer.fit(module, train_dataloaders=loader)
    return {"ops": counter.ops, "views": counter.views, "syncs": counter.syncs, "sync_ops": dict(counter.sync_ops.most_common()),
            "sync_sites": dict(counter.sync_sites.most_common()), "by_op": dict(counter.by_op.most_common())}


def child_ops(args: argparse.Namespace) -> dict:
    return count_step(_overrides(args), args.model, args.batch, args.size, data_root=args.data_root)


OPS_SETS = ["contrast=none", "contrast=pixel", "contrast=cac", "contrast=pixel_memory", "contrast=contextrast",
            "method=mean_teacher", "method=fixmatch", "method=unimatch", "method=confidence_ssl,contrast=confidence"]
"""`--ops` default: every contrastive term and teacher-student method, against the first set."""


def ops(args: argparse.Namespace, argv: list[str]) -> None:
    """ATen ops and host syncs per training step of each override set (`--compare`, default
    OPS_SETS), and each set's difference to the first."""
    from rich.console import Console
    from rich.table import Table

    sets = args.compare or OPS_SETS
    counts = {c: _run_child("ops", [*argv, "--overrides", c]) for c in sets}
    base = counts[sets[0]]
    table = Table(title=f"ATen ops and host syncs per training step: {args.model}, batch {args.batch} x "
                        f"{_size_text(args.size)}, every term at full weight (CPU count, device tensors only)")
    for col in ("overrides", "ops", "host syncs", f"ops vs {sets[0]}", f"syncs vs {sets[0]}", "syncs by op"):
        table.add_column(col, justify="left" if col in ("overrides", "syncs by op") else "right")
    for c, r in counts.items():
        table.add_row(c, str(r["ops"]), str(r["syncs"]), f"{r['ops'] - base['ops']:+d}", f"{r['syncs'] - base['syncs']:+d}",
                      ", ".join(f"{k} {v}" for k, v in r["sync_ops"].items()))
    Console(width=220).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"},
                                               "counts": counts}, indent=2) + "\n")


CHILDREN = {"bare": child_bare, "forward": child_forward, "segcon": child_segcon, "loader": child_loader,
            "inference": child_inference, "ops": child_ops}


def _run_child(kind: str, argv: list[str], checkout: Path = ROOT) -> dict:
    """One measurement in a fresh process, with the segcon (and benchmark script) of `checkout`."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, str(checkout / "scripts" / "benchmark.py"), "--child", kind, *argv],
                          capture_output=True, text=True, check=False, env=env, cwd=checkout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {kind!r} failed (exit status {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _argv_without(argv: list[str], flag: str, n_values: int) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 1 + n_values :]


def compare(args: argparse.Namespace, argv: list[str]) -> None:
    """Time segcon's step under each override set; ratios against the first set (and, with
    `--against`, the same for another checkout, side by side)."""
    from rich.console import Console
    from rich.table import Table

    trees = {"after": ROOT} if args.against is None else {"before": Path(args.against).resolve(), "after": ROOT}
    runs: dict[str, dict[str, list[dict]]] = {t: {c: [] for c in args.compare} for t in trees}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits all alike
        for c in args.compare:
            for tree, checkout in trees.items():
                runs[tree][c].append(_run_child("segcon", [*argv, "--overrides", c], checkout))
    best = {t: {c: min(r, key=lambda x: x["step_s"]) for c, r in by.items()} for t, by in runs.items()}
    table = Table(title=f"{args.model}, batch {args.batch} x {_size_text(args.size)}, {args.precision}, {_device_text(args)}")
    table.add_column("overrides", justify="left")
    for tree in trees:
        suffix = f" ({tree})" if len(trees) > 1 else ""
        for col in ("step (s)", "peak (GiB)", "time ratio", "memory ratio"):
            table.add_column(col + suffix, justify="right")
    for c in args.compare:
        row = [c]
        for tree in trees:
            r, base = best[tree][c], best[tree][args.compare[0]]
            row += [f"{r['step_s']:.4f}", f"{r['peak_gib']:.2f}", f"{r['step_s'] / base['step_s']:.3f}",
                    f"{r['peak_gib'] / base['peak_gib']:.3f}"]
        table.add_row(*row)
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"},
                                               "checkouts": {t: str(p) for t, p in trees.items()},
                                               "best": best, "runs": runs}, indent=2) + "\n")


def inference(args: argparse.Namespace, argv: list[str]) -> None:
    """Time each evaluation mode in its own process; ratios against whole."""
    from rich.console import Console
    from rich.table import Table

    results, failed = {}, {}
    for m in args.modes:
        try:
            results[m] = _run_child("inference", [*argv, "--infer-mode", m])
        except RuntimeError as err:  # e.g. killed for memory (exit status -9): report, go on
            failed[m] = str(err).splitlines()[0]
    base = results.get("whole")
    device = _device_text(args)
    h, w = args.infer_size
    table = Table(title=f"{args.model}, {args.infer_classes} classes, 1 x 3 x {h} x {w}, fp32, {device}")
    for col in ("mode", "passes / image", "pixels vs whole", "s / image", "images/s", "time vs whole",
                "peak memory (GiB)", "working memory (GiB)"):
        table.add_column(col, justify="right")
    for m, r in results.items():
        ratio = f"{r['s_per_image'] / base['s_per_image']:.2f}" if base else "-"
        table.add_row(m, str(r["passes"]), f"{r['pixel_ratio']:.2f}", f"{r['s_per_image']:.2f}",
                      f"{r['images_per_s']:.3f}", ratio, f"{r['peak_gib']:.2f}", f"{r['working_gib']:.2f}")
    for m in failed:
        table.add_row(m, "-", "-", "failed", "-", "-", "-", "-")
    console = Console()
    console.print(table)
    for m, reason in failed.items():
        console.print(f"{m}: {reason}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"},
                                               "device": device, "results": results, "failed": failed}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="unet_r18")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs="+", default=[128], metavar="H [W]",
                        help="training batch image size: one number (square) or height and width")
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
    parser.add_argument("--against", default=None, metavar="CHECKOUT",
                        help="with --compare: also measure the segcon of this checkout (before / after)")
    parser.add_argument("--inference", action="store_true", help="time whole / slide / ms_flip inference (see above)")
    parser.add_argument("--ops", action="store_true", help="count ATen ops and host syncs per step (see above)")
    parser.add_argument("--modes", nargs="+", default=["whole", "slide", "ms_flip"],
                        choices=["whole", "slide", "ms_flip", "ms_slide"], help="ms_slide: ms_flip with slide views")
    parser.add_argument("--infer-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--infer-classes", type=int, default=19)
    parser.add_argument("--images", type=int, default=2, help="timed images per mode")
    parser.add_argument("--infer-warmup", type=int, default=1, help="untimed images per mode first")
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--stride", type=int, nargs=2, default=[341, 683], metavar=("H", "W"))
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    parser.add_argument("--infer-mode", default="whole", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.size) > 2:
        parser.error(f"--size takes one number (square) or two (height width), got {len(args.size)}")
    args.size = (args.size[0], args.size[-1])

    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    argv = [a for a in sys.argv[1:] if not a.startswith("--json") and a != args.json]
    if args.ops:
        argv = [a for a in argv if a != "--ops"]
        ops(args, _argv_without(argv, "--compare", len(args.compare)) if args.compare else argv)
        return
    if args.compare:
        argv = _argv_without(argv, "--compare", len(args.compare))
        if args.against is not None:
            argv = _argv_without(argv, "--against", 1)
        compare(args, argv)
        return
    if args.inference:
        inference(args, [a for a in argv if a != "--inference"])
        return
    runs: dict[str, list[dict]] = {"bare": [], "segcon": []}
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both alike
        for kind in runs:
            runs[kind].append(_run_child(kind, argv))
    bare = min(runs["bare"], key=lambda r: r["step_s"])
    seg = min(runs["segcon"], key=lambda r: r["step_s"])
    loader = _run_child("loader", argv)

    from rich.console import Console
    from rich.table import Table

    device = _device_text(args)
    table = Table(title=f"{args.model}, batch {args.batch} x {_size_text(args.size)}, {args.precision}, {device}")
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
