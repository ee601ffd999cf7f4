"""benchmarks/layout_sweep.py's parts that need no build: the layouts it
sweeps, the sample of a store's source its stores are built from, the raw
bytes its sizes and build rates are measured against, and its figures
against the default layout's. Its timings are the benchmark's output, not
asserted here."""
import re
from dataclasses import asdict

import numpy as np
import pytest
import zarr

from benchmarks import layout_sweep
from engine import store as layout
from preprocess.source import discover

# (case id, label, folder): "a" is both an authentic and a forged case
CASES = [("a", 0, "train_images/authentic"), ("b", 0, "train_images/authentic"),
         ("a", 1, "train_images/forged"), ("c", 1, "train_images/forged")]


def test_the_sweep_is_packed_layouts_only_the_default_among_them():
    layouts = layout_sweep.sweep_layouts()
    assert all(p.packed for p in layouts)
    assert len(set(layouts)) == 3 * len(layout_sweep.CODECS)
    assert {p.chunk for p in layouts} == {512, 256, 128}
    assert layout.DEFAULT_LAYOUT in layouts


def test_raw_pixel_bytes_count_every_level_of_each_kind_and_the_instance_layers():
    meta = {"height": np.array([300, 180]), "width": np.array([200, 260]),
            "label": np.array([1, 0]), "n_instances": np.array([2, 0])}
    # 300 x 200: levels 300 x 200 and 150 x 100, RGB + ELA + mask, two layers;
    # 180 x 260: levels 180 x 260 and 90 x 130, RGB + ELA
    expected = 5 * (300 * 200 + 150 * 100) + 2 * 300 * 200 + 4 * (180 * 260 + 90 * 130)
    assert layout_sweep.raw_pixel_bytes(meta) == expected


@pytest.fixture
def source_store(tmp_path):
    """A source folder of CASES and a store whose meta/ lists them, built
    from it (its root records the folder as the build's source)."""
    source = tmp_path / "source"
    for case_id, label, folder in CASES:
        files = [f"{folder}/{case_id}.png"] + [f"train_masks/{case_id}.npy"] * label
        for name in files:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(f"{name} of {case_id}".encode())
    store = tmp_path / "store.zarr"
    group = zarr.open_group(str(store), mode="w")
    meta = {name: np.zeros((len(CASES),) + shape, np.uint8 if dtype is str else dtype)
            for name, (dtype, shape) in layout.META_SCHEMA.items()}
    meta["case_id"] = np.array([c for c, _, _ in CASES]).astype(np.dtypes.StringDType())
    meta["label"] = np.array([label for _, label, _ in CASES], np.uint8)
    meta["instance_start"] = np.zeros(len(CASES) + 1, np.int64)
    for name, values in meta.items():
        layout.create_table(group, f"meta/{name}", values)
    group.attrs.update(format=layout.FORMAT, version=layout.VERSION, fingerprint="f", build_id="b",
                       build={"source": str(source)})
    return source, store


def test_the_sample_is_the_chosen_rows_cases_linked_to_their_files(source_store, tmp_path):
    source, store = source_store
    rows = np.random.default_rng(3).choice(len(CASES), 2, replace=False)
    sample = tmp_path / "sample"
    assert layout_sweep.sample_source(store, 2, 3, sample) == 2
    cases, problems = discover(sample)
    assert problems == []
    assert sorted((c.case_id, c.label, c.folder) for c in cases) == sorted(CASES[r] for r in rows)
    for case in cases:
        for file in filter(None, (case.image, case.mask)):
            assert file.is_symlink()
            assert file.resolve() == (source / file.relative_to(sample)).resolve()


def test_a_sample_whose_source_files_are_gone_names_the_folder(source_store, tmp_path):
    source, store = source_store
    (source / "train_masks" / "c.npy").unlink()   # forged "c" is no case any more
    with pytest.raises(SystemExit, match=re.escape(f"1 of the chosen rows are gone from {source}")):
        layout_sweep.sample_source(store, len(CASES), 0, tmp_path / "sample")


def test_every_layout_is_given_against_the_default():
    other = layout.PixelLayout(128, "zstd", 3)
    results = {"raw_bytes": 4_000_000, "layouts": [
        {"layout": asdict(other), "stored_bytes": 1_000_000, "build_seconds": 4.0,
         "members": {"m": {"read_ms": 3.0}}},
        {"layout": asdict(layout.DEFAULT_LAYOUT), "stored_bytes": 2_000_000, "build_seconds": 2.0,
         "members": {"m": {"read_ms": 1.5}}}]}
    default = layout_sweep.against_default(results)
    assert default is results["layouts"][1]
    assert default["size_ratio"] == 0.5 and default["build_MB_s"] == 2.0
    assert default["x_default"] == {"size": 1.0, "build": 1.0, "m": 1.0}
    assert results["layouts"][0]["x_default"] == {"size": 0.5, "build": 0.5, "m": 2.0}
