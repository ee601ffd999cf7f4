"""enhanced_aug's copy-paste patch bank: forged regions cut from the store.

One patch per forged instance (instances/* of engine/store.py) of the given
rows whose bbox has BOTH sides >= min_side (a thin sliver 300 x 3 px would
pass a "longest side" rule yet paste as an almost invisible line), at most
max_patches of them chosen with the seed. A patch is the instance's bbox grown
by `padding` px on each side and clipped to the image: its RGB pixels (level
0) and that instance's own mask over the same window. The bank lives in
memory (a few hundred small patches).

`PatchBank.paste` runs in the DALI reader worker (engine/pipeline.py), on the
block just read from the store, before the crop-resize and before the
photometric operations, as enhanced_aug's recipe orders it (copy-paste, then
the random resized crop). The block may come from a coarser
pyramid level, so a patch is resized by U(scale) x pixel_scale: it keeps its
original pixel scale relative to the image. Only the instance's pixels are
pasted (the padding gives the resize real neighbours at the region's edge),
so every pasted pixel is forged and the block's mask becomes the union.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import zarr
from tqdm import tqdm

from engine.reader import WindowReader
from engine.store import image_path, instances_mask_path, read_table


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

    def paste(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *,
              p: float, scale: Sequence[float], pixel_scale: float) -> tuple[np.ndarray, np.ndarray]:
        """New (image, mask): with probability p a random patch, resized by
        U(scale) x pixel_scale (shrunk further to fit), pasted at a uniformly
        random place inside the block; else copies of the inputs.

        image: uint8 h x w x 3; mask: uint8 h x w x 1, 0/1; pixel_scale: block
        pixels per original pixel. A pure function of the inputs and rng's state.
        """
        _check_block(image, mask)
        image, mask = image.copy(), mask.copy()
        if rng.random() >= p:
            return image, mask
        patch = self.patches[int(rng.integers(len(self.patches)))]
        rgb, region = resized_patch(patch, float(rng.uniform(*scale)) * pixel_scale, image.shape[:2])
        height, width = region.shape
        y = int(rng.integers(image.shape[0] - height + 1))
        x = int(rng.integers(image.shape[1] - width + 1))
        np.copyto(image[y:y + height, x:x + width], rgb, where=region[..., None])
        mask[y:y + height, x:x + width, 0] |= region
        return image, mask

    @classmethod
    def from_store(cls, group: zarr.Group, meta: dict[str, np.ndarray], rows: Sequence[int], *,
                   min_side: int, max_patches: int, padding: int, seed: int) -> "PatchBank":
        """Patches of the instances of `rows` (the training split's rows)."""
        image_row = read_table(group, "instances/image_row")
        bbox = read_table(group, "instances/bbox")
        chosen = choose(eligible_instances(image_row, bbox, rows, min_side), max_patches, seed)
        if len(chosen) == 0:
            raise ValueError(
                f"{group.store}: no forged instance of the {len(rows)} given rows has a bbox "
                f"with both sides >= {min_side} px; the copy-paste patch bank would be empty")
        reader = WindowReader(group)   # verified reads: a damaged chunk is refused, not zeros
        patches = [_read_patch(reader, meta, int(i), int(image_row[i]), bbox[i], padding)
                   for i in tqdm(chosen, desc="patch bank", unit="patch", leave=False)]
        return cls(patches)


def resized_patch(patch: Patch, factor: float, fit: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The patch resized by `factor`, shrunk further to fit inside `fit`
    (height, width): RGB uint8 h x w x 3 and its region bool h x w."""
    height, width = patch.mask.shape
    factor = min(factor, fit[0] / height, fit[1] / width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))   # OpenCV: (w, h)
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    rgb = cv2.resize(patch.rgb, size, interpolation=interpolation)
    region = cv2.resize(patch.mask, size, interpolation=cv2.INTER_NEAREST) > 0
    return rgb, region


def _check_block(image: np.ndarray, mask: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"copy-paste: the block's image must be uint8 h x w x 3, "
                         f"got {image.dtype} {image.shape}")
    if mask.dtype != np.uint8 or mask.shape != (*image.shape[:2], 1):
        raise ValueError(f"copy-paste: the block's mask must be uint8 {(*image.shape[:2], 1)} "
                         f"to match the image, got {mask.dtype} {mask.shape}")


def _read_patch(reader: WindowReader, meta: dict[str, np.ndarray], instance: int, row: int,
                bbox: np.ndarray, padding: int) -> Patch:
    y0, x0, y1, x1 = padded_window(bbox, padding, int(meta["height"][row]), int(meta["width"][row]))
    layer = instance - int(meta["instance_start"][row])
    rgb = reader.read_box(image_path(row, 0), (y0, x0, 0), (y1, x1, 3))
    mask = reader.read_box(instances_mask_path(row), (layer, y0, x0), (layer + 1, y1, x1))[0]
    return Patch(rgb=rgb, mask=mask, row=row, instance=instance)
