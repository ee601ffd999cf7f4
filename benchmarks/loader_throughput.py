"""Loader throughput: the engine against the loader it replaces, in one run.

For each member, samples per second at img_size x img_size of
  engine      make_loader with the device's default backend (opencv on the
              CPU: each sample finished on uint8 in the DALI reader workers;
              dali on CUDA: DALI crop+resize and photometric operators,
              torch geometry), and the other backend beside it;
  replaced    full PNG decode + .npy + np.where + OpenCV crop/resize/augment
              per sample, DataLoader + WeightedRandomSampler, same workers
              (benchmarks/baseline_loader.py);
  read limit  only reading the windows' bytes from the store, same workers;
plus each opencv-backend stage's share of the serial per-sample time, the
ratios, and optionally a few training steps with the share of time spent waiting for
data. Prints a table, writes --json and a PNG chart.

    python benchmarks/loader_throughput.py                  # demo store
    python benchmarks/loader_throughput.py --realistic      # 300 images, 500-3000 px
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.baseline_loader import make_replaced_loader, unsupported_ops
from engine import sampling, worker_ops
from engine import store as layout
from engine.loader import make_loader, resolve_backend, resolve_device
from engine.pipeline import BACKENDS
from engine.reader import WindowReader
from engine.recipes import get_recipe
from preprocess.build_zarr import REPORT
from preprocess.source import Case, discover
from trainers.help_format import HelpFormatter

REALISTIC = {"count": 300, "min_side": 500, "max_side": 3000, "seed": 7}


def _time_batches(iterable, batches: int) -> tuple[float, int]:
    """Seconds and samples for `batches` batches after one warm-up batch."""
    it = iter(iterable)
    batch = next(it)
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        samples += len(batch["index"]) if isinstance(batch, dict) else len(batch[0])
    if isinstance(batch, dict) and batch["image"].is_cuda:   # the GPU's work counts too
        torch.cuda.synchronize(batch["image"].device)
    return time.perf_counter() - start, samples


_READER = None


def _open_reader(store, with_ela):
    global _READER
    _READER = WindowReader(store, with_ela=with_ela)


def _read_batch(args):
    rows, windows, out_size = args
    return sum(_READER.read(int(r), w, out_size).image.nbytes for r, w in zip(rows, windows))


def epoch_loaders(store, member, *, batches: int, **kwargs) -> list:
    """make_loader for epochs 0, 1, ... until their steady-state batches (all
    but the first, pipeline start-up, and the last, DALI's prefetch drain)
    add up to `batches`: short epochs would make short, noisy timings."""
    loaders, counted = [], 0
    while counted < batches:
        loader = make_loader(store, member, epoch=len(loaders), **kwargs)
        if len(loader) < 3:
            sys.exit(f"{store}: {member}'s epoch has {len(loader)} batches; too few to time "
                     "(use a bigger store, e.g. --realistic)")
        loaders.append(loader)
        counted += len(loader) - 2
    return loaders


def _planned(loaders, batches: int):
    """(loader, batch index) of the first `batches` planned batches of `loaders`."""
    pairs = [(loader, k) for loader in loaders for k in range(len(loader.batches))]
    return pairs[:batches]


def measure_engine(loaders, batches: int) -> float:
    """Steady-state samples/s over `batches` batches of successive epochs."""
    seconds = samples = 0
    for loader in loaders:
        timed = min(len(loader) - 2, batches)
        sec, n = _time_batches(loader, timed)
        seconds, samples, batches = seconds + sec, samples + n, batches - timed
    return samples / seconds


def measure_read_limit(loaders, store, with_ela, img_size, workers, batches) -> float:
    """Samples/s of reading the windows' blocks alone, in `workers` processes."""
    jobs = [(loader.batches.rows[k], loader.batches.windows[k], img_size)
            for loader, k in _planned(loaders, batches)]
    with mp.get_context("spawn").Pool(max(1, workers), _open_reader, (str(store), with_ela)) as pool:
        pool.map(_read_batch, jobs[:max(1, workers)], chunksize=1)
        start = time.perf_counter()
        pool.map(_read_batch, jobs, chunksize=1)
        seconds = time.perf_counter() - start
    return sum(len(rows) for rows, _, _ in jobs) / seconds


def measure_stages(loaders, store, img_size, batches) -> dict[str, float]:
    """Serial milliseconds per sample of each stage of the opencv backend,
    the same calls its reader workers make: read, resize, photometric
    (with the sample's parameter draws), geometric (+ dropout), and the consumer's conversion
    of the uint8 batch to normalised floats."""
    reader = WindowReader(store, with_ela=loaders[0].reader.with_ela)
    seconds = dict.fromkeys(("read", "resize", "photometric", "geometric"), 0.0)
    finished = []
    for loader, k in _planned(loaders, batches):
        aug, plan = loader.source.augment, loader.batches
        seeds = sampling.sample_seeds(aug.seed, aug.epoch, plan.positions[k])
        batch = []
        for row, window, seed in zip(plan.rows[k], plan.windows[k], seeds):
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
            batch.append(image if ela is None else np.dstack([image, ela]))
        finished.append(batch)

    start = time.perf_counter()
    for batch in finished:
        loaders[0].to_float(torch.from_numpy(np.stack(batch)))
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
    seconds, samples = _time_batches(loader, batches)
    return samples / seconds


def measure_training_wait(store, member, img_size, batch_size, workers, steps, seed, device) -> dict:
    """Seconds per training step and the share spent blocked on the loader."""
    from trainers.losses import MemberLoss
    from trainers.model import build_model

    recipe = get_recipe(member)
    model = build_model(recipe.encoder, recipe.in_channels, encoder_weights="none").to(device)
    loss_fn = MemberLoss(recipe)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    loader = make_loader(store, member, batch_size=batch_size, img_size=img_size, seed=seed,
                         workers=workers, device=str(device))
    it = iter(loader)
    next(it)  # pipeline start-up is not a per-step cost
    wait = step = 0.0
    done = 0
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        loss = loss_fn(model(batch["image"]), batch["mask"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        wait, step, done = wait + (t1 - t0), step + (t2 - t0), done + 1
    return {"steps": done, "seconds_per_step": step / max(done, 1),
            "data_wait_share": wait / step if step else float("nan")}


def realistic_store(root: Path) -> Path:
    """The benchmark's store of realistic sizes, generated and built once."""
    from preprocess.build_zarr import build_store
    from preprocess.demo_data import write_demo

    source, store = root / "source", root / "store.zarr"
    if not store.exists():
        if not (source / "train_images").exists():
            write_demo(source, **REALISTIC)
        build_store(source, store)
    return store


def draw_chart(results: dict, path: Path):
    """Samples/s per member of both engine backends, the replaced loader and
    the read limit, every bar labelled, the engine's ratio to the replaced
    loader above each member; beside it the opencv backend's serial ms per
    sample by stage. Written atomically; returns the Figure."""
    from matplotlib.figure import Figure

    from trainers.atomic import atomic_open

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
    p.add_argument("--store", type=Path, default=layout.DEFAULT_STORE,
                   help="the store to read (built from a source folder that still exists: "
                        "the replaced loader reads its PNGs)")
    p.add_argument("--realistic", action="store_true",
                   help=f"generate and build a store of {REALISTIC['count']} images, "
                        f"{REALISTIC['min_side']}-{REALISTIC['max_side']} px, under data/bench")
    p.add_argument("--members", nargs="+", default=["small_specialist", "highres_no_ela"],
                   help="members whose recipes are measured")
    p.add_argument("--img-size", type=int, default=512, help="output side in pixels")
    p.add_argument("--batch-size", type=int, default=8, help="samples per batch")
    p.add_argument("--batches", type=int, default=40,
                   help="timed batches per measurement (over successive epochs when one is shorter)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of measurements; medians are reported")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="reader processes of every loader")
    p.add_argument("--train-steps", type=int, default=2,
                   help="CPU training steps for the data-wait share (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="sampling and augmentation seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--png", type=Path, help="chart (default: next to --json, or logs/)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    store = realistic_store(Path("data/bench")) if args.realistic else args.store
    source_files(store)  # fail early when the replaced loader cannot read the sources
    device = resolve_device(args.device)
    results = {"store": str(store), "img_size": args.img_size, "batch_size": args.batch_size,
               "workers": args.workers, "cpu_count": os.cpu_count(), "device": str(device),
               "members": {}}
    default_backend = resolve_backend("auto", device)
    backends = [default_backend] + [b for b in BACKENDS if b != default_backend]
    for member in args.members:
        loaders = {backend: epoch_loaders(store, member, batches=args.batches,
                                          batch_size=args.batch_size, img_size=args.img_size,
                                          seed=args.seed, workers=args.workers, device=str(device),
                                          backend=backend) for backend in backends}
        opencv = loaders["opencv"]
        # Rounds of every measurement in turn, then medians: this machine's
        # speed drifts (shared host), and a drift would otherwise land on
        # one column and skew the ratios.
        rounds = {name: [] for name in backends + ["replaced", "read_limit"]}
        for r in range(args.rounds):
            print(f"[{member}] round {r + 1}/{args.rounds}: engine ({', '.join(backends)}), "
                  "read limit, replaced loader ...", flush=True)
            for backend in backends:
                rounds[backend].append(measure_engine(loaders[backend], args.batches))
            rounds["read_limit"].append(measure_read_limit(
                opencv, store, opencv[0].reader.with_ela, args.img_size, args.workers, args.batches))
            rounds["replaced"].append(measure_replaced(store, member, args.img_size, args.batch_size,
                                                       args.workers, args.batches, args.seed))
        median = {name: float(np.median(values)) for name, values in rounds.items()}
        rates = {backend: median[backend] for backend in backends}
        engine_rate, read_rate, replaced_rate = (median[default_backend], median["read_limit"],
                                                 median["replaced"])
        print(f"[{member}] stages ...", flush=True)
        stages = measure_stages(opencv, store, args.img_size, args.batches)
        row = {"backend": default_backend, "engine_samples_per_s": engine_rate,
               "backend_samples_per_s": rates, "replaced_samples_per_s": replaced_rate,
               "read_limit_samples_per_s": read_rate, "engine_over_replaced": engine_rate / replaced_rate,
               "engine_over_read_limit": engine_rate / read_rate, "stage_ms": stages,
               "replaced_skips": unsupported_ops(get_recipe(member)), "rounds": rounds}
        if args.train_steps:
            print(f"[{member}] training steps ...", flush=True)
            row["training"] = measure_training_wait(store, member, args.img_size, args.batch_size,
                                                    args.workers, args.train_steps, args.seed, device)
        results["members"][member] = row

    print(f"\nstore {store}, {args.img_size}x{args.img_size}, batch {args.batch_size}, "
          f"{args.workers} workers, {os.cpu_count()} cores")
    other = {b: "/".join(x for x in BACKENDS if x != b) for b in BACKENDS}
    header = (f"{'member':<18}{'backend':>8}{'engine/s':>10}{'other/s':>9}{'replaced/s':>12}"
              f"{'read lim/s':>12}{'x replaced':>12}{'of limit':>10}  stage share "
              f"({'/'.join(next(iter(results['members'].values()))['stage_ms'])})")
    print(header + "\n" + "-" * len(header))
    for member, r in results["members"].items():
        total = sum(r["stage_ms"].values())
        shares = "/".join(f"{100 * v / total:.0f}%" for v in r["stage_ms"].values())
        print(f"{member:<18}{r['backend']:>8}{r['engine_samples_per_s']:>10.1f}"
              f"{r['backend_samples_per_s'][other[r['backend']]]:>9.1f}"
              f"{r['replaced_samples_per_s']:>12.1f}"
              f"{r['read_limit_samples_per_s']:>12.1f}{r['engine_over_replaced']:>11.1f}x"
              f"{100 * r['engine_over_read_limit']:>9.0f}%  {shares}")
    print(f"medians of {args.rounds} rounds; engine: the device's default backend; other: the "
          "other backend on the same device")
    for member, r in results["members"].items():
        if "training" in r:
            t = r["training"]
            print(f"{member}: {results['device']} training step {t['seconds_per_step']:.2f} s, waiting for data "
                  f"{100 * t['data_wait_share']:.2f}% of the step ({t['steps']} steps)")
        if r["replaced_skips"]:
            print(f"{member}: the replaced loader skips {', '.join(r['replaced_skips'])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    png = args.png or (args.json.with_suffix(".png") if args.json else Path("logs/loader_throughput.png"))
    png.parent.mkdir(parents=True, exist_ok=True)
    draw_chart(results, png)
    print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
