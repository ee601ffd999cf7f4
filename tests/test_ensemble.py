"""Ensemble arithmetic, model inputs, TTA and post-processing, with tiny stand-in models."""
import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from engine import loader
from engine.recipes import ENSEMBLE_AVERAGE, RECIPES, get_recipe
from trainers import ensemble as ensemble_module
from trainers.checkpoint import CheckpointError
from trainers.ensemble import (
    IMAGENET_MEAN, IMAGENET_STD, MODES, Ensemble, Member, PostProcess, combine, instances,
    member_probabilities, model_input,
)


def constant(value):
    return torch.full((1, 1, 2, 2), value)


def test_union_arithmetic_of_the_users_document():
    # docs/recipes.md, "Ensemble": main ensemble 0.3, specialist 0.9 -> max(0.3, 0.72) = 0.72
    probs = {name: constant(0.3) for name in ENSEMBLE_AVERAGE}
    probs["small_specialist"] = constant(0.9)
    assert torch.allclose(combine(probs, RECIPES), constant(0.72))
    probs["small_specialist"] = constant(0.2)          # 0.16 < 0.3: the average stands
    assert torch.allclose(combine(probs, RECIPES), constant(0.3))


def test_average_uses_the_recipe_weights_of_the_members_present():
    values = {name: float(k) / 10 for k, name in enumerate(ENSEMBLE_AVERAGE)}
    weights = {name: RECIPES[name].ensemble_weight for name in ENSEMBLE_AVERAGE}
    expected = sum(weights[n] * values[n] for n in values) / sum(weights.values())
    result = combine({n: constant(v) for n, v in values.items()}, RECIPES)
    assert torch.allclose(result, constant(expected))
    # A subset is renormalised: highres_no_ela (1.5) at 1, comprehensive (0.5) at 0.
    subset = combine({"highres_no_ela": constant(1.0), "comprehensive": constant(0.0)}, RECIPES)
    assert torch.allclose(subset, constant(0.75))


def test_specialist_alone_is_scaled_by_its_factor():
    assert torch.allclose(combine({"small_specialist": constant(0.5)}, RECIPES), constant(0.4))


def test_prediction_normalises_as_training_does():
    # ensemble.py takes timm's constants to avoid importing the loader (DALI, Numba, Kornia)
    assert (IMAGENET_MEAN, IMAGENET_STD) == (loader.IMAGENET_MEAN, loader.IMAGENET_STD)


def test_model_input_normalises_rgb_and_scales_ela():
    rgb = np.empty((30, 50, 3), np.uint8)
    rgb[:] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    ela = np.full((30, 50), 255, np.uint8)
    x = model_input([rgb, rgb], [ela, ela], 16)
    assert x.shape == (2, 4, 16, 16) and x.dtype == torch.float32
    assert x[:, :3].abs().max() < 0.01                 # the mean maps to zero
    assert torch.allclose(x[:, 3], torch.ones(2, 16, 16))
    assert model_input([rgb], None, 16).shape == (1, 3, 16, 16)


def test_tta_undoes_each_flip():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    # A 1x1 convolution commutes with flips, so undoing each flip gives back
    # the plain prediction exactly; a flip left in place would not.
    pointwise = nn.Conv2d(3, 1, 1)
    plain = member_probabilities(pointwise, x, tta=False)
    assert torch.allclose(member_probabilities(pointwise, x, tta=True), plain, atol=1e-6)
    conv = nn.Conv2d(3, 1, 3, padding=1)
    expected = (torch.sigmoid(conv(x)) + torch.sigmoid(conv(x.flip(3))).flip(3)
                + torch.sigmoid(conv(x.flip(2))).flip(2)) / 3
    assert torch.allclose(member_probabilities(conv, x, tta=True), expected, atol=1e-6)
    assert not torch.allclose(expected, torch.sigmoid(conv(x)), atol=1e-3)


def stand_in(name, img_size, seed):
    recipe = replace(get_recipe(name), img_size=img_size)
    generator = torch.Generator().manual_seed(seed)
    model = nn.Conv2d(recipe.in_channels, 1, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(model.weight.shape, generator=generator))
    return Member(name, model, recipe)


def test_members_of_different_sizes_meet_at_the_largest():
    ensemble = Ensemble([stand_in("highres_no_ela", 16, 0), stand_in("comprehensive", 24, 1)])
    assert ensemble.size == 24 and ensemble.needs_ela
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(3)]
    elas = [rng.integers(0, 256, (40, 30), dtype=np.uint8) for _ in range(3)]
    probs = ensemble.probabilities(images, elas)
    assert {k: tuple(v.shape) for k, v in probs.whole.items()} == {
        "highres_no_ela": (3, 1, 24, 24), "comprehensive": (3, 1, 24, 24)}
    assert not probs.tiled and [f.shape for f in ensemble.combine(probs)] == [(40, 30)] * 3
    with pytest.raises(ValueError, match="ELA"):
        ensemble.probabilities(images, None)


def test_missing_checkpoints_are_all_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"high_recall_best\.pth \(or high_recall\.safetensors\)"
                                              r".*small_specialist_best\.pth"):
        Ensemble.load(tmp_path, ("high_recall", "small_specialist"))
    with pytest.raises(ValueError, match="unknown member 'nope'"):
        Ensemble.load(tmp_path, ("nope",))
    with pytest.raises(ValueError, match="listed twice"):
        Ensemble.load(tmp_path, ("comprehensive", "comprehensive"))


def square(prob, y, x, side, value):
    prob[y:y + side, x:x + side] = value


def test_threshold_keeps_only_pixels_above_it():
    prob = np.zeros((512, 512), np.float32)
    square(prob, 10, 10, 20, 0.66)
    square(prob, 100, 100, 20, 0.64)
    found = instances(prob, MODES["default"])
    assert len(found) == 1 and found[0][10:30, 10:30].all() and found[0].sum() == 400


def test_min_area_is_scaled_from_512_to_the_image():
    post = PostProcess(0.5, 50)
    assert post.min_area_at(512, 512) == 50
    assert post.min_area_at(1024, 1024) == 200
    big = np.zeros((1024, 1024), np.float32)
    big[0, :199] = 1.0                                 # 199 px: below 200
    big[10, :200] = 1.0                                # 200 px: kept
    assert [m.sum() for m in instances(big, post)] == [200]
    small = np.zeros((256, 256), np.float32)           # 50 px at 512 -> 12.5 here
    small[0, :12] = 1.0
    small[10, :13] = 1.0
    assert [m.sum() for m in instances(small, post)] == [13]


def test_connected_components_become_instances():
    prob = np.zeros((64, 64), np.float32)
    square(prob, 0, 0, 10, 0.9)
    square(prob, 10, 10, 10, 0.9)                      # touches the first at a corner only
    square(prob, 40, 40, 10, 0.9)
    found = instances(prob, PostProcess(0.5, 0))
    assert len(found) == 2                             # corner contact joins (8-connectivity)
    assert sorted(m.sum() for m in found) == [100, 200]
    assert not (found[0] & found[1]).any()
    assert instances(np.zeros((64, 64), np.float32), PostProcess(0.5, 0)) == []


@pytest.mark.parametrize("threshold, min_area", [(0.0, 10), (1.0, 10), (0.5, -1)])
def test_bad_postprocess_settings_are_refused(threshold, min_area):
    with pytest.raises(ValueError):
        PostProcess(threshold, min_area)


def test_every_forward_runs_under_the_devices_autocast_and_gives_float32(monkeypatch):
    entered, inside = [], []

    @contextlib.contextmanager
    def recording_autocast(device):
        entered.append(torch.device(device))
        inside.append(True)
        yield
        inside.pop()

    class HalfPrecision(nn.Module):
        """Records whether autocast is on, and answers in bf16 as autocast would."""

        def __init__(self):
            super().__init__()
            self.under_autocast = []

        def forward(self, x):
            self.under_autocast.append(bool(inside))
            return x[:, :1].to(torch.bfloat16)

    monkeypatch.setattr(ensemble_module, "autocast", recording_autocast)
    model = HalfPrecision()
    prob = member_probabilities(model, torch.zeros(2, 3, 4, 4), tta=True)
    assert model.under_autocast == [True, True, True]        # plain and both flips
    assert entered == [torch.device("cpu")] * 3
    assert prob.dtype == torch.float32 and torch.allclose(prob, torch.full_like(prob, 0.5))
