"""Prediction and evaluation end to end, with tiny checkpoints trained here.

Three members are trained for one step at 64 px by the trainer itself: one
averaged RGB member, the 4-channel (RGB + ELA) member and the specialist, so
the average, the union and the ELA path all run.
"""
import csv

import cv2
import numpy as np
import pytest

from engine.recipes import SIZE_CLASS_NAMES
from engine.store import image_path, open_store, read_meta
from preprocess.source import BadInput
from trainers import evaluate as evaluate_cli
from trainers import predict as predict_cli
from trainers.score import score_files, split_rows, store_case_ids, write_solution
from trainers.train import main as train_main

pytestmark = pytest.mark.slow   # trains three tiny members (about a minute of CPU)

MEMBERS = ("highres_no_ela", "comprehensive", "small_specialist")
# The tiny models' probabilities spread around 0.2-0.7 on the demo images, so
# 0.5 with no minimum area leaves some instances and some background.
SETTINGS = ["--threshold", "0.5", "--min-area", "0"]


@pytest.fixture(scope="module")
def models_dir(demo_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_members")
    for member in MEMBERS:
        rc = train_main(["--member", member, "--store", str(demo_store), "--epochs", "1",
                         "--max-steps", "1", "--img-size", "64", "--batch-size", "2",
                         "--encoder-weights", "none", "--workers", "0", "--device", "cpu",
                         "--out", str(out)])
        assert rc == 0, f"training {member} failed"
    return out / "models"


def predict(args, models_dir, out):
    return predict_cli.main([*args, "--models", str(models_dir), "--members", ",".join(MEMBERS),
                             "--device", "cpu", "--out", str(out), *SETTINGS])


@pytest.fixture(scope="module")
def store_submission(demo_store, models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "submission.csv"
    assert predict(["--store", str(demo_store)], models_dir, out) == 0
    return out


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_store_prediction_is_a_submission_the_scorer_accepts(demo_store, store_submission, tmp_path):
    solution = tmp_path / "solution.csv"
    write_solution(demo_store, solution, "val")
    rows = read_rows(store_submission)
    assert rows[0] == ["case_id", "annotation"]
    assert [r[0] for r in rows[1:]] == [r[0] for r in read_rows(solution)[1:]]
    assert any(r[1] != "authentic" for r in rows[1:]), "no instance survived: nothing encoded"
    assert 0.0 <= score_files(solution, store_submission) <= 1.0


def test_image_folder_gives_the_same_submission(demo_store, models_dir, store_submission, tmp_path):
    group = open_store(demo_store)
    rows = split_rows(read_meta(group), "val")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, row in zip(store_case_ids(read_meta(group)["case_id"], rows), rows):
        rgb = np.asarray(group[image_path(int(row))][...])
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "from_images.csv"
    assert predict(["--images", str(folder)], models_dir, out) == 0
    assert out.read_text() == store_submission.read_text()


def test_a_missing_checkpoint_is_named(demo_store, models_dir, tmp_path, capsys):
    rc = predict_cli.main(["--store", str(demo_store), "--models", str(models_dir),
                           "--members", "highres_no_ela,hard_negative", "--out",
                           str(tmp_path / "s.csv")])
    assert rc == 1
    assert "hard_negative_best.pth" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_image_folder_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .png images"):
        predict_cli.image_files(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.PNG").write_bytes(b"")
    if len(list(tmp_path.iterdir())) == 2:           # case-sensitive file system
        with pytest.raises(BadInput, match="case ids occur twice"):
            predict_cli.image_files(tmp_path)


def test_evaluation_agrees_with_the_scorer_and_counts_every_image(demo_store, models_dir,
                                                                  tmp_path, capsys):
    rc = evaluate_cli.main(["--store", str(demo_store), "--models", str(models_dir),
                            "--members", ",".join(MEMBERS), "--device", "cpu",
                            "--out", str(tmp_path), *SETTINGS])
    assert rc == 0
    lines = {line.split("  ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert evaluate_cli.WITHOUT_SPECIALIST in lines[""]           # the variants' header
    score = score_files(tmp_path / "solution.csv", tmp_path / "submission.csv")
    assert lines["competition score"].split()[2] == f"{score:.4f}"

    meta = read_meta(open_store(demo_store))
    classes = meta["size_class"][split_rows(meta, "val")]
    for k, name in enumerate(SIZE_CLASS_NAMES):
        total = int((classes == k).sum())
        label = "false positives (authentic)" if k == 0 else name
        cells = lines[label][len(label):]
        # Both variants count every image of the class: "x% (hits/total)", or "-" for none.
        assert cells.count(f"/{total})") == 2 if total else cells.split() == ["-", "-"]
    for label in ("MCC (pooled)", "Dice (pooled)", "MCC (mean per image)"):
        assert len(lines[label].split()) == len(label.split()) + 2
    assert cv2.imread(str(tmp_path / "evaluation.png")) is not None
