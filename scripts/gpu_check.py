"""The GPU check: speed, memory and mixed precision at the published sizes, in one bounded run.

    python scripts/gpu_check.py [--out gpu_check.json] [--budget-s 480] [--only train method ...]
    python scripts/gpu_check.py --dry-run --out /tmp/gpu_check.json     # tiny sizes, on the CPU

`make gpu-check` runs the first form. On a lent GPU machine without segcon's dependencies,
`scripts/gpu_env.sh` prepares and runs it (see there).

Cases, in this order (the most wanted first, so a run cut by its budget keeps them):

  train    segcon's training step (SupervisedModule under a Lightning Trainer) for every contrastive
           term on DeepLabV3+ R-50 and R-101, 8 x 512 x 1024 (the Cityscapes preset crop), in
           bf16-mixed and 16-mixed, channels_last; ratios to `contrast=none` of the same network
           and precision against the goals (time <= 1.10x, peak memory <= 1.15x).
  method   the teacher-student methods on R-50, bf16-mixed: 8 labeled + 8 unlabeled images;
           ratios to the supervised step and to the method's pass-count limit (below; goal
           <= 1.05x). RC2L runs on its own network family (MaskFormer R-50), against its own
           supervised step; UniMatch V2 on DPT-DINOv2-S, against its supervised step and its
           pass-count limit (3 forward+backward, 1 gradient-free).
  overhead segcon's supervised step and the same step in a bare PyTorch loop (R-50, bf16-mixed,
           channels_last), both copying each batch from pinned host memory: what Lightning
           and segcon add (goal <= 1.05x).
  eval     whole, slide and ms_flip inference on a 1 x 3 x 1024 x 2048 image (R-50, 19 classes,
           fp32) and slide's `chunk` sizes: s / image and working memory; time vs whole against
           the pixels the mode processes vs whole (the window arithmetic).
  loader   the synthetic training loader on 32 1024 x 1024 PNGs written to disk (crop 512 x 1024),
           in one long epoch of the real sampler, timed after the workers' initial prefetch:
           images/s per worker count, next to the images/s the R-50 bf16 step consumes.
  compile  torch.compile of the bare supervised step: compile time (first step) and the
           steady step against eager.

Every training measurement is a median over `--steps` steps after `--warmup` steps, each step
between two CUDA synchronisations (scripts/benchmark.py); peak memory is
torch.cuda.max_memory_allocated, reset before each case. All cases run in this one process. A
case that fails is recorded (a training case that runs out of memory is retried at half the
batch, and the batch it ran at is stated) and the rest go on; the JSON file is rewritten after
every case, and a case that would start after the budget is recorded as skipped. A case running
past the budget is stopped by an alarm.

The pass-count limit of a teacher-student step is its passes costed with this run's own
measurements: `fb` forward+backward passes at the supervised step's time (labeled batch, loss,
optimizer) and `f` gradient-free forward passes at the measured forward time. It is a lower
bound for what the method computes, so a ratio near 1 means no framework cost beyond the passes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark

CONTRASTS = ["none", "pixel", "pixel_memory", "cac", "contextrast"]
"""The contrastive terms that run with a supervised DeepLabV3+ (confidence and RC2L need a
teacher: they are method cases)."""

METHODS: dict[str, tuple[list[str], int, int]] = {
    # name: (overrides, forward+backward passes, gradient-free forward passes), per labeled batch
    "supervised": (["method=supervised"], 1, 0),
    # student on labeled + unlabeled (2), teacher on the unlabeled batch (1)
    "mean_teacher": (["method=mean_teacher"], 2, 1),
    # student on labeled + strong view (2), the model on the weak view without gradient (1)
    "fixmatch": (["method=fixmatch"], 2, 1),
    # labeled + weak with gradient (2), two strong views (2), the weak view without gradient
    # (1); the second decoder pass over perturbed features is not counted
    "unimatch": (["method=unimatch"], 4, 1),
    # the mean teacher's passes; the projection head runs in both networks
    "confidence_ssl": (["method=confidence_ssl", "contrast=confidence"], 2, 1),
}
RC2L = ["model=maskformer_r50", "loss=mask_set", "method=rc2l", "contrast=rc2l", "pseudo_loss.ce.weight=0"]
UNIMATCH_V2 = (3, 1)
"""UniMatch V2's passes per labeled batch on the DPT-DINOv2 model: the labeled images and the two
strong views with gradient (3), the teacher on the weak view (1)."""


@dataclasses.dataclass
class Sizes:
    """What the check measures at: the published sizes, or tiny ones for the CPU dry run."""

    models: list[str]
    precisions: list[str]
    batch: int
    crop: tuple[int, int]
    steps: int
    warmup: int
    infer_size: tuple[int, int]
    infer_images: int
    infer_crop: tuple[int, int]
    infer_stride: tuple[int, int]
    chunks: list[int]
    loader_image: int
    loader_workers: list[int]
    loader_batches: int
    rc2l_model: str
    dpt_model: str
    compile_model: str
    compile_backend: str


FULL = Sizes(models=["deeplabv3plus_r50", "deeplabv3plus_r101"], precisions=["bf16-mixed", "16-mixed"], batch=8,
             crop=(512, 1024), steps=10, warmup=3, infer_size=(1024, 2048), infer_images=2, infer_crop=(512, 1024),
             infer_stride=(341, 683), chunks=[1, 2, 4, 8], loader_image=1024, loader_workers=[2, 4, 8, 16],
             loader_batches=48, rc2l_model="maskformer_r50", dpt_model="dpt_dinov2_s", compile_model="deeplabv3plus_r50",
             compile_backend="inductor")
# Every kind of case at tiny sizes, with the small Unet-R18 in place of DeepLabV3+ (the cases do
# not depend on the network; a network that fails on the GPU fails its own cases only) and fp32:
# mixed precision on a CPU without bf16/fp16 units is emulated, several seconds for a tiny step.
# The compile case uses the eager backend (inductor's C++ build takes minutes on a CPU).
TINY = Sizes(models=["unet_r18"], precisions=["32-true"], batch=2,
             crop=(32, 64), steps=1, warmup=1, infer_size=(64, 128), infer_images=1, infer_crop=(32, 64), infer_stride=(24, 48),
             chunks=[1], loader_image=64, loader_workers=[0, 1], loader_batches=2,
             rc2l_model="maskformer_r18_light", dpt_model="dpt_dinov2_s", compile_model="unet_r18",
             compile_backend="eager")


@dataclasses.dataclass
class Case:
    """One measurement: `run(batch)` returns its result; `batch` is halved after an out-of-memory
    error when `retry_batch`."""

    name: str
    kind: str
    run: Callable[[int], dict]
    batch: int = 0
    retry_batch: bool = False


def _args(sizes: Sizes, data_root: str, **kw) -> argparse.Namespace:
    """A scripts/benchmark.py argument set."""
    base = {"model": sizes.models[0], "batch": sizes.batch, "size": sizes.crop, "steps": sizes.steps,
            "warmup": sizes.warmup, "precision": sizes.precisions[0], "accelerator": "auto", "data_root": data_root,
            "overrides": [], "channels_last": True, "compile": False}
    return argparse.Namespace(**{**base, **kw})


def plan(sizes: Sizes, data_root: str, loader_root: str, only: list[str] | None) -> list[Case]:
    """Every case of the check, the most wanted first."""
    def train(model: str) -> list[Case]:
        return [Case(f"train {model} {precision} contrast={contrast}", "train",
                     _batched(benchmark.child_segcon, _args(sizes, data_root, model=model, precision=precision,
                                                            overrides=[f"contrast={contrast}"])),
                     sizes.batch, True)
                for precision in sizes.precisions for contrast in CONTRASTS]

    r50 = sizes.models[0]
    cases = train(r50)
    for name, (overrides, _, _) in METHODS.items():
        args = _args(sizes, data_root, overrides=overrides)
        cases.append(Case(f"method {name}", "method", _batched(benchmark.child_segcon, args), sizes.batch, True))
    cases.append(Case("method forward-only", "method", _batched(benchmark.child_forward, _args(sizes, data_root)), sizes.batch,
                      True))
    for name, overrides in (("rc2l supervised", [o for o in RC2L if "rc2l" not in o and "pseudo" not in o]),
                            ("rc2l", RC2L)):
        args = _args(sizes, data_root, model=sizes.rc2l_model, overrides=[o for o in overrides if "model=" not in o])
        cases.append(Case(f"method {name}", "method", _batched(benchmark.child_segcon, args), sizes.batch, True))
    dpt = _args(sizes, data_root, model=sizes.dpt_model)
    for name, method in (("dpt supervised", "supervised"), ("unimatch_v2", "unimatch_v2")):
        args = _args(sizes, data_root, model=sizes.dpt_model, overrides=[f"method={method}"])
        cases.append(Case(f"method {name}", "method", _batched(benchmark.child_segcon, args), sizes.batch, True))
    cases.append(Case("method dpt forward-only", "method", _batched(benchmark.child_forward, dpt), sizes.batch, True))
    # its own segcon step (that of `train ... contrast=none`), so `--only overhead` is complete
    cases.append(Case(f"overhead segcon {r50} {sizes.precisions[0]}", "overhead",
                      _batched(benchmark.child_segcon, _args(sizes, data_root, overrides=["contrast=none"])),
                      sizes.batch, True))
    cases.append(Case(f"overhead bare {r50} {sizes.precisions[0]}", "overhead",
                      _batched(benchmark.child_bare, _args(sizes, data_root)), sizes.batch, True))
    infer = {"infer_size": sizes.infer_size, "infer_classes": 19, "images": sizes.infer_images, "infer_warmup": 1,
             "crop": sizes.infer_crop, "stride": sizes.infer_stride, "chunk": 4,
             "scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]}
    for mode in ("whole", "slide", "ms_flip"):
        args = _args(sizes, data_root, infer_mode=mode, **infer)
        cases.append(Case(f"eval {mode}", "eval", _fixed(benchmark.child_inference, args)))
    for chunk in sizes.chunks:
        args = _args(sizes, data_root, infer_mode="slide", **{**infer, "chunk": chunk})
        cases.append(Case(f"eval slide chunk={chunk}", "eval", _fixed(benchmark.child_inference, args)))
    for workers in sizes.loader_workers:
        overrides = [f"data.num_workers={workers}", f"data.prepare.image_size={sizes.loader_image}",
                     f"data.prepare.num_train={sizes.batch * 4}", "data.prepare.num_val=1", f"data.crop_size=[{sizes.crop[0]},{sizes.crop[1]}]",
                     f"data.batch_size={sizes.batch}"]
        args = _args(sizes, loader_root, overrides=overrides, loader_batches=sizes.loader_batches)
        cases.append(Case(f"loader workers={workers}", "loader", _fixed(benchmark.child_loader, args)))
    for model in sizes.models[1:]:
        cases += train(model)
    for compiled in (False, True):
        args = _args(sizes, data_root, model=sizes.compile_model, compile=compiled, compile_backend=sizes.compile_backend)
        cases.append(Case(f"compile {'torch.compile' if compiled else 'eager'}", "compile",
                          _batched(benchmark.child_bare, args), sizes.batch, True))
    return [c for c in cases if not only or c.kind in only]


def _batched(fn: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> Callable[[int], dict]:
    return lambda batch: fn(argparse.Namespace(**{**vars(args), "batch": batch}))


def _fixed(fn: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> Callable[[int], dict]:
    return lambda _batch: fn(args)


class CaseTimeout(Exception):
    """The budget ran out during a case."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raises CaseTimeout in this (main) thread after `seconds`."""
    def _raise(*_):
        raise CaseTimeout(f"stopped by the time budget after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _is_oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def run_case(case: Case, deadline: float) -> dict:
    """Runs `case`; its record (status ok / failed / skipped, result, error, seconds)."""
    import torch

    record: dict = {"name": case.name, "kind": case.kind}
    if time.monotonic() >= deadline:
        return {**record, "status": "skipped", "error": "the time budget was spent before this case"}
    start = time.monotonic()
    batch, oom_at = case.batch, []
    while True:
        try:
            with _alarm(deadline - time.monotonic()):
                result = case.run(batch)
            record.update(status="ok", result=result)
            break
        except Exception as err:
            if case.retry_batch and _is_oom(err) and batch > 1:
                oom_at.append(batch)
                batch //= 2
                torch.cuda.empty_cache()
                continue
            record.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000],
                          traceback=traceback.format_exc()[-4000:])
            break
    if oom_at:
        record["out_of_memory_at_batch"] = oom_at
    if case.batch:
        record["batch"] = batch
    record["seconds"] = round(time.monotonic() - start, 2)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def _by_name(records: list[dict]) -> dict[str, dict]:
    return {r["name"]: r.get("result") for r in records if r.get("status") == "ok"}


def summarise(records: list[dict], sizes: Sizes) -> list[dict]:
    """The table's rows: each case's headline figures and its ratio against its reference and goal."""
    ok = _by_name(records)
    rows = []

    def add(name: str, figure: str, ratio: float | None, against: str, goal: float | None) -> None:
        verdict = "" if ratio is None or goal is None else ("within" if ratio <= goal else f"over by {ratio / goal - 1:.0%}")
        rows.append({"case": name, "figure": figure, "ratio": ratio, "against": against, "goal": goal,
                     "verdict": verdict})

    for r in records:
        name, res = r["name"], r.get("result")
        if res is None:
            add(name, r["status"] + (f": {r['error'].splitlines()[0][:80]}" if r.get("error") else ""), None, "", None)
            continue
        batch = f" (batch {r['batch']})" if r.get("batch") not in (None, sizes.batch) else ""
        if r["kind"] == "train":
            base = ok.get(name.rsplit(" ", 1)[0] + " contrast=none")
            fig = f"{res['step_median_s']:.4f} s, {res['peak_gib']:.2f} GiB{batch}"
            if base and not name.endswith("contrast=none"):
                add(name + " (time)", fig, res["step_median_s"] / base["step_median_s"], "contrast=none", 1.10)
                add(name + " (memory)", "", res["peak_gib"] / base["peak_gib"], "contrast=none", 1.15)
            else:
                add(name, fig, None, "", None)
        elif r["kind"] == "method" and "step_median_s" in res:
            fig = f"{res['step_median_s']:.4f} s, {res['peak_gib']:.2f} GiB{batch}"
            method = name.removeprefix("method ")
            sup = ok.get("method rc2l supervised" if method == "rc2l" else "method supervised")
            fwd = ok.get("method forward-only")
            if method in METHODS and sup and fwd and method != "supervised":
                _, fb, f = METHODS[method]
                limit = fb * sup["step_median_s"] + f * fwd["forward_median_s"]
                add(name + " (vs supervised)", fig, res["step_median_s"] / sup["step_median_s"], "supervised step", None)
                add(name + " (vs pass count)", f"limit {limit:.4f} s ({fb} fb + {f} f)", res["step_median_s"] / limit,
                    "pass-count limit", 1.05)
            elif method == "unimatch_v2":
                dpt_sup, dpt_fwd = ok.get("method dpt supervised"), ok.get("method dpt forward-only")
                if dpt_sup and dpt_fwd:
                    fb, f = UNIMATCH_V2
                    limit = fb * dpt_sup["step_median_s"] + f * dpt_fwd["forward_median_s"]
                    add(name + " (vs supervised)", fig, res["step_median_s"] / dpt_sup["step_median_s"],
                        "DPT-DINOv2 supervised step", None)
                    add(name + " (vs pass count)", f"limit {limit:.4f} s ({fb} fb + {f} f)",
                        res["step_median_s"] / limit, "pass-count limit", 1.05)
                else:
                    add(name, fig, None, "", None)
            elif method == "rc2l" and sup:
                add(name + " (vs supervised)", fig, res["step_median_s"] / sup["step_median_s"],
                    "MaskFormer supervised step", None)
            else:
                add(name, fig, None, "", None)
        elif r["kind"] == "method":
            add(name, f"{res['forward_median_s']:.4f} s", None, "", None)
        elif r["kind"] == "overhead":
            seg = ok.get(f"overhead segcon {sizes.models[0]} {sizes.precisions[0]}")
            if name.startswith("overhead segcon"):
                continue  # reported in the bare case's rows
            fig = f"{res['step_median_s']:.4f} s, {res['peak_gib']:.2f} GiB{batch}"
            if seg:
                add("overhead segcon / bare (time)", fig, seg["step_median_s"] / res["step_median_s"], "bare loop", 1.05)
                add("overhead segcon / bare (memory)", "", seg["peak_gib"] / res["peak_gib"], "bare loop", None)
            else:
                add(name, fig, None, "", None)
        elif r["kind"] == "eval":
            whole = ok.get("eval whole")
            fig = f"{res['s_per_image']:.3f} s/image, {res['working_gib']:.2f} GiB working, {res['passes']} passes"
            if whole and name != "eval whole":
                time_ratio = res["s_per_image"] / whole["s_per_image"]
                add(name, fig + f", {time_ratio:.2f}x whole", time_ratio / res["pixel_ratio"],
                    f"pixels vs whole ({res['pixel_ratio']:.2f})", None)
            else:
                add(name, fig, None, "", None)
        elif r["kind"] == "loader":
            step = ok.get(f"overhead segcon {sizes.models[0]} {sizes.precisions[0]}")
            need = f", the R-50 step consumes {sizes.batch / step['step_median_s']:.1f}" if step else ""
            add(name, f"{res['images_per_s']:.1f} images/s{need}", None, "", None)
        elif r["kind"] == "compile":
            eager = ok.get("compile eager")
            fig = f"{res['step_median_s']:.4f} s steady, first step {res['first_step_s']:.1f} s"
            if eager and name != "compile eager":
                add(name, fig, res["step_median_s"] / eager["step_median_s"], "eager", None)
            else:
                add(name, fig, None, "", None)
    return rows


def environment() -> dict:
    import lightning
    import torch

    cpu = f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "lightning": lightning.__version__, "python": platform.python_version(), "platform": platform.platform()}


def print_table(rows: list[dict], env: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"segcon GPU check: {env['device']}, torch {env['torch']}, CUDA {env['cuda']}")
    for col in ("case", "figure", "ratio", "against", "goal", "verdict"):
        table.add_column(col, justify="left" if col in ("case", "figure", "against") else "right")
    for r in rows:
        table.add_row(r["case"], r["figure"], "" if r["ratio"] is None else f"{r['ratio']:.3f}", r["against"],
                      "" if r["goal"] is None else f"<= {r['goal']:.2f}", r["verdict"])
    Console(width=220).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON file (rewritten after every case)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="hard limit for all cases together")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, for a CPU: proves every case runs")
    parser.add_argument("--only", nargs="+", choices=["train", "method", "overhead", "eval", "loader", "compile"],
                        help="only these kinds of case")
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: the GPU check measures a GPU (use --dry-run to try it on a CPU)")
    deadline = time.monotonic() + args.budget_s
    sizes = TINY if args.dry_run else FULL
    env = environment()
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="segcon-gpu-check-") as tmp:
        cases = plan(sizes, str(Path(tmp) / "synthetic"), str(Path(tmp) / "loader"), args.only)
        records: list[dict] = []
        for i, case in enumerate(cases):
            records.append(run_case(case, deadline))
            r = records[-1]
            print(f"[{i + 1}/{len(cases)}] {case.name}: {r['status']}" + (f" ({r['seconds']} s)" if "seconds" in r else ""),
                  flush=True)
            report = {"environment": env, "dry_run": args.dry_run, "budget_s": args.budget_s,
                      "sizes": dataclasses.asdict(sizes), "cases": records, "summary": summarise(records, sizes)}
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report["summary"], env)
    failed = [r["name"] for r in records if r["status"] == "failed"]
    skipped = sum(r["status"] == "skipped" for r in records)
    print(f"{len(records) - len(failed) - skipped} cases ok, {len(failed)} failed, {skipped} skipped; written to {out}")


if __name__ == "__main__":
    main()
