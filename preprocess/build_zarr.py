"""Build the forgery store (Zarr v3) from a Kaggle-layout folder.

    python preprocess/build_zarr.py [--source DIR] [--out STORE] [--workers N]
        [--strict] [--overwrite] [--max-pixels P]

Without --source it first writes the built-in demo folder (--demo-dir,
scikit-image's scientific images with synthetic copy-move forgeries; reused
when it already exists) and builds the store from it.

Every PNG is decoded once (conversion rule: preprocess/source.py), every mask
instance kept; the store's layout is engine/store.py's. Workers (all cores by
default) each write their own images' arrays into `<out>.partial/staging/<i>`
and then a completion record `<out>.partial/records/<i>.json` (atomically,
after the arrays). The main process then writes `meta/` and `instances/`,
moves each image's arrays to its row, writes the root attributes last and
renames `<out>.partial` to `<out>`. A killed build leaves only the .partial
folder; rerunning the same command resumes it (cases with a record whose
source files are unchanged are not redone) and gives the same store an
uninterrupted build gives. Every step of the final phase can be repeated.

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

A URL as --out (s3://..., any fsspec URL; engine/storage.py) is built in a
local staging folder exactly as above (--staging; resumable, flock-locked),
then uploaded (upload_store): first a root zarr.json without the completion
attributes (engine.store.COMPLETION), so a reader refuses the store as
unfinished, then every other object, objects already there with the same
size skipped (a rerun after a kill resumes the upload), and the complete root
zarr.json last. Object storage has no rename and no flock: the build holds a
lock object `<out>/build.lock` made by a conditional write (S3's
If-None-Match, so one of two racing builds wins) recording the holder and
a token of this build. A lock left by a build killed on this host is taken
over (this host's flock on the URL, held by every build of it here, says
its holder is dead); one from another host is refused with its holder named,
since only that host can tell whether it still runs (--break-lock takes it
once the user knows that build is dead). A takeover is a conditional write
on the lock's ETag (If-Match: of two takers one wins). Before every step
that commits anything to the URL (removing the old store, each upload
batch, each root zarr.json) the build reads the lock back: one no longer
holding its own record has been taken over, and the build stops there
with one line. At the end the lock is deleted only if it is still the
version this build wrote (a conditional delete on its ETag), so a build
never removes another's lock. (File systems without conditional writes
get a read and a comparison instead, which a writer in between can defeat.)

Errors (bad arguments, another build running, a lost lock, a bucket that
does not exist, --strict's first bad input, nothing to store, a full disk
or any other error reading or writing a file) print one line `build_zarr: error: <path>: <problem>` and exit with
status 2; after a full disk, free space and rerun the same command: the
build resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import zarr
from tqdm import tqdm

from engine import storage as storages
from engine import store as layout
from engine.recipes import SIZE_CLASS_NAMES
from preprocess import ela as ela_module
from preprocess.demo_data import DEFAULT_COUNT, write_demo
from preprocess.source import (DEFAULT_MAX_PIXELS, FOLDERS, BadInput, Case, count_test_images,
                               discover, load_image, load_masks, shown)
from common.help_format import HelpFormatter

STAGING = "staging"
RECORDS = "records"
REPORT = layout.REPORT
VAL_FRACTION = 0.1
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
    """Everything the stored pixels depend on; a partial build with other
    settings is started over instead of resumed."""
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


def write_pixels(group: zarr.Group, key: int, rgb: np.ndarray, instances: np.ndarray | None,
                 pixel_layout: layout.PixelLayout = layout.DEFAULT_LAYOUT) -> None:
    """One image's pyramid levels, ELA and masks under `group` (row `key`)."""
    levels = layout.level_count(*rgb.shape[:2])
    image, ela = rgb, ela_module.compute_ela(rgb)
    union = None if instances is None else instances.max(axis=0)
    for level in range(levels):
        if level:
            image, ela = layout.downsample_pixels(image), layout.downsample_pixels(ela)
            union = None if union is None else layout.downsample_mask(union)
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


def case_fingerprint(case: Case) -> dict:
    return {"image": str(case.image), "mask": None if case.mask is None else str(case.mask),
            "image_stat": _file_stat(case.image), "mask_stat": _file_stat(case.mask)}


def process_case(task: tuple[int, Case, str, int, layout.PixelLayout]) -> dict:
    """Worker: decode, validate and write one case; returns its record."""
    key, case, partial, max_pixels, pixel_layout = task
    staging = Path(partial) / STAGING / str(key)
    record = {"key": key}
    try:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed attempt
        try:
            record.update(case_fingerprint(case))
            rgb = load_image(case.image, max_pixels)
            instances = load_masks(case.mask, *rgb.shape[:2]) if case.label else None
        except BadInput as exc:
            record.update(skipped=exc.problem, file=exc.path)
        else:
            write_pixels(zarr.open_group(str(staging), mode="w"), key, rgb, instances, pixel_layout)
            record.update(height=rgb.shape[0], width=rgb.shape[1])
            if instances is not None:
                record.update(mask_stats(instances))
        _write_json_atomic(Path(partial) / RECORDS / f"{key}.json", record)
    except OSError as exc:  # reading the sources is BadInput: this is the store's side
        raise os_error(exc, staging) from None
    return record


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already


# ---------------------------------------------------------------- the store

def grouped_split(case_ids: np.ndarray, labels: np.ndarray, val_fraction: float = VAL_FRACTION) -> np.ndarray:
    """uint8 split per row (0 train, 1 val), grouped by case id. Cases with
    a forged image and authentic-only cases each send round(fraction x count)
    cases (at least one of two or more) to val, those first in the order of
    sha256(case id): stable, and independent of row order and workers."""
    forged_cases = set(case_ids[labels == 1].tolist())
    val: set[str] = set()
    for stratum in (forged_cases, set(case_ids.tolist()) - forged_cases):
        ranked = sorted(stratum, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
        n_val = round(val_fraction * len(ranked))
        if len(ranked) >= 2:
            n_val = max(n_val, 1)
        val.update(ranked[:n_val])
    return np.array([c in val for c in case_ids.tolist()], np.uint8)


def meta_arrays(cases: list[Case], records: list[dict], val_fraction: float) -> tuple[dict, dict]:
    """meta/ and instances/ arrays of the stored rows (docs/store.md schema)."""
    n = len(records)
    label = np.array([c.label for c in cases], np.uint8)
    height = np.array([r["height"] for r in records], np.int32)
    width = np.array([r["width"] for r in records], np.int32)
    n_inst = np.array([len(r.get("instances", ())) for r in records], np.int16)
    area = np.array([r.get("area", 0) for r in records], np.float64)
    area_ratio = (area / (height.astype(np.float64) * width)).astype(np.float32)
    size_class = np.where(label == 1, layout.size_class(area_ratio), 0).astype(np.int8)
    case_id = np.array([c.case_id for c in cases], dtype=np.dtypes.StringDType())
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
        "split": grouped_split(case_id, label, val_fraction),
        "instance_start": np.concatenate([[0], np.cumsum(n_inst, dtype=np.int64)]),
    }
    boxes = [i for r in records for i in r.get("instances", ())]
    instances = {
        "image_row": np.repeat(np.arange(n, dtype=np.int32), n_inst),
        "bbox": np.array([b[:4] for b in boxes], np.int32).reshape(-1, 4),
        "area": np.array([b[4] for b in boxes], np.int64),
    }
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


def finalize(partial: Path, settings: Settings, cases: list[Case], records: list[dict],
             report: dict) -> None:
    """meta/, instances/, rows, report and root attributes; each step can be
    repeated after a kill."""
    stored = [(c, r) for c, r in zip(cases, records) if "skipped" not in r]
    meta, instances = meta_arrays([c for c, _ in stored], [r for _, r in stored],
                                  settings.val_fraction)
    root = zarr.open_group(str(partial), mode="r+")
    for name, data in meta.items():
        layout.create_table(root, f"meta/{name}", data)
    for name, data in instances.items():
        layout.create_table(root, f"instances/{name}", data)
    for top in {node.split("/")[0] for node in layout.row_nodes(0)}:
        root.require_group(top)
    # one listing of the staging folder: a row with nothing staged (its pixels
    # written in place, as benchmarks/scale.py's synthetic million-row stores
    # do) costs no stat per node
    staged_keys = set(os.listdir(partial / STAGING))
    for row, (_, record) in enumerate(stored):
        if str(record["key"]) not in staged_keys:
            continue
        staged = partial / STAGING / str(record["key"])
        for src, dst in zip(layout.row_nodes(record["key"]), layout.row_nodes(row)):
            if (staged / src).exists():
                os.rename(staged / src, partial / dst)
    report["rows"] = [str(c.image) for c, _ in stored]
    _write_json_atomic(partial / REPORT, report)
    root.attrs.update({
        "format": layout.FORMAT, "version": layout.VERSION,
        "fingerprint": fingerprint(meta, instances), "layout": settings.layout,
        # new at every build, even of the same inputs: what the read cache
        # keys a store's bytes by (engine/store.py build_id)
        layout.BUILD_ID: uuid.uuid4().hex,
        "levels": {"min_side": layout.MIN_LEVEL_SIDE, "max": layout.MAX_LEVELS},
    })


def finish(partial: Path, out: Path) -> None:
    """Drop the build's scratch folders and put the store in place."""
    shutil.rmtree(partial / STAGING, ignore_errors=True)
    shutil.rmtree(partial / RECORDS, ignore_errors=True)
    os.rename(partial, out)


# ---------------------------------------------------------------- the build

def settings_for(source: Path, cases: list[Case], max_pixels: int,
                 pixel_layout: layout.PixelLayout) -> Settings:
    listing = "\n".join(f"{c.folder}/{c.case_id}:{c.label}:{c.mask is not None}" for c in cases)
    return Settings(
        source=str(source.resolve()), max_pixels=max_pixels, layout=asdict(pixel_layout),
        ela_jpeg_quality=ela_module.JPEG_QUALITY,
        ela_gain=ela_module.GAIN, min_level_side=layout.MIN_LEVEL_SIDE,
        max_levels=layout.MAX_LEVELS, val_fraction=VAL_FRACTION,
        cases_sha256=hashlib.sha256(listing.encode()).hexdigest(),
    )


def open_partial(partial: Path, settings: Settings) -> bool:
    """Create the partial store, or resume the one there when its settings
    match. Returns True when that one is finalized and only its rename is
    missing."""
    if partial.exists():
        try:
            group = zarr.open_group(str(partial), mode="r+")
            if group.attrs.get("build") == asdict(settings):
                print(f"resuming the interrupted build in {partial}")
                return "fingerprint" in group.attrs
        except Exception:  # no readable group: killed while creating it
            pass
        print(f"{partial}: left by a build with other inputs or settings; starting over")
        shutil.rmtree(partial)
    group = zarr.open_group(str(partial), mode="w")
    group.attrs["build"] = asdict(settings)
    (partial / STAGING).mkdir()
    (partial / RECORDS).mkdir()
    return False


def reusable_record(partial: Path, key: int, case: Case) -> dict | None:
    """The completion record of case `key`, if it is complete and its source
    files are unchanged (skipped cases are always retried)."""
    path = partial / RECORDS / f"{key}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if "skipped" in record:
        return None
    try:
        if any(record[k] != v for k, v in case_fingerprint(case).items()):
            return None
    except BadInput:  # the source file is gone: process_case reports it
        return None
    return record


def run_cases(partial: Path, cases: list[Case], todo: list[int], workers: int, settings: Settings,
              strict: bool, progress: bool) -> dict[int, dict]:
    """Process the cases `todo` with `workers` processes; records by key."""
    pixel_layout = layout.PixelLayout(**settings.layout)
    tasks = [(k, cases[k], str(partial), settings.max_pixels, pixel_layout) for k in todo]
    bar = tqdm(total=len(tasks), desc="images", unit="img", disable=not progress)
    records: dict[int, dict] = {}
    pool = None
    if workers > 1 and len(tasks) > 1:
        # spawn: zarr's event-loop thread in this process must not be forked
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker)
        results = pool.imap_unordered(process_case, tasks, chunksize=1)
    else:
        results = map(process_case, tasks)
    try:
        for record in results:
            if strict and "skipped" in record:
                raise BuildError(f"{record['file']}: {record['skipped']}")
            records[record["key"]] = record
            bar.update()
        if pool is not None:
            # workers that exit, not terminated ones, run their exit finalisers:
            # numcodecs' Blosc lock is unlinked instead of reported as a leaked semaphore
            pool.close()
            pool.join()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()   # on an error: stops the workers (a no-op once they have exited)
            pool.join()
    return records


def process_all(partial: Path, cases: list[Case], workers: int, settings: Settings, strict: bool,
                progress: bool) -> list[dict]:
    """Every case's record, in case order: reused where complete, else made."""
    reused = {k: reusable_record(partial, k, case) for k, case in enumerate(cases)}
    records = {k: r for k, r in reused.items() if r is not None}
    todo = [k for k in range(len(cases)) if k not in records]
    records |= run_cases(partial, cases, todo, workers, settings, strict, progress)
    return [records[k] for k in range(len(cases))]


def build_store(source: Path, out: Path | str, *, workers: int | None = None, strict: bool = False,
                overwrite: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                progress: bool = True, figure: bool = True,
                pixel_layout: layout.PixelLayout = layout.DEFAULT_LAYOUT,
                staging: Path | None = None, break_lock: bool = False,
                storage: storages.StorageSettings | None = None) -> dict | None:
    """Build `out` (a path, or a URL built in `staging` and uploaded) from
    `source`; returns the build report, or None when a complete store
    already exists there (and overwrite is False). Holds the output's lock
    throughout (module docstring); `break_lock` takes a URL's lock from a
    build on another host known to be dead. `pixel_layout`: how pixel arrays
    are chunked and encoded (benchmarks build other layouts); `storage`: how
    a URL is reached (fsspec options)."""
    kwargs = dict(workers=workers, strict=strict, overwrite=overwrite, max_pixels=max_pixels,
                  progress=progress, figure=figure, pixel_layout=pixel_layout)
    if storages.is_url(out):
        return build_to_url(Path(source), out, staging or default_staging(out),
                            break_lock=break_lock, storage=storage, **kwargs)
    return _build_local(Path(source), storages.location(str(out)), **kwargs)


def _build_local(source: Path, out: Path, *, workers: int | None, strict: bool, overwrite: bool,
                 max_pixels: int, progress: bool, figure: bool,
                 pixel_layout: layout.PixelLayout) -> dict | None:
    if out.parent.exists() and not out.parent.is_dir():
        raise BuildError(f"{out.parent}: not a folder, so {out.name} cannot be made in it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(out):
            return _build_locked(source, out, workers=workers, strict=strict, overwrite=overwrite,
                                 max_pixels=max_pixels, progress=progress, figure=figure,
                                 pixel_layout=pixel_layout)
    except OSError as exc:  # the sources' are BadInput: this names the store's side
        raise os_error(exc, layout.partial_path(out)) from None


def _build_locked(source: Path, out: Path, *, workers: int | None, strict: bool, overwrite: bool,
                  max_pixels: int, progress: bool, figure: bool,
                  pixel_layout: layout.PixelLayout) -> dict | None:
    if out.exists():
        if not overwrite:
            layout.open_store(out)  # raises StoreError when it is not a store
            print(f"{out}: a complete store exists already; nothing to do "
                  "(--overwrite rebuilds it)")
            return None
        if not (out / "zarr.json").exists():
            raise BuildError(f"{out}: exists and is not a Zarr store; refusing to replace it")
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    cases, problems = discover(source)
    if strict and problems:
        raise BuildError(str(problems[0]))
    settings = settings_for(source, cases, max_pixels, pixel_layout)
    partial = layout.partial_path(out)
    if not open_partial(partial, settings):
        records = process_all(partial, cases, workers, settings, strict, progress)
        skipped = [{"file": p.path, "problem": p.problem} for p in problems] + \
                  [{"file": r["file"], "problem": r["skipped"]} for r in records if "skipped" in r]
        if all("skipped" in r for r in records):  # no case, or none stored
            shutil.rmtree(partial)
            raise nothing_stored(source, skipped)
        report = {
            "source": str(source), "skipped": skipped,
            "test_images_not_stored": count_test_images(source),
            "bytes_source": sum(r["image_stat"][0] + (r["mask_stat"] or [0])[0]
                                for r in records if "skipped" not in r),
        }
        finalize(partial, settings, cases, records, report)
    if out.exists():
        shutil.rmtree(out)  # only reached with --overwrite, checked above
    finish(partial, out)
    report = json.loads((out / REPORT).read_text())
    report["bytes_store"] = _tree_bytes(out)
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["workers"] = workers
    _write_json_atomic(out / REPORT, report)
    group = layout.open_store(out)
    print_summary(layout.read_meta(group), report)
    if figure:
        from preprocess.figures import write_summary_figure  # matplotlib: only when drawing
        png = summary_figure_path(out)
        write_summary_figure(group, png)
        print(f"summary figure: {png}")
    return report


# ---------------------------------------------------------------- a store at a URL

REMOTE_LOCK = layout.BUILD_LOCK   # the lock object, inside the store's prefix
UPLOAD_BATCH = 16            # objects in flight together while uploading
UPLOAD_OF = "upload_of"      # the unfinished root's attribute: sha256 of the root it stands for


def default_staging(url: str) -> Path:
    """Where a store for `url` is built before its upload: a folder named
    after the URL under data/staging."""
    return Path("data/staging") / "".join(c if c.isalnum() or c in "._-" else "_"
                                          for c in url.replace("://", "_"))


def build_to_url(source: Path, url: str, staging: Path, *, overwrite: bool, break_lock: bool,
                 storage: storages.StorageSettings | None = None, **kwargs) -> dict | None:
    """Build in `staging` (resumable, as any local build), then upload it to
    `url` (module docstring); holds the URL's lock throughout."""
    try:
        target = storages.open_storage(url, read_only=False, storage=storage)
        with remote_lock(url, target, break_lock) as lock:
            if _remote_complete(target) and not overwrite:
                layout.open_store(url, storage=storage)   # refuses a store of another version, naming the rebuild
                print(f"{url}: a complete store exists already; nothing to do "
                      "(--overwrite rebuilds it)")
                return None
            if overwrite:
                lock.check("removing the store there")
                _wipe(target)
            report = build_store(source, staging, overwrite=overwrite, **kwargs)
            sent = upload_store(staging, target, lock.check)
            print(f"uploaded {sent} objects to {url} (the build stays in {staging}: delete it "
                  "when no longer needed)")
            return report
    except (BuildError, layout.StoreError, BadInput):
        raise
    except Exception as exc:
        problem = storages.explained(url, exc)
        if problem is None:
            raise
        raise BuildError(str(problem)) from None


def _remote_complete(target) -> bool:
    root = target.read("zarr.json")
    return root is not None and not layout.unfinished(json.loads(root).get("attributes", {}))


def _wipe(target) -> None:
    """Everything but the lock, the root zarr.json first (so a reader never
    sees a complete root over a half-deleted store)."""
    target.delete([k for k in ("zarr.json",) if target.exists(k)])
    target.delete([k for k in target.keys("") if k != REMOTE_LOCK])


def upload_store(staging: Path, target, check=lambda step: None) -> int:
    """Upload the local store `staging` to `target` (a ZarrStorage): an
    unfinished root, every other object unless one of its size is there,
    then the complete root. `check(step)` runs before each write (the
    lock's RemoteLock.check). Returns the number of objects sent."""
    root = (staging / "zarr.json").read_bytes()
    digest = hashlib.sha256(root).hexdigest()
    there = target.read("zarr.json")
    if there is not None and json.loads(there).get("attributes", {}).get(UPLOAD_OF) != digest:
        check("removing an unfinished upload of another build")
        _wipe(target)   # a killed upload of another build: its same-size objects are not ours
    unfinished = json.loads(root)
    unfinished["attributes"] = {k: v for k, v in unfinished["attributes"].items()
                                if k not in layout.COMPLETION} | {UPLOAD_OF: digest}
    check("uploading")
    target.write("zarr.json", json.dumps(unfinished).encode())
    sizes = target.sizes("")
    todo = [path for path in sorted(staging.rglob("*")) if path.is_file()
            and (key := path.relative_to(staging).as_posix()) != "zarr.json"
            and sizes.get(key) != path.stat().st_size]
    for start in range(0, len(todo), UPLOAD_BATCH):
        check(f"uploading objects {start + 1}-{min(start + UPLOAD_BATCH, len(todo))} of {len(todo)}")
        target.write_many([(path.relative_to(staging).as_posix(), path.read_bytes())
                           for path in todo[start:start + UPLOAD_BATCH]])
    check("writing the complete root zarr.json")
    target.write("zarr.json", root)
    return len(todo) + 1


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
          f"{report['bytes_store'] / 1e6:.1f} MB; {report['seconds']:.1f} s with "
          f"{report['workers']} workers")
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
        epilog="Row order: by folder, then case id. Exit status 0 on success or when a\n"
               "complete store exists; 2 with a one-line message when the build cannot be\n"
               "done (another build holds STORE.lock, nothing to store, --strict's first\n"
               "bad input, a full disk...). Skipped files are listed in the summary and in\n"
               "STORE/build_report.json.")
    parser.add_argument("--source", type=Path, help="Kaggle-layout folder (default: demo data)")
    parser.add_argument("--out", type=storages.location, default=layout.DEFAULT_STORE,
                        help="store path, or URL (s3://bucket/store.zarr, any fsspec URL)")
    parser.add_argument("--staging", type=Path, default=None,
                        help="with a URL --out: the local folder it is built in before the "
                             "upload (default: data/staging/<URL as a name>)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad input")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing store")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"skip images with more pixels (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--demo-dir", type=Path, default=DEMO_DIR, help="where demo data goes")
    parser.add_argument("--demo-count", type=int, default=DEFAULT_COUNT, help="demo images")
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--no-figure", action="store_true", help="skip the summary PNG")
    default = layout.DEFAULT_LAYOUT
    parser.add_argument("--chunk", type=int, default=default.chunk,
                        help=f"pixel chunk side (default {default.chunk}; docs/store.md, and "
                             "docs/performance.md for what each layout costs)")
    parser.add_argument("--codec", choices=layout.CODECS, default=default.codec,
                        help=f"chunk compression (default {default.codec}): LZ4 or LZ4HC "
                             "(Blosc), zstd, or none (raw: the fastest reads for several "
                             "times the disk)")
    parser.add_argument("--codec-level", type=int, default=default.level,
                        help=f"compression level of --codec (default {default.level})")
    parser.add_argument("--break-lock", action="store_true",
                        help="with a URL --out: take the lock left by a build on another host "
                             "that is known to be dead (a local build's lock is dropped by the "
                             "kernel when its build dies)")
    storages.add_arguments(parser, cache=False)
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.break_lock and not storages.is_url(args.out):
        parser.error("--break-lock: only for a URL --out (a local build's lock is dropped by the "
                     "kernel when its build dies)")
    try:
        pixel_layout = layout.PixelLayout(args.chunk, args.codec, args.codec_level)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        source = args.source
        if source is None:
            ensure_demo(args.demo_dir, args.demo_count, args.demo_seed)
            source = args.demo_dir
        build_store(source, args.out, workers=args.workers, strict=args.strict,
                    overwrite=args.overwrite, max_pixels=args.max_pixels,
                    figure=not args.no_figure, pixel_layout=pixel_layout, staging=args.staging,
                    break_lock=args.break_lock, storage=storages.StorageSettings.from_args(args))
    except (BuildError, BadInput, layout.StoreError) as exc:
        print(f"build_zarr: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
