"""The competition's run-length encoding of forged regions.

One instance is a JSON list `[start, length, start, length, ...]` over the
column-major flattening of its mask (`mask.T.flatten()`), starts 1-based,
ascending and non-overlapping. An image's annotation joins its instances with
`;`, or is the word `authentic` when it has none.

The decoder checks what the competition's metric checks (even count, ascending,
non-overlapping) and also that every run lies inside the image, so a malformed
annotation fails here with a message instead of silently scoring.
"""
from __future__ import annotations

import json

import numpy as np

AUTHENTIC = "authentic"
INSTANCE_SEPARATOR = ";"


class RLEError(ValueError):
    """An annotation that is not valid run-length encoding for its image."""


def _column_major(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    return np.asarray(mask).T.ravel().astype(bool)


def encode_instance(mask: np.ndarray) -> str:
    """One instance mask (H, W), non-zero = forged, as `[start, length, ...]`."""
    flat = _column_major(mask)
    # Runs begin where the padded sequence rises and end where it falls.
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2] = starts + 1
    runs[1::2] = ends - starts
    return json.dumps(runs.tolist())


def _parse_runs(text: str) -> np.ndarray:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RLEError(f"not a JSON list: {text[:60]!r} ({exc.msg})") from None
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise RLEError(f"expected a JSON list of integers, got {text[:60]!r}")
    if len(values) % 2:
        raise RLEError(f"odd number of values ({len(values)}): runs are [start, length] pairs")
    return np.asarray(values, dtype=np.int64).reshape(-1, 2)


def decode_instance(text: str, shape: tuple[int, int]) -> np.ndarray:
    """`[start, length, ...]` back to a bool mask of `shape` (H, W)."""
    height, width = shape
    runs = _parse_runs(text)
    starts, lengths = runs[:, 0] - 1, runs[:, 1]
    ends = starts + lengths
    if (lengths < 1).any():
        k = int(np.flatnonzero(lengths < 1)[0])
        raise RLEError(f"run {k} has length {lengths[k]}; lengths must be at least 1")
    if (starts < 0).any() or (ends > height * width).any():
        k = int(np.flatnonzero((starts < 0) | (ends > height * width))[0])
        raise RLEError(f"run {k} (start {starts[k] + 1}, length {lengths[k]}) lies outside "
                       f"the image's {height * width} pixels ({height} x {width})")
    if (np.diff(starts) <= 0).any():
        k = int(np.flatnonzero(np.diff(starts) <= 0)[0])
        raise RLEError(f"starts are not ascending: run {k + 1} starts at {starts[k + 1] + 1} "
                       f"after run {k} at {starts[k] + 1}")
    if (ends[:-1] > starts[1:]).any():
        k = int(np.flatnonzero(ends[:-1] > starts[1:])[0])
        raise RLEError(f"run {k + 1} (start {starts[k + 1] + 1}) overlaps run {k}, "
                       f"which ends at {ends[k]}")
    # Starts are distinct and so are ends (runs are ascending, non-overlapping),
    # so +1 at each start and -1 at each end, summed, is 1 exactly inside runs.
    delta = np.zeros(height * width + 1, dtype=np.int8)
    delta[starts] += 1
    delta[ends] -= 1
    return np.cumsum(delta[:-1], dtype=np.int8).astype(bool).reshape(width, height).T


def encode_annotation(masks: list[np.ndarray]) -> str:
    """Instances (each (H, W), non-empty) as one submission cell."""
    if not masks:
        return AUTHENTIC
    for k, mask in enumerate(masks):
        if not np.any(mask):
            raise ValueError(f"instance {k} has no pixels; leave it out instead")
    return INSTANCE_SEPARATOR.join(encode_instance(mask) for mask in masks)


def decode_annotation(text: str, shape: tuple[int, int]) -> list[np.ndarray]:
    """One submission cell back to its instance masks ([] for `authentic`)."""
    text = text.strip()
    if text == AUTHENTIC:
        return []
    if not text:
        raise RLEError(f"empty annotation; an image without forgery is written {AUTHENTIC!r}")
    masks = []
    for k, part in enumerate(text.split(INSTANCE_SEPARATOR)):
        try:
            masks.append(decode_instance(part, shape))
        except RLEError as exc:
            raise RLEError(f"instance {k}: {exc}") from None
    return masks
