"""trainers/run_ensemble.py: the six recipes as they are (their own encoder, at a
tiny size) trained in dependency order into one run folder, evaluated, and a
rerun that skips finished members and resumes an unfinished one."""
import json
import subprocess
import sys
from pathlib import Path


from engine.recipes import RECIPES, SIZE_CLASS_NAMES
from trainers import run_ensemble, run_folder
from trainers.checkpoint import last_path, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--img-size", "64", "--batch-size", "2", "--encoder-weights", "none",
        "--device", "cpu", "--workers", "0"]


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
    first = run(store, out, "--max-steps", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    found = json.loads((out / "results.json").read_text())
    assert set(found["members"]) == set(RECIPES)
    assert all(m["steps"] == 2 and m["train_seconds"] > 0 for m in found["members"].values())
    assert set(found["variants"]) == {"ensemble", "without specialist"}
    for variant in found["variants"].values():
        assert 0 <= variant["score"] <= 1
        assert list(variant["recall_by_size_class"]) == list(SIZE_CLASS_NAMES[1:])
        assert variant["authentic_images"] > 0 and 0 <= variant["false_positive_rate"] <= 1
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
    again = run(store, out, "--max-steps", "3")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == len(RECIPES) - 1
    assert "small_specialist: resuming" in again.stdout
    assert load_checkpoint(last_path(out / "models", "small_specialist"))["global_step"] == 3
    for member in RECIPES:
        if member != "small_specialist":   # untouched
            assert (out / "models" / f"{member}_last.pth").stat().st_mtime_ns == before[member]
    assert run_folder.member_result(out, "small_specialist")["global_step"] == 3
    assert json.loads((out / "results.json").read_text())["members"]["small_specialist"]["steps"] == 3


def test_a_failing_member_stops_the_run_and_says_how_to_go_on(tmp_path):
    result = run(tmp_path / "absent.zarr", tmp_path / "run")
    assert result.returncode == 2
    assert "highres_no_ela stopped with status 2" in result.stderr
    assert "rerun the same command" in result.stderr and "Traceback" not in result.stderr
