"""Batch augmentation of a member's training windows: geometry and dropout.

With the dali backend (engine/worker_ops.py describes both backends), a
member's augmentation (engine/recipes.py) runs in three places, each where
it is cheapest (measured figures in engine/photometric.py's docstring: on the
CPU, Kornia's per-pixel colour, blur, noise and JPEG ops cost 10-30x DALI's):
  1. copy-paste (enhanced_aug) in the DALI reader worker, on the block read
     from the store, before anything else (PatchBank.paste, engine/patch_bank.py);
  2. colour, blur, noise and JPEG as DALI operators after the crop-resize
     (engine/photometric.py);
  3. here, on the whole batch after the pipeline: the geometric ops (hflip,
     vflip, rot90, affine) and coarse_dropout. `build_augmenter` skips the
     recipe's other entries.

The batch is torch tensors on the CPU or a GPU:

    image  float32 B x C x H x W in [0, 1]; C = 3 (RGB) or 4 (RGB + ELA)
    mask   float32 B x 1 x H x W, 0/1

Rules every op follows:
- Geometric ops move all image channels (ELA included) and the mask together.
  Flips and quarter turns are exact index permutations, done per image with
  torch.flip / torch.rot90 on the images they apply to; affine goes through
  Kornia's `AugmentationSequential` with data_keys ["input", "mask"] (masks
  resample nearest, images bilinear).
- coarse_dropout blanks RGB pixels only: ELA and the mask pass untouched (a
  hidden forged pixel is still a forged pixel).
- Each entry's p and "one_of"'s choice are drawn per image (as the
  reference's albumentations did), and an op computes only the images it
  applies to.
- Every random number comes from `seed`: the call seeds torch's RNG inside
  `torch.random.fork_rng` (Kornia draws from the global RNG), so the caller's
  RNG state is untouched and the same seed gives the same batch.

coarse_dropout's hole sizes are pixels of the output window.
"""
from __future__ import annotations

from typing import Callable, Sequence

import kornia.augmentation as K
import torch

from engine.photometric import is_photometric
from engine.recipes import Recipe

# One image and its mask, C x H x W and 1 x H x W: the batch travels through
# the steps as lists of these, so an op leaves the images it skips uncopied.
Images = list[torch.Tensor]


class RandomCoarseDropout(K.IntensityAugmentationBase2D):
    """Blank 1..n rectangular holes of side U(size) px per image (value 0),
    each inside the image (as albumentations' CoarseDropout places them).

    Kornia's RandomErasing erases one rectangle sized by area fraction; the
    recipe wants a random number of holes sized in pixels.
    """

    def __init__(self, holes: tuple[int, int], size: tuple[int, int], p: float = 1.0) -> None:
        super().__init__(p=p)
        self.holes = holes
        self.size = size

    def generate_parameters(self, batch_shape):
        # drawn where Kornia's generators draw (self.device: the batch's device
        # once Augmenter.to moved the module), so nothing is copied per batch
        b, _, height, width = batch_shape
        most, device = self.holes[1], self.device
        count = torch.randint(self.holes[0], most + 1, (b,), device=device)
        side = torch.randint(self.size[0], self.size[1] + 1, (b, most, 2), device=device)
        room = (torch.tensor([height, width], device=device) - side + 1).clamp(min=1)
        corner = (torch.rand(b, most, 2, device=device) * room).long()
        return {"count": count, "side": side, "corner": corner}

    def apply_transform(self, input, params, flags, transform=None):
        device = input.device
        most = params["side"].shape[1]
        used = (torch.arange(most, device=device) < params["count"][:, None])[..., None]  # B x n x 1
        top, left = params["corner"].unbind(-1)
        height, width = params["side"].unbind(-1)
        ys = torch.arange(input.shape[-2], device=device)
        xs = torch.arange(input.shape[-1], device=device)
        in_rows = (ys >= top[..., None]) & (ys < (top + height)[..., None]) & used       # B x n x H
        in_cols = (xs >= left[..., None]) & (xs < (left + width)[..., None])             # B x n x W
        hole = (in_rows[..., :, None] & in_cols[..., None, :]).any(1)                     # B x H x W
        return input.masked_fill(hole[:, None], 0.0)


# --- Alternatives: how an op changes the images it is applied to -------------

class _Permute:
    """An exact pixel permutation (flip, quarter turn), one image at a time:
    cheaper on the CPU than gathering the chosen images into a batch."""

    def __init__(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.move = move

    def __call__(self, images: Images, masks: Images) -> tuple[Images, Images]:
        return [self.move(i) for i in images], [self.move(m) for m in masks]

    def to(self, device: torch.device) -> None:
        """Nothing to move: a permutation has no parameters."""


class _Batched:
    """A Kornia op on the chosen images stacked into one batch."""

    def __init__(self, module: torch.nn.Module,
                 apply: Callable[[torch.Tensor, torch.Tensor], tuple]) -> None:
        self.module, self.apply = module, apply

    def __call__(self, images: Images, masks: Images) -> tuple[Images, Images]:
        image, mask = self.apply(torch.stack(images), torch.stack(masks))
        return list(image.unbind(0)), list(mask.unbind(0))

    def to(self, device: torch.device) -> None:
        """Kornia's documented way to draw parameters on `device`: moving the
        module moves its random generators (set_rng_device_and_dtype)."""
        self.module.to(device)


def _geometric(module: K.AugmentationBase2D) -> _Batched:
    """Moves the whole image (all channels) and the mask together."""
    sequence = K.AugmentationSequential(module, data_keys=["input", "mask"])
    return _Batched(sequence, lambda image, mask: tuple(sequence(image, mask)))


def _rgb_only(module: torch.nn.Module) -> _Batched:
    """Changes the RGB channels only; ELA (channel 4) and the mask pass."""
    def apply(image, mask):
        return torch.cat((module(image[:, :3]), image[:, 3:]), 1), mask
    return _Batched(module, apply)


def _quarter_turn(k: int) -> _Permute:
    return _Permute(lambda t: torch.rot90(t, k, dims=(-2, -1)))


class _OneOf:
    """With probability p per image, one of `alternatives`, chosen uniformly per image.

    Every recipe entry runs through this gate rather than Kornia's own `p`:
    Kornia 0.9 computes an op on the whole batch and then blends by `p`; here
    only the chosen images are computed.
    """

    def __init__(self, alternatives: Sequence[Callable[..., tuple]], p: float) -> None:
        self.alternatives = tuple(alternatives)
        self.p = p

    def __call__(self, images: Images, masks: Images) -> tuple[Images, Images]:
        batch = len(images)
        applied = (torch.rand(batch) < self.p).tolist()
        choice = torch.randint(len(self.alternatives), (batch,)).tolist()
        images, masks = list(images), list(masks)
        for k, alternative in enumerate(self.alternatives):
            rows = [b for b in range(batch) if applied[b] and choice[b] == k]
            if rows:
                new_images, new_masks = alternative([images[b] for b in rows], [masks[b] for b in rows])
                for b, image, mask in zip(rows, new_images, new_masks):
                    images[b], masks[b] = image, mask
        return images, masks

    def to(self, device: torch.device) -> None:
        for alternative in self.alternatives:
            alternative.to(device)


# --- Recipe names -> steps --------------------------------------------------

def _symmetric(limit: float, centre: float = 0.0) -> tuple[float, float]:
    return (centre - limit, centre + limit)


# The ops that move pixels (image and mask together). Tests and the loader's
# alignment checks select by this set.
GEOMETRIC_OPS = frozenset(("hflip", "vflip", "rot90", "affine"))

# name -> builder(**params without p) -> the op's alternatives, one chosen
# uniformly per image. Kornia modules get p=1: the gating is _OneOf's.
_BUILDERS: dict[str, Callable[..., list]] = {
    "hflip": lambda: [_Permute(lambda t: t.flip(-1))],
    "vflip": lambda: [_Permute(lambda t: t.flip(-2))],
    # one alternative per k keeps k uniform over the range
    "rot90": lambda k: [_quarter_turn(t) for t in range(k[0], k[1] + 1)],
    "affine": lambda shift, scale, rotate: [_geometric(K.RandomAffine(
        degrees=rotate, translate=(shift, shift), scale=_symmetric(scale, 1.0),
        # zeros, not reflection: mirrored copies of content would look like
        # unlabelled copy-move forgeries
        padding_mode="zeros", p=1.0))],
    "one_of": lambda ops: [_build_step(name, params) for name, params in ops],
    "coarse_dropout": lambda holes, size: [
        _rgb_only(RandomCoarseDropout(holes=tuple(holes), size=tuple(size)))],
}


def _build_step(name: str, params: dict) -> _OneOf:
    """One recipe entry as a step applied with probability params["p"] (default 1)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown batch augmentation {name!r}; known: {', '.join(_BUILDERS)} "
                         "(colour, blur, noise and JPEG run in DALI: engine/photometric.py)")
    options = {key: value for key, value in params.items() if key != "p"}
    try:
        alternatives = _BUILDERS[name](**options)
    except TypeError as exc:
        raise ValueError(f"augmentation {name!r}: bad parameters {sorted(params)} ({exc})") from None
    return _OneOf(alternatives, params.get("p", 1.0))


# --- The augmenter ----------------------------------------------------------

class Augmenter:
    """A member's batch augmentation: the recipe's geometric and dropout entries, in order."""

    def __init__(self, steps: Sequence[_OneOf], img_size: int) -> None:
        self.steps = tuple(steps)
        self.img_size = img_size

    def to(self, device: torch.device) -> "Augmenter":
        """Draw Kornia's parameters on `device`, where the batches are (on
        CUDA: no per-batch copies of parameters, each a host-device sync).
        Which device draws changes the numbers, not their distribution."""
        for step in self.steps:
            step.to(device)
        return self

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New augmented (image, mask): image clamped to [0, 1], mask exactly 0/1."""
        _check_batch(image, mask, self.img_size)
        cuda = []
        if image.is_cuda:
            index = image.device.index
            cuda = [torch.cuda.current_device() if index is None else index]
        images, masks = list(image.unbind(0)), list(mask.unbind(0))
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(cuda[0]):
                    torch.cuda.manual_seed(seed)
            for step in self.steps:
                images, masks = step(images, masks)
        return torch.stack(images).clamp_(0, 1), (torch.stack(masks) > 0.5).to(mask.dtype)


def _check_batch(image: torch.Tensor, mask: torch.Tensor, img_size: int) -> None:
    if image.ndim != 4 or image.shape[1] not in (3, 4) or not image.is_floating_point():
        raise ValueError(f"image must be float B x 3|4 x H x W, got {tuple(image.shape)} {image.dtype}")
    if tuple(image.shape[2:]) != (img_size, img_size):
        raise ValueError(f"this augmenter was built for {img_size} x {img_size} windows, "
                         f"got {tuple(image.shape[2:])}")
    expected = (image.shape[0], 1, *image.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must be {expected} to match the image, got {tuple(mask.shape)}")


def batch_entries(recipe: Recipe) -> tuple:
    """The recipe's geometric and coarse_dropout entries, in order: what is
    left once the photometric ones (engine.photometric.is_photometric) are
    placed elsewhere. copy_paste is not an augment entry."""
    return tuple(entry for entry in recipe.augment if not is_photometric(entry))


def build_augmenter(recipe: Recipe, *, img_size: int) -> Augmenter | None:
    """The Kornia augmenter of the recipe's batch_entries, or None when it has none."""
    steps = [_build_step(name, params) for name, params in batch_entries(recipe)]
    return Augmenter(steps, img_size) if steps else None
