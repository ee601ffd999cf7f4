"""The opencv backend: a sample's whole per-sample work on uint8 pixels, with
OpenCV and numpy, inside DALI's reader worker processes.

make_loader places the per-sample operations in one of two ways (`backend`):
  dali    DALI operators crop-and-resize (fn.resize) and apply the colour,
          blur, noise and JPEG operations (engine/photometric.py); Kornia
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
worker processes, and OpenCV is far cheaper there than the alternatives.
Measured on this 2-core machine, 512 x 512 output from blocks of about
570-700 px, one thread: DALI's CPU fn.resize 5.6 ms a sample for RGB and
2.3 ms for the mask, against 1.0-1.3 ms for the antialiased resize here
and 0.12 ms for OpenCV's nearest-neighbour one; Kornia's batch flips
and quarter turns on float tensors about 2 ms a sample, in the consumer
process, against 0.04-0.14 ms for OpenCV's flip and rotate here. End to
end the loader benchmark measured this backend at about 3x the dali one
on the CPU (2.8-3.4x over two runs, benchmarks/loader_throughput.py). On a GPU the dali placement is
the fast one.

Parameters are drawn in one place each: the photometric values are the ones
photometric.draw makes for the sample (OpenCV applies here what DALI applies
there, and tests/test_worker_ops.py checks they agree); the geometric ones
are drawn here per sample, from the sample's counter-based seed, with the
distributions the Kornia ops use.

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

from engine import photometric

# DALI's colour twist (color_twist and hsv): hue, saturation and value act in
# YIQ space, and contrast pivots on the middle of the uint8 range.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
_YIQ_TO_RGB = np.array([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]])
_HALF_RANGE = 128.0
_UINT8_MAX = 255.0


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


# --- Photometric: the values photometric.draw made, applied with OpenCV -------

def _lookup(image: np.ndarray, scale: float, shift: float) -> np.ndarray:
    table = np.clip(np.rint(np.arange(256) * scale + shift), 0, 255).astype(np.uint8)
    return cv2.LUT(image, table)


def _twist(image: np.ndarray, *, brightness=1.0, contrast=1.0, hue=0.0, saturation=1.0,
           value=1.0) -> np.ndarray:
    angle = np.deg2rad(hue)
    rotate = np.array([[1, 0, 0], [0, np.cos(angle), np.sin(angle)], [0, -np.sin(angle), np.cos(angle)]])
    matrix = (brightness * contrast * value) * (_YIQ_TO_RGB @ rotate @ np.diag([1, saturation, saturation])
                                                @ _RGB_TO_YIQ)
    offset = np.full((3, 1), (_HALF_RANGE - _HALF_RANGE * contrast) * brightness)
    return cv2.transform(image, np.hstack([matrix, offset]))


def _photometric_one(name: str, image: np.ndarray, params, extra) -> np.ndarray:
    if name == "brightness_mul":
        return _lookup(image, float(params[0]), 0.0)
    if name in ("contrast_brightness", "brightness_contrast"):
        return _lookup(image, float(params[0]), float(params[1]) * _UINT8_MAX)
    if name == "color_jitter":
        return _twist(image, brightness=params[0], contrast=params[1], saturation=params[2],
                      hue=params[3])
    if name == "hue_saturation_value":
        return _twist(image, hue=params[0], saturation=params[1], value=params[2])
    if name == "gaussian_blur":
        k = int(params[0])
        return cv2.GaussianBlur(image, (k, k), float(params[1]), borderType=cv2.BORDER_REFLECT_101)
    if name == "gaussian_noise":
        return np.rint(np.clip(image + extra, 0, _UINT8_MAX)).astype(np.uint8)
    if name == "motion_blur":
        return cv2.filter2D(image, -1, extra, borderType=cv2.BORDER_REFLECT_101)
    if name == "jpeg":
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(params[0])])
        return cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    raise ValueError(f"unknown photometric operation {name!r}")


def apply_photometric(image: np.ndarray, plan, values: list) -> np.ndarray:
    """`image` (uint8 HWC RGB) after the slots of `plan` that act, as
    photometric.draw's `values` say."""
    for slot, on, params, extra in photometric.per_slot(plan, values):
        if on:
            image = _photometric_one(slot.name, image, params, extra)
    return image


# --- Geometric operations and coarse dropout, drawn per sample ----------------

def _draw_one(name: str, params: dict, rng: np.random.Generator, size: int):
    if name in ("hflip", "vflip"):
        return ()
    if name == "rot90":
        return (int(rng.integers(params["k"][0], params["k"][1] + 1)),)
    if name == "affine":
        shift = params["shift"] * size
        return (rng.uniform(-params["rotate"], params["rotate"]),
                rng.uniform(1 - params["scale"], 1 + params["scale"]),
                rng.uniform(-shift, shift), rng.uniform(-shift, shift))
    if name == "coarse_dropout":
        count = int(rng.integers(params["holes"][0], params["holes"][1] + 1))
        sides = rng.integers(params["size"][0], params["size"][1] + 1, (count, 2))
        corners = (rng.random((count, 2)) * np.maximum(size - sides + 1, 1)).astype(np.int64)
        return (np.hstack([corners, sides]),)
    raise ValueError(f"unknown batch augmentation {name!r}")


def draw_geometric(entries, rng: np.random.Generator, size: int) -> list[tuple[str, tuple]]:
    """The (name, drawn parameters) of the recipe `entries` that act on one
    sample: each with its p, a one_of's choice uniform among its ops."""
    acting = []
    for name, params in entries:
        if rng.random() >= params.get("p", 1.0):
            continue
        if name == "one_of":
            name, params = params["ops"][int(rng.integers(len(params["ops"])))]
        acting.append((name, _draw_one(name, params, rng, size)))
    return acting


# np.rot90 / torch.rot90's k (counterclockwise quarter turns) as OpenCV codes
_COUNTERCLOCKWISE = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def _affine(angle: float, scale: float, dx: float, dy: float, size: int, arrays: list, interps: list):
    centre = (size - 1) / 2
    matrix = cv2.getRotationMatrix2D((centre, centre), angle, scale)
    matrix[:, 2] += (dx, dy)
    # zeros outside, not reflection: mirrored content would look like an
    # unlabelled copy-move forgery
    return [None if a is None else
            cv2.warpAffine(a, matrix, (size, size), flags=interp,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            for a, interp in zip(arrays, interps)]


def apply_geometric(image, mask, ela, ops: list[tuple[str, tuple]]):
    """(image, mask, ela) after `ops`: geometry moves all three together
    (pixels bilinear, mask nearest), coarse dropout blanks RGB only, in
    place (the worker's image is its own fresh resize)."""
    size = image.shape[0]
    arrays = [image, mask, ela]
    for name, drawn in ops:
        # OpenCV's flip and rotate: 20-60x faster than copying numpy's strided views
        if name == "hflip":
            arrays = [None if a is None else cv2.flip(a, 1) for a in arrays]
        elif name == "vflip":
            arrays = [None if a is None else cv2.flip(a, 0) for a in arrays]
        elif name == "rot90" and drawn[0] % 4:
            arrays = [None if a is None else cv2.rotate(a, _COUNTERCLOCKWISE[drawn[0] % 4])
                      for a in arrays]
        elif name == "affine":
            arrays = _affine(*drawn, size, arrays, [cv2.INTER_LINEAR, cv2.INTER_NEAREST, cv2.INTER_LINEAR])
        elif name == "coarse_dropout":
            for top, left, height, width in drawn[0]:
                arrays[0][top:top + height, left:left + width] = 0
        elif name != "rot90":
            raise ValueError(f"unknown batch augmentation {name!r}")
    return arrays


def finish(block, size: int, plan, photometric_values: list, geometric_ops: list) -> list[np.ndarray]:
    """A read block as the batch wants it: [pixels uint8 (size, size, 3|4) RGB
    (+ ELA), mask uint8 (size, size, 1)]."""
    image, mask, ela = resize_block(block, size)
    image = apply_photometric(image, plan, photometric_values)
    image, mask, ela = apply_geometric(image, mask, ela, geometric_ops)
    pixels = image if ela is None else np.dstack([image, ela])
    return [pixels, mask[..., None]]
