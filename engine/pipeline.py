"""The DALI pipeline: planned windows in, fixed-size crops out.

One pipeline definition serves both devices: window blocks are read on the
CPU (in DALI's parallel external-source worker processes, so reading overlaps
with whatever consumes the batches), then one `fn.resize` per output crops
the window's fractional ROI out of its block and resizes it to the output size
in a single pass: antialiased for pixels, nearest-neighbour for the mask. With
`device="gpu"` the blocks are copied to the GPU first and the resize runs
there; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from engine.reader import WindowReader

OUTPUTS = ("image", "mask", "index", "window_scale")


@dataclass
class PlannedBatches:
    """What each batch of one rank's epoch reads: rows, windows, plan positions."""

    rows: list[np.ndarray]        # int64 (b,) per batch
    windows: list[np.ndarray]     # int32 (b, 4) y0, x0, y1, x1 per batch
    positions: list[np.ndarray]   # int64 (b,) global plan positions per batch

    def __len__(self) -> int:
        return len(self.rows)


class WindowSource:
    """DALI external source (batch mode, batch_info): batch k of a plan.

    Stateless apart from caches, and picklable, as DALI's parallel external
    source requires: the plan travels to each worker process once.
    """

    def __init__(self, reader: WindowReader, batches: PlannedBatches, out_size: int):
        self.reader, self.batches, self.out_size = reader, batches, out_size

    def __call__(self, info):
        k = info.iteration
        if k >= len(self.batches):
            raise StopIteration
        images, masks, starts, ends, scales = [], [], [], [], []
        for row, window in zip(self.batches.rows[k], self.batches.windows[k]):
            block = self.reader.read(int(row), window, self.out_size)
            images.append(block.image)
            masks.append(block.mask)
            starts.append(block.roi_start)
            ends.append(block.roi_end)
            side = np.sqrt(float(window[2] - window[0]) * float(window[3] - window[1]))
            scales.append(np.array(self.out_size / side, np.float32))
        # 0-d arrays, not numpy scalars: DALI's worker processes accept only arrays
        indices = [np.array(row, np.int64) for row in self.batches.rows[k]]
        return images, masks, starts, ends, indices, scales


def build_pipeline(source: WindowSource, *, batch_size: int, out_size: int, device: str,
                   device_id: int | None, num_threads: int, py_workers: int, seed: int):
    """A built DALI pipeline producing OUTPUTS: image float CHW in [0, 1]
    (3 or 4 channels), mask uint8 1HW (0/1), index int64, window_scale float32."""

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=seed, py_num_workers=max(py_workers, 1), py_start_method="spawn",
                  prefetch_queue_depth=2)
    def crop_resize():
        image, mask, roi_start, roi_end, index, scale = fn.external_source(
            source=source, num_outputs=6, batch=True, batch_info=True,
            parallel=py_workers > 0, layout=["HWC", "HWC", "", "", "", ""])
        if device == "gpu":
            image, mask = image.gpu(), mask.gpu()
        image = fn.resize(image, size=[out_size, out_size], roi_start=roi_start,
                          roi_end=roi_end, antialias=True, interp_type=types.INTERP_LINEAR)
        image = fn.crop_mirror_normalize(image, dtype=types.FLOAT, output_layout="CHW",
                                         mean=[0.0], std=[255.0])
        mask = fn.resize(mask, size=[out_size, out_size], roi_start=roi_start, roi_end=roi_end,
                         antialias=False, interp_type=types.INTERP_NN)
        mask = fn.transpose(mask, perm=[2, 0, 1])
        return image, mask, index, scale

    pipe = crop_resize()
    pipe.build()
    return pipe


def iterate(pipe) -> DALIGenericIterator:
    """Batches as torch tensors on the pipeline's device; a short last batch stays short."""
    return DALIGenericIterator([pipe], list(OUTPUTS), last_batch_policy=LastBatchPolicy.PARTIAL,
                               auto_reset=False)
