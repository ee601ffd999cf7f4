"""Arrays shared by the processes of a node: written once, memory-mapped by all.

A loader's per-row arrays (the store's meta/ columns, a member's sampling
weights) and each epoch's plan are as large as the store: some 50 bytes per
image. Held by every process, each rank and each of its reader workers,
they cost gigabytes per node at ten million images. Here they are written
once per node as uncompressed .npy files in a folder of a node-local
directory (StorageSettings.node_dir) and opened by every process with
a read-only memory mapping: the pages are the page cache's, shared by all,
and a process touches only the pages it reads. A worker unpickles a
NodeArrays as its folder's path, maps an array when first asked for it,
and after each batch releases the pages it touched (`release`), so over an
epoch its resident memory stays that of one batch's rows, not of every row
it has read.

A folder is named by what its arrays are a pure function of (the store's
build id, a digest of the weights, the plan's settings), so a rebuilt store
or another member never meets another's arrays. It is written to a
temporary name and renamed into place with a manifest of each file's
dtype, shape, size and CRC-32C, so the processes of a node share one copy
and a process sees a whole folder or none. The process that makes a loader
checks every file's CRC-32C before using a folder (`verify`), a reader
worker its size and header (reading every byte would bring every page into
it): a damaged, truncated or half-written folder is never used; it is made
again from its source and replaced (a process still mapping the old files
keeps their pages). Where the directory cannot be written, the arrays stay
in the process's memory (as before this module) and a warning says so once.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np
from numpy.lib import format as npy_format

MANIFEST = "manifest.json"
_READ_BLOCK = 1 << 24   # CRC-32C computed 16 MB at a time: no whole-file copy in memory
_UNWRITABLE: set[Path] = set()   # node directories this process has reported


class NodeFileDamaged(RuntimeError):
    """A node-local array file that a reader worker found damaged after its
    loader's process had checked the folder (removed or rewritten by hand)."""


def default_dir() -> Path:
    """The node-local directory when StorageSettings.node_dir is not given:
    one per user in the system's temporary directory (a local disk or
    tmpfs; not /dev/shm, which DALI's reader workers need)."""
    return Path(tempfile.gettempdir()) / f"forgery-node-{os.getuid()}"


def digest(*parts) -> str:
    """A folder-name digest of `parts` (bytes, arrays or anything with a
    stable repr)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            h.update(f"{part.dtype.str}{part.shape}".encode())
            h.update(memoryview(part).cast("B"))
        else:
            h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_crc(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            crc = google_crc32c.extend(crc, block)
    return f"{crc:08x}"


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _problem(folder: Path, name: str, entry: dict, verify: bool) -> str | None:
    """Why array `name` of the folder cannot be used, or None."""
    path = folder / f"{name}.npy"
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if size != entry.get("bytes"):
        return f"{path}: {size} bytes, its manifest says {entry.get('bytes')} (truncated or rewritten)"
    if verify and _file_crc(path) != entry.get("crc32c"):
        return f"{path}: CRC-32C mismatch with its manifest (damaged)"
    return None


def _intact(folder: Path, manifest: dict, verify: bool) -> bool:
    return all(isinstance(entry, dict) and _problem(folder, name, entry, verify) is None
               for name, entry in manifest.items())


def _map(folder: Path, name: str, entry: dict) -> tuple[np.ndarray, mmap.mmap | None]:
    """Array `name` of the folder, memory-mapped read-only and checked
    against its manifest entry, and its mapping (None for an empty array)."""
    path = folder / f"{name}.npy"
    problem = _problem(folder, name, entry, verify=False)
    shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
    if problem is None:
        try:
            with open(path, "rb") as f:
                version = npy_format.read_magic(f)
                read_header = {(1, 0): npy_format.read_array_header_1_0,
                               (2, 0): npy_format.read_array_header_2_0}[version]
                header = read_header(f)   # (shape, fortran order, dtype)
                offset = f.tell()
                if header[0] != shape or header[2] != dtype or header[1]:
                    problem = f"{path}: {header[2]} {header[0]}, its manifest says {dtype} {shape}"
                elif 0 in shape:   # nothing to map
                    return np.empty(shape, dtype), None
                else:
                    mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError, KeyError) as exc:
            problem = f"{path}: unreadable ({exc!r})"
    if problem is not None:
        raise NodeFileDamaged(f"{problem}; remove {folder} and start again: the loader writes it anew")
    count = int(np.prod(shape))
    return np.frombuffer(mapping, dtype, count, offset).reshape(shape), mapping


class NodeArrays(Mapping):
    """Named arrays of one node-local folder, mapped on first use; pickled
    as the folder's path. Without a folder (the directory could not be
    written) it holds the arrays themselves and pickles them."""

    def __init__(self, folder: str | os.PathLike | None, arrays: dict | None = None,
                 manifest: dict | None = None):
        self.folder = None if folder is None else Path(folder)
        self._arrays = dict(arrays or {})
        self._mappings: list[mmap.mmap] = []
        self._manifest = manifest

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            found = _read_manifest(self.folder)
            if found is None:
                raise NodeFileDamaged(f"{self.folder / MANIFEST}: missing or unreadable; remove "
                                      f"{self.folder} and start again: the loader writes it anew")
            self._manifest = found
        return self._manifest

    def __getitem__(self, name: str) -> np.ndarray:
        found = self._arrays.get(name)
        if found is None:
            if self.folder is None or name not in self.manifest:
                raise KeyError(name)
            found, mapping = _map(self.folder, name, self.manifest[name])
            self._arrays[name] = found
            if mapping is not None:
                self._mappings.append(mapping)
        return found

    def release(self) -> None:
        """Drop this process's pages of the mapped arrays (MADV_DONTNEED):
        they stay in the page cache, shared, and a later read maps them
        again at a minor fault's cost. A reader worker releases them after
        each batch, so its RSS holds the pages of one batch's rows, not of
        every row it has read."""
        for mapping in self._mappings:
            mapping.madvise(mmap.MADV_DONTNEED)

    def __iter__(self):
        return iter(self._arrays if self.folder is None else self.manifest)

    def __len__(self) -> int:
        return len(self._arrays if self.folder is None else self.manifest)

    def __reduce__(self):
        if self.folder is None:
            return NodeArrays, (None, self._arrays)
        return NodeArrays, (str(self.folder),)


def _write(folder: Path, arrays: dict[str, np.ndarray]) -> dict:
    """Write `arrays` into a temporary folder beside `folder`; returns it and its manifest."""
    tmp = folder.with_name(f"{folder.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    manifest = {}
    try:
        for name, array in arrays.items():
            path = tmp / f"{name}.npy"
            np.save(path, np.ascontiguousarray(array), allow_pickle=False)
            manifest[name] = {"dtype": np.dtype(array.dtype).str, "shape": list(array.shape),
                              "bytes": path.stat().st_size, "crc32c": _file_crc(path)}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tmp": tmp, "manifest": manifest}


def _place(tmp: Path, folder: Path, verify: bool) -> None:
    """Rename `tmp` to `folder`; a folder already there is kept when intact
    (another process placed the same arrays first), else moved aside first."""
    for _ in range(3):
        try:
            os.rename(tmp, folder)
            return
        except OSError:
            if not folder.exists():
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        found = _read_manifest(folder)
        if found is not None and _intact(folder, found, verify):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = folder.with_name(f"{folder.name}.{uuid.uuid4().hex}.old")
        try:
            os.rename(folder, old)
        except FileNotFoundError:   # another process moved it aside first
            pass
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(f"{folder}: could not be placed (other processes kept replacing it)")


def _report_unwritable(root: Path, exc: OSError) -> None:
    if root not in _UNWRITABLE:
        _UNWRITABLE.add(root)
        print(f"warning: {root}: node-local arrays cannot be written ({exc.strerror or exc}); "
              "each process keeps its own copy instead (more memory per reader worker)",
              file=sys.stderr)


def node_arrays(folder: Path, make: Callable[[], dict[str, np.ndarray]],
                verify: bool = True) -> NodeArrays:
    """The arrays of node-local `folder`: mapped when it holds an intact set
    (`verify`: every file's CRC-32C checked, else sizes), otherwise made by
    `make()`, written there and mapped."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is not None and _intact(folder, manifest, verify):
        return NodeArrays(folder, manifest=manifest)
    arrays = make()
    if folder.parent in _UNWRITABLE:
        return NodeArrays(None, arrays)
    try:
        written = _write(folder, arrays)
        _place(written["tmp"], folder, verify)
    except OSError as exc:
        _report_unwritable(folder.parent, exc)
        return NodeArrays(None, arrays)
    return NodeArrays(folder)
