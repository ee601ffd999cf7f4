"""Losses against their direct formulas, metrics against independent ones."""
import numpy as np
import pytest
import torch

from engine.recipes import RECIPES
from trainers.losses import MemberLoss
from trainers.metrics import (SELECTION_METRICS, check_metric_name, dice, mcc, pixel_counts,
                              recall, summarize)


def direct_focal(logits, mask, alpha, gamma):
    p = torch.sigmoid(logits.double())
    t = mask.double()
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    return (-a_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()


def direct_dice(logits, mask):
    p = torch.sigmoid(logits.double())
    t = mask.double()
    return 1 - 2 * (p * t).sum() / (p.sum() + t.sum())


def random_batch(seed, shape=(3, 1, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    mask = (torch.rand(shape, generator=g) < 0.3).float()
    return logits, mask


@pytest.mark.parametrize("member", list(RECIPES))
def test_member_loss_is_weighted_focal_plus_dice(member):
    recipe = RECIPES[member]
    logits, mask = random_batch(1)
    expected = (recipe.focal_weight * direct_focal(logits, mask, recipe.focal_alpha, recipe.focal_gamma)
                + recipe.dice_weight * direct_dice(logits, mask))
    assert MemberLoss(recipe)(logits, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dice_term_is_zero_on_a_batch_without_forged_pixels():
    recipe = RECIPES["highres_no_ela"]   # 0.7 focal + 0.3 dice
    logits, _ = random_batch(2)
    empty = torch.zeros_like(logits)
    focal_only = recipe.focal_weight * direct_focal(logits, empty, recipe.focal_alpha, recipe.focal_gamma)
    assert MemberLoss(recipe)(logits, empty).item() == pytest.approx(focal_only.item(), rel=1e-5)


def test_loss_falls_as_logits_agree_with_the_mask():
    recipe = RECIPES["small_specialist"]
    _, mask = random_batch(3)
    loss = MemberLoss(recipe)
    assert loss((mask * 2 - 1) * 4, mask) < loss(torch.zeros_like(mask), mask) < loss((1 - 2 * mask) * 4, mask)


def test_pixel_counts_of_a_known_image():
    mask = torch.tensor([[[[1, 1], [0, 0]]]], dtype=torch.float32)
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]])
    np.testing.assert_array_equal(pixel_counts(logits, mask), [[1, 1, 1, 1]])


def test_mcc_equals_the_correlation_of_the_binary_masks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth = rng.random(200) < 0.3
        pred = truth ^ (rng.random(200) < 0.2)
        counts = np.array([[np.sum(pred & truth), np.sum(pred & ~truth), np.sum(~pred & truth),
                            np.sum(~pred & ~truth)]])
        assert mcc(counts)[0] == pytest.approx(np.corrcoef(pred, truth)[0, 1])


def test_degenerate_images():
    # tp, fp, fn, tn: empty truth and prediction; empty truth with false positives
    counts = np.array([[0, 0, 0, 100], [0, 5, 0, 95], [10, 0, 0, 90]])
    np.testing.assert_allclose(mcc(counts), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(dice(counts), [1.0, 0.0, 1.0])
    assert np.isnan(recall(counts)[0]) and recall(counts)[2] == 1.0


def test_summary_per_image_versus_pooled():
    # image 0: small forgery found half; image 1: large forgery found entirely
    counts = np.array([[1, 0, 1, 98], [50, 0, 0, 50]])
    out = summarize(counts)
    assert out["mean_image_recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["pooled_recall"] == pytest.approx(51 / 52)
    assert out["pooled_dice"] == pytest.approx(2 * 51 / (2 * 51 + 1))
    assert out["mean_image_dice"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert out["recall_dice"] == pytest.approx(0.6 * out["pooled_recall"] + 0.4 * out["pooled_dice"])
    assert set(SELECTION_METRICS) <= set(out)


def test_every_recipe_selects_on_a_known_metric():
    for recipe in RECIPES.values():
        assert check_metric_name(recipe.select_on) == recipe.select_on
    with pytest.raises(ValueError, match="'f1'"):
        check_metric_name("f1")
