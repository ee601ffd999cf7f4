"""benchmarks/quality_study.py: every row of the report from the real training and
evaluation at a tiny size, and bootstrap intervals that follow the seed."""
import json

import numpy as np
import pytest

from benchmarks import quality_study as study
from engine.recipes import ENSEMBLE_AVERAGE, RECIPES, SIZE_CLASS_NAMES
from trainers.evaluate import Report

TINY = ["--quick", "--steps", "2", "--img-size", "64", "--epochs", "1", "--batch-size", "2",
        "--bootstrap", "30", "--workers", "0", "--device", "cpu"]


def _report(outcomes: list[tuple[int, bool]]) -> Report:
    """A report of images given as (size class, flagged/detected)."""
    report = Report()
    for size_class, found in outcomes:
        report.scores.append(float(found == (size_class > 0)))
        report.counts.append(np.array([int(found and size_class > 0), 0, 0, 10], np.int64))
        report.size_class.append(size_class)
        report.flagged.append(found)
        report.detected.append(found and size_class > 0)
    return report


def test_discrimination_is_tiny_recall_minus_authentic_flagged():
    report = _report([(1, True)] * 3 + [(1, False)] + [(0, True)] + [(0, False)] * 3 + [(2, True)])
    found = study.figures(report)
    assert found["recall_tiny"] == 0.75 and found["false_positive_rate"] == 0.25
    assert found["discrimination"] == 0.5
    assert np.isnan(found["recall_xlarge"]), "no image of the class: undefined, not 0"


def test_bootstrap_same_seed_same_intervals_and_honest_widths():
    rng = np.random.default_rng(0)
    report = _report([(1, bool(v)) for v in rng.random(60) < 0.5] + [(0, False)] * 40)
    draws = study.resamples(100, 400, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(draws, study.resamples(100, 400, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(draws, study.resamples(100, 400, seed=4)))
    intervals = study.with_intervals(report, draws)
    assert intervals == study.with_intervals(report, study.resamples(100, 400, seed=3))
    tiny = intervals["recall_tiny"]
    assert tiny["low"] < tiny["value"] < tiny["high"]
    # a share near 0.5 of 60 images: a 95 % interval about +-0.13 wide on each side
    assert 0.15 < tiny["high"] - tiny["low"] < 0.4, tiny
    assert intervals["false_positive_rate"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert intervals["recall_small"] == {"value": None, "low": None, "high": None}


@pytest.mark.slow
def test_the_report_holds_every_row(store, tmp_path, capsys):
    """The quick study at a tiny size: four trainings (the general members,
    the specialist, high_recall without mining), six evaluations, the files."""
    out = tmp_path / "quality"
    assert study.main(["--store", str(store), "--out", str(out), *TINY]) == 0
    found = json.loads((out / "quality.json").read_text())
    assert list(found["rows"]) == list(study.ROWS)
    assert found["mode"] == "quick" and found["settings"]["recipe_overrides"]["encoder"] == "mobilenet_v2"
    for row, entry in found["rows"].items():
        assert set(entry["figures"]) == set(study.FIGURES), row
        for name, figure in entry["figures"].items():
            if figure["value"] is not None and figure["low"] is not None:
                assert figure["low"] <= figure["value"] + 1e-9 <= figure["high"] + 2e-9, (row, name)
        assert list(entry["detected_by_size_class"]) == list(SIZE_CLASS_NAMES[1:])
    rows = found["rows"]
    assert rows[study.GENERAL]["members"] == ["highres_no_ela", "high_recall"]
    assert rows[study.ENSEMBLE_TILED]["members"] == ["highres_no_ela", "high_recall", "small_specialist"]
    assert rows[study.ENSEMBLE_WHOLE]["specialist_view"] == "whole"
    assert rows[study.SPECIALIST_TILED]["specialist_view"] == "tiled"
    assert rows[study.GENERAL]["specialist_view"] is None
    assert set(found["discrimination"]) == set(study.DISCRIMINATING)
    # with and without mining: the same parent and steps, mining the one difference
    members = found["members"]
    mined, unmined = members["high_recall"], members["high_recall without mining"]
    assert mined["mining"] == "hard_fn" and unmined["mining"] is None
    assert mined["init"] == unmined["init"] == "finetune:highres_no_ela"
    assert mined["steps"] == unmined["steps"] == 2
    assert rows[study.UNMINED]["run"].endswith("no_mining")
    assert (out / "quality.png").stat().st_size > 0
    table = (out / "quality.md").read_text()
    assert all(f"| {row} |" in table for row in study.ROWS)
    assert "| general + specialist, tiles |" in capsys.readouterr().out


@pytest.mark.slow
def test_full_mode_runs_every_general_member_with_its_own_recipe(store, tmp_path):
    """The full mode at a tiny size: the five general members with their own
    encoder, scored with their best checkpoints, as trainers/predict.py loads them."""
    out = tmp_path / "quality"
    tiny = ["--steps", "1", "--img-size", "64", "--epochs", "1", "--batch-size", "2",
            "--encoder-weights", "none", "--bootstrap", "10", "--workers", "0", "--device", "cpu"]
    assert study.main(["--store", str(store), "--out", str(out), *tiny]) == 0
    found = json.loads((out / "quality.json").read_text())
    assert found["mode"] == "full" and found["settings"]["checkpoint"] == "best"
    assert found["rows"][study.GENERAL]["members"] == list(ENSEMBLE_AVERAGE)
    assert {m["encoder"] for m in found["members"].values()} == {RECIPES["highres_no_ela"].encoder}
    assert list(found["rows"]) == list(study.ROWS)
