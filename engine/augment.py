"""The dali backend's batch step: each sample's drawn geometry, applied with torch.

With the dali backend (engine/worker_ops.py describes both backends), a
member's augmentation (engine/recipes.py; each op defined once in
engine/ops.py) runs in three places:
  1. in the DALI reader worker: copy-paste (enhanced_aug) on the block read
     from the store (PatchBank.paste, engine/patch_bank.py), and the draws of
     every other op for the sample, from its counter-based seed;
  2. colour, blur, noise and JPEG as DALI operators after the crop-resize
     (engine/photometric.py);
  3. here, on the batch after the pipeline: the geometry rows the worker drew
     (ops.draw_geometry), with each op's torch implementation, applied to
     the batch at once: at each row position, the samples whose row there
     is the same op (flips; quarter turns of the same k; the affine, with
     each sample's own matrix) go through one call, on an index_select of
     the batch when not all of them act. Flips and quarter turns are
     torch.flip / torch.rot90, the affine kornia's warp_affine with the
     matrices the opencv backend gives cv2.warpAffine (bilinear images,
     nearest masks, zeros outside: one batched warp for the images and one
     for the masks), coarse dropout's holes on RGB only. The rows are read
     on the CPU and copied to the batch's device once per batch, from pinned
     memory without blocking, so a GPU batch waits on no copy back. The same
     seed gives the same transform as the opencv backend's.

The batch is torch tensors on the CPU or a GPU:

    image  float32 B x C x H x W, each channel scaled but not yet shifted
           (Loader.to_float: black is 0, the value the affine's border and
           the dropout's holes fill with); C = 3 (RGB) or 4 (RGB + ELA)
    mask   float32 B x 1 x H x W, 0/1
"""
from __future__ import annotations

import numpy as np
import torch

from engine import ops

# The ops that move pixels (image and mask together). Tests and the loader's
# alignment checks select by this set.
GEOMETRIC_OPS = frozenset(ops.GEOMETRIC) - {"coarse_dropout"}


def apply_geometry(image: torch.Tensor, mask: torch.Tensor,
                   geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) after each sample's rows of `geometry` (B x rows x
    ops.ROW_WIDTH, on the CPU); may write into `image` and `mask`."""
    groups = list(_groups(geometry.cpu().numpy()))
    if not groups:
        return image, mask
    samples, values = _to_device([g[1] for g in groups], [g[2] for g in groups], image.device)
    for (op, chosen, cpu_values), index, on_device in zip(groups, samples, values):
        if len(chosen) == len(image):   # the whole batch, in order
            image, mask = op.torch(image, mask, cpu_values, on_device)
        else:
            moved_image, moved_mask = op.torch(image.index_select(0, index), mask.index_select(0, index),
                                               cpu_values, on_device)
            image, mask = image.index_copy_(0, index, moved_image), mask.index_copy_(0, index, moved_mask)
    return image, mask


def _groups(geometry: np.ndarray):
    """(op, samples, their values) for each row position in order, one per op
    (and op.group key) acting there: the samples applied together."""
    for column in geometry.transpose(1, 0, 2):
        together: dict[tuple, list[int]] = {}
        for b in np.flatnonzero(column[:, 0] >= 0):
            op = ops.OPS[ops.GEOMETRIC[int(column[b, 0])]]
            together.setdefault((op.name, op.group(column[b, 1:])), []).append(int(b))
        for (name, _), chosen in together.items():
            yield ops.OPS[name], np.asarray(chosen, np.int64), column[chosen, 1:]


def _to_device(samples: list[np.ndarray], values: list[np.ndarray], device: torch.device):
    """Every group's sample indices and values on `device`, in one copy each."""
    sizes = [len(s) for s in samples]
    index = torch.from_numpy(np.concatenate(samples))
    rows = torch.from_numpy(np.ascontiguousarray(np.concatenate(values)))
    if device.type == "cuda":
        index, rows = (t.pin_memory().to(device, non_blocking=True) for t in (index, rows))
    return index.split(sizes), rows.split(sizes)
