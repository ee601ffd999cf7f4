"""The DALI pipeline: planned windows in, fixed-size augmented crops out.

One pipeline definition serves both devices and both backends
(engine/worker_ops.py says why there are two). Per batch:
  1. WindowSource (in DALI's parallel external-source worker processes, so
     reading overlaps with whatever consumes the batches) reads each window's
     block (engine/reader.py), pastes a patch-bank region into it when the
     member copy-pastes, and draws the sample's photometric parameters, all
     from the sample's counter-based seed;
backend "dali":
  2. one `fn.resize` per output crops the window's fractional ROI out of its
     block and resizes it to the output size in a single pass: antialiased
     for pixels and ELA, nearest-neighbour for the mask;
  3. the member's photometric operations run on the RGB channels
     (engine/photometric.py); pixels leave as float in [0, 1] for Kornia;
backend "opencv":
  2. the worker finishes the sample on uint8 (engine/worker_ops.py):
     resize, photometric, geometric and dropout; the batch leaves as uint8
     and the loader makes normalised floats of it in one pass.
With `device="gpu"` the worker's arrays are copied to the GPU and everything
after runs there; nothing else changes.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import cv2
import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from engine import photometric, sampling, worker_ops
from engine.reader import WindowReader

# Random streams of a sample's generator: what the worker draws for it.
_STREAM_PHOTOMETRIC, _STREAM_COPY_PASTE, _STREAM_GEOMETRIC = 1, 2, 3
BACKENDS = ("dali", "opencv")
# A parallel source computes prefetch_queue_depth batches ahead (DALI's
# default: 1); two per worker keep every worker busy while one is consumed.
PREFETCH_PER_WORKER = 2


@dataclass
class PlannedBatches:
    """What each batch of one rank's epoch reads: rows, windows, plan positions."""

    rows: list[np.ndarray]        # int64 (b,) per batch
    windows: list[np.ndarray]     # int32 (b, 4) y0, x0, y1, x1 per batch
    positions: list[np.ndarray]   # int64 (b,) global plan positions per batch

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class SampleAugment:
    """What the worker does to each sample besides reading it."""

    seed: int = 0
    epoch: int = 0
    photometric: tuple = ()                 # photometric.Slot, in order
    patch_bank: object | None = None        # engine.patch_bank.PatchBank
    copy_paste: dict | None = None          # recipe.copy_paste
    geometric: tuple = ()                   # recipe entries the opencv backend applies


class WindowSource:
    """DALI external source (batch mode, batch_info): batch k of a plan.

    Stateless apart from caches, and picklable, as DALI's parallel external
    source requires: the plan travels to each worker process once.
    """

    def __init__(self, reader: WindowReader, batches: PlannedBatches, out_size: int,
                 augment: SampleAugment = SampleAugment(), backend: str = "dali"):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: expected one of {BACKENDS}")
        self.reader, self.batches, self.out_size, self.augment = reader, batches, out_size, augment
        self.backend = backend

    def __getstate__(self):
        # pickled in the process that starts the workers: they die with it
        return {**self.__dict__, "_parent_pid": os.getpid()}

    def __setstate__(self, state):
        # In a worker process: the workers are the parallelism, so each runs
        # one OpenCV thread instead of a pool competing for the cores.
        parent = state.pop("_parent_pid", None)
        self.__dict__.update(state)
        cv2.setNumThreads(1)
        if parent is not None:
            die_with_parent(parent)

    def outputs(self) -> list[str]:
        if self.backend == "opencv":
            return ["image", "mask", "index"]
        names = ["image", "mask", "roi_start", "roi_end", "index"]
        names += ["ela"] if self.reader.with_ela else []
        return names + [f"photometric_{i}" for i in range(photometric.input_count(self.augment.photometric))]

    def draw(self, seed) -> tuple[list, list]:
        """A sample's photometric values (photometric.draw) and the geometric
        operations the opencv backend applies to it (none for dali: Kornia
        draws those per batch), from the sample's seed."""
        aug = self.augment
        photometric_values = photometric.draw(
            aug.photometric, np.random.default_rng((int(seed), _STREAM_PHOTOMETRIC)), self.out_size)
        geometric = worker_ops.draw_geometric(
            aug.geometric, np.random.default_rng((int(seed), _STREAM_GEOMETRIC)), self.out_size)
        return photometric_values, geometric

    def __call__(self, info):
        k = info.iteration
        if k >= len(self.batches):
            raise StopIteration
        aug = self.augment
        seeds = sampling.sample_seeds(aug.seed, aug.epoch, self.batches.positions[k])
        columns = [[] for _ in self.outputs()]
        for row, window, seed in zip(self.batches.rows[k], self.batches.windows[k], seeds):
            block = self.reader.read(int(row), window, self.out_size)
            if aug.patch_bank is not None:
                block.image, block.mask = aug.patch_bank.paste(
                    block.image, block.mask, np.random.default_rng((int(seed), _STREAM_COPY_PASTE)),
                    p=aug.copy_paste["p"], scale=aug.copy_paste["scale"], pixel_scale=block.scale)
            drawn, geometric = self.draw(seed)
            # 0-d arrays, not numpy scalars: DALI's worker processes accept only arrays
            index = np.array(row, np.int64)
            if self.backend == "opencv":
                values = worker_ops.finish(block, self.out_size, aug.photometric, drawn, geometric)
                values.append(index)
            else:
                values = [block.image, block.mask, block.roi_start, block.roi_end, index]
                values += [block.ela] if self.reader.with_ela else []
                values += drawn
            for column, value in zip(columns, values):
                column.append(value)
        return tuple(columns)


_PR_SET_PDEATHSIG = 1   # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have the OS kill this process when its parent dies, even by kill -9
    (Linux's parent-death signal): a DALI worker holds a GB of shared memory
    and would otherwise live on, adopted by init. Elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:   # the parent died before the signal was armed
        os._exit(1)


def _float_chw(mask):
    # in DALI's threads, with the rest of the per-sample work, rather than one
    # more pass in the consumer
    return fn.crop_mirror_normalize(mask, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[1.0])


def build_pipeline(source: WindowSource, *, batch_size: int, out_size: int, device: str,
                   device_id: int | None, num_threads: int, py_workers: int, seed: int):
    """A built DALI pipeline producing `output_names(source)`.

    backend "dali": image float CHW in [0, 1], mask float 1HW (0/1), index
    int64, and ela float 1HW in [0, 1] when the reader reads ELA.
    backend "opencv": the finished image uint8 HWC (RGB, + ELA), mask uint8
    HW1, index."""
    names = source.outputs()
    plan = source.augment.photometric if source.backend == "dali" else ()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, py_num_workers=max(py_workers, 1), py_start_method="spawn",
                  prefetch_queue_depth=2, enable_conditionals=bool(plan))
    def crop_resize_augment():
        ahead = dict(prefetch_queue_depth=PREFETCH_PER_WORKER * py_workers) if py_workers > 0 else {}
        nodes = dict(zip(names, fn.external_source(
            source=source, num_outputs=len(names), batch=True, batch_info=True,
            parallel=py_workers > 0, **ahead,
            layout=["HWC" if n in ("image", "mask", "ela") else "" for n in names])))
        pixels = {n: nodes[n].gpu() if device == "gpu" else nodes[n]
                  for n in ("image", "mask", "ela") if n in nodes}
        if source.backend == "opencv":   # finished uint8 HWC: the loader makes floats
            return pixels["image"], pixels["mask"], nodes["index"]
        roi = dict(roi_start=nodes["roi_start"], roi_end=nodes["roi_end"])
        image = fn.resize(pixels["image"], size=[out_size, out_size], antialias=True,
                          interp_type=types.INTERP_LINEAR, **roi)
        image = photometric.apply(image, plan, [nodes[f"photometric_{i}"] for i in
                                                range(photometric.input_count(plan))], device)
        outputs = [fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                            mean=[0.0], std=[255.0]),
                   _float_chw(fn.resize(pixels["mask"], size=[out_size, out_size], antialias=False,
                                        interp_type=types.INTERP_NN, **roi)),
                   nodes["index"]]
        if "ela" in pixels:
            ela = fn.resize(pixels["ela"], size=[out_size, out_size], antialias=True,
                            interp_type=types.INTERP_LINEAR, **roi)
            outputs.append(fn.crop_mirror_normalize(ela, dtype=types.FLOAT, output_layout="CHW",
                                                    mean=[0.0], std=[255.0]))
        return tuple(outputs)

    pipe = crop_resize_augment()
    pipe.build()
    return pipe


def output_names(source: WindowSource) -> list[str]:
    ela = source.backend == "dali" and source.reader.with_ela  # opencv: ELA is image channel 4
    return ["image", "mask", "index"] + (["ela"] if ela else [])


def iterate(pipe, source: WindowSource) -> DALIGenericIterator:
    """Batches as torch tensors on the pipeline's device; a short last batch stays short."""
    return DALIGenericIterator([pipe], output_names(source),
                               last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
