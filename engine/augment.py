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
     (ops.draw_geometry), one sample at a time, with each op's torch
     implementation: flips and quarter turns as torch.flip / torch.rot90, the
     affine through kornia's warp_affine with the matrix the opencv backend
     gives cv2.warpAffine (bilinear images, nearest masks, zeros outside),
     coarse dropout's holes on RGB only. The same seed gives the same
     transform as the opencv backend's.

The batch is torch tensors on the CPU or a GPU:

    image  float32 B x C x H x W, each channel scaled but not yet shifted
           (Loader.to_float: black is 0, the value the affine's border and
           the dropout's holes fill with); C = 3 (RGB) or 4 (RGB + ELA)
    mask   float32 B x 1 x H x W, 0/1
"""
from __future__ import annotations

import torch

from engine import ops

# The ops that move pixels (image and mask together). Tests and the loader's
# alignment checks select by this set.
GEOMETRIC_OPS = frozenset(ops.GEOMETRIC) - {"coarse_dropout"}


def apply_geometry(image: torch.Tensor, mask: torch.Tensor,
                   geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) after each sample's rows of `geometry` (B x rows x
    ops.ROW_WIDTH, on the CPU); may write into `image`."""
    images, masks, moved = list(image.unbind(0)), list(mask.unbind(0)), False
    for b, rows in enumerate(geometry.cpu().numpy()):
        for op, row in ops.acting_rows(rows):
            images[b], masks[b] = op.torch(images[b], masks[b], row)
            moved = True
    return (torch.stack(images), torch.stack(masks)) if moved else (image, mask)
