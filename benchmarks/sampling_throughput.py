"""Sampling throughput: the engine's Numba draws against torch's
WeightedRandomSampler, and the engine's serial and parallel kernels against
its own choice between them, in one run.

The first table draws 10M times from 10M images: the engine's serial and
parallel kernels, its automatic choice (engine.sampling.parallel_pays), torch's
sampler iterated to the end as a DataLoader does, and the engine's crop
windows of the drawn images. All draw with replacement from highres_no_ela's
weights over a synthetic data set shaped like the competition's (half the
images forged, forged area ratios log-normal around 3 %, sides 500-3000 px),
and every method's drawn frequencies are checked against the weights (largest
deviation in standard errors), so the table compares samplers that do the
same job.

The second table sweeps the number of items of each kernel (draws, crop
windows, augmentation seeds, all over the first few thousand images: the
cheapest items, where a parallel loop has the least to gain) and times the
serial kernel, the parallel one and the engine's choice, interleaved so that
each sees the same load, each run after a pause as a call once an epoch or
once a batch comes; the choice should never be slower than serial.

    python benchmarks/sampling_throughput.py [--draws N] [--images N] [--repeats R]
                                             [--sizes N ...] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler
from tqdm import tqdm

from engine import sampling
from engine.recipes import get_recipe
from engine.sampling import crop_windows, member_weights, sample_indices, sample_seeds
from common.atomic import atomic_open
from common.help_format import HelpFormatter

MEMBER = "highres_no_ela"
MODES = ("serial", "auto", "parallel")
SETTLE_S = 0.05
SWEEP_IMAGES = 5000  # the sweep's draws: a table that fits the cache, the cheapest draw


def synthetic_meta(images: int, seed: int) -> dict[str, np.ndarray]:
    """meta/ arrays of a competition-like data set (no forgery boxes: the
    member's random crop does not read them)."""
    rng = np.random.default_rng(seed)
    label = (rng.random(images) < 0.5).astype(np.uint8)
    area = np.clip(np.exp(rng.normal(np.log(0.03), 1.2, images)), 1e-4, 0.9) * label
    return {
        "label": label,
        "area_ratio": area.astype(np.float32),
        "split": np.zeros(images, dtype=np.uint8),
        "height": np.exp(rng.uniform(np.log(500), np.log(3000), images)).astype(np.int32),
        "width": np.exp(rng.uniform(np.log(500), np.log(3000), images)).astype(np.int32),
        "bbox": np.full((images, 4), -1, dtype=np.int32),
        "centroid": np.full((images, 2), -1, dtype=np.float32),
    }


def worst_deviation(draws: np.ndarray, weights: np.ndarray) -> float:
    """Largest |observed - expected| count over images, in binomial standard errors."""
    p = weights / weights.sum()
    expected = p * draws.size
    observed = np.bincount(draws, minlength=weights.size)
    spread = np.sqrt(np.maximum(expected * (1 - p), 1e-12))
    return float(np.max(np.abs(observed - expected) / spread))


def timed(fn):
    """Wall and CPU seconds (all threads) of one call, and its result. CPU
    time is the steadier figure on a shared machine; wall time is what a run
    waits."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def best_time(fn, repeats: int):
    """The fastest of `repeats` runs, the least disturbed by other load, and
    the last result."""
    runs = [timed(fn) for _ in range(repeats)]
    return min(seconds for seconds, _ in runs), runs[-1][1]


@contextmanager
def kernels(mode: str):
    """Every sampling kernel serial or parallel, or ("auto") the engine's choice."""
    saved = sampling.PARALLEL_MIN_THREADS, sampling.PARALLEL_MIN_ITEMS
    if mode == "serial":
        sampling.PARALLEL_MIN_ITEMS = dict.fromkeys(saved[1], math.inf)
    elif mode == "parallel":
        sampling.PARALLEL_MIN_THREADS, sampling.PARALLEL_MIN_ITEMS = 1, dict.fromkeys(saved[1], 0)
    try:
        yield
    finally:
        sampling.PARALLEL_MIN_THREADS, sampling.PARALLEL_MIN_ITEMS = saved


def weights_of(meta: dict[str, np.ndarray]) -> np.ndarray:
    return member_weights(get_recipe(MEMBER).sampling, meta["label"], meta["area_ratio"],
                          meta["split"], 0)


def windows_of(meta: dict[str, np.ndarray], indices: np.ndarray, seed: int) -> np.ndarray:
    positions = np.arange(indices.size, dtype=np.int64)
    return crop_windows(get_recipe(MEMBER).view, indices, positions, meta["height"],
                        meta["width"], meta["bbox"], meta["centroid"], seed, 0)


def head_to_head(meta, draws: int, seed: int, repeats: int, bar) -> list[dict]:
    """The first table's rows: (method, (wall s, cpu s), draws or None)."""
    weights = weights_of(meta)

    def torch_sampler():
        sampler = WeightedRandomSampler(torch.from_numpy(weights), draws, replacement=True,
                                        generator=torch.Generator().manual_seed(seed))
        return np.fromiter(sampler, dtype=np.int64, count=draws)

    rows = [("engine alias table (in every draws row)",
             best_time(lambda: sampling._alias_table(weights), repeats)[0], None)]
    bar.update()
    for mode in MODES:
        with kernels(mode):
            seconds, indices = best_time(lambda: sample_indices(weights, draws, seed, 0),
                                         repeats)
            rows.append((f"engine draws, {mode}", seconds, indices))
            bar.update()
    for mode in MODES:
        with kernels(mode):
            seconds, windows = best_time(lambda: windows_of(meta, indices, seed), repeats)
            rows.append((f"engine windows, {mode}", seconds, None))
            bar.update()
    assert np.all((windows[:, 2] > windows[:, 0]) & (windows[:, 3] > windows[:, 1]))
    rows.append(("torch WeightedRandomSampler", *best_time(torch_sampler, repeats)))
    bar.update()
    (torch_wall, torch_cpu), _ = rows[-1][1:]
    return [{"method": name, "seconds": wall, "cpu_seconds": cpu,
             "draws_per_s": draws / wall, "x_torch": torch_wall / wall,
             "x_torch_cpu": torch_cpu / cpu,
             "deviation_se": None if result is None else worst_deviation(result, weights)}
            for name, (wall, cpu), result in rows]


def sweep_kernels(meta, max_items: int, seed: int) -> dict:
    """Per kernel, a call over n <= max_items items."""
    meta = {name: array[:SWEEP_IMAGES] for name, array in meta.items()}
    weights = weights_of(meta)
    rows = np.random.default_rng(seed).integers(0, SWEEP_IMAGES, max_items)
    return {
        "draws": lambda n: sample_indices(weights, n, seed, 0),
        "windows": lambda n: windows_of(meta, rows[:n], seed),
        "seeds": lambda n: sample_seeds(seed, 0, np.arange(n, dtype=np.int64)),
    }


def sweep(meta, sizes: list[int], seed: int, repeats: int, bar) -> list[dict]:
    """Median wall seconds of each kernel at each size in each mode, the modes
    interleaved run by run."""
    calls = sweep_kernels(meta, max(sizes), seed)
    results = []
    for kernel, call in calls.items():
        for n in sizes:
            times = {mode: [] for mode in MODES}
            for _ in range(repeats):
                for mode in MODES:
                    # Every run starts from the same state: Numba's threads
                    # spin a while after a parallel loop, and a run right
                    # after one would compete with them.
                    time.sleep(SETTLE_S)
                    with kernels(mode):
                        times[mode].append(timed(lambda: call(n))[0][0])
            median = {mode: statistics.median(t) for mode, t in times.items()}
            results.append({"kernel": kernel, "items": n,
                             "choice": "parallel" if sampling.parallel_pays(kernel, n)
                             else "serial",
                             **{f"{mode}_s": median[mode] for mode in MODES},
                             "auto_x_serial": median["auto"] / median["serial"]})
            bar.update()
    return results


def suggested_min_items(sweep_rows: list[dict]) -> dict[str, int]:
    """Per kernel, the power of two of items whose serial run takes about
    sampling.PARALLEL_MIN_SECONDS, from its largest size's throughput."""
    largest = {}
    for row in sweep_rows:
        largest[row["kernel"]] = row
    return {kernel: 1 << max(0, round(math.log2(
                sampling.PARALLEL_MIN_SECONDS * row["items"] / row["serial_s"])))
            for kernel, row in largest.items()}


def run(draws: int, images: int, sizes: list[int], seed: int, repeats: int) -> dict:
    meta = synthetic_meta(images, seed)
    first_call, _ = timed(lambda: windows_of(meta, sample_indices(np.ones(10), 10, seed, 0),
                                             seed))
    sweep_repeats = max(repeats, 5)
    with tqdm(total=8 + 3 * len(sizes), desc="measuring", leave=False) as bar:
        results = head_to_head(meta, draws, seed, repeats, bar)
        sweep_rows = sweep(meta, sizes, seed, sweep_repeats, bar)
    return {"draws": draws, "images": images, "member": MEMBER,
            "drawn_images": int(np.count_nonzero(weights_of(meta))),
            "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "parallel_min_threads": sampling.PARALLEL_MIN_THREADS,
            "parallel_min_items": sampling.PARALLEL_MIN_ITEMS,
            "suggested_min_items": suggested_min_items(sweep_rows),
            "repeats": repeats, "sweep_repeats": sweep_repeats, "sweep_images": SWEEP_IMAGES,
            "engine_first_call_s": first_call[0], "results": results, "sweep": sweep_rows}


def print_table(report: dict) -> None:
    print(f"{report['draws']:,} draws from {report['images']:,} images "
          f"({report['drawn_images']:,} with non-zero {report['member']} weight), "
          f"numba threads: {report['numba_threads']}, best of {report['repeats']} runs")
    print(f"engine first call (JIT cache load or compile, not in the table): "
          f"{report['engine_first_call_s']:.2f} s")
    header = (f"{'method':<40} {'wall s':>8} {'cpu s':>8} {'M draws/s':>10} "
              f"{'x torch':>8} {'x torch cpu':>12} {'max dev (SE)':>13}")
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        dev = "" if row["deviation_se"] is None else f"{row['deviation_se']:.2f}"
        print(f"{row['method']:<40} {row['seconds']:>8.3f} {row['cpu_seconds']:>8.3f} "
              f"{row['draws_per_s'] / 1e6:>10.2f} {row['x_torch']:>8.2f} "
              f"{row['x_torch_cpu']:>12.2f} {dev:>13}")
    print("x torch / x torch cpu: torch's wall / CPU time over the method's (higher is "
          "faster). max dev: largest per-image count deviation from the weights, in "
          "standard errors (exact sampling shows about 5 over a few million images).")
    print()
    print(f"sweep: median wall ms of {report['sweep_repeats']} interleaved runs, each after a "
          f"{SETTLE_S * 1e3:.0f} ms pause, over the "
          f"first {report['sweep_images']} images; the engine's rule: parallel from "
          f"{report['parallel_min_threads']} threads and PARALLEL_MIN_ITEMS items")
    header = (f"{'kernel':<8} {'items':>11} {'serial ms':>10} {'parallel ms':>12} "
              f"{'auto ms':>9} {'auto/serial':>12} {'choice':>9}")
    print(header)
    print("-" * len(header))
    for row in report["sweep"]:
        print(f"{row['kernel']:<8} {row['items']:>11,} {row['serial_s'] * 1e3:>10.2f} "
              f"{row['parallel_s'] * 1e3:>12.2f} {row['auto_s'] * 1e3:>9.2f} "
              f"{row['auto_x_serial']:>12.2f} {row['choice']:>9}")
    print("PARALLEL_MIN_ITEMS now: " + ", ".join(
        f"{k} {v:,}" for k, v in report["parallel_min_items"].items()))
    print(f"items of about {sampling.PARALLEL_MIN_SECONDS * 1e3:.0f} ms serial work here "
          "(sampling.PARALLEL_MIN_SECONDS): " + ", ".join(
        f"{k} {v:,}" for k, v in report["suggested_min_items"].items()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--draws", type=int, default=10_000_000, help="draws per method")
    parser.add_argument("--images", type=int, default=10_000_000,
                        help="images in the data set")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per method; the first table shows the fastest, the "
                             "sweep the median of at least 5")
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[10_000, 100_000, 1_000_000, 10_000_000],
                        help="items per kernel call in the sweep")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic data set and of every method's draws")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.draws < 1 or args.images < SWEEP_IMAGES or args.repeats < 1 or min(args.sizes) < 1:
        parser.error(f"--draws, --repeats and --sizes must be >= 1, --images >= {SWEEP_IMAGES}")
    if args.json and args.json.is_dir():
        parser.error(f"--json {args.json} is a folder; name the file to write")
    report = run(args.draws, args.images, args.sizes, args.seed, args.repeats)
    print_table(report)
    if args.json:
        with atomic_open(args.json) as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
