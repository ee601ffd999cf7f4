"""engine/augment.py (the dali backend's batch geometry), engine/ops.py (the
registry, recipe validation) and engine/patch_bank.py (bank, copy-paste)."""
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import zarr

from engine import ops
from engine.augment import GEOMETRIC_OPS, apply_geometry
from engine.loader import make_loader
from engine.patch_bank import Patch, PatchBank
from engine.photometric import is_photometric
from engine.recipes import RECIPES
from engine.store import PER_IMAGE_LAYOUT, create_pixels, image_path, instances_mask_path, open_store, read_meta

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


def augmented(augment, image, mask, seed):
    """The dali backend's batch step on (image, mask): the geometry each
    sample b draws from (seed, b), as the reader worker draws it."""
    entries = ops.geometric_entries(augment)
    geometry = np.stack([ops.draw_geometry(entries, np.random.default_rng((seed, b)), image.shape[-1])
                         for b in range(len(image))])
    return apply_geometry(image.clone(), mask.clone(), torch.from_numpy(geometry))


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
    # the image, photometric ops are not applied here, so it must still match the mask.
    image, mask = green_square_batch(channels=4)
    image[:, 3] = mask[:, 0]
    out, out_mask = augmented(forced(RECIPES[member].augment), image, mask, seed=7)
    assert not torch.equal(out[:, :3], image[:, :3])
    for b in range(len(out)):
        assert iou(out[b, 3] > 0.5, out_mask[b, 0] > 0.5) > 0.9


@pytest.mark.parametrize("member", list(RECIPES))
def test_member_geometry_keeps_mask_on_green_square(member):
    geometric = tuple(op for op in RECIPES[member].augment if op[0] in GEOMETRIC_OPS)
    image, mask = green_square_batch(batch=6)
    out, out_mask = augmented(forced(geometric), image, mask, seed=2)
    for b in range(len(out)):
        assert iou(out[b, 1] > 0.5, out_mask[b, 0] > 0.5) > 0.9


@pytest.mark.parametrize("name,params", [op for op in OPS if op[0] in GEOMETRIC_OPS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_geometric_op_moves_image_and_mask_together(name, params):
    image, mask = green_square_batch()
    out, out_mask = augmented(forced(((name, params),)), image, mask, seed=3)
    assert not torch.equal(out_mask, mask)
    assert torch.equal(out_mask, (out_mask > 0.5).float())
    for b in range(len(out)):
        assert iou(out[b, 1] > 0.5, out_mask[b, 0] > 0.5) > 0.9


def test_coarse_dropout_blanks_1_to_8_holes_of_16_to_32_px():
    image = torch.rand(16, 3, SIZE, SIZE) * 0.9 + 0.1
    out, _ = augmented((("coarse_dropout", {"holes": (1, 8), "size": (16, 32)}),),
                       image, torch.zeros(16, 1, SIZE, SIZE), seed=0)
    blank = (out == 0).all(1).sum(dim=(1, 2))
    assert (blank >= 16 * 16).all() and (blank <= 8 * 32 * 32).all()
    assert len(set(blank.tolist())) > 1


def test_one_of_picks_per_image():
    image, mask = green_square_batch(batch=16)
    one_of = ("one_of", {"p": 1.0, "ops": (("hflip", {}), ("vflip", {}))})
    _, out_mask = augmented((one_of,), image, mask, seed=5)
    hflipped = [torch.equal(out_mask[b], mask[b].flip(-1)) for b in range(16)]
    vflipped = [torch.equal(out_mask[b], mask[b].flip(-2)) for b in range(16)]
    assert all(h != v for h, v in zip(hflipped, vflipped))
    assert 0 < sum(hflipped) < 16


def test_same_seed_same_batch_and_caller_rng_untouched():
    image, mask = green_square_batch(batch=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    given = image.clone()
    augment = RECIPES["high_recall"].augment
    first = augmented(augment, image, mask, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(image, given)
    again = augmented(augment, image, mask, seed=11)
    other = augmented(augment, image, mask, seed=12)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_no_geometry_leaves_the_batch_alone():
    # colour, blur, noise, JPEG run in DALI and copy-paste in the reader worker
    enhanced = RECIPES["enhanced_aug"]
    in_dali = tuple(entry for entry in enhanced.augment if is_photometric(entry))
    assert in_dali and enhanced.copy_paste and not ops.geometric_entries(in_dali)
    image, mask = green_square_batch()
    out, out_mask = augmented(in_dali, image, mask, seed=0)
    assert torch.equal(out, image) and torch.equal(out_mask, mask)


def test_photometric_entries_leave_the_batch_alone():
    # enhanced_aug forced: its only RGB-changing batch op is coarse_dropout, so
    # a pixel that is not blanked keeps its value up to the geometry
    image, mask = green_square_batch(channels=4)
    out, out_mask = augmented(forced(tuple(e for e in RECIPES["enhanced_aug"].augment
                                           if e[0] not in GEOMETRIC_OPS)), image, mask, seed=1)
    kept = (out[:, :3] != 0).any(1, keepdim=True).expand(-1, 3, -1, -1)
    assert kept.any() and not kept.all()
    assert torch.equal(out[:, :3][kept], image[:, :3][kept])
    assert torch.equal(out[:, 3], image[:, 3]) and torch.equal(out_mask, mask)


def test_a_batch_is_warped_at_once_and_equals_each_sample_warped_alone(monkeypatch):
    # the dali backend's geometry runs per row position on the whole batch
    # (one warp_affine for the images, one for the masks), not per sample
    import kornia.geometry.transform as kornia_transform
    mixed = (("one_of", {"p": 1.0, "ops": (("hflip", {}), ("vflip", {}))}), ("rot90", {"p": 0.7, "k": (1, 3)}),
             ("affine", {"p": 0.5}), ("coarse_dropout", {"p": 0.5}))
    image, mask = green_square_batch(batch=12, channels=4)
    entries = ops.geometric_entries(mixed)
    geometry = torch.from_numpy(np.stack([ops.draw_geometry(entries, np.random.default_rng((4, b)), SIZE)
                                          for b in range(12)]))
    alone = [apply_geometry(image[b:b + 1].clone(), mask[b:b + 1].clone(), geometry[b:b + 1]) for b in range(12)]
    warps = []
    real = kornia_transform.warp_affine
    monkeypatch.setattr(kornia_transform, "warp_affine", lambda src, *a, **k: warps.append(len(src)) or real(src, *a, **k))
    out, out_mask = apply_geometry(image.clone(), mask.clone(), geometry)
    warped = int((geometry[:, :, 0] == ops.GEOMETRIC.index("affine")).any(1).sum())
    assert 0 < warped < 12 and warps == [warped, warped]
    assert torch.equal(out, torch.cat([a[0] for a in alone]))
    assert torch.equal(out_mask, torch.cat([a[1] for a in alone]))


# --- the registry and recipe validation ---------------------------------------

def test_every_op_has_both_backends_and_valid_defaults():
    for name, op in ops.OPS.items():
        assert op.opencv is not None and (op.dali if op.kind == "photometric" else op.torch) is not None, name
        for key, param in op.params.items():
            assert param.accepts(param.default), (name, key)
    assert set(ops.OPS) == set(ops.PHOTOMETRIC) | set(ops.GEOMETRIC)
    assert GEOMETRIC_OPS | {"coarse_dropout"} == set(ops.GEOMETRIC)


@pytest.mark.parametrize("augment,message", [
    ((("sharpen", {}),), r"member 'x': augmentation 'sharpen': unknown op"),
    ((("rot90", {"p": 0.5, "kk": (1, 3)}),), r"member 'x': augmentation 'rot90': unknown parameter 'kk'"),
    ((("jpeg", {"quality": (70, 120)}),), r"augmentation 'jpeg': parameter 'quality' = \(70, 120\)"),
    ((("hflip", {"p": 1.5}),), r"augmentation 'hflip': parameter 'p' = 1.5"),
    ((("gaussian_blur", {"kernel": 3}),),
     r"parameter 'kernel' = 3; expected a pair \(a, b\), a <= b, of integers in \[1, 31\]"),
    ((("one_of", {"p": 1, "ops": (("hflip", {}), ("affine", {"rotate": -5}))}),),
     r"augmentation 'affine': parameter 'rotate' = -5"),
    ((("one_of", {"p": 1, "ops": (("hflip", {}), ("jpeg", {}))}),), r"augmentation 'one_of':.*mixes"),
])
def test_recipes_are_checked_when_built(augment, message):
    with pytest.raises(ValueError, match=message):
        replace(RECIPES["highres_no_ela"], name="x", augment=augment)


def test_defaults_fill_what_an_entry_leaves_out():
    recipe = replace(RECIPES["highres_no_ela"], augment=(("affine", {}), ("jpeg", {"p": 0.5})))
    assert ops.with_defaults("affine", {}) == {"shift": 0.0625, "scale": 0.1, "rotate": 45}
    assert ops.row_count(ops.geometric_entries(recipe.augment)) == 1


# --- copy-paste (PatchBank.paste, in the reader worker) -----------------------

PATCH_COLOUR = (10, 200, 30)
BLOCK = 96


def one_patch_bank(height=20, width=30):
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = PATCH_COLOUR
    mask = np.zeros((height, width), np.uint8)
    mask[2:-2, 2:-2] = 1           # the padding around the region is not pasted
    return PatchBank([Patch(rgb=rgb, mask=mask, row=0, instance=0)])


def dark_block(height=BLOCK, width=BLOCK):
    """A block nothing like the patch colour, with an existing forgery top left."""
    image = np.random.default_rng(0).integers(0, 5, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width, 1), np.uint8)
    mask[:4, :4] = 1
    return image, mask


def paste(bank, image, mask, seed=0, p=1.0, scale=(1.0, 1.0), pixel_scale=1.0):
    return bank.paste(image, mask, np.random.default_rng(seed), p=p, scale=scale,
                      pixel_scale=pixel_scale)


def new_region(mask, out_mask):
    return (out_mask[..., 0] == 1) & (mask[..., 0] == 0)


def region_sides(region):
    ys, xs = np.nonzero(region)
    return int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1


def test_paste_at_unit_scale_pastes_the_patch_pixels_under_the_union_mask():
    rng = np.random.default_rng(2)
    patch = Patch(rgb=rng.integers(0, 256, (24, 18, 3), dtype=np.uint8),
                  mask=(rng.random((24, 18)) > 0.4).astype(np.uint8), row=0, instance=0)
    image, mask = np.zeros((BLOCK, BLOCK, 3), np.uint8), np.zeros((BLOCK, BLOCK, 1), np.uint8)
    mask[:4, :4] = 1
    out, out_mask = paste(PatchBank([patch]), image, mask, seed=3)
    region = patch.mask.astype(bool)
    pasted = (out_mask[..., 0] == 1) & ~(mask[..., 0] == 1)
    assert pasted.sum() == region.sum()
    np.testing.assert_array_equal(out[pasted], patch.rgb[region])   # row-major on both sides
    assert (out_mask[:4, :4] == 1).all()                                 # union, not replacement
    assert set(np.unique(out_mask)) <= {0, 1}
    assert (out[~pasted] == 0).all()


def test_paste_changes_exactly_the_new_mask_pixels():
    image, mask = dark_block()
    out, out_mask = paste(one_patch_bank(), image, mask, seed=5)
    new = new_region(mask, out_mask)
    changed = (out != image).any(-1)
    np.testing.assert_array_equal(changed & (mask[..., 0] == 0), new)
    assert region_sides(new) == (16, 26) and new.sum() == 16 * 26       # a full rectangle
    assert (out[new] == PATCH_COLOUR).all()


@pytest.mark.parametrize("p,pastes", [(0.0, False), (1.0, True)])
def test_paste_probability_0_never_1_always(p, pastes):
    image, mask = dark_block()
    for seed in range(20):
        out, out_mask = paste(one_patch_bank(), image, mask, seed=seed, p=p)
        assert new_region(mask, out_mask).any() == pastes
        assert np.array_equal(out, image) != pastes


@pytest.mark.parametrize("pixel_scale", [0.25, 0.5, 2.0])
def test_pixel_scale_resizes_the_pasted_region(pixel_scale):
    image, mask = dark_block()
    _, out_mask = paste(one_patch_bank(), image, mask, seed=1, pixel_scale=pixel_scale)
    sides = region_sides(new_region(mask, out_mask))
    expected = (16 * pixel_scale, 26 * pixel_scale)
    assert all(abs(side - want) <= 1 for side, want in zip(sides, expected)), sides


def test_paste_shrinks_a_patch_larger_than_the_block():
    # 20 x 30 patch at 10x would be 200 x 300: shrunk to 64 x 96 to fit a 64 x 96 block
    image, mask = dark_block(64, 96)
    mask[:] = 0
    _, out_mask = paste(one_patch_bank(), image, mask, pixel_scale=10.0)
    assert region_sides(new_region(mask, out_mask)) == (round(16 * 96 / 30), round(26 * 96 / 30))


def test_paste_is_a_function_of_the_rng_seed_and_returns_new_arrays():
    bank = one_patch_bank()
    image, mask = dark_block()
    given = image.copy(), mask.copy()
    runs = {seed: paste(bank, image, mask, seed=seed, scale=(0.5, 1.5)) for seed in range(8)}
    again = paste(bank, image, mask, seed=3, scale=(0.5, 1.5))
    assert all(np.array_equal(a, b) for a, b in zip(runs[3], again))
    assert len({out_mask.sum() for _, out_mask in runs.values()}) > 1   # sizes follow U(.5, 1.5)
    np.testing.assert_array_equal(image, given[0])
    np.testing.assert_array_equal(mask, given[1])
    out, _ = paste(bank, image, mask, p=0.0)
    assert out is not image and not np.shares_memory(out, bank[0].rgb)


def test_loader_copy_paste_only_adds_forged_pixels(demo_store):
    # the same plan with and without copy-paste at p 1: masks only gain pixels
    recipe = RECIPES["enhanced_aug"]
    pasting = replace(recipe, augment=(), copy_paste={**recipe.copy_paste, "p": 1.0})
    kwargs = dict(batch_size=4, img_size=48, seed=3, workers=0)
    with_paste = list(make_loader(demo_store, pasting, **kwargs))
    without = list(make_loader(demo_store, replace(pasting, copy_paste=None), **kwargs))
    assert len(with_paste) == len(without) > 0
    grown = 0
    for a, b in zip(with_paste, without):
        assert torch.equal(a["index"], b["index"])
        assert not (a["mask"] < b["mask"]).any()
        grown += int((a["mask"].sum((1, 2, 3)) > b["mask"].sum((1, 2, 3))).sum())
    assert grown > len(with_paste)     # most of the 4 per batch show a pasted region


def test_paste_names_a_bad_block():
    image, mask = dark_block()
    with pytest.raises(ValueError, match="image must be uint8 h x w x 3"):
        paste(one_patch_bank(), image.astype(np.float32), mask)
    with pytest.raises(ValueError, match="mask must be uint8"):
        paste(one_patch_bank(), image, mask[:-1])


# --- patch bank from a store ------------------------------------------------

# (row, bbox y0 x0 y1 x1) of each instance; image sizes below. Rows 0 and 1
# are the training rows given to the bank; row 2 is not.
INSTANCES = [(0, (10, 10, 40, 40)), (0, (50, 5, 60, 45)), (1, (2, 70, 27, 95)), (2, (5, 5, 45, 45))]
HEIGHT, WIDTH = 64, 96


@pytest.fixture
def tiny_store(tmp_path):
    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="w")
    group.attrs["layout"] = asdict(PER_IMAGE_LAYOUT)   # arrays of their own per image
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
