"""The packed pixel layout (store version 5): every image's tiles in a few
large shard objects, found through one index in meta/.

A store of ten million images cannot be an object (or a zarr.json) per
image and array: uploads pay per object and readers per metadata request
(docs/performance.md, "Scale"). So the tiles of every image, per kind and
pyramid level, are rows of one zarr array (engine.store.tiles_path):

    tiles/<kind>/<level>   uint8 (n_blocks x S, T, T[, 3])
                           one tile of T x T pixels per row of the array,
                           one chunk per tile, one shard object per S tiles

kinds: image (RGB), ela, mask (the union, 0/1) at every pyramid level, and
instance (each instance layer, 0/1) at level 0. Rows of the store are packed
in blocks (plan_blocks): block b owns tiles [b S, (b+1) S) of every tiles
array, so it is one shard object per array, written whole by the one task
that decodes the block's images (preprocess/build_zarr.py); a later append
adds blocks, never touching earlier shards. An image's tiles at a level
are consecutive, row-major over its tile grid (tile_grid), starting at
meta/tile_start[row, level] (-1 for a level it has not); an instance layer's
start at instances/tile_start. A window's tiles along one tile row are thus
adjacent in their shard: one byte range.

Every tile is a chunk of zarr's sharding_indexed codec (the same codecs as
engine.store.PixelLayout: compressed, then its CRC-32C), the shard's index
of (offset, size) per tile at its end with its own CRC-32C, so zarr-python
reads every array as it is; image and ELA tiles are always stored (edge
tiles padded with 0), mask and instance tiles only where not all 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# kind: the trailing axes of its tiles after (T, T)
KINDS = {"image": (3,), "ela": (), "mask": (), "instance": ()}
LEVELED_KINDS = ("image", "ela", "mask")   # one array per pyramid level; instance: level 0 only
INDEX_ENTRY_BYTES = 16                     # a shard index entry: offset, size, uint64 each


def level_shape(height: int, width: int, level: int) -> tuple[int, int]:
    """(H, W) of pyramid level `level`: halved, rounded down, per level
    (engine.store.downsample_pixels)."""
    return height >> level, width >> level


def tile_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """Tiles (down, across) covering an array of this size."""
    return -(-height // tile), -(-width // tile)


def tile_counts(height: int, width: int, levels: int, tile: int) -> list[int]:
    """Tiles of each of an image's `levels` pyramid levels."""
    return [int(np.prod(tile_grid(*level_shape(height, width, level), tile))) for level in range(levels)]


@dataclass(frozen=True)
class BlockPlan:
    """Where every row's tiles go (plan_blocks)."""

    block: np.ndarray                # int64 (N,): the block of each row
    tile_start: np.ndarray           # int64 (N, max_levels): first tile per level, -1 absent
    instance_tile_start: np.ndarray  # int64 (M,): first tile of each instance layer
    n_blocks: int                    # blocks of the store, earlier ones included

    def rows_of(self, block: int) -> np.ndarray:
        return np.flatnonzero(self.block == block)


class TooManyTiles(ValueError):
    """An image with more tiles at one level than a shard holds."""


def instance_shard_tiles(shard_tiles: int) -> int:
    """Tiles of a shard of tiles/instance/0: every instance layer of an image
    covers the whole image (its empty tiles cost an index entry each), so
    an image with several layers needs several images' worth of tiles."""
    return INSTANCE_SHARD_SHARE * shard_tiles


INSTANCE_SHARD_SHARE = 8


def plan_blocks(heights: np.ndarray, widths: np.ndarray, n_instances: np.ndarray, levels: np.ndarray,
                *, tile: int, shard_tiles: int, max_levels: int, first_block: int = 0) -> BlockPlan:
    """Pack rows, in order, into blocks of at most `shard_tiles` tiles in
    every leveled tiles array and instance_shard_tiles in tiles/instance/0:
    a row goes to the current block while each of its levels and its
    instance layers still fit, else it opens the next block. Deterministic in the sizes alone, so the plan is known
    before any image is decoded (sizes come from file headers) and a
    rerun plans the same. `first_block`: the blocks an append builds on."""
    n = len(heights)
    block = np.empty(n, np.int64)
    tile_start = np.full((n, max_levels), -1, np.int64)
    instance_start = np.empty(int(np.sum(n_instances)), np.int64)
    used = np.zeros(max_levels, np.int64)
    used_instance, current, k = 0, first_block, 0
    instance_tiles = instance_shard_tiles(shard_tiles)
    for row in range(n):
        counts = tile_counts(int(heights[row]), int(widths[row]), int(levels[row]), tile)
        layers = int(n_instances[row])
        if max(counts) > shard_tiles or counts[0] * layers > instance_tiles:
            raise TooManyTiles(f"row {row}: {max(counts)} tiles a level and {counts[0] * layers} "
                               f"of instance layers, more than a shard's {shard_tiles} and "
                               f"{instance_tiles}")
        if (any(used[level] + c > shard_tiles for level, c in enumerate(counts))
                or used_instance + counts[0] * layers > instance_tiles):
            current += 1
            used[:] = 0
            used_instance = 0
        block[row] = current
        base = current * shard_tiles
        for level, count in enumerate(counts):
            tile_start[row, level] = base + used[level]
            used[level] += count
        for _ in range(layers):   # tiles/instance/0's blocks are instance_tiles long
            instance_start[k] = current * instance_tiles + used_instance
            used_instance += counts[0]
            k += 1
    n_blocks = int(block.max()) + 1 if n else first_block
    return BlockPlan(block, tile_start, instance_start, n_blocks)


def tile_pieces(pixels: np.ndarray, tile: int):
    """(tile number in row-major grid order, pixels) of every tile of a
    (H, W[, C]) array; edge tiles are smaller than `tile`."""
    rows, cols = tile_grid(pixels.shape[0], pixels.shape[1], tile)
    for ty in range(rows):
        for tx in range(cols):
            yield ty * cols + tx, pixels[ty * tile:(ty + 1) * tile, tx * tile:(tx + 1) * tile]


def padded_tile(piece: np.ndarray, tile: int) -> np.ndarray:
    """An edge tile stored full size, padded with the fill value 0."""
    if piece.shape[:2] == (tile, tile):
        return piece
    out = np.zeros((tile, tile) + piece.shape[2:], piece.dtype)
    out[:piece.shape[0], :piece.shape[1]] = piece
    return out


def shard_bytes(chunks: dict[int, bytes], shard_tiles: int, checksum) -> bytes:
    """One shard object: the encoded chunks in tile order (adjacent tiles
    adjacent in the object), then the index, (offset, size) per tile as
    uint64 little-endian, 2^64 - 1 for a tile not stored, then the index's
    CRC-32C (`checksum`: engine.store.checksum_bytes)."""
    index = np.full((shard_tiles, 2), np.iinfo(np.uint64).max, "<u8")
    parts, offset = [], 0
    for position in sorted(chunks):
        data = chunks[position]
        index[position] = offset, len(data)
        parts.append(data)
        offset += len(data)
    table = index.tobytes()
    return b"".join(parts + [table, checksum(table)])


def shard_index_bytes(shard_tiles: int) -> int:
    """Bytes of a shard's index at its end, with its CRC-32C."""
    return INDEX_ENTRY_BYTES * shard_tiles + 4


def window_tiles(start: int, grid_cols: int, tile: int, y0: int, y1: int, x0: int, x1: int):
    """The tiles of rows y0:y1, columns x0:x1 of an image whose tiles begin
    at tile `start` with `grid_cols` tiles across: (tile ids (k,), their
    (ty, tx) in the grid (k, 2)), row-major."""
    ty = np.arange(y0 // tile, (y1 - 1) // tile + 1)
    tx = np.arange(x0 // tile, (x1 - 1) // tile + 1)
    grid = np.stack(np.meshgrid(ty, tx, indexing="ij"), -1).reshape(-1, 2)
    return start + grid[:, 0] * grid_cols + grid[:, 1], grid


def shard_blocks(tile_start: np.ndarray, label: np.ndarray, n_instances: np.ndarray,
                 shard_tiles: int) -> dict[tuple[str, int], np.ndarray]:
    """The blocks whose shard every tiles array (kind, level) has: each
    block with a row at that level (forged rows for masks, rows with
    instance layers for instances), whether or not its tiles there are all
    0, so a shard missing is always damage. A block is one shard object
    of each array it has tiles in (the build writes exactly these)."""
    found = {}
    block = tile_start // shard_tiles
    for level in range(tile_start.shape[1]):
        present = tile_start[:, level] >= 0
        if not present.any():
            continue
        found["image", level] = found["ela", level] = np.unique(block[present, level])
        forged = present & (label > 0)
        if forged.any():
            found["mask", level] = np.unique(block[forged, level])
    layered = n_instances > 0
    if layered.any():
        found["instance", 0] = np.unique(block[layered, 0])
    return found


def stored_tiles(tile_start: np.ndarray, heights: np.ndarray, widths: np.ndarray, tile: int,
                 level: int) -> np.ndarray:
    """Every tile id of level `level` of the rows that have it: image and
    ELA tiles, which are always stored."""
    rows = np.flatnonzero(tile_start[:, level] >= 0)
    ids = [np.arange(tile_start[r, level], tile_start[r, level] + np.prod(
        tile_grid(*level_shape(int(heights[r]), int(widths[r]), level), tile))) for r in rows]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)
