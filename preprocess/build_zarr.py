"""Build the forgery store (Zarr v3, format 5: packed tiles) from a Kaggle-layout folder.

    python preprocess/build_zarr.py [--source DIR] [--out STORE] [--workers N | --cluster ADDRESS]
        [--append] [--strict] [--overwrite] [--max-pixels P] [--shard-tiles S]

Without --source it first writes the built-in demo folder (--demo-dir,
scikit-image's scientific images with synthetic copy-move forgeries; reused
when it already exists) and builds the store from it.

Every PNG is decoded once (conversion rule: preprocess/source.py), every mask
instance kept; the layout is engine/store.py's and engine/packing.py's: the
tiles of all images packed into a few large shard objects.

1. Plan, from the files' headers alone (PNG size, the mask's layer count;
   source.image_size and source.mask_layers): rows in case order are packed
   into blocks (engine.packing.plan_blocks), each block one shard object per
   tiles array. The plan depends on the sizes only, so a rerun plans the same.
2. One task per block (preprocess/cluster.py: in this process for one
   worker, a local Dask cluster for --workers N, a running one for
   --cluster): it decodes its rows, computes their pyramid levels and ELA,
   encodes their tiles and writes each of its shards straight to the
   destination (a local folder or a URL, no staging), then its block record
   `build/blocks/<block>.json` (rows' sizes, mask statistics and content
   digests, or why a row was skipped; the digest of the block's plan). A
   task holds one block's encoded tiles at most.
3. Finalize: meta/ and instances/ of the stored rows (a row whose decode
   failed is dropped, its tiles never written), the tiles arrays' zarr.json,
   build_report.json, then the root zarr.json with the completion
   attributes (engine.store.COMPLETION) last, then the build records go.

A local --out is built in `<out>.partial` and renamed at the end. A URL
(s3://..., any fsspec URL; engine/storage.py) has no rename: it is written
in place, its root zarr.json written first without the completion
attributes so that readers refuse the unfinished store
(engine.store.unfinished), and with them last.

Resume: a killed build rerun with the same command keeps every block whose
record is there and whose plan digest matches (same files, unchanged since:
their size and mtime are in the plan), redoes the others, and gives the
store an uninterrupted build gives. A partial store of other inputs or
settings (build/settings.json) is started over. Every step of the final
phase can be repeated.

Append: `--append` adds the source's cases that the store lacks, matched by
(image folder, case id) (build_report.json's `row_cases`), so the same
case from another copy of the source is not added twice: new blocks after
the store's last, new rows after its last, existing shards never rewritten
(new shards have new keys). Then meta/ and instances/ (old rows unchanged
plus the new ones), the tiles arrays' zarr.json (a larger shape), the report
and, last, the root with a new fingerprint are rewritten; the root keeps its
build_id, since every existing shard's bytes are unchanged, so a read cache
keyed by the build id stays valid. A row's split comes from a hash of its
case id alone (engine.store.split_of), so no existing row changes split. The root
loses its completion attributes while meta/ is rewritten (readers refuse it
for that moment), the new index having been written whole beforehand
(build/index.npz), so a killed append rerun the same way resumes whatever
state it left meta/ in.
Appending nothing new says so and changes nothing.

Bad input (a file that cannot be stored): by default the case is skipped and
listed with its reason in the summary and in `<out>/build_report.json`;
--strict stops at the first one. Only regular files are read: symlinks are
followed, while loops, dangling links, FIFOs, devices, hidden files and names
that cannot be case ids are skipped and listed too (preprocess/source.py says
which and why). A build that would store nothing (an empty source, or every
input skipped) fails instead of leaving an empty store.

One build at a time per output: the whole build, from the check for an
existing store to the final rename, holds an exclusive flock on
`<out>.lock` beside the store, which records the holder's PID, host and
start time. A second build into the same output refuses at once and names
the holder. flock rather than a lock file made with O_EXCL: the kernel
drops the lock when its holder dies, even by kill -9, so a lock file left by
a dead build never blocks the next one and no PID has to be checked for
being alive (PIDs are reused and mean nothing on another host sharing the
file system). The file is removed when the build ends; a build that finds it
removed between opening and locking it locks the new one instead.

Object storage has no flock: a build to a URL holds a lock object
`<out>/build.lock` made by a conditional write (S3's If-None-Match, so one
of two racing builds wins) recording the holder and a token of this build.
A lock left by a build killed on this host is taken over (this host's flock
on the URL, held by every build of it here, says its holder is dead); one
from another host is refused with its holder named, since only that host
can tell whether it still runs (--break-lock takes it once the user knows
that build is dead). A takeover is a conditional write on the lock's ETag
(If-Match: of two takers one wins). Before every step that commits
anything to the URL (removing the old store, starting the block tasks, each
root zarr.json, meta/) the build reads the lock back: one no longer holding
its own record has been taken over, and the build stops there with one
line. At the end the lock is deleted only if it is still the version this
build wrote (a conditional delete on its ETag), so a build never removes
another's lock. (File systems without conditional writes get a read and a
comparison instead, which a writer in between can defeat.)

Errors (bad arguments, another build running, a lost lock, a bucket that
does not exist, a cluster that cannot be reached, --strict's first bad
input, nothing to store, a full disk or any other error reading or writing
a file) print one line `build_zarr: error: <path>: <problem>` and exit with
status 2; after a full disk, free space and rerun the same command: the
build resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import zarr

from common.atomic import atomic_open
from common.help_format import HelpFormatter
from engine import packing
from engine import storage as storages
from engine import store as layout
from engine.recipes import SIZE_CLASS_NAMES
from preprocess import ela as ela_module
from preprocess.cluster import ClusterError, run_tasks
from preprocess.demo_data import DEFAULT_COUNT, write_demo
from preprocess.source import (DEFAULT_MAX_PIXELS, FOLDERS, BadInput, Case, count_test_images,
                               discover, image_size, load_image, load_masks, mask_layers, shown)

REPORT = layout.REPORT
BUILD_PREFIX = "build"                         # the build's own objects, gone when it ends
SETTINGS_KEY = f"{BUILD_PREFIX}/settings.json"  # what a partial store was started with
BLOCK_RECORDS = f"{BUILD_PREFIX}/blocks"        # <block>.json: written last by each block's task
INDEX_SNAPSHOT = f"{BUILD_PREFIX}/index.npz"    # an append's new meta/ and instances/
DEMO_DIR = Path("data/demo")


class BuildError(RuntimeError):
    """A build that cannot go on (strict mode's first bad input, bad arguments,
    another build holding the output, nothing to store, a file error)."""


def os_error(exc: OSError, where: Path) -> BuildError:
    """`exc` as one line naming its file (`where` when it names none, as a
    failed write() does)."""
    path = shown(exc.filename if exc.filename is not None else where)
    if exc.errno == errno.ENOSPC:
        return BuildError(f"{path}: no space left on the device; free space there and rerun "
                          "the same command (the build resumes where it stopped)")
    return BuildError(f"{path}: {exc.strerror or exc}")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold the exclusive lock on `out` (module docstring) while the block
    runs, or raise BuildError naming the build that holds it."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise BuildError(f"{out}: another build is writing it ({holder}; lock {path}); wait "
                             "for it to finish, or stop that process and rerun") from None
        if _is_file_at(fd, path):
            break
        os.close(fd)  # its holder removed it after we opened it: lock the new one
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        # removed while still locked: whoever opened this file meanwhile
        # finds it gone from `path` after locking it, and retries
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _lock_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"PID {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet: it is just starting"


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


@dataclass(frozen=True)
class Settings:
    """Everything the stored pixels and the plan depend on; a partial build
    with other settings is started over instead of resumed. `base`: an
    append's store before it (rows, instances, blocks, build_id,
    bytes_source), None for a new store."""
    source: str
    max_pixels: int
    layout: dict   # engine.store.PixelLayout's fields
    ela_jpeg_quality: int
    ela_gain: int
    min_level_side: int
    max_levels: int
    val_fraction: float
    cases_sha256: str
    store_version: int = layout.VERSION   # chunk encoding: a partial of another version starts over
    base: dict | None = None

    def as_json(self) -> dict:
        """As build/settings.json and the root's `build` attribute hold it."""
        return json.loads(json.dumps(asdict(self)))

    def pixels(self) -> dict:
        """What every block of one store must share: an append must match it."""
        return {k: v for k, v in self.as_json().items()
                if k not in ("source", "max_pixels", "cases_sha256", "base")}

    @property
    def pixel_layout(self) -> layout.PixelLayout:
        return layout.PixelLayout(**self.layout)


def settings_for(source: Path, cases: list[Case], max_pixels: int,
                 pixel_layout: layout.PixelLayout, base: dict | None = None) -> Settings:
    listing = "\n".join(f"{c.folder}/{c.case_id}:{c.label}:{c.mask is not None}" for c in cases)
    return Settings(
        source=str(source.resolve()), max_pixels=max_pixels, layout=asdict(pixel_layout),
        ela_jpeg_quality=ela_module.JPEG_QUALITY,
        ela_gain=ela_module.GAIN, min_level_side=layout.MIN_LEVEL_SIDE,
        max_levels=layout.MAX_LEVELS, val_fraction=layout.VAL_FRACTION,
        cases_sha256=hashlib.sha256(listing.encode()).hexdigest(), base=base,
    )


@dataclass(frozen=True)
class Run:
    """How this build runs (not what it stores)."""
    workers: int | None        # local processes; None with `cluster`
    cluster: str | None        # a running Dask scheduler's address
    strict: bool
    progress: bool
    storage: storages.StorageSettings | None
    started: float


# ---------------------------------------------------------------- one image

def mask_stats(instances: np.ndarray) -> dict:
    """Union area, bbox (half-open), centroid and per-instance bbox/area."""
    union = instances.max(axis=0)
    rows, cols = union.sum(axis=1, dtype=np.int64), union.sum(axis=0, dtype=np.int64)
    area = int(rows.sum())
    return {
        "area": area,
        "bbox": _bbox(rows, cols),
        "centroid": [float(rows @ np.arange(len(rows)) / area),
                     float(cols @ np.arange(len(cols)) / area)],
        "instances": [_bbox(layer.any(axis=1), layer.any(axis=0)) + [int(layer.sum(dtype=np.int64))]
                      for layer in instances],
    }


def _bbox(rows: np.ndarray, cols: np.ndarray) -> list[int]:
    """[y0, x0, y1, x1] half-open from row/column occupancy; -1s when empty."""
    ys, xs = np.flatnonzero(rows), np.flatnonzero(cols)
    if len(ys) == 0:
        return [-1, -1, -1, -1]
    return [int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1]


def pyramid(rgb: np.ndarray, instances: np.ndarray | None):
    """(image, ELA, union mask or None) of each of an image's pyramid levels."""
    image, ela = rgb, ela_module.compute_ela(rgb)
    union = None if instances is None else instances.max(axis=0)
    for level in range(layout.level_count(*rgb.shape[:2])):
        if level:
            image, ela = layout.downsample_pixels(image), layout.downsample_pixels(ela)
            union = None if union is None else layout.downsample_mask(union)
        yield image, ela, union


def write_pixels(group: zarr.Group, key: int, rgb: np.ndarray, instances: np.ndarray | None,
                 pixel_layout: layout.PixelLayout = layout.PER_IMAGE_LAYOUT) -> None:
    """One image's pyramid levels, ELA and masks under `group` (row `key`)
    as arrays of their own: the per-image layout (format 4), which only
    benchmarks/scale.py synthesises now to compare with the packed one."""
    for level, (image, ela, union) in enumerate(pyramid(rgb, instances)):
        layout.create_pixels(group, layout.image_path(key, level), image, pixel_layout)
        layout.create_pixels(group, layout.ela_path(key, level), ela, pixel_layout)
        if union is not None:
            layout.create_pixels(group, layout.mask_path(key, level), union, pixel_layout)
    if instances is not None:
        layout.create_pixels(group, layout.instances_mask_path(key), instances, pixel_layout)


def _file_stat(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:  # removed or replaced since discovery
        raise BadInput(path, f"cannot read the file's status ({exc.strerror})") from None
    return [st.st_size, st.st_mtime_ns]


def case_key(case: Case) -> str:
    """What identifies a case across sources (an append adds those the
    store lacks): its image folder and case id."""
    return f"{case.folder}/{case.case_id}"


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class PlannedRow:
    """One case as planned from its headers: its size, its mask's layers,
    its files' (size, mtime) and where its tiles go."""
    case: Case
    height: int
    width: int
    layers: int
    image_stat: list[int]
    mask_stat: list[int] | None
    tile_start: tuple[int, ...]            # per pyramid level
    instance_tile_start: tuple[int, ...]   # per mask layer

    def described(self) -> list:
        """The row's part of its block's plan digest."""
        return [case_key(self.case), str(self.case.image), str(self.case.mask), self.image_stat,
                self.mask_stat, self.height, self.width, self.layers, list(self.tile_start),
                list(self.instance_tile_start)]


@dataclass(frozen=True)
class BlockTask:
    """One block: its rows, the digest of its plan, where to write and how."""
    block: int
    rows: tuple[PlannedRow, ...]
    plan: str
    destination: str                        # a local folder or a URL
    storage: storages.StorageSettings | None
    pixel_layout: layout.PixelLayout
    max_pixels: int


def read_headers(cases: list[Case], max_pixels: int, pixel_layout: layout.PixelLayout,
                 strict: bool) -> tuple[list[tuple], list[BadInput]]:
    """(case, height, width, layers, image stat, mask stat) of every case
    whose headers are good, and the BadInput of each other one (--strict:
    raised at the first)."""
    good, bad = [], []
    for case in cases:
        try:
            stats = _file_stat(case.image), _file_stat(case.mask)
            height, width = image_size(case.image, max_pixels)
            layers = mask_layers(case.mask, height, width) if case.label else 0
            _check_fits(case, height, width, layers, pixel_layout)
        except BadInput as exc:
            if strict:
                raise BuildError(str(exc)) from None
            bad.append(exc)
            continue
        good.append((case, height, width, layers) + stats)
    return good, bad


def _check_fits(case: Case, height: int, width: int, layers: int,
                pixel_layout: layout.PixelLayout) -> None:
    """BadInput for an image with more tiles than one block holds."""
    tiles = packing.tile_counts(height, width, 1, pixel_layout.chunk)[0]
    instance_tiles = layout.tiles_shard_tiles("instance", pixel_layout)
    if tiles > pixel_layout.shard_tiles:
        raise BadInput(case.image, f"{tiles} tiles of {pixel_layout.chunk} px, more than a "
                       f"shard's {pixel_layout.shard_tiles} (--shard-tiles, --chunk)")
    if tiles * layers > instance_tiles:
        raise BadInput(case.mask, f"{layers} layers of {tiles} tiles of {pixel_layout.chunk} "
                       f"px, more than a shard's {instance_tiles} (--shard-tiles, --chunk)")


def plan(headers: list[tuple], settings: Settings, destination: str,
         storage: storages.StorageSettings | None, first_block: int = 0) -> list[BlockTask]:
    """The block tasks of these rows, in order (engine.packing.plan_blocks),
    each with the digest of its plan: what a rerun compares its record with."""
    pixel_layout = settings.pixel_layout
    heights = np.array([h[1] for h in headers], np.int64)
    widths = np.array([h[2] for h in headers], np.int64)
    layers = np.array([h[3] for h in headers], np.int64)
    levels = np.array([layout.level_count(int(h), int(w)) for h, w in zip(heights, widths)],
                      np.int64)
    blocks = packing.plan_blocks(heights, widths, layers, levels, tile=pixel_layout.chunk,
                                 shard_tiles=pixel_layout.shard_tiles,
                                 max_levels=layout.MAX_LEVELS, first_block=first_block)
    instance_ends = np.cumsum(layers)
    rows = [PlannedRow(case, height, width, n, image_stat, mask_stat,
                       tuple(int(t) for t in blocks.tile_start[i, :levels[i]]),
                       tuple(int(t) for t in
                             blocks.instance_tile_start[instance_ends[i] - n:instance_ends[i]]))
            for i, (case, height, width, n, image_stat, mask_stat) in enumerate(headers)]
    settings_json = json.dumps(settings.as_json(), sort_keys=True)
    tasks = []
    for block in range(first_block, blocks.n_blocks):
        members = tuple(rows[i] for i in blocks.rows_of(block))
        digest = hashlib.sha256(json.dumps(
            [settings_json, block, [r.described() for r in members]]).encode()).hexdigest()
        tasks.append(BlockTask(block, members, digest, destination, storage, pixel_layout,
                               settings.max_pixels))
    return tasks


# ---------------------------------------------------------------- one block

def build_block(task: BlockTask) -> dict:
    """Worker: decode the block's rows, write its shards and then its
    record (module docstring); returns the record."""
    pixel_layout = task.pixel_layout
    chunks: dict[tuple[str, int], dict[int, bytes]] = {}
    rows = []
    for row in task.rows:
        try:
            rgb, instances = _decoded(row, task.max_pixels)
        except BadInput as exc:
            rows.append({"case": case_key(row.case), "skipped": exc.problem, "file": exc.path})
            continue
        levels = list(pyramid(rgb, instances))
        encode_tiles(row, levels, instances, task.block, pixel_layout, chunks)
        record = {"case": case_key(row.case), "image": str(row.case.image),
                  "height": row.height, "width": row.width,
                  "bytes_source": row.image_stat[0] + (row.mask_stat or [0])[0],
                  "digest": layout.content_digest(levels, instances).hex()}
        if instances is not None:
            record.update(mask_stats(instances))
        rows.append(record)
    target = storages.open_storage(task.destination, read_only=False, storage=task.storage)
    try:
        write_shards(target, task.block, chunks, pixel_layout)
        del chunks
        record = {"block": task.block, "plan": task.plan, "rows": rows}
        put(target, block_record_key(task.block), json.dumps(record, indent=1).encode())
    except OSError as exc:  # reading the sources is BadInput: this is the store's side
        raise os_error(exc, Path(str(target.where()))) from None
    return record


def _decoded(row: PlannedRow, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The row's pixels and mask layers, checked against its plan."""
    rgb = load_image(row.case.image, max_pixels)
    if rgb.shape[:2] != (row.height, row.width):
        raise BadInput(row.case.image, f"changed during the build (now {rgb.shape[1]} x "
                       f"{rgb.shape[0]}, planned {row.width} x {row.height}); rerun")
    if not row.case.label:
        return rgb, None
    instances = load_masks(row.case.mask, row.height, row.width)
    if len(instances) != row.layers:
        raise BadInput(row.case.mask, f"changed during the build (now {len(instances)} "
                       f"layers, planned {row.layers}); rerun")
    return rgb, instances


def write_shards(target, block: int, chunks: dict, pixel_layout: layout.PixelLayout) -> None:
    """Block `block`'s shard object of each tiles array in `chunks` ((kind,
    level) -> shard position -> encoded tile, as encode_tiles fills it)."""
    for (kind, level), found in sorted(chunks.items()):
        target.write(layout.tiles_shard_key(kind, level, block),
                     packing.shard_bytes(found, layout.tiles_shard_tiles(kind, pixel_layout),
                                         layout.checksum_bytes))


def encode_tiles(row: PlannedRow, levels: list, instances: np.ndarray | None, block: int,
                 pixel_layout: layout.PixelLayout, chunks: dict) -> None:
    """Add the row's encoded tiles to `chunks` ((kind, level) -> shard
    position -> bytes): of its pyramid `levels` (pyramid's (image, ELA,
    union mask) per level) and instance layers; image and ELA tiles all,
    mask and instance tiles only where not all 0."""
    tile = pixel_layout.chunk

    def add(kind: str, level: int, pixels: np.ndarray, start: int, every: bool) -> None:
        found = chunks.setdefault((kind, level), {})
        first = start - block * layout.tiles_shard_tiles(kind, pixel_layout)
        for number, piece in packing.tile_pieces(pixels, tile):
            if every or piece.any():
                found[first + number] = pixel_layout.encode(packing.padded_tile(piece, tile))

    for level, (image, ela, union) in enumerate(levels):
        start = row.tile_start[level]
        add("image", level, image, start, True)
        add("ela", level, ela, start, True)
        if union is not None:
            add("mask", level, union, start, False)
    for layer, start in zip(() if instances is None else instances, row.instance_tile_start):
        add("instance", 0, layer, start, False)


def block_record_key(block: int) -> str:
    return f"{BLOCK_RECORDS}/{block}.json"


def put(target, key: str, data: bytes) -> None:
    """Write one object whole: a local file atomically (written aside and
    renamed), an object by its one PUT."""
    if isinstance(target, storages.LocalStorage):
        with atomic_open(target.where(key), "wb") as file:
            file.write(data)
    else:
        target.write(key, data)


def reusable_record(target, task: BlockTask, present: set[str]) -> dict | None:
    """The block's record when it is there (among the keys `present`) and
    of the same plan."""
    if block_record_key(task.block) not in present:
        return None
    found = target.read(block_record_key(task.block))
    if found is None:
        return None
    try:
        record = json.loads(found)
    except ValueError:   # cannot be (written whole), but then the block is simply redone
        return None
    return record if record.get("plan") == task.plan else None


def run_blocks(target, tasks: list[BlockTask], run: Run, check) -> dict[int, dict]:
    """Every block's record: reused where its record matches its plan, else
    made by the tasks on the cluster. --strict stops at the first row skipped."""
    present = set(target.keys(BLOCK_RECORDS))   # one listing: no request per block not done
    records = {t.block: r for t in tasks if (r := reusable_record(target, t, present)) is not None}
    todo = [t for t in tasks if t.block not in records]
    if records:
        print(f"resuming: {len(records)} of {len(tasks)} blocks done already")
    if todo:
        check("writing the blocks")
        # no more processes than blocks: a store of one block (a few
        # thousand tiles) is built in this process, without a cluster's start-up
        workers = None if run.cluster is not None else min(run.workers, len(todo))
        done = run_tasks(build_block, todo, workers=workers, cluster=run.cluster,
                         progress=run.progress, desc="blocks")
        try:
            for record in done:
                skipped = [r for r in record["rows"] if "skipped" in r]
                if run.strict and skipped:
                    raise BuildError(f"{skipped[0]['file']}: {skipped[0]['skipped']}")
                records[record["block"]] = record
                # lost, the tasks still queued are cancelled (those running finish)
                check(f"writing the blocks after block {record['block']}")
        finally:
            done.close()   # stops the cluster, on an error too
    return records


# ---------------------------------------------------------------- the store

def meta_arrays(rows: list[tuple[PlannedRow, dict]], val_fraction: float) -> tuple[dict, dict]:
    """meta/ and instances/ arrays of the stored rows (docs/store.md schema),
    numbered from 0, from their plan and their blocks' records."""
    n = len(rows)
    cases = [planned.case for planned, _ in rows]
    records = [record for _, record in rows]
    label = np.array([c.label for c in cases], np.uint8)
    height = np.array([r["height"] for r in records], np.int32)
    width = np.array([r["width"] for r in records], np.int32)
    n_inst = np.array([len(r.get("instances", ())) for r in records], np.int16)
    area = np.array([r.get("area", 0) for r in records], np.float64)
    area_ratio = (area / (height.astype(np.float64) * width)).astype(np.float32)
    size_class = np.where(label == 1, layout.size_class(area_ratio), 0).astype(np.int8)
    case_id = np.array([c.case_id for c in cases], dtype=np.dtypes.StringDType())
    tile_start = np.full((n, layout.MAX_LEVELS), -1, np.int64)
    for i, (planned, _) in enumerate(rows):
        tile_start[i, :len(planned.tile_start)] = planned.tile_start
    meta = {
        "case_id": case_id,
        "label": label,
        "height": height,
        "width": width,
        "n_instances": n_inst,
        "area_ratio": area_ratio,
        "bbox": np.array([r.get("bbox", [-1] * 4) for r in records], np.int32).reshape(n, 4),
        "centroid": np.array([r.get("centroid", [-1.0] * 2) for r in records],
                             np.float32).reshape(n, 2),
        "size_class": size_class,
        "split": layout.split_of(case_id, val_fraction),
        "instance_start": np.concatenate([[0], np.cumsum(n_inst, dtype=np.int64)]),
        "tile_start": tile_start,
        "digest": np.array([np.frombuffer(bytes.fromhex(r["digest"]), np.uint8) for r in records],
                           np.uint8).reshape(n, 32),
    }
    boxes = [i for r in records for i in r.get("instances", ())]
    instances = {
        "image_row": np.repeat(np.arange(n, dtype=np.int32), n_inst),
        "bbox": np.array([b[:4] for b in boxes], np.int32).reshape(-1, 4),
        "area": np.array([b[4] for b in boxes], np.int64),
        "tile_start": np.array([t for planned, _ in rows for t in planned.instance_tile_start],
                               np.int64),
    }
    return meta, instances


def appended(old: tuple[dict, dict], new: tuple[dict, dict]) -> tuple[dict, dict]:
    """meta/ and instances/ of the old rows followed by the new ones."""
    (old_meta, old_instances), (meta, instances) = old, new
    rows, regions = len(old_meta["label"]), len(old_instances["area"])
    meta = {name: np.concatenate([old_meta[name], data]) for name, data in meta.items()
            if name != "instance_start"} | {
        "instance_start": np.concatenate([old_meta["instance_start"],
                                          meta["instance_start"][1:] + regions])}
    instances = {name: np.concatenate([old_instances[name], data])
                 for name, data in instances.items() if name != "image_row"} | {
        "image_row": np.concatenate([old_instances["image_row"],
                                     instances["image_row"] + rows]).astype(np.int32)}
    return meta, instances


def fingerprint(meta: dict, instances: dict) -> str:
    """sha256 over the meta/ and instances/ arrays (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for prefix, arrays in (("meta", meta), ("instances", instances)):
        for name in sorted(arrays):
            arr = arrays[name]
            digest.update(f"{prefix}/{name}:{arr.dtype.str}:{arr.shape}".encode())
            if arr.dtype.kind == "T":
                digest.update("\0".join(arr.tolist()).encode())
            else:
                digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def _group(target) -> zarr.Group:
    """The store's root group, for writing meta/ and instances/."""
    if isinstance(target, storages.LocalStorage):
        return zarr.open_group(str(target.root), mode="r+")
    return zarr.open_group(target.store, mode="r+")


def write_root(target, attributes: dict) -> None:
    put(target, "zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                         "attributes": attributes}).encode())


def root_attributes(target) -> dict | None:
    """The root zarr.json's attributes, None when there is no root."""
    found = target.read("zarr.json")
    return None if found is None else json.loads(found).get("attributes", {})


def old_rows(target) -> tuple[dict, dict]:
    """meta/ and instances/ of an append's store as they are before it."""
    group = _group(target)
    return ({name: layout.read_table(group, f"meta/{name}") for name in layout.META_SCHEMA},
            {name: layout.read_table(group, f"instances/{name}") for name in layout.INSTANCE_ARRAYS})


def index_snapshot(meta: dict, instances: dict) -> bytes:
    """An append's new meta/ and instances/ as one object (INDEX_SNAPSHOT),
    written whole before meta/ is touched: a killed append resumes from it,
    whatever state its half-rewritten tables are in."""
    arrays = {f"meta/{k}": v for k, v in meta.items()} | \
        {f"instances/{k}": v for k, v in instances.items()}
    buffer = io.BytesIO()
    # variable-length strings as fixed-width ones: npz holds them without pickles
    np.savez(buffer, **{k: np.array(v.tolist(), str) if v.dtype.kind == "T" else v
                        for k, v in arrays.items()})
    return buffer.getvalue()


def from_index_snapshot(data: bytes) -> tuple[dict, dict]:
    with np.load(io.BytesIO(data), allow_pickle=False) as found:
        arrays = {k: found[k].astype(np.dtypes.StringDType()) if found[k].dtype.kind == "U"
                  else found[k] for k in found.files}
    return ({k[len("meta/"):]: v for k, v in arrays.items() if k.startswith("meta/")},
            {k[len("instances/"):]: v for k, v in arrays.items() if k.startswith("instances/")})


def finalize(target, settings: Settings, tasks: list[BlockTask], records: dict[int, dict],
             report: dict, check) -> None:
    """meta/, instances/, the tiles arrays' metadata, the report and the
    root with its completion attributes last; each step can be repeated
    after a kill. An append (settings.base) keeps the old rows first and
    the store's build_id."""
    base = settings.base
    stored = [(planned, row) for task in tasks
              for planned, row in zip(task.rows, records[task.block]["rows"]) if "skipped" not in row]
    meta, instances = meta_arrays(stored, settings.val_fraction)
    attributes = root_attributes(target)
    if base is not None:
        snapshot = target.read(INDEX_SNAPSHOT)
        if snapshot is None:   # the tables are still the store's own
            meta, instances = appended(old_rows(target), (meta, instances))
            check("writing the new index")
            put(target, INDEX_SNAPSHOT, index_snapshot(meta, instances))
        else:
            meta, instances = from_index_snapshot(snapshot)
    check("writing meta/ and instances/")
    # an append's readers see the old store until here; unfinished now
    # (readers refuse it) while its index is rewritten
    write_root(target, {k: v for k, v in attributes.items() if k not in layout.COMPLETION}
               | {"build": settings.as_json()})
    group = _group(target)
    for name, data in meta.items():
        layout.create_table(group, f"meta/{name}", data)
    for name, data in instances.items():
        layout.create_table(group, f"instances/{name}", data)
    pixel_layout = settings.pixel_layout
    n_blocks = tasks[-1].block + 1 if tasks else base["blocks"]
    levels = int((meta["tile_start"] >= 0).sum(axis=1).max())
    for key, data in layout.tiles_groups_json().items():
        put(target, key, data)
    for kind in packing.KINDS:
        for level in range(levels if kind in packing.LEVELED_KINDS else 1):
            put(target, f"{layout.tiles_path(kind, level)}/zarr.json",
                layout.tiles_array_json(kind, pixel_layout, n_blocks))
    report["rows"] = report.get("rows", []) + [planned.case.image.as_posix() for planned, _ in stored]
    report["row_cases"] = report.get("row_cases", []) + [case_key(p.case) for p, _ in stored]
    report["bytes_source"] = report.get("bytes_source", 0) + sum(r["bytes_source"] for _, r in stored)
    put(target, REPORT, json.dumps(report, indent=1).encode())
    check("writing the complete root zarr.json")
    write_root(target, {
        "format": layout.FORMAT, "version": layout.VERSION,
        "fingerprint": fingerprint(meta, instances), "layout": asdict(pixel_layout),
        # new at every build, even of the same inputs: what the read cache
        # keys a store's bytes by (engine/store.py build_id); an append
        # keeps it, every existing object's bytes being unchanged
        layout.BUILD_ID: base["build_id"] if base is not None else uuid.uuid4().hex,
        "levels": {"min_side": layout.MIN_LEVEL_SIDE, "max": layout.MAX_LEVELS},
        "build": settings.as_json(),
    })


def finish(partial: Path, out: Path) -> None:
    """Drop the build's records and put the store in place."""
    shutil.rmtree(partial / BUILD_PREFIX, ignore_errors=True)
    os.rename(partial, out)


# ---------------------------------------------------------------- the build

def build_store(source: Path, out: Path | str, *, workers: int | None = None,
                cluster: str | None = None, strict: bool = False, overwrite: bool = False,
                append: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                progress: bool = True, figure: bool = True,
                pixel_layout: layout.PixelLayout = layout.DEFAULT_LAYOUT, break_lock: bool = False,
                storage: storages.StorageSettings | None = None) -> dict | None:
    """Build `out` (a path, or a URL written in place) from `source`;
    returns the build report, or None when a complete store already exists
    there (and neither overwrite nor append is asked) or an append finds
    nothing new. Holds the output's lock throughout (module docstring);
    `break_lock` takes a URL's lock from a build on another host known to
    be dead. `workers`: local processes (default: all cores), or `cluster`:
    a running Dask scheduler's address. `pixel_layout`: how tiles are
    chunked, encoded and packed (an append keeps the store's); `storage`:
    how a URL is reached (fsspec options)."""
    if not pixel_layout.packed:
        raise BuildError(f"{out}: the builder writes the packed layout (store version "
                         f"{layout.VERSION}) only; PixelLayout(packed=False) is what benchmarks "
                         "synthesise to compare with it")
    if overwrite and append:
        raise BuildError(f"{out}: --overwrite and --append exclude each other")
    if cluster is None:
        workers = workers or os.cpu_count() or 1
    elif workers is not None:
        raise BuildError(f"{cluster}: --workers and --cluster exclude each other (the cluster's "
                         "own workers do the work)")
    run = Run(workers, cluster, strict, progress, storage, time.perf_counter())
    # absolute: the tasks may run in processes with another working folder
    # (a cluster's workers on other machines mount the same paths)
    source = Path(source).absolute()
    try:
        if storages.is_url(out):
            report = build_to_url(source, out, run, overwrite=overwrite, append=append,
                                  max_pixels=max_pixels, pixel_layout=pixel_layout,
                                  break_lock=break_lock)
        else:
            report = _build_local(source, Path(storages.location(str(out))).absolute(), run,
                                  overwrite=overwrite, append=append, max_pixels=max_pixels,
                                  pixel_layout=pixel_layout)
    except ClusterError as exc:
        raise BuildError(str(exc)) from None
    if report is not None:
        _summarise(out, report, run, figure)
    return report


def _build_local(source: Path, out: Path, run: Run, *, overwrite: bool, append: bool,
                 max_pixels: int, pixel_layout: layout.PixelLayout) -> dict | None:
    if out.parent.exists() and not out.parent.is_dir():
        raise BuildError(f"{out.parent}: not a folder, so {out.name} cannot be made in it")
    partial = layout.partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            if out.exists():
                if append and (out / "zarr.json").exists():
                    target = storages.LocalStorage(out)
                    report = append_cases(source, out, target, run, max_pixels=max_pixels)
                    target.remove(BUILD_PREFIX)
                    return report
                if not (append or overwrite) and _unfinished_append(storages.LocalStorage(out)):
                    raise unfinished_append(out)
                if not overwrite:
                    layout.open_store(out)  # raises StoreError when it is not a store
                    return _complete_already(out, storages.LocalStorage(out))
                if not (out / "zarr.json").exists():
                    raise BuildError(f"{out}: exists and is not a Zarr store; refusing to replace it")
            target = storages.LocalStorage(partial)
            report = new_store(source, str(partial), target, run, max_pixels=max_pixels,
                               pixel_layout=pixel_layout, discard=lambda: shutil.rmtree(partial))
            if out.exists():
                shutil.rmtree(out)  # only reached with --overwrite, checked above
            finish(partial, out)
            return report
    except OSError as exc:  # the sources' are BadInput: this names the store's side
        raise os_error(exc, partial) from None


def _complete_already(where, target) -> None:
    """Say the store is complete already, dropping what a build killed
    between its complete root and the removal of its records left."""
    target.remove(BUILD_PREFIX)
    print(f"{where}: a complete store exists already; nothing to do "
          "(--overwrite rebuilds it, --append adds new cases)")
    return None


def new_store(source: Path, destination: str, target, run: Run, *, max_pixels: int,
              pixel_layout: layout.PixelLayout, discard, check=lambda step: None) -> dict:
    """Build a new store into `target` (a partial folder, or a URL in
    place), resuming what a killed build of the same settings left there;
    `discard` removes it all when nothing can be stored."""
    cases, problems = discover(source)
    if run.strict and problems:
        raise BuildError(str(problems[0]))
    settings = settings_for(source, cases, max_pixels, pixel_layout)
    started = _start(target, destination, settings, check)
    if started == "finalized":
        return json.loads(target.read(REPORT))
    headers, bad = read_headers(cases, max_pixels, pixel_layout, run.strict)
    tasks = plan(headers, settings, destination, run.storage)
    records = run_blocks(target, tasks, run, check)
    skipped = _skipped(problems + bad, tasks, records)
    if not any("skipped" not in row for r in records.values() for row in r["rows"]):
        discard()
        raise nothing_stored(source, skipped)
    report = {"source": str(source), "skipped": skipped,
              "test_images_not_stored": count_test_images(source)}
    finalize(target, settings, tasks, records, report, check)
    return report


def _skipped(problems: list[BadInput], tasks: list[BlockTask], records: dict[int, dict]) -> list:
    return [{"file": p.path, "problem": p.problem} for p in problems] + \
           [{"file": row["file"], "problem": row["skipped"]}
            for t in tasks for row in records[t.block]["rows"] if "skipped" in row]


def _start(target, destination: str, settings: Settings, check) -> str:
    """Resume the partial store in `target` when its settings match ("resume",
    or "finalized" when only its rename or clean-up is missing), else start it
    over: an unfinished root (readers refuse the store) and build/settings.json."""
    found = target.read(SETTINGS_KEY)
    if found is not None and json.loads(found) == settings.as_json():
        attributes = root_attributes(target) or {}
        if not layout.unfinished(attributes) and "fingerprint" in attributes:
            return "finalized"
        print(f"resuming the interrupted build in {destination}")
        return "resume"
    # a local partial folder without them: killed while it was being started
    if found is not None or root_attributes(target) is not None or (
            isinstance(target, storages.LocalStorage) and target.root.exists()):
        print(f"{destination}: left by a build with other inputs or settings; starting over")
        check("removing it")
        _wipe(target)
    check("starting the store")
    write_root(target, {"build": settings.as_json()})
    put(target, SETTINGS_KEY, json.dumps(settings.as_json()).encode())
    return "new"


def append_cases(source: Path, destination: str | Path, target, run: Run, *,
                 max_pixels: int, check=lambda step: None) -> dict | None:
    """Add the cases of `source` that the store at `target` lacks (module
    docstring, "Append"); resumes an append killed with the same source."""
    attributes = root_attributes(target) or {}
    saved = target.read(SETTINGS_KEY)
    saved = None if saved is None else json.loads(saved)
    pixel_layout = layout.PixelLayout(**attributes.get("layout", {}))
    if layout.unfinished(attributes):
        if saved is None or saved.get("base") is None:
            raise BuildError(f"{destination}: not a complete store (its build did not finish); "
                             "rerun the command that built it")
        base = saved["base"]
    else:
        layout.open_store(destination, storage=run.storage)   # refuses another version
        base = _base(target, attributes, pixel_layout)
    cases, problems = discover(source)
    if run.strict and problems:
        raise BuildError(str(problems[0]))
    old_report = json.loads(target.read(REPORT))
    have = set(old_report["row_cases"][:base["rows"]])
    new = [c for c in cases if case_key(c) not in have]
    settings = settings_for(source, new, max_pixels, pixel_layout, base)
    recorded = attributes.get("build") or {}
    if {k: recorded.get(k) for k in settings.pixels()} != settings.pixels():
        raise BuildError(f"{destination}: built with other pixel settings than this engine's "
                         f"({attributes.get('build')}); rebuild it with "
                         f"`{layout.rebuild_command(destination)}`")
    if saved is not None and saved != settings.as_json():
        if layout.unfinished(attributes):
            raise BuildError(f"{destination}: an append of {saved.get('source')} did not finish; "
                             "rerun that command to finish it first")
        print(f"{destination}: dropping the work of an unfinished append of other inputs")
        check("removing it")
        _drop_blocks(target, base["blocks"], pixel_layout)
        saved = None
    if not new and saved is None:
        print(f"{destination}: nothing new to append: every case of {source} is in the store "
              f"({len(problems)} files skipped)")
        return None
    if saved is None:
        put(target, SETTINGS_KEY, json.dumps(settings.as_json()).encode())
    else:
        print(f"resuming the interrupted append to {destination}")
    headers, bad = read_headers(new, max_pixels, pixel_layout, run.strict)
    tasks = plan(headers, settings, str(destination), run.storage, first_block=base["blocks"])
    records = run_blocks(target, tasks, run, check)
    skipped = _skipped(problems + bad, tasks, records)
    if not any("skipped" not in row for r in records.values() for row in r["rows"]):
        _drop_blocks(target, base["blocks"], pixel_layout)
        print(f"{destination}: nothing new stored: all {len(skipped)} new input files were "
              "skipped; the store is unchanged")
        for item in skipped:
            print(f"  {item['file']}: {item['problem']}")
        return None
    report = {"source": str(source), "skipped": skipped,
              "test_images_not_stored": count_test_images(source),
              "rows": old_report["rows"][:base["rows"]],
              "row_cases": old_report["row_cases"][:base["rows"]],
              "bytes_source": base["bytes_source"]}
    finalize(target, settings, tasks, records, report, check)
    return report


def _base(target, attributes: dict, pixel_layout: layout.PixelLayout) -> dict:
    """What an append builds on: the complete store's rows, instances,
    blocks (from tiles/image/0's shape), build id and source bytes."""
    group = _group(target)
    image_tiles = json.loads(target.read(f"{layout.tiles_path('image', 0)}/zarr.json"))
    report = json.loads(target.read(REPORT))
    return {"rows": int(group["meta/label"].shape[0]),
            "instances": int(group["instances/area"].shape[0]),
            "blocks": image_tiles["shape"][0] // pixel_layout.shard_tiles,
            "build_id": attributes[layout.BUILD_ID], "bytes_source": report["bytes_source"]}


def _drop_blocks(target, first_block: int, pixel_layout: layout.PixelLayout) -> None:
    """The build records and every shard of block `first_block` on: what an
    append that stored nothing, or was abandoned, wrote."""
    target.remove(BUILD_PREFIX)
    for kind in packing.KINDS:
        for level in range(layout.MAX_LEVELS if kind in packing.LEVELED_KINDS else 1):
            prefix = layout.tiles_path(kind, level)
            for key in target.keys(prefix):
                index = key[len(prefix) + 1:]
                if index.startswith("c.") and int(index.split(".")[1]) >= first_block:
                    _delete(target, key)


def _delete(target, key: str) -> None:
    if isinstance(target, storages.LocalStorage):
        target.where(key).unlink(missing_ok=True)
    else:
        target.delete([key])


def _summarise(out, report: dict, run: Run, figure: bool) -> None:
    """The report's sizes and times, then the summary (and its figure, for a local store)."""
    target = storages.open_storage(out, read_only=False, storage=run.storage)
    report["bytes_store"] = (_tree_bytes(target.root) if isinstance(target, storages.LocalStorage)
                             else sum(target.sizes("").values()))
    report["seconds"] = round(time.perf_counter() - run.started, 2)
    report["workers"] = run.workers if run.cluster is None else run.cluster
    put(target, REPORT, json.dumps(report, indent=1).encode())
    group = layout.open_store(out, storage=run.storage)
    print_summary(layout.read_meta(group), report)
    if figure and not storages.is_url(out):
        from preprocess.figures import write_summary_figure  # matplotlib: only when drawing
        png = summary_figure_path(Path(out))
        write_summary_figure(group, png)
        print(f"summary figure: {png}")


# ---------------------------------------------------------------- a store at a URL

REMOTE_LOCK = layout.BUILD_LOCK   # the lock object, inside the store's prefix


def build_to_url(source: Path, url: str, run: Run, *, overwrite: bool, append: bool,
                 max_pixels: int, pixel_layout: layout.PixelLayout,
                 break_lock: bool) -> dict | None:
    """Build (or append to) the store at `url` in place (module docstring);
    holds the URL's lock throughout."""
    try:
        target = storages.open_storage(url, read_only=False, storage=run.storage)
        with remote_lock(url, target, break_lock) as lock:
            attributes = root_attributes(target)
            complete = attributes is not None and not layout.unfinished(attributes)
            if not (append or overwrite) and _unfinished_append(target):
                raise unfinished_append(url)   # not wiped unasked: it holds a store
            if append and (complete or _unfinished_append(target)):
                report = append_cases(source, url, target, run, max_pixels=max_pixels,
                                      check=lock.check)
            elif complete and not overwrite:
                layout.open_store(url, storage=run.storage)   # refuses a store of another version, naming the rebuild
                return _complete_already(url, target)
            else:
                if complete:
                    lock.check("removing the store there")
                    _wipe(target)
                report = new_store(source, url, target, run, max_pixels=max_pixels,
                                   pixel_layout=pixel_layout, check=lock.check,
                                   discard=lambda: _wipe(target))
            if report is not None:
                lock.check("removing the build records")
                target.remove(BUILD_PREFIX)
            return report
    except (BuildError, layout.StoreError, BadInput, ClusterError):
        raise
    except Exception as exc:
        problem = storages.explained(url, exc)
        if problem is None:
            raise
        raise BuildError(str(problem)) from None


def unfinished_append(where) -> BuildError:
    return BuildError(f"{where}: an append to this store did not finish; rerun that "
                      "build_zarr.py --append command to finish it (--overwrite builds a new "
                      "store instead)")


def _unfinished_append(target) -> bool:
    """Whether the store at `target` is an append's killed while finalizing
    (an unfinished root, and settings that record the store it extends)."""
    attributes = root_attributes(target)
    if attributes is None or not layout.unfinished(attributes):
        return False
    found = target.read(SETTINGS_KEY)
    return found is not None and json.loads(found).get("base") is not None


def _wipe(target) -> None:
    """Everything but the lock, the root zarr.json first (so a reader never
    sees a complete root over a half-deleted store)."""
    if isinstance(target, storages.LocalStorage):
        target.remove("")
        return
    target.delete([k for k in ("zarr.json",) if target.exists(k)])
    target.delete([k for k in target.keys("") if k != REMOTE_LOCK])


@contextlib.contextmanager
def remote_lock(url: str, target, break_lock: bool = False):
    """Hold `url`'s lock object (module docstring) while the block runs,
    yielding its RemoteLock, or raise BuildError naming the build that
    holds it; `break_lock` takes it from a build on another host (which
    only a user can know is dead)."""
    here = Path(tempfile.gettempdir()) / f"forgery-build-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    with output_lock(here):   # every build of `url` on this host: dropped when it dies
        lock = RemoteLock(url, target)
        lock.acquire(break_lock)
        try:
            yield lock
        finally:
            lock.release()


def _holder_named(record: dict) -> str:
    return (f"PID {record.get('pid')} on host {record.get('host')}, "
            f"started {record.get('started')}")


class RemoteLock:
    """This build's hold on the lock object of a store at a URL: a record
    of its holder with a token of this build, and the tag (S3's ETag) of
    the version this build wrote. Another build can take the lock over
    (--break-lock, believing this one dead): check() before every step that
    commits anything stops this build then, and release() deletes only the
    version this build wrote (a conditional delete), never another's."""

    def __init__(self, url: str, target):
        self.url, self.target, self.tag = url, target, None
        self.record = json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex}).encode()

    def acquire(self, break_lock: bool) -> None:
        while not self.target.create(REMOTE_LOCK, self.record):
            found = self.target.read_tagged(REMOTE_LOCK)
            if found is None:   # released since: create it again
                continue
            held = json.loads(found[0] or b"{}")
            elsewhere = held.get("host") != socket.gethostname()
            if elsewhere and not break_lock:
                raise BuildError(
                    f"{self.url}: another build is writing it ({_holder_named(held)}; lock "
                    f"{self.url}/{REMOTE_LOCK}); wait for it to finish, or if that build is dead, "
                    "rerun with --break-lock")
            print(f"{self.url}: taking over the lock of a build "
                  f"{'on host ' + str(held.get('host')) if elsewhere else 'killed on this host'} "
                  f"(PID {held.get('pid')}, started {held.get('started')})")
            if self.target.replace_tagged(REMOTE_LOCK, self.record, found[1]) is None:
                raise BuildError(f"{self.url}: another build took over the lock "
                                 f"{self.url}/{REMOTE_LOCK} at the same time; rerun to see whose it is")
            break
        self.tag = self._ours("taking the lock")

    def _ours(self, step: str) -> str:
        """The tag of the lock's version, or BuildError when it is no longer this build's."""
        found = self.target.read_tagged(REMOTE_LOCK)
        if found is None or found[0] != self.record:
            self.tag = None   # not ours: release() leaves it alone
            taker = "removed it" if found is None else \
                f"holds it now ({_holder_named(json.loads(found[0] or b'{}'))})"
            raise BuildError(f"{self.url}: this build lost its lock {self.url}/{REMOTE_LOCK} "
                             f"(another build {taker}, e.g. with --break-lock) and stopped before "
                             f"{step}; that build owns the store now")
        return found[1]

    def check(self, step: str) -> None:
        """Raise BuildError unless this build still holds the lock (`step`:
        what it was about to do, for the message)."""
        self._ours(step)

    def release(self) -> None:
        if self.tag is not None:
            self.target.delete_tagged(REMOTE_LOCK, self.tag)
            self.tag = None


def nothing_stored(source: Path, skipped: list[dict]) -> BuildError:
    if not skipped:
        folders = ", ".join(folder for folder, _, _ in FOLDERS)
        return BuildError(f"{source}: no <case>.png files in {folders}; nothing to store")
    first = skipped[0]
    return BuildError(f"{source}: nothing to store: all {len(skipped)} input files were skipped "
                      f"(the first: {first['file']}: {first['problem']}); fix or replace them")


def summary_figure_path(out: Path) -> Path:
    return out.with_name(out.stem + "_summary.png")


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def print_summary(meta: dict, report: dict) -> None:
    """Images by label and size class, size range, bytes, time, skipped files."""
    label, size_class = meta["label"], meta["size_class"]
    print(f"\n{'size class':<12}{'authentic':>10}{'forged':>8}{'val':>6}")
    for k, name in enumerate(SIZE_CLASS_NAMES):
        sel = size_class == k
        print(f"{name:<12}{int((sel & (label == 0)).sum()):>10}{int((sel & (label == 1)).sum()):>8}"
              f"{int((sel & (meta['split'] == 1)).sum()):>6}")
    print(f"{'total':<12}{int((label == 0).sum()):>10}{int((label == 1).sum()):>8}"
          f"{int((meta['split'] == 1).sum()):>6}")
    if len(label):
        print(f"height {meta['height'].min()}-{meta['height'].max()} px, "
              f"width {meta['width'].min()}-{meta['width'].max()} px")
    print(f"bytes: source {report['bytes_source'] / 1e6:.1f} MB -> store "
          f"{report['bytes_store'] / 1e6:.1f} MB; {report['seconds']:.1f} s "
          + (f"with {report['workers']} workers" if isinstance(report["workers"], int)
             else f"on the cluster at {report['workers']}"))
    if report["test_images_not_stored"]:
        print(f"test_images/: {report['test_images_not_stored']} images not stored "
              "(label unknown; predict.py reads them)")
    print(f"skipped {len(report['skipped'])} files")
    for item in report["skipped"]:
        print(f"  {item['file']}: {item['problem']}")


def ensure_demo(folder: Path, count: int, seed: int, progress: bool = True) -> None:
    """Write the demo folder unless it exists (written to a temporary
    folder and renamed, so a killed run leaves no half folder)."""
    tmp = folder.with_name(folder.name + ".partial")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(folder):  # a second build would delete this one's tmp
            if folder.exists():
                print(f"using the demo folder {folder} (delete it to regenerate)")
                return
            shutil.rmtree(tmp, ignore_errors=True)
            write_demo(tmp, count=count, seed=seed, progress=progress)
            os.rename(tmp, folder)
    except OSError as exc:
        raise os_error(exc, tmp) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Build the forgery store (Zarr v3) from a Kaggle-layout folder,\n"
                    "or from the built-in demo data when --source is not given.",
        epilog="Row order: by folder, then case id (an append's new rows after the old).\n"
               "Exit status 0 on success, when a complete store exists or when an append\n"
               "finds nothing new; 2 with a one-line message when the build cannot be\n"
               "done (another build holds STORE.lock, nothing to store, --strict's first\n"
               "bad input, a full disk...). Skipped files are listed in the summary and in\n"
               "STORE/build_report.json. Rerunning a killed build resumes it.")
    parser.add_argument("--source", type=Path, help="Kaggle-layout folder (default: demo data)")
    parser.add_argument("--out", type=storages.location, default=layout.DEFAULT_STORE,
                        help="store path, or URL (s3://bucket/store.zarr, any fsspec URL)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes of the local Dask cluster (default: all cores; 1 runs "
                             "in this process)")
    parser.add_argument("--cluster", metavar="ADDRESS", default=None,
                        help="a running Dask scheduler (tcp://host:8786) whose workers build "
                             "the blocks, instead of a local cluster; they must reach --source "
                             "and --out at the same paths")
    parser.add_argument("--append", action="store_true",
                        help="add the cases of --source that the store lacks (by folder and "
                             "case id) as new rows, without rewriting its shards")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing store")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"skip images with more pixels (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--demo-dir", type=Path, default=DEMO_DIR, help="where demo data goes")
    parser.add_argument("--demo-count", type=int, default=DEFAULT_COUNT, help="demo images")
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--no-figure", action="store_true", help="skip the summary PNG")
    default = layout.DEFAULT_LAYOUT
    parser.add_argument("--chunk", type=int, default=None,
                        help=f"tile side in pixels (default {default.chunk}; docs/store.md, and "
                             "docs/performance.md for what each layout costs)")
    parser.add_argument("--codec", choices=layout.CODECS, default=None,
                        help=f"tile compression (default {default.codec}): LZ4 or LZ4HC "
                             "(Blosc), zstd, or none (raw: the fastest reads for several "
                             "times the disk)")
    parser.add_argument("--codec-level", type=int, default=None,
                        help=f"compression level of --codec (default {default.level})")
    parser.add_argument("--shard-tiles", type=int, default=None,
                        help=f"tiles per shard object, per array (default {default.shard_tiles}); "
                             "an image has at most this many tiles a level")
    parser.add_argument("--break-lock", action="store_true",
                        help="with a URL --out: take the lock left by a build on another host "
                             "that is known to be dead (a local build's lock is dropped by the "
                             "kernel when its build dies)")
    storages.add_arguments(parser, cache=False)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers is not None and args.cluster is not None:
        parser.error("--workers and --cluster exclude each other (the cluster's own workers "
                     "do the work)")
    if args.break_lock and not storages.is_url(args.out):
        parser.error("--break-lock: only for a URL --out (a local build's lock is dropped by the "
                     "kernel when its build dies)")
    chosen = {"chunk": args.chunk, "codec": args.codec, "level": args.codec_level,
              "shard_tiles": args.shard_tiles}
    if args.append and any(v is not None for v in chosen.values()):
        parser.error("--append keeps the store's layout: no --chunk, --codec, --codec-level "
                     "or --shard-tiles")
    if args.append and args.overwrite:
        parser.error("--append and --overwrite exclude each other")
    try:
        pixel_layout = replace(default, **{k: v for k, v in chosen.items() if v is not None})
    except ValueError as exc:
        parser.error(str(exc))
    try:
        source = args.source
        if source is None:
            ensure_demo(args.demo_dir, args.demo_count, args.demo_seed)
            source = args.demo_dir
        build_store(source, args.out, workers=args.workers, cluster=args.cluster,
                    strict=args.strict, overwrite=args.overwrite, append=args.append,
                    max_pixels=args.max_pixels, figure=not args.no_figure,
                    pixel_layout=pixel_layout, break_lock=args.break_lock,
                    storage=storages.StorageSettings.from_args(args))
    except (BuildError, BadInput, layout.StoreError) as exc:
        print(f"build_zarr: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
