"""Which images each rank sees in an epoch, and which window of each it reads.

Everything here runs once per epoch in Numba kernels, never as a Python loop
over images or draws:

    rule, view = recipe.sampling, recipe.view
    weights = member_weights(rule, meta["label"], meta["area_ratio"], meta["split"],
                             want_split=0, hard_negative=..., hard_fn=...)
    plan = EpochPlan.build(weights, epoch_size(rule, weights), seed, epoch)
    for batch in plan.for_rank(rank, world_size, batch_size, drop_last=True,
                               start_batch=k):
        windows = crop_windows(view, batch.indices, batch.positions,
                               meta["height"], meta["width"], meta["bbox"],
                               meta["centroid"], seed, epoch)

`meta` is engine.store.read_meta(group); mining flags come from
engine.store.read_mining(group, kind)["flag"].

Random numbers are counter-based: every random value is a pure function of
(seed, epoch, global plan position, stream), a splitmix64 hash of a counter
(Steele et al., "Fast splittable pseudorandom number generators", 2014).
It is written here because Numba offers only the stateful global NumPy
generator, whose output depends on the order and thread of the calls; a
counter-based value is the same whatever the thread count, the world size or
the batch a run resumed at. So `sample_indices` draws in parallel and still
returns identical output for identical arguments, and the window of plan
position i is the same on every rank layout. Draws use an alias table over the
images of non-zero weight (Vose's method): one uniform picks a column, a
second (here the fractional part of the same uniform x n) decides between
the column and its alias.

The epoch plan and its policy for the last partial batch:
  * `EpochPlan.build` draws one global plan of `num_samples` image rows; plan
    position p is the p-th draw. Every rank builds the same plan.
  * `for_rank(rank, world_size, batch_size, drop_last, start_batch)` pads the
    plan by wrapping around to a multiple of world_size (as torch's
    DistributedSampler does): padded position p >= n re-reads row
    indices[p % n] but keeps its own position, hence its own window and
    augmentation seed. Positions are therefore unique across ranks, and the
    ranks together cover every position of the plan. Rank r takes positions
    r, r + world_size, ... so every rank gets the same number of samples.
  * drop_last=True (training) drops a rank's last partial batch unless the
    rank would then have no batch at all; drop_last=False keeps it. All ranks
    yield the same number of batches either way.
  * start_batch=k returns the batches from k on: a resumed run sees exactly
    the batches it would have seen had it not stopped.

`sample_seeds(seed, epoch, positions)` gives each planned sample an
independent 63-bit seed for its augmentation, from the same hash.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from engine.recipes import SamplingRule, View

# splitmix64 constants: the golden-ratio increment and the two finaliser
# multipliers of Stafford's "Mix13", as in java.util.SplittableRandom.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_A = np.uint64(0xBF58476D1CE4E5B9)
_MIX_B = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_UNIT = 1.0 / 9007199254740992.0  # 2**-53: 53 random bits -> [0, 1)

# Every sampled thing reads its random numbers from its own domain, so draws,
# windows and augmentation seeds never share a value.
_DOMAIN_DRAW, _DOMAIN_WINDOW, _DOMAIN_AUGMENT = 1, 2, 3
# Stream s of a domain reads counters s * 2**40 + position: consecutive plan
# positions step by the golden gamma, as in splitmix64 itself, and streams do
# not overlap for plans under 2**40 (10^12) positions. The most streams, 40,
# are the random resized crop's (4 per attempt, 10 attempts).
_STREAM_STRIDE = np.uint64(1 << 40)

# Every kernel comes as a serial and a parallel (prange) loop over the same
# inlined per-item functions; `parallel_pays` picks the parallel one only where
# it is faster even when another busy process shares a core with one of its
# threads (docs/performance.md, "Sampling", measured on 2 shared cores):
#   * a parallel loop gives each of its T threads an equal share of the items,
#     so the thread on the shared core finishes last, at twice its share's
#     time: 2/T of the serial time plus the pool's wake-up. With T = 2 that
#     gains nothing (measured: 10M draws over 10M weights slower on two threads
#     than on one in every run), hence PARALLEL_MIN_THREADS = 3.
#   * with T >= 3 it saves at least a third of the serial time, which must
#     exceed the wake-up: waiting for a core where one is busy took up to 12 ms,
#     so the serial run must take over 36 ms. PARALLEL_MIN_ITEMS[kernel] is the
#     power of two of that kernel's cheapest items (a small table's draws)
#     that takes about PARALLEL_MIN_SECONDS on one thread;
#     benchmarks/sampling_throughput.py prints it.
# Below either, Numba's thread pool never starts, and a process that never
# starts it can fork workers safely (GNU OpenMP's pool does not survive fork);
# the loader asks for windows a batch at a time.
PARALLEL_MIN_THREADS = 3
PARALLEL_MIN_SECONDS = 0.05
PARALLEL_MIN_ITEMS = {"draws": 1 << 24, "windows": 1 << 20, "seeds": 1 << 24}

VIEW_KINDS = ("whole", "random_crop", "random_resized_crop", "around_forgery")
_RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params


@njit(cache=True, inline="always")
def _mix64(z):
    z = (z ^ (z >> _S30)) * _MIX_A
    z = (z ^ (z >> _S27)) * _MIX_B
    return z ^ (z >> _S31)


@njit(cache=True)
def _domain_key(seed, epoch, domain):
    """One 64-bit key per (seed, epoch, domain); seed and epoch as uint64."""
    key = _mix64((seed + np.uint64(1)) * _GOLDEN)
    key = _mix64(key + (epoch + np.uint64(1)) * _GOLDEN)
    return _mix64(key + np.uint64(domain) * _GOLDEN)


@njit(cache=True, inline="always")
def _bits(key, position, stream):
    """The splitmix64 output at counter stream * _STREAM_STRIDE + position."""
    counter = np.uint64(stream) * _STREAM_STRIDE + np.uint64(position)
    return _mix64(key + (counter + np.uint64(1)) * _GOLDEN)


@njit(cache=True, inline="always")
def _uniform(key, position, stream):
    return (_bits(key, position, stream) >> _S11) * _UNIT


@njit(cache=True, inline="always")
def _below(u, n):
    """An integer uniform in [0, n) from a uniform u in [0, 1)."""
    return min(int(u * n), n - 1)


@njit(cache=True, inline="always")
def _nearest(x):
    return int(math.floor(x + 0.5))


def parallel_pays(kernel: str, items: int, threads: int | None = None) -> bool:
    """Whether `kernel` ("draws", "windows" or "seeds") runs its parallel loop
    over `items` items with `threads` threads (None: Numba's configured pool
    size, read without starting the pool, as numba.get_num_threads would)."""
    threads = numba.config.NUMBA_NUM_THREADS if threads is None else threads
    return threads >= PARALLEL_MIN_THREADS and items >= PARALLEL_MIN_ITEMS[kernel]


def _run(kernel: str, serial, parallel, items: int, *args) -> None:
    (parallel if parallel_pays(kernel, items) else serial)(*args)


def _output(shape: tuple, dtype) -> np.ndarray:
    """A kernel's output, allocated by NumPy rather than inside the kernel:
    NumPy asks the operating system for huge pages for large arrays, and
    first touching 160 MB of Numba-allocated windows took 4x as long as
    NumPy's (docs/performance.md, "Sampling")."""
    return np.empty(shape, dtype=dtype)


def _key(seed: int, epoch: int, domain: int) -> np.uint64:
    seed = operator.index(seed)
    epoch = operator.index(epoch)
    # np.uint64 again: Numba hands a uint64 back to Python as a plain int.
    return np.uint64(_domain_key(np.uint64(seed % 2**64), np.uint64(epoch % 2**64), domain))


# ---------------------------------------------------------------- weights


@njit(cache=True)
def _weights_kernel(label, area_ratio, split, want_split, area_edges, area_weights,
                    hard_negative, hard_negative_weight, hard_fn, hard_fn_weight):
    n = label.shape[0]
    out = np.zeros(n, dtype=np.float64)
    for i in range(n):
        if split[i] != want_split:
            continue
        if label[i] == 0:
            if hard_negative[i]:
                out[i] = hard_negative_weight
        elif hard_fn[i]:
            out[i] = hard_fn_weight
        elif area_ratio[i] > 0.0:
            out[i] = area_weights[np.searchsorted(area_edges, area_ratio[i], side="right")]
    return out


def _one_d(name: str, array, n: int | None = None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {array.shape}")
    if n is not None and array.shape[0] != n:
        raise ValueError(f"{name}: {array.shape[0]} rows, expected {n}")
    return array


def _mining_flag(name: str, flag, weight: float, mined: bool, n: int) -> np.ndarray:
    """The flag array the kernel reads: all False where the term does not apply."""
    if weight <= 0 or not mined:
        return np.zeros(n, dtype=np.bool_)
    if flag is None:
        raise ValueError(
            f"{name}: this rule weights {name} images ({weight}) but no mining result "
            "was given; mining must run first (trainers/mining.py), or pass mined=False "
            "to ignore the mined terms (validation)"
        )
    return _one_d(name, flag, n).astype(np.bool_)


def member_weights(rule: SamplingRule, label, area_ratio, split, want_split: int,
                   hard_negative=None, hard_fn=None, *, mined: bool = True) -> np.ndarray:
    """Each meta/ row's sampling weight under `rule` (float64, one per row).

    Rows outside `want_split` (0 train, 1 val) get 0. A forged row gets the
    area weight of its bin among `rule.area_edges`, or `rule.hard_fn_weight`
    when flagged in `hard_fn`; a forged row with an empty mask (area ratio 0)
    gets 0: both members that speak of it (highres_no_ela,
    small_specialist) draw only 0 < area. An authentic row gets
    `rule.hard_negative_weight` when flagged in `hard_negative`, else 0.
    `hard_negative`/`hard_fn` are the mining flags over all rows (None: not
    mined). mined=False ignores the mined terms, for the validation split,
    which has no mining results.
    """
    label = _one_d("label", label)
    n = label.shape[0]
    area_ratio = _one_d("area_ratio", area_ratio, n).astype(np.float64)
    split = _one_d("split", split, n)
    if not np.all(np.isfinite(area_ratio)) or np.any(area_ratio < 0) or np.any(area_ratio > 1):
        raise ValueError("area_ratio: values must be finite and within [0, 1]")
    if not np.all((label == 0) | (label == 1)):
        raise ValueError("label: values must be 0 (authentic) or 1 (forged)")
    if want_split not in (0, 1):
        raise ValueError(f"want_split: 0 (train) or 1 (val), got {want_split!r}")
    hard_negative = _mining_flag("hard_negative", hard_negative,
                                 rule.hard_negative_weight, mined, n)
    hard_fn = _mining_flag("hard_fn", hard_fn, rule.hard_fn_weight, mined, n)
    return _weights_kernel(
        label.astype(np.uint8), area_ratio, split.astype(np.int64), int(want_split),
        np.asarray(rule.area_edges, dtype=np.float64),
        np.asarray(rule.area_weights, dtype=np.float64),
        hard_negative, float(rule.hard_negative_weight), hard_fn, float(rule.hard_fn_weight),
    )


def epoch_size(rule: SamplingRule, weights) -> int:
    """Draws per epoch: the rule's multiplier x the images of non-zero weight."""
    return round(rule.epoch_multiplier * int(np.count_nonzero(weights)))


# ---------------------------------------------------------------- draws


@njit(cache=True)
def _alias_kernel(weights, table, scaled, stack):
    """Fills `table` with Vose's alias table over the rows of positive weight
    (see _alias_table); `scaled` and `stack` are scratch, one per column."""
    n = table.shape[0]
    total = 0.0
    for w in weights:
        if w > 0:
            total += w
    prob = table.view(np.float64)
    # Small columns stack up from the front, large ones down from the back.
    n_small = n_large = 0
    factor = n / total
    j = 0
    for row in range(weights.shape[0]):
        if weights[row] > 0:
            scaled[j] = weights[row] * factor
            prob[j, 0] = 1.0
            table[j, 1] = table[j, 2] = row
            if scaled[j] < 1.0:
                stack[n_small] = j
                n_small += 1
            else:
                n_large += 1
                stack[n - n_large] = j
            j += 1
    while n_small > 0 and n_large > 0:
        n_small -= 1
        s = stack[n_small]
        g = stack[n - n_large]
        prob[s, 0] = scaled[s]
        table[s, 2] = table[g, 1]
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        if scaled[g] < 1.0:
            n_large -= 1
            stack[n_small] = g
            n_small += 1
    # What is left has scaled == 1 up to rounding and keeps prob 1, alias self.


def _alias_table(weights: np.ndarray) -> np.ndarray:
    """Vose's alias table over the rows of positive weight, one row per column j:
    (prob[j] as float64 bits, row of column j, row of its alias). One table
    row holds all a draw reads: a draw from a table too large for the cache
    misses it once, not once per array (docs/performance.md, "Sampling")."""
    columns = int(np.count_nonzero(weights))
    table = _output((columns, 3), np.int64)
    _alias_kernel(weights, table, _output((columns,), np.float64),
                  _output((columns,), np.int64))
    return table


@njit(cache=True, inline="always")
def _scaled(key, i, columns):
    # One uniform does both jobs: its integer part (x columns) picks the
    # column, its fraction, still 53 - log2(columns) bits fine, tosses the coin.
    return _uniform(key, i, 0) * columns


@njit(cache=True, inline="always")
def _pick(table, prob, scaled):
    """The row that a scaled uniform draws; prob is table viewed as float64."""
    column = min(int(scaled), table.shape[0] - 1)
    # The coin indexes the table instead of branching: a coin is
    # unpredictable, and the branch made draws twice as slow.
    return table[column, 1 + int(scaled - column >= prob[column, 0])]


# Draws the serial kernel hashes before it looks them up; a block's uniforms
# stay in L1.
_DRAW_BLOCK = 512


@njit(cache=True)
def _draws_serial(table, key, out):
    # Hashing a block first and then looking it up lets LLVM vectorise the hash:
    # in one loop it cannot, not knowing that `out` does not overlap `table`
    # (a parallel loop is compiled with that promise). 1.7x faster
    # (docs/performance.md, "Sampling").
    prob = table.view(np.float64)
    columns = table.shape[0]
    scaled = np.empty(_DRAW_BLOCK, dtype=np.float64)
    for start in range(0, out.shape[0], _DRAW_BLOCK):
        count = min(_DRAW_BLOCK, out.shape[0] - start)
        for j in range(count):
            scaled[j] = _scaled(key, start + j, columns)
        for j in range(count):
            out[start + j] = _pick(table, prob, scaled[j])


@njit(cache=True, parallel=True)
def _draws_parallel(table, key, out):
    prob = table.view(np.float64)
    columns = table.shape[0]
    for i in prange(out.shape[0]):
        out[i] = _pick(table, prob, _scaled(key, i, columns))


def _check_weights(weights) -> np.ndarray:
    weights = np.asarray(weights)
    if weights.ndim != 1:
        raise ValueError(f"weights: expected a 1-D array, got shape {weights.shape}")
    if weights.shape[0] == 0:
        raise ValueError("weights: empty; there is nothing to draw from")
    if weights.dtype.kind not in "biuf":
        raise ValueError(f"weights: expected real numbers, got dtype {weights.dtype}")
    weights = np.asarray(weights, dtype=np.float64)  # no copy of float64 weights
    for problem, bad in (("NaN", np.isnan(weights)), ("infinite", np.isinf(weights)),
                         ("negative", weights < 0)):
        rows = np.flatnonzero(bad)
        if rows.size:
            raise ValueError(f"weights: {problem} at {rows.size} rows "
                             f"(first: row {rows[0]}, {weights[rows[0]]})")
    if not np.any(weights > 0):
        raise ValueError("weights: all zero; the recipe excludes every image of this split")
    return weights


def _check_count(name: str, value) -> int:
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return value


def sample_indices(weights, num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """`num_samples` row indices (int64) drawn with replacement, row i with
    probability weights[i] / sum(weights); rows of weight 0 are never drawn.

    Identical arguments give identical output on any machine and thread count.
    """
    weights = _check_weights(weights)
    num_samples = _check_count("num_samples", num_samples)
    out = _output((num_samples,), np.int64)
    _run("draws", _draws_serial, _draws_parallel, num_samples,
         _alias_table(weights), _key(seed, epoch, _DOMAIN_DRAW), out)
    return out


@njit(cache=True, inline="always")
def _seed(key, position):
    return np.int64(_bits(key, position, 0) >> np.uint64(1))


@njit(cache=True)
def _seeds_serial(positions, key, out):
    for i in range(positions.shape[0]):
        out[i] = _seed(key, positions[i])


@njit(cache=True, parallel=True)
def _seeds_parallel(positions, key, out):
    for i in prange(positions.shape[0]):
        out[i] = _seed(key, positions[i])


def sample_seeds(seed: int, epoch: int, positions) -> np.ndarray:
    """One non-negative int64 seed per plan position, for its augmentation."""
    positions = np.asarray(_one_d("positions", positions), dtype=np.int64)
    out = _output(positions.shape, np.int64)
    _run("seeds", _seeds_serial, _seeds_parallel, positions.shape[0],
         positions, _key(seed, epoch, _DOMAIN_AUGMENT), out)
    return out


# ---------------------------------------------------------------- epoch plan


@dataclass(frozen=True, eq=False)
class Batch:
    positions: np.ndarray  # int64 (b,): global plan positions (seed windows, augmentation)
    indices: np.ndarray    # int64 (b,): rows in meta/


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """The global draws of one (seed, epoch); see the module docstring."""

    indices: np.ndarray  # int64 (num_samples,): row of plan position p
    seed: int
    epoch: int

    @classmethod
    def build(cls, weights, num_samples: int, seed: int, epoch: int) -> "EpochPlan":
        return cls(sample_indices(weights, num_samples, seed, epoch), seed, epoch)

    def __len__(self) -> int:
        return self.indices.shape[0]

    def rank_positions(self, rank: int, world_size: int) -> np.ndarray:
        """Plan positions of one rank, padded by wrap-around (int64)."""
        world_size = operator.index(world_size)
        rank = operator.index(rank)
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
        per_rank = -(-len(self) // world_size)
        return np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)

    def num_batches(self, world_size: int, batch_size: int, drop_last: bool) -> int:
        """Batches every rank yields (the same on all ranks)."""
        batch_size = operator.index(batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        per_rank = len(self.rank_positions(0, world_size))
        full, rest = divmod(per_rank, batch_size)
        return full + int(rest > 0 and (not drop_last or full == 0))

    def for_rank(self, rank: int, world_size: int, batch_size: int, drop_last: bool,
                 start_batch: int = 0) -> list[Batch]:
        """This rank's batches from `start_batch` on."""
        count = self.num_batches(world_size, batch_size, drop_last)
        start_batch = operator.index(start_batch)
        if not 0 <= start_batch <= count:
            raise ValueError(f"start_batch: must be in [0, {count}], got {start_batch}")
        positions = self.rank_positions(rank, world_size)
        rows = self.indices[positions % len(self)] if len(self) else positions
        return [
            Batch(positions[b * batch_size:(b + 1) * batch_size],
                  rows[b * batch_size:(b + 1) * batch_size])
            for b in range(start_batch, count)
        ]


# ---------------------------------------------------------------- windows


@njit(cache=True, inline="always")
def _between(lo, hi, u):
    """U(lo, hi) from a uniform u in [0, 1)."""
    return lo + (hi - lo) * u


@njit(cache=True, inline="always")
def _random_crop(height, width, key, position, side_lo, side_hi):
    h = min(max(_nearest(height * _between(side_lo, side_hi, _uniform(key, position, 0))), 1),
            height)
    w = min(max(_nearest(width * _between(side_lo, side_hi, _uniform(key, position, 1))), 1),
            width)
    y0 = _below(_uniform(key, position, 2), height - h + 1)
    x0 = _below(_uniform(key, position, 3), width - w + 1)
    return y0, x0, y0 + h, x0 + w


@njit(cache=True, inline="always")
def _random_resized_crop(height, width, key, position, scale_lo, scale_hi,
                         log_ratio_lo, log_ratio_hi, ratio_lo, ratio_hi):
    """torchvision.transforms.RandomResizedCrop.get_params, counter-based."""
    area = float(height * width)
    for attempt in range(_RRC_ATTEMPTS):
        stream = 4 * attempt
        target = area * _between(scale_lo, scale_hi, _uniform(key, position, stream))
        aspect = math.exp(_between(log_ratio_lo, log_ratio_hi,
                                   _uniform(key, position, stream + 1)))
        w = _nearest(math.sqrt(target * aspect))
        h = _nearest(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y0 = _below(_uniform(key, position, stream + 2), height - h + 1)
            x0 = _below(_uniform(key, position, stream + 3), width - w + 1)
            return y0, x0, y0 + h, x0 + w
    # torchvision's fallback: the central crop of the image at the nearest
    # allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio_lo:
        w = width
        h = min(max(_nearest(w / ratio_lo), 1), height)
    elif in_ratio > ratio_hi:
        h = height
        w = min(max(_nearest(h * ratio_hi), 1), width)
    else:
        h, w = height, width
    y0 = (height - h) // 2
    x0 = (width - w) // 2
    return y0, x0, y0 + h, x0 + w


@njit(cache=True, inline="always")
def _away_from_box(height, width, box, side, u):
    """The top-left corner of a side x side window that misses the box, drawn
    uniformly (by the uniform u) among all such corners: those of the bands
    above and below the box, and left and right of it in the rows between;
    (-1, -1) when no window of that side misses it."""
    columns = width - side + 1
    above = max(0, box[0] - side + 1)
    below = max(0, height - side - box[2] + 1)
    first_row = max(0, box[0] - side + 1)
    rows = max(0, min(height - side, box[2] - 1) - first_row + 1)
    left = max(0, box[1] - side + 1)
    right = max(0, width - side - box[3] + 1)
    total = (above + below) * columns + rows * (left + right)
    if total == 0:
        return -1, -1
    k = _below(u, total)
    if k < above * columns:
        return k // columns, k % columns
    k -= above * columns
    if k < below * columns:
        return box[2] + k // columns, k % columns
    k -= below * columns
    if k < rows * left:
        return first_row + k // left, k % left
    k -= rows * left
    return first_row + k // right, box[3] + k % right


@njit(cache=True, inline="always")
def _around_forgery(height, width, box, centre_y, centre_x, key, position,
                    mult_lo, mult_hi, min_side, negative_share):
    short = min(height, width)
    if box[0] < 0:
        # An image without a forgery (authentic, e.g. a hard negative): a
        # min_side square anywhere, as the view's smallest window.
        side = min(min_side, short)
        y0 = _below(_uniform(key, position, 1), height - side + 1)
        x0 = _below(_uniform(key, position, 2), width - side + 1)
        return y0, x0, y0 + side, x0 + side
    box_h = box[2] - box[0]
    box_w = box[3] - box[1]
    extent = max(box_h, box_w)
    mult = _between(mult_lo, mult_hi, _uniform(key, position, 0))
    side = min(max(_nearest(extent * mult), min_side), short)
    # A negative window: the same side, so the same scale, where it holds no
    # forged pixel (the box bounds them all). Its own streams (3, 4): the
    # windows around the forgery stay those of a view without negatives.
    if negative_share > 0.0 and _uniform(key, position, 3) < negative_share:
        y0, x0 = _away_from_box(height, width, box, side, _uniform(key, position, 4))
        if y0 >= 0:
            return y0, x0, y0 + side, x0 + side
        # no window of that side misses the forgery: this sample stays around it
    # Centre on the centroid, then shift: first so that the window holds the
    # whole box where its side allows, then to stay inside the image. The two
    # ranges always intersect (the box lies inside the image).
    y0 = _nearest(centre_y - side / 2)
    x0 = _nearest(centre_x - side / 2)
    y_lo, y_hi = 0, height - side
    x_lo, x_hi = 0, width - side
    if side >= box_h:
        y_lo, y_hi = max(y_lo, box[2] - side), min(y_hi, box[0])
    if side >= box_w:
        x_lo, x_hi = max(x_lo, box[3] - side), min(x_hi, box[1])
    y0 = min(max(y0, y_lo), y_hi)
    x0 = min(max(x0, x_lo), x_hi)
    return y0, x0, y0 + side, x0 + side


@njit(cache=True, inline="always")
def _window(kind, params, min_side, row, position, heights, widths, bbox, centroid, key):
    """The window of one planned sample; params as _view_params gives them."""
    side_lo, side_hi, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, ratio_lo, ratio_hi, \
        mult_lo, mult_hi, negative_share = params
    height = np.int64(heights[row])
    width = np.int64(widths[row])
    if kind == 0 or min(height, width) < min_side:
        return 0, 0, height, width
    if kind == 1:
        return _random_crop(height, width, key, position, side_lo, side_hi)
    if kind == 2:
        return _random_resized_crop(height, width, key, position, scale_lo, scale_hi,
                                    log_ratio_lo, log_ratio_hi, ratio_lo, ratio_hi)
    return _around_forgery(height, width, bbox[row], centroid[row, 0], centroid[row, 1],
                           key, position, mult_lo, mult_hi, min_side, negative_share)


@njit(cache=True, inline="always")
def _store(out, i, window):
    # Element by element: `out[i] = window` made the whole kernel 1.5x slower
    # (docs/performance.md, "Sampling").
    y0, x0, y1, x1 = window
    out[i, 0] = y0
    out[i, 1] = x0
    out[i, 2] = y1
    out[i, 3] = x1


@njit(cache=True)
def _windows_serial(kind, params, min_side, indices, positions, heights, widths, bbox,
                    centroid, key, out):
    for i in range(indices.shape[0]):
        _store(out, i, _window(kind, params, min_side, indices[i], positions[i], heights,
                               widths, bbox, centroid, key))


@njit(cache=True, parallel=True)
def _windows_parallel(kind, params, min_side, indices, positions, heights, widths, bbox,
                      centroid, key, out):
    for i in prange(indices.shape[0]):
        _store(out, i, _window(kind, params, min_side, indices[i], positions[i], heights,
                               widths, bbox, centroid, key))


def _view_params(view: View) -> tuple[float, ...]:
    return tuple(float(v) for v in (
        *view.side_range, *view.scale, math.log(view.ratio[0]), math.log(view.ratio[1]),
        *view.ratio, *view.side_mult, view.negative_share))


def _check_view(view: View) -> int:
    if view.kind not in VIEW_KINDS:
        raise ValueError(f"view: unknown kind {view.kind!r}; known: {VIEW_KINDS}")
    ranges = {"side_range": view.side_range, "scale": view.scale, "ratio": view.ratio,
              "side_mult": view.side_mult}
    for name, (lo, hi) in ranges.items():
        if not 0 < lo <= hi:
            raise ValueError(f"view.{name}: need 0 < low <= high, got {(lo, hi)}")
    if view.side_range[1] > 1:
        raise ValueError(f"view.side_range: sides are fractions <= 1, got {view.side_range}")
    if view.min_side < 1:
        raise ValueError(f"view.min_side: must be >= 1, got {view.min_side}")
    return VIEW_KINDS.index(view.kind)


def crop_windows(view: View, indices, positions, height, width, bbox, centroid,
                 seed: int, epoch: int) -> np.ndarray:
    """The window (y0, x0, y1, x1), half-open, int32 (n, 4), of each planned
    sample: row indices[i] of meta/ at plan position positions[i].

    Windows lie inside the image and are non-empty. An image whose short side
    is below view.min_side is taken whole whatever the view (a crop of it
    would be smaller than the smallest window the recipe reads). For
    "around_forgery", an image without a forgery box (bbox -1: authentic)
    gets a min_side square at a random place, and with view.negative_share a
    sample's coin (its own stream) may place its window, same side, where it
    misses the box, uniformly among such places (none: around the forgery
    after all). height, width, bbox and
    centroid are the meta/ arrays of engine.store.read_meta.
    """
    kind = _check_view(view)
    # np.asarray, not astype: no copy of plan-sized arrays that are int64 already.
    indices = np.asarray(_one_d("indices", indices), dtype=np.int64)
    positions = np.asarray(_one_d("positions", positions, indices.shape[0]), dtype=np.int64)
    # One dtype per argument, so that the kernels compile (and cache) once.
    height = np.asarray(_one_d("height", height), dtype=np.int64)
    n_rows = height.shape[0]
    width = np.asarray(_one_d("width", width, n_rows), dtype=np.int64)
    bbox = np.asarray(bbox, dtype=np.int64)
    centroid = np.asarray(centroid, dtype=np.float64)
    if bbox.shape != (n_rows, 4):
        raise ValueError(f"bbox: expected shape ({n_rows}, 4), got {bbox.shape}")
    if centroid.shape != (n_rows, 2):
        raise ValueError(f"centroid: expected shape ({n_rows}, 2), got {centroid.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_rows):
        raise ValueError(f"indices: rows must be in [0, {n_rows}), got "
                         f"{indices.min()}..{indices.max()}")
    if np.any(height < 1) or np.any(width < 1):
        raise ValueError("height/width: every image needs at least 1 pixel a side")
    out = _output((indices.shape[0], 4), np.int32)
    _run("windows", _windows_serial, _windows_parallel, indices.shape[0],
         kind, _view_params(view), int(view.min_side), indices, positions, height, width,
         bbox, centroid, _key(seed, epoch, _DOMAIN_WINDOW), out)
    return out
