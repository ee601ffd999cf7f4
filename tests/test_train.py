"""trainers/train.py end to end on the demo store: every member, overfitting,
resume, checkpoints, schedules and user-facing errors (multi-process training:
test_distributed.py)."""
import csv
import dataclasses
import math
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine import store as layout
from engine.recipes import RECIPES
from trainers.checkpoint import (OPTIMISER_STATE, CheckpointError, best_path, file_sha256,
                                 last_path, load_checkpoint, load_member, recipe_from_dict,
                                 recipe_to_dict, save_checkpoint)
from trainers.losses import MemberLoss
from trainers.metrics import pixel_counts, summarize
from trainers.model import build_model
from trainers.schedules import build_optimizer, build_scheduler
from trainers import run_folder
from trainers.train import main, parse_args
from trainers.training import initial_model, optimiser_step

SIZE = 64
SMALL_ENCODER = "timm-mobilenetv3_small_minimal_100"   # 5x faster than the recipes' b2
FAST = ["--encoder-weights", "none", "--img-size", str(SIZE), "--batch-size", "2",
        "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """train(member) trains it (after highres_no_ela, which the mined and
    fine-tuned members read) for two steps from random init, once per module;
    returns the exit status. Checkpoints and logs go to `out`."""
    out = tmp_path_factory.mktemp("members")
    status = {}

    def train(member):
        if member != "highres_no_ela":
            train("highres_no_ela")
        if member not in status:
            status[member] = main(["--member", member, "--store", str(store), "--out", str(out),
                                   "--epochs", "1", "--max-steps", "2", "--encoder", SMALL_ENCODER,
                                   *FAST])
        return status[member]

    train.out = out
    return train


@pytest.mark.parametrize("member", list(RECIPES))
def test_every_member_trains_and_writes_checkpoints_and_logs(trained, store, member):
    assert trained(member) == 0
    out = trained.out
    last = load_checkpoint(last_path(out / "models", member))
    assert last["global_step"] == 2 and last["fingerprint"] == layout.open_store(store).attrs["fingerprint"]
    # --encoder-weights none: the recipe records a random start, not ImageNet's
    init = RECIPES[member].init if RECIPES[member].init.startswith("finetune:") else "random"
    assert recipe_from_dict(last["recipe"]) == dataclasses.replace(
        RECIPES[member], epochs=1, img_size=SIZE, batch_size=2, encoder=SMALL_ENCODER, init=init)
    # best: what its readers need, without the optimiser (AdamW's moments are twice the model)
    best = load_checkpoint(best_path(out / "models", member))
    assert not set(OPTIMISER_STATE) & set(best) and best["recipe"] == last["recipe"]
    assert best["model"].keys() == last["model"].keys()
    assert best_path(out / "models", member).stat().st_size < \
        0.5 * last_path(out / "models", member).stat().st_size
    lines = (out / "logs" / f"{member}.csv").read_text().splitlines()
    assert len(lines) == 2
    header, row = lines[0].split(","), dict(zip(lines[0].split(","), lines[1].split(",")))
    assert "data_wait_share" in header and row["select_on"] == RECIPES[member].select_on
    assert math.isfinite(float(row["train_loss"])) and float(row["train_loss"]) > 0
    assert 0 <= float(row["data_wait_share"]) <= 1
    assert (out / "logs" / f"{member}.png").stat().st_size > 0


@pytest.mark.parametrize("member", [m for m in RECIPES if RECIPES[m].mining])
def test_mined_members_record_the_highres_checkpoint(trained, store, member):
    assert trained(member) == 0
    result = layout.read_mining(layout.open_store(store), RECIPES[member].mining)
    assert result["checkpoint"] == file_sha256(best_path(trained.out / "models", "highres_no_ela"))


def test_high_recall_starts_from_the_highres_checkpoint(trained, store):
    assert trained("highres_no_ela") == 0
    models = trained.out / "models"
    config = parse_args(["--member", "high_recall", *FAST]).config
    model, recipe = initial_model(RECIPES["high_recall"], config, models,
                                  layout.open_store(store).attrs["fingerprint"])
    parent, _, _ = load_member(best_path(models, "highres_no_ela"))
    assert recipe.encoder == SMALL_ENCODER
    for name, tensor in parent.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_load_member_gives_an_eval_model_with_logits(trained):
    assert trained("comprehensive") == 0
    model, recipe, info = load_member(best_path(trained.out / "models", "comprehensive"))
    assert not model.training and recipe.in_channels == 4
    assert "optimizer" not in info and info["fingerprint"]
    with torch.no_grad():
        logits = model(torch.randn(1, 4, SIZE, SIZE))
    assert logits.shape == (1, 1, SIZE, SIZE) and (logits < 0).any()   # logits, not probabilities


def test_a_model_overfits_a_few_batches(store):
    """Data, loss and optimiser fit together: two fixed batches are learnt."""
    torch.manual_seed(0)
    recipe = dataclasses.replace(RECIPES["highres_no_ela"], encoder=SMALL_ENCODER, lr=3e-3)
    forged = np.flatnonzero(layout.read_meta(layout.open_store(store))["label"] == 1)
    batches = list(engine.make_loader(store, recipe, rows=forged[:4], batch_size=2,
                                      img_size=SIZE, workers=0))
    model = build_model(recipe.encoder, recipe.in_channels, "none")
    optimizer, loss_fn = build_optimizer(model, recipe), MemberLoss(recipe)

    def dice_now():
        model.eval()
        with torch.no_grad():
            counts = np.concatenate([pixel_counts(model(b["image"]), b["mask"]) for b in batches])
        model.train()
        return summarize(counts)["pooled_dice"]

    dice_before, losses = dice_now(), []
    for step in range(60):
        batch = batches[step % len(batches)]
        loss = loss_fn(model(batch["image"]), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    dice_after = dice_now()
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) / 4
    assert dice_after > 0.6 and dice_after > dice_before + 0.3


def final_state(out: Path, member: str) -> dict:
    return load_checkpoint(last_path(out / "models", member))


@pytest.mark.parametrize("knobs", [
    # batch 8: two batches an epoch, so the pieces stop mid-epoch and cross an epoch end
    ["--batch-size", "8"],
    # batch 4, two batches a step: four batches, two optimiser steps an epoch,
    # warm-up into the second epoch, lr moving every step
    ["--batch-size", "4", "--grad-accum-steps", "2", "--warmup-steps", "3", "--precision", "bf16"],
], ids=["plain", "accumulation-warmup-bf16"])
def test_resume_after_interruptions_equals_an_uninterrupted_run(store, tmp_path, capsys, knobs):
    common = ["--member", "highres_no_ela", "--store", str(store), "--epochs", "2",
              "--encoder", SMALL_ENCODER, *FAST, *knobs]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(common + ["--out", str(whole)]) == 0
    assert main(common + ["--out", str(parts), "--max-steps", "1"]) == 0
    assert 0 < final_state(parts, "highres_no_ela")["step"] < 4         # stopped mid-epoch
    # the recorded configuration comes back (here --max-steps 3 until another is typed)
    assert main(["--member", "highres_no_ela", "--out", str(parts), "--max-steps", "3",
                 "--resume"]) == 0
    assert final_state(parts, "highres_no_ela")["global_step"] == 3
    assert main(["--member", "highres_no_ela", "--out", str(parts), "--resume"]) == 0
    assert final_state(parts, "highres_no_ela")["global_step"] == 3
    assert main(common + ["--out", str(parts), "--resume", "--max-steps", "0"]) == 0
    a, b = final_state(whole, "highres_no_ela"), final_state(parts, "highres_no_ela")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 0)
    assert a["global_step"] == b["global_step"] >= 4
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == a["global_step"]
    lrs = [row["lr"] for row in run_folder.read_rows(whole / "logs" / "highres_no_ela_steps.csv")]
    assert lrs == [row["lr"] for row in
                   run_folder.read_rows(parts / "logs" / "highres_no_ela_steps.csv")]
    assert lrs[0] != lrs[1]   # the schedule moves per step, inside the first epoch
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][key]["exp_avg"])

    # a resumed run keeps its recipe: another input size is refused, more epochs are not
    capsys.readouterr()
    assert main(common + ["--out", str(parts), "--resume", "--img-size", "32"]) == 2
    assert "--img-size 32" in capsys.readouterr().err
    assert main(common + ["--out", str(parts), "--resume", "--focal-alpha", "0.1"]) == 2
    assert "--focal-alpha 0.1" in capsys.readouterr().err
    assert main(common + ["--out", str(parts), "--resume", "--epochs", "2"]) == 0

    # the same checkpoint on a store with another fingerprint is refused
    b["fingerprint"] = "another-store"
    save_checkpoint(last_path(parts / "models", "highres_no_ela"), b)
    capsys.readouterr()
    assert main(common + ["--out", str(parts), "--resume"]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_early_stop_ends_the_run_after_epochs_without_improvement(store, tmp_path):
    # lr 0: the weights stay put, so the selection metric cannot keep improving
    assert main(["--member", "small_specialist", "--store", str(store), "--out", str(tmp_path),
                 "--epochs", "6", "--early-stop", "1", "--lr", "0", "--encoder", SMALL_ENCODER,
                 *FAST, "--batch-size", "8"]) == 0
    with open(tmp_path / "logs" / "small_specialist.csv") as f:
        scores = [float(row["select_score"]) for row in csv.DictReader(f)]
    assert 2 <= len(scores) < 6
    assert all(later > earlier for earlier, later in zip(scores[:-2], scores[1:-1]))
    assert scores[-1] <= max(scores[:-1])
    assert final_state(tmp_path, "small_specialist")["epoch"] == len(scores)


def test_gradient_clipping_bounds_the_update():
    net = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    batch = {"image": torch.full((4, 3), 100.0), "mask": torch.ones(4, 1)}
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    optimiser_step(net, batch, torch.nn.MSELoss(), optimizer, None, torch.device("cpu"), grad_clip=0.5)
    assert net.weight.norm().item() == pytest.approx(0.5)   # the unclipped step is 200 * sqrt(3)


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "m_last.pth"
    save_checkpoint(path, {"step": 1})

    def killed(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path, fields=())["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m_last.pth"]


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_one(store, tmp_path):
    common = ["--member", "highres_no_ela", "--store", str(store), "--out", str(tmp_path),
              "--epochs", "1", "--encoder", SMALL_ENCODER, *FAST]
    assert main(common + ["--max-steps", "1"]) == 0
    last = last_path(tmp_path / "models", "highres_no_ela")
    limit = last.stat().st_size // 2

    def no_room():
        # no file may grow past half a last checkpoint (Python ignores
        # SIGXFSZ, so the write fails with EFBIG), as a full disk refuses it
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "trainers/train.py", *common, "--max-steps", "2",
                           "--resume"], preexec_fn=no_room, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    problem = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(problem) == 1 and str(last) in problem[0], done.stderr[-2000:]
    assert load_checkpoint(last)["global_step"] == 1


def test_a_renamed_checkpoint_is_refused_not_trained_under_another_name(store, tmp_path, capsys):
    common = ["--store", str(store), "--out", str(tmp_path), "--epochs", "1", "--max-steps", "1",
              "--encoder", SMALL_ENCODER, *FAST]
    assert main(["--member", "small_specialist", *common]) == 0
    models = tmp_path / "models"
    last_path(models, "small_specialist").rename(last_path(models, "highres_no_ela"))
    capsys.readouterr()
    assert main(["--member", "highres_no_ela", *common, "--max-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds member 'small_specialist', not 'highres_no_ela'" in err and "Traceback" not in err
    assert not best_path(models, "highres_no_ela").exists()   # nothing written under the wrong name


def test_a_checkpoint_missing_fields_is_named(tmp_path):
    path = tmp_path / "m_last.pth"
    save_checkpoint(path, {"model": {}, "recipe": recipe_to_dict(RECIPES["highres_no_ela"])})
    with pytest.raises(CheckpointError, match="m_last.pth: incomplete checkpoint, fingerprint missing"):
        load_checkpoint(path)


def test_a_killed_write_leaves_no_lasting_leftover(tmp_path):
    path = tmp_path / "m_last.pth"
    leftover = tmp_path / f".m_last.pth.{_dead_pid()}.partial"
    leftover.write_bytes(b"half a checkpoint")
    save_checkpoint(path, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_last.pth"]


def _dead_pid() -> int:
    """The PID of a process that has ended."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "x_last.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="x_last.pth"):
        load_checkpoint(bad)


def test_recipes_survive_the_checkpoint_round_trip():
    for recipe in RECIPES.values():
        assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
        # checkpoints written before Recipe.extra was retired still load
        assert recipe_from_dict({**recipe_to_dict(recipe), "extra": {}}) == recipe
    # checkpoints written before View.negative_share: no negatives, as they trained
    saved = recipe_to_dict(RECIPES["small_specialist"])
    del saved["view"]["negative_share"]
    assert recipe_from_dict(saved).view.negative_share == 0.0


@pytest.mark.parametrize("member", ["hard_negative", "high_recall"])
def test_missing_highres_checkpoint_says_what_to_train(store, tmp_path, capsys, member):
    status = main(["--member", member, "--store", str(store), "--out", str(tmp_path), *FAST])
    err = capsys.readouterr().err
    assert status == 2
    assert "python trainers/train.py --member highres_no_ela" in err and "Traceback" not in err


def test_backend_option_reaches_every_loader_of_the_run(store, tmp_path, monkeypatch):
    seen = []
    real = engine.make_loader

    def recording(*args, **kwargs):
        seen.append((kwargs.get("split"), kwargs.get("backend")))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "make_loader", recording)
    status = main(["--member", "small_specialist", "--store", str(store), "--out", str(tmp_path),
                   "--epochs", "1", "--max-steps", "1", "--encoder", SMALL_ENCODER,
                   "--backend", "dali", *FAST])
    assert status in (0, None)
    assert {split for split, _ in seen} == {"train", "val"}
    assert all(backend == "dali" for _, backend in seen)


def schedule_lrs(member, epochs, steps_per_epoch=1, warmup_steps=0):
    recipe = dataclasses.replace(RECIPES[member], epochs=epochs)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    scheduler = build_scheduler(optimizer, recipe, steps_per_epoch=steps_per_epoch,
                                warmup_steps=warmup_steps)
    out = []
    for _ in range(epochs * steps_per_epoch + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return recipe, out


def test_the_schedule_runs_per_step_after_a_linear_warm_up():
    recipe, lrs = schedule_lrs("hard_negative", 3, steps_per_epoch=4, warmup_steps=4)
    assert lrs[:4] == pytest.approx([recipe.lr * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[4] == recipe.lr and lrs[12] == pytest.approx(recipe.schedule[1])
    assert all(a > b for a, b in zip(lrs[4:12], lrs[5:13]))   # falls at every step
    # without warm-up, at epoch ends: torch's per-epoch cosine
    recipe, per_step = schedule_lrs("hard_negative", 3, steps_per_epoch=4)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3,
                                                           eta_min=recipe.schedule[1])
    for epoch in range(4):
        assert per_step[4 * epoch] == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()


def test_schedules_follow_the_recipes():
    recipe, cosine = schedule_lrs("hard_negative", 30)
    assert cosine[0] == recipe.lr and cosine[30] == pytest.approx(recipe.schedule[1])
    assert all(a > b for a, b in zip(cosine[:30], cosine[1:31]))
    recipe, restarts = schedule_lrs("small_specialist", 40)
    _, t0, t_mult = recipe.schedule
    restart_epochs = [0, t0, t0 + t0 * t_mult]
    assert [restarts[e] for e in restart_epochs] == pytest.approx([recipe.lr] * 3)
    assert restarts[t0 - 1] < recipe.lr / 10
