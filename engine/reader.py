"""Window reads: fetch only the chunks of the store that a crop window touches.

For a window given in original-resolution pixels, the reader picks the
coarsest pyramid level that still has at least the output's resolution across
the window, reads the image (plus ELA when asked) and union-mask chunks that
the window touches at that level, and returns the covering pixel block with
the window's exact, fractional position inside it (DALI's resize takes a
fractional ROI, so no precision is lost to the level's integer grid).

Whole arrays are read the same way (read_array, read_instances): prediction,
scoring and evaluation read pixels through this reader too, so every read of
the store's pixels refuses damage alike.

Why a hand-written read path: zarr-python spends some 0.3 ms of Python and
asyncio per `__getitem__` before decoding (benchmarks/layout_sweep.py times
both paths; docs/performance.md, "Store"), several times a sample's decode
cost. The store's layouts (engine.store.PixelLayout: regular chunks, codecs
bytes, then zstd, Blosc or nothing, then crc32c; in shards with their index
at the end) are read directly: a shard's index once (checked against its
CRC-32C, then cached), then one byte range per run of adjacent chunks the
box needs, through engine/storage.py. Each chunk's CRC-32C is compared with
its 4-byte trailer (google-crc32c, which zarr's own crc32c codec uses)
before numcodecs decompresses it in place; the pixels equal zarr's
(tests/test_reader.py). Checking the trailers costs about 1-2 % of a read
(docs/performance.md, "Store"). Zarr itself fills a missing shard or chunk
with the fill value; this reader instead raises StoreDamaged naming the
object: a missing shard, an index or chunk failing its checksum, an index
pointing past the object's end. An array of any other layout is refused,
not read some other way. A store is a path on a local or shared file
system, or a URL (object storage, through fsspec and the local
cache of engine/storage.py).
"""
from __future__ import annotations

import collections
import itertools
import json
import math
import os
from dataclasses import dataclass

import numcodecs
import numpy as np
import zarr

from engine import packing, store as layout
from engine.storage import NO_SETTINGS, StorageSettings, StorageUnavailable, is_url, open_storage, storage_of

# arrays whose metadata and shard index a reader keeps, oldest out first:
# about 0.9 kB each, so some 30 MB per reader process at most; enough for the
# arrays a member reads of a store of 10k images, where reading an array the
# first time costs a sample about 0.3 ms more (docs/performance.md, "Store")
MAX_OPEN_ARRAYS = 32768


@dataclass
class WindowBlock:
    """Pixels covering a window at one pyramid level."""

    image: np.ndarray        # uint8 (h, w, 3) RGB
    mask: np.ndarray         # uint8 (h, w, 1), 0/1 union mask
    ela: np.ndarray | None   # uint8 (h, w, 1) when asked for
    roi_start: np.ndarray    # float32 (2,): window's (y, x) start inside the block
    roi_end: np.ndarray      # float32 (2,): window's (y, x) end inside the block
    level: int
    scale: float             # block pixels per original pixel (1 at level 0)


_DECODERS = {"zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc()}   # settings come with each frame
_INDEX_CODECS = ({"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"})


class _ChunkReads:
    """Reading checksummed chunks out of shard objects by byte range, and
    decoding them: what the per-image arrays (_PixelArray) and the packed
    tiles arrays (_TilesArray) share. Needs `storage`, `stats`, `dtype`
    and `_decoder` (None for raw chunks)."""

    def _read_spans(self, key: str, spans: np.ndarray, chunks: np.ndarray,
                    damaged: list | None = None) -> np.ndarray:
        """Decode the chunks at `spans` ((offset, size) rows of a shard's
        index, offset -1 for a chunk not stored) of shard object `key`
        into `chunks`, fetched by byte range, one request per run of chunks
        adjacent in the object, all of them in one call. Returns which were
        stored. A damaged chunk raises StoreDamaged, or with `damaged` is
        added to it and the others are decoded still (verify_store)."""
        runs, finish = self._span_reads(key, spans, chunks, damaged)
        return finish(self.storage.read_ranges(key, runs) if runs else [])

    def _span_reads(self, key: str, spans: np.ndarray, chunks: np.ndarray,
                    damaged: list | None = None):
        """What _read_spans reads, in two steps so that a caller can fetch
        several objects' ranges together: (runs, the byte ranges to read
        from `key`, one per run of adjacent chunks; finish, which takes
        their bytes (None for a missing object), decodes the chunks into
        `chunks` and returns which were stored)."""
        offsets, sizes = spans[:, 0], spans[:, 1]
        stored = offsets >= 0   # INDEX_EMPTY reads as -1 in int64
        order = np.flatnonzero(stored)[np.argsort(offsets[stored], kind="stable")]
        if not len(order):
            return [], lambda data: stored
        starts, ends = offsets[order], offsets[order] + sizes[order]
        # a run starts where a chunk does not begin where the previous one ends
        first = np.flatnonzero(np.r_[True, starts[1:] != ends[:-1]])
        runs = list(zip(starts[first].tolist(), np.r_[ends[first[1:] - 1], ends[-1:]].tolist()))

        def finish(data):
            if data is None:
                raise self._damage(key, "shard missing")
            self.stats["requests"] += len(runs)
            self.stats["bytes_read"] += sum(map(len, data))
            run_of = np.searchsorted(first, np.arange(len(order)), side="right") - 1
            for k, run, offset, size in zip(order.tolist(), run_of.tolist(), starts.tolist(),
                                            sizes[order].tolist()):
                lo = runs[run][0]
                try:
                    if len(data[run]) < offset + size - lo:
                        raise self._damage(key, f"corrupt shard (its index points past its end, "
                                                f"at byte {offset + size})")
                    self._decode(np.frombuffer(data[run], np.uint8, size, offset - lo), key, chunks[k])
                except layout.StoreDamaged as exc:
                    if damaged is None:
                        raise
                    damaged.append(exc)
            return stored
        return runs, finish

    def _read_index(self, key: str, entries: int) -> np.ndarray:
        """Shard object `key`'s index of `entries` (offset, size) pairs, read
        from its end and checked against its CRC-32C."""
        length = packing.shard_index_bytes(entries)
        raw = self.storage.read_suffix(key, length)
        if raw is None:
            raise self._damage(key, "shard missing")
        self.stats["requests"] += 1
        self.stats["bytes_read"] += len(raw)
        if len(raw) != length or layout.checksum_bytes(raw[:-4]) != raw[-4:]:
            raise self._damage(key, "corrupt shard index (crc32c checksum mismatch or a "
                                    "truncated file)")
        return np.frombuffer(raw[:-4], "<u8").astype(np.int64).reshape(entries, 2)

    def _damage(self, key: str, problem: str) -> layout.StoreDamaged:
        return layout.StoreDamaged(self.storage.where(), self.storage.where(key), problem)

    def _decode(self, raw: np.ndarray, key: str, out: np.ndarray) -> None:
        """Decode one stored chunk into `out`, its checksum verified first
        (the checksum covers the frame, so a frame that passes it is the
        one written)."""
        if len(raw) < 4:
            raise self._damage(key, f"corrupt chunk ({len(raw)} bytes, shorter than its "
                                    "4-byte checksum)")
        raw, trailer = raw[:-4], raw[-4:].tobytes()
        if layout.checksum_bytes(raw) != trailer:
            raise self._damage(key, "corrupt chunk (crc32c checksum mismatch: flipped bytes "
                                    "or a truncated file)")
        if self._decoder is None:
            if len(raw) != out.nbytes:
                raise self._damage(key, f"corrupt chunk ({len(raw)} bytes, expected {out.nbytes})")
            out.reshape(-1)[:] = np.frombuffer(raw, self.dtype)
        else:
            try:
                self._decoder.decode(raw, out=out)
            except Exception as exc:  # numcodecs raises RuntimeError and others on a bad frame
                raise self._damage(key, f"corrupt chunk ({exc})") from None
        self.stats["bytes_decoded"] += out.nbytes


class _PixelArray(_ChunkReads):
    """Direct reads of one per-image pixel array (version 4's layout, which
    benchmarks synthesise to compare with; engine.store.PixelLayout with
    packed False): regular chunks, codecs bytes, then zstd, Blosc or
    nothing, then crc32c, in shards (sharding_indexed, index at the end
    with its crc32c). `stats` counts the requests made, bytes read and
    bytes decoded."""

    def __init__(self, storage, path: str, meta: dict, stats: dict):
        self.storage, self.path, self.stats = storage, path, stats
        self.shape = tuple(meta["shape"])
        grid = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        config = meta["codecs"][0]["configuration"]
        self.chunks, codecs = tuple(config["chunk_shape"]), config["codecs"]
        self.per_shard = tuple(s // c for s, c in zip(grid, self.chunks))
        self.one_shard = all(s <= g for s, g in zip(self.shape, grid))
        self._indexes: dict[tuple, np.ndarray] = {}
        self.dtype = np.dtype(meta["data_type"])
        self.fill = meta.get("fill_value", 0)
        self._decoder = next((_DECODERS[c["name"]] for c in codecs if c["name"] in _DECODERS), None)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows y0:y1 and columns x0:x1, every trailing axis whole."""
        return self.read_box((y0, x0) + (0,) * (len(self.shape) - 2), (y1, x1) + self.shape[2:])

    def read_box(self, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """The pixels of [start, stop) along every axis."""
        out = np.empty(tuple(b - a for a, b in zip(start, stop)), self.dtype)
        spans = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(start, stop, self.chunks)]
        # per axis, each chunk's (slice of out, slice of the chunk)
        parts = [[(slice(max(a, i * c) - a, min(b, (i + 1) * c) - a),
                   slice(max(a, i * c) - i * c, min(b, (i + 1) * c) - i * c)) for i in span]
                 for a, b, c, span in zip(start, stop, self.chunks, spans)]
        indices = np.array(list(itertools.product(*spans)), np.int64).reshape(-1, len(self.shape))
        chunks = np.empty((len(indices),) + self.chunks, self.dtype)
        stored = self._fetch(indices, chunks)
        for k, part in enumerate(itertools.product(*parts)):
            out[tuple(dst for dst, _ in part)] = (
                chunks[k][tuple(src for _, src in part)] if stored[k] else self.fill)
        return out

    def _fetch(self, indices: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        """Decode chunks `indices` (k x ndim) into chunks[k]; returns which
        were stored (the others are all fill)."""
        if self.one_shard:   # the store's own layout: a shard holds the whole array
            return self._shard_chunks((0,) * len(self.shape), indices, chunks)
        shards = indices // self.per_shard
        stored = np.empty(len(indices), bool)
        for shard in np.unique(shards, axis=0):
            members = np.flatnonzero((shards == shard).all(axis=1))
            part = chunks[members]
            stored[members] = self._shard_chunks(tuple(shard.tolist()), indices[members], part)
            chunks[members] = part
        return stored

    def _shard_chunks(self, shard: tuple, indices: np.ndarray, chunks: np.ndarray) -> np.ndarray:
        """Decode chunks `indices` of one shard into `chunks`: the stored
        ones, fetched by byte range. Returns which were stored."""
        key = layout.chunk_key(self.path, shard)
        return self._read_spans(key, self._index(shard)[tuple((indices % self.per_shard).T)], chunks)

    def _index(self, shard: tuple) -> np.ndarray:
        """Shard `shard`'s index, (offset, size) per chunk, checked and cached."""
        table = self._indexes.get(shard)
        if table is None:
            key = layout.chunk_key(self.path, shard)
            table = self._read_index(key, math.prod(self.per_shard)).reshape(self.per_shard + (2,))
            self._indexes[shard] = table
        return table


# tiles problems() fetches and decodes at a time: a shard's stored tiles are
# adjacent, so one request each 64 tiles (not each tile: a URL store's
# verify would cost a request per tile) and 64 decoded tiles in memory
CHECK_TILES = 64

# shard indexes a reader keeps per tiles array, oldest out first: at the
# default 2048 tiles a shard 32 kB each, so at most about 32 MB per array
# (the node's read cache keeps them too, engine/storage.py)
MAX_SHARD_INDEXES = 1024


class _TilesArray(_ChunkReads):
    """Direct reads of tiles out of one packed tiles array (engine/packing.py):
    a shard per block of S tiles, each tile one chunk; the shard indexes
    read once and kept (MAX_SHARD_INDEXES)."""

    def __init__(self, storage, kind: str, level: int, pixel_layout: layout.PixelLayout,
                 stats: dict):
        self.storage, self.kind, self.level, self.stats = storage, kind, level, stats
        self.pixel_layout = pixel_layout
        self.per_shard = layout.tiles_shard_tiles(kind, pixel_layout)
        self.tile_shape = (pixel_layout.chunk, pixel_layout.chunk) + packing.KINDS[kind]
        self.dtype = np.dtype(np.uint8)
        self._decoder = _LAYOUT_DECODERS[pixel_layout.codec]
        self._indexes: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def key(self, block: int) -> str:
        return layout.tiles_shard_key(self.kind, self.level, block)

    def read_tiles(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tiles `ids` (k,): their pixels (k, T, T[, 3]) and which are stored
        (the others are all 0)."""
        requests, finish = self.tile_reads(ids)
        return finish(self.storage.read_many(requests))

    def tile_reads(self, ids: np.ndarray):
        """read_tiles in two steps (_span_reads): (requests, the (shard
        object, byte ranges) to read; finish, which takes read_many's
        answers to them and returns the tiles and which are stored). The
        shard indexes are read here, when not kept yet."""
        tiles = np.empty((len(ids),) + self.tile_shape, self.dtype)
        stored = np.zeros(len(ids), bool)
        blocks = ids // self.per_shard
        parts, requests = [], []
        for block in np.unique(blocks).tolist():
            members = np.flatnonzero(blocks == block)
            part = np.empty((len(members),) + self.tile_shape, self.dtype)
            key = self.key(block)
            runs, finish = self._span_reads(key, self._index(block)[ids[members] % self.per_shard], part)
            parts.append((members, part, finish, bool(runs)))
            if runs:
                requests.append((key, runs))

        def finish_all(answers):
            answers = iter(answers)
            for members, part, finish, fetched in parts:
                stored[members] = finish(next(answers) if fetched else [])
                tiles[members] = part
            return tiles, stored
        return requests, finish_all

    def _index(self, block: int) -> np.ndarray:
        table = self._indexes.get(block)
        if table is None:
            table = self._read_index(self.key(block), self.per_shard)
            if len(self._indexes) >= MAX_SHARD_INDEXES:
                self._indexes.popitem(last=False)
            self._indexes[block] = table
        else:
            self._indexes.move_to_end(block)
        return table

    def problems(self, blocks: np.ndarray, required: np.ndarray) -> list[layout.StoreDamaged]:
        """Every damaged piece of the array's shards of `blocks`: a shard
        missing or whose index fails its checksum, a tile failing its
        checksum or size, and a tile of `required` (tile ids that must be
        stored: every image and ELA tile) not stored."""
        found = []
        for block in np.asarray(blocks).tolist():
            key = self.key(block)
            try:
                table = self._index(block)
            except layout.StoreDamaged as exc:
                found.append(exc)
                continue
            base = block * self.per_shard
            need = required[(required >= base) & (required < base + self.per_shard)] - base
            missing = need[table[need, 0] < 0]
            if len(missing):
                found.append(self._damage(key, f"{len(missing)} tiles missing (tile "
                                               f"{base + int(missing[0])} first)"))
            stored = np.flatnonzero(table[:, 0] >= 0)
            tiles = np.empty((min(len(stored), CHECK_TILES),) + self.tile_shape, self.dtype)
            for group in range(0, len(stored), CHECK_TILES):
                spans = table[stored[group:group + CHECK_TILES]]
                try:
                    self._read_spans(key, spans, tiles[:len(spans)], damaged=found)
                except layout.StoreDamaged as exc:   # the shard gone since its index was read
                    found.append(exc)
                    break
        return found


class _PackedView:
    """One image's array (images/<row>/<level>, masks/..., ela/...,
    instances_mask/<row>) read out of the packed tiles: the interface of
    _PixelArray (shape, read, read_box) for the reader's callers."""

    def __init__(self, tiles: _TilesArray, shape: tuple[int, ...], starts: np.ndarray, layered: bool):
        self.tiles, self.shape, self.layered = tiles, shape, layered
        self.starts = starts   # first tile of each layer (instances_mask), or of the one layer

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows y0:y1 and columns x0:x1, every trailing axis whole."""
        return self.read_box((y0, x0) + (0,) * (len(self.shape) - 2), (y1, x1) + self.shape[2:])

    def read_box(self, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """The pixels of [start, stop) along every axis."""
        requests, finish = self.box_reads(start, stop)
        return finish(self.tiles.storage.read_many(requests))

    def box_reads(self, start: tuple[int, ...], stop: tuple[int, ...]):
        """read_box in two steps (_TilesArray.tile_reads): (requests,
        finish taking their answers and returning the pixels). The box must
        lie in the array: past its edge the tile ids would name other tiles
        (the next tile row's, the next image's) in the packed arrays."""
        if len(start) != len(self.shape) or len(stop) != len(self.shape) or any(
                a < 0 or b > n for a, b, n in zip(start, stop, self.shape)):
            raise ValueError(f"box {tuple(start)} to {tuple(stop)}: outside the array's shape {self.shape}")
        if self.layered:   # instances_mask: (layers, H, W)
            (l0, y0, x0), (l1, y1, x1) = start, stop
            height, width = self.shape[1:]
            layers = range(l0, l1)
        else:
            (y0, x0), (y1, x1) = start[:2], stop[:2]
            height, width = self.shape[:2]
            layers = range(1)
        side = self.tiles.pixel_layout.chunk
        out = np.zeros((len(layers), max(0, y1 - y0), max(0, x1 - x0)) + self.tiles.tile_shape[2:],
                       np.uint8)

        def shaped(pixels):
            return pixels if self.layered else pixels[0]
        if y1 <= y0 or x1 <= x0 or not len(layers):
            return [], lambda answers: shaped(out)
        grid_cols = packing.tile_grid(height, width, side)[1]
        ids, cells = zip(*(packing.window_tiles(int(self.starts[layer]), grid_cols, side, y0, y1, x0, x1)
                           for layer in layers))
        requests, finish_tiles = self.tiles.tile_reads(np.concatenate(ids))
        per_layer = len(cells[0])

        def finish(answers):
            tiles, stored = finish_tiles(answers)
            for k, ((ty, tx), was_stored) in enumerate(zip(np.concatenate(cells).tolist(),
                                                           stored.tolist())):
                if not was_stored:
                    continue
                ty0, tx0 = ty * side, tx * side
                a, b = max(y0, ty0), min(y1, ty0 + side)
                c, d = max(x0, tx0), min(x1, tx0 + side)
                out[k // per_layer, a - y0:b - y0, c - x0:d - x0] = \
                    tiles[k, a - ty0:b - ty0, c - tx0:d - tx0]
            return shaped(out)
        return requests, finish


_LAYOUT_DECODERS = {"zstd": _DECODERS["zstd"], "lz4": _DECODERS["blosc"], "lz4hc": _DECODERS["blosc"],
                    "none": None}


def _codec_problem(codecs: list) -> str | None:
    """Why a chunk codec chain is not of the store's family, or None."""
    names = tuple(c.get("name") for c in codecs)
    if (names[:1] != ("bytes",) or names[-1:] != ("crc32c",) or len(names) > 3
            or any(name not in _DECODERS for name in names[1:-1])):
        return (f"codecs {', '.join(map(str, names))}, expected bytes, then zstd, blosc or "
                "nothing, then crc32c")
    return None


def _layout_problem(meta: dict) -> str | None:
    """Why a per-image array's zarr.json is not of the store's pixel layouts, or None."""
    if meta.get("node_type") != "array" or meta.get("data_type") != "uint8":
        return f"not a uint8 array (node_type {meta.get('node_type')!r}, " \
               f"data_type {meta.get('data_type')!r})"
    if (meta.get("chunk_grid", {}).get("name") != "regular"
            or meta.get("chunk_key_encoding", {}).get("name") != "default"
            or meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
            != layout.SEPARATOR):
        return f"chunk grid or key encoding other than regular with {layout.SEPARATOR!r} keys"
    codecs = meta.get("codecs", [])
    config = codecs[0].get("configuration", {}) if codecs else {}
    if (len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed"
            or config.get("index_location", "end") != "end"
            or tuple(config.get("index_codecs", ())) != _INDEX_CODECS):
        return "shards other than sharding_indexed with the index (bytes, crc32c) at the end"
    return _codec_problem(config.get("codecs", []))


class WindowReader:
    """Reads crop windows of images, union masks and ELA from a forgery store.

    Cheap to construct and picklable (holds only the path or URL and the
    storage settings): worker processes make their own and open arrays
    lazily, caching array metadata.
    """

    def __init__(self, store: str | os.PathLike | zarr.Group, *, with_ela: bool = False,
                 pyramid: bool = True, storage: StorageSettings | None = None):
        """`store`: its path or URL (engine/storage.py), or the group
        engine.store.open_store returned; `storage`: how a URL is reached."""
        self._group = store if isinstance(store, zarr.Group) else None
        self.settings = storage or NO_SETTINGS
        self.storage = (storage_of(store) if self._group is not None else
                        open_storage(store, storage=self.settings, generation=layout.build_id))
        # what a worker process reopens (__getstate__): a URL stays a URL
        self.store = store if is_url(store) else str(self.storage.where())
        self.with_ela, self.pyramid = with_ela, pyramid
        self._arrays: dict[str, _PixelArray] = {}
        self._tiles_arrays: dict[tuple[str, int], _TilesArray] = {}
        self._pixel_layout: layout.PixelLayout | None = None
        self._meta = None
        self._verify = True
        # what this reader fetched and decoded, for benchmarks and for tests
        # of what a read costs: requests, stored bytes read, pixel bytes decoded
        self.stats = dict.fromkeys(("requests", "bytes_read", "bytes_decoded"), 0)

    def __getstate__(self):
        return {"store": self.store, "with_ela": self.with_ela, "pyramid": self.pyramid,
                "storage": self.settings}

    def __setstate__(self, state):
        self.__init__(**state)
        self._verify = False   # a worker checks the node-local meta/ columns' sizes, not their bytes

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = layout.open_store(self.store, storage=self.settings)
        return self._group

    @property
    def meta(self):
        """The store's meta/ columns but case_id (engine.store.shared_meta):
        node-local files, memory-mapped."""
        if self._meta is None:
            self._meta = layout.shared_meta(self.group, self.settings, verify=self._verify)
        return self._meta

    def release(self) -> None:
        """Drop this process's pages of the meta/ columns read so far
        (engine/node_arrays.py, NodeArrays.release)."""
        if self._meta is not None:
            self._meta.release()

    @property
    def pixel_layout(self) -> layout.PixelLayout:
        """How the store's pixels are laid out (its root attribute `layout`)."""
        if self._pixel_layout is None:
            self._pixel_layout = layout.PixelLayout(**self.group.attrs["layout"])
        return self._pixel_layout

    def _tiles(self, kind: str, level: int) -> _TilesArray:
        tiles = self._tiles_arrays.get((kind, level))
        if tiles is None:
            tiles = _TilesArray(self.storage, kind, level, self.pixel_layout, self.stats)
            self._tiles_arrays[kind, level] = tiles
        return tiles

    def _packed(self, path: str) -> _PackedView:
        """Array `path` of one image (engine.store.image_path and its
        siblings) as a view of the packed tiles; StoreDamaged "array
        missing" for one the store has not (a row or level past meta/'s, an
        authentic row's masks), as the per-image layout has no such array."""
        kind, row, level = layout.packed_address(path)
        meta = self.meta
        if not 0 <= row < len(meta["label"]) or (kind == "mask" and not meta["label"][row]):
            raise layout.StoreDamaged(self.store, self.storage.where(path), "array missing")
        height, width = packing.level_shape(int(meta["height"][row]), int(meta["width"][row]), level)
        if kind == "instance":
            first, last = (int(v) for v in meta["instance_start"][row:row + 2])
            return _PackedView(self._tiles(kind, 0), (last - first, height, width),
                               meta["instance_tile_start"][first:last], layered=True)
        start = int(meta["tile_start"][row, level]) if level < meta["tile_start"].shape[1] else -1
        if start < 0:
            raise layout.StoreDamaged(self.store, self.storage.where(path), "array missing")
        tiles = self._tiles(kind, level)
        return _PackedView(tiles, (height, width) + packing.KINDS[kind], np.array([start]), layered=False)

    def check_tiles(self, kind: str, level: int, blocks: np.ndarray,
                    required: np.ndarray) -> list[layout.StoreDamaged]:
        """Every damaged piece of the shards of `blocks` of packed tiles
        array (kind, level) (_TilesArray.problems)."""
        return self._tiles(kind, level).problems(blocks, required)

    def _array(self, path: str) -> _PixelArray | _PackedView:
        if self.pixel_layout.packed:
            return self._packed(path)
        arr = self._arrays.get(path)
        if arr is None:
            where = self.storage.where(f"{path}/zarr.json")
            try:
                raw = self.storage.read(f"{path}/zarr.json")
                if raw is None:
                    raise layout.StoreDamaged(self.store, self.storage.where(path), "array missing")
                meta = json.loads(raw)
            except (OSError, ValueError) as exc:
                raise layout.StoreDamaged(self.store, where,
                                          f"unreadable array metadata ({exc})") from None
            problem = _layout_problem(meta)
            if problem:
                raise layout.StoreDamaged(self.store, where, problem)
            try:
                arr = _PixelArray(self.storage, path, meta, self.stats)
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                raise layout.StoreDamaged(self.store, where,
                                          f"unreadable array metadata ({exc!r})") from None
            if len(self._arrays) >= MAX_OPEN_ARRAYS:   # each keeps its shard index: bounded
                self._arrays.pop(next(iter(self._arrays)))
            self._arrays[path] = arr
        return arr

    def read_array(self, path: str) -> np.ndarray:
        """A whole pixel array of the store (e.g. engine.store.image_path(row))."""
        arr = self._array(path)
        return arr.read_box((0,) * len(arr.shape), arr.shape)

    def read_box(self, path: str, start: tuple[int, ...], stop: tuple[int, ...]) -> np.ndarray:
        """[start, stop) along every axis of pixel array `path`, its chunks verified."""
        return self._array(path).read_box(tuple(start), tuple(stop))

    def read_instances(self, row: int) -> list[np.ndarray]:
        """Row `row`'s instance masks, uint8 (H, W) each, [] for an authentic
        row; a forged row without them is a damaged store. Its count comes
        from the node's meta/ columns (self.meta), not from the store's
        meta/n_instances: one value of that is a decode of all of it (a
        single chunk), some 35 ms a row at 10M rows for scoring and verify."""
        count = int(self.meta["n_instances"][row])
        if not count:
            return []
        path = layout.instances_mask_path(row)
        layers = self.read_array(path)
        if len(layers) != count:
            raise layout.StoreDamaged(self.store, self.storage.where(path),
                                      f"{len(layers)} instance layers, meta/n_instances says {count}")
        return list(layers)

    def choose_level(self, row: int, window_h: float, window_w: float, out_size: int) -> int:
        """Coarsest level whose pixels across the window are still >= out_size
        (always 0 without the pyramid)."""
        if not self.pyramid:
            return 0
        height, width = int(self.meta["height"][row]), int(self.meta["width"][row])
        levels = layout.level_count(height, width)
        shrink = min(window_h, window_w) / out_size
        return max(0, min(levels - 1, int(math.floor(math.log2(shrink))) if shrink >= 1 else 0))

    def block_of(self, row: int, window, out_size: int) -> tuple[int, tuple, tuple]:
        """Where read() reads window (y0, x0, y1, x1, level-0 pixels) of
        image `row`: its level, the covering block (y0, x0, y1, x1, whole
        pixels of that level) and the window in that level's pixels."""
        y0, x0, y1, x1 = (int(v) for v in window)
        level = self.choose_level(row, y1 - y0, x1 - x0, out_size)
        height, width = self._array(layout.image_path(row, level)).shape[:2]
        sy, sx = height / int(self.meta["height"][row]), width / int(self.meta["width"][row])
        fy0, fx0, fy1, fx1 = y0 * sy, x0 * sx, y1 * sy, x1 * sx
        by0, bx0 = int(math.floor(fy0)), int(math.floor(fx0))
        by1 = min(height, max(by0 + 1, int(math.ceil(fy1))))
        bx1 = min(width, max(bx0 + 1, int(math.ceil(fx1))))
        return level, (by0, bx0, by1, bx1), (fy0, fx0, fy1, fx1)

    def read(self, row: int, window, out_size: int) -> WindowBlock:
        """The pixels covering window (y0, x0, y1, x1, level-0 pixels) of image `row`."""
        level, (by0, bx0, by1, bx1), (fy0, fx0, fy1, fx1) = self.block_of(row, window, out_size)
        image = self._array(layout.image_path(row, level))
        paths = {"image": layout.image_path(row, level)}
        if self.with_ela:
            paths["ela"] = layout.ela_path(row, level)
        if self.meta["label"][row]:
            paths["mask"] = layout.mask_path(row, level)
        read = self._read_together({name: self._array(path) for name, path in paths.items()},
                                   (by0, bx0), (by1, bx1))
        pixels = read["image"]
        ela = read["ela"][..., None] if self.with_ela else None
        mask = read["mask"] if "mask" in read else np.zeros((by1 - by0, bx1 - bx0), np.uint8)
        roi_start = np.array([fy0 - by0, fx0 - bx0], np.float32)
        roi_end = np.array([min(fy1, by1) - by0, min(fx1, bx1) - bx0], np.float32)
        scale = image.shape[0] / int(self.meta["height"][row]) * image.shape[1] / int(self.meta["width"][row])
        return WindowBlock(pixels, mask[..., None], ela, roi_start, roi_end, level, float(np.sqrt(scale)))


    def _read_together(self, arrays: dict, start: tuple[int, int], stop: tuple[int, int]) -> dict:
        """Rows and columns [start, stop) of each array: a packed store's
        tiles of all of them fetched in one read_many call (one round trip
        from object storage), per-image arrays one after another."""
        if not self.pixel_layout.packed:
            return {name: arr.read(start[0], stop[0], start[1], stop[1]) for name, arr in arrays.items()}
        reads = {name: arr.box_reads(start + (0,) * (len(arr.shape) - 2), stop + arr.shape[2:])
                 for name, arr in arrays.items()}
        answers = iter(self.storage.read_many([r for requests, _ in reads.values() for r in requests]))
        return {name: finish([next(answers) for _ in requests])
                for name, (requests, finish) in reads.items()}


# The errors a reader worker's failure is carried back as, by the name its
# traceback gives them (`module.Class: message`): DALI hands a worker's error
# back to the training process as text only, and this explicit map turns it
# into an error of the same class with the same message (a StoreDamaged stays
# one). Most specific first is not needed: names are exact.
CARRIED_ERRORS = {f"{kind.__module__}.{kind.__qualname__}": kind
                  for kind in (layout.StoreError, layout.StoreDamaged, layout.StoreUnreachable,
                               StorageUnavailable)}


def carried_error(text: str) -> Exception | None:
    """The error whose traceback `text` ends with, when it is one of
    CARRIED_ERRORS, rebuilt as that class with its message; otherwise None."""
    lines = text.strip().splitlines()
    name, sep, message = lines[-1].partition(": ") if lines else ("", "", "")
    kind = CARRIED_ERRORS.get(name)
    if kind is None or not sep:
        return None
    error = kind.__new__(kind)   # StoreDamaged's constructor takes the parts, not the text
    Exception.__init__(error, message)
    if isinstance(error, layout.StoreDamaged):
        # its message is "{where}: {problem}; the store is damaged: ..." (engine/store.py)
        error.where, _, rest = message.partition(": ")
        error.problem = rest.split("; the store is damaged")[0]
    return error
