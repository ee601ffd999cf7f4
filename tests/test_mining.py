"""Mining: flags from scores, flags written by a stand-in model whose output we
control, and reuse while the checkpoint is unchanged."""
import dataclasses
import errno
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from engine import store as layout
from engine.recipes import RECIPES
from trainers import mining
from trainers.checkpoint import CheckpointError, recipe_to_dict, save_checkpoint
from trainers.model import build_model

SIZE = 64
SMALL_ENCODER = "timm-mobilenetv3_small_minimal_100"
MINE = dict(batch_size=4, img_size=SIZE, device="cpu", workers=0)


@pytest.fixture
def store(demo_store, tmp_path):
    copy = tmp_path / "store.zarr"
    shutil.copytree(demo_store, copy)
    return copy


class ConstantLogits(nn.Module):
    """Says 'forged' (value > 0) or 'authentic' (value < 0) for every pixel."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, image):
        return torch.full((image.shape[0], 1, *image.shape[2:]), self.value)


def test_hard_negatives_are_the_top_ratios_above_the_threshold():
    rows = np.arange(1000, dtype=np.int64)
    score = np.random.default_rng(0).permutation(np.linspace(0, 0.01, 1000)).astype(np.float32)
    score[rows[:5]] = mining.HARD_NEGATIVE_PIXEL_SHARE        # not above the threshold
    mined = rows[::2]                                           # only these are candidates
    flag = mining.flags_from_scores(score, mined, "hard_negative").astype(bool)
    candidates = mined[score[mined] > mining.HARD_NEGATIVE_PIXEL_SHARE]
    assert len(candidates) > mining.HARD_NEGATIVE_KEEP
    assert flag.sum() == mining.HARD_NEGATIVE_KEEP
    assert not flag[1::2].any()
    assert score[flag].min() >= score[np.setdiff1d(candidates, np.flatnonzero(flag))].max()


def test_hard_false_negatives_are_those_with_recall_below_half():
    score = np.array([0.0, 0.49, 0.5, 0.9, np.nan], np.float32)
    flag = mining.flags_from_scores(score, np.arange(4), "hard_fn")
    np.testing.assert_array_equal(flag, [1, 1, 0, 0, 0])


@pytest.mark.parametrize("kind,value,flagged", [
    ("hard_negative", 5.0, True),    # marks every pixel of an authentic image forged
    ("hard_negative", -5.0, False),
    ("hard_fn", -5.0, True),         # misses every forged pixel
    ("hard_fn", 5.0, False),
])
def test_mining_writes_the_flags_a_known_model_implies(store, kind, value, flagged):
    meta = layout.read_meta(layout.open_store(store))
    expected_rows = np.flatnonzero((meta["split"] == 0) & (meta["label"] == mining.MINED_LABEL[kind]))
    assert 0 < len(expected_rows) < mining.HARD_NEGATIVE_KEEP
    result = mining.mine(store, kind, ConstantLogits(value), RECIPES["highres_no_ela"], "sha-test", **MINE)
    assert result["checkpoint"] == "sha-test"
    assert result["flag"].shape == result["score"].shape == meta["label"].shape
    np.testing.assert_array_equal(np.flatnonzero(result["flag"]), expected_rows if flagged else [])
    scored = ~np.isnan(result["score"])
    np.testing.assert_array_equal(np.flatnonzero(scored), expected_rows)
    # hard negatives: false-positive ratio; hard FN: recall; both 1 or 0 for a constant model
    assert set(result["score"][scored]) == {1.0 if value > 0 else 0.0}


def write_tiny_checkpoint(path, seed, store, member="highres_no_ela"):
    torch.manual_seed(seed)
    recipe = dataclasses.replace(RECIPES[member], encoder=SMALL_ENCODER, img_size=SIZE)
    model = build_model(recipe.encoder, recipe.in_channels, "none")
    save_checkpoint(path, {"model": model.state_dict(), "recipe": recipe_to_dict(recipe),
                           "fingerprint": layout.open_store(store).attrs["fingerprint"]})


def test_mining_refuses_another_members_or_stores_checkpoint(store, tmp_path):
    renamed = tmp_path / "highres_no_ela_best.pth"
    write_tiny_checkpoint(renamed, seed=0, store=store, member="small_specialist")
    with pytest.raises(CheckpointError, match="holds member 'small_specialist', not 'highres_no_ela'"):
        mining.ensure_mining(store, "hard_fn", renamed, **MINE)
    state = torch.load(renamed, weights_only=True)
    state["recipe"]["name"], state["fingerprint"] = "highres_no_ela", "another-store"
    torch.save(state, renamed)
    with pytest.raises(CheckpointError, match="fingerprint 'another-store'"):
        mining.ensure_mining(store, "hard_fn", renamed, **MINE)


def test_results_are_reused_while_the_checkpoint_is_unchanged(store, tmp_path, monkeypatch):
    checkpoint = tmp_path / "highres_no_ela_best.pth"
    write_tiny_checkpoint(checkpoint, seed=0, store=store)
    first, reused = mining.ensure_mining(store, "hard_fn", checkpoint, **MINE)
    assert not reused and first["checkpoint"] == mining.file_sha256(checkpoint)

    def must_not_run(*args, **kwargs):
        raise AssertionError("mined again for an unchanged checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(mining, "mine", must_not_run)
        again, reused = mining.ensure_mining(store, "hard_fn", checkpoint, **MINE)
    assert reused and again["checkpoint"] == first["checkpoint"]
    np.testing.assert_array_equal(again["score"], first["score"])

    write_tiny_checkpoint(checkpoint, seed=1, store=store)
    changed, reused = mining.ensure_mining(store, "hard_fn", checkpoint, **MINE)
    assert not reused and changed["checkpoint"] != first["checkpoint"]


def test_an_interrupted_write_reads_as_no_result(store, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    n = len(layout.read_meta(layout.open_store(store))["label"])
    mining.write_mining(store, "hard_fn", np.zeros(n, np.float32), np.zeros(n, np.uint8), "sha-old")
    assert layout.read_mining(layout.open_store(store), "hard_fn")["checkpoint"] == "sha-old"
    group = layout.open_store(store, mode="r+")
    monkeypatch.setattr(type(group), "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        mining.write_mining(store, "hard_fn", np.ones(n, np.float32), np.ones(n, np.uint8), "sha-new")
    assert layout.read_mining(layout.open_store(store), "hard_fn") is None


def test_a_read_only_store_gets_a_message_saying_what_to_do(store, monkeypatch):
    n = len(layout.read_meta(layout.open_store(store))["label"])

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(layout, "open_store", lambda path, mode="r", storage=None: (
        read_only() if mode != "r" else zarr.open_group(str(path), mode="r")))
    with pytest.raises(layout.StoreError, match=r"Read-only file system.*writable copy"):
        mining.write_mining(store, "hard_fn", np.zeros(n, np.float32), np.zeros(n, np.uint8), "sha")
