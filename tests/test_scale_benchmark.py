"""benchmarks/scale.py at a tiny size: its synthetic stores are stores the
builder makes (verify_store finds them clean, meta/ is the table it was made
from), and its figures are what they must be: objects per image are the
store's files over its images, the workers measured are the loader's, and
the S3 server counts requests for a cold read, fewer warm and fewer again
through a filled cache. Speed itself is the benchmark's output, not asserted
here."""
import json

import numpy as np
import pytest
from moto import settings as moto_settings

from benchmarks import scale
from engine import store as layout
from preprocess import verify_store

ROWS = 40


def test_a_synthetic_store_is_a_clean_store_of_its_table(tmp_path):
    table = scale.synthetic_table(ROWS, 5, (128, 300), 0.5)
    out = tmp_path / "store.zarr"
    scale.build_format_4(out, table)
    scale.add_pixels_format_4(out, table, range(ROWS), 5, written := set())
    assert written == set(range(ROWS))
    assert verify_store.main([str(out)]) == 0
    meta = layout.read_meta(layout.open_store(out))
    for name in ("label", "height", "width", "bbox"):
        assert np.array_equal(meta[name], table[name]), name
    forged = table["label"] == 1
    assert 0 < forged.sum() < ROWS
    boxes = table["bbox"][forged]
    assert np.array_equal(meta["area_ratio"][forged],
                          ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                           / (table["height"][forged] * table["width"][forged])).astype(np.float32))


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
    store, = figures["stores"]
    assert store["format"] == figures["format"] == layout.VERSION and store["rows"] == ROWS
    # every image's pixels written: objects per image counted, not estimated
    files = [p for p in (tmp_path / "work" / f"format4-{ROWS}.zarr").rglob("*") if p.is_file()]
    assert store["pixel_rows_written"] == ROWS and store["files"] == len(files)
    assert store["objects_per_image"] == pytest.approx(len(files) / ROWS)
    member = store["members"]["highres_no_ela"]
    assert member["workers"] == 1 and member["worker_rss_mean_MB"] > 50
    assert member["above_idle_MB"] == pytest.approx(
        member["worker_rss_mean_MB"] - figures["idle"]["members"]["highres_no_ela"]["worker_rss_mean_MB"])
    remote = store["remote"]
    assert remote["open"]["requests"] >= len(layout.META_SCHEMA)   # every meta/ array read
    reads = remote["members"]["highres_no_ela"]
    cold, warm = reads["cold"], reads["warm"]
    # a new array: its zarr.json, its shard index, then its chunks
    assert cold["requests"] >= 3 and 1 <= cold["round_trips"] <= cold["requests"]
    assert 0 < warm["requests"] < cold["requests"] and warm["kB"] > 0
    # a block is a whole shard at these sizes: the same requests, plus the root's build id
    assert reads["cache cold"]["requests"] >= cold["requests"]
    assert reads["cache warm"]["requests"] < 1 and reads["cache warm"]["kB"] < cold["kB"] / 10
    out = capsys.readouterr().out
    assert "above idle" in out and "cache warm" in out and "wall time" in out
