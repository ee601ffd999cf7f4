"""Batch augmentation of a member's training windows (Kornia, CPU or CUDA).

The loader hands over windows already cropped and resized to img_size
(engine/pipeline.py); `build_augmenter(recipe, img_size=...)` turns the
recipe's `augment` data (engine/recipes.py) into an `Augmenter` that works on
a whole batch of torch tensors:

    image  float32 B x C x H x W in [0, 1]; C = 3 (RGB) or 4 (RGB + ELA)
    mask   float32 B x 1 x H x W, 0/1

Rules every op follows:
- Geometric ops (hflip, vflip, rot90, affine) move all image channels (ELA
  included) and the mask together, through `AugmentationSequential` with
  data_keys ["input", "mask"]: masks resample nearest, image bilinear.
- Photometric ops see only the RGB channels; ELA and the mask pass untouched.
  coarse_dropout counts as photometric: it blanks image pixels and leaves the
  mask as is (a hidden forged pixel is still a forged pixel).
- Every random number comes from `seed`: the call seeds torch's RNG inside
  `torch.random.fork_rng` (Kornia draws from the global RNG), so the caller's
  RNG state is untouched and the same seed gives the same batch on a given
  device (CPU and CUDA draw per-pixel noise from different generators).
- Each op's p and "one_of"'s choice are drawn per image (as the reference's
  albumentations did), not per batch as Kornia's `random_apply` would.
- Copy-paste (enhanced_aug) runs first, into the already cropped window: the
  patch is resized by U(scale) x window_scale so it keeps its source pixel
  scale relative to the window, and pasted at a uniformly random place that
  keeps it inside the window.

Units of the recipe's parameters follow the reference (albumentations):
hue_saturation_value with integers = shifts in OpenCV 8-bit units (hue of
180 per turn, saturation and value of 255), with a tuple = a multiplicative
range; contrast_brightness's brightness is in 0-255 units; coarse_dropout's
hole sizes and gaussian_blur's kernels are pixels of the output window.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import kornia.augmentation as K
import kornia.color
import torch
import torch.nn.functional as F
from kornia.augmentation import random_generator as rg

from engine.patch_bank import PatchBank
from engine.recipes import Recipe

_OPENCV_HUE_PER_TURN = 180.0
_UINT8_MAX = 255.0

Batch = tuple[torch.Tensor, torch.Tensor]


# --- Ops Kornia lacks -------------------------------------------------------

class RandomGaussianNoiseRange(K.IntensityAugmentationBase2D):
    """Additive Gaussian noise with a per-image std drawn from U(std).

    Kornia's RandomGaussianNoise has one fixed std; the recipes draw it.
    """

    def __init__(self, std: tuple[float, float], p: float = 1.0) -> None:
        super().__init__(p=p)
        self._param_generator = rg.PlainUniformGenerator((std, "std", None, None))

    def apply_transform(self, input, params, flags, transform=None):
        std = params["std"].to(input.device, input.dtype).view(-1, 1, 1, 1)
        return input + torch.randn_like(input) * std


class RandomHSV(K.IntensityAugmentationBase2D):
    """albumentations' HueSaturationValue: rotate hue, then scale and shift
    saturation and value, in one HSV round trip.

    Kornia has RandomHue and a multiplicative RandomSaturation, but no value
    op and no additive saturation or value shift, which the reference used.
    hue: turns; *_mul: factors; *_add: shifts in [0, 1] units.
    """

    def __init__(self, hue, saturation_mul, saturation_add, value_mul, value_add,
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        self._param_generator = rg.PlainUniformGenerator(
            (hue, "hue", None, None),
            (saturation_mul, "saturation_mul", None, None),
            (saturation_add, "saturation_add", None, None),
            (value_mul, "value_mul", None, None),
            (value_add, "value_add", None, None),
        )

    def apply_transform(self, input, params, flags, transform=None):
        def per_image(name):
            return params[name].to(input.device, input.dtype).view(-1, 1, 1)

        h, s, v = kornia.color.rgb_to_hsv(input.clamp(0, 1)).unbind(1)
        h = torch.remainder(h + per_image("hue") * 2 * math.pi, 2 * math.pi)
        s = (s * per_image("saturation_mul") + per_image("saturation_add")).clamp(0, 1)
        v = (v * per_image("value_mul") + per_image("value_add")).clamp(0, 1)
        return kornia.color.hsv_to_rgb(torch.stack((h, s, v), 1))


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
        b, _, height, width = batch_shape
        most = self.holes[1]
        count = torch.randint(self.holes[0], most + 1, (b,))
        side = torch.randint(self.size[0], self.size[1] + 1, (b, most, 2))
        room = (torch.tensor([height, width]) - side + 1).clamp(min=1)
        corner = (torch.rand(b, most, 2) * room).long()
        return {"count": count, "side": side, "corner": corner}

    def apply_transform(self, input, params, flags, transform=None):
        device = input.device
        most = params["side"].shape[1]
        used = (torch.arange(most) < params["count"][:, None]).to(device)[..., None]   # B x n x 1
        top, left = params["corner"].to(device).unbind(-1)
        height, width = params["side"].to(device).unbind(-1)
        ys = torch.arange(input.shape[-2], device=device)
        xs = torch.arange(input.shape[-1], device=device)
        in_rows = (ys >= top[..., None]) & (ys < (top + height)[..., None]) & used       # B x n x H
        in_cols = (xs >= left[..., None]) & (xs < (left + width)[..., None])             # B x n x W
        hole = (in_rows[..., :, None] & in_cols[..., None, :]).any(1)                     # B x H x W
        return input.masked_fill(hole[:, None], 0.0)


class RandomQuarterTurn(K.RandomRotation90):
    """RandomRotation90 whose pixels move by torch.rot90.

    A quarter turn of a square window is an exact index permutation; Kornia's
    RandomRotation90 warps with grid_sample instead (resampling noise, and
    about 5x slower on the CPU). Kornia still draws `times` and builds the
    matrix, so AugmentationSequential moves masks with the same turn.
    """

    def apply_transform(self, input, params, flags, transform=None):
        turns = params["times"].round().long().remainder(4).tolist()
        return torch.stack([torch.rot90(image, k, dims=(-2, -1)) for image, k in zip(input, turns)])


# --- Steps: how an op is applied to (image, mask) ---------------------------

class _Geometric:
    """Moves the whole image (all channels) and the mask together."""

    def __init__(self, module: K.AugmentationBase2D) -> None:
        self.sequence = K.AugmentationSequential(module, data_keys=["input", "mask"])

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Batch:
        image, mask = self.sequence(image, mask)
        return image, mask


class _Photometric:
    """Changes the RGB channels only; ELA (channel 4) and the mask pass."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Batch:
        rgb = self.module(image[:, :3]).clamp(0, 1)
        if image.shape[1] == 3:
            return rgb, mask
        return torch.cat((rgb, image[:, 3:]), 1), mask


class _OneOf:
    """With probability p per image, one of `steps`, chosen uniformly per image.

    Every recipe entry runs through this gate rather than Kornia's own `p`:
    Kornia 0.9 computes an op on the whole batch and then blends by `p`, so a
    JPEG at p .3 would cost as much as at p 1; here only the chosen images
    are computed.
    """

    def __init__(self, steps: Sequence[Callable[..., Batch]], p: float) -> None:
        self.steps = tuple(steps)
        self.p = p

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Batch:
        batch = image.shape[0]
        applied = torch.rand(batch) < self.p
        choice = torch.randint(len(self.steps), (batch,))
        for k, step in enumerate(self.steps):
            chosen = applied & (choice == k)
            if chosen.all():
                return step(image, mask)
            if chosen.any():
                rows = torch.nonzero(chosen).flatten().to(image.device)
                new_image, new_mask = step(image[rows], mask[rows])
                image, mask = image.index_copy(0, rows, new_image), mask.index_copy(0, rows, new_mask)
        return image, mask


class _CopyPaste:
    """Paste a forged region from the patch bank into the window (p per image).

    Only the patch's instance pixels are pasted (its padding gives the resize
    real neighbours at the region's edge), so every pasted pixel is marked
    forged and the target mask becomes the union with the pasted region.
    """

    def __init__(self, bank: PatchBank, p: float, scale: tuple[float, float]) -> None:
        self.bank = bank
        self.p = p
        self.scale = scale

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, window_scale: torch.Tensor) -> Batch:
        if image.shape[1] != 3:
            raise ValueError(f"copy-paste pastes RGB patches; got a {image.shape[1]}-channel image "
                             "(ELA of a pasted patch is unknown)")
        batch = image.shape[0]
        applied = torch.rand(batch) < self.p
        patch_index = torch.randint(len(self.bank), (batch,))
        factor = (self.scale[0] + torch.rand(batch) * (self.scale[1] - self.scale[0])) * window_scale.cpu()
        place = torch.rand(batch, 2)
        image, mask = image.clone(), mask.clone()
        for b in torch.nonzero(applied).flatten().tolist():
            rgb, region = self.resized_patch(int(patch_index[b]), float(factor[b]),
                                             image.shape[-2:], image.device)
            h, w = region.shape
            y = int(place[b, 0] * (image.shape[-2] - h + 1))
            x = int(place[b, 1] * (image.shape[-1] - w + 1))
            window = image[b, :, y:y + h, x:x + w]
            image[b, :, y:y + h, x:x + w] = torch.where(region, rgb, window)
            mask[b, 0, y:y + h, x:x + w] = torch.maximum(mask[b, 0, y:y + h, x:x + w], region.float())
        return image, mask

    def resized_patch(self, index: int, factor: float, fit: Sequence[int],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch `index` resized by `factor` (shrunk further to fit `fit`):
        RGB 3 x h x w float in [0, 1], and its region h x w bool."""
        patch = self.bank[index]
        height, width = patch.mask.shape
        factor = min(factor, fit[0] / height, fit[1] / width)
        size = (max(1, round(height * factor)), max(1, round(width * factor)))
        rgb = torch.from_numpy(patch.rgb).to(device).permute(2, 0, 1)[None].float() / _UINT8_MAX
        region = torch.from_numpy(patch.mask).to(device)[None, None].float()
        rgb = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)
        region = F.interpolate(region, size=size, mode="nearest")
        return rgb[0].clamp(0, 1), region[0, 0] > 0.5


# --- Recipe names -> steps --------------------------------------------------

def _symmetric(limit: float, centre: float = 0.0) -> tuple[float, float]:
    return (centre - limit, centre + limit)


def _odd_kernels(kernel: tuple[int, int]) -> list[int]:
    low, high = kernel
    return [k for k in range(low, high + 1) if k % 2 == 1]


def _opencv_sigma(kernel_size: int) -> float:
    """The sigma OpenCV (and albumentations' GaussianBlur) derive from a kernel size."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def _contrast_then_brightness(contrast: tuple[float, float], shift: tuple[float, float]):
    # RandomBrightness adds (factor - 1): a shift s is the factor 1 + s.
    return _Photometric(K.ImageSequential(
        K.RandomContrast(contrast=contrast, p=1.0),
        K.RandomBrightness(brightness=(1 + shift[0], 1 + shift[1]), p=1.0),
    ))


def _hsv_range(value, unit: float) -> dict[str, tuple[float, float]]:
    """An integer limit is an additive shift in `unit`s; a tuple, a factor range."""
    if isinstance(value, (tuple, list)):
        return {"mul": tuple(value), "add": (0.0, 0.0)}
    return {"mul": (1.0, 1.0), "add": _symmetric(value / unit)}


def _hue_saturation_value(hue, saturation, value):
    sat, val = _hsv_range(saturation, _UINT8_MAX), _hsv_range(value, _UINT8_MAX)
    return [_Photometric(RandomHSV(
        hue=_symmetric(hue / _OPENCV_HUE_PER_TURN), saturation_mul=sat["mul"],
        saturation_add=sat["add"], value_mul=val["mul"], value_add=val["add"]))]


# The ops that move pixels (image and mask together); every other op is
# photometric. Tests and the loader's alignment checks select by this set.
GEOMETRIC_OPS = frozenset(("hflip", "vflip", "rot90", "affine"))

# name -> builder(**params without p) -> the op's alternatives, one chosen
# uniformly per image. Kornia modules get p=1: the gating is _build_step's.
_BUILDERS: dict[str, Callable[..., list]] = {
    "hflip": lambda: [_Geometric(K.RandomHorizontalFlip(p=1.0))],
    "vflip": lambda: [_Geometric(K.RandomVerticalFlip(p=1.0))],
    # Kornia draws `times` continuously and rounds it, which would make k = 2
    # twice as likely as 1 or 3; one alternative per k keeps k uniform.
    "rot90": lambda k: [_Geometric(RandomQuarterTurn(times=(t, t), p=1.0))
                        for t in range(k[0], k[1] + 1)],
    "affine": lambda shift, scale, rotate: [_Geometric(K.RandomAffine(
        degrees=rotate, translate=(shift, shift), scale=_symmetric(scale, 1.0),
        # zeros, not reflection: mirrored copies of content would look like
        # unlabelled copy-move forgeries
        padding_mode="zeros", p=1.0))],
    # gain x U(range) with gamma 1 is a brightness multiplication
    "brightness_mul": lambda range: [_Photometric(K.RandomGamma(gain=tuple(range), p=1.0))],
    "one_of": lambda ops: [_build_step(name, params) for name, params in ops],
    "color_jitter": lambda brightness, contrast, saturation, hue: [_Photometric(K.ColorJitter(
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=1.0))],
    "brightness_contrast": lambda brightness, contrast: [
        _contrast_then_brightness(_symmetric(contrast, 1.0), _symmetric(brightness))],
    "contrast_brightness": lambda contrast, brightness: [_contrast_then_brightness(
        tuple(contrast), (brightness[0] / _UINT8_MAX, brightness[1] / _UINT8_MAX))],
    "hue_saturation_value": _hue_saturation_value,
    # one odd kernel size per image, each with OpenCV's sigma for that size
    "gaussian_blur": lambda kernel: [
        _Photometric(K.RandomGaussianBlur(k, sigma=(_opencv_sigma(k),) * 2, p=1.0))
        for k in _odd_kernels(kernel)],
    "gaussian_noise": lambda std: [_Photometric(RandomGaussianNoiseRange(std=tuple(std)))],
    "motion_blur": lambda kernel: [_Photometric(K.RandomMotionBlur(
        kernel_size=kernel, angle=180.0, direction=1.0, border_type="reflect", p=1.0))],
    "jpeg": lambda quality: [_Photometric(K.RandomJPEG(jpeg_quality=tuple(quality), p=1.0))],
    "coarse_dropout": lambda holes, size: [
        _Photometric(RandomCoarseDropout(holes=tuple(holes), size=tuple(size)))],
}


def _build_step(name: str, params: dict) -> "_OneOf":
    """One recipe entry as a step applied with probability params["p"] (default 1)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(_BUILDERS)}")
    options = {key: value for key, value in params.items() if key != "p"}
    try:
        alternatives = _BUILDERS[name](**options)
    except TypeError as exc:
        raise ValueError(f"augmentation {name!r}: bad parameters {sorted(params)} ({exc})") from None
    return _OneOf(alternatives, params.get("p", 1.0))


# --- The augmenter ----------------------------------------------------------

class Augmenter:
    """A member's augmentation: copy-paste (if any), then the recipe's ops in order."""

    def __init__(self, steps: Sequence[Callable[..., Batch]], img_size: int,
                 copy_paste: _CopyPaste | None = None) -> None:
        self.steps = tuple(steps)
        self.copy_paste = copy_paste
        self.img_size = img_size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, seed: int,
                 window_scale: torch.Tensor | None = None) -> Batch:
        """Augmented (image, mask): image clamped to [0, 1], mask exactly 0/1.

        window_scale: float (B,), output pixels per source pixel of each
        window; copy-paste resizes patches by it (None: 1, source size).
        """
        _check_batch(image, mask, window_scale, self.img_size)
        if window_scale is None:
            window_scale = torch.ones(image.shape[0])
        cuda = []
        if image.is_cuda:
            index = image.device.index
            cuda = [torch.cuda.current_device() if index is None else index]
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(cuda[0]):
                    torch.cuda.manual_seed(seed)
            if self.copy_paste is not None:
                image, mask = self.copy_paste(image, mask, window_scale)
            for step in self.steps:
                image, mask = step(image, mask)
        return image.clamp(0, 1), (mask > 0.5).to(mask.dtype)


def _check_batch(image: torch.Tensor, mask: torch.Tensor, window_scale, img_size: int) -> None:
    if image.ndim != 4 or image.shape[1] not in (3, 4) or not image.is_floating_point():
        raise ValueError(f"image must be float B x 3|4 x H x W, got {tuple(image.shape)} {image.dtype}")
    if tuple(image.shape[2:]) != (img_size, img_size):
        raise ValueError(f"this augmenter was built for {img_size} x {img_size} windows, "
                         f"got {tuple(image.shape[2:])}")
    expected = (image.shape[0], 1, *image.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must be {expected} to match the image, got {tuple(mask.shape)}")
    if window_scale is not None and tuple(window_scale.shape) != (image.shape[0],):
        raise ValueError(f"window_scale must have shape ({image.shape[0]},), "
                         f"got {tuple(window_scale.shape)}")


def build_augmenter(recipe: Recipe, *, img_size: int,
                    patch_bank: PatchBank | None = None) -> Augmenter | None:
    """The recipe's augmenter, or None when it augments nothing.

    A recipe with copy_paste needs `patch_bank` (PatchBank.from_store).
    """
    copy_paste = None
    if recipe.copy_paste:
        if patch_bank is None:
            raise ValueError(f"member {recipe.name!r} pastes patches: pass a patch_bank "
                             "(engine.patch_bank.PatchBank.from_store)")
        if recipe.in_channels != 3:
            raise ValueError(f"member {recipe.name!r}: copy-paste needs 3 input channels, "
                             f"the recipe has {recipe.in_channels}")
        copy_paste = _CopyPaste(patch_bank, recipe.copy_paste["p"], tuple(recipe.copy_paste["scale"]))
    steps = [_build_step(name, params) for name, params in recipe.augment]
    if not steps and copy_paste is None:
        return None
    return Augmenter(steps, img_size, copy_paste)
