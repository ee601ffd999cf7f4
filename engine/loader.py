"""make_loader: from a store and a member's recipe to training batches.

The flow of one epoch (docs/architecture.md):
  sampling    -> which rows this rank reads, in which batches, with which windows
  reader      -> the window's chunks at the right pyramid level, in DALI's
                 worker processes, where enhanced_aug's copy-paste also runs
                 and where every augmentation value of the sample is drawn
                 from its seed (engine/ops.py), geometry included
then, with backend="dali" (the default on CUDA):
  pipeline    -> DALI crop + resize to img_size, then the member's colour,
                 blur, noise and JPEG operations (CPU or GPU operators), on
                 uint8; DALI hands over the uint8 batch
  normalise   -> on the pipeline's device, in Loader.to_float: to float and
                 scaled, then torch applies the drawn geometric operations
                 and coarse dropout (engine/augment.py) to the batch, image,
                 ELA and mask together, then the ImageNet shift on RGB; ELA
                 (channel 4) scaled to [0, 1]
or, with backend="opencv" (the default on the CPU; engine/worker_ops.py
says why):
  worker_ops  -> in the same worker processes, on uint8: resize, colour,
                 blur, noise, JPEG, geometric operations, coarse dropout
  pipeline    -> DALI gathers the finished uint8 batch
  normalise   -> one Numba pass (planar_float) to float CHW: ImageNet
                 mean/std on RGB, ELA scaled to [0, 1]

Everything random is a function of (seed, epoch, plan position), so the same
arguments give the same batches, any rank layout covers the same plan, and a
loader started at batch k yields exactly batches k, k+1, ... of a full run.

One loader serves a whole run: `loader.set_epoch(e, start_batch=k)` re-plans
it in place (Planner.plan, the same pure function of seed and epoch) and its
one DALI pipeline and reader workers go on into epoch e, each worker
following DALI's BatchInfo.epoch_idx to the epoch's plan; the workers start
on an epoch's first batches as soon as the previous epoch's last batch is
taken. Per-row arrays and plans are held once per node, not per process:
node-local files every process maps (engine/node_arrays.py).
`loader.close()` (or a `with` block) ends the pipeline and workers.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numba import njit

from engine import augment, dali_compat, node_arrays, ops, photometric, sampling
from engine import store as layout
from engine.device import resolve_device
from engine.patch_bank import PatchBank
from engine.pipeline import (BACKENDS, PREFETCH_PER_WORKER, PlannedBatches, SampleAugment, WindowSource,
                             build_pipeline, get_backend, iterate, plan_arrays)
from engine.reader import WindowReader, carried_error
from engine.node_arrays import NodeArrays
from engine.storage import NO_SETTINGS, StorageSettings
from engine.recipes import WHOLE_IMAGE, Recipe, get_recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 4096


@njit(cache=True, nogil=True)
def _planar_float_kernel(pixels, table, out):
    batch, height, width, channels = pixels.shape
    for b in range(batch):
        for c in range(channels):
            values = table[c]
            for y in range(height):
                for x in range(width):
                    out[b, c, y, x] = values[pixels[b, y, x, c]]


def planar_float(pixels: torch.Tensor, scale, shift) -> torch.Tensor:
    """uint8 B x H x W x C -> float32 B x C x H x W as x * scale + shift
    (scale, shift: numbers or 1 x C x 1 x 1). On the CPU one Numba pass
    through a 256-entry table per channel: DALI's crop_mirror_normalize plus
    the iterator's copy of its floats measured about twice the consumer's
    time, and torch's ops wake its thread pool, whose spinning takes CPU
    from the reader workers. On a GPU one torch kernel (the result has the
    channels-last strides of the uint8 batch)."""
    channels = pixels.shape[-1]
    shape = (1, channels, 1, 1)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=pixels.device).expand(shape)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=pixels.device).expand(shape)
    if pixels.is_cuda:
        return torch.addcmul(shift, pixels.permute(0, 3, 1, 2), scale)
    table = torch.arange(256, dtype=torch.float32) * scale.reshape(channels, 1) + shift.reshape(channels, 1)
    # numpy's allocation, not torch.empty's: measured a third cheaper to fill
    # here (fewer fresh pages to fault in)
    out = np.empty((pixels.shape[0], channels) + tuple(pixels.shape[1:3]), np.float32)
    _planar_float_kernel(pixels.numpy(), table.numpy(), out)
    return torch.from_numpy(out)


def cores_per_process() -> int:
    """This process's share of the machine's cores: torchrun's LOCAL_WORLD_SIZE
    ranks on one node split them, so their loader workers and threads do not
    fight over the same cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def dali_device_id(device: torch.device) -> int | None:
    """The GPU ordinal DALI runs on for `device`: a bare "cuda" is the current
    device (torch.cuda.set_device, as each torchrun rank sets it), not GPU 0;
    None on the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto': the dali backend on CUDA, the opencv one on the CPU."""
    if backend == "auto":
        return "dali" if device.type == "cuda" else "opencv"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected 'auto' or one of {BACKENDS}")
    return backend


def _rows_plan(rows: np.ndarray, meta, batch_size: int, rank: int, world_size: int) -> dict:
    """Each of `rows` once, in order, whole image; rank r takes every
    world_size-th (as plan_arrays)."""
    positions = np.arange(len(rows), dtype=np.int64)[rank::world_size]
    mine = rows[rank::world_size]
    windows = sampling.crop_windows(WHOLE_IMAGE, mine, positions, meta["height"], meta["width"],
                                    meta["bbox"], meta["centroid"], 0, 0)
    return plan_arrays(mine, windows, positions, batch_size)


def _val_rows(recipe: Recipe, meta) -> np.ndarray:
    """Validation rows of a member: what its rule includes, read whole, once."""
    weights = sampling.member_weights(recipe.sampling, meta["label"], meta["area_ratio"],
                                      meta["split"], layout.SPLITS["val"], mined=False)
    keep = weights > 0
    if recipe.sampling.hard_negative_weight > 0:   # members that learn from authentic images
        keep |= (meta["label"] == 0) & (meta["split"] == layout.SPLITS["val"])
    return np.flatnonzero(keep).astype(np.int64)


def _train_weights(recipe: Recipe, group, meta, storage: StorageSettings | None) -> np.ndarray:
    """The member's sampling weights over the store's rows (mining flags included)."""
    mining = {kind: layout.read_mining(group, kind, storage) for kind in layout.MINING_KINDS}
    needed = recipe.mining
    if needed and mining[needed] is None:
        raise layout.StoreError(
            f"{group.store}: member {recipe.name!r} samples by {needed} mining results and the "
            f"store has none; `python trainers/train.py --member {recipe.name}` mines first")
    flags = {kind: None if found is None else found["flag"] for kind, found in mining.items()}
    return sampling.member_weights(
        recipe.sampling, meta["label"], meta["area_ratio"], meta["split"], layout.SPLITS["train"],
        hard_negative=flags["hard_negative"], hard_fn=flags["hard_fn"], mined=bool(needed))


@dataclass(frozen=True, eq=False)
class Planner:
    """Any epoch's plan of one loader, a pure function of (seed, epoch):
    `plan(epoch, start_batch)` -> (PlannedBatches, SampleAugment). Picklable
    and small: its per-row arrays (`weights`, `meta`) and its plans are
    node-local files (engine/node_arrays.py) that it pickles as paths; it
    travels to the reader workers once, which map each later epoch's plan
    of a persistent loader (engine/pipeline.py, WindowSource.plan), planned
    and written by the loader's process before the workers start on it, or
    by the first process that needs it.

    fixed (validation, explicit rows): the same batches every epoch.
    Otherwise the training plan: `weights` drawn by sampling.EpochPlan, this
    rank's slice, the view's windows, and `augment` with the epoch set; each
    epoch's in folder `plans`-epoch<e>, named by everything the plan is a
    function of."""

    batch_size: int
    rank: int
    world_size: int
    seed: int
    augment: SampleAugment                 # epoch set per plan (training); as is when fixed
    fixed: PlannedBatches | None = None    # the whole fixed plan, from batch 0
    weights: NodeArrays | None = None      # {"weights": float64 per row}
    num_samples: int = 0
    view: object = None                    # recipe.view
    meta: NodeArrays | None = None         # height, width, bbox, centroid (engine.store.shared_meta)
    plans: Path | None = None
    # the process that made it checks the CRC-32C of the plans it maps;
    # a reader worker their sizes (engine/node_arrays.py says why)
    owner: int = dataclasses.field(default_factory=os.getpid)

    def plan(self, epoch: int, start_batch: int = 0) -> tuple[PlannedBatches, SampleAugment]:
        if self.fixed is not None:
            return self.fixed.from_batch(start_batch), self.augment
        whole = self.epoch_plan(epoch)
        if not 0 <= start_batch <= len(whole):
            raise ValueError(f"start_batch: must be in [0, {len(whole)}], got {start_batch}")
        return whole.from_batch(start_batch), dataclasses.replace(self.augment, epoch=epoch)

    def epoch_plan(self, epoch: int) -> PlannedBatches:
        """Epoch `epoch`'s training plan from batch 0: its node-local file,
        written by whichever process of the node asked first (a run keeps
        its two newest epochs there)."""
        folder = self.plans.with_name(f"{self.plans.name}-epoch{epoch}")
        made = []

        def make():
            made.append(epoch)
            return self._train_arrays(epoch)

        arrays = node_arrays.node_arrays(folder, make, verify=os.getpid() == self.owner)
        if made and arrays.folder is not None:
            self._forget_before(epoch - 1)
        return PlannedBatches.mapped(arrays)

    def _forget_before(self, epoch: int) -> None:
        """Remove this plan's files of the epochs before `epoch` (done by the
        process that wrote a newer epoch: a run moves on an epoch at a time;
        a process mapping them keeps their pages, one asking again plans anew)."""
        for old in self.plans.parent.glob(f"{self.plans.name}-epoch*"):
            number = old.name.rpartition("-epoch")[2]
            if number.isdigit() and int(number) < epoch:
                shutil.rmtree(old, ignore_errors=True)

    def _train_arrays(self, epoch: int) -> dict:
        meta, seed = self.meta, self.seed
        plan = sampling.EpochPlan.build(self.weights["weights"], self.num_samples, seed, epoch)
        positions, rows = plan.rank_samples(self.rank, self.world_size, self.batch_size, drop_last=True)
        # one kernel call for the whole epoch
        windows = sampling.crop_windows(self.view, rows, positions, meta["height"], meta["width"],
                                        meta["bbox"], meta["centroid"], seed, epoch)
        return plan_arrays(rows, windows, positions, self.batch_size)


SHARED_MEMORY = "/dev/shm"
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


class SharedMemoryError(RuntimeError):
    """/dev/shm is too small for the loader's reader workers."""


def check_shared_memory(need: int, folder: str = SHARED_MEMORY) -> None:
    """Refuse to start reader workers that would run /dev/shm out of space:
    a worker writing past it dies of SIGBUS, which DALI reports as a lost
    worker, not as the small /dev/shm (Docker's default is 64 MB)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return   # no /dev/shm to check (not Linux): DALI's own error stands
    if free < need:
        raise SharedMemoryError(
            f"{folder} has {free / 2**20:.0f} MB free; the loader's reader workers need about "
            f"{need / 2**20:.0f} MB of shared memory. Give the container more "
            "(`docker run --shm-size=8g ...`), or use fewer --workers, a smaller --batch-size "
            "or --workers 0")


@dataclass
class _Settings:
    device: torch.device
    batch_size: int
    img_size: int
    seed: int
    epoch: int
    workers: int
    threads: int
    memory_format: torch.memory_format = torch.contiguous_format


class Loader:
    """Batches of one rank, one epoch at a time. `len()` is the number of
    batches of the current epoch.

    One DALI pipeline and one set of reader workers serve every epoch the
    loader is iterated for: `set_epoch(e, start_batch=k)` re-plans in place
    and the next iteration yields batches k, k+1, ... of epoch e. The
    pipeline is reused when e is the epoch after the one just finished (from
    batch 0), or for a fixed plan (validation, explicit rows) any epoch; its
    workers then map that epoch's plan, written for the node as the previous
    epoch ended, from DALI's BatchInfo.epoch_idx (WindowSource.plan) and have
    its first batches ready, as they start on them the moment the previous
    epoch's last batch is taken. Otherwise (an
    epoch left unfinished, an epoch skipped or repeated) the pipeline is
    built again. `close()` (or leaving a `with` block) ends the pipeline and
    its workers; a closed loader builds a new one if iterated again.
    """

    def __init__(self, source: WindowSource, settings: _Settings, start_batch: int = 0):
        self.source, self.settings = source, settings
        self.reader, self.planner = source.reader, source.planner
        self.epoch, self.start_batch = settings.epoch, start_batch
        channels = 4 if self.reader.with_ela else 3
        mean = torch.tensor(IMAGENET_MEAN + (0.0,) * (channels - 3)).view(1, channels, 1, 1)
        std = torch.tensor(IMAGENET_STD + (1.0,) * (channels - 3)).view(1, channels, 1, 1)
        # (x / 255 - mean) / std as x * scale + shift, on the uint8 pixels both
        # backends hand over (public: benchmarks/loader_throughput.py times
        # the same normalisation in the reader workers)
        self.scale, self.shift = (1 / std / 255.0).to(settings.device), (-mean / std).to(settings.device)
        # the mask's 0/1 bytes become 0./1. floats: built once, not per batch
        # (a tiny tensor made on the GPU per batch is a host-device sync)
        self._unit = (torch.ones((), device=settings.device), torch.zeros((), device=settings.device))
        # the pipeline: its source (the plan of its DALI epoch 0 and the
        # planner), DALI's iterator, and the DALI epoch it serves next; _ready
        # while it stands at an epoch boundary
        self._pipe = self._batches_iter = self._pipe_source = None
        self._pipe_epoch, self._ready = 0, False

    @property
    def batches(self) -> PlannedBatches:
        return self.source.batches

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> "Loader":
        """Re-plan for `epoch` from `start_batch` on (the same batches as
        make_loader(..., epoch=epoch, start_batch=start_batch)); returns self."""
        if start_batch < 0:
            raise ValueError(f"start_batch {start_batch}: must be >= 0")
        planned = self.planner.plan(epoch, start_batch)
        s = self.source
        self.source = WindowSource(s.reader, planned[0], s.out_size, planned[1], s.backend,
                                   s.planner, epoch)
        self.epoch, self.start_batch, self.settings.epoch = epoch, start_batch, epoch
        if self._serves_next():
            self._pipe_source.prime(self._pipe_epoch, planned)
        return self

    def _serves_next(self) -> bool:
        """Whether the pipeline's next DALI epoch is the current epoch's plan."""
        # _ready only after an epoch ran to its end: DALI epoch >= 1, planned from batch 0
        return self._ready and self.start_batch == 0 and (
            self.planner.fixed is not None or self.epoch == self._pipe_source.epoch + self._pipe_epoch)

    def to_float(self, pixels: torch.Tensor, mask: torch.Tensor,
                 geometry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A backend's uint8 batch (pixels B x H x W x C, mask B x H x W x 1,
        on the pipeline's device) as float32 B x C x H x W: the image
        normalised (ImageNet mean/std on RGB, ELA to [0, 1]), the mask 0./1.
        With `geometry` (the dali backend's drawn rows) torch applies it on
        the way (engine/augment.py). The one place either backend's pixels
        become the model's input."""
        mask = planar_float(mask, *self._unit)
        if geometry is None:
            return planar_float(pixels, self.scale, self.shift), mask
        # scaled but not yet shifted: black is still 0, the value the affine's
        # border and coarse dropout's holes fill with, as on the opencv
        # backend's uint8 (scaling commutes with the geometry, the shift does not)
        unshifted = planar_float(pixels, self.scale, self._unit[1])
        image, mask = augment.apply_geometry(unshifted, mask, geometry)
        return image.add_(self.shift), mask

    def _build(self) -> None:
        s = self.settings
        on_gpu = s.device.type == "cuda"
        if s.workers > 0:
            check_shared_memory(self.shared_memory_need())
        self._pipe_source = self.source
        with dali_compat.workers_ignore_interrupts():   # Ctrl-C is the trainer's to handle
            self._pipe = build_pipeline(
                self.source, batch_size=s.batch_size, out_size=s.img_size,
                device="gpu" if on_gpu else "cpu", device_id=dali_device_id(s.device),
                num_threads=s.threads, py_workers=s.workers, seed=s.seed)
        self._pipe_epoch = 0
        with _worker_store_errors():   # DALI's iterator reads the first batch when built
            self._batches_iter = iterate(self._pipe)

    def __iter__(self):
        if not len(self.batches):
            return
        s = self.settings
        try:
            # the first batches the workers made may carry a store error
            with _worker_store_errors():
                if self._serves_next():
                    self._batches_iter.reset()   # collects the first batches the workers made
                else:
                    self.close()
                    self._build()
        except BaseException:
            self.close()
            raise
        self._ready = False
        count = len(self.batches)
        try:
            with _worker_store_errors():
                for k in range(count):
                    out = next(self._batches_iter, None)
                    if out is None:   # fewer batches than planned: never reuse this pipeline
                        return
                    out = out[0]
                    # the index stays on the CPU (the trainer records rows with it): not pinned
                    index = out["index"].reshape(-1).to(torch.int64)
                    image, mask = self.source.backend.finish(out, self)
                    if k == count - 1:
                        self._next_epoch()
                    # both backends hand over the same layout (a no-op when it already is)
                    yield {"image": image.contiguous(memory_format=s.memory_format),
                           "mask": mask.contiguous(memory_format=s.memory_format), "index": index}
        except (Exception, KeyboardInterrupt):
            self.close()   # a pipeline whose worker failed is not reused
            raise

    def _next_epoch(self) -> None:
        """The epoch's last batch is taken: move the pipeline to its next DALI
        epoch and start the workers on that epoch's first batches now (they
        overlap validation and the checkpoint), without waiting for them."""
        pipe = self._pipe
        # DALI's source raised StopIteration while prefetching past the end,
        # so reset() starts the next epoch (otherwise the pipeline is simply
        # built again)
        if not dali_compat.epoch_ended(pipe):
            return
        if self.planner.fixed is None and self.settings.workers > 0:
            # the next epoch's plan written for the node before the workers
            # ask for it: they map it rather than each planning it
            self.planner.epoch_plan(self._pipe_source.epoch + self._pipe_epoch + 1)
        pipe.reset()
        self._pipe_epoch += 1
        self._ready = True
        if self.settings.workers > 0:
            dali_compat.schedule_workers(pipe)

    def close(self) -> None:
        """End the pipeline and its reader workers (they exit, their shared
        memory is freed). The loader stays usable: iterating it again builds a new one."""
        pipe, self._pipe, self._batches_iter, self._pipe_source = self._pipe, None, None, None
        self._ready, self._pipe_epoch = False, 0
        if pipe is not None:
            dali_compat.close(pipe)   # DALI 2.4 has no public close

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def shared_memory_need(self) -> int:
        """Bytes of /dev/shm the reader workers may fill at once: DALI keeps
        (2 + prefetch) batches in shared memory, each sample at most a block
        as large as its backend's block_side."""
        s = self.settings
        channels = (4 if self.reader.with_ela else 3) + 1   # + mask
        side = self.source.backend.block_side(s.img_size)
        batches_in_flight = 2 + PREFETCH_PER_WORKER * s.workers
        return batches_in_flight * s.batch_size * side * side * channels


@contextlib.contextmanager
def _worker_store_errors():
    """A store error, or a store URL that stopped answering, in a reader
    worker comes back as the same error (DALI re-raises a worker's error as a
    plain Exception whose text ends with the worker's traceback;
    engine/reader.py's CARRIED_ERRORS names the errors so carried), so the
    user gets its one line, not seventy."""
    try:
        yield
    except Exception as exc:
        carried = carried_error(str(exc))
        if carried is None:
            raise
        raise carried from None


class SpawnGuardError(RuntimeError):
    """make_loader called from a script's top level without the `if __name__
    == "__main__":` guard that worker processes need."""


def _spawn_guard_error(script: str) -> SpawnGuardError:
    return SpawnGuardError(
        f"{script}: make_loader starts reader worker processes, which import this script again "
        "and would run its top-level code (DALI then reports \"Workers initialization failed\"); "
        "put the code that makes and uses the loader under `if __name__ == \"__main__\":` "
        "(or pass workers=0)")


def _is_main_test(node: ast.AST) -> bool:
    """`__name__ == "__main__"` (either way round)."""
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq)):
        return False
    sides = {ast.dump(node.left), ast.dump(node.comparators[0])}
    return sides == {ast.dump(ast.Name("__name__", ast.Load())), ast.dump(ast.Constant("__main__"))}


def check_spawn_guard(workers: int) -> None:
    """Refuse, naming the script, to start reader workers from a main script's
    unguarded top level. DALI starts its workers with `spawn`: each imports
    the main script again (as __mp_main__), so unguarded code makes a loader
    in every worker. Seen from the worker (its main module is __mp_main__) or,
    before any worker starts, from the script's source: the top-level
    statement running now is not an `if __name__ == "__main__":` block."""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if main is None or script is None:   # an interactive session, `python -c`: nothing re-imported
        return
    if main.__name__ == "__mp_main__":
        raise _spawn_guard_error(script)
    if workers == 0:
        return
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:   # not called while the script's top level runs (e.g. from a thread)
        return
    try:
        tree = ast.parse(open(script, "rb").read(), script)
    except (OSError, SyntaxError, ValueError):
        return
    line = frame.f_lineno
    for statement in tree.body:
        if statement.lineno <= line <= statement.end_lineno:
            if not (isinstance(statement, ast.If) and _is_main_test(statement.test)):
                raise _spawn_guard_error(script)
            return


def make_loader(store, member, *, split: str = "train", batch_size: int = 4, img_size: int = 512,
                seed: int = 0, epoch: int = 0, device: str = "cpu", rank: int = 0,
                world_size: int = 1, augment: bool = True, start_batch: int = 0,
                rows=None, workers: int | None = None, threads: int | None = None,
                backend: str = "auto", memory_format: str = "contiguous",
                storage: StorageSettings | None = None) -> Loader:
    """Batches of `member` (a name or a Recipe) from `store` for one rank and epoch.

    split="train": the member's weighted epoch plan, view and augmentation.
    split="val": every validation row the member's rule includes, once, whole image.
    rows=[...]: exactly those rows once, in order, whole image, no augmentation.
    workers: DALI reader processes (0 reads in this process); threads: DALI threads.
    backend: where the per-sample work runs, "dali" (DALI operators + torch),
    "opencv" (OpenCV in the reader processes) or "auto" (dali on CUDA,
    opencv on the CPU); engine/worker_ops.py says why.
    memory_format: "contiguous" (NCHW) or "channels_last" (NHWC strides), the
    same from both backends.
    storage: how a store URL is reached (fsspec options, read cache),
    where mining results are kept and where the node-local arrays are
    written (engine/storage.py StorageSettings); the reader workers get it
    with their reader.
    workers and threads default to this process's share of the cores
    (cores_per_process: torchrun's ranks on a node split them; one core is
    left to the consumer, and the workers idle once DALI's prefetch queues are full).

    The reader workers are started with `spawn` and import the main script
    again: a script that makes a loader with workers must do so under
    `if __name__ == "__main__":`; without it SpawnGuardError names the script.
    engine/torch_dataset.py's LoaderDataset hands the batches to a
    torch.utils.data.DataLoader(..., batch_size=None).
    """
    recipe = member if isinstance(member, Recipe) else get_recipe(member)
    if split not in layout.SPLITS:
        raise ValueError(f"split {split!r}: expected one of {list(layout.SPLITS)}")
    if not (isinstance(img_size, int) and MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE):
        raise ValueError(f"img_size {img_size!r}: the pipeline makes square outputs of "
                         f"{MIN_IMG_SIZE} to {MAX_IMG_SIZE} pixels")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: must be at least 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch {start_batch}: must be >= 0")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format {memory_format!r}: expected one of {list(MEMORY_FORMATS)}")
    dev = resolve_device(device)
    backend = resolve_backend(backend, dev)
    cores = cores_per_process()
    workers = max(1, min(8, cores - 1)) if workers is None else workers
    check_spawn_guard(workers)
    group = layout.open_store(store, storage=storage)
    meta = layout.shared_meta(group, storage)
    node = (storage or NO_SETTINGS).node_dir or node_arrays.default_dir()
    per_sample = SampleAugment(seed, epoch)
    common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed)
    # what every plan of this loader is a function of, besides the rule or rows
    plan_key = (meta.folder and meta.folder.name, batch_size, rank, world_size)
    if rows is not None or split == "val":
        if rows is None:
            rows = _val_rows(recipe, meta)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(meta["label"])):
            raise ValueError(f"rows outside the store's 0..{len(meta['label']) - 1}")
        fixed = node_arrays.node_arrays(
            node / f"rows-{node_arrays.digest(rows, *plan_key)}",
            lambda: _rows_plan(rows, meta, batch_size, rank, world_size))
        planner = Planner(augment=per_sample, fixed=PlannedBatches.mapped(fixed), **common)
    else:
        weights = _train_weights(recipe, group, meta, storage)
        if augment and split == "train":
            per_sample = _augmentation(recipe, group, meta, seed, epoch)
        num_samples = sampling.epoch_size(recipe.sampling, weights)
        weights_key = node_arrays.digest(weights)
        shared = node_arrays.node_arrays(node / f"weights-{weights_key}", lambda: {"weights": weights})
        plans = node / f"plan-{node_arrays.digest(weights_key, recipe.view, num_samples, seed, *plan_key)}"
        planner = Planner(augment=per_sample, weights=shared, num_samples=num_samples,
                          view=recipe.view, meta=meta, plans=plans, **common)
    batches, per_sample = planner.plan(epoch, start_batch)
    settings = _Settings(dev, batch_size, img_size, seed, epoch, workers=workers,
                         threads=threads or min(4, cores),
                         memory_format=MEMORY_FORMATS[memory_format])
    reader = WindowReader(store, with_ela=recipe.in_channels == 4, storage=storage)
    source = WindowSource(reader, batches, img_size, per_sample, get_backend(backend), planner, epoch)
    return Loader(source, settings, start_batch=start_batch)


def _augmentation(recipe: Recipe, group, meta, seed: int, epoch: int) -> SampleAugment:
    """What the reader workers do to a training sample besides reading it:
    copy-paste first (as docs/recipes.md orders it), then the draws of the
    photometric ops and the geometry, which each backend applies its way."""
    bank = None
    if recipe.copy_paste:
        if recipe.in_channels != 3:
            raise ValueError(f"member {recipe.name!r}: copy-paste pastes RGB patches and the recipe "
                             f"has {recipe.in_channels} input channels (a pasted patch has no ELA)")
        cp = recipe.copy_paste
        bank = PatchBank.from_store(
            group, meta, np.flatnonzero((meta["split"] == layout.SPLITS["train"]) & (meta["label"] == 1)),
            min_side=cp["min_side"], max_patches=cp["max_patches"], padding=cp["padding"], seed=seed)
    return SampleAugment(seed, epoch, photometric.slots(recipe.augment), bank, recipe.copy_paste,
                         ops.geometric_entries(recipe.augment))
