"""The device check: everything the CPU tests cannot show, run on a CUDA GPU.

    make gpu-check                       # = python benchmarks/gpu_check.py
    python3 benchmarks/gpu_check.py --quick   # within 8 minutes on one H200
    python benchmarks/gpu_check.py --work /tmp/gpu-check --only loader,predict

It runs from a checkout without installing the project (it finds the repo
root from its own path), given the packages import; on the lent GPU machine,
offline, benchmarks/device_kit.py carries and installs them (README).

Stages, each in its own process with its own timeout, each printing one
PASS/FAIL line with its time (and the peak GPU memory it allocated):
  data         a small demo store and the golden set (benchmarks/golden.py)
  loader       make_loader on cuda, both backends, all six members: shape,
               dtype, device, finite values, masks 0/1, and mask/pixel
               alignment on the golden set
  photometric  DALI's GPU photometric operators against the opencv backend's
               versions on the same drawn values (grey levels apart per op)
  train_step   one bf16 optimiser step per member at the recipe's size with
               the recipe's encoder (fused AdamW, channels_last), finite loss
               and gradients, milliseconds per step
  torchrun     `torchrun --nproc_per_node 1 trainers/train.py --ddp` (NCCL)
  members      trains the other five members briefly on cuda: mining on the
               GPU (hard_negative, high_recall), the fine-tuned member
  predict      `trainers/predict.py` with all six members and flip TTA
  throughput   benchmarks/loader_throughput.py on cuda and on the CPU, side
               by side, for small_specialist (GPU timings synchronised)
--quick fits one 10-minute command on a lent machine by construction: each
stage's time budget (QUICK_STAGES, printed first) adds up to under 480 s;
the Numba kernels are compiled and cached once, by the data stage; one loader
per backend and member, 2 reader workers each, and the alignment check on
one member per backend; two members' training steps; torchrun with 2 ranks
where the machine has 2 GPUs (NCCL refuses two ranks on one GPU), else one
rank with --ddp; prediction with the member torchrun trained; throughput on
the GPU only.
Each stage's line gives the most GPU memory in use during it (nvidia-smi:
torch's cache, DALI's memory pools and the CUDA contexts), and the last line
the peak over the whole check. Exit status 0
when every stage passed, 1 otherwise. Without a GPU it says so in one line
and exits 0 (`--allow-cpu` runs every stage on the CPU at a tiny size instead:
that is how the test suite checks this script).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # run from a checkout, not installed
    sys.path.insert(0, str(ROOT))

from common.help_format import HelpFormatter  # noqa: E402

# (name, timeout in seconds on one H100 after install)
STAGES = (("data", 240), ("loader", 300), ("photometric", 120), ("train_step", 240),
          ("torchrun", 240), ("members", 420), ("predict", 240), ("throughput", 420))
# --quick: one 10-minute command; the budgets add up to under 480 s
QUICK_STAGES = (("data", 45), ("loader", 150), ("photometric", 30), ("train_step", 60),
                ("torchrun", 60), ("predict", 45), ("throughput", 80))
QUICK_MEMBERS = ("small_specialist", "highres_no_ela")   # the train_step stage's in --quick
RESULT = "RESULT: "   # a stage's last line: its one-line summary


class CheckFailed(AssertionError):
    pass


def check(condition, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# ---------------------------------------------------------------- settings

def sizes(cpu: bool, quick: bool = False) -> dict:
    """The GPU check runs the recipes' sizes; the CPU rehearsal tiny ones."""
    if cpu:   # in-process reading: worker start-up would dominate the rehearsal
        return {"img": 64, "batch": 2, "train_img": 64, "demo_count": 40, "max_side": 500,
                "workers": 0, "memory_formats": ("contiguous",),
                "throughput": ["--img-size", "64", "--batch-size", "2", "--batches", "4",
                               "--workers", "1"]}
    if quick:
        return {"img": 512, "batch": 4, "train_img": 256, "demo_count": 32, "max_side": 1500,
                "workers": 2, "memory_formats": ("channels_last",),
                "throughput": ["--img-size", "512", "--batch-size", "8", "--batches", "10",
                               "--workers", "2"]}
    return {"img": 512, "batch": 4, "train_img": 256, "demo_count": 64, "max_side": 2000,
            "workers": 2, "memory_formats": ("contiguous", "channels_last"),
            "throughput": ["--img-size", "512", "--batch-size", "8", "--batches", "20",
                           "--workers", str(max(1, min(8, (os.cpu_count() or 2) - 1)))]}


def child_env() -> dict:
    """The environment of the stages' processes: the repo root importable
    (the check runs from a checkout, not installed)."""
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def train_flags(work: Path, device: str, cpu: bool) -> list[str]:
    s = sizes(cpu)
    return ["--store", str(work / "store.zarr"), "--out", str(work / "run"), "--device", device,
            "--encoder-weights", "none", "--img-size", str(s["train_img"]),
            "--batch-size", str(s["batch"]), "--epochs", "1", "--max-steps", "2"] + (
            ["--workers", "0"] if cpu else [])


def run_cli(args: list[str], timeout: float, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**child_env(), **(env or {})})
    if done.returncode != 0:
        raise CheckFailed(f"`{' '.join(args[:3])} ...` exited {done.returncode}:\n"
                          + (done.stdout[-1500:] + done.stderr[-3000:]).strip())
    return done.stdout + done.stderr


# ---------------------------------------------------------------- stages
# Each returns its one-line summary or raises; `device` is "cuda" or "cpu";
# `quick`: the --quick check's share of the work.

def stage_data(work: Path, device: str, cpu: bool, quick: bool) -> str:
    from benchmarks.golden import write_golden_source
    from preprocess.build_zarr import build_store
    from preprocess.demo_data import write_demo

    s = sizes(cpu, quick)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_demo(work / "demo", count=s["demo_count"], seed=7, min_side=64, max_side=s["max_side"],
               supplemental=0, progress=False)
    build_store(work / "demo", work / "store.zarr", progress=False, figure=False)
    write_golden_source(work / "golden")
    build_store(work / "golden", work / "golden.zarr", progress=False, figure=False)
    warm_numba(work / "store.zarr")
    return f"demo store ({s['demo_count']} images) and golden set built in {work}, Numba cache warm"


def warm_numba(store: Path) -> None:
    """Compile the sampler's and loader's Numba kernels once, into their
    on-disk cache (cache=True), so that no later stage's loader compiles."""
    from engine import make_loader

    with make_loader(store, QUICK_MEMBERS[0], batch_size=2, img_size=64, device="cpu", workers=0,
                     backend="opencv") as loader:
        next(iter(loader))


def stage_loader(work: Path, device: str, cpu: bool, quick: bool) -> str:
    import dataclasses

    import numpy as np
    import torch

    from benchmarks.golden import alignment, write_mining_flags
    from engine import make_loader
    from engine import store as layout
    from engine.augment import GEOMETRIC_OPS
    from engine.loader import MEMORY_FORMATS
    from engine.pipeline import BACKENDS
    from engine.recipes import RECIPES

    s = sizes(cpu, quick)
    golden = work / "golden.zarr"
    meta = layout.read_meta(layout.open_store(golden))
    write_mining_flags(golden, {"hard_negative": np.flatnonzero(meta["label"] == 0)[:3],
                                "hard_fn": np.flatnonzero(meta["label"] == 1)[:3]})
    worst = 1.0
    for backend in BACKENDS:
        for number, (name, recipe) in enumerate(RECIPES.items()):
            for memory_format in s["memory_formats"]:
                loader = make_loader(golden, recipe, batch_size=s["batch"], img_size=s["img"],
                                     device=device, backend=backend, workers=s["workers"],
                                     memory_format=memory_format)
                batch = next(iter(loader))
                image, mask = batch["image"], batch["mask"]
                where = f"{name}/{backend}/{memory_format}"
                check(image.device.type == device and mask.device.type == device, f"{where}: on {image.device}")
                check(image.dtype == mask.dtype == torch.float32, f"{where}: {image.dtype}, {mask.dtype}")
                check(tuple(image.shape) == (s["batch"], recipe.in_channels, s["img"], s["img"]),
                      f"{where}: image {tuple(image.shape)}")
                check(torch.isfinite(image).all().item(), f"{where}: non-finite pixels")
                check(set(torch.unique(mask).tolist()) <= {0.0, 1.0}, f"{where}: mask not 0/1")
                check(image.is_contiguous(memory_format=MEMORY_FORMATS[memory_format]),
                      f"{where}: not {memory_format}")
            if quick and number:   # --quick: the alignment of one member per backend
                continue
            geometric = dataclasses.replace(recipe, copy_paste=None, augment=tuple(
                op for op in recipe.augment if op[0] in GEOMETRIC_OPS))
            shares = alignment(make_loader(golden, geometric, batch_size=s["batch"], img_size=s["img"],
                                           device=device, backend=backend, workers=s["workers"]))
            check(min(shares) > 0.97, f"{name}/{backend}: alignment {shares}")
            worst = min(worst, *shares)
    return (f"{len(BACKENDS) * len(RECIPES) * len(s['memory_formats'])} loaders on {device} "
            f"({s['workers']} workers each) well formed; "
            f"golden-set alignment >= {worst:.3f}")


def stage_photometric(work: Path, device: str, cpu: bool, quick: bool) -> str:
    import cv2
    import numpy as np
    from skimage import data

    from benchmarks.golden import dali_photometric, recipe_photometric_ops
    from engine import photometric, worker_ops

    side = 96
    pictures = [np.ascontiguousarray(cv2.resize(load(), (side, side), interpolation=cv2.INTER_AREA))
                for load in (data.astronaut, data.chelsea, data.coffee)]
    report = []
    for name, params in sorted(recipe_photometric_ops().items()):
        plan = photometric.slots(((name, {**params, "p": 1.0}),))
        values = [photometric.draw(plan, np.random.default_rng(seed), side) for seed in range(len(pictures))]
        dali = dali_photometric(pictures, plan, values, "gpu" if device == "cuda" else "cpu")
        opencv = [worker_ops.apply_photometric(p, plan, v) for p, v in zip(pictures, values)]
        diffs = [np.abs(o.astype(int) - d.astype(int)) for o, d in zip(opencv, dali)]
        largest, mean = max(int(d.max()) for d in diffs), float(np.mean([d.mean() for d in diffs]))
        if name == "jpeg":
            # DALI's GPU operator approximates a JPEG round trip (its own
            # quantisation and colour rounding), so it is not OpenCV's encode
            # to the grey level: it must stay closer to OpenCV's result than
            # that result is to the picture (the JPEG's own distortion)
            distortion = float(np.mean([np.abs(o.astype(int) - p.astype(int)).mean()
                                        for o, p in zip(opencv, pictures)]))
            fits, why = mean <= distortion + 1.0, f"JPEG distortion {distortion:.2f}"
        else:
            fits, why = largest <= 2 and mean < 1.0, "limit 2"
        print(f"  {name:<22} max {largest:3d} grey levels apart, mean {mean:.3f} ({why})")
        report.append(f"{name} {largest}/{mean:.2f}")
        check(fits, f"{name}: DALI {device} and OpenCV differ by up to {largest} grey levels "
                    f"(mean {mean:.2f}; {why})")
    return "max/mean grey-level difference: " + ", ".join(report)


def stage_train_step(work: Path, device: str, cpu: bool, quick: bool) -> str:
    import torch

    from benchmarks.golden import write_mining_flags
    from engine import make_loader
    from engine import store as layout
    from engine.recipes import RECIPES
    from trainers.losses import MemberLoss
    from trainers.model import build_model, freeze_unused
    from trainers.precision import grad_scaler, precision_name
    from trainers.schedules import build_optimizer
    from trainers.training import backward, optimiser_step

    s = sizes(cpu, quick)
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"   # as trainers/train.py sets it
    # the mined members' loaders need a result (none flagged); the members stage mines for real
    write_mining_flags(work / "store.zarr", {kind: [] for kind in layout.MINING_KINDS})
    timings = []
    for name, recipe in RECIPES.items():
        if quick and name not in QUICK_MEMBERS:
            continue
        torch.manual_seed(0)
        model = build_model(recipe.encoder, recipe.in_channels, "none")
        freeze_unused(model, recipe.in_channels)
        memory_format = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        model.to(dev, memory_format=memory_format).train()
        optimizer = build_optimizer(model, recipe, fused=dev.type == "cuda")
        with make_loader(work / "store.zarr", recipe, batch_size=s["batch"], img_size=s["img"],
                         device=device, workers=s["workers"],
                         memory_format="channels_last" if dev.type == "cuda" else "contiguous") as loader:
            batch = next(iter(loader))
        criterion, scaler = MemberLoss(recipe), grad_scaler(dev)
        optimiser_step(model, batch, criterion, optimizer, scaler, dev, None)   # warm-up, cuDNN choice
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        started = time.perf_counter()
        loss = optimiser_step(model, batch, criterion, optimizer, scaler, dev, None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        ms = 1000 * (time.perf_counter() - started)
        check(torch.isfinite(loss).item(), f"{name}: loss {loss.item()}")
        backward(model, batch, criterion, scaler, dev)   # the gradients again: the step clears them
        if scaler is not None:
            scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        check(all(g is not None and torch.isfinite(g).all().item() for g in grads),
              f"{name}: missing or non-finite gradients")
        print(f"  {name:<18} {ms:8.1f} ms/step, loss {loss.item():.4f}")
        timings.append(f"{name} {ms:.0f} ms")
    return (f"{precision_name(dev)}, batch {s['batch']} x {s['img']} px: " + ", ".join(timings))


def stage_torchrun(work: Path, device: str, cpu: bool, quick: bool) -> str:
    import torch

    # NCCL refuses two ranks on one GPU ("Duplicate GPU detected"): one rank
    # per GPU, at most 2; gloo on the CPU runs 2
    ranks = 2 if device == "cpu" else min(2, torch.cuda.device_count())
    out = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   "trainers/train.py", "--member", "highres_no_ela", "--ddp",
                   *train_flags(work, device, cpu)], timeout=230)
    line = next((l for l in out.splitlines() if l.startswith("highres_no_ela: device")), "")
    check(f"world size {ranks} (" + ("nccl" if device == "cuda" else "gloo") + ")" in line,
          f"process group not as expected: {line!r}")
    return line


def stage_members(work: Path, device: str, cpu: bool, quick: bool) -> str:
    from engine import store as layout
    from engine.recipes import RECIPES
    from trainers.checkpoint import file_sha256, last_path

    trained = []
    for name in RECIPES:
        if name == "highres_no_ela":   # trained by the torchrun stage
            continue
        run_cli(["trainers/train.py", "--member", name, *train_flags(work, device, cpu)], timeout=120)
        trained.append(name)
        check(last_path(work / "run" / "models", name).is_file(), f"{name}: no checkpoint")
    group = layout.open_store(work / "store.zarr")
    sha = file_sha256(work / "run" / "models" / "highres_no_ela_best.pth")
    for kind in layout.MINING_KINDS:
        result = layout.read_mining(group, kind)
        check(result is not None and result["checkpoint"] == sha, f"{kind} mining not from this run")
    return (f"trained {', '.join(trained)} on {device}; both mining results from this "
            "run's highres_no_ela")


def stage_predict(work: Path, device: str, cpu: bool, quick: bool) -> str:
    csv_path = work / "submission.csv"
    # --quick trains one member (the torchrun stage's); the full check all six
    members = ["--members", "highres_no_ela"] if quick else []
    run_cli(["trainers/predict.py", "--store", str(work / "store.zarr"), "--split", "val",
             "--models", str(work / "run" / "models"), "--tta", "--device", device,
             "--out", str(csv_path), *members], timeout=230)
    rows = csv_path.read_text().splitlines()
    check(rows and rows[0].startswith("case_id,annotation") and len(rows) > 1,
          f"{csv_path}: {len(rows)} lines")
    return f"{'highres_no_ela' if quick else 'all six members'} with flip TTA on {device}: {len(rows) - 1} rows"


def stage_throughput(work: Path, device: str, cpu: bool, quick: bool) -> str:
    devices = ["cpu"] if cpu else ["cuda"] if quick else ["cuda", "cpu"]
    figures = {}
    for dev in devices:
        out_json = work / f"throughput_{dev}.json"
        run_cli(["benchmarks/loader_throughput.py", "--store", str(work / "store.zarr"),
                 "--members", "small_specialist", "--rounds", "1",
                 "--train-steps", "2", "--device", dev, "--json", str(out_json),
                 *sizes(cpu, quick)["throughput"]], timeout=200)
        figures[dev] = json.loads(out_json.read_text())["members"]
    lines = []
    for member in figures[devices[0]]:
        cells = []
        for dev in devices:
            r = figures[dev][member]
            per_backend = ", ".join(f"{b} {v:.0f}/s" for b, v in r["backend_samples_per_s"].items())
            step = r.get("training", {})
            cells.append(f"{dev}: {per_backend}, step {step.get('seconds_per_step', float('nan')):.3f} s, "
                         f"data wait {100 * step.get('data_wait_share', float('nan')):.1f}%")
        lines.append(f"{member}: " + " | ".join(cells))
    for line in lines:
        print("  " + line)
    return "; ".join(lines)


STAGE_FUNCTIONS = {name: globals()[f"stage_{name}"] for name, _ in STAGES}


# ---------------------------------------------------------------- driver

class PeakMemory:
    """Polls nvidia-smi for the most GPU memory in use while the check runs
    (every process's: torch's cache, DALI's pools, the CUDA contexts), over
    the whole check (peak_mib) and since the last take()."""

    def __init__(self, every: float = 0.5):
        self.peak_mib, self.stage_mib, self.every = 0, 0, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(self.every):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                used = max([0] + [int(v) for v in out.split() if v.isdigit()])
                self.peak_mib, self.stage_mib = max(self.peak_mib, used), max(self.stage_mib, used)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def take(self) -> int:
        """The most MiB in use since the last take()."""
        peak, self.stage_mib = self.stage_mib, 0
        return peak


def run_stage(name: str, work: Path, device: str, cpu: bool, quick: bool) -> int:
    """In the stage's own process: run it, print its summary last."""
    import torch

    summary = STAGE_FUNCTIONS[name](work, device, cpu, quick)
    if device == "cuda":
        summary += f" [torch peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB]"
    print(RESULT + summary, flush=True)
    return 0


def drive(stages, work: Path, device: str, cpu: bool, quick: bool, scale: float,
          memory: PeakMemory) -> int:
    failed = []
    for name, timeout in stages:
        started = time.perf_counter()
        memory.take()
        command = [sys.executable, str(Path(__file__).resolve()), "--run-stage", name,
                   "--work", str(work), "--device", device] + (["--allow-cpu"] if cpu else []) + (
                   ["--quick"] if quick else [])
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout * scale, env=child_env())
            output, ok = done.stdout + done.stderr, done.returncode == 0
        except subprocess.TimeoutExpired as exc:
            output = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                      else exc.stdout or "") + f"\ntimed out after {timeout * scale:.0f} s"
            ok = False
        seconds = time.perf_counter() - started
        lines = output.strip().splitlines()
        summary = next((l[len(RESULT):] for l in reversed(lines) if l.startswith(RESULT)), "")
        details = [l for l in lines if l.startswith("  ")]
        gpu = f" [GPU in use up to {memory.take()} MiB]" if device == "cuda" else ""
        print(f"{'PASS' if ok else 'FAIL'} {name:<12} {seconds:7.1f} s of {timeout * scale:.0f}  "
              f"{summary if ok else ''}{gpu}".rstrip(), flush=True)
        for line in details:
            print(line)
        if not ok:
            failed.append(name)
            print("\n".join("    | " + l for l in lines[-40:]), flush=True)
    return len(failed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--work", type=Path, default=Path("data/gpu-check"),
                   help="scratch folder, replaced by the data stage (default: data/gpu-check)")
    p.add_argument("--only", help="comma-separated stages to run (they need the data stage's folder)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without CUDA, rehearse every stage on the CPU at a tiny size")
    p.add_argument("--quick", action="store_true",
                   help="the stages and sizes that finish within 8 minutes on one H200 (budgets printed first)")
    p.add_argument("--timeout-scale", type=float, default=1.0,
                   help="multiply every stage's timeout (a slower GPU or machine)")
    p.add_argument("--run-stage", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_stage:
        return run_stage(args.run_stage, args.work, args.device, args.allow_cpu, args.quick)

    import torch

    from engine.device import gpus_seen_by_driver

    if not torch.cuda.is_available():
        if gpus_seen_by_driver():
            print(f"FAIL cuda: nvidia-smi sees {gpus_seen_by_driver()[0]!r} but torch "
                  f"{torch.__version__} (CUDA {torch.version.cuda}) cannot use it: update the driver")
            return 1
        if not args.allow_cpu:
            print("gpu-check: no CUDA GPU on this machine; nothing to check (exit 0)")
            return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stages = QUICK_STAGES if args.quick else STAGES
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {name for name, _ in stages})
        if unknown:
            p.error(f"--only: unknown stages {unknown}; stages: {', '.join(name for name, _ in stages)}")
        stages = tuple(s for s in stages if s[0] in wanted)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU rehearsal"
    print(f"gpu-check on {name}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"{os.cpu_count()} cores, work folder {args.work}", flush=True)
    budgets = [timeout * args.timeout_scale for _, timeout in stages]
    print("stage budgets: " + ", ".join(f"{name} {b:.0f} s" for (name, _), b in zip(stages, budgets))
          + f" = {sum(budgets):.0f} s", flush=True)
    started = time.perf_counter()
    with PeakMemory() as memory:
        failed = drive(stages, args.work, device, device == "cpu", args.quick, args.timeout_scale, memory)
    peak = f", peak GPU memory in use {memory.peak_mib} MiB (nvidia-smi)" if device == "cuda" else ""
    print(f"{'FAIL' if failed else 'PASS'} gpu-check: {len(stages) - failed}/{len(stages)} stages "
          f"passed in {time.perf_counter() - started:.0f} s{peak}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
