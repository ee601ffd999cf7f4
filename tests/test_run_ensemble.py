"""trainers/run_ensemble.py: the six recipes as they are (their own encoder, at a
tiny size) trained in dependency order into one run folder, evaluated, and a
rerun that skips finished members and resumes an unfinished one."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.recipes import RECIPES, SIZE_CLASS_NAMES
from trainers import run_ensemble, run_folder
from trainers.checkpoint import last_path
from trainers.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--img-size", "64", "--batch-size", "2", "--encoder-weights", "none",
        "--device", "cpu", "--workers", "0"]
SENTINEL = "SENTINEL-9c2e"   # a credential: never in a file of the run, nor printed


def test_members_train_after_the_members_they_read():
    order = run_ensemble.training_order()
    assert sorted(order) == sorted(RECIPES)
    for name, recipe in RECIPES.items():
        if recipe.init.startswith("finetune:"):
            assert order.index(recipe.init.split(":")[1]) < order.index(name)
        if recipe.mining:
            assert order.index("highres_no_ela") < order.index(name)


def run(store, out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "trainers" / "run_ensemble.py"), "--store",
                           str(store), "--out", str(out), *TINY, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_the_whole_ensemble_in_one_command_then_a_rerun_resumes(store, tmp_path):
    out = tmp_path / "run"
    first = run(store, out, "--max-steps", "2", "--storage-option", f"secret={SENTINEL}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert SENTINEL not in first.stdout + first.stderr
    for path in out.rglob("*"):
        assert not path.is_file() or SENTINEL.encode() not in path.read_bytes(), path
    found = json.loads((out / "results.json").read_text())
    assert set(found["members"]) == set(RECIPES)
    assert all(m["steps"] == 2 and m["train_seconds"] > 0 for m in found["members"].values())
    assert set(found["variants"]) == {"ensemble", "without specialist"}
    for variant in found["variants"].values():
        assert 0 <= variant["score"] <= 1
        assert list(variant["recall_by_size_class"]) == list(SIZE_CLASS_NAMES[1:])
        assert variant["authentic_images"] > 0 and 0 <= variant["false_positive_rate"] <= 1
        assert variant["seconds_per_image"] > 0
    assert "specialist view tiled" in found["setting"]      # the default
    assert found["score"] == found["variants"]["ensemble"]["score"]
    markdown = (out / "results.md").read_text()
    assert "competition score" in markdown and "detection recall, tiny" in markdown
    assert (out / "evaluation" / "evaluation.png").stat().st_size > 0
    assert (out / "evaluation" / "predictions.png").stat().st_size > 0   # with the specialist outlined
    assert (out / "evaluation" / "submission.csv").read_text().startswith("case_id,annotation")

    # a member killed before it ended has no result: the rerun resumes it, skips the rest
    config = json.loads((out / "config.json").read_text())
    del config["members"]["small_specialist"]["result"]
    (out / "config.json").write_text(json.dumps(config))
    before = {m: (out / "models" / f"{m}_last.pth").stat().st_mtime_ns for m in RECIPES}
    again = run(store, out, "--max-steps", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == len(RECIPES) - 1
    assert "small_specialist: resuming" in again.stdout
    for member in RECIPES:
        if member != "small_specialist":   # untouched
            assert (out / "models" / f"{member}_last.pth").stat().st_mtime_ns == before[member]
    assert run_folder.member_result(out, "small_specialist")["global_step"] == 2

    # other settings: refused with the difference named, nothing touched
    other = run(store, out, "--max-steps", "3", "--img-size", "96")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "highres_no_ela" in other.stderr and "max_steps 2 -> 3" in other.stderr
    assert "recipe img_size 64 -> 96" in other.stderr and "--overwrite" in other.stderr
    assert (out / "models" / "highres_no_ela_last.pth").stat().st_mtime_ns == before["highres_no_ela"]


def test_a_missing_store_is_one_line_before_any_member_starts(tmp_path):
    result = run(tmp_path / "absent.zarr", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'absent.zarr'}: no store here; build one with "
        "`python preprocess/build_zarr.py`"]
    assert not (tmp_path / "run").exists()


def recorded(run, member, fingerprint="f1", finished=True, **settings):
    run_folder.write_config(run, member, {"store": "s", "store_fingerprint": fingerprint,
                                          "config": RunConfig(member=member, **settings).public()})
    if finished:
        run_folder.record_result(run, member, {"finished": True})


def test_reruns_reuse_only_members_recorded_as_this_run_would_train_them(tmp_path):
    config = RunConfig(out=tmp_path, max_steps=2, recipe={"img_size": 64})
    plan = lambda member, fingerprint="f1", overwrite=False, retrained=(): run_ensemble.plan_member(
        member, dataclasses.replace(config, member=member), fingerprint, overwrite, set(retrained))
    assert plan("highres_no_ela") == ("train", None)                      # nothing recorded
    recorded(tmp_path, "highres_no_ela", max_steps=2, recipe={"img_size": 64})
    assert plan("highres_no_ela") == ("skip", None)
    what, why = plan("highres_no_ela", fingerprint="f2")                  # the store changed
    assert what == "refuse" and "fingerprint f1) -> " in why and "(fingerprint f2)" in why
    recorded(tmp_path, "hard_negative", max_steps=2, recipe={"img_size": 64, "focal_alpha": 0.3})
    assert plan("hard_negative") == ("refuse", "recipe focal_alpha 0.3 -> 0.25")
    assert plan("hard_negative", overwrite=True) == ("train", "--overwrite")
    # a member that reads one trained again is stale with it
    recorded(tmp_path, "high_recall", max_steps=2, recipe={"img_size": 64})
    assert plan("high_recall", retrained={"highres_no_ela"}) == (
        "refuse", "reads highres_no_ela, trained again")
    # unfinished: resumed from its checkpoint, or started over without one
    recorded(tmp_path, "small_specialist", finished=False, max_steps=2, recipe={"img_size": 64})
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "small_specialist_steps.csv").write_text("global_step\n1\n")
    assert plan("small_specialist") == ("train", "--overwrite")
    (tmp_path / "models").mkdir()
    last_path(tmp_path / "models", "small_specialist").write_bytes(b"")
    assert plan("small_specialist") == ("resume", "--resume")


def test_the_specialist_view_reaches_run_ensembles_evaluation(tmp_path, monkeypatch):
    from tests.test_predict import sure_member
    from trainers import evaluate
    from trainers.ensemble import Ensemble

    class Evaluated(Exception):
        pass

    def evaluate_records(*args, **kwargs):
        raise Evaluated(kwargs["specialist_view"])

    monkeypatch.setattr(Ensemble, "load", classmethod(lambda cls, *args, **kwargs: sure_member()))
    monkeypatch.setattr(evaluate, "evaluate", evaluate_records)
    for flag, view in (([], "tiled"), (["--specialist-view", "whole"], "whole")):
        args, config = run_ensemble.parse_args(["--store", str(tmp_path / "store"), "--out",
                                                str(tmp_path / "run"), *flag])
        with pytest.raises(Evaluated, match=view):
            run_ensemble.evaluate_run(args, config)
