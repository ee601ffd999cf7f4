"""Multi-process training with the members' own encoder (the recipes' timm-efficientnet-b2,
not a stand-in): torchrun with 2 gloo processes past step 2, resumed bit for bit, mining split
across ranks; and every member through the DistributedDataParallel path in one process."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import engine
from engine import store as layout
from engine.recipes import RECIPES
from trainers import mining
from trainers.checkpoint import best_path, last_path, load_checkpoint, load_member
from trainers.model import build_model, freeze_unused
from trainers.train import main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
# the recipes' own encoder at a tiny input: what users run, small
TINY = ["--encoder-weights", "none", "--img-size", str(SIZE), "--batch-size", "2",
        "--device", "cpu", "--workers", "0", "--epochs", "1"]
# in dependency order: mined and fine-tuned members read highres_no_ela's checkpoint
ORDER = ["highres_no_ela"] + [m for m in RECIPES if m != "highres_no_ela"]


def torchrun(*args, processes=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(processes), str(ROOT / "trainers" / "train.py"),
                           *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def state(out: Path, member: str) -> dict:
    return load_checkpoint(last_path(out / "models", member))


def assert_same_weights(a: dict, b: dict):
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_freezing_leaves_only_what_the_forward_uses_trainable():
    torch.manual_seed(0)
    model = build_model(RECIPES["highres_no_ela"].encoder, 3, "none").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    frozen = freeze_unused(model, 3)
    # smp's timm-efficientnet keeps its classifier head, which segmentation never runs
    assert frozen and all(name.startswith("fpn.encoder.") for name in frozen)
    assert torch.equal(rng, torch.get_rng_state())                     # nothing random drawn
    for name, tensor in model.state_dict().items():                  # BN statistics unmoved
        assert torch.equal(tensor, before[name]), name
    assert model.training
    model(torch.randn(2, 3, SIZE, SIZE)).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable.isdisjoint(frozen)
    # a frozen model's checkpoint loads into a fresh one: the keys are all still there
    build_model(RECIPES["highres_no_ela"].encoder, 3, "none").load_state_dict(model.state_dict())


def test_two_processes_train_the_recipe_encoder_and_resume_bit_for_bit(store, tmp_path):
    member = "highres_no_ela"
    common = ["--member", member, "--store", store, *TINY]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun(*common, "--out", whole, "--max-steps", 4, "--record-samples")
    torchrun(*common, "--out", parts, "--max-steps", 2)
    assert state(parts, member)["global_step"] == 2
    torchrun(*common, "--out", parts, "--max-steps", 4, "--resume")
    a, b = state(whole, member), state(parts, member)
    assert a["global_step"] == b["global_step"] == 4
    assert_same_weights(a, b)
    for key, moments in a["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])
    # the frozen head never moved: its weights are the initial ones
    fresh = state(parts, member)
    torch.manual_seed(0)
    initial = build_model(RECIPES[member].encoder, 3, "none").state_dict()
    frozen = freeze_unused(build_model(RECIPES[member].encoder, 3, "none"), 3)
    for name in frozen:
        assert torch.equal(fresh["model"][name], initial[name]), name

    # each rank trained on its own slice of the one global plan
    recipe = dataclasses.replace(RECIPES[member], img_size=SIZE, batch_size=2, epochs=1)
    seen = [np.load(whole / "logs" / f"{member}_samples_rank{rank}.npy") for rank in (0, 1)]
    for rank in (0, 1):
        loader = engine.make_loader(store, recipe, batch_size=2, img_size=SIZE, rank=rank,
                                    world_size=2, workers=0)
        expected = np.concatenate([b["index"].numpy() for b, _ in zip(loader, range(4))])
        np.testing.assert_array_equal(seen[rank], expected)

    # mining with two ranks: each scores its share, rank 0 writes what one process would
    torchrun("--member", "hard_negative", "--store", store, *TINY, "--out", parts, "--max-steps", 2)
    mined = layout.read_mining(layout.open_store(store), "hard_negative")
    checkpoint = best_path(parts / "models", member)
    model, saved, _ = load_member(checkpoint)
    rows = mining.mining_rows(layout.read_meta(layout.open_store(store)), "hard_negative")
    done, scores = mining.score_rows(model, store, saved, rows, "hard_negative",
                                     batch_size=recipe.batch_size, img_size=SIZE, device="cpu",
                                     workers=0)
    np.testing.assert_array_equal(np.sort(done), rows)
    np.testing.assert_allclose(mined["score"][done], scores, rtol=1e-6, atol=1e-7)
    assert mined["checkpoint"] == mining.file_sha256(checkpoint)


def test_two_processes_train_the_four_channel_member_and_resume(store, tmp_path):
    member = "comprehensive"
    common = ["--member", member, "--store", store, *TINY, "--out", tmp_path]
    torchrun(*common, "--max-steps", 3)
    first = state(tmp_path, member)
    assert first["global_step"] == 3
    torchrun(*common, "--max-steps", 4, "--resume")
    resumed = state(tmp_path, member)
    assert resumed["global_step"] == 4
    assert any(not torch.equal(t, first["model"][n]) for n, t in resumed["model"].items())
    assert resumed["model"]["fpn.encoder.conv_stem.weight"].shape[1] == 4


def test_every_member_trains_through_distributed_data_parallel_in_one_process(store, tmp_path):
    """--ddp: the multi-process path (process group, DistributedDataParallel,
    gathers, split mining) with a world of one, for all six recipes as they are."""
    for member in ORDER:
        status = main(["--member", member, "--store", str(store), "--out", str(tmp_path), *TINY,
                       "--max-steps", "3", "--ddp"])
        assert status == 0, member
        assert state(tmp_path, member)["global_step"] == 3, member
        assert not torch.distributed.is_initialized()   # the group is closed after each run
