"""Reads of a store at a URL against the same store on local disk, in one run
(`benchmarks/loader_throughput.py --store URL` runs this), with the pool of
processes that only read windows (reading_pool, read_batch), which also
measures the loader benchmark's read limit.

For each member, the windows of its first --batches planned batches are read
by --workers fresh processes that only read (the loader's read limit), in
four settings:
  local disk    the same store on local disk (--compare-local)
  no cache      the URL, nothing kept locally
  cache, cold   the URL through an empty --cache folder (engine/storage.py's
                CachedStorage), which this pass fills
  cache, warm   the URL again, new processes, the folder filled
reporting samples/s, requests to the store's server per sample and bytes
fetched from it per sample (counted under the cache: a warm cache's only
request is the store's root document, once per process, whose hash names
the cache's folder), and each setting against local disk. Each process opens
the store and reads meta/ before the clock starts, as a loader's reader
worker does once per run.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from engine import storage
from engine.reader import WindowReader

SETTINGS = ("local disk", "no cache", "cache, cold", "cache, warm")


class CountingStorage:
    """A storage's reads, counted: requests (one per byte range) and bytes."""

    def __init__(self, inner):
        self.inner, self.requests, self.bytes = inner, 0, 0

    def __getattr__(self, name):   # everything but the reads, as the inner storage does it
        return getattr(self.inner, name)

    def _count(self, requests: int, data):
        if data is not None:
            self.requests += requests
            self.bytes += sum(map(len, data)) if isinstance(data, list) else len(data)
        return data

    def read(self, key):
        return self._count(1, self.inner.read(key))

    def read_ranges(self, key, ranges):
        return self._count(len(ranges), self.inner.read_ranges(key, ranges))

    def read_suffix(self, key, length):
        return self._count(1, self.inner.read_suffix(key, length))


_READER = _COUNTER = None


def _open_reader(store: str, with_ela: bool, settings: storage.StorageSettings) -> None:
    """A worker's reader, its requests to the store (beneath any cache) counted."""
    global _READER, _COUNTER
    _READER = WindowReader(store, with_ela=with_ela, storage=settings)
    cached = isinstance(_READER.storage, storage.CachedStorage)
    _COUNTER = CountingStorage(_READER.storage.inner if cached else _READER.storage)
    if cached:
        _READER.storage.inner = _COUNTER
    else:
        _READER.storage = _COUNTER
    _READER.meta   # the store opened and meta/ read once per process, as a loader's worker does


def read_batch(job) -> tuple[int, int, int]:
    """A pool worker's read of one batch's windows: (samples, requests to
    the store, bytes fetched)."""
    rows, windows, out_size = job
    before = _COUNTER.requests, _COUNTER.bytes
    for row, window in zip(rows, windows):
        _READER.read(int(row), window, out_size)
    return len(rows), _COUNTER.requests - before[0], _COUNTER.bytes - before[1]


def reading_pool(store, with_ela: bool, workers: int,
                 settings: storage.StorageSettings = storage.NO_SETTINGS):
    """Processes that only read windows (read_batch), each with its reader open."""
    return mp.get_context("spawn").Pool(max(1, workers), _open_reader,
                                        (str(store), with_ela, settings))


def read_pass(store: str, jobs: list, with_ela: bool, workers: int,
              settings: storage.StorageSettings) -> dict:
    """One pass over `jobs` by fresh reader processes (reaching a URL with
    `settings`, its read cache included): samples/s, server requests and kB
    per sample."""
    with reading_pool(store, with_ela, workers, settings) as pool:
        pool.map(time.sleep, [0.2] * max(1, workers))   # started before the clock
        start = time.perf_counter()
        counts = pool.map(read_batch, jobs, chunksize=1)
        seconds = time.perf_counter() - start
    samples, requests, fetched = (sum(c[i] for c in counts) for i in range(3))
    return {"samples_per_s": samples / seconds, "requests_per_sample": requests / samples,
            "kB_per_sample": fetched / samples / 1e3}


def measure_member(url: str, local: Path, jobs: list, with_ela: bool, workers: int,
                   settings: storage.StorageSettings = storage.NO_SETTINGS) -> dict:
    """The four settings (SETTINGS) of one member's jobs."""
    with tempfile.TemporaryDirectory(prefix="store_cache_") as cache:
        uncached = dataclasses.replace(settings, cache=None)
        cached = dataclasses.replace(settings, cache=Path(cache))
        rows = {"local disk": read_pass(str(local), jobs, with_ela, workers, uncached),
                "no cache": read_pass(url, jobs, with_ela, workers, uncached),
                "cache, cold": read_pass(url, jobs, with_ela, workers, cached),
                "cache, warm": read_pass(url, jobs, with_ela, workers, cached)}
    for row in rows.values():
        row["x_local"] = row["samples_per_s"] / rows["local disk"]["samples_per_s"]
    return rows


def report(url: str, local: Path, results: dict) -> None:
    print(f"\n{url} against {local} (local disk): window reads only, fresh processes per setting")
    header = f"{'member':<18}{'setting':<14}{'samples/s':>11}{'requests/sample':>17}{'kB/sample':>11}{'x local':>9}"
    print(header + "\n" + "-" * len(header))
    for member, rows in results.items():
        for name, r in rows.items():
            print(f"{member:<18}{name:<14}{r['samples_per_s']:>11.1f}{r['requests_per_sample']:>17.2f}"
                  f"{r['kB_per_sample']:>11.0f}{r['x_local']:>8.2f}x")
    print("requests and kB: to the store's server (beneath the cache); local disk: to the file system")
