"""Build throughput: build_zarr's images/s against merely decoding the same
PNGs with the same number of worker processes, in one run.

    python benchmarks/build_throughput.py [--source DIR] [--count 48]
        [--workers 1 2] [--layout-sweep] [--json FILE]

Without --source a demo folder (sides 300-2000 px, the typical range) is
written to a temporary folder first. "decode" and "build" are the per-image
work (decode alone; decode, validate, ELA, pyramid, compress, write, record)
in started pools of the same size; "end-to-end" is build_store itself, with
process start-up, discovery and the final phase.
A per-stage table (one process) shows where a build's time goes.
--layout-sweep also times random 200-800 px window reads of level 0 for
several chunk sizes and zstd levels (the measurement behind engine/store.py's
CHUNK and ZSTD_LEVEL).
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

import numpy as np
import zarr

from engine.reader import _ChunkFiles
from preprocess.build_zarr import (RECORDS, STAGING, build_store, init_worker, process_case,
                                   write_pixels)
from preprocess.demo_data import write_demo
from preprocess.ela import compute_ela
from preprocess.source import DEFAULT_MAX_PIXELS, discover, load_image, load_masks
from trainers.atomic import atomic_open
from trainers.help_format import HelpFormatter


def decode_one(path: str) -> int:
    return load_image(Path(path)).shape[0]


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
    """process_case's tasks writing into a fresh scratch partial store."""
    partial = scratch / f"partial_w{workers}"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / STAGING).mkdir(parents=True)
    (partial / RECORDS).mkdir()
    return [(k, case, str(partial), DEFAULT_MAX_PIXELS) for k, case in enumerate(cases)]


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
    totals = dict.fromkeys(("decode", "masks", "ela", "pyramid+write"), 0.0)
    group = zarr.open_group(str(scratch / "stages.zarr"), mode="w")
    for key, case in enumerate(cases):
        t0 = time.perf_counter()
        rgb = load_image(case.image)
        t1 = time.perf_counter()
        instances = load_masks(case.mask, *rgb.shape[:2]) if case.label else None
        t2 = time.perf_counter()
        compute_ela(rgb)
        t3 = time.perf_counter()
        write_pixels(group, key, rgb, instances)  # computes ELA again: subtract it below
        t4 = time.perf_counter()
        for name, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3 - (t3 - t2))):
            totals[name] += dt
    return {name: 1000 * t / len(cases) for name, t in totals.items()}


# zstd only: the engine's direct chunk reader (engine/reader.py) decodes zstd.
ZSTD_LEVELS = (-1, 1, 3)


def layout_sweep(source: Path, scratch: Path, chunks=(128, 256, 512), reads: int = 200,
                 rounds: int = 3, seed: int = 0) -> list[dict]:
    """Write level 0 of every image per (chunk, zstd level), then time the
    same random 200-800 px window reads on each layout, through zarr and
    through the engine's direct chunk reader; rounds interleave the layouts
    and the best round counts (a shared machine's noise only adds)."""
    cases, _ = discover(source)
    images = [load_image(c.image) for c in cases]
    raw = sum(img.nbytes for img in images)
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(reads):
        i = int(rng.integers(len(images)))
        h, w = images[i].shape[:2]
        sy, sx = (int(min(s, rng.integers(200, 801))) for s in (h, w))
        windows.append((i, int(rng.integers(0, h - sy + 1)), int(rng.integers(0, w - sx + 1)), sy, sx))
    rows = []
    for chunk in chunks:
        for level in ZSTD_LEVELS:
            path = scratch / f"sweep_{chunk}_{level}.zarr"
            group = zarr.open_group(str(path), mode="w")
            start = time.perf_counter()
            for i, img in enumerate(images):
                arr = group.create_array(str(i), shape=img.shape, dtype=np.uint8,
                                         chunks=(chunk, chunk, 3),
                                         compressors=zarr.codecs.ZstdCodec(level=level))
                arr[...] = img
            write_s = time.perf_counter() - start
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            rows.append({
                "chunk": chunk, "zstd_level": level, "write_MB_s": raw / write_s / 1e6,
                "ratio": size / raw, "zarr_read_ms": float("inf"), "direct_read_ms": float("inf"),
                "zarr": [group[str(i)] for i in range(len(images))],
                # the engine's own read path: chunk files decoded with numcodecs
                "direct": [_ChunkFiles(path, str(i), json.loads((path / str(i) / "zarr.json").read_text()))
                           for i in range(len(images))],
            })
    for _ in range(rounds):
        for row in rows:
            start = time.perf_counter()
            for i, y, x, sy, sx in windows:
                row["zarr"][i][y:y + sy, x:x + sx]
            middle = time.perf_counter()
            for i, y, x, sy, sx in windows:
                row["direct"][i].read(y, y + sy, x, x + sx)
            end = time.perf_counter()
            row["zarr_read_ms"] = min(row["zarr_read_ms"], 1000 * (middle - start) / reads)
            row["direct_read_ms"] = min(row["direct_read_ms"], 1000 * (end - middle) / reads)
    for row in rows:
        del row["zarr"], row["direct"]
    return rows


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
    parser.add_argument("--layout-sweep", action="store_true",
                        help="also time window reads for several chunk sizes and zstd levels")
    parser.add_argument("--reads", type=int, default=200, help="window reads per layout")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if (min(args.count, args.min_side, args.reads, *args.workers) < 1
            or args.min_side > args.max_side):
        parser.error("--count, --min-side, --reads and --workers must be >= 1, "
                     "--min-side <= --max-side")
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
        results = {"images": len(paths), "rates": [], "stages_ms": stage_times(source, scratch)}
        print(f"{len(paths)} images from {source}")
        if args.layout_sweep:  # first: it holds every image in memory, then frees it
            results["layout"] = layout_sweep(source, scratch, reads=args.reads)
            print(f"{'chunk':>6}{'zstd':>5}{'zarr read ms':>14}{'direct read ms':>16}"
                  f"{'write MB/s':>12}{'size':>7}")
            for r in results["layout"]:
                print(f"{r['chunk']:>6}{r['zstd_level']:>5}{r['zarr_read_ms']:>14.2f}"
                      f"{r['direct_read_ms']:>16.2f}{r['write_MB_s']:>12.0f}{r['ratio']:>7.2f}")
        print(f"\n{'workers':>8}{'decode img/s':>14}{'build img/s':>13}{'build/decode':>14}"
              f"{'decode x':>10}{'build x':>9}{'end-to-end img/s':>18}")
        first = None
        for workers in args.workers:
            decode = pool_rate(decode_one, paths, workers)
            build = pool_rate(process_case, per_image_build_tasks(cases, scratch, workers), workers)
            whole = end_to_end_rate(source, scratch, workers)
            first = first or (decode, build)
            results["rates"].append({"workers": workers, "decode_img_s": decode,
                                     "build_img_s": build, "ratio": build / decode,
                                     "end_to_end_img_s": whole})
            print(f"{workers:>8}{decode:>14.2f}{build:>13.2f}{build / decode:>14.2f}"
                  f"{decode / first[0]:>10.2f}{build / first[1]:>9.2f}{whole:>18.2f}")
        print("\nper image, one process (ms): " +
              ", ".join(f"{k} {v:.1f}" for k, v in results["stages_ms"].items()))
    if args.json:
        with atomic_open(args.json) as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
