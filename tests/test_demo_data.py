"""The built-in demo data: layout, forgery statistics, determinism."""
from __future__ import annotations

import hashlib
from collections import Counter

import cv2
import numpy as np

from engine.recipes import SIZE_CLASS_EDGES
from preprocess.demo_data import (FORGED_AREA_SHARES, compose_figure, figure_size,
                                  forgery_masks, paste_copies, plan_images, write_demo)


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
