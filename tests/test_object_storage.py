"""Stores on object storage, against a real S3 API: the session's moto
server (tests/conftest.py, s3_server). A store built to s3:// from the demo
source is verified, loaded (the same batches as the local build, bit for
bit), trained from, mined (into the bucket, or a local --mining-dir) and
predicted from; a killed build is refused by readers, then
resumed; a 2-worker build there equals a 1-worker local one; a second build is refused (until --break-lock); wrong credentials and an unreachable
endpoint end in one clear line, and so does a training run whose storage
stops answering mid-run (its steps kept, and resumed)."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import engine
from engine import storage as storages
from engine import store as layout
from engine.reader import WindowReader
from preprocess import build_zarr, verify_store
from trainers import predict as predict_cli
from trainers import run_folder
from trainers.checkpoint import last_path, load_checkpoint
from trainers.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "forgery-tests"


def s3_target(url: str):
    return storages.open_storage(url, read_only=False)


@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3
    boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)   # the env's key now
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def s3_store(bucket, demo_source, tmp_path_factory):
    """The demo source built to s3:// by the CLI."""
    url = f"{bucket}/demo.zarr"
    assert build_zarr.main(["--source", str(demo_source), "--out", url, "--workers", "2",
                            "--no-figure"]) == 0
    return url


def test_the_store_on_s3_is_the_local_build_object_for_object(s3_store, demo_store):
    target = s3_target(s3_store)
    local = {p.relative_to(demo_store).as_posix(): p.read_bytes()
             for p in demo_store.rglob("*") if p.is_file() and p.name != build_zarr.REPORT}
    remote = target.sizes("")
    assert set(remote) - {build_zarr.REPORT} == set(local)   # no lock object left behind
    for key in local:
        if key != "zarr.json":
            assert target.read(key) == local[key], key
    # the same root but for the build id: each build has its own
    remote_root, local_root = (json.loads(root) for root in (target.read("zarr.json"),
                                                             local["zarr.json"]))
    assert remote_root["attributes"].pop(layout.BUILD_ID) != \
        local_root["attributes"].pop(layout.BUILD_ID)
    assert remote_root == local_root
    assert layout.open_store(s3_store).attrs["fingerprint"] == \
        layout.open_store(demo_store).attrs["fingerprint"]
    # a rerun finds the complete store and changes nothing
    assert build_zarr.build_store(Path("unused"), s3_store) is None


def test_a_file_url_is_the_local_store(demo_store):
    url = f"file://{demo_store}"
    assert not storages.is_url(url) and storages.location(url) == demo_store
    assert layout.open_store(url).attrs["fingerprint"] == \
        layout.open_store(demo_store).attrs["fingerprint"]
    assert isinstance(WindowReader(url).storage, storages.LocalStorage)


@pytest.mark.parametrize("text, option", [
    ("endpoint_url=http://host:9000", ("endpoint_url", "http://host:9000")),
    ("anon=true", ("anon", True)),
    ('client_kwargs={"region_name": "eu"}', ("client_kwargs", {"region_name": "eu"})),
])
def test_storage_options_read_their_values_as_json_where_they_parse(text, option):
    assert storages.parse_option(text) == option


def test_verify_reads_every_chunk_of_the_s3_store(s3_store, capsys):
    assert verify_store.main([s3_store]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{s3_store}: clean")


def batches(store, count=2):
    with engine.make_loader(store, "highres_no_ela", batch_size=4, img_size=128, device="cpu",
                            backend="opencv", workers=1, seed=3) as loader:
        return [{k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
                for _, batch in zip(range(count), loader)]


def test_loader_from_s3_gives_the_local_builds_batches_bit_for_bit(s3_store, demo_store):
    for remote, local in zip(batches(s3_store), batches(demo_store), strict=True):
        assert remote.keys() == local.keys()
        for key in local:
            assert torch.equal(remote[key], local[key]), key


def test_the_cache_serves_a_second_read_from_local_disk(s3_store, tmp_path):
    cached = storages.CachedStorage(storages.open_storage(s3_store), tmp_path / "cache", 10**9,
                                    layout.build_id)
    reader = WindowReader(s3_store)
    reader.storage = cached
    first = reader.read_array(layout.image_path(1))
    assert any((tmp_path / "cache").rglob("*"))

    class Offline:   # only the root (its build id) from S3: everything else from the cache
        def where(self, key=""):
            return f"{s3_store}/{key}"

        def read(self, key, *ranges):
            if key == "zarr.json" and not ranges:
                return cached.inner.read(key)
            raise AssertionError(f"read {key} from S3")
        read_ranges = read_suffix = read_many = read

    again = WindowReader(s3_store)
    again.storage = storages.CachedStorage(Offline(), tmp_path / "cache", 10**9, layout.build_id)
    assert np.array_equal(again.read_array(layout.image_path(1)), first)


def test_a_cached_read_across_the_end_of_an_object_on_s3(bucket, tmp_path):
    """S3 refuses a range that starts at its object's end (416), which the
    cache asks for when an object ends at a block's edge: zarr answers it
    with no bytes, and the object's bytes are read all the same, its blocks
    in the folder or not."""
    block, url = 1000, f"{bucket}/edges"
    data = os.urandom(2 * block)
    s3_target(url).write("object", data)
    inner = storages.open_storage(url)
    assert inner.read_ranges("object", [(2 * block, 3 * block)]) == [b""]
    cached = storages.CachedStorage(inner, tmp_path / "cache", 10**9, lambda _: "abc",
                                    block_bytes=block)
    assert cached.read_ranges("object", [(0, 2 * block)]) == [data]
    assert cached.read_ranges("object", [(500, 1500), (2 * block - 10, 2 * block + 10)]) == \
        [data[500:1500], data[-10:]]
    assert cached.read_ranges("object", [(1990, 3 * block)]) == [data[1990:]]
    assert cached.read_ranges("missing", [(0, 10)]) is None


def small_source(demo_source, folder, invert=False):
    """Five cases of the demo source (three authentic, two forged), their
    pixels inverted when `invert`: the same cases, sizes and masks, so the
    same meta/ and build settings, other pixels."""
    names = [f"train_images/authentic/{p.name}"
             for p in sorted((demo_source / "train_images/authentic").glob("*.png"))[:3]]
    for forged in sorted((demo_source / "train_images/forged").glob("*.png"))[:2]:
        names += [f"train_images/forged/{forged.name}", f"train_masks/{forged.stem}.npy"]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_source / name, folder / name)
        if invert and name.endswith(".png"):
            cv2.imwrite(str(folder / name), 255 - cv2.imread(str(folder / name), cv2.IMREAD_UNCHANGED))
    return folder


def cached_reader(url, folder):
    reader = WindowReader(url)
    reader.storage = storages.CachedStorage(storages.open_storage(url), folder, 10**9,
                                            layout.build_id)
    return reader


def test_a_store_rebuilt_at_the_same_url_is_never_read_from_the_old_builds_cache(
        bucket, demo_source, tmp_path):
    """The rebuild changes pixels only (same cases, sizes, masks: the same
    meta/, fingerprint and build settings); reads through the cache the old
    build filled give the new pixels."""
    url, cache = f"{bucket}/rebuilt.zarr", tmp_path / "cache"
    build = ["--out", url, "--workers", "1", "--no-figure"]
    source = small_source(demo_source, tmp_path / "source")
    assert build_zarr.main(["--source", str(source), *build]) == 0
    old = cached_reader(url, cache).read_array(layout.image_path(0))
    small_source(demo_source, source, invert=True)
    assert build_zarr.main(["--source", str(source), *build, "--overwrite"]) == 0
    new = WindowReader(url).read_array(layout.image_path(0))
    assert not np.array_equal(new, old)
    assert np.array_equal(cached_reader(url, cache).read_array(layout.image_path(0)), new)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2   # one folder per build


def _flip_last(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _replaced_by_folder(path):
    path.unlink()
    (path / "inner").mkdir(parents=True)


CACHE_DAMAGE = {
    "a flipped byte": _flip_last,
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2]),
    "emptied": lambda path: path.write_bytes(b""),
    "replaced by a folder": _replaced_by_folder,
}


@pytest.mark.parametrize("kind", CACHE_DAMAGE)
def test_a_bad_cache_entry_is_read_again_from_the_store(s3_store, tmp_path, kind):
    """Damage to every entry of the cache (the shard's index, the blocks
    of its tiles): the reads give the store's pixels, and the entries are
    written again, good."""
    path, cache = layout.image_path(1), tmp_path / "cache"
    truth = WindowReader(s3_store).read_array(path)
    cached_reader(s3_store, cache).read_array(path)
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert len(entries) >= 2   # the shard's index, the block of its tiles
    for entry in entries:
        CACHE_DAMAGE[kind](entry)
    assert np.array_equal(cached_reader(s3_store, cache).read_array(path), truth)
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == sorted(entries)
    # and now from the cache alone, every entry good again
    assert np.array_equal(cached_reader(s3_store, cache).read_array(path), truth)


@contextlib.contextmanager
def read_only(folder):
    """`folder` read-only: by its mode bits, and for root (whom they do not
    stop) by a read-only bind mount of it."""
    if os.geteuid():
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        try:
            yield
        finally:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
        return
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"running as root and cannot mount {folder} read-only: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_cache_folder_that_cannot_be_written_is_reported_once_and_read_around(
        s3_store, tmp_path, capsys):
    cache, paths = tmp_path / "cache", [layout.image_path(row) for row in range(4)]
    truth = [WindowReader(s3_store).read_array(path) for path in paths]
    cached_reader(s3_store, cache).read_array(paths[0])   # a populated folder
    capsys.readouterr()
    with read_only(cache):
        for _ in range(2):   # the first array from the cache, the others from the store
            reader = cached_reader(s3_store, cache)
            for path, pixels in zip(paths, truth):
                assert np.array_equal(reader.read_array(path), pixels)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {cache}: the read cache cannot be written")
    assert "reading on from the store without it" in err[0]


def cache_bytes(folder):
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def read_rows(s3_store, cached, rows=range(6)):
    reader = WindowReader(s3_store)
    reader.storage = cached
    for row in rows:
        reader.read_array(layout.image_path(row))


def test_the_cache_stays_under_its_limit(s3_store, tmp_path):
    # small blocks: the demo store's few shards are then many entries, each a
    # small part of the limit (a 1 MiB block alone would be most of it)
    block = 1 << 16
    read_rows(s3_store, storages.CachedStorage(storages.open_storage(s3_store),
                                               tmp_path / "all", 10**9, layout.build_id, block))
    count, everything = cache_bytes(tmp_path / "all")
    limit = everything // 2
    # read again with half the room: the writes trim as they go
    cached = storages.CachedStorage(storages.open_storage(s3_store), tmp_path / "half", limit,
                                    layout.build_id, block)
    assert cached.group_buckets == cached.BUCKETS   # so small a limit: one group, trimmed whole
    read_rows(s3_store, cached)
    kept, size = cache_bytes(tmp_path / "half")
    assert 0 < kept < count and size <= limit   # one process on a new folder: never past it


def test_train_mine_and_predict_from_s3(s3_store, tmp_path):
    run = tmp_path / "run"

    def train(member, *extra):
        return train_main(["--member", member, "--store", s3_store, "--out", str(run),
                           "--epochs", "1", "--max-steps", "2", "--encoder-weights", "none",
                           "--encoder", "timm-mobilenetv3_small_minimal_100", "--img-size", "64",
                           "--batch-size", "2", "--device", "cpu", "--workers", "0",
                           "--cache", str(tmp_path / "cache"), *extra])

    assert train("highres_no_ela") == 0
    assert any((tmp_path / "cache").rglob("*"))
    target = s3_target(s3_store)
    # mining for a store that cannot be written: into the local --mining-dir
    assert train("hard_negative", "--mining-dir", str(tmp_path / "mined")) == 0
    fingerprint = layout.open_store(s3_store).attrs["fingerprint"]
    assert (tmp_path / "mined" / fingerprint / "mining" / "hard_negative" / "zarr.json").is_file()
    assert target.keys("mining/") == []
    # without it: next to the store's other arrays, on S3, and read from there
    assert train("hard_negative", "--overwrite") == 0
    assert "mining/hard_negative/zarr.json" in target.keys("mining/")
    assert layout.read_mining(layout.open_store(s3_store), "hard_negative")["checkpoint"]

    out = tmp_path / "submission.csv"
    assert predict_cli.main(["--store", s3_store, "--models", str(run / "models"),
                             "--members", "highres_no_ela", "--device", "cpu",
                             "--out", str(out)]) == 0
    meta = layout.read_meta(layout.open_store(s3_store))
    assert len(out.read_text().splitlines()) == 1 + int((meta["split"] == 1).sum())


# a build that kills itself (SIGKILL) once three blocks are written
KILLED_BUILD = """
import os, signal, sys
from engine import storage
from preprocess import build_zarr
write, records = storage.ZarrStorage.write, []
def dying(self, key, data):
    write(self, key, data)
    if key.startswith(build_zarr.BLOCK_RECORDS):
        records.append(key)
        if len(records) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
storage.ZarrStorage.write = dying
sys.exit(build_zarr.main(sys.argv[1:]))
"""
SMALL_LAYOUT = ["--chunk", "128", "--shard-tiles", "40"]   # several blocks of the demo source


def test_a_killed_build_is_refused_then_resumed(bucket, demo_source, demo_store, tmp_path,
                                               monkeypatch):
    url = f"{bucket}/killed.zarr"
    args = ["--source", str(demo_source), "--out", url, "--workers", "1", "--no-figure",
            *SMALL_LAYOUT]
    done = subprocess.run([sys.executable, "-c", KILLED_BUILD, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    with pytest.raises(layout.StoreError, match="its build did not finish.*rerun build_zarr"):
        layout.open_store(url)
    target = s3_target(url)
    assert len(target.keys(build_zarr.BLOCK_RECORDS)) == 3
    assert target.exists(build_zarr.REMOTE_LOCK)
    # the rerun takes over the dead build's lock (same host) and redoes only the other blocks
    write, shards = storages.ZarrStorage.write, []
    monkeypatch.setattr(storages.ZarrStorage, "write", lambda self, key, data: (
        shards.append(key) if key.startswith("tiles/image/0/c.") else None, write(self, key, data)))
    assert build_zarr.main(args) == 0
    blocks = len(target.keys("tiles/image/0")) - 1   # but its zarr.json
    assert blocks >= 6 and sorted(shards) == sorted(f"tiles/image/0/c.{b}.0.0.0"
                                                    for b in range(3, blocks))
    np.testing.assert_array_equal(layout.read_meta(layout.open_store(url))["digest"],
                                  layout.read_meta(layout.open_store(demo_store))["digest"])
    assert not target.exists(build_zarr.REMOTE_LOCK)
    assert not target.keys(build_zarr.BUILD_PREFIX), "the build records are gone"


def test_a_two_worker_build_to_s3_is_the_one_worker_local_build(bucket, demo_source, tmp_path):
    url, local = f"{bucket}/two-workers.zarr", tmp_path / "one-worker.zarr"
    args = ["--source", str(demo_source), "--no-figure", *SMALL_LAYOUT]
    assert build_zarr.main([*args, "--out", str(local), "--workers", "1"]) == 0
    assert build_zarr.main([*args, "--out", url, "--workers", "2"]) == 0
    target = s3_target(url)
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert set(target.keys("")) == set(files)
    for key, data in files.items():
        if key not in ("zarr.json", build_zarr.REPORT):
            assert target.read(key) == data, key
    remote_root, local_root = (json.loads(root)["attributes"]
                               for root in (target.read("zarr.json"), files["zarr.json"]))
    assert remote_root.pop(layout.BUILD_ID) != local_root.pop(layout.BUILD_ID)
    assert remote_root == local_root


def test_an_append_on_s3_is_the_local_append_and_keeps_the_old_shards(bucket, demo_source,
                                                                     tmp_path):
    """Five cases built, then the whole demo source appended, on S3 and on
    local disk: the same objects, the first build's shards untouched."""
    url, local = f"{bucket}/appended.zarr", tmp_path / "appended.zarr"
    first = small_source(demo_source, tmp_path / "first")
    for out in (url, str(local)):
        assert build_zarr.main(["--source", str(first), "--out", out, "--workers", "1",
                                "--no-figure", *SMALL_LAYOUT]) == 0
    target = s3_target(url)
    old = {key: target.read(key) for key in target.keys("tiles") if "/c." in key}   # shards
    build_id = json.loads(target.read("zarr.json"))["attributes"][layout.BUILD_ID]
    for out in (url, str(local)):
        assert build_zarr.main(["--source", str(demo_source), "--out", out, "--append",
                                "--workers", "2", "--no-figure"]) == 0
    assert all(target.read(key) == data for key, data in old.items())
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert set(target.keys("")) == set(files) and len(files) > len(old)
    for key, data in files.items():
        if key not in ("zarr.json", build_zarr.REPORT):
            assert target.read(key) == data, key
    root = json.loads(target.read("zarr.json"))["attributes"]
    assert root[layout.BUILD_ID] == build_id
    assert len(layout.read_meta(layout.open_store(url))["label"]) == 36


def test_a_build_is_refused_while_another_host_holds_the_lock_until_broken(
        bucket, demo_source, tmp_path, capsys):
    url = f"{bucket}/locked.zarr"
    target = s3_target(url)
    holder = {"pid": 4242, "host": "another-node", "started": "2026-01-01T00:00:00+00:00"}
    assert target.create(build_zarr.REMOTE_LOCK, json.dumps(holder).encode())
    assert not target.create(build_zarr.REMOTE_LOCK, b"{}")   # S3's If-None-Match: one winner
    assert build_zarr.main(["--source", str(demo_source), "--out", url, "--no-figure"]) == 2
    err = capsys.readouterr().err
    assert "another build is writing it (PID 4242 on host another-node" in err
    assert "rerun with --break-lock" in err and len(err.strip().splitlines()) == 1
    assert target.keys("") == [build_zarr.REMOTE_LOCK]   # nothing built, the lock untouched
    # that build known to be dead: --break-lock takes its lock, builds, and lets it go
    assert build_zarr.main(["--source", str(demo_source), "--out", url, "--no-figure",
                            "--break-lock"]) == 0
    assert "taking over the lock of a build on host another-node (PID 4242" in \
        capsys.readouterr().out
    assert not target.exists(build_zarr.REMOTE_LOCK)
    assert layout.open_store(url).attrs["fingerprint"]
    # a local build's lock needs no breaking: the flag is refused there
    with pytest.raises(SystemExit) as refused:
        build_zarr.main(["--out", str(tmp_path / "local.zarr"), "--break-lock"])
    assert refused.value.code == 2 and "only for a URL --out" in capsys.readouterr().err


def test_a_build_whose_lock_is_taken_over_stops_and_leaves_the_new_holders_lock(
        bucket, demo_source, tmp_path, monkeypatch, capsys):
    """Another build takes the lock over (--break-lock, on another host)
    while this one writes its blocks: this one stops after the block it
    was writing with one line (exit 2), never writes the complete root,
    and does not delete the other build's lock."""
    url = f"{bucket}/taken.zarr"
    target = s3_target(url)
    other = json.dumps({"pid": 4242, "host": "another-node", "started": "2026-01-01T00:00:00+00:00",
                        "token": "theirs"}).encode()
    write, records = storages.ZarrStorage.write, []

    def taken_after_two_blocks(self, key, data):
        write(self, key, data)
        if key.startswith(build_zarr.BLOCK_RECORDS):
            records.append(key)
            if len(records) == 2:
                target.write(build_zarr.REMOTE_LOCK, other)
    monkeypatch.setattr(storages.ZarrStorage, "write", taken_after_two_blocks)
    assert build_zarr.main(["--source", str(demo_source), "--out", url, "--workers", "1",
                            "--no-figure", *SMALL_LAYOUT]) == 2
    assert len(records) == 2
    err = capsys.readouterr().err   # the progress bar's lines, then the one error line
    assert "Traceback" not in err
    problem = [line for line in err.splitlines() if line.startswith("build_zarr:")]
    assert len(problem) == 1
    assert problem[0].startswith(f"build_zarr: error: {url}: this build lost its lock")
    assert "PID 4242 on host another-node" in problem[0]
    assert "before writing the blocks after block 1" in problem[0]
    assert target.read(build_zarr.REMOTE_LOCK) == other
    with pytest.raises(layout.StoreError, match="its build did not finish"):
        layout.open_store(url)


def test_a_lock_taken_over_at_the_end_is_not_deleted(bucket, s3_server):
    """release() deletes only the version of the lock this build wrote."""
    url = f"{bucket}/released.zarr"
    target = s3_target(url)
    with build_zarr.remote_lock(url, target) as lock:
        assert json.loads(target.read(build_zarr.REMOTE_LOCK))["token"]
        lock.check("anything")
        target.write(build_zarr.REMOTE_LOCK, b'{"host": "another-node", "token": "theirs"}')
    assert target.read(build_zarr.REMOTE_LOCK) == b'{"host": "another-node", "token": "theirs"}'
    # a takeover races another: the conditional write loses to the version written meanwhile
    tag = target.read_tagged(build_zarr.REMOTE_LOCK)[1]
    target.write(build_zarr.REMOTE_LOCK, b'{"host": "a-third-node"}')
    assert target.replace_tagged(build_zarr.REMOTE_LOCK, b"{}", tag) is None
    assert not target.delete_tagged(build_zarr.REMOTE_LOCK, tag)
    assert target.read(build_zarr.REMOTE_LOCK) == b'{"host": "a-third-node"}'


def test_a_bucket_that_does_not_exist_is_one_line(s3_server, demo_source, tmp_path, capsys):
    url = "s3://no-such-bucket-here/store.zarr"
    assert build_zarr.main(["--source", str(demo_source), "--out", url, "--no-figure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"build_zarr: error: {url}: the bucket no-such-bucket-here does not exist; "
                   "create it, or check the URL and the endpoint")


def test_a_damaged_store_on_s3_is_named_by_its_url(bucket, demo_store):
    """The damage is named by URL, and so is the store in the verify and
    rebuild commands the message gives."""
    url = f"{bucket}/damaged.zarr"
    target = s3_target(url)
    target.write_many([(p.relative_to(demo_store).as_posix(), p.read_bytes())
                       for p in Path(demo_store).rglob("*") if p.is_file()])
    target.remove("meta/label")
    with pytest.raises(layout.StoreDamaged) as caught:
        layout.read_meta(layout.open_store(url))
    assert caught.value.where == f"{url}/meta/label"
    assert f"`python preprocess/verify_store.py {url}`" in str(caught.value)
    assert f"--out {url} --overwrite`" in str(caught.value)


def test_wrong_credentials_are_one_clear_line(s3_store, capsys):
    wrong = storages.StorageSettings(options={"key": "nobody", "secret": "wrong-SENTINEL"})
    with pytest.raises(layout.StoreError, match="access denied.*AWS_ACCESS_KEY_ID"):
        layout.open_store(s3_store, storage=wrong)
    assert verify_store.main([s3_store, "--storage-option", "key=nobody",
                              "--storage-option", "secret=wrong-SENTINEL"]) == 2
    err = capsys.readouterr().err.strip()
    assert "access denied" in err and len(err.splitlines()) == 1
    assert "SENTINEL" not in err


def test_an_unreachable_endpoint_is_one_clear_line(s3_store, capsys):
    with socket.socket() as probe:   # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert verify_store.main([s3_store, "--storage-option",
                              f"endpoint_url=http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach its storage" in err and "AWS_ENDPOINT_URL" in err
    assert len(err.splitlines()) == 1


def test_the_loader_benchmark_reads_a_url_against_local_disk(s3_store, demo_store, tmp_path):
    """benchmarks/loader_throughput.py --store URL: the same windows fetch the
    same bytes from the bucket as from local disk, a warm cache asks the
    server only for the store's root document, and the figures land in the JSON."""
    from benchmarks import loader_throughput

    out = tmp_path / "remote.json"
    assert loader_throughput.main(["--store", s3_store, "--compare-local", str(demo_store),
                                   "--members", "small_specialist", "--batches", "2",
                                   "--batch-size", "4", "--img-size", "64", "--workers", "1",
                                   "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert not figures["partial"]
    rows = figures["members"]["small_specialist"]
    assert list(rows) == ["local disk", "no cache", "cache, cold", "cache, warm"]
    assert rows["no cache"]["kB_per_sample"] == pytest.approx(rows["local disk"]["kB_per_sample"])
    assert rows["no cache"]["requests_per_sample"] == rows["local disk"]["requests_per_sample"] > 0
    # warm: one request per reader process, the store's root document (its
    # hash names the cache's folder), for the 8 samples of 2 batches of 4
    assert rows["cache, warm"]["requests_per_sample"] * 8 == 1
    assert rows["cache, warm"]["kB_per_sample"] * 8 < 2
    assert all(r["samples_per_s"] > 0 for r in rows.values())


class Relay:
    """A TCP relay on a free port of 127.0.0.1 to the S3 server at
    `endpoint`, which cut() breaks as a failed network does: open connections
    are reset and new ones refused."""

    def __init__(self, endpoint: str):
        self.upstream = ("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets, self.lock = [], threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:   # cut
                return
            with self.lock:
                self.sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.listener.shutdown(socket.SHUT_RDWR)   # wakes accept(), which then returns
        self.listener.close()
        with self.lock:
            for end in self.sockets:
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_storage_that_stops_answering_mid_run_ends_it_resumably(s3_store, s3_server, tmp_path):
    """A network failure during training, with a reader worker: one clear
    line, exit status 2, the steps done so far checkpointed and logged, and
    the resume command finishes the run once the storage answers again."""
    run, relay = tmp_path / "run", Relay(s3_server["endpoint"])
    args = ["--member", "highres_no_ela", "--store", s3_store, "--out", str(run), "--epochs", "2",
            "--max-steps", "20", "--encoder-weights", "none",
            "--encoder", "timm-mobilenetv3_small_minimal_100", "--img-size", "64",
            "--batch-size", "2", "--device", "cpu"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "trainers" / "train.py"), *args, "--workers", "1",
         "--save-every", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "AWS_ENDPOINT_URL": relay.endpoint})
    last = last_path(run / "models", "highres_no_ela")
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    relay.cut()
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 2, err[-2000:]
    assert "Traceback" not in err
    problem = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(problem) == 1 and "cannot reach its storage" in problem[0], err[-2000:]
    assert s3_store in problem[0] and relay.endpoint in problem[0]
    resume = [line for line in err.splitlines() if "the last checkpoint holds it. Resume with:" in line]
    assert len(resume) == 1
    stopped_at = load_checkpoint(last)["global_step"]
    assert 2 <= stopped_at < 20
    steps = run_folder.read_rows(run / "logs" / "highres_no_ela_steps.csv")
    assert [r["global_step"] for r in steps] == list(range(1, stopped_at + 1))
    # the storage answers again (the session's own endpoint): the printed
    # command, run as the user would, finishes the run with the same settings
    # (its settings come back from the run's config.json: workers, save-every, max-steps...)
    command = shlex.split(resume[0].split("Resume with: ", 1)[1])
    assert command == ["python", "trainers/train.py", "--member", "highres_no_ela", "--out",
                       str(run), "--resume"]
    recorded = run_folder.recorded_config(run, "highres_no_ela")
    assert (recorded["workers"], recorded["save_every"], recorded["max_steps"]) == (1, 2, 20)
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(last)["global_step"] == 20
    steps = run_folder.read_rows(run / "logs" / "highres_no_ela_steps.csv")
    assert [r["global_step"] for r in steps] == list(range(1, 21))
