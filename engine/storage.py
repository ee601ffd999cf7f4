"""Where a store's bytes live: the one seam between the engine and storage.

The bottom layer of a store: bytes by key, nothing of what they mean. The
store's layout (engine/store.py: its arrays, meta/, root attributes, version
and completion, and StoreDamaged) sits on top of this module, which imports
nothing of it and names no array: the reader, the builder and verify_store
open a store's bytes here and read its layout there (docs/architecture.md,
"Layers").

Objects are named by key (zarr v3's keys, "path/to/array/c.0.0" or
"zarr.json") and read through a Storage: whole objects, byte ranges of one
(a shard's inner chunks) and its last n bytes (a shard's index).

LocalStorage reads a folder with positioned reads (os.pread): zarr-python's
asyncio path costs about 0.3 ms per read before any decoding
(docs/performance.md, "Store"), more than decoding a small chunk. ZarrStorage
serves any other zarr Store (a MemoryStore in tests, an FsspecStore for a
URL) through zarr's own store API, all of one call's ranges requested
concurrently. CachedStorage keeps what is read from a URL (byte ranges as
fixed-size blocks of their object) in a bounded local folder, so a second
epoch (or another rank on the node) reads them from local disk.

A store is named by a local path or a URL (s3://, gs://, anything fsspec
reads; file:// is a local path). open_storage is the one way from that name
to its bytes, for the reader, the builder, mining, prediction and evaluation
alike. Credentials and endpoint come from the environment as each fsspec
back end reads them (for s3://: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE); further fsspec
options, the cache and the mining folder travel as one StorageSettings (the
CLIs' --storage-option, --cache, --cache-limit-gb and --mining-dir), passed
to whatever opens a store and pickled with the readers into worker processes
(docs/object_storage.md). Storage that refuses the credentials or cannot be
reached raises StorageUnavailable (explained); the layout layer turns it into
the store errors its callers expect.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable


class LocalStorage:
    """A store in a folder of a local or shared file system."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def where(self, key: str = "") -> Path:
        """The file of `key`, for messages."""
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes | None:
        """The whole object, or None when there is none."""
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """Bytes [start, stop) of each range (shorter where the object ends
        first), or None when there is no such object."""
        try:
            fd = os.open(self.root / key, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return [os.pread(fd, stop - start, start) for start, stop in ranges]
        finally:
            os.close(fd)

    def read_many(self, requests: list[tuple[str, list[tuple[int, int]]]]) -> list[list[bytes] | None]:
        """read_ranges of each (key, ranges): positioned reads, one after another."""
        return [self.read_ranges(key, ranges) for key, ranges in requests]

    def read_suffix(self, key: str, length: int) -> bytes | None:
        """The last `length` bytes (all of a shorter object), or None."""
        try:
            fd = os.open(self.root / key, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, min(length, size), max(0, size - length))
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        try:
            path.write_bytes(data)
        except FileNotFoundError:   # folders made only when missing: a build writes many files
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def remove(self, prefix: str) -> None:
        """Every object under `prefix`."""
        if (self.root / prefix).exists():   # a stat: cheaper than rmtree's failing calls
            shutil.rmtree(self.root / prefix)

    def keys(self, prefix: str) -> list[str]:
        """Keys of every object under `prefix` (a folder's files)."""
        folder = self.root / prefix
        return [f.relative_to(self.root).as_posix() for f in folder.rglob("*") if f.is_file()]


def sync(coroutine):
    """Run `coroutine` on zarr's event loop (zarr imported here: this module
    also serves the CLIs' flags, and predict.py --images runs without zarr)."""
    from zarr.core.sync import sync as zarr_sync
    return zarr_sync(coroutine)


class ZarrStorage:
    """Any other zarr Store, through zarr's store API."""

    def __init__(self, store, name: str | None = None):
        """`store`: a zarr Store; `name`: its URL, for messages (else the URL
        of fsspec's store, or zarr's description of another)."""
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype
        fs = getattr(store, "fs", None)
        self.store = store
        self.name = name or (fs.unstrip_protocol(store.path) if fs is not None else str(store))
        self._prototype = default_buffer_prototype()
        self._range, self._suffix = RangeByteRequest, SuffixByteRequest

    def where(self, key: str = "") -> str:
        return f"{self.name}/{key}" if key else self.name

    def _sync(self, coroutine):
        """Run `coroutine`; a refused credential or an unreachable endpoint
        (botocore has already retried) becomes a StorageUnavailable naming
        the store, so a loader worker's failure reaches the user as one line."""
        try:
            return sync(coroutine)
        except Exception as exc:
            problem = explained(self.name, exc)
            if problem is None:
                raise
            raise problem from exc

    def _get(self, key: str, byte_range=None):
        return self.store.get(key, self._prototype, byte_range)

    def read(self, key: str) -> bytes | None:
        found = self._sync(self._get(key))
        return None if found is None else found.to_bytes()

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        return self.read_many([(key, ranges)])[0]

    def read_many(self, requests: list[tuple[str, list[tuple[int, int]]]]) -> list[list[bytes] | None]:
        """read_ranges of each (key, ranges), every range of every object
        requested at once: one round trip for all of them."""
        async def all_ranges():
            return await asyncio.gather(*(self._get(key, self._range(start, stop))
                                          for key, ranges in requests for start, stop in ranges))
        found = iter(self._sync(all_ranges()))
        answers = []
        for _, ranges in requests:
            mine = [next(found) for _ in ranges]
            answers.append(None if any(f is None for f in mine) else [f.to_bytes() for f in mine])
        return answers

    def read_suffix(self, key: str, length: int) -> bytes | None:
        found = self._sync(self._get(key, self._suffix(length)))
        return None if found is None else found.to_bytes()

    def exists(self, key: str) -> bool:
        return self._sync(self.store.exists(key))

    def remove(self, prefix: str) -> None:
        self._sync(self.store.delete_dir(prefix))

    def write(self, key: str, data: bytes) -> None:
        self._sync(self.store.set(key, self._prototype.buffer.from_bytes(data)))

    def keys(self, prefix: str) -> list[str]:
        async def listed():
            return [key async for key in self.store.list_prefix(prefix)]
        return self._sync(listed())

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Size of every object under `prefix`, by key."""
        keys = self.keys(prefix)

        async def sized():
            return await asyncio.gather(*(self.store.getsize(key) for key in keys))
        return dict(zip(keys, self._sync(sized())))

    def write_many(self, items: list[tuple[str, bytes]]) -> None:
        """Write every (key, data), all requests in flight together."""
        async def written():
            await asyncio.gather(*(self.store.set(key, self._prototype.buffer.from_bytes(data))
                                   for key, data in items))
        self._sync(written())

    def delete(self, keys: list[str]) -> None:
        async def deleted():
            await asyncio.gather(*(self.store.delete(key) for key in keys))
        self._sync(deleted())

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only when no object has that name (S3's If-None-Match:
        one of two racing writers wins); False when one exists. A file
        system without conditional writes gets a check, then a write."""
        fs = getattr(self.store, "fs", None)
        if fs is not None:
            try:
                self._sync(fs._pipe_file(f"{self.store.path}/{key}", data, mode="create"))
                return True
            except FileExistsError:
                return False
            except TypeError:   # this file system's _pipe_file has no mode
                pass
        if self.exists(key):
            return False
        self.write(key, data)
        return True

    # Conditional operations on one small object (a build's lock object):
    # S3's If-Match on the object's ETag, so that of two writers only the
    # one that saw the current version succeeds, and a delete never removes
    # a version its caller did not see. Other file systems get the same
    # answers from a read, a comparison and the operation, which a writer
    # in between can defeat.

    def _s3(self, key: str):
        """(s3fs file system, bucket, key) of `key` where the store is on S3, else None."""
        fs = getattr(self.store, "fs", None)
        if fs is None or not hasattr(fs, "_call_s3"):
            return None
        bucket, name, _ = fs.split_path(f"{self.store.path}/{key}")
        return fs, bucket, name

    async def _s3_call(self, key: str, method: str, **kwargs):
        """botocore's `method` on `key`, or None when S3 answers that the
        object is gone or its version is not the one given."""
        fs, bucket, name = self._s3(key)
        await fs.set_session()
        client = await fs.get_s3(bucket)
        try:
            return await getattr(client, method)(Bucket=bucket, Key=name, **kwargs)
        except Exception as exc:
            if _s3_error_code(exc) in ("NoSuchKey", "PreconditionFailed",
                                       "ConditionalRequestConflict", "404"):
                return None
            raise

    def read_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object and a tag of its version (S3's ETag, elsewhere a
        digest of its bytes), or None when there is none."""
        if self._s3(key) is None:
            data = self.read(key)
            return None if data is None else (data, hashlib.sha256(data).hexdigest())

        async def tagged():
            found = await self._s3_call(key, "get_object")
            if found is None:
                return None
            async with found["Body"] as body:
                return await body.read(), found["ETag"]
        return self._sync(tagged())

    def replace_tagged(self, key: str, data: bytes, tag: str) -> str | None:
        """Write `key` only while its version is `tag`; the new version's
        tag, or None when it has changed or is gone."""
        if self._s3(key) is None:
            found = self.read_tagged(key)
            if found is None or found[1] != tag:
                return None
            self.write(key, data)
            return hashlib.sha256(data).hexdigest()
        done = self._sync(self._s3_call(key, "put_object", Body=data, IfMatch=tag))
        return None if done is None else done["ETag"]

    def delete_tagged(self, key: str, tag: str) -> bool:
        """Delete `key` only while its version is `tag`; False when it has
        changed or is gone."""
        if self._s3(key) is None:
            found = self.read_tagged(key)
            if found is None or found[1] != tag:
                return False
            self.delete([key])
            return True
        return self._sync(self._s3_call(key, "delete_object", IfMatch=tag)) is not None


_UNWRITABLE_CACHES: set[Path] = set()   # cache folders this process has reported


class CachedStorage:
    """Another storage's reads kept in a local folder, bounded in size.

    Byte ranges are kept as fixed-size blocks of their object, aligned to
    multiples of `block_bytes` (BLOCK_BYTES, 1 MiB, by default): a read
    fetches only the blocks of its ranges the folder lacks, all in one
    inner read_ranges call (adjacent blocks as one range), keeps each as an
    entry and cuts the asked bytes from them. A window of another epoch
    then hits the blocks an earlier window of the same shard brought, where
    exact ranges would miss. 1 MiB because the objects read by range are
    shards of tens to hundreds of MB and a window reads a few tiles of
    50-200 kB: a block holds several tiles and fetching one takes about
    10 ms at 100 MB/s, less than an object store's round trip (20-100 ms),
    so a cold read costs about what the exact ranges did; smaller blocks
    would mean more files and entries per window, larger ones more bytes
    fetched and kept that no window asks for. An object's last block is
    short, and a short block is where the object ends: no size request is
    made. Whole objects (small metadata) and suffixes (a shard's index: the
    same length every epoch; placing it among the blocks would need the
    object's size, one more request) are kept as exact entries.

    Entries are files named by a hash of their generation, object key and
    what they hold (all of it, a suffix's length, a block's size and
    number), in one of BUCKETS folders by the hash's first byte, in a
    folder per generation of the inner storage's bytes: `generation(inner)`,
    asked once per process at the first read, names it (a folder name; ""
    for none, and then reads go uncached). Each file ends with a CRC-32C of
    its name and bytes, checked on every read: a corrupt or truncated file,
    one renamed from another entry, or a folder in its place is dropped and
    read again from the inner storage, so damage of the cache is never
    reported as damage of the bytes it keeps (whoever reads them still
    checks their own checksums: every object is a cached entry like any
    other).

    A file is written to a temporary name and renamed, so several worker
    processes and ranks can share the folder: a reader sees a whole file or
    none. The limit is kept bucket by bucket: names are hashes, so each
    bucket holds about its share of the bytes, and a trim looks at one
    group of buckets (one bucket of every generation folder at the default
    block size and a limit of 16 GiB or more; more buckets per group for a
    smaller limit, so that a group's share holds TRIM_GROUP_BLOCKS blocks).
    When this process has written an eighth of a group's share into it
    since it last looked, it sums that group's files and removes the least
    recently used (by mtime, set at every read: atime is often not kept)
    until the group is under 80 % of its share. Each trim lists the cache
    folder's generations and one group's buckets, never the whole folder.
    No ledger is shared, so there is nothing for concurrent processes to
    contend on or for a crash to leave wrong: the files are the only
    record, a temporary file a crash left behind is trimmed like an entry,
    and a removal another process made first is no loss. A folder that
    cannot be written (read-only, full, not a folder) is reported once per
    process on stderr; reads go on from the store, and from the entries
    there that can still be read."""

    BLOCK_BYTES = 1 << 20   # default block size (see above)
    BUCKETS = 256           # entry folders per generation, by the first byte of the name's hash
    TRIM_GROUP_BLOCKS = 64  # blocks a trimmed group's share of the limit holds at least
    TRIM_SHARE = 8          # trim a group after writing its share / TRIM_SHARE bytes into it
    KEEP_AFTER_TRIM = 0.8   # of a group's share: room for a while before its next trim

    def __init__(self, inner, folder: str | os.PathLike, limit_bytes: int,
                 generation: Callable[[object], str], block_bytes: int = BLOCK_BYTES):
        self.inner, self.folder, self.limit = inner, Path(folder), int(limit_bytes)
        self.generation = generation
        self.block_bytes = int(block_bytes)
        # buckets per trim: the fewest (a power of two) whose share holds TRIM_GROUP_BLOCKS blocks
        self.group_buckets = 1
        while (self.group_buckets < self.BUCKETS and self.limit * self.group_buckets
               < self.BUCKETS * self.TRIM_GROUP_BLOCKS * self.block_bytes):
            self.group_buckets *= 2
        self.group_limit = self.limit * self.group_buckets / self.BUCKETS
        self._root: Path | None = None
        self._named: str | None = None
        self._written: dict[int, int] = {}   # bytes written into each group since its last trim

    def where(self, key: str = ""):
        return self.inner.where(key)

    @property
    def root(self) -> Path | None:
        """This generation's folder, None for bytes of no generation (named
        once: `generation` may read the inner storage)."""
        if self._named is None:
            named = self.generation(self.inner)
            # a folder name: only letters and digits (a uuid's hex)
            self._named = named if isinstance(named, str) and named.isalnum() else ""
            self._root = self.folder / self._named if self._named else None
        return self._root

    @property
    def writable(self) -> bool:
        return self.folder not in _UNWRITABLE_CACHES

    def _path(self, key: str, what: str) -> Path | None:
        if self.root is None:
            return None
        # the generation in the name too: an entry copied from another generation fails its check
        digest = hashlib.sha256(f"{self._named}\0{key}\0{what}".encode()).hexdigest()
        return self.root / f"{int(digest[:2], 16) % self.BUCKETS:02x}" / digest

    def _block_path(self, key: str, block: int) -> Path | None:
        # the block size in the name: a process with another never reads these as its own
        return self._path(key, f"block {self.block_bytes} {block}")

    @staticmethod
    def _checksum(path: Path, data: bytes) -> bytes:
        """CRC-32C of the entry's name and bytes: an entry moved to another
        name fails it too."""
        # imported here: offline prediction imports this module but reads no
        # store, and its notebook's wheels (README) have no google-crc32c
        import google_crc32c

        return google_crc32c.extend(google_crc32c.value(path.name.encode()), data).to_bytes(4, "little")

    def _cached(self, path: Path | None) -> bytes | None:
        """The bytes of the entry at `path`, or None when there is no good
        one (a bad one is dropped)."""
        if path is None:
            return None
        try:
            entry = path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            self._drop(path)
            return None
        except OSError as exc:   # unreadable (permissions): read from the store
            self._report_unwritable(exc)
            return None
        data, trailer = entry[:-4], entry[-4:]
        if len(entry) < 4 or self._checksum(path, data) != trailer:
            self._drop(path)
            return None
        if self.writable:
            try:
                os.utime(path)   # recency for the trim
            except FileNotFoundError:   # another process's trim removed it: the bytes are good
                pass
            except OSError as exc:
                self._report_unwritable(exc)
        return data

    def _drop(self, path: Path) -> None:
        """Remove a bad entry (a file or a folder), if the folder can be written."""
        if not self.writable:
            return
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._report_unwritable(exc)

    def _report_unwritable(self, exc: OSError) -> None:
        """Report once per process that the folder cannot be written; this
        process then writes nothing there."""
        if self.writable:
            _UNWRITABLE_CACHES.add(self.folder)
            print(f"warning: {self.folder}: the read cache cannot be written "
                  f"({exc.strerror or exc}); reading on from the store without it", file=sys.stderr)

    def _keep(self, path: Path | None, data: bytes) -> None:
        if path is None or not self.writable:
            return
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data + self._checksum(path, data))
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not isinstance(exc, FileNotFoundError):   # that: another process's trim took tmp
                self._report_unwritable(exc)
            return
        group = int(path.parent.name, 16) // self.group_buckets
        self._written[group] = self._written.get(group, 0) + len(data)
        if self._written[group] * self.TRIM_SHARE > self.group_limit:
            self._written[group] = 0
            self.trim(group)

    def trim(self, group: int) -> None:
        """Remove the least recently used files of bucket group `group`, in
        every generation's folder, until they are under KEEP_AFTER_TRIM of
        the group's share of the limit. Lists the cache folder (its
        generations) and the group's buckets, nothing else."""
        buckets = [f"{b:02x}" for b in range(group * self.group_buckets,
                                              (group + 1) * self.group_buckets)]
        try:
            with os.scandir(self.folder) as found:
                generations = [entry.path for entry in found if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return
        except OSError as exc:
            self._report_unwritable(exc)
            return
        files = []
        for generation in generations:
            for bucket in buckets:
                try:
                    with os.scandir(os.path.join(generation, bucket)) as found:
                        for entry in found:
                            try:
                                if entry.is_file(follow_symlinks=False):
                                    st = entry.stat(follow_symlinks=False)
                                    files.append((st.st_mtime, st.st_size, entry.path))
                            except FileNotFoundError:   # another process removed or renamed it
                                continue
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    self._report_unwritable(exc)
                    return
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total <= self.group_limit * self.KEEP_AFTER_TRIM:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._report_unwritable(exc)
                return
            total -= size

    def read(self, key: str) -> bytes | None:
        path = self._path(key, "all")
        data = self._cached(path)
        if data is None:
            data = self.inner.read(key)
            if data is not None:
                self._keep(path, data)
        return data

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """Bytes [start, stop) of each range (shorter where the object ends
        first), or None when there is no such object, from the blocks they
        cover: those not in the folder fetched in one inner call."""
        return self.read_many([(key, ranges)])[0]

    def read_many(self, requests: list[tuple[str, list[tuple[int, int]]]]) -> list[list[bytes] | None]:
        """read_ranges of each (key, ranges): the blocks of all of them that
        the folder lacks fetched in one inner read_many call."""
        if self.root is None:
            return self.inner.read_many(requests)
        size = self.block_bytes

        def covering(start, stop):
            return range(start // size, -(-stop // size)) if start < stop else range(0)
        held: list[dict[int, bytes]] = []
        fetches = []   # (request number, runs of adjacent missing blocks)
        for number, (key, ranges) in enumerate(requests):
            blocks: dict[int, bytes] = {}
            end = None   # the object's size, once a short block shows where it ends
            missing = []
            for block in sorted({b for start, stop in ranges for b in covering(start, stop)}):
                if end is not None and block * size >= end:
                    break
                data = self._cached(self._block_path(key, block))
                if data is None:
                    missing.append(block)
                    continue
                blocks[block] = data
                if len(data) < size:
                    end = block * size + len(data)
            held.append(blocks)
            if missing:
                runs = [[missing[0], missing[0]]]
                for block in missing[1:]:
                    if block == runs[-1][1] + 1:
                        runs[-1][1] = block
                    else:
                        runs.append([block, block])
                fetches.append((number, runs))
        # a run may start at the object's end (when it ends at a block's
        # edge): read_ranges answers it with no bytes, as a range past the
        # end reads short (zarr's FsspecStore turns S3's 416 into b"")
        fetched = self.inner.read_many([(requests[number][0], [(first * size, (last + 1) * size)
                                                               for first, last in runs])
                                        for number, runs in fetches]) if fetches else []
        answers: list[list[bytes] | None] = [None] * len(requests)
        absent = set()
        for (number, runs), found in zip(fetches, fetched):
            if found is None:
                absent.add(number)
                continue
            key = requests[number][0]
            for (first, last), data in zip(runs, found):
                for block in range(first, last + 1):
                    piece = data[(block - first) * size:(block - first + 1) * size]
                    held[number][block] = piece
                    self._keep(self._block_path(key, block), piece)
                    if len(piece) < size:   # the object's last block
                        break
        for number, ((_, ranges), blocks) in enumerate(zip(requests, held)):
            if number not in absent:
                answers[number] = [b"".join(blocks.get(block, b"")[max(0, start - block * size):
                                                                   stop - block * size]
                                            for block in covering(start, stop))
                                   for start, stop in ranges]
        return answers

    def read_suffix(self, key: str, length: int) -> bytes | None:
        path = self._path(key, f"-{length}")
        data = self._cached(path)
        if data is None:
            data = self.inner.read_suffix(key, length)
            if data is not None:
                self._keep(path, data)
        return data

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def keys(self, prefix: str) -> list[str]:
        return self.inner.keys(prefix)


def storage_of(group) -> LocalStorage | ZarrStorage:
    """The Storage holding an open zarr group's store (keys are relative to
    the store's root, so they include the group's own path)."""
    import zarr
    store = group.store
    if isinstance(store, zarr.storage.LocalStore):
        return LocalStorage(store.root)
    return ZarrStorage(store)


# ---------------------------------------------------------------- stores named by URL

DEFAULT_CACHE_LIMIT_GB = 20.0
# botocore's defaults (a 60 s connect timeout, retries with backoff, under
# s3fs's own five tries of timeouts) would leave a wrong endpoint unreported
# for minutes; a store's reads are many small ones, so a failing endpoint is
# better reported at once and a slow read still given its time.
S3_DEFAULTS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                                 "retries": {"max_attempts": 2, "mode": "standard"}}}


def is_url(store) -> bool:
    """Whether `store` names a store by URL (file:// URLs are local paths)."""
    return isinstance(store, str) and "://" in store and not store.startswith("file://")


def location(text: str) -> str | Path:
    """argparse's type of a store argument: a URL as given, else a Path
    (Path would fold a URL's "//")."""
    if is_url(text):
        return text.rstrip("/")
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def format_option(option: tuple[str, object]) -> str:
    """parse_option's (key, value) as the KEY=VALUE it reads back."""
    key, value = option
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def parse_option(text: str) -> tuple[str, object]:
    """--storage-option KEY=VALUE: the value as JSON when it parses (numbers,
    true/false, objects), else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--storage-option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


# fsspec option names that hold credentials: never written to a file or printed
SECRET_NAMES = frozenset({"key", "secret", "token", "password"})
SECRET_SUFFIXES = ("_key", "_secret", "_token", "_password")
REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    """Whether an fsspec option named `name` holds a credential (key, secret,
    token, password, aws_secret_access_key, ...)."""
    name = name.lower()
    return name in SECRET_NAMES or name.endswith(SECRET_SUFFIXES)


def redact(options):
    """`options` (nested dicts and lists of fsspec options) with every
    credential's value replaced by REDACTED."""
    if isinstance(options, dict):
        return {k: REDACTED if is_secret(str(k)) else redact(v) for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


@dataclasses.dataclass(frozen=True)
class StorageSettings:
    """How a run reaches its store's bytes: fsspec options for a store URL,
    the local read cache and its size limit, the folder that keeps
    mining results when the store cannot be written, and the node-local
    directory where a loader's per-row arrays and epoch plans are written
    once and memory-mapped by every process of the node
    (engine/node_arrays.py; None: node_arrays.default_dir()). One object,
    passed to whatever opens a store; `public()` is what may be written or
    printed."""

    options: dict = dataclasses.field(default_factory=dict)
    cache: Path | None = None
    cache_limit_gb: float = DEFAULT_CACHE_LIMIT_GB
    mining_dir: Path | None = None
    node_dir: Path | None = None

    @classmethod
    def from_args(cls, args) -> "StorageSettings":
        """From add_arguments' flags (and --mining-dir where a CLI has it)."""
        cache, mining_dir = getattr(args, "cache", None), getattr(args, "mining_dir", None)
        node_dir = getattr(args, "node_dir", None)
        # absolute: member processes and reader workers may run elsewhere
        return cls(options=dict(args.storage_option),
                   cache=None if cache is None else Path(cache).absolute(),
                   cache_limit_gb=getattr(args, "cache_limit_gb", DEFAULT_CACHE_LIMIT_GB),
                   mining_dir=None if mining_dir is None else Path(mining_dir).absolute(),
                   node_dir=None if node_dir is None else Path(node_dir).absolute())

    def public(self) -> dict:
        """The settings as JSON values, credentials redacted."""
        return {"options": redact(self.options),
                "cache": None if self.cache is None else str(self.cache),
                "cache_limit_gb": self.cache_limit_gb,
                "mining_dir": None if self.mining_dir is None else str(self.mining_dir),
                "node_dir": None if self.node_dir is None else str(self.node_dir)}


NO_SETTINGS = StorageSettings()   # a local store, or a URL with its protocol's defaults only


def add_arguments(parser, cache: bool = True) -> None:
    """The storage flags of every CLI that names a store (`cache`: the
    flags of the read cache, for the CLIs that read one)."""
    parser.add_argument("--storage-option", action="append", default=[], type=parse_option,
                        metavar="KEY=VALUE",
                        help="fsspec option for a store URL, repeatable (e.g. endpoint_url=..., "
                             "anon=true; default: none); credentials come from the environment "
                             "(docs/object_storage.md)")
    if not cache:
        return
    parser.add_argument("--cache", type=Path, default=None,
                        help="local folder keeping the blocks read from a store URL, "
                             "shared by workers and ranks (default: no cache)")
    parser.add_argument("--cache-limit-gb", type=float, default=DEFAULT_CACHE_LIMIT_GB,
                        help="size limit of --cache")
    parser.add_argument("--node-dir", type=Path, default=None,
                        help="node-local folder where the loader writes meta/ columns and epoch "
                             "plans once, memory-mapped by every rank and reader worker "
                             "(default: forgery-node-UID in the system's temporary folder)")


def storage_options(url: str, storage: StorageSettings | None = None) -> dict:
    """fsspec options for `url`: the defaults of its protocol, then the settings'."""
    defaults = S3_DEFAULTS if url.split("://")[0] in ("s3", "s3a") else {}
    return {**json.loads(json.dumps(defaults)), **(storage or NO_SETTINGS).options}


def zarr_store(url: str, read_only: bool = True, storage: StorageSettings | None = None):
    """zarr's FsspecStore at `url` with storage_options(url, storage)."""
    import zarr
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options(url, storage),
                                             read_only=read_only)


def open_storage(store: str | os.PathLike, read_only: bool = True,
                 storage: StorageSettings | None = None,
                 generation: Callable[[object], str] | None = None):
    """The storage of the store named `store`: LocalStorage for a path; for
    a URL, ZarrStorage over zarr_store, behind the settings' cache for
    reads (CachedStorage, whose folders `generation` names: settings with a
    cache need it; settings without one read uncached)."""
    if not is_url(store):
        return LocalStorage(location(str(store)))
    storage = storage or NO_SETTINGS
    found = ZarrStorage(zarr_store(store, read_only, storage), store)
    if storage.cache is not None and read_only:
        if generation is None:
            # a cache without generations could serve a rebuilt store old bytes
            raise ValueError(f"{store}: a cached read needs the generation of its bytes")
        return CachedStorage(found, Path(storage.cache).absolute(),
                             int(storage.cache_limit_gb * 1e9), generation)
    return found


class StorageUnavailable(RuntimeError):
    """A store URL whose storage refuses the credentials or cannot be reached."""


_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError",
                      "ReadTimeoutError", "ClientConnectorError", "ServerTimeoutError",
                      "ConnectionError", "NoCredentialsError"}


def _s3_error_code(exc: BaseException | None) -> str | None:
    """The error code of botocore's ClientError (s3fs raises it as the
    cause of an OSError), or None."""
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def explained(url: str, exc: Exception) -> StorageUnavailable | None:
    """`exc`, raised by the storage of `url`, as one line saying what to
    check (itself when it is one already), or None when it is not about
    credentials or reaching it."""
    if isinstance(exc, StorageUnavailable):
        return exc
    if _s3_error_code(exc) == "NoSuchBucket" or _s3_error_code(exc.__cause__) == "NoSuchBucket":
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return StorageUnavailable(f"{url}: the bucket {bucket} does not exist; create it, or "
                                  "check the URL and the endpoint")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "NoCredentialsError" in names:
        return StorageUnavailable(f"{url}: no credentials found; set AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for it")
    if isinstance(exc, PermissionError) or "AccessDenied" in str(exc):
        return StorageUnavailable(f"{url}: access denied ({exc}); check the credentials "
                                  "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket's "
                                  "permissions")
    if names & _CONNECTION_ERRORS:
        return StorageUnavailable(f"{url}: cannot reach its storage ({exc}); check the endpoint "
                                  "(AWS_ENDPOINT_URL or --storage-option endpoint_url=...) and "
                                  "the network")
    return None
