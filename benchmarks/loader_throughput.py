"""Loader throughput: the engine against the loader it replaces, in one run.

For each member, samples per second at img_size x img_size of
  engine      make_loader with the device's default backend (opencv on the
              CPU: each sample finished on uint8 in the DALI reader workers;
              dali on CUDA: DALI crop+resize and photometric operators,
              torch geometry), and the other backend beside it; each one
              loader whose batches are timed across epochs (set_epoch), as a
              trainer takes them;
  normalise   with --normalise-placement: the opencv backend with the
              normalisation in the reader workers (floats handed over) beside
              it in the consumer (uint8 handed over, what make_loader does),
              to choose where the CPU normalises;
  replaced    full PNG decode + .npy + np.where + OpenCV crop/resize/augment
              per sample, DataLoader + WeightedRandomSampler, same workers
              (benchmarks/baseline_loader.py);
  read limit  only reading the windows' bytes from the store, same workers;
plus each opencv-backend stage's share of the serial per-sample time, the
ratios, and a short training run (--train-epochs epochs at --train-img-size,
one loader re-planned per epoch) with the share of each epoch's step spent
waiting for data: epoch 1 includes the pipeline's start-up, epochs 2 and
later are the steady state.

Prints a table and the total wall time, writes --json (default
logs/loader_throughput.json) and, for a complete run, a PNG chart beside it.
Stopped (Ctrl-C, SIGTERM), it still prints and writes whatever members and
columns were measured, marked "partial": true with the signal's name in
"stopped", and exits 128 + the signal's number. The defaults fit the demo
store on 2 cores in under 3 minutes.

    python benchmarks/loader_throughput.py                  # demo store
    python benchmarks/loader_throughput.py --realistic      # 300 images, 500-3000 px
    python benchmarks/loader_throughput.py --store s3://bucket/store.zarr   # reads from a URL
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.baseline_loader import make_replaced_loader, unsupported_ops
from benchmarks.remote_reads import read_batch, reading_pool
from engine import sampling, storage, worker_ops
from engine import store as layout
from engine.loader import (SharedMemoryError, make_loader, planar_float, resolve_backend,
                           resolve_device)
from engine.pipeline import BACKENDS, PREFETCH_PER_WORKER, OpencvBackend
from engine.reader import WindowReader
from engine.recipes import get_recipe
from preprocess.build_zarr import REPORT
from preprocess.source import Case, discover
from common.atomic import atomic_open
from common.help_format import HelpFormatter

REALISTIC = {"count": 300, "min_side": 500, "max_side": 3000, "seed": 7}
DEFAULT_JSON = Path("logs/loader_throughput.json")
# the rounds' key of the opencv backend with floats from the workers (WorkerFloatBackend)
WORKER_FLOAT = "opencv_worker_float"
# the member of the default training run (issue 11's reference run: 128 px,
# batch 8); one member keeps the no-argument run within 3 minutes on 2 cores
TRAIN_MEMBER = "highres_no_ela"


class WorkerFloatBackend(OpencvBackend):
    """The opencv backend with the normalisation moved into the reader
    workers: they hand over float32 C x H x W images (normalised as
    Loader.to_float does) and 0./1. masks, and the consumer only takes DALI's
    copy of them. Timed against the opencv backend (uint8 handed over,
    planar_float in the consumer) to choose where the CPU normalises."""

    name = "opencv, floats from the workers"

    def __init__(self, loader):
        self.scale, self.shift = loader.scale.cpu(), loader.shift.cpu()

    def sample(self, source, block, drawn, geometry) -> dict:
        out = super().sample(source, block, drawn, geometry)
        image = planar_float(torch.from_numpy(out["image"][None]), self.scale, self.shift)[0].numpy()
        return {"image": image, "mask": np.moveaxis(out["mask"], -1, 0).astype(np.float32)}

    def finish(self, out: dict, loader):
        return out["image"], out["mask"]

    def block_side(self, out_size: int) -> int:
        return 2 * out_size   # float32: four times the bytes of a uint8 sample


def batch_stream(loader):
    """The loader's batches epoch after epoch, as a trainer takes them: one
    pipeline and one set of workers throughout (set_epoch)."""
    while True:
        yield from loader
        loader.set_epoch(loader.epoch + 1)


def _time_batches(batches_iter, batches: int) -> tuple[float, int]:
    """Seconds and samples of the next `batches` batches of `batches_iter`."""
    samples, batch, start = 0, None, time.perf_counter()
    for _ in range(batches):
        batch = next(batches_iter, None)
        if batch is None:
            break
        samples += len(batch["index"]) if isinstance(batch, dict) else len(batch[0])
    if isinstance(batch, dict) and batch["image"].is_cuda:   # the GPU's work counts too
        torch.cuda.synchronize(batch["image"].device)
    return time.perf_counter() - start, samples


def engine_stream(store, member, backend: str, **kwargs):
    """(loader, its batch stream past the first batch, pipeline start-up)."""
    loader = make_loader(store, member, backend="opencv" if backend == WORKER_FLOAT else backend,
                         **kwargs)
    if not len(loader):
        sys.exit(f"{store}: {member}'s epoch has no batches; nothing to time "
                 "(use a bigger store, e.g. --realistic)")
    if backend == WORKER_FLOAT:
        loader.source.backend = WorkerFloatBackend(loader)   # set_epoch keeps the source's backend
    stream = batch_stream(loader)
    next(stream)
    return loader, stream


def planned_batches(loader, batches: int) -> list:
    """(rows, windows, plan positions, SampleAugment) of the first `batches`
    batches of the loader's epochs from its first on: what its stream reads."""
    out, epoch = [], loader.epoch
    while len(out) < batches:
        plan, aug = loader.planner.plan(epoch, 0)
        out += [(plan.rows[k], plan.windows[k], plan.positions[k], aug) for k in range(len(plan))]
        epoch += 1
    return out[:batches]


def measure_engine(stream, batches: int) -> float:
    """Samples/s over the stream's next `batches` batches (across epochs)."""
    seconds, samples = _time_batches(stream, batches)
    return samples / seconds


def measure_read_limit(pool, loader, img_size, workers, batches) -> float:
    """Samples/s of reading the windows' blocks alone, in the pool's `workers` processes."""
    jobs = [(rows, windows, img_size) for rows, windows, _, _ in planned_batches(loader, batches)]
    pool.map(read_batch, jobs[:max(1, workers)], chunksize=1)
    start = time.perf_counter()
    pool.map(read_batch, jobs, chunksize=1)
    seconds = time.perf_counter() - start
    return sum(len(rows) for rows, _, _ in jobs) / seconds


def measure_stages(loader, store, img_size, batches) -> dict[str, float]:
    """Serial milliseconds per sample of each stage of the opencv backend,
    the same calls its reader workers make: read, resize, photometric
    (with the sample's parameter draws), geometric (+ dropout), and the consumer's conversion
    of the uint8 batch (image and mask) to floats."""
    reader = WindowReader(store, with_ela=loader.reader.with_ela)
    seconds = dict.fromkeys(("read", "resize", "photometric", "geometric"), 0.0)
    finished = []
    for rows, windows, positions, aug in planned_batches(loader, batches):
        batch = []
        for row, window, seed in zip(rows, windows, sampling.sample_seeds(aug.seed, aug.epoch, positions)):
            t0 = time.perf_counter()
            block = reader.read(int(row), window, img_size)
            t1 = time.perf_counter()
            image, mask, ela = worker_ops.resize_block(block, img_size)
            t2 = time.perf_counter()
            drawn, ops = loader.source.draw(seed)
            image = worker_ops.apply_photometric(image, aug.photometric, drawn)
            t3 = time.perf_counter()
            image, mask, ela = worker_ops.apply_geometric(image, mask, ela, ops)
            t4 = time.perf_counter()
            for stage, (a, b) in zip(seconds, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                seconds[stage] += b - a
            batch.append((image if ela is None else np.dstack([image, ela]), mask[..., None]))
        finished.append(batch)

    start = time.perf_counter()
    for batch in finished:
        loader.to_float(*(torch.from_numpy(np.stack(column)) for column in zip(*batch)))
    seconds["normalise"] = time.perf_counter() - start
    samples = sum(len(b) for b in finished)
    return {name: 1000 * sec / samples for name, sec in seconds.items()}


def source_files(store: Path) -> list[Case]:
    """The source case of every store row (the build report lists row images)."""
    group = layout.open_store(store)
    by_image = {str(c.image.resolve()): c for c in discover(Path(group.attrs["build"]["source"]))[0]}
    rows = [str(Path(p).resolve()) for p in json.loads((Path(store) / REPORT).read_text())["rows"]]
    missing = [image for image in rows if image not in by_image]
    if missing:
        sys.exit(f"{store}: its source files are gone (e.g. {missing[0]}); the replaced "
                 "loader reads them")
    return [by_image[image] for image in rows]


def measure_replaced(store, member, img_size, batch_size, workers, batches, seed) -> float:
    recipe = get_recipe(member)
    meta = layout.read_meta(layout.open_store(store))
    weights = sampling.member_weights(recipe.sampling, meta["label"], meta["area_ratio"],
                                      meta["split"], layout.SPLITS["train"], mined=False)
    rows = np.flatnonzero(weights > 0)
    cases = source_files(store)
    loader = make_replaced_loader([cases[r].image for r in rows], [cases[r].mask for r in rows],
                                  weights[rows], recipe, img_size=img_size, batch_size=batch_size,
                                  workers=workers, num_samples=batch_size * (batches + 1), seed=seed)
    batches_iter = iter(loader)
    next(batches_iter)   # worker start-up
    seconds, samples = _time_batches(batches_iter, batches)
    return samples / seconds


def measure_training_wait(store, member, img_size, batch_size, workers, epochs, steps, seed,
                          device) -> dict:
    """A short training run with one loader re-planned per epoch (set_epoch,
    as trainers/train.py does): per epoch its steps, seconds per step and the
    share of the step spent blocked on the loader. Epoch 1 includes the
    pipeline's start-up; epochs 2 and later are the steady state, and
    seconds_per_step and data_wait_share are theirs (epoch 1's for a one-epoch
    run). steps: at most this many training steps per epoch (None: all); the
    rest of the epoch is taken untrained, as only a finished epoch lets the
    next reuse the pipeline."""
    from engine.loader import MEMORY_FORMATS
    from trainers.losses import MemberLoss
    from trainers.model import build_model, freeze_unused
    from trainers.precision import grad_scaler
    from trainers.schedules import build_optimizer
    from trainers.training import optimiser_step

    # the trainer's step and settings (trainers/train.py): on CUDA bf16
    # autocast, channels_last, fused AdamW, cuDNN autotuning
    recipe = get_recipe(member)
    on_cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = on_cuda
    memory_format = "channels_last" if on_cuda else "contiguous"
    model = build_model(recipe.encoder, recipe.in_channels, encoder_weights="none")
    freeze_unused(model, recipe.in_channels)
    model.to(device, memory_format=MEMORY_FORMATS[memory_format]).train()
    loss_fn, scaler = MemberLoss(recipe), grad_scaler(device)
    optimiser = build_optimizer(model, recipe, fused=on_cuda)
    per_epoch = []
    with make_loader(store, member, batch_size=batch_size, img_size=img_size, seed=seed,
                     workers=workers, device=str(device), memory_format=memory_format) as loader:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            batches = iter(loader)
            wait = step = 0.0
            done = 0
            while steps is None or done < steps:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                t1 = time.perf_counter()
                optimiser_step(model, batch, loss_fn, optimiser, scaler, device, None)
                if on_cuda:
                    torch.cuda.synchronize(device)
                t2 = time.perf_counter()
                wait, step, done = wait + (t1 - t0), step + (t2 - t0), done + 1
            for _ in batches:   # the epoch's untrained rest: only a finished epoch reuses the pipeline
                pass
            per_epoch.append({"epoch": epoch + 1, "steps": done, "seconds": step, "wait_seconds": wait})
            print(f"[{member}] {_epoch_line(per_epoch[-1])}", flush=True)
    later = per_epoch[1:] or per_epoch
    step, wait = sum(e["seconds"] for e in later), sum(e["wait_seconds"] for e in later)
    done = sum(e["steps"] for e in later)
    return {"img_size": img_size, "epochs": per_epoch, "steps": done,
            "seconds_per_step": step / max(done, 1), "data_wait_share": wait / step if step else float("nan")}


def _epoch_line(e: dict) -> str:
    share = 100 * e["wait_seconds"] / e["seconds"] if e["seconds"] else float("nan")
    return (f"training epoch {e['epoch']}: {e['steps']} steps, {e['seconds'] / max(e['steps'], 1):.2f} s per "
            f"step, waiting for data {share:.2f}% of the step"
            + (" (pipeline start-up included)" if e["epoch"] == 1 else ""))


def realistic_store(root: Path) -> Path:
    """The benchmark's store of realistic sizes, generated and built once
    (again when this engine no longer reads it, or it is not in the
    default layout: the figures are the default's)."""
    from preprocess.build_zarr import build_store
    from preprocess.demo_data import write_demo

    source, store = root / "source", root / "store.zarr"
    if not (source / "train_images").exists():
        write_demo(source, **REALISTIC)
    try:
        current = layout.open_store(store).attrs.get("layout") == asdict(layout.DEFAULT_LAYOUT)
    except layout.StoreError:
        current = False
    if not current:
        build_store(source, store, overwrite=store.exists())
    return store


def draw_chart(results: dict, path: Path):
    """Samples/s per member of both engine backends, the replaced loader and
    the read limit, every bar labelled, the engine's ratio to the replaced
    loader above each member; beside it the opencv backend's serial ms per
    sample by stage. Written atomically; returns the Figure."""
    from matplotlib.figure import Figure

    rows = results["members"]
    members = list(rows)
    default = rows[members[0]]["backend"]   # the device's: the same for every member
    other = next(b for b in rows[members[0]]["backend_samples_per_s"] if b != default)
    series = {f"engine, {default} backend (default)": [rows[m]["engine_samples_per_s"]
                                                        for m in members],
              f"engine, {other} backend": [rows[m]["backend_samples_per_s"][other]
                                           for m in members],
              "replaced loader (PNG per sample)": [rows[m]["replaced_samples_per_s"]
                                                   for m in members],
              "read limit (store reads only)": [rows[m]["read_limit_samples_per_s"]
                                                for m in members]}
    fig = Figure(figsize=(13, 5))   # no pyplot: no global figure state, no GUI backend
    rates, stages = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.7, 1]})
    width, places = 0.8 / len(series), np.arange(len(members))
    for j, (label, values) in enumerate(series.items()):
        bars = rates.bar(places + (j - (len(series) - 1) / 2) * width, values, width, label=label)
        rates.bar_label(bars, [f"{v:.0f}" for v in values], padding=2, fontsize=8)
    top = max(max(values) for values in series.values())
    for x, member in zip(places, members):
        ratio = rows[member]["engine_over_replaced"]
        rates.text(x, 1.08 * top, f"engine ({default}):\n{ratio:.1f}x the replaced loader",
                   ha="center", fontsize=9, fontweight="bold")
    rates.set(ylim=(0, 1.3 * top), xticks=places, xlabel="member",
              ylabel="samples / s (higher is better)",
              title=f"Throughput at {results['img_size']} px, {results['workers']} workers, "
                    f"{results['device']}")
    rates.set_xticklabels(members)
    rates.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2, fontsize=8)
    names = list(rows[members[0]]["stage_ms"])
    width, places = 0.8 / len(members), np.arange(len(names))
    for j, member in enumerate(members):
        values = [rows[member]["stage_ms"][stage] for stage in names]
        bars = stages.bar(places + (j - (len(members) - 1) / 2) * width, values, width,
                          color=f"C{len(series) + j}",
                          label=f"{member} (total {sum(values):.1f} ms)")
        stages.bar_label(bars, [f"{v:.1f}" for v in values], padding=2, fontsize=8)
    stages.set(xticks=places, xlabel="stage", ylabel="ms per sample, serial (lower is better)",
               ylim=(0, 1.15 * max(max(r["stage_ms"].values()) for r in rows.values())),
               title="opencv backend: time per stage")
    stages.set_xticklabels(names, fontsize=8)
    stages.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--store", type=storage.location, default=layout.DEFAULT_STORE,
                   help="the store to read (built from a source folder that still exists: "
                        "the replaced loader reads its PNGs); a URL measures reads from it "
                        "against --compare-local (benchmarks/remote_reads.py)")
    p.add_argument("--compare-local", type=Path,
                   help="with a URL --store: the same store on local disk (required there: "
                        "a URL is built in place, with no local copy)")
    p.add_argument("--realistic", action="store_true",
                   help=f"generate and build a store of {REALISTIC['count']} images, "
                        f"{REALISTIC['min_side']}-{REALISTIC['max_side']} px, under data/bench")
    p.add_argument("--members", nargs="+", default=["small_specialist", "highres_no_ela"],
                   help="members whose recipes are measured")
    p.add_argument("--img-size", type=int, default=512, help="output side in pixels")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--batches", type=int, default=12,
                   help="timed batches per measurement (across epochs when one is shorter)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of measurements; medians are reported")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="reader processes of every loader")
    p.add_argument("--normalise-placement", action="store_true",
                   help="also time the opencv backend normalising in the reader workers (floats "
                        "handed over) beside the consumer (uint8 handed over, the default)")
    p.add_argument("--train-epochs", type=int, default=3,
                   help="epochs of the training run that measures the data-wait share, one "
                        "loader throughout (0: skip)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="at most this many training steps per epoch (default: whole epochs; 0: skip)")
    p.add_argument("--train-img-size", type=int, default=128, help="output side of the training run")
    p.add_argument("--train-members", nargs="+",
                   help="those of --members whose training run is measured (default: "
                        f"{TRAIN_MEMBER}, the reference run, when measured, else the first)")
    p.add_argument("--seed", type=int, default=0, help="sampling and augmentation seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="the figures, written (atomically) also when the run is stopped")
    p.add_argument("--png", type=Path, help="chart of a complete run (default: next to --json)")
    storage.add_arguments(p, cache=False)
    args = p.parse_args(argv)
    if args.train_members is None:
        args.train_members = [TRAIN_MEMBER if TRAIN_MEMBER in args.members else args.members[0]]
    return args


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM: the figures measured so far are reported."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def settle(rate: float, batch_size: int, workers: int) -> None:
    """Wait while a timed loader's workers refill the batches they keep
    ahead, so that their work does not land on the next measurement."""
    ahead = 2 + PREFETCH_PER_WORKER * workers
    time.sleep(ahead * batch_size / rate)


def summarise(row: dict) -> None:
    """The medians and ratios of the rounds measured so far, into `row`."""
    median = {name: float(np.median(values)) for name, values in row["rounds"].items() if values}
    row["backend_samples_per_s"] = {b: median[b] for b in BACKENDS if b in median}
    for key, name in (("engine_samples_per_s", row["backend"]), ("replaced_samples_per_s", "replaced"),
                      ("read_limit_samples_per_s", "read_limit")):
        row[key] = median.get(name)
    engine, replaced, limit = (row[k] for k in ("engine_samples_per_s", "replaced_samples_per_s",
                                                 "read_limit_samples_per_s"))
    row["engine_over_replaced"] = engine / replaced if engine and replaced else None
    row["engine_over_read_limit"] = engine / limit if engine and limit else None
    if "opencv" in median and WORKER_FLOAT in median:
        row["normalise_in"] = {"consumer": median["opencv"], "workers": median[WORKER_FLOAT]}


def measure_member(store, member, args, device, row: dict) -> None:
    """Every figure of one member, into `row` as each is measured."""
    backends = [row["backend"]] + [b for b in BACKENDS if b != row["backend"]]
    engines = backends + ([WORKER_FLOAT] if args.normalise_placement else [])
    rounds = row["rounds"] = {name: [] for name in engines + ["replaced", "read_limit"]}
    streams, pool = {}, None
    with_ela = get_recipe(member).in_channels == 4
    common = dict(batch_size=args.batch_size, img_size=args.img_size, seed=args.seed,
                  workers=args.workers, device=str(device))
    try:
        pool = reading_pool(store, with_ela, args.workers)
        for name in engines:
            streams[name] = engine_stream(store, member, name, **common)
        opencv = streams["opencv"][0]
        # Rounds of every measurement in turn, then medians: this machine's
        # speed drifts (shared host), and a drift would otherwise land on
        # one column and skew the ratios.
        for r in range(args.rounds):
            print(f"[{member}] round {r + 1}/{args.rounds}: engine ({', '.join(engines)}), read limit, "
                  "replaced loader ...", flush=True)
            for name in engines:
                rounds[name].append(measure_engine(streams[name][1], args.batches))
                settle(rounds[name][-1], args.batch_size, args.workers)
            rounds["read_limit"].append(measure_read_limit(pool, opencv, args.img_size,
                                                           args.workers, args.batches))
            rounds["replaced"].append(measure_replaced(store, member, args.img_size, args.batch_size,
                                                       args.workers, args.batches, args.seed))
        print(f"[{member}] stages ...", flush=True)
        row["stage_ms"] = measure_stages(opencv, store, args.img_size, args.batches)
    finally:
        for loader, _ in streams.values():
            loader.close()
        if pool is not None:
            pool.terminate()
    if member in args.train_members and args.train_epochs and args.train_steps != 0:
        print(f"[{member}] training, {args.train_epochs} epochs at {args.train_img_size} px ...", flush=True)
        row["training"] = measure_training_wait(store, member, args.train_img_size, args.batch_size,
                                                args.workers, args.train_epochs, args.train_steps,
                                                args.seed, device)


def _cell(value, spec: str, width: int, suffix: str = "") -> str:
    return (format(value, spec) + suffix if value is not None else "-").rjust(width)


def report(results: dict, rounds: int) -> None:
    """The table and the per-member lines of whatever `results` holds."""
    members = results["members"]
    state = "PARTIAL (stopped: " + results["stopped"] + ")" if results["partial"] else "complete"
    print(f"\nstore {results['store']}, {results['img_size']}x{results['img_size']}, batch "
          f"{results['batch_size']}, {results['workers']} workers, {results['cpu_count']} cores; {state}")
    stage_names = next((list(r["stage_ms"]) for r in members.values() if "stage_ms" in r), [])
    header = (f"{'member':<18}{'backend':>8}{'engine/s':>10}{'other/s':>9}{'replaced/s':>12}"
              f"{'read lim/s':>12}{'x replaced':>12}{'of limit':>10}  stage share "
              f"({'/'.join(stage_names)})")
    print(header + "\n" + "-" * len(header))
    for member, r in members.items():
        other = next((v for b, v in r.get("backend_samples_per_s", {}).items() if b != r["backend"]), None)
        limit = r.get("engine_over_read_limit")
        shares = "-"
        if "stage_ms" in r:
            total = sum(r["stage_ms"].values())
            shares = "/".join(f"{100 * v / total:.0f}%" for v in r["stage_ms"].values())
        print(f"{member:<18}{r['backend']:>8}{_cell(r.get('engine_samples_per_s'), '.1f', 10)}"
              f"{_cell(other, '.1f', 9)}{_cell(r.get('replaced_samples_per_s'), '.1f', 12)}"
              f"{_cell(r.get('read_limit_samples_per_s'), '.1f', 12)}"
              f"{_cell(r.get('engine_over_replaced'), '.1f', 12, 'x')}"
              f"{_cell(None if limit is None else 100 * limit, '.0f', 10, '%')}  {shares}")
    print(f"medians of up to {rounds} rounds; engine: the device's default backend; other: the "
          "other backend on the same device")
    for member, r in members.items():
        done = len(r.get("rounds", {}).get(WORKER_FLOAT, []))
        if "normalise_in" in r:
            n = r["normalise_in"]
            print(f"{member}: opencv backend, normalising in the consumer (uint8 handed over) "
                  f"{n['consumer']:.1f} samples/s, in the reader workers (floats handed over) "
                  f"{n['workers']:.1f} samples/s ({n['workers'] / n['consumer']:.2f}x; {done} rounds)")
        if "training" in r:
            t = r["training"]
            for epoch in t["epochs"]:
                print(f"{member}: {results['device']}, {t['img_size']} px, {_epoch_line(epoch)}")
            print(f"{member}: {results['device']} training step {t['seconds_per_step']:.2f} s, waiting for "
                  f"data {100 * t['data_wait_share']:.2f}% of the step ({t['steps']} steps"
                  f"{', epochs 2+' if len(t['epochs']) > 1 else ''})")
        if r.get("replaced_skips"):
            print(f"{member}: the replaced loader skips {', '.join(r['replaced_skips'])}")


def run_stoppable(results: dict, measure) -> None:
    """measure() with SIGINT and SIGTERM turned into Stopped: `results` says
    whether it finished ("partial") or what stopped it ("stopped")."""
    previous = {signum: signal.signal(signum, _stop) for signum in _STOP_SIGNALS}
    try:
        measure()
        results["partial"] = False
    except Stopped as stop:
        results["stopped"] = str(stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def write_results(results: dict, args, started: float) -> int:
    """The JSON (also of a partial run), the wall time, the exit status."""
    results["wall_seconds"] = time.perf_counter() - started
    with atomic_open(args.json) as handle:
        json.dump(results, handle, indent=2)
    print(f"figures: {args.json}" + (" (partial)" if results["partial"] else ""))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0 if not results["partial"] else 128 + signal.Signals[results["stopped"]].value


def main_remote(args, started: float, settings: storage.StorageSettings) -> int:
    """--store URL: reads from the URL (no cache, a cold and a warm cache)
    against the local copy of the store (benchmarks/remote_reads.py)."""
    from benchmarks import remote_reads
    if args.compare_local is None:
        raise layout.StoreError(f"{args.store}: a URL is measured against the same store on "
                                "local disk: give its path as --compare-local")
    url, local = args.store, args.compare_local
    layout.open_store(local)   # a missing local copy: its one-line StoreError now
    results = {"store": url, "local": str(local), "img_size": args.img_size,
               "batch_size": args.batch_size, "workers": args.workers, "cpu_count": os.cpu_count(),
               "partial": True, "stopped": None, "members": {}}

    def measure():
        for member in args.members:
            print(f"[{member}] reads: local disk, then {url} without a cache, with a cold and a "
                  "warm cache ...", flush=True)
            loader = make_loader(url, member, batch_size=args.batch_size, img_size=args.img_size,
                                 seed=args.seed, workers=0, storage=settings)
            jobs = [(rows, windows, args.img_size)
                    for rows, windows, _, _ in planned_batches(loader, args.batches)]
            results["members"][member] = remote_reads.measure_member(
                url, local, jobs, loader.reader.with_ela, args.workers, settings)

    run_stoppable(results, measure)
    remote_reads.report(url, local, results["members"])
    return write_results(results, args, started)


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        return measure_store(args, started)
    except (layout.StoreError, storage.StorageUnavailable, SharedMemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def measure_store(args, started: float) -> int:
    if storage.is_url(str(args.store)):
        return main_remote(args, started, storage.StorageSettings.from_args(args))
    store = realistic_store(Path("data/bench")) if args.realistic else args.store
    source_files(store)  # fail early when the replaced loader cannot read the sources
    device = resolve_device(args.device)
    results = {"store": str(store), "img_size": args.img_size, "batch_size": args.batch_size,
               "workers": args.workers, "cpu_count": os.cpu_count(), "device": str(device),
               "partial": True, "stopped": None, "members": {}}

    def measure():
        for member in args.members:
            row = results["members"][member] = {"backend": resolve_backend("auto", device),
                                                "replaced_skips": unsupported_ops(get_recipe(member))}
            measure_member(store, member, args, device, row)

    run_stoppable(results, measure)
    for row in results["members"].values():
        if "rounds" in row:
            summarise(row)
    report(results, args.rounds)
    if not results["partial"]:
        png = args.png or args.json.with_suffix(".png")
        draw_chart(results, png)
        print(f"chart: {png}")
    return write_results(results, args, started)


if __name__ == "__main__":
    sys.exit(main())
