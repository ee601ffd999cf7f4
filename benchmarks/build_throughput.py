"""Build throughput: build_zarr's images/s against the work no build can
skip (decoding the PNGs and ELA's JPEG round trip), same worker processes,
in one run.

    python benchmarks/build_throughput.py [--source DIR] [--count 48]
        [--workers 1 2] [--json FILE]

Without --source a demo folder (sides 300-2000 px, the typical range) is
written to a temporary folder first. "decode", "decode+ELA" and "build" are
the per-image work (decode alone; decode and ELA; decode, validate, ELA,
pyramid, compress, write, record) in started pools of the same size;
"end-to-end" is build_store itself, with process start-up, discovery and
the final phase; every build is in the default layout
(engine.store.DEFAULT_LAYOUT). A per-stage table (one process) shows where a build's time goes.
benchmarks/layout_sweep.py measures the layouts' reads.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zarr

from engine import store as layout
from preprocess.build_zarr import (RECORDS, STAGING, build_store, init_worker, process_case,
                                   write_pixels)
from preprocess.demo_data import write_demo
from preprocess.ela import compute_ela
from preprocess.source import DEFAULT_MAX_PIXELS, discover, load_image, load_masks
from common.atomic import atomic_open
from common.help_format import HelpFormatter


def decode_one(path: str) -> int:
    return load_image(Path(path)).shape[0]


def decode_and_ela(path: str) -> int:
    return compute_ela(load_image(Path(path))).shape[0]


def _started(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pool_rate(function, tasks: list, workers: int) -> float:
    """images/s of `function` over `tasks` in a started pool of `workers`
    spawned processes (start-up excluded: it is the same for both rates)."""
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
        pool.map(_started, [0.3] * workers, chunksize=1)
        start = time.perf_counter()
        for _ in pool.imap_unordered(function, tasks, chunksize=1):
            pass
        return len(tasks) / (time.perf_counter() - start)


def per_image_build_tasks(cases: list, scratch: Path, workers: int) -> list:
    """process_case's tasks writing into a fresh scratch partial store, in
    the default layout."""
    partial = scratch / f"partial_w{workers}"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / STAGING).mkdir(parents=True)
    (partial / RECORDS).mkdir()
    return [(k, case, str(partial), DEFAULT_MAX_PIXELS, layout.DEFAULT_LAYOUT)
            for k, case in enumerate(cases)]


def end_to_end_rate(source: Path, scratch: Path, workers: int) -> float:
    """images/s of build_store itself: discovery, start-up, final phase included."""
    out = scratch / f"store_w{workers}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # keep this run's output one table
        report = build_store(source, out, workers=workers, progress=False, figure=False)
    return len(report["rows"]) / (time.perf_counter() - start)


def stage_times(source: Path, scratch: Path) -> dict[str, float]:
    """Milliseconds per image of each stage, in this process."""
    cases, _ = discover(source)
    totals = dict.fromkeys(("decode", "masks", "ela", "pyramid", "encode+write"), 0.0)
    group = zarr.open_group(str(scratch / "stages.zarr"), mode="w")
    for key, case in enumerate(cases):
        t0 = time.perf_counter()
        rgb = load_image(case.image)
        t1 = time.perf_counter()
        instances = load_masks(case.mask, *rgb.shape[:2]) if case.label else None
        t2 = time.perf_counter()
        ela = compute_ela(rgb)
        t3 = time.perf_counter()
        image, union = rgb, None if instances is None else instances.max(axis=0)
        for _ in range(1, layout.level_count(*rgb.shape[:2])):
            image, ela = layout.downsample_pixels(image), layout.downsample_pixels(ela)
            union = None if union is None else layout.downsample_mask(union)
        t4 = time.perf_counter()
        write_pixels(group, key, rgb, instances)  # ELA and pyramid again: subtracted below
        t5 = time.perf_counter()
        for name, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4 - (t4 - t2))):
            totals[name] += dt
    return {name: 1000 * t / len(cases) for name, t in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--source", type=Path,
                        help="Kaggle-layout folder (default: a demo folder written to a "
                             "temporary folder)")
    parser.add_argument("--count", type=int, default=48, help="demo images when no --source")
    parser.add_argument("--min-side", type=int, default=300,
                        help="demo images' shortest side in pixels")
    parser.add_argument("--max-side", type=int, default=2000,
                        help="demo images' longest side in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="pool sizes to measure, one row each")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if min(args.count, args.min_side, *args.workers) < 1 or args.min_side > args.max_side:
        parser.error("--count, --min-side and --workers must be >= 1, --min-side <= --max-side")
    if args.json and args.json.is_dir():
        parser.error(f"--json {args.json} is a folder; name the file to write")
    with tempfile.TemporaryDirectory(prefix="build_bench_") as tmp:
        scratch = Path(tmp)
        source = args.source
        if source is None:
            source = scratch / "source"
            write_demo(source, count=args.count, seed=0, min_side=args.min_side,
                       max_side=args.max_side, supplemental=0, progress=False)
        cases, _ = discover(source)
        paths = [str(c.image) for c in cases]
        results = {"images": len(paths), "layout": layout.DEFAULT_LAYOUT.describe(),
                   "rates": [], "stages_ms": stage_times(source, scratch)}
        print(f"{len(paths)} images from {source}; layout: {layout.DEFAULT_LAYOUT.describe()}")
        header = (f"{'workers':>8}{'decode/s':>10}{'decode+ELA/s':>14}{'build/s':>12}"
                  f"{'build / (decode+ELA)':>26}{'end-to-end/s':>14}")
        print("\n" + header + "\n" + "-" * len(header))
        for workers in args.workers:
            decode = pool_rate(decode_one, paths, workers)
            floor = pool_rate(decode_and_ela, paths, workers)
            build = pool_rate(process_case, per_image_build_tasks(cases, scratch, workers), workers)
            whole = end_to_end_rate(source, scratch, workers)
            results["rates"].append({"workers": workers, "decode_img_s": decode,
                                     "decode_ela_img_s": floor, "build_img_s": build,
                                     "build_over_decode_ela": build / floor,
                                     "end_to_end_img_s": whole})
            print(f"{workers:>8}{decode:>10.2f}{floor:>14.2f}{build:>12.2f}{build / floor:>26.2f}"
                  f"{whole:>14.2f}")
        print("images/s; the build's goal is at least 0.70 of decode+ELA, the work it cannot skip")
        print("\nper image, one process (ms): " +
              ", ".join(f"{k} {v:.1f}" for k, v in results["stages_ms"].items()))
    if args.json:
        with atomic_open(args.json) as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
