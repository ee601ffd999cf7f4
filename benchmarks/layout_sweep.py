"""Store layout sweep: what each packed pixel layout costs to read, store and build.

    python benchmarks/layout_sweep.py [--store data/bench/store.zarr] [--rows 80]

For every layout of the sweep (tile side 512/256/128 x codec zstd 1 and 3,
Blosc's LZ4 1 and 9 and LZ4HC 3, none; every layout packed, as the builder
writes them, every tile with its CRC-32C), a store of --rows cases drawn
from --store's source folder (the one its build recorded) is built in that
layout (preprocess/build_zarr.py's build_store, one worker), then the
windows each member reads (its own epoch plan's windows, at --img-size) are
read back with the engine's reader, every round reading every layout in
turn. Per layout and member it reports read ms per sample (one process,
best of --rounds), bytes decoded and requests per sample, and for the
default layout the same tiles read through zarr-python; per layout the
size against raw pixels and the build rate (raw pixel MB/s of the whole
build: decoding and ELA, the same for every layout, included). Every figure
is also given against engine.store.DEFAULT_LAYOUT's ("x default").
The checksums' share of a read is the CRC-32C of the bytes read per sample
at the rate measured in the same run.
The measurement behind engine.store.DEFAULT_LAYOUT (docs/performance.md,
"Store"). Without --store the realistic benchmark store (300 figures of
500-3000 px, benchmarks/loader_throughput.py --realistic) is built first.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from engine import packing, store as layout
from engine.loader import make_loader
from engine.reader import WindowReader
from preprocess.build_zarr import build_store
from preprocess.source import discover
from common.atomic import atomic_open
from common.help_format import HelpFormatter

CODECS = (("zstd", 1), ("zstd", 3), ("lz4", 1), ("lz4", 9), ("lz4hc", 3), ("none", 0))


def sweep_layouts() -> list[layout.PixelLayout]:
    """Every packed layout of the sweep, DEFAULT_LAYOUT among them."""
    return [layout.PixelLayout(chunk, codec, level) for chunk in (512, 256, 128)
            for codec, level in CODECS]


def crc_bytes_per_s(size: int = 8 << 20, repeats: int = 5) -> float:
    """CRC-32C rate of this machine (google-crc32c, the reader's), best of `repeats`."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        google_crc32c.value(data)
        best = min(best, time.perf_counter() - start)
    return size / best


def member_windows(store: Path, member: str, count: int, img_size: int,
                   seed: int) -> tuple[list, bool]:
    """The first `count` (row, window) samples of `member`'s epoch plans
    (epochs 0, 1, ...), and whether it reads ELA."""
    samples, epoch = [], 0
    while len(samples) < count and epoch < 50:
        loader = make_loader(store, member, img_size=img_size, batch_size=8, seed=seed,
                             epoch=epoch, workers=0)
        with_ela = loader.reader.with_ela
        samples += [(int(r), w) for batch_rows, batch_windows in zip(loader.batches.rows,
                                                                     loader.batches.windows)
                    for r, w in zip(batch_rows, batch_windows)]
        epoch += 1
    if not samples:
        sys.exit(f"{store}: {member} reads none of the chosen rows; use more --rows")
    return samples[:count], with_ela


def sample_source(base: Path, count: int, seed: int, out: Path) -> int:
    """A Kaggle-layout folder at `out` of links to the source files of
    `count` rows of store `base`, drawn at random from the source folder its
    build recorded; returns the number of cases linked."""
    group = layout.open_store(base)
    source = Path(group.attrs["build"]["source"])
    meta = layout.read_meta(group)
    rows = np.random.default_rng(seed).choice(len(meta["label"]), min(count, len(meta["label"])),
                                              replace=False)
    chosen = {(str(meta["case_id"][r]), int(meta["label"][r])) for r in rows.tolist()}
    cases = [c for c in discover(source)[0] if (c.case_id, c.label) in chosen]
    if len(cases) < len(chosen):
        sys.exit(f"{base}: the source files of {len(chosen) - len(cases)} of the chosen rows are "
                 f"gone from {source}, the folder its build recorded; give --store a store whose "
                 "source folder is still there")
    for case in cases:
        for file in filter(None, (case.image, case.mask)):
            link = out / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(file.resolve())
    return len(cases)


def raw_pixel_bytes(meta: dict) -> int:
    """The bytes of every pyramid level of every row's image, ELA and
    union mask, and its instance layers, uncompressed."""
    total = 0
    for height, width, label, layers in zip(meta["height"].tolist(), meta["width"].tolist(),
                                            meta["label"].tolist(), meta["n_instances"].tolist()):
        for level in range(layout.level_count(height, width)):
            total += (3 + 1 + bool(label)) * int(np.prod(packing.level_shape(height, width, level)))
        total += layers * height * width
    return total


def build_layout(source: Path, out: Path, pixel_layout: layout.PixelLayout) -> dict:
    """Build `source` into a store at `out` in `pixel_layout`: the
    layout's build seconds and stored pixel bytes."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):   # the build's summary: not this table's
        build_store(source, out, workers=1, progress=False, figure=False, pixel_layout=pixel_layout)
    seconds = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in (out / "tiles").rglob("*")
                 if f.is_file() and f.name != "zarr.json")
    return {"layout": asdict(pixel_layout), "name": pixel_layout.describe(),
            "build_seconds": seconds, "stored_bytes": stored, "members": {}}


def time_reads(reader: WindowReader, samples: list, img_size: int) -> tuple[float, dict]:
    """Seconds to read `samples` once, and what the reader fetched for them."""
    before = dict(reader.stats)
    start = time.perf_counter()
    for r, w in samples:
        reader.read(r, w, img_size)
    seconds = time.perf_counter() - start
    return seconds, {k: reader.stats[k] - before[k] for k in before}


def time_zarr_reads(arrays: dict, group: zarr.Group, reader: WindowReader, samples: list,
                    img_size: int) -> float:
    """Seconds to read the same tiles as `reader` through zarr-python
    (the tiles arrays opened once, kept in `arrays`)."""
    meta, side = reader.meta, reader.pixel_layout.chunk
    start = time.perf_counter()
    for r, w in samples:
        level, (y0, x0, y1, x1), _ = reader.block_of(r, w, img_size)
        cols = packing.tile_grid(*packing.level_shape(int(meta["height"][r]), int(meta["width"][r]),
                                                      level), side)[1]
        ids, _ = packing.window_tiles(int(meta["tile_start"][r, level]), cols, side, y0, y1, x0, x1)
        kinds = ["image"] + ["ela"] * reader.with_ela + ["mask"] * bool(meta["label"][r])
        for path in (layout.tiles_path(kind, level) for kind in kinds):
            if path not in arrays:
                arrays[path] = group[path]
            arrays[path].oindex[ids]
    return time.perf_counter() - start


def measure_reads(stores: list[Path], rows: list[dict], members: dict, img_size: int, rounds: int) -> None:
    """Each member's read ms per sample (best of `rounds`) and fetch figures
    per layout, into `rows`; every round reads every layout in turn, so a
    shared machine's drift lands on all of them alike."""
    readers = {(out, m): WindowReader(out, with_ela=with_ela)
               for out in stores for m, (_, with_ela) in members.items()}
    for (out, member), reader in readers.items():   # opens every array and reads its index,
        time_reads(reader, members[member][0], img_size)   # as a worker's first epoch does
    through_zarr = {out: ({}, zarr.open_group(str(out), mode="r"))
                    for out, row in zip(stores, rows) if row["layout"] == asdict(layout.DEFAULT_LAYOUT)}
    for _ in range(rounds):
        for out, row in zip(stores, rows):
            for member, (samples, _) in members.items():
                seconds, fetched = time_reads(readers[out, member], samples, img_size)
                figures = row["members"].setdefault(member, {"read_ms": float("inf")})
                figures.update(read_ms=min(figures["read_ms"], 1000 * seconds / len(samples)),
                               decoded_kB=fetched["bytes_decoded"] / len(samples) / 1e3,
                               read_kB=fetched["bytes_read"] / len(samples) / 1e3,
                               requests=fetched["requests"] / len(samples))
                if out in through_zarr:
                    seconds = time_zarr_reads(*through_zarr[out], readers[out, member], samples,
                                              img_size)
                    figures["zarr_read_ms"] = min(figures.get("zarr_read_ms", float("inf")),
                                                  1000 * seconds / len(samples))


def against_default(results: dict) -> dict:
    """Each layout's size and build rate (raw pixel bytes per build second)
    into its row, and its figures against DEFAULT_LAYOUT's ("x_default":
    above 1 is larger, faster to build, slower to read); the default's row."""
    raw = results["raw_bytes"]
    for row in results["layouts"]:
        row["size_ratio"] = row["stored_bytes"] / raw
        row["build_MB_s"] = raw / row["build_seconds"] / 1e6
    default = next(r for r in results["layouts"] if r["layout"] == asdict(layout.DEFAULT_LAYOUT))
    for row in results["layouts"]:
        row["x_default"] = {"size": row["size_ratio"] / default["size_ratio"],
                            "build": row["build_MB_s"] / default["build_MB_s"],
                            **{m: figures["read_ms"] / default["members"][m]["read_ms"]
                               for m, figures in row["members"].items()}}
    return default


def draw_chart(results: dict, path: Path) -> None:
    """Read ms per sample against store size, one point per layout and
    member, the default layout named."""
    from matplotlib.figure import Figure

    members = list(results["members"])
    fig = Figure(figsize=(6 * len(members), 5))
    axes = fig.subplots(1, len(members), squeeze=False)[0]
    default = asdict(layout.DEFAULT_LAYOUT)
    for ax, member in zip(axes, members):
        for row in results["layouts"]:
            x, y = row["size_ratio"], row["members"][member]["read_ms"]
            named = row["layout"] == default
            ax.scatter([x], [y], s=60 if named else 18, color="C3" if named else "0.6")
            if named:
                ax.annotate("default: " + row["name"], (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax.set(xlabel="stored bytes / raw pixel bytes (lower is smaller)",
               ylabel="read ms per sample, one process (lower is faster)",
               title=f"{member}: {results['img_size']} px windows", ylim=(0, None))
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--store", type=Path, help="store whose source folder the cases are drawn "
                   "from (default: the realistic benchmark store, built when missing)")
    p.add_argument("--rows", type=int, default=80, help="cases each layout's store is built from")
    p.add_argument("--samples", type=int, default=200, help="windows read per member")
    p.add_argument("--members", nargs="+", default=["small_specialist", "highres_no_ela"])
    p.add_argument("--img-size", type=int, default=512, help="output side the windows are read for")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per layout; the best counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("logs/layout_sweep.json"),
                   help="figures (and a PNG chart beside it)")
    args = p.parse_args(argv)
    if args.store is None:
        from benchmarks.loader_throughput import realistic_store
        args.store = realistic_store(Path("data/bench"))
    base = Path(args.store)
    with tempfile.TemporaryDirectory(prefix="layout_sweep_", dir=base.parent) as tmp:
        source = Path(tmp) / "source"
        cases = sample_source(base, args.rows, args.seed, source)
        results = {"store": str(base), "rows": cases, "img_size": args.img_size, "layouts": []}
        stores = []
        for k, pixel_layout in enumerate(sweep_layouts()):
            print(f"building {cases} cases in {pixel_layout.describe()} ...", flush=True)
            stores.append(Path(tmp) / f"layout{k}.zarr")
            results["layouts"].append(build_layout(source, stores[-1], pixel_layout))
        results["raw_bytes"] = raw_pixel_bytes(layout.read_meta(layout.open_store(stores[0])))
        members = {m: member_windows(stores[0], m, args.samples, args.img_size, args.seed)
                   for m in args.members}
        results["members"] = {m: len(s) for m, (s, _) in members.items()}
        print(f"{base}'s source: {cases} cases, {results['raw_bytes'] / 1e6:.0f} MB of raw pixels; "
              f"{', '.join(f'{m} {len(s)} windows' for m, (s, _) in members.items())}")
        print(f"reading, {args.rounds} rounds ...", flush=True)
        measure_reads(stores, results["layouts"], members, args.img_size, args.rounds)
    default = against_default(results)
    header = f"{'layout':<40}{'build MB/s':>11}{'x def':>6}{'size':>6}{'x def':>6}" + "".join(
        f"{m[:16] + ' ms':>20}{'x def':>6}{'kB dec':>8}{'req':>6}" for m in members)
    print(header + "\n" + "-" * len(header))
    for row in results["layouts"]:
        ratios = row["x_default"]
        print(f"{row['name']:<40}{row['build_MB_s']:>11.0f}{ratios['build']:>6.2f}"
              f"{row['size_ratio']:>6.2f}{ratios['size']:>6.2f}" + "".join(
                  f"{r['read_ms']:>20.2f}{ratios[m]:>6.2f}{r['decoded_kB']:>8.0f}{r['requests']:>6.1f}"
                  for m, r in row["members"].items()))
    for member in members:
        new = default["members"][member]
        print(f"{member}: default ({default['name']}) reads a sample in {new['read_ms']:.2f} ms; "
              f"through zarr-python the same tiles take {new['zarr_read_ms']:.2f} ms "
              f"({new['zarr_read_ms'] / new['read_ms']:.2f}x)")
    crc_rate = crc_bytes_per_s()
    results["crc32c_GB_s"] = crc_rate / 1e9
    for member in members:
        new = default["members"][member]
        print(f"{member}: checking the checksums of a sample's {new['read_kB']:.0f} kB read costs "
              f"{new['read_kB'] * 1e3 / crc_rate * 1e3:.3f} ms "
              f"({100 * new['read_kB'] * 1e3 / crc_rate * 1e3 / new['read_ms']:.1f}% of its read; "
              f"CRC-32C at {crc_rate / 1e9:.1f} GB/s)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.json) as handle:
        json.dump(results, handle, indent=1)
    draw_chart(results, args.json.with_suffix(".png"))
    print(f"figures: {args.json}, chart: {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
