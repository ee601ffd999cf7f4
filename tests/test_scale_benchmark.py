"""benchmarks/scale.py at a tiny size: its synthetic stores, in formats 4
and 5, are stores the builder makes (meta/ is the table they were made
from, the reader reads their pixels back), and its figures are what they
must be: objects per image are the store's files over its images, the
workers measured are the loader's, and the S3 server counts requests for a
cold read, fewer warm and fewer again through a filled cache; format 5
reads a warm window in one round trip. Speed itself is the benchmark's
output, not asserted here."""
import json

import numpy as np
import pytest
from moto import settings as moto_settings

from benchmarks import scale
from engine import store as layout
from engine.reader import WindowReader

ROWS = 40


@pytest.mark.parametrize("version", sorted(scale.FORMATS))
def test_a_synthetic_store_holds_its_table_and_pixels(tmp_path, version):
    """Both formats: meta/ is the table it was made from, and the engine's
    reader reads back every written row's pixels and instance layers."""
    table = scale.synthetic_table(ROWS, 5, (128, 300), 0.5)
    out = tmp_path / "store.zarr"
    store = scale.FORMATS[version](out, table, 5)
    store.build()
    store.add_pixels(range(0, ROWS, 2))
    store.add_pixels(range(ROWS))   # a block's shards written again with more rows
    assert store.written == set(range(ROWS))
    group = layout.open_store(out)
    assert layout.PixelLayout(**group.attrs["layout"]).packed == (version == 5)
    meta = layout.read_meta(group)
    for name in ("label", "height", "width", "bbox"):
        assert np.array_equal(meta[name], table[name]), name
    forged = table["label"] == 1
    assert 0 < forged.sum() < ROWS
    boxes = table["bbox"][forged]
    assert np.array_equal(meta["area_ratio"][forged],
                          ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                           / (table["height"][forged] * table["width"][forged])).astype(np.float32))
    reader = WindowReader(out)
    for row in range(ROWS):
        rgb, instances = scale.row_pixels(table, row, 5)
        assert np.array_equal(reader.read_array(layout.image_path(row)), rgb), row
        layers = reader.read_instances(row)
        assert (instances is None and layers == []) or np.array_equal(np.stack(layers), instances)


def test_a_tiny_run_counts_objects_memory_and_requests(tmp_path, monkeypatch, capsys):
    # the session's S3 server (tests/conftest.py) turns moto's credential
    # checks on for every moto server of this process; the benchmark's has a fake key
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    out_json = tmp_path / "scale.json"
    assert scale.main(["--rows", str(ROWS), "--idle-rows", "12", "--members", "highres_no_ela",
                       "--pixel-sample", str(ROWS), "--workers", "1", "--batches", "1",
                       "--batch-size", "4", "--img-size", "64", "--repeats", "1",
                       "--remote-samples", "6", "--latency-ms", "5", "--work", str(tmp_path / "work"),
                       "--keep", "--json", str(out_json)]) == 0
    figures = json.loads(out_json.read_text())
    assert out_json.with_suffix(".png").stat().st_size > 0
    reads = {}
    for version, measured in figures["formats"].items():
        store, = measured["stores"]
        assert store["format"] == int(version) and store["rows"] == ROWS
        # every image's pixels written: objects per image counted, not estimated
        files = [p for p in (tmp_path / "work" / f"format{version}-{ROWS}.zarr").rglob("*") if p.is_file()]
        assert store["pixel_rows_written"] == ROWS and store["files"] == len(files)
        assert store["objects_per_image"] == pytest.approx(len(files) / ROWS)
        member = store["members"]["highres_no_ela"]
        assert member["workers"] == 1 and member["worker_rss_mean_MB"] > 50
        assert member["above_idle_MB"] == pytest.approx(
            member["worker_rss_mean_MB"] - measured["idle"]["members"]["highres_no_ela"]["worker_rss_mean_MB"])
        remote = store["remote"]
        assert remote["open"]["requests"] >= len(layout.META_SCHEMA)   # every meta/ array read
        reads[version] = remote["members"]["highres_no_ela"]
        cold, warm = reads[version]["cold"], reads[version]["warm"]
        assert 1 <= cold["round_trips"] <= cold["requests"]
        assert 0 < warm["requests"] < cold["requests"] and warm["kB"] > 0
        assert reads[version]["cache warm"]["requests"] < 1
        assert reads[version]["cache warm"]["kB"] < cold["kB"] / 10
    old, new = figures["formats"]["4"]["stores"][0], figures["formats"]["5"]["stores"][0]
    # format 4: a new array costs its zarr.json (a HEAD and a GET), its shard index, its chunks
    assert reads["4"]["cold"]["requests"] >= 3 and reads["4"]["cold"]["heads"] >= 1
    # format 5: no metadata per image, and a window's tiles of every array in one round trip
    assert reads["5"]["cold"]["requests"] < reads["4"]["cold"]["requests"]
    assert reads["5"]["cold"]["heads"] == 0
    assert reads["5"]["warm"]["round_trips"] == 1
    # one block at this size: a shard per array for all 40 images, against a dozen objects each
    assert new["pixel_objects_per_image"] < old["pixel_objects_per_image"] / 10
    out = capsys.readouterr().out
    assert "above idle" in out and "cache warm" in out and "format 5 against format 4" in out
