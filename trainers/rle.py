"""The competition's run-length encoding of forged regions.

One instance is a JSON list `[start, length, start, length, ...]` over the
column-major flattening of its mask (`mask.T.flatten()`), starts 1-based,
ascending and non-overlapping. An image's annotation joins its instances with
`;`, or is the word `authentic` when it has none.

The decoder checks what the competition's metric checks (even count, ascending,
non-overlapping) and also that every run lies inside the image, so a malformed
annotation fails here with a message instead of silently scoring. Values are
bounded before they become int64, so no value is too large to be reported.

Besides masks, an instance can be held as its runs: (K, 2) int64 rows
[first, end) of 0-based column-major pixel indices (`mask_runs`,
`decode_runs`). The scorer works on runs, whose size is the text's, never
the image's.
"""
from __future__ import annotations

import json

import numpy as np

AUTHENTIC = "authentic"
SUBMISSION_COLUMNS = ("case_id", "annotation")   # what predict writes and score reads
INSTANCE_SEPARATOR = ";"
# Run ends reach twice the pixel count while runs are checked: within int64.
MAX_INDEXED_PIXELS = 2**62


class RLEError(ValueError):
    """An annotation that is not valid run-length encoding for its image."""


def _column_major(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    return np.asarray(mask).T.ravel().astype(bool)


def mask_runs(mask: np.ndarray) -> np.ndarray:
    """One instance mask (H, W), non-zero = forged, as (K, 2) int64 runs
    [first, end) of 0-based column-major pixel indices."""
    flat = _column_major(mask)
    # Runs begin where the padded sequence rises and end where it falls.
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).astype(np.int8)))
    return edges.astype(np.int64).reshape(-1, 2)


def encode_instance(mask: np.ndarray) -> str:
    """One instance mask (H, W), non-zero = forged, as `[start, length, ...]`."""
    runs = mask_runs(mask)
    return json.dumps(np.column_stack((runs[:, 0] + 1, runs[:, 1] - runs[:, 0])).ravel().tolist())


def _outside(k: int, start: int, length: int, shape: tuple[int, int]) -> RLEError:
    height, width = shape
    return RLEError(f"run {k} (start {start}, length {length}) lies outside the image's "
                    f"{height * width} pixels ({height} x {width})")


def _parse_values(text: str) -> list[int]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RLEError(f"not a JSON list: {text[:60]!r} ({exc.msg})") from None
    except (ValueError, RecursionError) as exc:   # an integer of over 4300 digits, deep nesting
        raise RLEError(f"not a JSON list of integers: {text[:60]!r} ({exc})") from None
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise RLEError(f"expected a JSON list of integers, got {text[:60]!r}")
    if len(values) % 2:
        raise RLEError(f"odd number of values ({len(values)}): runs are [start, length] pairs")
    return values


def decode_runs(text: str, shape: tuple[int, int]) -> np.ndarray:
    """`[start, length, ...]` as checked (K, 2) int64 runs [first, end) of
    0-based column-major pixel indices in an image of `shape` (H, W)."""
    values = _parse_values(text)
    n_pixels = shape[0] * shape[1]
    if n_pixels > MAX_INDEXED_PIXELS:
        raise RLEError(f"an image of {shape[0]} x {shape[1]} pixels is beyond 64-bit pixel indices")
    starts, lengths = values[0::2], values[1::2]
    if lengths and min(lengths) < 1:
        k = next(k for k, n in enumerate(lengths) if n < 1)
        raise RLEError(f"run {k} has length {lengths[k]}; lengths must be at least 1")
    # Checked on Python ints before numpy sees them: a value past 2**63 would
    # not convert, and start + length near it would wrap past the check below.
    if starts and (min(starts) < 1 or max(starts) > n_pixels or max(lengths) > n_pixels):
        k = next(k for k, (s, n) in enumerate(zip(starts, lengths))
                 if not 1 <= s <= n_pixels or n > n_pixels)
        raise _outside(k, starts[k], lengths[k], shape)
    runs = np.asarray(values, dtype=np.int64).reshape(-1, 2)
    first = runs[:, 0] - 1
    end = first + runs[:, 1]
    if (end > n_pixels).any():
        k = int(np.flatnonzero(end > n_pixels)[0])
        raise _outside(k, starts[k], lengths[k], shape)
    if (np.diff(first) <= 0).any():
        k = int(np.flatnonzero(np.diff(first) <= 0)[0])
        raise RLEError(f"starts are not ascending: run {k + 1} starts at {first[k + 1] + 1} "
                       f"after run {k} at {first[k] + 1}")
    if (end[:-1] > first[1:]).any():
        k = int(np.flatnonzero(end[:-1] > first[1:])[0])
        raise RLEError(f"run {k + 1} (start {first[k + 1] + 1}) overlaps run {k}, "
                       f"which ends at {end[k]}")
    return np.column_stack((first, end))


def runs_mask(runs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(K, 2) runs [first, end), ascending and disjoint, as a bool mask (H, W)."""
    height, width = shape
    # Firsts are distinct and so are ends (runs are ascending, disjoint), so
    # +1 at each first and -1 at each end, summed, is 1 exactly inside runs.
    delta = np.zeros(height * width + 1, dtype=np.int8)
    delta[runs[:, 0]] += 1
    delta[runs[:, 1]] -= 1
    return np.cumsum(delta[:-1], dtype=np.int8).astype(bool).reshape(width, height).T


def decode_instance(text: str, shape: tuple[int, int]) -> np.ndarray:
    """`[start, length, ...]` back to a bool mask of `shape` (H, W)."""
    return runs_mask(decode_runs(text, shape), shape)


def encode_annotation(masks: list[np.ndarray]) -> str:
    """Instances (each (H, W), non-empty) as one submission cell."""
    if not masks:
        return AUTHENTIC
    for k, mask in enumerate(masks):
        if not np.any(mask):
            raise ValueError(f"instance {k} has no pixels; leave it out instead")
    return INSTANCE_SEPARATOR.join(encode_instance(mask) for mask in masks)


def decode_annotation_runs(text: str, shape: tuple[int, int]) -> list[np.ndarray]:
    """One submission cell as each instance's (K, 2) runs ([] for `authentic`);
    memory grows with the text, not with the image."""
    text = text.strip()
    if text == AUTHENTIC:
        return []
    if not text:
        raise RLEError(f"empty annotation; an image without forgery is written {AUTHENTIC!r}")
    instances = []
    for k, part in enumerate(text.split(INSTANCE_SEPARATOR)):
        try:
            instances.append(decode_runs(part, shape))
        except RLEError as exc:
            raise RLEError(f"instance {k}: {exc}") from None
    return instances


def decode_annotation(text: str, shape: tuple[int, int]) -> list[np.ndarray]:
    """One submission cell back to its instance masks ([] for `authentic`)."""
    return [runs_mask(runs, shape) for runs in decode_annotation_runs(text, shape)]
