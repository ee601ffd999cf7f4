"""Build throughput: build_zarr's images/s against the work no build can
skip (decoding the PNGs and ELA's JPEG round trip), same worker processes,
in one run.

    python benchmarks/build_throughput.py [--source DIR] [--count 48]
        [--workers 1 2] [--json FILE]

Without --source a demo folder (sides 300-2000 px, the typical range) is
written to a temporary folder first. "decode", "decode+ELA" and "build" are
the per-image work (decode alone; decode and ELA; a block task's decode,
validate, ELA, pyramid, tile encoding, shard writes and record, per image)
in started pools of the same size; "end-to-end" is build_store itself, with
its Dask cluster's start-up, the header-only plan and the final phase.
A per-stage table (one process) shows where a build's time goes.
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

from engine import packing
from engine import store as layout
from preprocess.build_zarr import (build_block, build_store, plan, pyramid, read_headers,
                                   settings_for)
from preprocess.cluster import one_thread_per_process
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


def pool_rate(function, tasks: list, workers: int, images: int | None = None) -> float:
    """images/s of `function` over `tasks` (`images` of them in all; one a
    task by default) in a started pool of `workers` spawned processes
    (start-up excluded: it is the same for every rate)."""
    with multiprocessing.get_context("spawn").Pool(workers,
                                                   initializer=one_thread_per_process) as pool:
        pool.map(_started, [0.3] * workers, chunksize=1)
        start = time.perf_counter()
        for _ in pool.imap_unordered(function, tasks, chunksize=1):
            pass
        return (images or len(tasks)) / (time.perf_counter() - start)


def block_tasks(source: Path, scratch: Path, workers: int, pixel_layout: layout.PixelLayout) -> list:
    """build_block's tasks of `source`, writing into a fresh scratch store."""
    partial = scratch / f"partial_w{workers}"
    shutil.rmtree(partial, ignore_errors=True)
    cases, _ = discover(source)
    settings = settings_for(source, cases, DEFAULT_MAX_PIXELS, pixel_layout)
    headers, _ = read_headers(cases, DEFAULT_MAX_PIXELS, pixel_layout, strict=False)
    return plan(headers, settings, str(partial), None)


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
    totals = dict.fromkeys(("decode", "masks", "ela", "pyramid", "tiles"), 0.0)
    pixel_layout = layout.DEFAULT_LAYOUT
    for case in cases:
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
        for level in pyramid(rgb, instances):   # ELA and pyramid again: subtracted below
            for pixels in level:
                if pixels is not None:
                    for _, piece in packing.tile_pieces(pixels, pixel_layout.chunk):
                        pixel_layout.encode(packing.padded_tile(piece, pixel_layout.chunk))
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
    layouts = {"build": layout.DEFAULT_LAYOUT}
    with tempfile.TemporaryDirectory(prefix="build_bench_") as tmp:
        scratch = Path(tmp)
        source = args.source
        if source is None:
            source = scratch / "source"
            write_demo(source, count=args.count, seed=0, min_side=args.min_side,
                       max_side=args.max_side, supplemental=0, progress=False)
        cases, _ = discover(source)
        paths = [str(c.image) for c in cases]
        results = {"images": len(paths), "layouts": {k: v.describe() for k, v in layouts.items()},
                   "rates": [], "stages_ms": stage_times(source, scratch)}
        print(f"{len(paths)} images from {source}; "
              + "; ".join(f"{k}: {v.describe()}" for k, v in layouts.items()))
        header = (f"{'workers':>8}{'decode/s':>10}{'decode+ELA/s':>14}"
                  + "".join(f"{name + '/s':>12}" for name in layouts)
                  + "".join(f"{name + ' / (decode+ELA)':>26}" for name in layouts)
                  + f"{'end-to-end/s':>14}")
        print("\n" + header + "\n" + "-" * len(header))
        for workers in args.workers:
            decode = pool_rate(decode_one, paths, workers)
            floor = pool_rate(decode_and_ela, paths, workers)
            builds = {name: pool_rate(build_block, block_tasks(source, scratch, workers, pl),
                                      workers, len(paths)) for name, pl in layouts.items()}
            whole = end_to_end_rate(source, scratch, workers)
            results["rates"].append({"workers": workers, "decode_img_s": decode,
                                     "decode_ela_img_s": floor, "build_img_s": builds,
                                     "build_over_decode_ela": {k: v / floor for k, v in builds.items()},
                                     "end_to_end_img_s": whole})
            print(f"{workers:>8}{decode:>10.2f}{floor:>14.2f}"
                  + "".join(f"{rate:>12.2f}" for rate in builds.values())
                  + "".join(f"{rate / floor:>26.2f}" for rate in builds.values())
                  + f"{whole:>14.2f}")
        print("images/s; the build's goal is at least 0.70 of decode+ELA, the work it cannot skip")
        print("\nper image, one process (ms): " +
              ", ".join(f"{k} {v:.1f}" for k, v in results["stages_ms"].items()))
    if args.json:
        with atomic_open(args.json) as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
