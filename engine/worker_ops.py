"""The opencv backend: a sample's whole per-sample work on uint8 pixels, with
OpenCV and numpy, inside DALI's reader worker processes.

make_loader places the per-sample operations in one of two ways (`backend`):
  dali    DALI operators crop-and-resize (fn.resize) and apply the colour,
          blur, noise and JPEG operations (engine/photometric.py); torch
          applies flips, turns, affine and coarse dropout to the batch
          (engine/augment.py). The GPU placement; the same graph runs with
          DALI's CPU operators.
  opencv  this module, in the reader workers after the read (and after
          enhanced_aug's copy-paste): crop-and-resize, the photometric
          operations, then the geometric ones and coarse dropout, all on
          uint8. DALI then only gathers the finished crops into the batch,
          which the loader turns into normalised floats in one pass. The
          CPU placement (the default without CUDA).

Why two placements: on a CPU, per-sample work parallelises best in the
worker processes, and OpenCV's resize, flip and rotate there cost a fraction
of DALI's CPU resize and of batch operations in the consumer process; end to
end this backend is several times the dali one on the CPU (the figures and
the commands behind them: docs/performance.md, "Loader"). On a GPU the dali
placement is the fast one.

Parameters are drawn once per sample, in the worker, from the sample's
counter-based seed, for both backends: the photometric values
photometric.draw makes (OpenCV applies here what DALI applies there, and
tests/test_worker_ops.py checks they agree) and the geometry rows
ops.draw_geometry makes (applied here with OpenCV, or to the batch with
torch: the same transform either way). Each op's OpenCV implementation is
its entry in engine/ops.py.

Resize: the covering block the reader returns is resized whole, so the
window snaps outward to the pyramid level's pixel grid, by less than one
output pixel (the dali backend keeps the fractional window; for a random
crop the difference is a sub-pixel shift of the draw, the same for pixels,
ELA and mask; whole-image windows do not snap). Shrinking is a Gaussian
pre-filter then bilinear (_antialiased). Against DALI's antialiased resize
of the same region from full resolution this measured 33-52 dB, against
26-46 dB for plain bilinear (worst at shrinks near 2); torch's antialiased
uint8 resize and INTER_AREA measured as good or better but 2-3x slower.
Masks resize nearest-neighbour at pixel centres, so they stay 0/1.
"""
from __future__ import annotations

import cv2
import numpy as np

from engine import ops, photometric


def _antialiased(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 HW or HWC shrunk to size x size: a Gaussian pre-filter, then
    bilinear. A pixel carries a blur of about half a pixel; shrinking by s
    wants s/2, so the filter adds sigma = sqrt((s/2)^2 - (1/2)^2)."""
    shrink = min(pixels.shape[:2]) / size
    sigma = 0.5 * np.sqrt(shrink * shrink - 1)
    return cv2.resize(cv2.GaussianBlur(pixels, (0, 0), sigma), (size, size),
                      interpolation=cv2.INTER_LINEAR)


def resize_block(block, size: int):
    """(image, mask, ela or None) of a reader WindowBlock at size x size."""
    height, width = block.image.shape[:2]
    if min(height, width) > size:
        def resize(pixels):
            return _antialiased(pixels, size)
    else:   # enlarging: nothing to antialias
        def resize(pixels):
            return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR)
    # NEAREST_EXACT samples at pixel centres, as the bilinear image resize does
    # (INTER_NEAREST is off by half a source pixel)
    mask = cv2.resize(block.mask[..., 0], (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    ela = None if block.ela is None else resize(block.ela[..., 0])
    return resize(block.image), mask, ela


def apply_photometric(image: np.ndarray, plan, values: list) -> np.ndarray:
    """`image` (uint8 HWC RGB) after the slots of `plan` that act, as
    photometric.draw's `values` say."""
    for slot, on, params, extra in photometric.per_slot(plan, values):
        if on:
            image = ops.OPS[slot.name].opencv(image, params, extra)
    return image


def apply_geometric(image, mask, ela, geometry: np.ndarray):
    """(image, mask, ela) after the rows of `geometry` (ops.draw_geometry's)
    that act: geometry moves all three together (pixels bilinear, mask
    nearest), coarse dropout blanks RGB only, in place (the worker's image
    is its own fresh resize)."""
    arrays = [image, mask, ela]
    for op, row in ops.acting_rows(geometry):
        arrays = op.opencv(arrays, row)
    return arrays


def finish(block, size: int, plan, photometric_values: list, geometry: np.ndarray) -> list[np.ndarray]:
    """A read block as the batch wants it: [pixels uint8 (size, size, 3|4) RGB
    (+ ELA), mask uint8 (size, size, 1)]."""
    image, mask, ela = resize_block(block, size)
    image = apply_photometric(image, plan, photometric_values)
    image, mask, ela = apply_geometric(image, mask, ela, geometry)
    pixels = image if ela is None else np.dstack([image, ela])
    return [pixels, mask[..., None]]
