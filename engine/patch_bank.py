"""enhanced_aug's copy-paste patch bank: forged regions cut from the store.

One patch per forged instance (instances/* of engine/store.py) of the given
rows whose bbox has BOTH sides >= min_side (a thin sliver 300 x 3 px would
pass a "longest side" rule yet paste as an almost invisible line), at most
max_patches of them chosen with the seed. A patch is the instance's bbox grown
by `padding` px on each side and clipped to the image: its RGB pixels (level
0) and that instance's own mask over the same window. The bank lives in
memory (a few hundred small patches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zarr
from tqdm import tqdm

from engine.store import image_path, instances_mask_path


@dataclass(frozen=True)
class Patch:
    rgb: np.ndarray       # uint8 h x w x 3
    mask: np.ndarray      # uint8 h x w, 0/1: the instance's pixels
    row: int              # image row in meta/
    instance: int         # index into instances/*


def eligible_instances(image_row: np.ndarray, bbox: np.ndarray, rows: Sequence[int],
                       min_side: int) -> np.ndarray:
    """Indices into instances/* of the instances of `rows` whose bbox has both
    sides >= min_side, ascending."""
    side = np.minimum(bbox[:, 2] - bbox[:, 0], bbox[:, 3] - bbox[:, 1])
    return np.flatnonzero(np.isin(image_row, np.asarray(rows)) & (side >= min_side))


def choose(candidates: np.ndarray, max_patches: int, seed: int) -> np.ndarray:
    """At most max_patches of candidates, drawn without replacement, ascending."""
    if len(candidates) <= max_patches:
        return candidates
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=max_patches, replace=False))


def padded_window(bbox: np.ndarray, padding: int, height: int, width: int) -> tuple[int, int, int, int]:
    """bbox (y0, x0, y1, x1, half-open) grown by padding, clipped to the image."""
    y0, x0, y1, x1 = (int(v) for v in bbox)
    return (max(0, y0 - padding), max(0, x0 - padding),
            min(height, y1 + padding), min(width, x1 + padding))


class PatchBank:
    """Forged regions to paste, indexable: bank[i] is a Patch."""

    def __init__(self, patches: Sequence[Patch]) -> None:
        if not patches:
            raise ValueError("a patch bank needs at least one patch")
        self.patches = tuple(patches)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> Patch:
        return self.patches[index]

    @classmethod
    def from_store(cls, group: zarr.Group, meta: dict[str, np.ndarray], rows: Sequence[int], *,
                   min_side: int, max_patches: int, padding: int, seed: int) -> "PatchBank":
        """Patches of the instances of `rows` (the training split's rows)."""
        image_row = np.asarray(group["instances/image_row"][...])
        bbox = np.asarray(group["instances/bbox"][...])
        chosen = choose(eligible_instances(image_row, bbox, rows, min_side), max_patches, seed)
        if len(chosen) == 0:
            raise ValueError(
                f"{group.store}: no forged instance of the {len(rows)} given rows has a bbox "
                f"with both sides >= {min_side} px; the copy-paste patch bank would be empty")
        patches = [_read_patch(group, meta, int(i), int(image_row[i]), bbox[i], padding)
                   for i in tqdm(chosen, desc="patch bank", unit="patch", leave=False)]
        return cls(patches)


def _read_patch(group: zarr.Group, meta: dict[str, np.ndarray], instance: int, row: int,
                bbox: np.ndarray, padding: int) -> Patch:
    y0, x0, y1, x1 = padded_window(bbox, padding, int(meta["height"][row]), int(meta["width"][row]))
    layer = instance - int(meta["instance_start"][row])
    rgb = np.asarray(group[image_path(row, 0)][y0:y1, x0:x1])
    mask = np.asarray(group[instances_mask_path(row)][layer, y0:y1, x0:x1])
    return Patch(rgb=rgb, mask=mask, row=row, instance=instance)
