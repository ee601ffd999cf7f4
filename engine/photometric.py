"""Photometric augmentation as DALI operators, on the CPU or the GPU.

A recipe's colour, blur, noise and JPEG operations (engine/recipes.py) run
inside the DALI pipeline, right after the crop-and-resize, on the RGB
channels only (ELA and the mask never pass through here). Their parameters
are drawn per sample in the reader worker, from the sample's counter-based
seed (engine.sampling.sample_seeds), and handed to the operators as
per-sample inputs: drawn in one place, applied in another, and identical for
a resumed epoch. Kornia keeps the geometric operations (engine/augment.py).
This is the dali backend's placement; the opencv backend applies the same
drawn values with OpenCV in the reader workers (engine/worker_ops.py).

Why DALI and not Kornia for these: measured on this 2-core machine, batch 8
at 512 x 512, Kornia's CPU implementations cost 10-30x DALI's (JPEG 450 vs
15 ms a sample, HSV 245 vs 23, contrast 58 vs 2.3, blur 120 vs 27, under
the same load); on a GPU both are fast, and DALI runs the same operators
there. Photometric operations act on each pixel (blur, JPEG: on a small
neighbourhood), so running them before the geometric ones changes nothing
but the alignment of JPEG's 8 x 8 block grid.

Units follow the reference pipeline (albumentations): hue_saturation_value's
integer hue limit is in OpenCV units (180 per turn); an integer saturation
or value limit L is an additive change of up to L/255 of the range, applied
by DALI's hsv operator as the factor 1 +- L/255 (DALI scales saturation and
value; it does not shift them); a tuple is a factor range. color_jitter
follows torchvision (factors 1 +- x, hue in turns). contrast_brightness is
x * contrast + brightness (0-255 units), brightness_contrast is
albumentations' x * (1 + c) + 255 b. gaussian_blur draws an odd kernel size
and uses OpenCV's sigma for it. motion_blur convolves with a line of the
kernel's length at a uniformly random angle.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from nvidia.dali import fn, types
import nvidia.dali.math as dmath

PHOTOMETRIC = ("brightness_mul", "contrast_brightness", "brightness_contrast", "color_jitter",
               "hue_saturation_value", "gaussian_blur", "gaussian_noise", "motion_blur", "jpeg")
_UINT8_MAX = 255.0
_OPENCV_HUE_DEGREES = 2.0   # OpenCV's 8-bit hue: 180 units per 360 degrees
# Parameters each operation hands to DALI per sample (a float32 vector).
_PARAM_COUNT = {"brightness_mul": 1, "contrast_brightness": 2, "brightness_contrast": 2,
                "color_jitter": 4, "hue_saturation_value": 3, "gaussian_blur": 2,
                "gaussian_noise": 0, "motion_blur": 0, "jpeg": 1}


@dataclass(frozen=True)
class Slot:
    """One photometric operation of a recipe. The operations of a one_of
    share `group`: at most one of them acts on a sample."""

    name: str
    params: dict
    group: int
    p: float
    choices: int
    choice: int


def is_photometric(entry) -> bool:
    name, params = entry
    if name == "one_of":
        kinds = {op in PHOTOMETRIC for op, _ in params["ops"]}
        if len(kinds) != 1:
            raise ValueError(f"one_of mixes photometric and other operations: {params['ops']}")
        return kinds.pop()
    return name in PHOTOMETRIC


def slots(augment) -> tuple[Slot, ...]:
    """The photometric operations of a recipe's `augment`, in order."""
    out = []
    for group, (name, params) in enumerate(e for e in augment if is_photometric(e)):
        ops = params["ops"] if name == "one_of" else ((name, params),)
        for choice, (op, op_params) in enumerate(ops):
            out.append(Slot(op, {k: v for k, v in op_params.items() if k != "p"}, group,
                            params.get("p", 1.0), len(ops), choice))
    return tuple(out)


def _odd(kernel) -> np.ndarray:
    return np.array([k for k in range(kernel[0], kernel[1] + 1) if k % 2], np.int64)


def _opencv_sigma(kernel_size: int) -> float:
    """The sigma OpenCV (and albumentations' GaussianBlur) use for a kernel size."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def _hsv_factor(limit, rng) -> float:
    if isinstance(limit, (tuple, list)):
        return rng.uniform(*limit)
    return 1.0 + rng.uniform(-limit, limit) / _UINT8_MAX


def _line_kernel(size: int, rng) -> np.ndarray:
    kernel = np.zeros((size, size), np.float32)
    angle = rng.uniform(0, np.pi)
    half = (size - 1) / 2
    dy, dx = half * np.sin(angle), half * np.cos(angle)
    cv2.line(kernel, (round(half - dx), round(half - dy)), (round(half + dx), round(half + dy)), 1.0)
    return kernel / kernel.sum()


def _draw_params(slot: Slot, rng, out_size: int):
    """(parameter vector, extra input or None) of one acting operation."""
    p = slot.params
    if slot.name == "brightness_mul":
        return [rng.uniform(*p["range"])], None
    if slot.name == "contrast_brightness":
        return [rng.uniform(*p["contrast"]), rng.uniform(*p["brightness"]) / _UINT8_MAX], None
    if slot.name == "brightness_contrast":
        return [1 + rng.uniform(-p["contrast"], p["contrast"]),
                rng.uniform(-p["brightness"], p["brightness"])], None
    if slot.name == "color_jitter":
        return [rng.uniform(1 - p["brightness"], 1 + p["brightness"]),
                rng.uniform(1 - p["contrast"], 1 + p["contrast"]),
                rng.uniform(1 - p["saturation"], 1 + p["saturation"]),
                360.0 * rng.uniform(-p["hue"], p["hue"])], None
    if slot.name == "hue_saturation_value":
        return [_OPENCV_HUE_DEGREES * rng.uniform(-p["hue"], p["hue"]),
                _hsv_factor(p["saturation"], rng), _hsv_factor(p["value"], rng)], None
    if slot.name == "gaussian_blur":
        k = int(rng.choice(_odd(p["kernel"])))
        return [k, _opencv_sigma(k)], None
    if slot.name == "gaussian_noise":
        std = rng.uniform(*p["std"]) * _UINT8_MAX
        # float32 draws directly: measured 1.5x cheaper than float64 normal() and a cast
        return [], rng.standard_normal((out_size, out_size, 3), dtype=np.float32) * np.float32(std)
    if slot.name == "motion_blur":
        return [], _line_kernel(int(p["kernel"]), rng)
    if slot.name == "jpeg":
        return [rng.integers(p["quality"][0], p["quality"][1] + 1)], None
    raise ValueError(f"unknown photometric operation {slot.name!r}")


_IDLE_EXTRA = {"gaussian_noise": np.zeros((1, 1, 3), np.float32),
               "motion_blur": np.ones((1, 1), np.float32)}


def _inputs_of(slot: Slot) -> int:
    """External-source outputs of a slot: its flag, its parameter vector if it
    has parameters, its extra input (noise, kernel) if it has one."""
    return 1 + (_PARAM_COUNT[slot.name] > 0) + (slot.name in _IDLE_EXTRA)


def draw(plan: tuple[Slot, ...], rng: np.random.Generator, out_size: int) -> list:
    """Per-sample external-source values of every slot (see _inputs_of)."""
    acting = {}
    for slot in plan:
        if slot.group not in acting:
            acting[slot.group] = (rng.random() < slot.p, int(rng.integers(slot.choices)))
    out = []
    for slot in plan:
        applied, choice = acting[slot.group]
        on = bool(applied and choice == slot.choice)
        params, extra = _draw_params(slot, rng, out_size) if on else \
            ([0.0] * _PARAM_COUNT[slot.name], _IDLE_EXTRA.get(slot.name))
        out.append(np.array(on))
        if _PARAM_COUNT[slot.name]:
            out.append(np.asarray(params, np.float32))
        if slot.name in _IDLE_EXTRA:
            out.append(extra)
    return out


def _apply_one(name: str, image, params, extra):
    if name == "brightness_mul":
        return fn.brightness_contrast(image, brightness=params[0])
    if name in ("contrast_brightness", "brightness_contrast"):
        return fn.brightness_contrast(image, contrast=params[0], contrast_center=0.0,
                                      brightness_shift=params[1])
    if name == "color_jitter":
        return fn.color_twist(image, brightness=params[0], contrast=params[1],
                              saturation=params[2], hue=params[3])
    if name == "hue_saturation_value":
        return fn.hsv(image, hue=params[0], saturation=params[1], value=params[2])
    if name == "gaussian_blur":
        return fn.gaussian_blur(image, window_size=fn.cast(params[0], dtype=types.INT32),
                                sigma=params[1])
    if name == "gaussian_noise":
        return fn.cast(dmath.clamp(image + extra, 0, 255), dtype=types.UINT8)
    if name == "motion_blur":
        return fn.filter(image, extra, border="reflect_101")
    if name == "jpeg":
        return fn.jpeg_compression_distortion(image, quality=fn.cast(params[0], dtype=types.INT32))
    raise ValueError(f"unknown photometric operation {name!r}")


def per_slot(plan: tuple[Slot, ...], inputs: list):
    """(slot, flag, parameters or None, extra or None) of each slot, from the
    flat per-sample values `draw` made (or the DALI nodes holding them)."""
    at = 0
    for slot in plan:
        params = inputs[at + 1] if _PARAM_COUNT[slot.name] else None
        extra = inputs[at + _inputs_of(slot) - 1] if slot.name in _IDLE_EXTRA else None
        yield slot, inputs[at], params, extra
        at += _inputs_of(slot)


def apply(image, plan: tuple[Slot, ...], inputs: list, device: str):
    """The DALI graph of `plan` on `image` (uint8 HWC RGB on `device`);
    `inputs` are the external-source outputs in the order `draw` made them."""
    for slot, on, params, extra in per_slot(plan, inputs):
        if slot.name == "gaussian_noise" and device == "gpu":
            extra = extra.gpu()
        if on:  # DALI conditional: only the samples whose flag is set pass
            image = _apply_one(slot.name, image, params, extra)
    return image


def input_count(plan: tuple[Slot, ...]) -> int:
    return sum(_inputs_of(slot) for slot in plan)
