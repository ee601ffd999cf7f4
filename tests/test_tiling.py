"""The specialist's tiled view (trainers/tiling.py, trainers/ensemble.py):
tiles at the scale of its crop rule cover every pixel, an image no larger
than one tile gets what the whole view gives, the same input gives the same
map, and a large figure costs a bounded number of forward passes."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from engine.recipes import get_recipe
from trainers.ensemble import Ensemble, Member, to_original_size
from trainers.tiling import (TILE_OVERLAP, TILES_PER_FORWARD, TileGrid, tile_origins, tile_side,
                             tiled_probabilities)

SPECIALIST = get_recipe("small_specialist")
SHAPES = [(100, 120), (128, 128), (129, 700), (300, 300), (603, 611), (1000, 1000),
          (2000, 1500), (4000, 4000), (4000, 1000), (6000, 400)]


def coverage(grid: TileGrid) -> np.ndarray:
    seen = np.zeros((grid.height, grid.width), np.int32)
    for y0, x0, y1, x1 in grid.windows():
        assert 0 <= y0 < y1 <= grid.height and 0 <= x0 < x1 <= grid.width
        seen[y0:y1, x0:x1] += 1
    return seen


@pytest.mark.parametrize("shape", SHAPES)
def test_tiles_cover_every_pixel_and_overlap_their_neighbours(shape):
    grid = TileGrid.for_image(SPECIALIST, *shape)
    assert coverage(grid).min() >= 1
    for starts, side in ((grid.ys, grid.tile_height), (grid.xs, grid.tile_width)):
        assert starts[0] == 0 and starts[-1] + side == (grid.height if starts is grid.ys
                                                         else grid.width)
        assert np.all(np.diff(starts) <= side * (1 - TILE_OVERLAP) + 1)


@pytest.mark.parametrize("length, side", [(10, 10), (11, 10), (1000, 128), (4000, 849)])
def test_tile_origins_reach_both_ends(length, side):
    starts = tile_origins(length, side)
    assert starts[0] == 0 and starts[-1] == length - side
    assert np.all(np.diff(starts) > 0)


def test_tile_side_follows_the_crop_rule():
    view = SPECIALIST.view
    # 3 (mean side multiplier) x the box side of a forgery of 0.5 % of the image
    assert tile_side(SPECIALIST, 2000, 2000) == round(3 * np.sqrt(0.005) * 2000) == 424
    assert tile_side(SPECIALIST, 4000, 4000) == 849
    assert tile_side(SPECIALIST, 300, 300) == view.min_side         # the rule's floor
    assert tile_side(SPECIALIST, 10000, 400) == 400                 # at most the short side
    assert tile_side(SPECIALIST, 100, 120) == 100                   # below min_side: whole
    whole = TileGrid.for_image(SPECIALIST, 100, 120)
    assert (len(whole), whole.tile_height, whole.tile_width) == (1, 100, 120)
    with pytest.raises(ValueError, match="around_forgery"):
        tile_side(get_recipe("highres_no_ela"), 1000, 1000)


@pytest.mark.parametrize("size", [604, 1000, 2000, 4000, 8000])
def test_a_square_figure_of_any_size_takes_the_same_tiles(size):
    grid = TileGrid.for_image(SPECIALIST, size, size)
    assert len(grid) == 36
    assert -(-len(grid) // TILES_PER_FORWARD) == 3                   # forward passes


def test_blending_puts_every_tile_back_where_it_came_from():
    # A forward pass answering each tile's own pixels: the blend must give
    # back the image itself, every pixel, through overlaps and edges.
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (700, 450, 3), dtype=np.uint8),
              rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)]
    grids = [TileGrid.for_image(SPECIALIST, *image.shape[:2]) for image in images]
    calls = []

    def own_pixels(tiles, elas):
        calls.append(len(tiles))
        assert elas is None
        return [tile[..., 0].astype(np.float32) / 255 for tile in tiles]

    maps = tiled_probabilities(images, None, grids, own_pixels, tiles_per_forward=7)
    for image, prob in zip(images, maps):
        assert prob.shape == image.shape[:2] and prob.dtype == np.float32
        np.testing.assert_allclose(prob, image[..., 0] / 255, atol=1e-6)
    assert sum(calls) == sum(len(g) for g in grids) and max(calls) == 7


def specialist(img_size=32, seed=0):
    """The specialist's recipe at a small input size, a 3 x 3 convolution as its model."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Conv2d(3, 1, 3, padding=1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=generator))
    return Member("small_specialist", model, replace(SPECIALIST, img_size=img_size))


def averaged(seed=1):
    generator = torch.Generator().manual_seed(seed)
    model = nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=generator))
    return Member("highres_no_ela", model, replace(get_recipe("highres_no_ela"), img_size=32))


@pytest.mark.parametrize("shape", [(100, 120), (128, 128)])
def test_an_image_no_larger_than_one_tile_gets_the_whole_view(shape):
    image = np.random.default_rng(2).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ensemble = Ensemble([averaged(), specialist()])
    whole = ensemble.probabilities([image], None, specialist_view="whole")
    tiled = ensemble.probabilities([image], None, specialist_view="tiled")
    assert set(tiled.tiled) == {"small_specialist"} and set(tiled.whole) == {"highres_no_ela"}
    expected = to_original_size(whole.whole["small_specialist"][0, 0].numpy(), shape)
    np.testing.assert_allclose(tiled.tiled["small_specialist"][0], expected, atol=1e-6)
    alone = ("small_specialist",)
    np.testing.assert_allclose(ensemble.combine(tiled, alone)[0],
                               ensemble.combine(whole, alone)[0], atol=1e-6)
    torch.testing.assert_close(tiled.whole["highres_no_ela"], whole.whole["highres_no_ela"])


def test_the_tiled_view_is_deterministic_and_differs_from_the_whole_view():
    image = np.random.default_rng(3).integers(0, 256, (300, 520, 3), dtype=np.uint8)
    ensemble = Ensemble([averaged(), specialist()])
    first = ensemble.probabilities([image, image[:200]], None)          # tiled by default
    again = ensemble.probabilities([image, image[:200]], None, specialist_view="tiled")
    for a, b in zip(first.tiled["small_specialist"], again.tiled["small_specialist"]):
        assert np.array_equal(a, b)
    finals = ensemble.combine(first)
    assert [f.shape for f in finals] == [(300, 520), (200, 520)]
    assert all(np.array_equal(a, b) for a, b in zip(finals, ensemble.combine(again)))
    whole = ensemble.combine(ensemble.probabilities([image], None, specialist_view="whole"),
                             ("small_specialist",))[0]
    assert np.abs(whole - ensemble.combine(first, ("small_specialist",))[0]).max() > 1e-3
    assert set(first.seconds) == {"highres_no_ela", "small_specialist"}


def test_the_union_with_a_tiled_specialist_is_max_of_average_and_scaled_specialist():
    image = np.random.default_rng(4).integers(0, 256, (260, 300, 3), dtype=np.uint8)
    ensemble = Ensemble([averaged(), specialist()])
    probs = ensemble.probabilities([image], None)
    average = to_original_size(probs.whole["highres_no_ela"][0, 0].numpy(), (260, 300))
    expected = np.maximum(average, SPECIALIST.ensemble_weight * probs.tiled["small_specialist"][0])
    np.testing.assert_allclose(ensemble.combine(probs)[0], expected, atol=1e-6)
    np.testing.assert_allclose(ensemble.combine(probs, ("highres_no_ela",))[0], average, atol=1e-6)


def test_a_4000_px_figure_costs_three_forward_passes_of_the_specialist():
    member = specialist(img_size=32)
    batches = []
    member.model.register_forward_hook(lambda module, x, out: batches.append(x[0].shape[0]))
    image = np.zeros((4000, 4000, 3), np.uint8)
    Ensemble([member]).probabilities([image], None)
    assert batches == [16, 16, 4]


def test_an_unknown_view_is_refused():
    with pytest.raises(ValueError, match="specialist view 'halves'"):
        Ensemble([specialist()]).probabilities([np.zeros((8, 8, 3), np.uint8)], None,
                                               specialist_view="halves")
