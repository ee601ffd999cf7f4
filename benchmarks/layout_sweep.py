"""Store layout sweep: what each pixel layout costs to read, store and write.

    python benchmarks/layout_sweep.py [--store data/bench/store.zarr] [--rows 80]

For every layout of the sweep (chunk side 512/256/128 x codec zstd 1 and 3,
Blosc's LZ4 1 and 9 and LZ4HC 3, none x sharded or not; every chunk with
its CRC-32C),
the pixel arrays of --rows rows of --store are written again in that
layout, then the windows each member reads (its own epoch plan's windows on
those rows, at --img-size) are read back with the engine's reader, every
round reading every layout in turn. Per layout and member it reports read
ms per sample (one process, best of --rounds), bytes decoded and requests
per sample, and for the default and version 2's layouts the same blocks
read through zarr-python; per layout the size against raw pixels and the write rate
(encode + write, raw MB/s).
The checksums' share of a read is the CRC-32C of the bytes read per sample
at the rate measured in the same run.
The measurement behind engine.store.DEFAULT_LAYOUT (docs/performance.md,
"Store"); LEGACY_LAYOUT is version 2's layout, the ratios' reference.
Without --store the realistic benchmark store (300 figures of 500-3000 px,
benchmarks/loader_throughput.py --realistic) is built first.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from engine import store as layout
from engine.loader import make_loader
from engine.reader import WindowReader
from preprocess.verify_store import expected_arrays
from common.atomic import atomic_open
from common.help_format import HelpFormatter

CODECS = (("zstd", 1), ("zstd", 3), ("lz4", 1), ("lz4", 9), ("lz4hc", 3), ("none", 0))


def sweep_layouts() -> list[layout.PixelLayout]:
    layouts = [layout.PixelLayout(chunk, codec, level, sharded)
               for chunk in (512, 256, 128) for sharded in (False, True) for codec, level in CODECS]
    return layouts


def crc_bytes_per_s(size: int = 8 << 20, repeats: int = 5) -> float:
    """CRC-32C rate of this machine (google-crc32c, the reader's), best of `repeats`."""
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        google_crc32c.value(data)
        best = min(best, time.perf_counter() - start)
    return size / best


def member_windows(store: Path, member: str, rows: set[int], count: int, img_size: int,
                   seed: int) -> tuple[list, bool]:
    """The first `count` (row, window) samples of `member`'s epoch plans
    (epochs 0, 1, ...) that fall on `rows`, and whether it reads ELA."""
    samples, epoch = [], 0
    while len(samples) < count and epoch < 50:
        loader = make_loader(store, member, img_size=img_size, batch_size=8, seed=seed,
                             epoch=epoch, workers=0)
        with_ela = loader.reader.with_ela
        samples += [(int(r), w) for batch_rows, batch_windows in zip(loader.batches.rows,
                                                                     loader.batches.windows)
                    for r, w in zip(batch_rows, batch_windows) if int(r) in rows]
        epoch += 1
    if not samples:
        sys.exit(f"{store}: {member} reads none of the chosen rows; use more --rows")
    return samples[:count], with_ela


def copy_skeleton(base: Path, out: Path, pixel_layout: layout.PixelLayout) -> None:
    """A store at `out` with `base`'s metadata (meta/, instances/, root
    attributes) and no pixels yet, recording `pixel_layout`."""
    out.mkdir(parents=True)
    for name in ("meta", "instances"):
        shutil.copytree(base / name, out / name)
    shutil.copy(base / "zarr.json", out / "zarr.json")
    group = zarr.open_group(str(out), mode="r+")
    group.attrs["layout"] = asdict(pixel_layout)


def write_layout(base: Path, out: Path, pixel_layout, pixels: dict) -> dict:
    """Write `pixels` ({path: array}) in `pixel_layout` into a store at
    `out`: the layout's write rate and size."""
    copy_skeleton(base, out, pixel_layout)
    group = zarr.open_group(str(out), mode="r+")
    start = time.perf_counter()
    for path, data in pixels.items():
        layout.create_pixels(group, path, data, pixel_layout)
    seconds = time.perf_counter() - start
    raw = sum(a.nbytes for a in pixels.values())
    stored = sum(f.stat().st_size for top in ("images", "masks", "ela", "instances_mask")
                 for f in (out / top).rglob("*") if f.is_file())
    return {"layout": asdict(pixel_layout), "name": pixel_layout.describe(),
            "write_MB_s": raw / seconds / 1e6, "size_ratio": stored / raw, "members": {}}


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
    """Seconds to read the same blocks as `reader` through zarr-python
    (arrays opened once, kept in `arrays`)."""
    start = time.perf_counter()
    for r, w in samples:
        level, (y0, x0, y1, x1), _ = reader.block_of(r, w, img_size)
        paths = [layout.image_path(r, level)] + [layout.ela_path(r, level)] * reader.with_ela \
            + [layout.mask_path(r, level)] * bool(reader.meta["label"][r])
        for path in paths:
            if path not in arrays:
                arrays[path] = group[path]
            arrays[path][y0:y1, x0:x1]
    return time.perf_counter() - start


def measure_reads(stores: dict, rows: list[dict], members: dict, img_size: int, rounds: int) -> None:
    """Each member's read ms per sample (best of `rounds`) and fetch figures
    per layout, into `rows`; every round reads every layout in turn, so a
    shared machine's drift lands on all of them alike."""
    readers = {(out, m): WindowReader(out, with_ela=with_ela)
               for out in stores for m, (_, with_ela) in members.items()}
    for (out, member), reader in readers.items():   # opens every array and reads its index,
        time_reads(reader, members[member][0], img_size)   # as a worker's first epoch does
    named = [asdict(layout.DEFAULT_LAYOUT), asdict(layout.LEGACY_LAYOUT)]
    through_zarr = {out: ({}, zarr.open_group(str(out), mode="r"))
                    for out, row in zip(stores, rows) if row["layout"] in named}
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


def draw_chart(results: dict, path: Path) -> None:
    """Read ms per sample against store size, one point per layout and
    member, the default and the legacy layout named."""
    from matplotlib.figure import Figure

    members = list(results["members"])
    fig = Figure(figsize=(6 * len(members), 5))
    axes = fig.subplots(1, len(members), squeeze=False)[0]
    default, legacy = asdict(layout.DEFAULT_LAYOUT), asdict(layout.LEGACY_LAYOUT)
    for ax, member in zip(axes, members):
        for row in results["layouts"]:
            x, y = row["size_ratio"], row["members"][member]["read_ms"]
            special = row["layout"] in (default, legacy)
            ax.scatter([x], [y], s=60 if special else 18,
                       color="C3" if row["layout"] == default else "C0" if special else "0.6")
            if special:
                ax.annotate(("default: " if row["layout"] == default else "version 2: ") + row["name"],
                            (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="stored bytes / raw pixel bytes (lower is smaller)",
               ylabel="read ms per sample, one process (lower is faster)",
               title=f"{member}: {results['img_size']} px windows", ylim=(0, None))
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    p.add_argument("--store", type=Path, help="store whose pixels are rewritten "
                   "(default: the realistic benchmark store, built when missing)")
    p.add_argument("--rows", type=int, default=80, help="rows whose pixels each layout writes")
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
    meta = layout.read_meta(layout.open_store(base))
    rng = np.random.default_rng(args.seed)
    rows = set(rng.choice(len(meta["label"]), min(args.rows, len(meta["label"])), replace=False).tolist())
    members = {m: member_windows(base, m, rows, args.samples, args.img_size, args.seed)
               for m in args.members}
    reader = WindowReader(base)
    pixels = {path: reader.read_array(path) for path in expected_arrays(meta)
              if int(path.split("/")[1]) in rows}
    print(f"{base}: {len(rows)} rows, {sum(a.nbytes for a in pixels.values()) / 1e6:.0f} MB of "
          f"raw pixels; {', '.join(f'{m} {len(s)} windows' for m, (s, _) in members.items())}")
    results = {"store": str(base), "rows": len(rows), "img_size": args.img_size,
               "members": {m: len(s) for m, (s, _) in members.items()}, "layouts": []}
    with tempfile.TemporaryDirectory(prefix="layout_sweep_", dir=base.parent) as tmp:
        stores = {}
        for k, pixel_layout in enumerate(sweep_layouts()):
            print(f"writing {pixel_layout.describe()} ...", flush=True)
            out = Path(tmp) / f"layout{k}.zarr"
            stores[out] = pixel_layout
            results["layouts"].append(write_layout(base, out, pixel_layout, pixels))
        del pixels
        print(f"reading, {args.rounds} rounds ...", flush=True)
        measure_reads(stores, results["layouts"], members, args.img_size, args.rounds)
    header = f"{'layout':<36}{'write MB/s':>11}{'size':>6}" + "".join(
        f"{m[:16] + ' ms':>20}{'kB dec':>8}{'req':>6}" for m in members)
    print(header + "\n" + "-" * len(header))
    for row in results["layouts"]:
        print(f"{row['name']:<36}{row['write_MB_s']:>11.0f}{row['size_ratio']:>6.2f}" + "".join(
            f"{r['read_ms']:>20.2f}{r['decoded_kB']:>8.0f}{r['requests']:>6.1f}"
            for r in row["members"].values()))
    legacy = next(r for r in results["layouts"] if r["layout"] == asdict(layout.LEGACY_LAYOUT))
    default = next(r for r in results["layouts"] if r["layout"] == asdict(layout.DEFAULT_LAYOUT))
    for member in members:
        old, new = legacy["members"][member], default["members"][member]
        print(f"{member}: through zarr-python the same blocks take {new['zarr_read_ms']:.2f} ms "
              f"(default layout) and {old['zarr_read_ms']:.2f} ms (version 2's)")
        print(f"{member}: default ({default['name']}) reads a sample in {new['read_ms']:.2f} ms "
              f"against {old['read_ms']:.2f} ms in version 2's layout "
              f"({new['read_ms'] / old['read_ms']:.2f}x), decoding {new['decoded_kB']:.0f} kB "
              f"against {old['decoded_kB']:.0f} kB")
    crc_rate = crc_bytes_per_s()
    results["crc32c_GB_s"] = crc_rate / 1e9
    for member in members:
        new = default["members"][member]
        print(f"{member}: checking the checksums of a sample's {new['read_kB']:.0f} kB read costs "
              f"{new['read_kB'] * 1e3 / crc_rate * 1e3:.3f} ms "
              f"({100 * new['read_kB'] * 1e3 / crc_rate * 1e3 / new['read_ms']:.1f}% of its read; "
              f"CRC-32C at {crc_rate / 1e9:.1f} GB/s)")
    print(f"size: {default['size_ratio']:.2f} against {legacy['size_ratio']:.2f} of raw; writes "
          f"{default['write_MB_s']:.0f} against {legacy['write_MB_s']:.0f} MB/s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.json) as handle:
        json.dump(results, handle, indent=1)
    draw_chart(results, args.json.with_suffix(".png"))
    print(f"figures: {args.json}, chart: {args.json.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
