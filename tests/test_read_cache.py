"""The read cache (engine.storage.CachedStorage) as a block cache, over an
inner storage that counts what it is asked: a second pass over other windows
of the same objects makes no request, any range (across block edges, past
the object's end) gives the object's bytes, a trim lists one group of
buckets, keeps the folder near its limit and removes the least recently
read, a damaged block is read again,
and generations (and block sizes) never share entries. Against the real S3
API: tests/test_object_storage.py."""
from __future__ import annotations

import os
import random

import pytest

from engine import storage as storages

BLOCK = 1000   # small blocks: objects of a few kB span several
# object sizes: under one block, exactly one and two blocks, and ragged
SIZES = {"short": 999, "one": BLOCK, "two": 2 * BLOCK, "ragged": 4321, "long": 10_007}


class Counting:
    """A folder's objects (LocalStorage), each call recorded."""

    def __init__(self, root):
        self.local = storages.LocalStorage(root)
        self.calls: list[tuple] = []
        self.batches = 0

    def where(self, key=""):
        return self.local.where(key)

    def read(self, key):
        self.calls.append(("read", key))
        return self.local.read(key)

    def read_ranges(self, key, ranges):
        self.calls.append(("read_ranges", key, list(ranges)))
        return self.local.read_ranges(key, ranges)

    def read_many(self, requests):
        """Each request recorded as its read_ranges; `batches` counts the calls."""
        self.batches += 1
        return [self.read_ranges(key, ranges) for key, ranges in requests]

    def read_suffix(self, key, length):
        self.calls.append(("read_suffix", key, length))
        return self.local.read_suffix(key, length)


@pytest.fixture
def inner(tmp_path):
    rng = random.Random(0)
    for key, size in SIZES.items():
        path = tmp_path / "objects" / "shards" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return Counting(tmp_path / "objects")


def cache(inner, folder, generation="aaa", block=BLOCK, limit=10**9, kind=storages.CachedStorage):
    return kind(inner, folder, limit, lambda _: generation, block_bytes=block)


def key(name):
    return f"shards/{name}"


def truth(inner, name, ranges):
    return inner.local.read_ranges(key(name), ranges)


def test_a_read_fetches_its_missing_blocks_in_one_call_adjacent_ones_as_one_range(inner, tmp_path):
    cached = cache(inner, tmp_path / "cache")
    ranges = [(100, 200), (1500, 1600), (5500, 5600)]   # blocks 0 and 1, then 5
    assert cached.read_ranges(key("long"), ranges) == truth(inner, "long", ranges)
    assert inner.calls == [("read_ranges", key("long"), [(0, 2000), (5000, 6000)])]
    inner.calls.clear()
    # block 1 kept, blocks 2-3 fetched as one range
    assert cached.read_ranges(key("long"), [(1900, 3100)]) == truth(inner, "long", [(1900, 3100)])
    assert inner.calls == [("read_ranges", key("long"), [(2000, 4000)])]


def test_a_second_pass_over_other_windows_of_the_same_objects_makes_no_request(inner, tmp_path):
    rng = random.Random(1)
    names = ["ragged", "long"]

    def windows():   # an epoch: three windows of a few tiles each per object, all in one call
        found = []
        for name in names:
            starts = sorted(rng.randrange(SIZES[name] - 300) for _ in range(3))
            found.append((name, [(start, start + rng.randrange(50, 300)) for start in starts]))
        return found

    cached = cache(inner, tmp_path / "cache")
    for name in names:   # a first epoch whose windows touched every block
        size = SIZES[name]
        ranges = [(start, min(start + 50, size)) for start in range(0, size, BLOCK)]
        assert cached.read_ranges(key(name), ranges) == truth(inner, name, ranges)
    assert len(inner.calls) == len(names)   # each object's blocks in one call
    inner.calls.clear()
    # another process (a fresh cache object) on the same folder, other windows
    again = cache(inner, tmp_path / "cache")
    for name, ranges in windows():
        assert again.read_ranges(key(name), ranges) == truth(inner, name, ranges)
    assert inner.calls == []


def test_a_window_inside_the_blocks_of_earlier_windows_hits(inner, tmp_path):
    """The case the blocks are for (exact ranges would miss it): windows of
    one epoch leave the blocks they touched, and a window of the next
    inside those blocks, overlapping neither, hits."""
    cached = cache(inner, tmp_path / "cache")
    cached.read_ranges(key("long"), [(2100, 2400), (2600, 2900)])   # block 2
    inner.calls.clear()
    assert cached.read_ranges(key("long"), [(2420, 2580)]) == truth(inner, "long", [(2420, 2580)])
    assert inner.calls == []


def test_any_ranges_give_the_objects_bytes(inner, tmp_path):
    """Random reads (fixed seed) across block edges and past the end, with
    the cache part filled: the bytes of the object, short where it ends."""
    rng = random.Random(2)
    cached = cache(inner, tmp_path / "cache")
    for _ in range(400):
        name = rng.choice(list(SIZES))
        size = SIZES[name]
        ranges = []
        for _ in range(rng.randrange(1, 5)):
            start = rng.choice([rng.randrange(size), size - 1, (size - 1) // BLOCK * BLOCK,
                                rng.randrange(size // BLOCK + 1) * BLOCK - 1])
            start = max(0, start)
            edge = (start // BLOCK + 1) * BLOCK
            stop = rng.choice([start + rng.randrange(1, 3 * BLOCK), size,
                               size + rng.randrange(1, 2 * BLOCK), edge, edge + 1])
            ranges.append((start, max(stop, start + 1)))
        assert cached.read_ranges(key(name), ranges) == truth(inner, name, ranges), (name, ranges)
    # past the end of an object that ends at a block's edge: an empty last
    # block, kept, and read from the folder after
    fresh = cache(inner, tmp_path / "edge")
    assert fresh.read_ranges(key("two"), [(0, 2 * BLOCK)]) == truth(inner, "two", [(0, 2 * BLOCK)])
    inner.calls.clear()
    past = [(2 * BLOCK - 10, 2 * BLOCK + 10)]
    assert fresh.read_ranges(key("two"), past) == truth(inner, "two", past)
    assert inner.calls == [("read_ranges", key("two"), [(2 * BLOCK, 3 * BLOCK)])]
    inner.calls.clear()
    assert fresh.read_ranges(key("two"), past + [(2 * BLOCK - 1, 5 * BLOCK)]) == \
        truth(inner, "two", past + [(2 * BLOCK - 1, 5 * BLOCK)])
    assert inner.calls == []
    # a read past the end keeps the blocks up to the end, none after it
    far = cache(inner, tmp_path / "far")
    assert far.read_ranges(key("ragged"), [(3900, 9000)]) == truth(inner, "ragged", [(3900, 9000)])
    assert len(entry_files(tmp_path / "far")) == 2


def test_a_missing_object_reads_as_none_and_keeps_nothing(inner, tmp_path):
    cached = cache(inner, tmp_path / "cache")
    assert cached.read_ranges(key("nothing"), [(0, 10)]) is None
    assert cached.read_suffix(key("nothing"), 10) is None and cached.read(key("nothing")) is None
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def entry_files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_a_damaged_block_is_dropped_and_read_again(inner, tmp_path):
    cached = cache(inner, tmp_path / "cache")
    whole = [(0, SIZES["ragged"])]
    cached.read_ranges(key("ragged"), whole)
    entries = entry_files(tmp_path / "cache")
    assert len(entries) == 5   # four whole blocks and the short last one
    damaged = cached._block_path(key("ragged"), 2)
    data = bytearray(damaged.read_bytes())
    data[10] ^= 1
    damaged.write_bytes(bytes(data))
    inner.calls.clear()
    assert cached.read_ranges(key("ragged"), whole) == truth(inner, "ragged", whole)
    assert inner.calls == [("read_ranges", key("ragged"), [(2 * BLOCK, 3 * BLOCK)])]
    assert entry_files(tmp_path / "cache") == entries
    inner.calls.clear()   # written again, good
    assert cached.read_ranges(key("ragged"), whole) == truth(inner, "ragged", whole)
    assert inner.calls == []


def test_generations_and_block_sizes_never_share_entries(inner, tmp_path):
    """Two builds of a store with the same keys and other bytes (the inner
    storages), through one folder: each reads its own; a cache with another
    block size reads none of the blocks of this one."""
    other = tmp_path / "rebuilt"
    (other / "shards").mkdir(parents=True)
    rebuilt = Counting(other)
    (other / "shards" / "long").write_bytes(bytes(255 - b for b in inner.local.read(key("long"))))
    whole = [(0, SIZES["long"])]
    old = cache(inner, tmp_path / "cache", generation="aaa").read_ranges(key("long"), whole)
    new_cache = cache(rebuilt, tmp_path / "cache", generation="bbb")
    new = new_cache.read_ranges(key("long"), whole)
    assert new == truth(rebuilt, "long", whole) != old
    assert len(rebuilt.calls) == 1
    per_generation = [{p.name for p in entry_files(tmp_path / "cache" / g)} for g in ("aaa", "bbb")]
    assert all(per_generation) and not per_generation[0] & per_generation[1]
    inner.calls.clear()
    halves = cache(inner, tmp_path / "cache", generation="aaa", block=BLOCK // 2)
    assert halves.read_ranges(key("long"), whole) == old
    assert len(inner.calls) == 1
    # no generation: read straight through, nothing kept
    inner.calls.clear()
    uncached = cache(inner, tmp_path / "none", generation="")
    assert uncached.read_ranges(key("long"), [(5, 50)]) == truth(inner, "long", [(5, 50)])
    assert inner.calls == [("read_ranges", key("long"), [(5, 50)])]
    assert not (tmp_path / "none").exists()


class FewBuckets(storages.CachedStorage):
    """16 buckets of groups of one, so that a small test folder trims by bucket."""

    BUCKETS = 16
    TRIM_GROUP_BLOCKS = 8


def test_a_trim_lists_one_bucket_and_keeps_the_folder_near_its_limit(tmp_path, monkeypatch):
    block = 64
    limit = FewBuckets.BUCKETS * FewBuckets.TRIM_GROUP_BLOCKS * block   # a group of one bucket
    objects = tmp_path / "objects"
    (objects / "shards").mkdir(parents=True)
    rng = random.Random(3)
    for k in range(8):
        (objects / "shards" / str(k)).write_bytes(rng.randbytes(limit))   # 8x the limit in all
    cached = FewBuckets(Counting(objects), tmp_path / "cache", limit, lambda _: "aaa",
                        block_bytes=block)
    assert cached.group_buckets == 1
    # a previous build's entries
    old = cache(Counting(objects), tmp_path / "cache", generation="old", block=block,
                kind=FewBuckets)
    old.read_ranges("shards/0", [(0, 16 * block)])

    listed, trims = [], []
    scandir, trim = os.scandir, cached.trim

    def listing(path):
        listed[-1].append(os.fspath(path))
        return scandir(path)

    def counted(group):
        listed.append([])
        trims.append(group)
        trim(group)
    monkeypatch.setattr(os, "scandir", listing)
    monkeypatch.setattr(cached, "trim", counted)
    for k in range(8):
        cached.read_ranges(f"shards/{k}", [(0, limit)])
    monkeypatch.undo()

    assert len(trims) > FewBuckets.BUCKETS   # each bucket trimmed, some several times
    folder = str(tmp_path / "cache")
    for group, paths in zip(trims, listed):
        # the cache folder (its generations), then the group's bucket in each generation
        assert paths[0] == folder and sorted(paths[1:]) == \
            [os.path.join(folder, g, f"{group:02x}") for g in ("aaa", "old")]
    size = sum(p.stat().st_size for p in entry_files(tmp_path / "cache"))
    # each group under its share after a trim, plus what was written since
    # (an eighth), with the entries' 4-byte trailers
    assert limit / 2 < size <= limit * (1 + 1 / FewBuckets.TRIM_SHARE) * (block + 4) / block
    # the old build's blocks, least recently used, went first
    assert not entry_files(tmp_path / "cache" / "old")


def test_a_trim_keeps_what_was_read_recently(tmp_path):
    """Blocks read again and again between writes that fill the folder
    many times over stay: a trim removes the least recently read."""
    block = 64
    limit = FewBuckets.BUCKETS * FewBuckets.TRIM_GROUP_BLOCKS * block
    objects = tmp_path / "objects"
    (objects / "shards").mkdir(parents=True)
    rng = random.Random(4)
    for k in range(5):
        (objects / "shards" / str(k)).write_bytes(rng.randbytes(limit))
    inner = Counting(objects)
    cached = cache(inner, tmp_path / "cache", block=block, limit=limit, kind=FewBuckets)
    often = [(0, 16 * block)]
    cached.read_ranges("shards/0", often)
    for k in range(1, 5):
        for start in range(0, limit, 4 * block):
            cached.read_ranges(f"shards/{k}", [(start, start + 4 * block)])
            assert cached.read_ranges("shards/0", often) == inner.local.read_ranges("shards/0", often)
    assert [call for call in inner.calls if call[1] == "shards/0"] == \
        [("read_ranges", "shards/0", [(0, 16 * block)])]
    # and the folder was trimmed meanwhile (five times the limit read)
    assert sum(p.stat().st_size for p in entry_files(tmp_path / "cache")) <= \
        limit * (1 + 1 / FewBuckets.TRIM_SHARE) * (block + 4) / block


def test_reads_of_several_objects_fetch_their_missing_blocks_in_one_call(inner, tmp_path):
    """read_many: a sample's ranges in several shards are one inner call
    (one round trip), and each answer is its object's bytes."""
    cached = storages.CachedStorage(inner, tmp_path / "cache", 10**9, lambda _: "build1", BLOCK)
    requests = [(key("long"), [(10, 20), (4000, 4100)]), (key("ragged"), [(0, 5)]),
                (key("short"), [(990, 999)]), ("shards/absent", [(0, 1)])]
    answers = cached.read_many(requests)
    assert inner.batches == 1
    assert answers[:3] == [inner.local.read_ranges(k, r) for k, r in requests[:3]]
    assert answers[3] is None
    inner.calls.clear()
    assert cached.read_many(requests[:3]) == answers[:3]
    assert inner.calls == []
