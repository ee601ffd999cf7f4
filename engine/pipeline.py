"""The DALI pipeline: planned windows in, fixed-size augmented crops out.

One pipeline definition serves both devices and both backends
(engine/worker_ops.py says why there are two). Per batch:
  1. WindowSource (in DALI's parallel external-source worker processes, so
     reading overlaps with whatever consumes the batches) reads each window's
     block (engine/reader.py), pastes a patch-bank region into it when the
     member copy-pastes, and draws the sample's photometric values and
     geometry (engine/ops.py), all from the sample's counter-based seed;
  2. the backend, chosen once by make_loader, owns the rest: its worker
     outputs, its part of the DALI graph and the finishing step that makes
     the batch dict's image and mask:
     DaliBackend    one `fn.resize` per output crops the window's fractional
                    ROI out of its block and resizes it (antialiased for
                    pixels and ELA, nearest for the mask); the photometric
                    operators run on RGB (engine/photometric.py), all on
                    uint8; the batch leaves as uint8 and the loader turns it
                    into floats, applies the drawn geometry with torch
                    (engine/augment.py) and normalises, on the pipeline's
                    device;
     OpencvBackend  the worker finishes the sample on uint8
                    (engine/worker_ops.py); the batch leaves as uint8 and the
                    loader makes normalised floats of it in one pass.
Both hand over image uint8 B x H x W x C (RGB, + ELA) and mask uint8
B x H x W x 1: a quarter of the bytes of floats through DALI's output
buffers and its copy into torch.
With `device="gpu"` the worker's arrays are copied to the GPU and everything
after runs there; nothing else changes.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from engine import ops, photometric, sampling, worker_ops
from engine.node_arrays import NodeArrays
from engine.reader import WindowReader

# Random streams of a sample's generator: what the worker draws for it.
_STREAM_PHOTOMETRIC, _STREAM_COPY_PASTE, _STREAM_GEOMETRIC = 1, 2, 3
# A parallel source computes prefetch_queue_depth batches ahead (DALI's
# default: 1); two per worker keep every worker busy while one is consumed.
PREFETCH_PER_WORKER = 2


class Cut(Sequence):
    """One array of a plan cut into batches: batch k is array[bounds[k]:bounds[k + 1]],
    a view (of a node-local file's mapping, engine/node_arrays.py)."""

    def __init__(self, array: np.ndarray, bounds: np.ndarray):
        self.array, self.bounds = array, bounds

    def __len__(self) -> int:
        return max(0, len(self.bounds) - 1)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} of {len(self)}")
        return self.array[self.bounds[k]:self.bounds[k + 1]]


@dataclass
class PlannedBatches:
    """What each batch of one rank's epoch reads: rows, windows, plan positions.

    Made by engine/loader.py's Planner from a node-local plan (`mapped`: its
    batches are views of the files every process of the node maps, and it
    pickles as their folder and first batch), or from lists (tests, tools)."""

    rows: Sequence[np.ndarray]        # int64 (b,) per batch
    windows: Sequence[np.ndarray]     # int32 (b, 4) y0, x0, y1, x1 per batch
    positions: Sequence[np.ndarray]   # int64 (b,) global plan positions per batch
    arrays: NodeArrays | None = field(default=None, repr=False)   # the plan these are views of
    start: int = 0                    # its first batch here

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def mapped(cls, arrays: NodeArrays, start: int = 0) -> "PlannedBatches":
        """Batches `start`, start + 1, ... of a plan's arrays (plan_arrays)."""
        bounds = arrays["bounds"][start:]
        return cls(*(Cut(arrays[name], bounds) for name in ("rows", "windows", "positions")),
                   arrays=arrays, start=start)

    def from_batch(self, k: int) -> "PlannedBatches":
        """Batches k, k + 1, ... of these."""
        if self.arrays is not None:
            return PlannedBatches.mapped(self.arrays, self.start + k)
        return PlannedBatches(self.rows[k:], self.windows[k:], self.positions[k:])

    def __reduce__(self):
        if self.arrays is not None:
            return PlannedBatches.mapped, (self.arrays, self.start)
        return PlannedBatches, (list(self.rows), list(self.windows), list(self.positions))


def plan_arrays(rows: np.ndarray, windows: np.ndarray, positions: np.ndarray,
                batch_size: int) -> dict[str, np.ndarray]:
    """A plan as the arrays PlannedBatches.mapped reads: every sample's row,
    window and position in order, and the bounds of its batches of
    `batch_size` (the last one may be short)."""
    count = len(rows)
    bounds = np.r_[np.arange(0, count, batch_size, dtype=np.int64), count] if count else np.zeros(1, np.int64)
    return {"rows": np.asarray(rows, np.int64), "windows": np.asarray(windows, np.int32).reshape(-1, 4),
            "positions": np.asarray(positions, np.int64), "bounds": bounds}


@dataclass(frozen=True)
class SampleAugment:
    """What the worker does to each sample besides reading it."""

    seed: int = 0
    epoch: int = 0
    photometric: tuple = ()                 # photometric.Slot, in order
    patch_bank: object | None = None        # engine.patch_bank.PatchBank
    copy_paste: dict | None = None          # recipe.copy_paste
    geometric: tuple = ()                   # recipe entries drawn as geometry (ops.draw_geometry)


def _photometric_names(source) -> list[str]:
    return [f"photometric_{i}" for i in range(photometric.input_count(source.augment.photometric))]


class DaliBackend:
    """DALI crop-resize and photometric operators; torch geometry on the batch."""

    name = "dali"

    def outputs(self, source) -> list[str]:
        names = ["image", "mask", "roi_start", "roi_end", "index", "geometry"]
        names += ["ela"] if source.reader.with_ela else []
        return names + _photometric_names(source)

    def sample(self, source, block, drawn, geometry) -> dict:
        values = dict(image=block.image, mask=block.mask, roi_start=block.roi_start,
                      roi_end=block.roi_end, geometry=geometry, ela=block.ela)
        return {**values, **dict(zip(_photometric_names(source), drawn))}

    def conditionals(self, source) -> bool:
        return bool(source.augment.photometric)

    def graph(self, nodes: dict, pixels: dict, source, out_size: int, device: str) -> dict:
        """image uint8 HWC (RGB, + ELA when the reader reads it), mask uint8
        HW1 (0/1), index int64, geometry float rows."""
        plan = source.augment.photometric
        roi = dict(roi_start=nodes["roi_start"], roi_end=nodes["roi_end"])

        def resize(node, nearest=False):
            return fn.resize(node, size=[out_size, out_size], antialias=not nearest,
                             interp_type=types.INTERP_NN if nearest else types.INTERP_LINEAR, **roi)

        image = photometric.apply(resize(pixels["image"]), plan,
                                  [nodes[n] for n in _photometric_names(source)], device)
        if "ela" in pixels:
            image = fn.cat(image, resize(pixels["ela"]), axis_name="C")
        return {"image": image, "mask": resize(pixels["mask"], True), "index": nodes["index"],
                "geometry": nodes["geometry"]}

    def finish(self, out: dict, loader):
        return loader.to_float(out["image"], geometry=out["geometry"], mask=out["mask"])

    def block_side(self, out_size: int) -> int:
        """Largest side of a worker's sample: a block of at most twice the
        output side (the pyramid level is the coarsest with at least the
        output's resolution)."""
        return 2 * out_size + 1


class OpencvBackend:
    """All per-sample work on uint8 in the reader workers (engine/worker_ops.py)."""

    name = "opencv"

    def outputs(self, source) -> list[str]:
        return ["image", "mask", "index"]

    def sample(self, source, block, drawn, geometry) -> dict:
        image, mask = worker_ops.finish(block, source.out_size, source.augment.photometric, drawn, geometry)
        return {"image": image, "mask": mask}

    def conditionals(self, source) -> bool:
        return False

    def graph(self, nodes: dict, pixels: dict, source, out_size: int, device: str) -> dict:
        """The finished image uint8 HWC (RGB, + ELA), mask uint8 HW1, index."""
        return {"image": pixels["image"], "mask": pixels["mask"], "index": nodes["index"]}

    def finish(self, out: dict, loader):
        return loader.to_float(out["image"], mask=out["mask"])

    def block_side(self, out_size: int) -> int:
        return out_size


_BACKENDS = {backend.name: backend for backend in (DaliBackend(), OpencvBackend())}
BACKENDS = tuple(_BACKENDS)


def get_backend(name: str):
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {BACKENDS}")
    return _BACKENDS[name]


class WindowSource:
    """DALI external source (batch mode, batch_info): batch k of a plan.

    Stateless apart from caches, and picklable, as DALI's parallel external
    source requires: the plan travels to each worker process once, as the
    folder of its node-local files (engine/node_arrays.py) when it has one.

    `batches` and `augment` are the plan of DALI's epoch 0 (BatchInfo.epoch_idx
    0). With a `planner` (engine/loader.py's) the source also serves the
    pipeline's later epochs: DALI epoch i is the run's epoch `epoch + i` from
    its first batch, planned here, in the worker, by `planner.plan(epoch + i, 0)`
    (a pure function of seed and epoch; the newest epoch's plan is cached).
    Without one every DALI epoch repeats `batches`.
    """

    def __init__(self, reader: WindowReader, batches: PlannedBatches, out_size: int,
                 augment: SampleAugment = SampleAugment(), backend="dali", planner=None,
                 epoch: int = 0):
        self.reader, self.batches, self.out_size, self.augment = reader, batches, out_size, augment
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.planner, self.epoch = planner, epoch
        self._plans = {}   # DALI epoch index -> (PlannedBatches, SampleAugment), the newest only

    def __getstate__(self):
        # pickled in the process that starts the workers: they die with it
        return {**self.__dict__, "_plans": {}, "_parent_pid": os.getpid()}

    def __setstate__(self, state):
        # In a worker process: the workers are the parallelism, so each runs
        # one OpenCV thread instead of a pool competing for the cores.
        parent = state.pop("_parent_pid", None)
        self.__dict__.update(state)
        cv2.setNumThreads(1)
        if parent is not None:
            die_with_parent(parent)

    def plan(self, epoch_idx: int) -> tuple[PlannedBatches, SampleAugment]:
        """What DALI's epoch `epoch_idx` of this source reads, and how it augments."""
        if epoch_idx == 0 or self.planner is None:
            return self.batches, self.augment
        found = self._plans.get(epoch_idx)
        if found is None:
            found = self.planner.plan(self.epoch + epoch_idx, 0)
            self._plans = {epoch_idx: found}
        return found

    def prime(self, epoch_idx: int, planned: tuple[PlannedBatches, SampleAugment]) -> None:
        """Hand this process's copy the plan of DALI epoch `epoch_idx`, computed
        already by the caller (with workers=0 the source runs here)."""
        if epoch_idx:
            self._plans = {epoch_idx: planned}

    def outputs(self) -> list[str]:
        return self.backend.outputs(self)

    def draw(self, seed) -> tuple[list, np.ndarray]:
        """A sample's photometric values (photometric.draw) and geometry
        (ops.draw_geometry), from the sample's seed: the same on both backends."""
        aug = self.augment
        photometric_values = photometric.draw(
            aug.photometric, np.random.default_rng((int(seed), _STREAM_PHOTOMETRIC)), self.out_size)
        geometry = ops.draw_geometry(
            aug.geometric, np.random.default_rng((int(seed), _STREAM_GEOMETRIC)), self.out_size)
        return photometric_values, geometry

    def __call__(self, info):
        k = info.iteration
        batches, aug = self.plan(info.epoch_idx)
        if k >= len(batches):
            raise StopIteration   # also for the iterations DALI prefetches past the end
        seeds = sampling.sample_seeds(aug.seed, aug.epoch, batches.positions[k])
        names = self.outputs()
        columns = [[] for _ in names]
        for row, window, seed in zip(batches.rows[k], batches.windows[k], seeds):
            block = self.reader.read(int(row), window, self.out_size)
            if aug.patch_bank is not None:
                block.image, block.mask = aug.patch_bank.paste(
                    block.image, block.mask, np.random.default_rng((int(seed), _STREAM_COPY_PASTE)),
                    p=aug.copy_paste["p"], scale=aug.copy_paste["scale"], pixel_scale=block.scale)
            # 0-d arrays, not numpy scalars: DALI's worker processes accept only arrays
            values = {**self.backend.sample(self, block, *self.draw(seed)), "index": np.array(row, np.int64)}
            for column, name in zip(columns, names):
                column.append(values[name])
        # the pages of meta/ and of the plan this batch touched leave this
        # process (engine/node_arrays.py): a worker's memory stays a batch's
        self.reader.release()
        if batches.arrays is not None:
            batches.arrays.release()
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


def build_pipeline(source: WindowSource, *, batch_size: int, out_size: int, device: str,
                   device_id: int | None, num_threads: int, py_workers: int, seed: int):
    """A built DALI pipeline producing the outputs its backend's `graph`
    names, in that order (`pipe.engine_outputs`)."""
    names, backend = source.outputs(), source.backend
    graph_names = []

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, py_num_workers=max(py_workers, 1), py_start_method="spawn",
                  prefetch_queue_depth=2, enable_conditionals=backend.conditionals(source))
    def crop_resize_augment():
        ahead = dict(prefetch_queue_depth=PREFETCH_PER_WORKER * py_workers) if py_workers > 0 else {}
        nodes = dict(zip(names, fn.external_source(
            source=source, num_outputs=len(names), batch=True, batch_info=True,
            parallel=py_workers > 0, **ahead,
            layout=["HWC" if n in ("image", "mask", "ela") else "" for n in names])))
        pixels = {n: nodes[n].gpu() if device == "gpu" else nodes[n]
                  for n in ("image", "mask", "ela") if n in nodes}
        outputs = backend.graph(nodes, pixels, source, out_size, device)
        graph_names[:] = outputs
        return tuple(outputs.values())

    pipe = crop_resize_augment()
    pipe.build()
    pipe.engine_outputs = list(graph_names)
    return pipe


def iterate(pipe) -> DALIGenericIterator:
    """Batches as torch tensors on the pipeline's device; a short last batch stays short."""
    return DALIGenericIterator([pipe], pipe.engine_outputs,
                               last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
