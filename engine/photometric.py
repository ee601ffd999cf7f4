"""A recipe's photometric operations as per-sample inputs and DALI operators.

A recipe's colour, blur, noise and JPEG operations (their definitions,
draws and implementations: engine/ops.py) act on the RGB channels only
(ELA and the mask never pass through them). Their values are drawn per
sample in the reader worker, from the sample's counter-based seed
(engine.sampling.sample_seeds), as flat external-source values (`draw`);
the dali backend hands them to DALI operators as per-sample inputs
(`apply`, right after the crop-and-resize), the opencv backend applies the
same values with OpenCV in the worker (engine/worker_ops.py). Drawn in one
place, applied in another, and identical for a resumed epoch.

Why DALI and not Kornia for these: on the CPU Kornia's implementations
measured 10-30x DALI's (docs/performance.md, "Loader"); on a GPU both are
fast, and DALI runs the same operators there. Photometric operations act on each pixel (blur, JPEG: on a small
neighbourhood), so running them before the geometric ones changes nothing
but the alignment of JPEG's 8 x 8 block grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import ops

PHOTOMETRIC = ops.PHOTOMETRIC


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
    return ops.kind(entry) == "photometric"


def slots(augment) -> tuple[Slot, ...]:
    """The photometric operations of a recipe's `augment`, in order."""
    out = []
    for group, (name, params) in enumerate(e for e in augment if is_photometric(e)):
        entries = params["ops"] if name == "one_of" else ((name, params),)
        for choice, (op, op_params) in enumerate(entries):
            out.append(Slot(op, ops.with_defaults(op, op_params), group, params.get("p", 1.0),
                            len(entries), choice))
    return tuple(out)


def _inputs_of(slot: Slot) -> int:
    """External-source outputs of a slot: its flag, its parameter vector if it
    has parameters, its extra input (noise, kernel) if it has one."""
    op = ops.OPS[slot.name]
    return 1 + (op.count > 0) + (op.idle is not None)


def draw(plan: tuple[Slot, ...], rng: np.random.Generator, out_size: int) -> list:
    """Per-sample external-source values of every slot (see _inputs_of)."""
    acting = {}
    for slot in plan:
        if slot.group not in acting:
            acting[slot.group] = (rng.random() < slot.p, int(rng.integers(slot.choices)))
    out = []
    for slot in plan:
        op = ops.OPS[slot.name]
        applied, choice = acting[slot.group]
        on = bool(applied and choice == slot.choice)
        params, extra = op.draw(slot.params, rng, out_size) if on else ([0.0] * op.count, op.idle)
        out.append(np.array(on))
        if op.count:
            out.append(np.asarray(params, np.float32))
        if op.idle is not None:
            out.append(extra)
    return out


def per_slot(plan: tuple[Slot, ...], inputs: list):
    """(slot, flag, parameters or None, extra or None) of each slot, from the
    flat per-sample values `draw` made (or the DALI nodes holding them)."""
    at = 0
    for slot in plan:
        op = ops.OPS[slot.name]
        params = inputs[at + 1] if op.count else None
        extra = inputs[at + _inputs_of(slot) - 1] if op.idle is not None else None
        yield slot, inputs[at], params, extra
        at += _inputs_of(slot)


def apply(image, plan: tuple[Slot, ...], inputs: list, device: str):
    """The DALI graph of `plan` on `image` (uint8 HWC RGB on `device`);
    `inputs` are the external-source outputs in the order `draw` made them.
    Every operator returns uint8 (DALI keeps its input's type; the noise
    casts back), so the batch leaves DALI as uint8, a quarter of the bytes
    of floats, and the loader converts it on the batch's device."""
    for slot, on, params, extra in per_slot(plan, inputs):
        op = ops.OPS[slot.name]
        if op.extra_on_device and device == "gpu":
            extra = extra.gpu()
        if on:  # DALI conditional: only the samples whose flag is set pass
            image = op.dali(image, params, extra)
    return image


def input_count(plan: tuple[Slot, ...]) -> int:
    return sum(_inputs_of(slot) for slot in plan)
