"""engine/sampling.py: weights, draws, epoch plans and crop windows."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from engine import sampling
from engine.recipes import RECIPES, WHOLE_IMAGE, SamplingRule, View
from engine.sampling import (EpochPlan, crop_windows, epoch_size, member_weights,
                             sample_indices, sample_seeds)
from engine.store import open_store, read_meta

REPO = Path(__file__).resolve().parents[1]
# A goodness-of-fit test at this level fails by chance once in 10^4 runs; the
# draws are deterministic, so a pass here passes every time.
P_MIN = 1e-4
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True)


def assert_fits(weights: np.ndarray, draws: np.ndarray) -> None:
    """Drawn frequencies match weights/sum; zero-weight rows are never drawn."""
    counts = np.bincount(draws, minlength=weights.size)
    assert counts.size == weights.size
    assert counts[weights == 0].sum() == 0
    support = weights > 0
    expected = weights[support] / weights[support].sum() * draws.size
    if support.sum() > 1:
        assert chisquare(counts[support], expected).pvalue > P_MIN


# ---------------------------------------------------------------- draws

WEIGHT_SHAPES = {
    "uniform": np.ones(40),
    "linear": np.arange(1, 41, dtype=float),
    "geometric": 0.8 ** np.arange(30),
    "half_zero": np.where(np.arange(50) % 2 == 0, 0.0, 1.0 + np.arange(50) % 7),
    "one_heavy": np.r_[1000.0, np.full(20, 1.0)],
    "single": np.r_[np.zeros(5), 2.5, np.zeros(5)],
    "ints": np.array([0, 3, 1, 0, 5], dtype=np.int64),
}


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_draw_frequencies_follow_weights(shape):
    weights = WEIGHT_SHAPES[shape]
    draws = sample_indices(weights, 200_000, seed=3, epoch=1)
    assert draws.dtype == np.int64 and draws.shape == (200_000,)
    assert_fits(np.asarray(weights, dtype=float), draws)


def test_draws_are_deterministic_and_depend_on_seed_and_epoch():
    weights = WEIGHT_SHAPES["linear"]
    first = sample_indices(weights, 5000, seed=7, epoch=2)
    assert np.array_equal(first, sample_indices(weights, 5000, seed=7, epoch=2))
    assert not np.array_equal(first, sample_indices(weights, 5000, seed=8, epoch=2))
    assert not np.array_equal(first, sample_indices(weights, 5000, seed=7, epoch=3))
    # Draw i does not depend on how many draws were asked for.
    assert np.array_equal(first[:100], sample_indices(weights, 100, seed=7, epoch=2))


_DIGEST_SCRIPT = """
import hashlib, sys, numpy as np
from engine import sampling
from engine.recipes import RECIPES
from engine.sampling import crop_windows, sample_indices, sample_seeds
sampling.PARALLEL_MIN_THREADS = 1
sampling.PARALLEL_MIN_ITEMS = dict.fromkeys(sampling.PARALLEL_MIN_ITEMS, int(sys.argv[1]))
w = np.arange(1, 501, dtype=float) % 17
draws = sample_indices(w, 100_000, 11, 4)
rng = np.random.default_rng(0)
h, wd = rng.integers(64, 4000, 500), rng.integers(64, 4000, 500)
box = np.stack([h // 4, wd // 4, h // 4 + 30, wd // 4 + 50], 1)
cen = (box[:, :2] + 10).astype(np.float32)
digest = hashlib.sha256(draws.tobytes())
for name in ("highres_no_ela", "hard_negative", "small_specialist"):
    win = crop_windows(RECIPES[name].view, draws, np.arange(draws.size), h, wd, box, cen, 11, 4)
    digest.update(win.tobytes())
digest.update(sample_seeds(11, 4, np.arange(draws.size)).tobytes())
print(digest.hexdigest())
"""


def test_same_output_across_processes_threads_and_serial_or_parallel_kernels():
    digests = set()
    # (threads, parallel from this many items): the serial kernels, then the
    # parallel ones on one and on two threads.
    for threads, parallel_min in (("2", 1 << 40), ("1", 0), ("2", 0)):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads)
        result = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT, str(parallel_min)],
                                cwd=REPO, env=env, capture_output=True, text=True, check=True)
        digests.add(result.stdout.strip())
    assert len(digests) == 1


_STRADDLE_SCRIPT = """
import sys, numpy as np
from engine import sampling
from engine.recipes import RECIPES
from engine.sampling import crop_windows, sample_indices, sample_seeds
# Parallel from `at` items on, whatever the thread count; `at` is not a
# multiple of the serial draw kernel's block.
at = 3 * sampling._DRAW_BLOCK + 7
sampling.PARALLEL_MIN_THREADS = 1
sampling.PARALLEL_MIN_ITEMS = dict.fromkeys(sampling.PARALLEL_MIN_ITEMS, at)
rng = np.random.default_rng(2)
big = rng.random(300_000) * (rng.random(300_000) < 0.7)  # a table beyond the L2 cache
h, w = rng.integers(64, 4000, 300_000), rng.integers(64, 4000, 300_000)
box = np.stack([h // 4, w // 4, h // 4 + 30, w // 4 + 50], 1)
cen = (box[:, :2] + 10).astype(np.float32)
for n in (at - 1, at, at + 1):  # serial, then parallel twice
    assert sampling.parallel_pays("draws", n) == (n >= at)
    for weights in (np.arange(1, 501.0) % 17, big):
        print("draws", n, *sample_indices(weights, n, 11, 4)[:at - 1])
    rows = sample_indices(big, n, 11, 4)
    for name in ("highres_no_ela", "high_recall", "small_specialist"):
        win = crop_windows(RECIPES[name].view, rows, np.arange(n), h, w, box, cen, 11, 4)
        print(name, n, *win[:at - 1].ravel())
    print("seeds", n, *sample_seeds(11, 4, np.arange(n))[:at - 1])
"""


def test_serial_and_parallel_kernels_agree_on_either_side_of_the_threshold():
    # In a fresh process: starting Numba's thread pool here would make this
    # process unsafe to fork for the loader tests.
    lines = subprocess.run([sys.executable, "-c", _STRADDLE_SCRIPT], cwd=REPO,
                           env=dict(os.environ, NUMBA_NUM_THREADS="2"), capture_output=True,
                           text=True, check=True).stdout.splitlines()
    by_output = {}
    for line in lines:
        name, n, values = line.split(" ", 2)
        by_output.setdefault(name, []).append(values)
    assert sorted(by_output) == ["draws", "high_recall", "highres_no_ela", "seeds",
                                 "small_specialist"]
    for name, outputs in by_output.items():
        assert len(outputs) == (6 if name == "draws" else 3)
        # Draw i, window i and seed i do not depend on the kernel that made them.
        assert len(set(outputs[0::2] if name == "draws" else outputs)) == 1, name
        if name == "draws":
            assert len(set(outputs[1::2])) == 1


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("kernel", ["draws", "windows", "seeds"])
def test_parallel_only_with_three_threads_and_enough_items(kernel, threads):
    at = sampling.PARALLEL_MIN_ITEMS[kernel]
    enough = threads >= sampling.PARALLEL_MIN_THREADS
    assert sampling.PARALLEL_MIN_THREADS == 3
    assert not sampling.parallel_pays(kernel, at - 1, threads)
    assert sampling.parallel_pays(kernel, at, threads) == enough
    assert sampling.parallel_pays(kernel, 1 << 40, threads) == enough


def test_the_choice_reads_the_configured_threads_without_starting_the_pool():
    script = """
import numba, numpy as np
from numba.np.ufunc import parallel
from engine import sampling
at = sampling.PARALLEL_MIN_ITEMS["seeds"]
print(sampling.parallel_pays("seeds", at), sampling.parallel_pays("seeds", at, threads=1))
sampling.sample_indices(np.ones(10), 1000, 0, 0)
print(parallel._is_initialized)
"""
    for threads, pays in (("2", "False"), ("3", "True")):
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True,
                                env=dict(os.environ, NUMBA_NUM_THREADS=threads),
                                capture_output=True, text=True)
        assert result.stdout.split() == [pays, "False", "False"]


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_alias_table_holds_each_rows_probability(shape):
    weights = np.asarray(WEIGHT_SHAPES[shape], dtype=float)
    table = sampling._alias_table(weights)
    prob = table[:, 0].view(np.float64)
    support = np.flatnonzero(weights)
    assert np.array_equal(table[:, 1], support)
    assert np.all(np.isin(table[:, 2], support)) and np.all((0 <= prob) & (prob <= 1))
    # Column j gives its own row with probability prob[j], its alias otherwise.
    mass = np.bincount(table[:, 1], prob, weights.size) + \
        np.bincount(table[:, 2], 1 - prob, weights.size)
    assert np.allclose(mass / support.size, weights / weights.sum(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weights, message", [
    (np.array([1.0, -0.5, 2.0]), "negative at 1 rows"),
    (np.array([1.0, np.nan]), "NaN"),
    (np.array([np.inf, 1.0]), "infinite"),
    (np.zeros(4), "all zero"),
    (np.ones((2, 3)), "1-D"),
    (np.array([]), "empty"),
    (np.array(["a", "b"]), "real numbers"),
])
def test_bad_weights_are_rejected(weights, message):
    with pytest.raises(ValueError, match=f"weights: .*{message}"):
        sample_indices(weights, 10, 0, 0)


def test_bad_draw_count_is_rejected():
    with pytest.raises(ValueError, match="num_samples: must be >= 0"):
        sample_indices(np.ones(3), -1, 0, 0)
    with pytest.raises(TypeError):
        sample_indices(np.ones(3), 2.5, 0, 0)


# ---------------------------------------------------------------- weights

def test_member_weights_follow_members_md():
    # Rows: authentic (hard negative), authentic, forged at areas around the
    # bin edges, a hard false negative, a forged row of the val split.
    label = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    area = np.array([0, 0, 0.001, 0.005, 0.0099, 0.01, 0.0299, 0.03, 0.2, 0.001, 0.001])
    split = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    hard_negative = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
    hard_fn = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    expected = {
        "highres_no_ela": [0, 0, 3, 3, 3, 3, 3, 1, 1, 3, 0],
        "comprehensive": [0, 0, 3, 3, 3, 3, 3, 1, 1, 3, 0],
        "hard_negative": [2, 0, 3, 3, 3, 2, 2, 2, 1, 3, 0],
        "high_recall": [0, 0, 3, 3, 3, 2, 2, 2, 1, 5, 0],
        "enhanced_aug": [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
        "small_specialist": [0, 0, 5, 2, 2, 2, 0, 0, 0, 5, 0],
    }
    for name, want in expected.items():
        got = member_weights(RECIPES[name].sampling, label, area, split, 0,
                             hard_negative=hard_negative, hard_fn=hard_fn)
        assert got.tolist() == want, name


def test_member_weights_val_split_and_empty_masks():
    rule = RECIPES["highres_no_ela"].sampling
    label, area, split = np.array([1, 1, 1]), np.array([0.01, 0.0, 0.5]), np.array([1, 1, 0])
    assert member_weights(rule, label, area, split, 1).tolist() == [3, 0, 0]


def test_mined_rule_without_mining_needs_mining_or_mined_false():
    rule = RECIPES["hard_negative"].sampling
    label, area, split = np.array([0, 1]), np.array([0.0, 0.02]), np.array([0, 0])
    with pytest.raises(ValueError, match="hard_negative: .*mining must run first"):
        member_weights(rule, label, area, split, 0)
    with pytest.raises(ValueError, match="hard_fn: .*mining must run first"):
        member_weights(RECIPES["high_recall"].sampling, label, area, split, 0)
    assert member_weights(rule, label, area, split, 0, mined=False).tolist() == [0, 2]


def test_member_weights_reject_mismatched_arrays():
    rule = SamplingRule()
    with pytest.raises(ValueError, match="area_ratio: 2 rows, expected 3"):
        member_weights(rule, np.ones(3), np.ones(2), np.zeros(3), 0)
    with pytest.raises(ValueError, match="area_ratio: values must be finite"):
        member_weights(rule, np.ones(2), np.array([np.nan, 0.1]), np.zeros(2), 0)
    with pytest.raises(ValueError, match="label: values must be 0"):
        member_weights(rule, np.array([1, 2]), np.full(2, 0.1), np.zeros(2), 0)
    with pytest.raises(ValueError, match="want_split: 0 .train. or 1 .val., got 2"):
        member_weights(rule, np.ones(2), np.full(2, 0.1), np.zeros(2), 2)


def test_epoch_size_is_multiplier_times_nonzero():
    weights = np.array([0, 5, 2, 0, 2.0])
    assert epoch_size(RECIPES["small_specialist"].sampling, weights) == 6
    assert epoch_size(RECIPES["highres_no_ela"].sampling, weights) == 3


# ---------------------------------------------------------------- demo store

@pytest.fixture(scope="module")
def demo_meta(demo_store):
    return read_meta(open_store(demo_store))


@pytest.mark.parametrize("member", RECIPES)
def test_member_rules_on_demo_store(member, demo_meta):
    recipe = RECIPES[member]
    rng = np.random.default_rng(5)
    n = demo_meta["label"].size
    flags = {"hard_negative": rng.random(n) < 0.3, "hard_fn": rng.random(n) < 0.3}
    weights = member_weights(recipe.sampling, demo_meta["label"], demo_meta["area_ratio"],
                             demo_meta["split"], 0, **flags)
    assert np.all(weights[demo_meta["split"] != 0] == 0)
    if not np.any(weights > 0):
        pytest.skip(f"the demo store has no training image that {member} draws")
    draws = sample_indices(weights, 100_000, seed=1, epoch=0)
    assert_fits(weights, draws)
    plan = EpochPlan.build(weights, epoch_size(recipe.sampling, weights), 1, 0)
    batch = plan.for_rank(0, 1, 4, drop_last=False)[0]
    windows = crop_windows(recipe.view, batch.indices, batch.positions, demo_meta["height"],
                           demo_meta["width"], demo_meta["bbox"], demo_meta["centroid"], 1, 0)
    assert_inside(windows, demo_meta["height"][batch.indices], demo_meta["width"][batch.indices])


# ---------------------------------------------------------------- epoch plan

def _plan(n: int) -> EpochPlan:
    return EpochPlan.build(np.arange(1, 13, dtype=float), n, seed=4, epoch=9)


@pytest.mark.parametrize("n", [0, 1, 7, 24, 37])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_rank_slices_are_disjoint_and_cover_the_plan(n, world_size, batch_size, drop_last):
    plan = _plan(n)
    ranks = [plan.for_rank(r, world_size, batch_size, drop_last) for r in range(world_size)]
    counts = {len(batches) for batches in ranks}
    assert counts == {plan.num_batches(world_size, batch_size, drop_last)}
    assert (counts == {0}) == (n == 0)
    positions = np.concatenate([b.positions for batches in ranks for b in batches] or [[]])
    assert np.unique(positions).size == positions.size
    padded = -(-n // world_size) * world_size
    if not drop_last:
        assert sorted(positions.tolist()) == list(range(padded))
    for batches in ranks:
        for b in batches:
            assert np.array_equal(b.indices, plan.indices[b.positions % n])
        sizes = [b.positions.size for b in batches]
        assert all(s == batch_size for s in sizes[:-1])
        if drop_last and sizes and sizes[-1] != batch_size:
            assert len(sizes) == 1  # kept only because the rank would have no batch
    if drop_last:
        lost = padded - positions.size
        assert lost < world_size * batch_size


@pytest.mark.parametrize("start", [0, 1, 4, 9])
def test_resume_at_batch_k_is_the_tail_of_the_plan(start):
    plan = _plan(37)
    full = plan.for_rank(1, 2, 2, drop_last=True)
    tail = plan.for_rank(1, 2, 2, drop_last=True, start_batch=start)
    assert len(tail) == len(full) - start
    for a, b in zip(full[start:], tail):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.indices, b.indices)


def test_resume_past_the_end_and_bad_ranks_are_rejected():
    plan = _plan(10)
    with pytest.raises(ValueError, match="start_batch: must be in"):
        plan.for_rank(0, 2, 2, drop_last=True, start_batch=4)
    with pytest.raises(ValueError, match="rank: must be in"):
        plan.for_rank(2, 2, 2, drop_last=True)
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        plan.for_rank(0, 2, 0, drop_last=True)


def test_windows_and_seeds_do_not_depend_on_the_rank_layout():
    plan = _plan(40)
    rng = np.random.default_rng(0)
    height, width = rng.integers(200, 3000, 12), rng.integers(200, 3000, 12)
    bbox, centroid = np.full((12, 4), -1), np.full((12, 2), -1.0)
    view = RECIPES["highres_no_ela"].view
    everything = crop_windows(view, plan.indices, np.arange(40), height, width, bbox,
                              centroid, 4, 9)
    seeds = sample_seeds(4, 9, np.arange(40))
    for batch in plan.for_rank(2, 3, 3, drop_last=True, start_batch=1):
        windows = crop_windows(view, batch.indices, batch.positions, height, width, bbox,
                               centroid, 4, 9)
        assert np.array_equal(windows, everything[batch.positions])
        assert np.array_equal(sample_seeds(4, 9, batch.positions), seeds[batch.positions])
    assert np.unique(seeds).size == seeds.size and np.all(seeds >= 0)
    assert not np.array_equal(seeds, sample_seeds(4, 10, np.arange(40)))


# ---------------------------------------------------------------- windows

def assert_inside(windows, height, width):
    y0, x0, y1, x1 = windows.T
    assert windows.dtype == np.int32
    assert np.all((0 <= y0) & (y0 < y1) & (y1 <= height))
    assert np.all((0 <= x0) & (x0 < x1) & (x1 <= width))


def one_window(view, height, width, bbox=(-1, -1, -1, -1), centroid=(-1.0, -1.0),
               position=0, seed=0):
    return crop_windows(view, np.array([0]), np.array([position]), np.array([height]),
                        np.array([width]), np.array([bbox]), np.array([centroid]),
                        seed, 0)[0]


sides = st.integers(1, 4000)
positions = st.integers(0, 2**40)


@st.composite
def forged_images(draw):
    """(height, width, bbox, centroid) with the box and centroid inside the image."""
    height, width = draw(sides), draw(sides)
    # Box sides drawn as offsets so that small boxes, whose window is not
    # capped by the image, are common.
    y0, x0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
    y1 = y0 + draw(st.integers(1, height - y0))
    x1 = x0 + draw(st.integers(1, width - x0))
    cy = draw(st.floats(y0, y1 - 1))
    cx = draw(st.floats(x0, x1 - 1))
    return height, width, (y0, x0, y1, x1), (cy, cx)


@PROPERTY
@given(forged_images(), positions, st.sampled_from([64, 128, 300]))
def test_around_forgery_holds_the_box_and_keeps_its_side_range(image, position, min_side):
    height, width, box, centroid = image
    view = View("around_forgery", side_mult=(2.0, 4.0), min_side=min_side)
    window = one_window(view, height, width, box, centroid, position)
    assert_inside(window[None], height, width)
    y0, x0, y1, x1 = window.tolist()
    short = min(height, width)
    if short < min_side:
        assert window.tolist() == [0, 0, height, width]
        return
    assert y1 - y0 == x1 - x0
    extent = max(box[2] - box[0], box[3] - box[1])
    side = y1 - y0
    assert min(max(2 * extent, min_side), short) <= side <= min(max(4 * extent, min_side), short)
    if extent <= short:
        assert y0 <= box[0] and x0 <= box[1] and y1 >= box[2] and x1 >= box[3]


@PROPERTY
@given(sides, sides, positions)
def test_around_forgery_without_a_box_is_a_min_side_square(height, width, position):
    view = RECIPES["small_specialist"].view
    y0, x0, y1, x1 = one_window(view, height, width, position=position).tolist()
    if min(height, width) < view.min_side:
        assert (y0, x0, y1, x1) == (0, 0, height, width)
    else:
        assert y1 - y0 == x1 - x0 == view.min_side


def misses(windows, boxes):
    """Whether each window holds no pixel of its (half-open) forgery box."""
    y0, x0, y1, x1 = windows.T
    return (y1 <= boxes[:, 0]) | (y0 >= boxes[:, 2]) | (x1 <= boxes[:, 1]) | (x0 >= boxes[:, 3])


@PROPERTY
@given(forged_images(), positions, st.sampled_from([0.3, 0.9]))
def test_a_negative_window_misses_the_forgery_at_the_same_side(image, position, share):
    height, width, box, centroid = image
    view = View("around_forgery", min_side=64, negative_share=share)
    window = one_window(view, height, width, box, centroid, position)
    assert_inside(window[None], height, width)
    plain = one_window(replace(view, negative_share=0.0), height, width, box, centroid, position)
    if min(height, width) < view.min_side:      # taken whole, as without negatives
        assert window.tolist() == plain.tolist() == [0, 0, height, width]
        return
    # the same side either way; around the forgery, the very window of a view without negatives
    assert window[2] - window[0] == window[3] - window[1] == plain[2] - plain[0]
    assert misses(window[None], np.array([box]))[0] or window.tolist() == plain.tolist()


def room_for_a_negative(sides, boxes, heights, widths):
    """Whether a window of each side fits beside its box: above, below, left or right."""
    return ((boxes[:, 0] >= sides) | (heights - boxes[:, 2] >= sides)
            | (boxes[:, 1] >= sides) | (widths - boxes[:, 3] >= sides))


def test_the_negative_share_is_honoured_over_an_epoch_plan(demo_meta):
    recipe = RECIPES["small_specialist"]
    weights = member_weights(recipe.sampling, demo_meta["label"], demo_meta["area_ratio"],
                             demo_meta["split"], 0)
    plan = EpochPlan.build(weights, 20_000, seed=3, epoch=1)
    args = (plan.indices, np.arange(len(plan)), demo_meta["height"], demo_meta["width"],
            demo_meta["bbox"], demo_meta["centroid"], 3, 1)
    boxes = demo_meta["bbox"][plan.indices]
    plain = crop_windows(replace(recipe.view, negative_share=0.0), *args)
    room = room_for_a_negative(plain[:, 2] - plain[:, 0], boxes, demo_meta["height"][plan.indices],
                               demo_meta["width"][plan.indices])
    assert 1000 < room.sum() < len(plan)       # the demo's small figures often have none
    for share in (0.0, 0.25, recipe.view.negative_share):
        windows = crop_windows(replace(recipe.view, negative_share=share), *args)
        negative = misses(windows, boxes)
        assert not negative[~room].any()                          # no room: around the forgery
        expected = share * room.sum()
        assert abs(negative.sum() - expected) <= 4 * np.sqrt(expected * (1 - share)) + 0.5, share
        # the others keep the window of a view without negatives; every side is kept
        assert np.array_equal(windows[~negative], plain[~negative])
        assert np.array_equal(windows[:, 2] - windows[:, 0], plain[:, 2] - plain[:, 0])


def test_negative_windows_spread_over_every_side_of_the_forgery():
    view = View("around_forgery", side_mult=(2.0, 2.0), min_side=100, negative_share=0.5)
    box = (450, 300, 500, 350)
    windows = windows_of_one_image(view, n=8000, side=1000, bbox=box, centroid=(475.0, 325.0))
    away = windows[misses(windows, np.array([box] * len(windows)))]
    assert abs(len(away) - 4000) < 4 * np.sqrt(2000)
    above, below = away[:, 2] <= box[0], away[:, 0] >= box[2]
    left, right = away[:, 3] <= box[1], away[:, 1] >= box[3]
    assert all(part.sum() > 50 for part in (above, below, left & ~above & ~below,
                                              right & ~above & ~below))
    # uniform over the places that miss it: the share above is its share of those places
    columns = 1000 - 100 + 1
    places_above = (450 - 100 + 1) * columns
    places = places_above + (1000 - 100 - 500 + 1) * columns + (499 - 351 + 1) * (
        (300 - 100 + 1) + (1000 - 100 - 350 + 1))
    assert abs(above.mean() - places_above / places) < 0.03


def test_a_forgery_no_window_can_miss_keeps_its_window():
    view = View("around_forgery", min_side=64, negative_share=0.9)
    box = (10, 10, 90, 90)                       # side 160..320 on a 100 px image: the image
    windows = windows_of_one_image(view, n=50, side=100, bbox=box, centroid=(50.0, 50.0))
    assert np.all(windows == [0, 0, 100, 100])


@pytest.mark.parametrize("share, problem", [(-0.1, "at least 0"), (1.0, "below 1"),
                                            (float("nan"), "at least 0")])
def test_a_bad_negative_share_is_refused(share, problem):
    with pytest.raises(ValueError, match=f"view.negative_share .*{problem}"):
        View("around_forgery", negative_share=share)


def test_a_negative_share_needs_the_around_forgery_view():
    with pytest.raises(ValueError, match="only an 'around_forgery' view"):
        View("random_crop", negative_share=0.2)


@PROPERTY
@given(sides, sides, positions, st.sampled_from([(0.7, 1.0), (0.2, 0.5), (1.0, 1.0)]))
def test_random_crop_sides_in_range(height, width, position, side_range):
    view = View("random_crop", side_range=side_range, min_side=1)
    window = one_window(view, height, width, position=position)
    assert_inside(window[None], height, width)
    h, w = window[2] - window[0], window[3] - window[1]
    lo, hi = side_range
    # Sides are rounded to whole pixels and at least one pixel.
    assert max(1, lo * height - 0.5) <= h <= hi * height + 0.5
    assert max(1, lo * width - 0.5) <= w <= hi * width + 0.5


def windows_of_one_image(view, n=4000, side=1000, bbox=(-1, -1, -1, -1),
                         centroid=(-1.0, -1.0)):
    """Windows of n plan positions, all on one side x side image."""
    return crop_windows(view, np.zeros(n, dtype=np.int64), np.arange(n), np.array([side]),
                        np.array([side]), np.array([bbox]), np.array([centroid]), 0, 0)


def assert_spread(values, lo, hi):
    """values (in [lo, hi]) reach both ends and fill the range evenly."""
    assert values.min() < lo + 0.02 * (hi - lo) and values.max() > hi - 0.02 * (hi - lo)
    assert chisquare(np.histogram(values, 10, (lo, hi))[0]).pvalue > P_MIN


def test_random_crop_sides_and_places_are_uniform():
    windows = windows_of_one_image(RECIPES["highres_no_ela"].view)
    for axis in (0, 1):
        sides = windows[:, axis + 2] - windows[:, axis]
        assert_spread(sides, 700, 1000)
        free = 1000 - sides
        assert_spread(windows[free > 50, axis] / free[free > 50], 0, 1)


def test_random_resized_crop_spreads_area_and_ratio():
    view = RECIPES["high_recall"].view
    windows = windows_of_one_image(view)
    h, w = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    area, log_ratio = h * w / 1e6, np.log(w / h)
    assert np.mean((h < 1000) | (w < 1000)) > 0.9  # rarely torchvision's fallback
    assert area.min() < view.scale[0] + 0.01 and area.max() > view.scale[1] - 0.01
    # Below 3/4 of a square image every draw fits whatever its ratio (sides at
    # most sqrt(3/4 * 4/3) = 1 of the image's), so there area and log ratio
    # keep their uniform distributions.
    fits = area < 0.75
    assert_spread(area[fits], view.scale[0], 0.75)
    assert_spread(log_ratio[fits], *np.log(view.ratio))


def test_around_forgery_side_multiplier_is_uniform():
    view = RECIPES["small_specialist"].view
    windows = windows_of_one_image(view, side=3000, bbox=(1000, 1000, 1100, 1080),
                                   centroid=(1050.0, 1040.0))
    sides = windows[:, 2] - windows[:, 0]
    assert sides.min() >= 200 and sides.max() <= 400
    assert_spread(sides, 200, 400)


@PROPERTY
@given(sides, sides, positions, st.sampled_from([(0.6, 1.0), (0.08, 1.0)]),
       st.sampled_from([(3 / 4, 4 / 3), (1.0, 1.0)]))
def test_random_resized_crop_area_and_ratio_in_range(height, width, position, scale, ratio):
    view = View("random_resized_crop", scale=scale, ratio=ratio, min_side=1)
    window = one_window(view, height, width, position=position)
    assert_inside(window[None], height, width)
    h, w = int(window[2] - window[0]), int(window[3] - window[1])
    area = height * width
    # Some real (h', w') within half a pixel of (h, w) meets both ranges...
    area_ok = (h - 0.5) * (w - 0.5) <= scale[1] * area and (h + 0.5) * (w + 0.5) >= scale[0] * area
    ratio_ok = (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0] \
        if h > 0.5 else True
    if area_ok and ratio_ok:
        return
    # ...or this is torchvision's fallback: the central crop, full along one side.
    assert window[0] == (height - h) // 2 and window[1] == (width - w) // 2
    assert h == height or w == width


@pytest.mark.parametrize("member", RECIPES)
def test_whole_and_tiny_images_give_the_whole_image(member):
    view = RECIPES[member].view
    height = np.array([view.min_side - 1, 50, 3000])
    width = np.array([900, view.min_side - 1, 2000])
    bbox = np.array([[2, 2, 10, 10], [-1] * 4, [100, 100, 400, 300]])
    centroid = np.array([[5.0, 5.0], [-1, -1], [250.0, 200.0]])
    for v in (view, WHOLE_IMAGE):
        windows = crop_windows(v, np.arange(3), np.arange(3), height, width, bbox, centroid,
                               0, 0)
        assert windows[:2].tolist() == [[0, 0, height[0], 900], [0, 0, 50, width[1]]]
    windows = crop_windows(WHOLE_IMAGE, np.arange(3), np.arange(3), height, width, bbox,
                           centroid, 0, 0)
    assert windows[2].tolist() == [0, 0, 3000, 2000]


def test_crop_windows_reject_bad_input():
    args = dict(height=np.array([100]), width=np.array([100]), bbox=np.full((1, 4), -1),
                centroid=np.full((1, 2), -1.0), seed=0, epoch=0)
    with pytest.raises(ValueError, match="view: unknown kind 'zoom'"):
        crop_windows(View("zoom"), np.array([0]), np.array([0]), **args)
    with pytest.raises(ValueError, match=r"indices: rows must be in \[0, 1\)"):
        crop_windows(WHOLE_IMAGE, np.array([1]), np.array([0]), **args)
    with pytest.raises(ValueError, match="positions: 2 rows, expected 1"):
        crop_windows(WHOLE_IMAGE, np.array([0]), np.array([0, 1]), **args)
    with pytest.raises(ValueError, match=r"view.side_range: .*<= 1"):
        crop_windows(replace(RECIPES["highres_no_ela"].view, side_range=(0.7, 1.2)),
                     np.array([0]), np.array([0]), **args)
