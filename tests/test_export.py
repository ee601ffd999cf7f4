"""Exported members (trainers/export.py): weights only, read back as the
checkpoint was, refused when they do not fit; and predict --images run as an
offline notebook runs it: read-only folders, exported weights, none of the
training side's packages imported."""
import csv
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
import safetensors.torch
import torch
from packaging.requirements import Requirement

from engine.recipes import get_recipe
from trainers import export as export_cli
from trainers import predict as predict_cli
from trainers.checkpoint import (EXPORT_PACKAGES, CheckpointError, best_path, export_path,
                                 file_sha256, load_member, member_file, recipe_to_dict,
                                 save_checkpoint)
from trainers.ensemble import Ensemble
from trainers.model import build_model

ROOT = Path(__file__).resolve().parents[1]
SMALL_ENCODER = "timm-mobilenetv3_small_minimal_100"
FINGERPRINT = "f" * 64
# An averaged RGB member, the RGB + ELA member and the specialist: the
# average, the union and the ELA path all run.
MEMBERS = ("highres_no_ela", "comprehensive", "small_specialist")
SETTINGS = ["--threshold", "0.5", "--min-area", "0", "--device", "cpu"]
# Packages of the training side (and nvidia.dali) that prediction from PNGs must not import.
TRAINING_ONLY = ("numba", "kornia", "zarr", "numcodecs", "scipy", "skimage",
                 "matplotlib")


def write_checkpoint(folder: Path, name: str, encoder: str = SMALL_ENCODER, seed: int = 0):
    """A training checkpoint of `name` as train.py writes one (with optimiser
    state), of a randomly initialised model after one optimiser step."""
    recipe = replace(get_recipe(name), encoder=encoder, img_size=32)
    torch.manual_seed(seed)
    model = build_model(encoder, recipe.in_channels, "none")
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, recipe.in_channels, 32, 32)).mean().backward()
    optimizer.step()
    save_checkpoint(best_path(folder, name), {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "recipe": recipe_to_dict(recipe), "fingerprint": FINGERPRINT})
    return recipe


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(MEMBERS):
        write_checkpoint(folder, name, seed=seed)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    assert export_cli.main(["--models", str(checkpoints), "--out", str(folder)]) == 0
    return folder


def test_export_holds_the_model_tensors_and_a_description(checkpoints, exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        f"{name}.{ext}" for name in MEMBERS for ext in ("json", "safetensors"))
    checkpoint = best_path(checkpoints, "comprehensive")
    state = torch.load(checkpoint, weights_only=True)
    weights = export_path(exported, "comprehensive")
    tensors = safetensors.torch.load_file(weights)
    assert tensors.keys() == state["model"].keys()
    assert all(torch.equal(tensors[k], state["model"][k]) for k in tensors)
    # Adam's two moments are gone: the export is about a third of the checkpoint.
    assert weights.stat().st_size < 0.4 * checkpoint.stat().st_size

    description = json.loads(weights.with_suffix(".json").read_text())
    assert description["recipe"] == json.loads(json.dumps(state["recipe"]))
    assert description["fingerprint"] == FINGERPRINT
    assert description["source"] == {"file": checkpoint.name, "sha256": file_sha256(checkpoint)}
    assert description["weights_sha256"] == file_sha256(weights)
    assert datetime.fromisoformat(description["exported_at"]).tzinfo is not None
    assert description["versions"] == {p: importlib.metadata.version(p) for p in EXPORT_PACKAGES}


def test_an_exported_member_is_the_checkpoints_member(tmp_path):
    """With the recipes' own encoder: same recipe (tuples and all), same outputs."""
    write_checkpoint(tmp_path, "hard_negative", encoder=get_recipe("hard_negative").encoder)
    assert export_cli.main(["--models", str(tmp_path), "--out", str(tmp_path / "export"),
                            "--members", "hard_negative"]) == 0
    from_checkpoint, recipe, _ = load_member(best_path(tmp_path, "hard_negative"))
    from_export, exported_recipe, info = load_member(
        export_path(tmp_path / "export", "hard_negative"), member="hard_negative",
        fingerprint=FINGERPRINT)
    assert exported_recipe == recipe and recipe.encoder == "timm-efficientnet-b2"
    assert info["fingerprint"] == FINGERPRINT and not from_export.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_export(x), from_checkpoint(x))


def test_a_folder_with_both_kinds_is_read_from_the_checkpoint(checkpoints, exported, tmp_path):
    shutil.copy(best_path(checkpoints, "comprehensive"), tmp_path)
    for path in (export_path(exported, name) for name in ("comprehensive", "small_specialist")):
        shutil.copy(path, tmp_path)
        shutil.copy(path.with_suffix(".json"), tmp_path)
    assert member_file(tmp_path, "comprehensive") == best_path(tmp_path, "comprehensive")
    assert member_file(tmp_path, "small_specialist") == export_path(tmp_path, "small_specialist")
    assert member_file(tmp_path, "high_recall") is None


def copy_export(source: Path, name: str, folder: Path, as_name: str | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    target = export_path(folder, as_name or name)
    shutil.copy(export_path(source, name), target)
    shutil.copy(export_path(source, name).with_suffix(".json"), target.with_suffix(".json"))
    return target


def test_exports_that_do_not_fit_are_refused(exported, tmp_path):
    renamed = copy_export(exported, "highres_no_ela", tmp_path / "renamed", "hard_negative")
    with pytest.raises(CheckpointError, match=r"holds member 'highres_no_ela', not 'hard_negative'"):
        Ensemble.load(renamed.parent, ("hard_negative",))
    with pytest.raises(CheckpointError, match="trained on a store with fingerprint"):
        load_member(export_path(exported, "highres_no_ela"), fingerprint="0" * 64)

    swapped = copy_export(exported, "highres_no_ela", tmp_path / "swapped")
    shutil.copy(export_path(exported, "small_specialist"), swapped)
    with pytest.raises(CheckpointError, match=r"highres_no_ela\.safetensors: not the weights "
                                              r"highres_no_ela\.json describes"):
        load_member(swapped)

    alone = copy_export(exported, "highres_no_ela", tmp_path / "alone")
    alone.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=r"highres_no_ela\.json does not exist.*export the member again"):
        load_member(alone)


@pytest.mark.parametrize("make, options, problem", [
    (lambda d: None, [], r"no <member>_best\.pth of any member"),
    (lambda d: write_checkpoint(d, "comprehensive"), ["--members", "comprehensive,high_recall"],
     r"no checkpoint: \S+high_recall_best\.pth"),
    (lambda d: None, ["--members", "nope"], "unknown member 'nope'"),
    (lambda d: shutil.move(best_path(d, write_checkpoint(d, "comprehensive").name),
                           best_path(d, "high_recall")), [],
     r"high_recall_best\.pth: holds member 'comprehensive', not 'high_recall'"),
])
def test_export_user_errors_are_one_line_and_write_nothing(tmp_path, capsys, make, options, problem):
    models = tmp_path / "models"
    models.mkdir()
    make(models)
    out = tmp_path / "export"
    assert export_cli.main(["--models", str(models), "--out", str(out), *options]) == 2
    assert re.fullmatch(f"error: .*{problem}.*\n", capsys.readouterr().err)
    assert not out.exists()


def read_only(folder: Path) -> dict:
    """Make folder and its files read-only; returns what is there, to compare after."""
    for path in folder.iterdir():
        path.chmod(0o444)
    folder.chmod(0o555)
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def readme_offline_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("## Offline inference", 1)[1].split("\n## ", 1)[0]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def available_offline() -> set[str]:
    """The distributions the README's offline section downloads and all they
    require (as installed here), and those they use only where present (their
    extras' requirements, such as torch's optree)."""
    todo = [canonical(pin.split("==")[0])
            for pin in re.findall(r"[\w.-]+==[\w.+-]+", readme_offline_section())]
    carried, optional = set(), set()
    while todo:
        name = todo.pop()
        if name in carried:
            continue
        carried.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonical(requirement.name))
            elif "extra" in str(requirement.marker):
                optional.add(canonical(requirement.name))
    return carried | optional


def test_readme_pins_are_the_tested_set():
    # the notebook runs Python 3.11, like requirements/lock-py311.txt
    def named(pin: str) -> str:
        name, _, version = pin.partition("==")
        return f"{canonical(name)}=={version}"

    pins = [named(pin) for pin in re.findall(r"[\w.-]+==[\w.+-]+", readme_offline_section())]
    locked = [named(pin) for pin in
              (ROOT / "requirements" / "lock-py311.txt").read_text().split() if "==" in pin]
    assert "safetensors==" + importlib.metadata.version("safetensors") in locked
    assert pins and set(pins) <= set(locked)


# predict's main in a fresh interpreter, reporting which modules it imported
RUN_PREDICT = """
import json, sys
before = set(sys.modules)
from trainers.predict import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "modules": sorted(set(sys.modules) - before)}))
"""


def test_offline_prediction_from_read_only_exports_imports_no_training_packages(
        checkpoints, exported, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k, shape in enumerate([(40, 60, 3), (90, 50, 3), (64, 64, 3)]):
        cv2.imwrite(str(images / f"case{k}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    expected = tmp_path / "from_checkpoints.csv"
    members = ["--members", ",".join(MEMBERS)]
    assert predict_cli.main(["--images", str(images), "--models", str(checkpoints), *members,
                             "--out", str(expected), *SETTINGS]) == 0

    before = {folder: read_only(folder) for folder in (images, exported)}
    out = tmp_path / "submission.csv"
    try:
        done = subprocess.run(
            [sys.executable, "-c", RUN_PREDICT, "--images", str(images), "--models", str(exported),
             *members, "--out", str(out), *SETTINGS],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"})   # as the in-process run: same sums
    finally:
        for folder in before:
            folder.chmod(0o755)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["rc"] == 0
    assert {folder: {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
            for folder in before} == before
    with open(out, newline="") as handle:
        assert [row[0] for row in csv.reader(handle)] == ["case_id", "case0", "case1", "case2"]
    assert out.read_text() == expected.read_text()

    modules = report["modules"]
    assert "trainers.ensemble" in modules                   # the report is of the run
    assert [m for m in modules if m.split(".")[0] in TRAINING_ONLY
            or m.startswith("nvidia.dali")] == []
    providers = importlib.metadata.packages_distributions()
    imported = {canonical(dist) for m in modules for dist in providers.get(m.split(".")[0], ())}
    missing = imported - available_offline() - {"forgery-engine"}
    assert not missing, f"the README's offline wheels lack {sorted(missing)}"
