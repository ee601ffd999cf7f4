"""Prediction and evaluation: unreadable images, output files and options with
a stand-in member; end to end with tiny checkpoints trained here (slow).

Three members are trained for one step at 64 px by the trainer itself: one
averaged RGB member, the 4-channel (RGB + ELA) member and the specialist, so
the average, the union and the ELA path all run.
"""
import csv
import os
import re
import resource
import struct
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from engine.recipes import SIZE_CLASS_NAMES, get_recipe
from engine.reader import WindowReader
from engine.store import image_path, open_store, read_meta
from preprocess.source import PNG_SIGNATURE, BadInput
from trainers import evaluate as evaluate_cli
from trainers import predict as predict_cli
from trainers.ensemble import Ensemble, Member, PostProcess
from trainers.score import score_files, split_rows, store_case_ids, write_solution
from trainers.train import main as train_main

SLOW = pytest.mark.slow   # trains three tiny members (about a minute of CPU)
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


@SLOW
def test_store_prediction_is_a_submission_the_scorer_accepts(demo_store, store_submission, tmp_path):
    solution = tmp_path / "solution.csv"
    write_solution(demo_store, solution, "val")
    rows = read_rows(store_submission)
    assert rows[0] == ["case_id", "annotation"]
    assert [r[0] for r in rows[1:]] == [r[0] for r in read_rows(solution)[1:]]
    assert any(r[1] != "authentic" for r in rows[1:]), "no instance survived: nothing encoded"
    assert 0.0 <= score_files(solution, store_submission) <= 1.0


@SLOW
def test_image_folder_gives_the_same_submission(demo_store, models_dir, store_submission, tmp_path):
    group = open_store(demo_store)
    rows = split_rows(read_meta(group), "val")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, row in zip(store_case_ids(read_meta(group)["case_id"], rows), rows):
        rgb = WindowReader(group).read_array(image_path(int(row)))
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = tmp_path / "from_images.csv"
    assert predict(["--images", str(folder)], models_dir, out) == 0
    # a folder's images in the order of their names, a store split's in row order
    assert sorted(read_rows(out)) == sorted(read_rows(store_submission))


@SLOW
def test_a_missing_checkpoint_is_named(demo_store, models_dir, tmp_path, capsys):
    rc = predict_cli.main(["--store", str(demo_store), "--models", str(models_dir),
                           "--members", "highres_no_ela,hard_negative", "--out",
                           str(tmp_path / "s.csv")])
    assert rc == 2
    assert "hard_negative_best.pth (or hard_negative.safetensors)" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_image_folder_problems_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images to predict"):
        predict_cli.image_files(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.PNG").write_bytes(b"")
    if len(list(tmp_path.iterdir())) == 2:           # case-sensitive file system
        with pytest.raises(BadInput, match="case ids occur twice"):
            predict_cli.image_files(tmp_path)


@SLOW
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


def sure_member():
    """A stand-in member that finds every pixel forged (sigmoid(8) > 0.99)."""
    model = nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(8.0)
    return Ensemble([Member("highres_no_ela", model, replace(get_recipe("highres_no_ela"),
                                                                img_size=16))])


def huge_png(path):
    """A PNG whose header claims 60000 x 60000 pixels."""
    header = struct.pack(">II", 60000, 60000) + bytes([8, 2, 0, 0, 0])
    path.write_bytes(PNG_SIGNATURE + struct.pack(">I", 13) + b"IHDR" + header + bytes(4))


@pytest.fixture
def images_with_a_bad_one(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "c"):
        cv2.imwrite(str(folder / f"{name}.png"), np.full((20, 30, 3), 128, np.uint8))
    huge_png(folder / "b.png")
    return folder


@pytest.fixture
def stand_in_ensemble(monkeypatch):
    monkeypatch.setattr(predict_cli, "ensemble_from_args",
                        lambda args: (PostProcess(0.5, 0), sure_member()))


def test_an_unreadable_image_gets_an_authentic_row_and_the_run_goes_on(
        images_with_a_bad_one, stand_in_ensemble, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    assert predict_cli.main(["--images", str(images_with_a_bad_one), "--out", str(out)]) == 0
    full = f"[1, {20 * 30}]"                           # every pixel, one run
    assert read_rows(out) == [["case_id", "annotation"], ["a", full], ["b", "authentic"],
                              ["c", full]]
    err = capsys.readouterr().err
    assert "b.png: 60000 x 60000 = 3600000000 pixels exceeds the limit" in err
    assert "1 of 3 images could not be read" in err


def test_max_pixels_is_the_builds_limit_and_can_be_lowered(images_with_a_bad_one,
                                                            stand_in_ensemble, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    assert predict_cli.main(["--images", str(images_with_a_bad_one), "--out", str(out),
                             "--max-pixels", "599"]) == 0
    assert [row[1] for row in read_rows(out)[1:]] == ["authentic"] * 3
    assert "30 x 20 = 600 pixels exceeds the limit of 599" in capsys.readouterr().err


def test_strict_stops_at_an_unreadable_image_and_keeps_the_old_file(
        images_with_a_bad_one, stand_in_ensemble, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    out.write_text("old\n")
    assert predict_cli.main(["--images", str(images_with_a_bad_one), "--out", str(out),
                             "--strict"]) == 2
    assert re.search(r"^error: .*b\.png: 60000 x 60000", capsys.readouterr().err, re.M)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "submission.csv"]


def test_a_failed_write_leaves_the_old_submission_whole(tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("old\n")

    def results():
        yield "a", []
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        predict_cli.write_submission(results(), out)
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


@pytest.mark.parametrize("option, problem", [
    (["--out", "."], r"--out \. is a folder; name the CSV to write, e\.g\. submission\.csv"),
    (["--device", "gpu"], r"argument --device: invalid choice: 'gpu'"),
    (["--max-pixels", "0"], r"argument --max-pixels: .*must be at least 1"),
])
def test_bad_options_are_one_error_line(tmp_path, capsys, option, problem):
    with pytest.raises(SystemExit) as exit_status:
        predict_cli.main(["--images", str(tmp_path), *option])
    assert exit_status.value.code == 2
    assert re.search(r"^\S+: error: " + problem, capsys.readouterr().err, re.M)


def test_every_entry_of_the_image_folder_gets_a_row_or_a_line(images_with_a_bad_one,
                                                              stand_in_ensemble, tmp_path, capsys):
    folder = images_with_a_bad_one
    for name, suffix in (("d", ".jpg"), ("e", ".tif"), ("f", ".bmp"), ("g", ".webp")):
        assert cv2.imwrite(str(folder / f"{name}{suffix}"), np.full((20, 30, 3), 128, np.uint8))
    (folder / "dir.png").mkdir()
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "submission.csv"
    assert predict_cli.main(["--images", str(folder), "--out", str(out)]) == 0
    full = f"[1, {20 * 30}]"
    assert read_rows(out)[1:] == [["a", full], ["b", "authentic"], ["c", full], ["d", full],
                                  ["e", full], ["f", full], ["g", full]]
    err = capsys.readouterr().err
    for name in ("dir.png", "fifo.png", "zero.png", "notes.txt"):
        assert re.search(rf"^warning: .*{name}: .*; skipped, no row$", err, re.M), name
    # --strict refuses the first such entry, the FIFO never opened
    assert predict_cli.main(["--images", str(folder), "--out", str(tmp_path / "s.csv"),
                             "--strict"]) == 2
    assert re.search(r"^error: .*dir\.png: .*folder", capsys.readouterr().err, re.M)
    assert not (tmp_path / "s.csv").exists()


def test_a_full_disk_while_writing_the_submission_names_the_file(tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("old\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16, hard))   # Python ignores SIGXFSZ: EFBIG
    try:
        with pytest.raises(OSError) as refused:
            predict_cli.write_submission([("a", [])] * 10, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(out) in str(refused.value) and "cannot write the submission" in str(refused.value)
    assert out.read_text() == "old\n"


class ViewRecorder(Ensemble):
    """An ensemble that records the specialist view of every batch it predicts."""

    def __init__(self, members):
        super().__init__(members)
        self.views = []

    def probabilities(self, images, elas, tta=False, specialist_view="tiled"):
        self.views.append(specialist_view)
        return super().probabilities(images, elas, tta, specialist_view)


def recording_ensemble():
    specialist = nn.Conv2d(3, 1, 1)
    return ViewRecorder([*sure_member().members, Member(
        "small_specialist", specialist, replace(get_recipe("small_specialist"), img_size=16))])


@pytest.mark.parametrize("flag, view", [([], "tiled"), (["--specialist-view", "whole"], "whole"),
                                        (["--specialist-view", "tiled"], "tiled")])
def test_the_specialist_view_reaches_predict_and_evaluate(images_with_a_bad_one, demo_store,
                                                          tmp_path, monkeypatch, capsys, flag,
                                                          view):
    ensemble = recording_ensemble()
    for cli in (predict_cli, evaluate_cli):
        monkeypatch.setattr(cli, "ensemble_from_args", lambda args: (PostProcess(0.5, 0), ensemble))
    assert predict_cli.main(["--images", str(images_with_a_bad_one), "--out",
                             str(tmp_path / "s.csv"), *flag]) == 0
    summary = capsys.readouterr().out
    assert f"specialist view {view}" in summary and re.search(r"[\d.]+ s per image", summary)
    assert evaluate_cli.main(["--store", str(demo_store), "--out", str(tmp_path / "eval"),
                              *flag]) == 0
    table = capsys.readouterr().out
    assert f"specialist view {view}" in table
    assert re.search(r"^seconds per image +[\d.]+ +[\d.]+$", table, re.M)   # both variants
    assert ensemble.views and set(ensemble.views) == {view}


def test_a_bad_specialist_view_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        predict_cli.main(["--images", str(tmp_path), "--specialist-view", "halves"])
    assert exit_status.value.code == 2
    assert "argument --specialist-view: invalid choice: 'halves'" in capsys.readouterr().err
