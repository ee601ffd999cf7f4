"""Scale: what today's store (format 4, docs/store.md) costs the engine as it
grows to millions of images, measured on synthetic stores of N images.

Each store of --rows is synthesised through the builder's own code
(preprocess/build_zarr.py: settings_for, open_partial, finalize and finish
write meta/, instances/, the build report and the root; write_pixels writes
an image's pyramid, ELA and masks), from no PNG at all: N rows describing
small images (--sides, default 128-512 px), a --forged share of them with one
rectangular forgery each. Writing every image's pixel objects is what makes a
million-image format-4 store infeasible here, so pixels are written only for
the rows this run reads (the first batches of each member's epoch plan) and
for a uniform sample of --pixel-sample rows; objects per image are the
sample's pixel objects per image plus the store's other objects / N, and are
exact (every file counted) for a store of at most --pixel-sample rows.

Per store and member:
  objects/img   the files a build writes per image (a URL build uploads
                each as one object)
  open s        open_store + read_meta: what every process of a run does
                (each rank, each reader worker on its first read)
  loader s      make_loader: the store opened and an epoch planned, per rank
                (world size 1: each rank plans the whole epoch anyway)
  plan ms       loader.set_epoch: one epoch planned again (the reader workers
                plan each later epoch themselves)
  worker MB     VmRSS (/proc/PID/status) of the loader's reader workers (DALI's
                processes, --workers, the opencv backend) after --batches
                batches, their mean, and that above an idle worker's: the same
                loader's workers over a store of --idle-rows images
Per store of --remote-rows (default: the largest), uploaded to a local S3
server (moto, in this process, each request held --latency-ms as a network
round trip would hold it) and read by the engine's reader (WindowReader) as a
reader worker reads, the first --remote-samples windows of each member's plan:
requests, round trips (requests in flight together count once) and bytes per
sample, counted by the server, in four settings:
  cold          a fresh reader: every array a sample reads is new to it, as
                in a store of more images than a reader keeps arrays open for
                (engine.reader.MAX_OPEN_ARRAYS)
  warm          the same reader reading the same windows again: arrays open
  cache cold    a fresh reader through an empty read cache (--cache,
                docs/object_storage.md)
  cache warm    a fresh reader through the filled cache
and what opening the store at the URL costs (open_store + read_meta).

Prints a table (and ratios: each store against the smallest, warm and the
cache against cold), writes --json and a PNG chart beside it. The defaults
take about 3 minutes on 2 shared cores (docs/performance.md, "Scale").

    python benchmarks/scale.py                                  # format 4, 1k-1M images
    python benchmarks/scale.py --rows 1000 10000 --remote-rows 10000

Another store format is measured by adding its own functions beside
build_format_4, add_pixels_format_4 and objects_per_image_format_4, called
where measure_store calls those: everything else goes through the engine's
open_store, make_loader and WindowReader.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
from tqdm import tqdm

from common.atomic import atomic_open
from common.help_format import HelpFormatter
from engine import storage as storages
from engine import packing, store as layout
from engine.recipes import RECIPES
from preprocess import build_zarr
from preprocess.source import DEFAULT_MAX_PIXELS, Case

MEMBERS = ("highres_no_ela", "small_specialist")
# members a synthetic store can serve: no mining results to read, and no
# copy-paste patch bank, which reads every forged training image's pixels
MEASURABLE = tuple(name for name, r in RECIPES.items() if r.mining is None and not r.copy_paste)
FORGED_AREA_MEDIAN = 0.03   # forged area ratios log-normal around 3 %, as in the competition
BUCKET = "scale"


# ---------------------------------------------------------------- synthetic images

def synthetic_table(n: int, seed: int, sides: tuple[int, int], forged: float) -> dict:
    """Per row: label, height, width and the one forgery's box (y0, x0, y1,
    x1; -1 authentic), sides log-uniform in `sides`, forged area ratios
    log-normal around FORGED_AREA_MEDIAN."""
    rng = np.random.default_rng(seed)
    lo, hi = sides
    height, width = (np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(np.int64).clip(lo, hi)
                     for _ in range(2))
    label = (rng.random(n) < forged).astype(np.uint8)
    ratio = np.clip(np.exp(rng.normal(np.log(FORGED_AREA_MEDIAN), 1.2, n)), 1e-3, 0.5)
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))
    box_h = np.clip(np.round(np.sqrt(ratio * height * width * aspect)), 1, height).astype(np.int64)
    box_w = np.clip(np.round(ratio * height * width / box_h), 1, width).astype(np.int64)
    y0 = (rng.random(n) * (height - box_h + 1)).astype(np.int64)
    x0 = (rng.random(n) * (width - box_w + 1)).astype(np.int64)
    bbox = np.stack([y0, x0, y0 + box_h, x0 + box_w], axis=1)
    bbox[label == 0] = -1
    return {"label": label, "height": height, "width": width, "bbox": bbox}


def cases_and_records(table: dict) -> tuple[list[Case], list[dict]]:
    """The builder's Case and completion record of every row, as its workers
    would have made them from PNGs of these sizes and one-forgery masks."""
    cases, records = [], []
    for row, (label, height, width, box) in enumerate(zip(
            table["label"].tolist(), table["height"].tolist(), table["width"].tolist(),
            table["bbox"].tolist())):
        folder = "train_images/forged" if label else "train_images/authentic"
        cases.append(Case(f"{row:08d}", label, folder, PurePosixPath(f"{folder}/{row:08d}.png"),
                          PurePosixPath(f"train_masks/{row:08d}.npy") if label else None))
        record = {"key": row, "height": height, "width": width}
        if label:
            y0, x0, y1, x1 = box
            area = (y1 - y0) * (x1 - x0)
            record.update(area=area, bbox=box, centroid=[(y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2],
                          instances=[box + [area]])
        records.append(record)
    return cases, records


def row_pixels(table: dict, row: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Row `row`'s RGB (smooth colour fields plus noise: compressible about
    as photographs are, not as flat or as random) and its instance mask."""
    rng = np.random.default_rng((seed, row))
    height, width = int(table["height"][row]), int(table["width"][row])
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    rgb = cv2.add(cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC),
                  rng.integers(0, 16, (height, width, 3), dtype=np.uint8))
    if not table["label"][row]:
        return rgb, None
    y0, x0, y1, x1 = table["bbox"][row].tolist()
    instances = np.zeros((1, height, width), np.uint8)
    instances[0, y0:y1, x0:x1] = 1
    return rgb, instances


# ---------------------------------------------------------------- format 4

class PerImageFormat:
    """Version 4's layout (engine.store.PER_IMAGE_LAYOUT): every image's
    levels, ELA, masks and instances each an array of their own, a
    zarr.json and a shard object apiece. Tables as the builder writes them
    (synthesise); pixels by the builder's write_pixels, only for the rows read."""

    version = 4

    def __init__(self, out: Path, table: dict, seed: int):
        self.out, self.table, self.seed = out, table, seed
        self.written: set[int] = set()

    def build(self) -> None:
        synthesise(self.out, self.table, layout.PER_IMAGE_LAYOUT)
        target = storages.LocalStorage(self.out)
        target.remove("tiles")   # what finalize writes for packed tiles: no part of this layout
        for top in layout.PACKED_KINDS:   # the groups each image's arrays sit in
            target.write(f"{top}/zarr.json", layout._GROUP_JSON)

    def add_pixels(self, rows) -> None:
        """Each row's pixel arrays unless written already."""
        import zarr
        todo = sorted(set(int(r) for r in rows) - self.written)
        group = zarr.open_group(str(self.out), mode="r+")
        for row in tqdm(todo, desc=f"pixels of {self.out.name}", unit="img", leave=False):
            build_zarr.write_pixels(group, row, *row_pixels(self.table, row, self.seed))
        self.written.update(todo)

    def objects_per_image(self, n: int, sample: list[int]) -> dict:
        """Files of the store per image: the pixel objects of `sample`'s rows
        (engine.store.row_nodes) per row, plus every other file / n; and the
        sample's stored bytes per image."""
        storage = storages.LocalStorage(self.out)
        files = {row: [key for node in layout.row_nodes(row) for key in storage.keys(node)]
                 for row in self.written}
        other = len(storage.keys("")) - sum(map(len, files.values()))
        per_row = statistics.fmean(len(files[row]) for row in sample)
        return {"objects_per_image": per_row + other / n, "pixel_objects_per_image": per_row,
                "store_objects": other, "files": other + sum(map(len, files.values())),
                "pixel_rows_written": len(self.written),
                "bytes_per_pixel_image": statistics.fmean(
                    sum((self.out / key).stat().st_size for key in files[row]) for row in sample)}


# ---------------------------------------------------------------- format 5

class PackedFormat:
    """Version 5's layout (engine.store.DEFAULT_LAYOUT, engine/packing.py):
    tiles packed into a shard object per block of images and array. The
    builder's plan, block records and finalize over rows as its tasks would
    have recorded them; pixels by the builder's encode_tiles and
    write_shards, only for the rows read: a block's shards hold the tiles
    of its rows read so far (each block's shard rewritten as rows are
    added), which is what the reads measured touch. Objects per image are
    exact: the shard objects every block would have (packing.shard_blocks),
    plus the other files, per image."""

    version = 5

    def __init__(self, out: Path, table: dict, seed: int):
        self.out, self.table, self.seed = out, table, seed
        self.pixel_layout = layout.DEFAULT_LAYOUT
        self.chunks: dict[int, dict] = {}   # block -> its tiles so far
        self.written: set[int] = set()

    def build(self) -> None:
        self.tasks = synthesise(self.out, self.table, self.pixel_layout)
        self.planned = [row for task in self.tasks for row in task.rows]

    def add_pixels(self, rows) -> None:
        """Each row's tiles unless written already, and its block's shards again."""
        todo = sorted(set(int(r) for r in rows) - self.written)
        touched = set()
        for row in tqdm(todo, desc=f"pixels of {self.out.name}", unit="img", leave=False):
            planned = self.planned[row]
            block = planned.tile_start[0] // self.pixel_layout.shard_tiles
            rgb, instances = row_pixels(self.table, row, self.seed)
            build_zarr.encode_tiles(planned, list(build_zarr.pyramid(rgb, instances)), instances,
                                    block, self.pixel_layout, self.chunks.setdefault(block, {}))
            touched.add(block)
        target = storages.LocalStorage(self.out)
        for block in sorted(touched):
            build_zarr.write_shards(target, block, self.chunks[block], self.pixel_layout)
        self.written.update(todo)

    def objects_per_image(self, n: int, sample: list[int]) -> dict:
        meta = layout.read_meta(layout.open_store(self.out))
        shards = sum(len(blocks) for blocks in packing.shard_blocks(
            meta["tile_start"], meta["label"], meta["n_instances"], self.pixel_layout.shard_tiles).values())
        keys = storages.LocalStorage(self.out).keys("")
        other = sum(not layout.TILES_SHARD_KEY.fullmatch(key) for key in keys)
        tile_bytes = sum(len(tile) for chunks in self.chunks.values()
                         for found in chunks.values() for tile in found.values())
        return {"objects_per_image": (shards + other) / n, "pixel_objects_per_image": shards / n,
                "store_objects": other, "files": len(keys), "pixel_rows_written": len(self.written),
                "blocks": len(self.tasks), "bytes_per_pixel_image": tile_bytes / len(self.written)}


FORMATS = {f.version: f for f in (PerImageFormat, PackedFormat)}


def synthesise(out: Path, table: dict, pixel_layout: layout.PixelLayout) -> list:
    """A complete store of the table's rows in `pixel_layout`, without
    pixels: the builder's plan (from the sizes its headers would give), its
    block records (as its tasks would have written them) and its finalize.
    Returns the block tasks."""
    cases, records = cases_and_records(table)
    settings = build_zarr.settings_for(Path(f"synthetic-{len(cases)}"), cases, DEFAULT_MAX_PIXELS,
                                       pixel_layout)
    headers = [(case, r["height"], r["width"], len(r.get("instances", ())), [0, 0],
                [0, 0] if case.label else None) for case, r in zip(cases, records)]
    tasks = build_zarr.plan(headers, settings, str(out), None)
    block_records, rows = {}, iter(records)
    for task in tasks:
        block_records[task.block] = {"block": task.block, "plan": task.plan, "rows": [
            {**next(rows), "digest": "00" * 32, "bytes_source": 0} for _ in task.rows]}
    shutil.rmtree(out, ignore_errors=True)
    target = storages.LocalStorage(out)
    build_zarr.write_root(target, {})
    build_zarr.finalize(target, settings, tasks, block_records,
                        {"source": "synthetic", "skipped": [], "test_images_not_stored": 0},
                        check=lambda step: None)
    return tasks


# ---------------------------------------------------------------- what the engine pays

def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def open_seconds(store: Path, repeats: int) -> float:
    """Median seconds of open_store + read_meta."""
    return statistics.median(timed(lambda: layout.read_meta(layout.open_store(store)))[0]
                             for _ in range(repeats))


def child_pids() -> set[int]:
    pids = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            pids.update(int(p) for p in (task / "children").read_text().split())
        except OSError:   # a thread that ended meanwhile
            pass
    return pids


def status_mb(pid: int) -> dict:
    """VmRSS and RssAnon of a process (/proc/PID/status), MB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon"):
            found[name] = int(value.split()[0]) / 1024
    return found


def planned_reads(loader, args, remote_samples: int) -> tuple[np.ndarray, list]:
    """Rows of the batches the loader's workers read while measured (the
    batches taken, those DALI prefetches, and a margin, and at least the
    remote reads'), and the plan's first `remote_samples` (row, window)."""
    from engine.pipeline import PREFETCH_PER_WORKER
    ahead = max(args.batches + PREFETCH_PER_WORKER * args.workers + 3,
                -(-remote_samples // args.batch_size))
    rows = np.concatenate(loader.batches.rows[:ahead])
    windows = np.concatenate(loader.batches.windows[:ahead])
    return rows, list(zip(rows.tolist()[:remote_samples], windows[:remote_samples]))


def measure_loader(out: Path, member: str, args, add_pixels, remote_samples: int) -> tuple[dict, list]:
    """make_loader's and set_epoch's seconds, then the workers' memory after
    --batches batches; also the first `remote_samples` (row, window) of the
    plan, for the remote reads."""
    from engine.loader import make_loader
    seconds, loader = timed(make_loader, out, member, batch_size=args.batch_size,
                            img_size=args.img_size, seed=args.seed, device="cpu", backend="opencv",
                            workers=args.workers)
    with loader:
        plans = [timed(loader.set_epoch, epoch)[0] for epoch in (1, 0) * args.repeats]
        rows, samples = planned_reads(loader, args, remote_samples)
        add_pixels(rows)
        before = child_pids()
        for _ in zip(range(args.batches), loader):
            pass
        workers = [pid for pid in child_pids() - before
                   if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        if not workers:
            raise RuntimeError(f"{out}: no reader worker process of {member}'s loader found")
        memory = [status_mb(pid) for pid in workers]
    return {"loader_s": seconds, "plan_s": statistics.median(plans),
            "epoch_batches": len(loader.batches), "workers": len(memory),
            "worker_rss_MB": [m["VmRSS"] for m in memory],
            "worker_anon_MB": [m["RssAnon"] for m in memory],
            "worker_rss_mean_MB": statistics.fmean(m["VmRSS"] for m in memory)}, samples


class CountingS3:
    """moto's S3 server on a free port of 127.0.0.1, in this process, that
    holds each request `latency` seconds (a network's round trip) and logs
    it: (arrived, answered, method, body bytes)."""

    def __init__(self, latency: float):
        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                   create_backend_app)
        from werkzeug.serving import make_server
        self.log, self._lock = [], threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def counted(environ, start_response):
            arrived = time.perf_counter()
            time.sleep(latency)
            answer = app(environ, start_response)
            body = b"".join(answer)
            if hasattr(answer, "close"):   # WSGI: an iterable with close() is closed by its caller
                answer.close()
            with self._lock:   # before the answer leaves: a request it causes arrives later
                self.log.append((arrived, time.perf_counter(), environ["REQUEST_METHOD"], len(body)))
            return [body]

        logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per request
        self.server = make_server("127.0.0.1", 0, counted, threaded=True,
                                  request_handler=MotoRequestHandler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def settings(self, cache: Path | None = None) -> storages.StorageSettings:
        """How the engine reaches this server (a fake key: moto checks none)."""
        return storages.StorageSettings(
            options={"endpoint_url": self.endpoint, "key": "scale", "secret": "scale",
                     "client_kwargs": {"region_name": "us-east-1"}}, cache=cache)

    def create_bucket(self, name: str) -> None:
        import boto3
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     aws_access_key_id="scale", aws_secret_access_key="scale").create_bucket(Bucket=name)

    def count(self, fn):
        """fn()'s requests: {requests, heads, round_trips, bytes, seconds}."""
        start = len(self.log)
        seconds, _ = timed(fn)
        with self._lock:
            done = sorted(self.log[start:])
        trips, reach = 0, float("-inf")
        for arrived, answered, _, _ in done:
            trips += arrived > reach   # nothing in flight when it arrived: a new round trip
            reach = max(reach, answered)
        return {"requests": len(done), "heads": sum(r[2] == "HEAD" for r in done),
                "round_trips": trips, "bytes": sum(r[3] for r in done), "seconds": seconds}

    def close(self) -> None:
        self.server.shutdown()


def per_sample(counts: list[dict]) -> dict:
    n = len(counts)
    return {"requests": sum(c["requests"] for c in counts) / n,
            "heads": sum(c["heads"] for c in counts) / n,
            "round_trips": sum(c["round_trips"] for c in counts) / n,
            "kB": sum(c["bytes"] for c in counts) / n / 1e3,
            "ms": 1e3 * sum(c["seconds"] for c in counts) / n}


def remote_reads(server: CountingS3, url: str, member: str, samples: list, img_size: int,
                 cache: Path) -> dict:
    """Per sample, as the server counts them, in the four settings (module docstring)."""
    from engine.reader import WindowReader
    from engine.recipes import get_recipe
    with_ela = get_recipe(member).in_channels == 4

    def opened(settings):
        reader = WindowReader(url, with_ela=with_ela, storage=settings)
        reader.meta   # the store opened and meta/ read, as a worker does before its first window
        return reader

    def read_all(reader):
        return per_sample([server.count(lambda: reader.read(row, window, img_size))
                           for row, window in samples])

    fresh = opened(server.settings())
    found = {"cold": read_all(fresh), "warm": read_all(fresh)}
    for name in ("cache cold", "cache warm"):
        found[name] = read_all(opened(server.settings(cache)))
    return found


def upload(out: Path, target) -> None:
    """Every file of local store `out` as an object of `target`."""
    keys = storages.LocalStorage(out).keys("")
    for start in range(0, len(keys), 64):
        target.write_many([(key, (out / key).read_bytes()) for key in keys[start:start + 64]])


def measure_remote(server: CountingS3, out: Path, samples: dict, args) -> dict:
    """The store uploaded, opened at its URL, and each member's samples read."""
    url = f"s3://{BUCKET}/{out.name}"
    upload(out, storages.open_storage(url, read_only=False, storage=server.settings()))
    opening = server.count(lambda: layout.read_meta(layout.open_store(url, storage=server.settings())))
    found = {"url": url, "open": opening, "members": {}}
    for member, member_samples in samples.items():
        with tempfile.TemporaryDirectory(prefix="scale_cache_", dir=args.work) as cache:
            found["members"][member] = remote_reads(server, url, member, member_samples,
                                                    args.img_size, Path(cache))
    return found


def measure_store(version: int, n: int, args, server: CountingS3 | None, remote: bool) -> dict:
    """Everything measured of one synthetic store of n images in format `version`."""
    out = Path(args.work) / f"format{version}-{n}.zarr"
    store = FORMATS[version](out, synthetic_table(n, args.seed, tuple(args.sides), args.forged), args.seed)
    build_s, _ = timed(store.build)
    sample = sorted(np.random.default_rng(args.seed).choice(
        n, min(n, args.pixel_sample), replace=False).tolist())
    store.add_pixels(sample)
    found = {"format": version, "rows": n, "build_meta_s": build_s,
             "open_s": open_seconds(out, args.repeats), "members": {}}
    samples = {}
    for member in args.members:
        found["members"][member], samples[member] = measure_loader(
            out, member, args, store.add_pixels, args.remote_samples if remote else 0)
    found.update(store.objects_per_image(n, sample), pixel_sample=len(sample))
    if remote:
        found["remote"] = measure_remote(server, out, samples, args)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return found


# ---------------------------------------------------------------- report

def above_idle(measured: dict) -> None:
    """Each store's worker memory above the idle store's (of its format), per member."""
    idle = measured["idle"]["members"]
    for store in measured["stores"]:
        for member, figures in store["members"].items():
            figures["above_idle_MB"] = figures["worker_rss_mean_MB"] - idle[member]["worker_rss_mean_MB"]


def print_report(results: dict) -> None:
    settings = results["settings"]
    for version, measured in results["formats"].items():
        stores = measured["stores"]
        first = stores[0]
        print(f"\nformat {version}: synthetic stores of {settings['sides'][0]}-{settings['sides'][1]} px "
              f"images; x: against the {first['rows']:,}-image store")
        header = (f"{'images':>10}{'obj/img':>8}{'open s':>8}{'x':>8}  {'member':<17}{'loader s':>9}{'x':>8}"
                  f"{'plan ms':>9}{'x':>8}{'worker MB':>10}{'above idle':>11}")
        print(header + "\n" + "-" * len(header))
        for store in stores:
            for k, (member, m) in enumerate(store["members"].items()):
                base = first["members"][member]
                lead = (f"{store['rows']:>10,}{store['objects_per_image']:>8.3f}{store['open_s']:>8.3f}"
                        f"{ratio(store['open_s'], first['open_s'])}" if k == 0 else " " * 34)
                print(f"{lead}  {member:<17}{m['loader_s']:>9.3f}{ratio(m['loader_s'], base['loader_s'])}"
                      f"{1e3 * m['plan_s']:>9.1f}{ratio(m['plan_s'], base['plan_s'])}"
                      f"{m['worker_rss_mean_MB']:>10.0f}{m['above_idle_MB']:>11.1f}")
        idle = measured["idle"]
        print(f"idle worker: the same loaders' workers over {idle['rows']} images: " + ", ".join(
            f"{member} {m['worker_rss_mean_MB']:.0f} MB" for member, m in idle["members"].items())
            + " (VmRSS counts the shared libraries' pages in every process)")
        for store in stores:
            if "remote" in store:
                print_remote(store, settings["latency_ms"])
    print("pixels written only for the images read (the rows of the batches measured and a uniform "
          f"sample of {settings['pixel_sample']}); format 4's objects per image from that sample, "
          "format 5's exact from its plan of blocks")
    print_comparison(results)


def print_comparison(results: dict) -> None:
    """Format 5 against format 4, store by store of the same size."""
    formats = results["formats"]
    if not {"4", "5"} <= formats.keys():
        return
    old = {s["rows"]: s for s in formats["4"]["stores"]}
    print("\nformat 5 against format 4 (x: format 4's figure / format 5's)")
    header = f"{'images':>10}{'objects/img 4':>15}{'5':>8}{'x':>8}{'open s 4':>10}{'5':>8}{'x':>8}" \
             f"{'cold requests/sample 4':>24}{'5':>7}{'x':>8}"
    print(header + "\n" + "-" * len(header))
    for new in formats["5"]["stores"]:
        was = old.get(new["rows"])
        if was is None:
            continue
        line = (f"{new['rows']:>10,}{was['objects_per_image']:>15.3f}{new['objects_per_image']:>8.4f}"
                f"{ratio(was['objects_per_image'], new['objects_per_image'])}{was['open_s']:>10.3f}"
                f"{new['open_s']:>8.3f}{ratio(was['open_s'], new['open_s'])}")
        if "remote" in new and "remote" in was:
            member = next(iter(new["remote"]["members"]))
            cold = (was["remote"]["members"][member]["cold"]["requests"],
                    new["remote"]["members"][member]["cold"]["requests"])
            line += f"{cold[0]:>24.2f}{cold[1]:>7.2f}{ratio(*cold)}  ({member})"
        print(line)


def ratio(value: float, base: float) -> str:
    """`value / base` as a table column."""
    return f"{value / base:>7.1f}x"


def print_remote(store: dict, latency_ms: float) -> None:
    remote = store["remote"]
    opening = remote["open"]
    print(f"\nformat {store['format']}: {remote['url']} ({store['rows']:,} images), local moto server, {latency_ms:g} ms held per "
          f"request: open_store + read_meta {opening['requests']} requests ({opening['heads']} HEAD) in "
          f"{opening['round_trips']} round trips, {opening['bytes'] / 1e3:,.0f} kB, {opening['seconds']:.2f} s")
    header = (f"{'member':<18}{'setting':<12}{'requests':>9}{'HEAD':>6}{'round trips':>12}{'kB':>8}"
              f"{'ms':>8}{'requests x cold':>16}")
    print(header + "\n" + "-" * len(header))
    for member, settings in remote["members"].items():
        cold = settings["cold"]["requests"]
        for name, r in settings.items():
            print(f"{member:<18}{name:<12}{r['requests']:>9.2f}{r['heads']:>6.2f}{r['round_trips']:>12.2f}"
                  f"{r['kB']:>8.1f}{r['ms']:>8.1f}{r['requests'] / cold:>15.2f}x")
    print("per sample, counted by the server; cold: every array (format 4) or shard index "
          "(format 5) new to the reader, warm: the same reader again, cache: through an empty, "
          "then a filled --cache")


def draw_chart(results: dict, path: Path) -> None:
    """Seconds, worker memory and objects per image against images, format
    by format (solid: the newest); requests per sample from S3 by setting."""
    from matplotlib.figure import Figure
    formats = results["formats"]
    remote = [s for measured in formats.values() for s in measured["stores"] if "remote" in s]
    fig = Figure(figsize=(18 if remote else 13, 4.5))
    axes = fig.subplots(1, 4 if remote else 3)
    newest = max(formats, key=int)
    for version, measured in formats.items():
        stores, style = measured["stores"], "-" if version == newest else ":"
        n = [s["rows"] for s in stores]
        axes[0].plot(n, [s["open_s"] for s in stores], "o" + style, color="k",
                     label=f"format {version}: open_store + read_meta")
        for k, member in enumerate(results["settings"]["members"]):
            axes[0].plot(n, [s["members"][member]["loader_s"] for s in stores], "s" + style,
                         color=f"C{k}", label=f"format {version}, {member}: make_loader")
            axes[1].plot(n, [s["members"][member]["above_idle_MB"] for s in stores], "o" + style,
                         color=f"C{k}", label=f"format {version}, {member}")
        axes[2].plot(n, [s["objects_per_image"] for s in stores], "o" + style, color="k",
                     label=f"format {version}")
    axes[0].set(xscale="log", yscale="log", xlabel="images in the store", ylabel="seconds (lower is better)",
                title="opening and planning, per rank")
    axes[1].set(xscale="log", xlabel="images in the store", ylabel="MB above an idle worker (lower is better)",
                title="memory of each reader worker (VmRSS)")
    axes[2].set(xscale="log", yscale="log", xlabel="images in the store",
                ylabel="objects per image (lower is better)", title="objects a build writes")
    for ax in axes[:3]:
        ax.legend(fontsize=7)
    if remote:
        members = results["settings"]["members"]
        names = list(remote[0]["remote"]["members"][members[0]])
        width = 0.8 / (len(remote) * len(members))
        for k, (store, member) in enumerate((s, m) for s in remote for m in members):
            found = store["remote"]["members"][member]
            axes[3].bar(np.arange(len(names)) - 0.4 + (k + 0.5) * width,
                        [found[name]["requests"] for name in names], width, color=f"C{k}",
                        label=f"format {store['format']}, {store['rows']:,} images, {member}")
        axes[3].set_xticks(np.arange(len(names)), names)
        axes[3].set(ylabel="requests per sample (lower is better)", title="from S3 (moto)")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("--formats", type=int, nargs="+", default=sorted(FORMATS), choices=sorted(FORMATS),
                        help="store formats measured side by side: 4 an array per image, 5 packed tiles")
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000],
                        help="images of each synthetic store")
    parser.add_argument("--remote-rows", type=int, nargs="*", default=None,
                        help="the stores (of --rows) measured from the S3 server (default: the "
                             "largest; none given: no S3)")
    parser.add_argument("--idle-rows", type=int, default=100, help="images of the idle workers' store")
    parser.add_argument("--members", nargs="+", default=list(MEMBERS), choices=MEASURABLE,
                        metavar="MEMBER", help=f"members whose loaders are measured: {', '.join(MEASURABLE)} "
                        "(those that need neither mining results nor copy-paste's patch bank)")
    parser.add_argument("--sides", type=int, nargs=2, default=[128, 512], metavar=("MIN", "MAX"),
                        help="image sides, pixels")
    parser.add_argument("--forged", type=float, default=0.5, help="share of forged images")
    parser.add_argument("--pixel-sample", type=int, default=150,
                        help="images whose pixels are written at random, for objects per image")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=128, help="loader output side")
    parser.add_argument("--workers", type=int, default=1,
                        help="reader workers of each loader (make_loader's own default on 2 cores)")
    parser.add_argument("--batches", type=int, default=2, help="batches taken before measuring the workers")
    parser.add_argument("--repeats", type=int, default=3, help="timed opens and plans, the median counts")
    parser.add_argument("--remote-samples", type=int, default=16, help="windows read per member and setting")
    parser.add_argument("--latency-ms", type=float, default=10.0,
                        help="the S3 server holds each request this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the stores (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the stores in --work")
    parser.add_argument("--json", type=Path, default=Path("logs/scale.json"),
                        help="figures (and a PNG chart beside it)")
    args = parser.parse_args(argv)
    if min(args.rows) < 1 or args.idle_rows < 1 or args.pixel_sample < 1:
        parser.error("--rows, --idle-rows and --pixel-sample: at least 1")
    if not 1 <= args.sides[0] <= args.sides[1]:
        parser.error(f"--sides {args.sides[0]} {args.sides[1]}: MIN at least 1 and at most MAX")
    if not 0 < args.forged <= 1:
        parser.error(f"--forged {args.forged}: above 0 (members sample forged images), at most 1")
    remote_rows = [max(args.rows)] if args.remote_rows is None else args.remote_rows
    if set(remote_rows) - set(args.rows):
        parser.error(f"--remote-rows {remote_rows}: each one of --rows {args.rows}")
    if args.workers < 1:
        parser.error("--workers: at least 1 (the workers are what is measured)")
    started = time.perf_counter()
    import engine.loader  # noqa: F401 (torch and DALI imported before any clock starts)
    temporary = args.work is None
    if temporary:
        args.work = Path(tempfile.mkdtemp(prefix="scale_"))
    args.work.mkdir(parents=True, exist_ok=True)
    server = CountingS3(args.latency_ms / 1e3) if remote_rows else None
    try:
        if server is not None:
            server.create_bucket(BUCKET)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        results = {"settings": settings, "formats": {}}
        for version in args.formats:
            measured = {"idle": measure_store(version, args.idle_rows, args, None, remote=False),
                        "stores": []}
            for n in tqdm(sorted(args.rows), desc=f"format {version} stores", unit="store"):
                measured["stores"].append(measure_store(version, n, args, server,
                                                        remote=n in remote_rows))
            above_idle(measured)
            results["formats"][str(version)] = measured
    finally:
        if server is not None:
            server.close()
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    print_report(results)
    print(f"\nwall time {results['seconds']:.0f} s")
    with atomic_open(args.json) as handle:
        json.dump(results, handle, indent=1)
    draw_chart(results, args.json.with_suffix(".png"))
    print(f"figures: {args.json}, chart: {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
