"""The specialist's tiled view: overlapping tiles of the full-resolution
image at the scale it trained at, forwarded in batches, blended back into one
probability map (docs/recipes.md, "Ensemble").

    grid = TileGrid.for_image(recipe, height, width)
    maps = tiled_probabilities(images, elas, grids, forward)

The specialist trains on windows around a forgery (its recipe's
"around_forgery" view) resized to its input size; seen whole, a tiny forgery
of a large figure shrinks five to ten times below anything it trained on.
`tile_side` says which window side matches training (the why is there);
tiles overlap by TILE_OVERLAP of their side and every pixel is covered. The
forward pass is the caller's (trainers/ensemble.py: resize to the member's
input size, the model, the probabilities back at the tile's size), given
TILES_PER_FORWARD tiles at a time from all the images of a batch; the
blend weighs each tile's probabilities by a feathered window (1 in the
middle, falling linearly across the overlap, never 0) and divides by the
weights' sum, so overlaps meet without seams and a pixel seen by one tile
keeps that tile's value.

Kept free of torch: the command lines declare --specialist-view from here
before any model loads.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.recipes import Recipe

SPECIALIST_VIEWS = ("tiled", "whole")
DEFAULT_SPECIALIST_VIEW = "tiled"
# Neighbouring tiles share a quarter of their side: the blend's ramp, and at
# most (1 / 0.75)^2 = 1.8 x the forward passes of tiles without overlap.
TILE_OVERLAP = 0.25
# Tiles per forward pass: a square figure takes at most 6 x 6 tiles
# (tile_side), so at most 3 passes whatever its size; 16 inputs of 512 px fit
# a GPU's memory at inference with room to spare.
TILES_PER_FORWARD = 16


def add_specialist_view_argument(parser: argparse.ArgumentParser) -> None:
    """--specialist-view, declared once for predict.py, evaluate.py and run_ensemble.py."""
    parser.add_argument("--specialist-view", choices=SPECIALIST_VIEWS,
                        default=DEFAULT_SPECIALIST_VIEW,
                        help="how the small-forgery specialist sees an image: tiled, on "
                             "overlapping tiles of the full-resolution image at the scale it "
                             "trained at; whole, the whole image resized to its input size as "
                             "the other members see it")


def target_area_ratio(recipe: Recipe) -> float:
    """The upper edge of the area bin the recipe's sampling weighs most (the
    forgeries it is trained for; small_specialist: 0.005, the tiny class)."""
    edges = (*recipe.sampling.area_edges, 1.0)
    return float(edges[int(np.argmax(recipe.sampling.area_weights))])


def tile_side(recipe: Recipe, height: int, width: int) -> int:
    """The side, in the image's own pixels, of the square tiles of a member
    trained on "around_forgery" windows, on a height x width image.

    Why this side: the crop rule trains on squares of side max(bbox height,
    bbox width) x U(side_mult), at least min_side and at most the image's
    short side, each resized to img_size. The forgeries the recipe draws
    most are those below target_area_ratio r of the image (small_specialist:
    r = 0.005, weight 5); one at that edge has a box side of about
    sqrt(r x H x W), so training showed it in windows of mean(side_mult) x
    that side: a tile of that side shows it filling the share of the input it
    filled in training (a third of the side), and smaller ones smaller, as the
    min_side floor did in training. The resize factor of a tile is
    img_size / side: 1.2 on a 2000 px square figure, 0.6 on a 4000 px one
    (small_specialist), the factors its training windows of those figures
    had. The size classes are area ratios, so the side grows with the figure
    and the tile count does not: with mean(side_mult) = 3 a square figure
    takes 6 x 6 tiles at any size from 604 px (below, the min_side floor
    gives fewer). An image whose short side is below min_side is one tile,
    whole (TileGrid.for_image), as crop_windows takes it whole in training;
    the side returned is then its short side.
    """
    view = recipe.view
    if view.kind != "around_forgery":
        raise ValueError(f"{recipe.name}: tiles follow an 'around_forgery' view's crop rule; "
                         f"this recipe's view is {view.kind!r}")
    short = min(height, width)
    if short < view.min_side:
        return short
    side = sum(view.side_mult) / 2 * math.sqrt(target_area_ratio(recipe) * height * width)
    return min(max(round(side), view.min_side), short)


def tile_origins(length: int, side: int, overlap: float = TILE_OVERLAP) -> np.ndarray:
    """Starts (int64) of tiles of `side` along an axis of `length`, evenly
    spread from 0 to length - side, neighbours sharing at least
    overlap x side pixels: together they cover the axis."""
    if not 0 < side <= length:
        raise ValueError(f"tile side {side}: must be in [1, {length}]")
    stride = max(1.0, side * (1 - overlap))
    count = math.ceil((length - side) / stride) + 1
    return np.round(np.linspace(0, length - side, count)).astype(np.int64)


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one image: every (y, x) of `ys` x `xs` starts a
    tile_height x tile_width tile."""

    height: int
    width: int
    tile_height: int
    tile_width: int
    ys: np.ndarray
    xs: np.ndarray

    @classmethod
    def for_image(cls, recipe: Recipe, height: int, width: int) -> TileGrid:
        side = tile_side(recipe, height, width)
        if min(height, width) < recipe.view.min_side:   # one tile, the image whole, as in training
            return cls(height, width, height, width, np.zeros(1, np.int64), np.zeros(1, np.int64))
        return cls(height, width, side, side, tile_origins(height, side), tile_origins(width, side))

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def windows(self) -> list[tuple[int, int, int, int]]:
        """(y0, x0, y1, x1) of every tile, row by row."""
        return [(int(y), int(x), int(y) + self.tile_height, int(x) + self.tile_width)
                for y in self.ys for x in self.xs]

    def weights(self) -> np.ndarray:
        """(tile_height, tile_width) float32 blend weights: 1 inside, falling
        linearly over the overlap to the tile's edge, never 0."""
        return np.outer(_ramp(self.tile_height), _ramp(self.tile_width)).astype(np.float32)


def _ramp(side: int) -> np.ndarray:
    width = max(1, round(side * TILE_OVERLAP))
    distance = np.minimum(np.arange(side), np.arange(side)[::-1]) + 1
    return np.minimum(1.0, distance / (width + 1))


# A forward pass: tiles of RGB (and ELA, or None) in; each tile's
# probabilities, float32 at the tile's own (height, width), out.
Forward = Callable[[list[np.ndarray], list[np.ndarray] | None], Sequence[np.ndarray]]


def tiled_probabilities(images: list[np.ndarray], elas: list[np.ndarray] | None,
                        grids: list[TileGrid], forward: Forward,
                        tiles_per_forward: int = TILES_PER_FORWARD) -> list[np.ndarray]:
    """One (H, W) float32 probability map per image, blended from its grid's
    tiles; the tiles of all images go through `forward` tiles_per_forward
    at a time, in a fixed order (image, then row, then column)."""
    tiles = [(k, window) for k, grid in enumerate(grids) for window in grid.windows()]
    sums = [np.zeros((g.height, g.width), np.float32) for g in grids]
    totals = [np.zeros((g.height, g.width), np.float32) for g in grids]
    weights = [g.weights() for g in grids]
    for start in range(0, len(tiles), tiles_per_forward):
        chunk = tiles[start:start + tiles_per_forward]
        rgb = [images[k][y0:y1, x0:x1] for k, (y0, x0, y1, x1) in chunk]
        ela = None if elas is None else [elas[k][y0:y1, x0:x1] for k, (y0, x0, y1, x1) in chunk]
        for (k, (y0, x0, y1, x1)), prob in zip(chunk, forward(rgb, ela)):
            sums[k][y0:y1, x0:x1] += prob * weights[k]
            totals[k][y0:y1, x0:x1] += weights[k]
    return [total_sum / weight for total_sum, weight in zip(sums, totals)]
