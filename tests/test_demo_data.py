"""The built-in demo data: layout, forgery statistics, determinism."""
from __future__ import annotations

import hashlib
from collections import Counter

import cv2
import numpy as np

from engine.recipes import SIZE_CLASS_EDGES
from preprocess.demo_data import (FINE_TRACE_LEVEL, FORGED_AREA_SHARES, compose_figure,
                                  figure_size, fine_trace, forgery_masks, paste_copies,
                                  plan_images, trace_headroom, write_demo)


def _class_by_edges(ratio: float) -> int:
    """Size class 1-5, written out independently of engine.store.size_class."""
    tiny, small, medium, large = SIZE_CLASS_EDGES
    if ratio < tiny:
        return 1
    if ratio < small:
        return 2
    if ratio < medium:
        return 3
    if ratio < large:
        return 4
    return 5


def test_forged_area_distribution_follows_the_table():
    rng = np.random.default_rng(123)
    classes = []
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(64, 320, size=2))
        masks = forgery_masks(rng, h, w)
        assert masks.dtype == np.uint8 and masks.shape[1:] == (h, w)
        assert 1 <= masks.shape[0] <= 3
        assert set(np.unique(masks)) == {0, 1}
        assert masks.reshape(len(masks), -1).any(axis=1).all(), "every layer holds a region"
        assert masks.sum(axis=0).max() == 1, "regions do not overlap"
        classes.append(_class_by_edges(masks.max(axis=0).mean()))
    counts = Counter(classes)
    shares = np.array([counts[k] for k in range(1, 6)]) / len(classes)
    assert np.abs(shares - np.array(FORGED_AREA_SHARES)).max() < 0.06, shares


def test_plan_forges_about_54_percent_and_shares_case_ids():
    plan = plan_images(count=2000, supplemental=0, seed=3)
    assert len(plan) == 2000
    forged = np.mean([p.forged for p in plan])
    assert abs(forged - 0.54) < 0.03
    per_folder = Counter((p.folder, p.case_id) for p in plan)
    assert max(per_folder.values()) == 1, "no duplicate case id within a folder"
    ids = Counter(p.case_id for p in plan)
    assert 0.2 < sum(v == 2 for v in ids.values()) / len(ids) < 0.4


def test_figure_sizes_mostly_typical_and_within_bounds():
    rng = np.random.default_rng(5)
    sides = np.array([figure_size(rng, 64, 4000) for _ in range(1000)])
    assert sides.min() >= 64 and sides.max() <= 4000
    assert np.mean((sides >= 300) & (sides <= 2000)) > 0.7
    assert (sides < 300).any() and (sides > 2000).any()


def test_copies_change_only_the_masked_pixels():
    rng = np.random.default_rng(9)
    figure = compose_figure(rng, 300, 400)
    masks = forgery_masks(rng, 300, 400)
    forged = paste_copies(rng, figure, masks)
    outside = masks.max(axis=0) == 0
    np.testing.assert_array_equal(forged[outside], figure[outside])
    assert (forged != figure).any()


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    kwargs = dict(count=6, min_side=64, max_side=160, supplemental=1, progress=False)
    write_demo(tmp_path / "a", seed=11, **kwargs)
    write_demo(tmp_path / "b", seed=11, **kwargs)
    write_demo(tmp_path / "c", seed=12, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_demo_folder_layout_and_png_formats(demo_source):
    images = sorted(demo_source.glob("train_images/*/*.png")) + \
        sorted(demo_source.glob("supplemental_images/*.png"))
    kinds = Counter()
    for path in images:
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        kinds[(raw.dtype.itemsize * 8, 1 if raw.ndim == 2 else raw.shape[2])] += 1
        assert 64 <= min(raw.shape[:2]) and max(raw.shape[:2]) <= 700
        forged = path.parent.name != "authentic"
        mask_dir = "supplemental_masks" if path.parent.name == "supplemental_images" else "train_masks"
        mask = demo_source / mask_dir / f"{path.stem}.npy"
        if forged:
            assert np.load(mask).shape[1:] == raw.shape[:2]
    assert any(bits == 16 for bits, _ in kinds), kinds
    assert any(ch == 4 for _, ch in kinds), kinds
    assert any(ch == 1 for _, ch in kinds) and any(ch == 3 for _, ch in kinds), kinds
    authentic = {p.stem for p in demo_source.glob("train_images/authentic/*.png")}
    forged = {p.stem for p in demo_source.glob("train_images/forged/*.png")}
    assert authentic & forged, "some case ids exist as authentic and forged"


# ------------------------------------------------------------ the study set (--forgery fine_trace)

def test_study_set_forgeries_in_every_size_class(tmp_path):
    write_demo(tmp_path, count=60, seed=2, min_side=64, max_side=200, supplemental=0,
               progress=False, forgery="fine_trace")
    classes = {_class_by_edges(np.load(path).max(axis=0).mean())
               for path in (tmp_path / "train_masks").glob("*.npy")}
    assert classes == {1, 2, 3, 4, 5}


def test_study_set_same_seed_same_files_and_default_demo_untouched(tmp_path):
    kwargs = dict(count=6, min_side=64, max_side=160, supplemental=1, progress=False)
    write_demo(tmp_path / "a", seed=11, forgery="fine_trace", **kwargs)
    write_demo(tmp_path / "b", seed=11, forgery="fine_trace", **kwargs)
    write_demo(tmp_path / "copy_move", seed=11, **kwargs)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "copy_move")
    masks = {p.name for p in (tmp_path / "a").rglob("*.npy")}
    assert masks == {p.name for p in (tmp_path / "copy_move").rglob("*.npy")}, \
        "the same figures and masks; only what a forged region holds differs"


def _region_difference(forged, authentic, region, size=None):
    """Mean absolute difference inside the region, at full resolution or after
    the whole-image resize prediction makes (trainers/ensemble.py)."""
    from trainers.ensemble import _resize

    if size is not None:
        forged, authentic = _resize(forged, (size, size)), _resize(authentic, (size, size))
        region = cv2.resize(region.astype(np.uint8), (size, size),
                            interpolation=cv2.INTER_NEAREST).astype(bool)
    return np.abs(forged.astype(float) - authentic.astype(float))[region].mean()


def test_study_set_trace_is_finer_than_the_whole_image_resize():
    """The forged twin differs from its authentic figure by FINE_TRACE_LEVEL
    grey levels everywhere inside the forgery at full resolution, on average
    not at all (its mean is the authentic one's), and almost nothing is left
    after the whole-image downscale to a model's input: a figure of 1024 px
    read at 256 px (4x) or at 512 px (2x), or of 1100 x 900 px at 256."""
    rng = np.random.default_rng(4)
    for height, width, size, left in ((1024, 1024, 256, 0.02), (1024, 1024, 512, 0.1),
                                      (1100, 900, 256, 0.05)):
        authentic = trace_headroom(compose_figure(rng, height, width))
        assert authentic.min() >= FINE_TRACE_LEVEL and authentic.max() <= 255 - FINE_TRACE_LEVEL
        for _ in range(5):
            masks = forgery_masks(rng, height, width)
            forged = fine_trace(rng, authentic, masks)
            region = masks.max(axis=0).astype(bool)
            np.testing.assert_array_equal(forged[~region], authentic[~region])
            full = _region_difference(forged, authentic, region)
            assert full == FINE_TRACE_LEVEL, "the trace is never clipped"
            bias = forged[region].astype(float).mean() - authentic[region].astype(float).mean()
            assert abs(bias) < 0.05 * FINE_TRACE_LEVEL, "zero-mean: no change of brightness"
            coarse = _region_difference(forged, authentic, region, size)
            assert coarse < left * FINE_TRACE_LEVEL, (height, width, size, coarse)
