"""The six ensemble members as data (docs/recipes.md): one recipe object per member.

Every number of the members' table lives here (mining, metrics and the
ensemble keep their own constants in trainers/; docs/recipes.md lists all of
them). The sampler reads
`sampling` and `view`, the augmenter reads `augment`, the trainer reads the
rest. Command-line flags override fields for one run with
`dataclasses.replace`; the table itself is never edited at run time.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine import ops

# Size classes of the forged area ratio (docs/recipes.md): tiny < 0.5 %, small
# 0.5-2 %, medium 2-5 %, large 5-10 %, xlarge >= 10 % (an edge belongs to the
# larger class). size_class 0 = authentic.
SIZE_CLASS_EDGES = (0.005, 0.02, 0.05, 0.10)
SIZE_CLASS_NAMES = ("authentic", "tiny", "small", "medium", "large", "xlarge")


@dataclass(frozen=True)
class SamplingRule:
    """Which images a member trains on and how often each is drawn.

    A forged image's weight is `area_weights[k]` where k is the bin of its
    area ratio among `area_edges` (bins are [edge_{k-1}, edge_k)); a weight of
    0 excludes it. Authentic images are drawn only when they are flagged hard
    negatives and `hard_negative_weight` is set; a flagged hard false negative
    gets `hard_fn_weight` instead of its area weight. An epoch draws
    `epoch_multiplier` x the number of images with non-zero weight.
    """

    area_edges: tuple[float, ...] = ()
    area_weights: tuple[float, ...] = (1.0,)
    hard_negative_weight: float = 0.0
    hard_fn_weight: float = 0.0
    epoch_multiplier: float = 1.0

    def __post_init__(self):
        if len(self.area_weights) != len(self.area_edges) + 1:
            raise ValueError("area_weights needs one weight more than area_edges")


@dataclass(frozen=True)
class View:
    """Which window of an image becomes the model's input.

    kind:
      "random_crop": each side U(side_range) of the image's side, anywhere;
      "random_resized_crop": area fraction U(scale), aspect ratio
          log-U(ratio), anywhere (torchvision's definition);
      "around_forgery": centre = forgery centroid, side = max(bbox h, bbox w)
          x U(side_mult), at least min_side, at most the short side; a
          share `negative_share` of them, drawn per sample, is placed
          instead where the window holds no forged pixel (a window of the
          same side anywhere outside the forgery's box), so that a member
          predicting on tiles at that scale has seen windows without one;
      "whole": the whole image (validation and prediction).
    """

    kind: str
    side_range: tuple[float, float] = (1.0, 1.0)
    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    side_mult: tuple[float, float] = (2.0, 4.0)
    min_side: int = 128
    negative_share: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.negative_share < 1.0:
            raise ValueError(f"view.negative_share {self.negative_share}: a share of the "
                             "windows, at least 0 and below 1 (1 would never show a forgery)")
        if self.negative_share and self.kind != "around_forgery":
            raise ValueError(f"view.negative_share {self.negative_share}: only an "
                             f"'around_forgery' view places windows by the forgery; this view "
                             f"is {self.kind!r}")


WHOLE_IMAGE = View("whole")

# Augmentations: (name, params) pairs applied in order; each name is an entry
# of engine/ops.py. "one_of" picks one of its `ops` with probability p.
FLIPS_ROT90 = (
    ("hflip", {"p": 0.5}),
    ("vflip", {"p": 0.5}),
    ("rot90", {"p": 0.5, "k": (1, 3)}),
)
STRONG_COLOUR = ("one_of", {"p": 0.7, "ops": (
    ("color_jitter", {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.15}),
    ("brightness_contrast", {"brightness": 0.3, "contrast": 0.3}),
    ("hue_saturation_value", {"hue": 20, "saturation": 30, "value": 30}),
)})
NOISE_OR_BLUR = ("one_of", {"p": 0.3, "ops": (
    ("gaussian_noise", {"std": (0.01, 0.05)}),
    ("gaussian_blur", {"kernel": (3, 7)}),
    ("motion_blur", {"kernel": 7}),
)})


@dataclass(frozen=True)
class Recipe:
    name: str
    ensemble_role: str            # "average" or "union"
    ensemble_weight: float        # weight in the average; factor in the union
    in_channels: int              # 3 RGB, 4 RGB + ELA
    init: str                     # "imagenet" or "finetune:<member>"
    epochs: int
    lr: float
    schedule: tuple               # ("cosine", eta_min) | ("warm_restarts", T0, Tmult)
    focal_alpha: float
    focal_gamma: float
    focal_weight: float
    dice_weight: float
    select_on: str                # a metric name of trainers/metrics.py
    sampling: SamplingRule
    view: View
    augment: tuple = ()
    mining: str | None = None     # "hard_negative" | "hard_fn" | None
    early_stop: int | None = None  # epochs without improvement
    copy_paste: dict | None = None
    weight_decay: float = 1e-4
    batch_size: int = 4
    img_size: int = 512
    encoder: str = "timm-efficientnet-b2"
    grad_clip: float | None = None

    def __post_init__(self):
        ops.validate(self.name, self.augment)


_HIGHRES_SAMPLING = SamplingRule(area_edges=(0.03,), area_weights=(3.0, 1.0))
_HIGHRES_VIEW = View("random_crop", side_range=(0.7, 1.0))
_HIGHRES_AUGMENT = FLIPS_ROT90 + (("brightness_mul", {"p": 0.5, "range": (0.8, 1.2)}),)
_MINED_AREA = dict(area_edges=(0.01, 0.05), area_weights=(3.0, 2.0, 1.0))

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="highres_no_ela", ensemble_role="average", ensemble_weight=1.5,
        in_channels=3, init="imagenet", epochs=30, lr=3e-4, schedule=("cosine", 0.0),
        focal_alpha=0.75, focal_gamma=3.0, focal_weight=0.7, dice_weight=0.3,
        select_on="mean_image_mcc", sampling=_HIGHRES_SAMPLING, view=_HIGHRES_VIEW,
        augment=_HIGHRES_AUGMENT,
    ),
    Recipe(
        name="hard_negative", ensemble_role="average", ensemble_weight=1.2,
        in_channels=3, init="imagenet", epochs=30, lr=1e-4, schedule=("cosine", 1e-6),
        focal_alpha=0.25, focal_gamma=2.0, focal_weight=1.0, dice_weight=0.0,
        select_on="pooled_mcc", mining="hard_negative",
        sampling=SamplingRule(hard_negative_weight=2.0, **_MINED_AREA),
        view=View("random_resized_crop", scale=(0.7, 1.0)),
        augment=FLIPS_ROT90 + (
            ("one_of", {"p": 0.5, "ops": (
                ("color_jitter", {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1}),
                ("brightness_contrast", {"brightness": 0.2, "contrast": 0.2}),
            )}),
            ("gaussian_blur", {"p": 0.2, "kernel": (3, 5)}),
        ),
    ),
    Recipe(
        name="high_recall", ensemble_role="average", ensemble_weight=1.0,
        in_channels=3, init="finetune:highres_no_ela", epochs=30, lr=1e-4,
        schedule=("cosine", 1e-6), focal_alpha=0.5, focal_gamma=2.5, focal_weight=1.0,
        dice_weight=0.0, select_on="recall_dice", mining="hard_fn",
        sampling=SamplingRule(hard_fn_weight=5.0, **_MINED_AREA),
        view=View("random_resized_crop", scale=(0.6, 1.0)),
        augment=FLIPS_ROT90 + (
            ("affine", {"p": 0.5, "shift": 0.15, "scale": 0.25, "rotate": 45}),
            STRONG_COLOUR, NOISE_OR_BLUR,
        ),
    ),
    Recipe(
        name="enhanced_aug", ensemble_role="average", ensemble_weight=0.8,
        in_channels=3, init="imagenet", epochs=30, lr=1e-4, schedule=("cosine", 1e-6),
        focal_alpha=0.25, focal_gamma=2.0, focal_weight=1.0, dice_weight=0.0,
        select_on="pooled_mcc", sampling=SamplingRule(),
        view=View("random_resized_crop", scale=(0.7, 1.0)),
        copy_paste={"p": 0.3, "min_side": 20, "max_patches": 500, "padding": 5,
                    "scale": (0.5, 1.5)},
        augment=FLIPS_ROT90 + (
            ("affine", {"p": 0.5, "shift": 0.1, "scale": 0.2, "rotate": 30}),
            STRONG_COLOUR, NOISE_OR_BLUR,
            ("jpeg", {"p": 0.3, "quality": (70, 100)}),
            ("coarse_dropout", {"p": 0.2, "holes": (1, 8), "size": (16, 32)}),
        ),
    ),
    Recipe(
        name="comprehensive", ensemble_role="average", ensemble_weight=0.5,
        in_channels=4, init="imagenet", epochs=30, lr=3e-4, schedule=("cosine", 0.0),
        focal_alpha=0.75, focal_gamma=3.0, focal_weight=0.7, dice_weight=0.3,
        select_on="mean_image_mcc", sampling=_HIGHRES_SAMPLING, view=_HIGHRES_VIEW,
        augment=_HIGHRES_AUGMENT,
    ),
    Recipe(
        name="small_specialist", ensemble_role="union", ensemble_weight=0.8,
        in_channels=3, init="imagenet", epochs=40, early_stop=10, lr=1e-4,
        schedule=("warm_restarts", 10, 2), focal_alpha=0.85, focal_gamma=4.0,
        focal_weight=0.8, dice_weight=0.2, select_on="mean_image_recall",
        sampling=SamplingRule(area_edges=(0.005, 0.02), area_weights=(5.0, 2.0, 0.0),
                              epoch_multiplier=2.0),
        # negative_share 0.5 with epoch_multiplier 2: each forged image gives on
        # average one window around its forgery an epoch, as a multiplier of 1
        # without negatives would, and one window of the same scale without it
        # (docs/recipes.md, "The specialist's view").
        view=View("around_forgery", side_mult=(2.0, 4.0), min_side=128, negative_share=0.5),
        augment=FLIPS_ROT90 + (
            ("contrast_brightness", {"p": 0.5, "contrast": (0.7, 1.3), "brightness": (-20, 20)}),
            ("hue_saturation_value", {"p": 0.3, "hue": 10, "saturation": (0.8, 1.2),
                                      "value": (0.8, 1.2)}),
            ("gaussian_blur", {"p": 0.2, "kernel": (3, 5)}),
            ("jpeg", {"p": 0.3, "quality": (70, 95)}),
        ),
    ),
)}

ENSEMBLE_AVERAGE = tuple(n for n, r in RECIPES.items() if r.ensemble_role == "average")
ENSEMBLE_UNION = tuple(n for n, r in RECIPES.items() if r.ensemble_role == "union")
# The member whose checkpoint mines for the recipes with `mining` (trainers/mining.py);
# here, without torch, for trainers/run_ensemble.py's training order.
MINING_MEMBER = "highres_no_ela"


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown member {name!r}; the members are: {', '.join(RECIPES)}"
        ) from None
