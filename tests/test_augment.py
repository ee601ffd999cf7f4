"""engine/augment.py and engine/patch_bank.py: alignment, channels, seeds, copy-paste."""
from dataclasses import replace

import kornia.augmentation as K
import numpy as np
import pytest
import torch
import zarr

from engine.augment import GEOMETRIC_OPS, RandomQuarterTurn, build_augmenter
from engine.patch_bank import Patch, PatchBank
from engine.recipes import RECIPES
from engine.store import create_pixels, image_path, instances_mask_path, open_store, read_meta

SIZE = 96
GREEN = torch.tensor([0.0, 1.0, 0.0])


def forced(augment):
    """The augment table with every probability set to 1."""
    out = []
    for name, params in augment:
        params = {**params, "p": 1.0}
        if name == "one_of":
            params["ops"] = forced(params["ops"])
        out.append((name, params))
    return tuple(out)


def ops_used():
    """Every (name, params) form the recipes use, one_of members included, once each."""
    seen = {}

    def visit(augment):
        for name, params in augment:
            if name == "one_of":
                visit(params["ops"])
            seen.setdefault((name, repr(sorted(params.items()))), (name, params))

    for recipe in RECIPES.values():
        visit(recipe.augment)
    visit((("one_of", {"p": 0.5, "ops": (("hflip", {}), ("vflip", {}))}),))
    return list(seen.values())


OPS = ops_used()


def op_augmenter(name, params, img_size=SIZE):
    recipe = replace(RECIPES["high_recall"], augment=forced(((name, params),)), copy_paste=None)
    return build_augmenter(recipe, img_size=img_size)


def green_square_batch(batch=4, channels=3, seed=0):
    """Textured background without green, one pure-green square per image off
    the centre (so flips and rotations move it); mask = the square."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.uniform(0.1, 0.9, (batch, channels, SIZE, SIZE))).float()
    image[:, 1] = 0.0
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    for b in range(batch):
        y, x = (int(v) for v in rng.integers(18, 34, 2))
        image[b, :3, y:y + 30, x:x + 26] = GREEN[:, None, None]
        mask[b, 0, y:y + 30, x:x + 26] = 1.0
    return image, mask


def iou(a, b):
    union = (a | b).sum().item()
    assert union > 0, "both regions are empty: nothing was checked"
    return (a & b).sum().item() / union


@pytest.mark.parametrize("member", list(RECIPES))
def test_member_keeps_mask_on_marker_channel(member):
    # The 4th channel carries the mask as a marker: geometric ops move it with
    # the image, photometric ops leave it, so it must still match the mask.
    recipe = replace(RECIPES[member], augment=forced(RECIPES[member].augment), copy_paste=None)
    augmenter = build_augmenter(recipe, img_size=SIZE)
    image, mask = green_square_batch(channels=4)
    image[:, 3] = mask[:, 0]
    out, out_mask = augmenter(image, mask, seed=7)
    assert not torch.equal(out[:, :3], image[:, :3])
    for b in range(len(out)):
        assert iou(out[b, 3] > 0.5, out_mask[b, 0] > 0.5) > 0.9


@pytest.mark.parametrize("member", list(RECIPES))
def test_member_geometry_keeps_mask_on_green_square(member):
    geometric = tuple(op for op in RECIPES[member].augment if op[0] in GEOMETRIC_OPS)
    recipe = replace(RECIPES[member], augment=forced(geometric), copy_paste=None)
    image, mask = green_square_batch(batch=6)
    out, out_mask = build_augmenter(recipe, img_size=SIZE)(image, mask, seed=2)
    for b in range(len(out)):
        assert iou(out[b, 1] > 0.5, out_mask[b, 0] > 0.5) > 0.9


@pytest.mark.parametrize("name,params", [op for op in OPS if op[0] in GEOMETRIC_OPS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_geometric_op_moves_image_and_mask_together(name, params):
    image, mask = green_square_batch()
    out, out_mask = op_augmenter(name, params)(image, mask, seed=3)
    assert not torch.equal(out_mask, mask)
    assert torch.equal(out_mask, (out_mask > 0.5).float())
    for b in range(len(out)):
        assert iou(out[b, 1] > 0.5, out_mask[b, 0] > 0.5) > 0.9


@pytest.mark.parametrize("name,params", [op for op in OPS if op[0] not in GEOMETRIC_OPS | {"one_of"}],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_photometric_op_changes_rgb_only(name, params):
    image, mask = green_square_batch(channels=4)
    out, out_mask = op_augmenter(name, params)(image, mask, seed=3)
    changed = (out[:, :3] - image[:, :3]).abs().amax(dim=(1, 2, 3))
    assert (changed > 0.01).all(), f"{name} left an image unchanged"
    assert torch.equal(out[:, 3], image[:, 3])
    assert torch.equal(out_mask, mask)
    assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_quarter_turn_matches_kornia_rotation(turns):
    image = torch.rand(2, 4, 32, 32)
    exact = RandomQuarterTurn(times=(turns, turns), p=1.0)(image)
    warped = K.RandomRotation90(times=(turns, turns), p=1.0)(image)
    assert torch.allclose(exact, warped, atol=1e-5)
    assert not torch.allclose(exact, image)


def test_coarse_dropout_blanks_1_to_8_holes_of_16_to_32_px():
    image = torch.rand(16, 3, SIZE, SIZE) * 0.9 + 0.1
    out, _ = op_augmenter("coarse_dropout", {"holes": (1, 8), "size": (16, 32)})(
        image, torch.zeros(16, 1, SIZE, SIZE), seed=0)
    blank = (out == 0).all(1).sum(dim=(1, 2))
    assert (blank >= 16 * 16).all() and (blank <= 8 * 32 * 32).all()
    assert len(set(blank.tolist())) > 1


def test_hsv_integer_limits_are_opencv_units():
    # value 30 on OpenCV's 0-255 scale: V moves by at most 30/255, and does move
    grey = torch.full((8, 3, SIZE, SIZE), 0.5)
    out, _ = op_augmenter("hue_saturation_value", {"hue": 0, "saturation": 0, "value": 30})(
        grey, torch.zeros(8, 1, SIZE, SIZE), seed=0)
    shift = (out - grey).abs().amax(dim=(1, 2, 3))
    assert (shift <= 30 / 255 + 1e-5).all() and shift.max() > 10 / 255


def test_one_of_picks_per_image():
    image, mask = green_square_batch(batch=16)
    one_of = ("one_of", {"p": 1.0, "ops": (("hflip", {}), ("vflip", {}))})
    _, out_mask = op_augmenter(*one_of)(image, mask, seed=5)
    hflipped = [torch.equal(out_mask[b], mask[b].flip(-1)) for b in range(16)]
    vflipped = [torch.equal(out_mask[b], mask[b].flip(-2)) for b in range(16)]
    assert all(h != v for h, v in zip(hflipped, vflipped))
    assert 0 < sum(hflipped) < 16


def test_same_seed_same_batch_and_caller_rng_untouched():
    augmenter = build_augmenter(RECIPES["high_recall"], img_size=SIZE)
    image, mask = green_square_batch(batch=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = augmenter(image, mask, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    again = augmenter(image, mask, seed=11)
    other = augmenter(image, mask, seed=12)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_no_augmentation_gives_none():
    recipe = replace(RECIPES["highres_no_ela"], augment=())
    assert build_augmenter(recipe, img_size=SIZE) is None


def test_bad_input_is_named():
    augmenter = build_augmenter(RECIPES["highres_no_ela"], img_size=SIZE)
    image, mask = green_square_batch()
    with pytest.raises(ValueError, match="mask must be"):
        augmenter(image, mask[:, :, :-1], seed=0)
    with pytest.raises(ValueError, match="built for 64 x 64"):
        build_augmenter(RECIPES["highres_no_ela"], img_size=64)(image, mask, seed=0)
    with pytest.raises(ValueError, match="unknown augmentation 'sharpen'"):
        build_augmenter(replace(RECIPES["highres_no_ela"], augment=(("sharpen", {}),)), img_size=SIZE)
    with pytest.raises(ValueError, match="patch_bank"):
        build_augmenter(RECIPES["enhanced_aug"], img_size=SIZE)


# --- copy-paste -------------------------------------------------------------

PATCH_COLOUR = (10, 200, 30)


def one_patch_bank(height=20, width=30):
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = PATCH_COLOUR
    mask = np.zeros((height, width), np.uint8)
    mask[2:-2, 2:-2] = 1           # the padding around the region is not pasted
    return PatchBank([Patch(rgb=rgb, mask=mask, row=0, instance=0)])


def copy_paste_augmenter(bank, scale=(1.0, 1.0)):
    recipe = replace(RECIPES["enhanced_aug"], augment=(),
                     copy_paste={**RECIPES["enhanced_aug"].copy_paste, "p": 1.0, "scale": scale})
    return build_augmenter(recipe, img_size=SIZE, patch_bank=bank)


@pytest.mark.parametrize("window_scale", [0.5, 1.0, 2.0])
def test_copy_paste_pastes_region_into_image_and_mask(window_scale):
    image = torch.rand(4, 3, SIZE, SIZE) * 0.02           # nothing like the patch colour
    mask = torch.zeros(4, 1, SIZE, SIZE)
    mask[:, :, :4, :4] = 1.0                               # an existing forgery stays marked
    out, out_mask = copy_paste_augmenter(one_patch_bank())(
        image, mask, seed=1, window_scale=torch.full((4,), window_scale))
    colour = torch.tensor(PATCH_COLOUR, dtype=torch.float32)[:, None] / 255
    expected_side = (round(16 * window_scale), round(26 * window_scale))
    for b in range(4):
        new = (out_mask[b, 0] > 0.5) & (mask[b, 0] < 0.5)
        pasted = (out[b] - image[b]).abs().amax(0) > 0
        assert torch.equal(new, pasted & (mask[b, 0] < 0.5))
        ys, xs = torch.nonzero(new, as_tuple=True)
        side = (int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1)
        assert abs(side[0] - expected_side[0]) <= 1 and abs(side[1] - expected_side[1]) <= 1
        assert new.sum().item() == side[0] * side[1]       # the region is a full rectangle
        assert torch.allclose(out[b][:, new], colour.expand(3, int(new.sum())), atol=1e-5)
        assert (out_mask[b, 0, :4, :4] == 1).all()


def test_copy_paste_shrinks_a_patch_larger_than_the_window():
    # 20 x 30 patch at 10x would be 200 x 300: shrunk to 64 x 96 to fit SIZE = 96
    _, out_mask = copy_paste_augmenter(one_patch_bank())(
        torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, 1, SIZE, SIZE), seed=0,
        window_scale=torch.full((2,), 10.0))
    for b in range(2):
        ys, xs = torch.nonzero(out_mask[b, 0], as_tuple=True)
        assert int(xs.max() - xs.min()) + 1 == round(26 * SIZE / 30)
        assert int(ys.max() - ys.min()) + 1 == round(16 * SIZE / 30)


def test_copy_paste_at_unit_scale_pastes_the_patch_pixels():
    rng = np.random.default_rng(2)
    patch = Patch(rgb=rng.integers(0, 256, (24, 18, 3), dtype=np.uint8),
                  mask=(rng.random((24, 18)) > 0.4).astype(np.uint8), row=0, instance=0)
    image = torch.zeros(2, 3, SIZE, SIZE)
    out, out_mask = copy_paste_augmenter(PatchBank([patch]))(
        image, torch.zeros(2, 1, SIZE, SIZE), seed=3, window_scale=torch.ones(2))
    region = torch.from_numpy(patch.mask).bool()
    expected = torch.from_numpy(patch.rgb).permute(2, 0, 1).float()[:, region] / 255
    for b in range(2):
        new = out_mask[b, 0] > 0.5
        assert int(new.sum()) == int(region.sum())
        assert torch.allclose(out[b][:, new], expected, atol=1e-6)   # row-major order on both sides


def test_copy_paste_draws_scale_and_place_from_seed():
    augmenter = copy_paste_augmenter(one_patch_bank(), scale=(0.5, 1.5))
    image, mask = torch.zeros(8, 3, SIZE, SIZE), torch.zeros(8, 1, SIZE, SIZE)
    first = augmenter(image, mask, seed=4, window_scale=torch.ones(8))[1]
    assert torch.equal(first, augmenter(image, mask, seed=4, window_scale=torch.ones(8))[1])
    areas = first.sum(dim=(1, 2, 3))
    assert len(set(areas.tolist())) > 1                    # sizes vary with U(.5, 1.5)
    assert (areas < first[0].numel()).all()


def test_copy_paste_refuses_ela_channel():
    augmenter = copy_paste_augmenter(one_patch_bank())
    with pytest.raises(ValueError, match="4-channel"):
        augmenter(torch.zeros(2, 4, SIZE, SIZE), torch.zeros(2, 1, SIZE, SIZE), seed=0)


# --- patch bank from a store ------------------------------------------------

# (row, bbox y0 x0 y1 x1) of each instance; image sizes below. Rows 0 and 1
# are the training rows given to the bank; row 2 is not.
INSTANCES = [(0, (10, 10, 40, 40)), (0, (50, 5, 60, 45)), (1, (2, 70, 27, 95)), (2, (5, 5, 45, 45))]
HEIGHT, WIDTH = 64, 96


@pytest.fixture
def tiny_store(tmp_path):
    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    rng = np.random.default_rng(0)
    starts = [0, 2, 3, 4]
    for row in range(3):
        create_pixels(group, image_path(row, 0), rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
        layers = [bbox for r, bbox in INSTANCES if r == row]
        stack = np.zeros((len(layers), HEIGHT, WIDTH), np.uint8)
        for k, (y0, x0, y1, x1) in enumerate(layers):
            stack[k, y0:y1, x0:x1] = rng.integers(0, 2, (y1 - y0, x1 - x0))
            stack[k, y0, x0] = stack[k, y1 - 1, x1 - 1] = 1
        create_pixels(group, instances_mask_path(row), stack)
    group.create_array("instances/image_row", data=np.array([r for r, _ in INSTANCES], np.int32))
    group.create_array("instances/bbox", data=np.array([b for _, b in INSTANCES], np.int32))
    meta = {"height": np.full(3, HEIGHT, np.int32), "width": np.full(3, WIDTH, np.int32),
            "instance_start": np.array(starts, np.int64)}
    return group, meta


def test_patch_bank_keeps_large_train_instances_with_padding(tiny_store):
    group, meta = tiny_store
    bank = PatchBank.from_store(group, meta, [0, 1], min_side=20, max_patches=500, padding=5, seed=0)
    # instance 1 is 10 px high and row 2 is not a training row
    assert [p.instance for p in bank.patches] == [0, 2]
    for patch in bank.patches:
        y0, x0, y1, x1 = INSTANCES[patch.instance][1]
        window = (max(0, y0 - 5), max(0, x0 - 5), min(HEIGHT, y1 + 5), min(WIDTH, x1 + 5))
        assert patch.rgb.shape == (window[2] - window[0], window[3] - window[1], 3)
        image = np.asarray(group[image_path(patch.row, 0)][...])
        layer = patch.instance - meta["instance_start"][patch.row]
        instance_mask = np.asarray(group[instances_mask_path(patch.row)][layer])
        np.testing.assert_array_equal(patch.rgb, image[window[0]:window[2], window[1]:window[3]])
        np.testing.assert_array_equal(patch.mask, instance_mask[window[0]:window[2], window[1]:window[3]])
    assert bank[1].rgb.shape[:2] == (27 + 5, 96 - 65)       # clipped at the top and right edges


def test_patch_bank_caps_count_with_seed(tiny_store):
    group, meta = tiny_store
    picks = {seed: [p.instance for p in PatchBank.from_store(
        group, meta, [0, 1, 2], min_side=20, max_patches=2, padding=0, seed=seed).patches]
        for seed in range(6)}
    assert all(len(p) == 2 for p in picks.values())
    assert picks[0] == [p.instance for p in PatchBank.from_store(
        group, meta, [0, 1, 2], min_side=20, max_patches=2, padding=0, seed=0).patches]
    assert len({tuple(p) for p in picks.values()}) > 1


def test_patch_bank_from_demo_store(demo_store):
    group = open_store(demo_store)
    meta = read_meta(group)
    rows = np.flatnonzero((meta["split"] == 0) & (meta["label"] == 1))
    bank = PatchBank.from_store(group, meta, rows, min_side=20, max_patches=5, padding=5, seed=1)
    again = PatchBank.from_store(group, meta, rows, min_side=20, max_patches=5, padding=5, seed=1)
    assert [p.instance for p in bank.patches] == [p.instance for p in again.patches]
    bboxes = np.asarray(group["instances/bbox"][...])
    for patch in bank.patches:
        y0, x0, y1, x1 = bboxes[patch.instance]
        assert patch.row in rows and min(y1 - y0, x1 - x0) >= 20
        assert patch.mask.any() and patch.rgb.shape[:2] == patch.mask.shape
        assert patch.rgb.shape[0] <= y1 - y0 + 10 and patch.rgb.shape[1] <= x1 - x0 + 10


def test_patch_bank_refuses_empty(tiny_store):
    group, meta = tiny_store
    with pytest.raises(ValueError, match="both sides >= 50"):
        PatchBank.from_store(group, meta, [0, 1], min_side=50, max_patches=500, padding=5, seed=0)
