"""What a training run leaves and how it behaves as a user meets it: the run
folder (config, per-step logs, TensorBoard, curves), reruns refused unless
resumed or overwritten, Ctrl-C, and encoder weights from a file or offline."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import store as layout
from trainers import run_folder
from trainers.checkpoint import last_path, load_checkpoint
from trainers.model import WeightsUnavailable, build_model
from trainers.train import main, parse_args
from trainers.training import StopOnInterrupt, resume_command

ROOT = Path(__file__).resolve().parents[1]
SMALL_ENCODER = "timm-mobilenetv3_small_minimal_100"
FAST = ["--encoder-weights", "none", "--img-size", "64", "--batch-size", "2", "--device", "cpu",
        "--workers", "0", "--encoder", SMALL_ENCODER]


def test_a_run_folder_records_config_steps_validation_tensorboard_and_curves(store, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--member", "small_specialist", "--store", str(store), "--out", str(run),
                 "--epochs", "2", "--max-steps", "12", *FAST]) == 0
    printed, bars = capsys.readouterr()
    config = json.loads((run / "config.json").read_text())["members"]["small_specialist"]
    assert str(run / "config.json") in printed                      # said where, at start
    assert config["recipe"]["name"] == "small_specialist" and config["recipe"]["init"] == "random"
    assert config["store_fingerprint"] == layout.open_store(store).attrs["fingerprint"]
    assert config["config"]["max_steps"] == 12 and config["device"] == "cpu"
    assert config["versions"]["torch"] and config["versions"]["segmentation-models-pytorch"]
    steps = run_folder.read_rows(run / "logs" / "small_specialist_steps.csv")
    assert [r["global_step"] for r in steps] == list(range(1, 13))
    assert all(r["loss"] > 0 and 0 <= r["data_wait_share"] <= 1 and r["samples_per_s"] > 0 for r in steps)
    # the progress bar ends on the run's last loss (not one up to 9 steps old, nor nan)
    assert re.findall(r"loss=([^,\]]+)", bars)[-1] == f"{steps[-1]['loss']:.4f}"
    checks = run_folder.read_rows(run / "logs" / "small_specialist.csv")
    assert 1 <= len(checks) <= 2 and checks[-1]["global_step"] == 12
    events = list((run / "logs" / "tensorboard" / "small_specialist").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (run / "logs" / "small_specialist.png").stat().st_size > 10_000


def test_a_rerun_is_refused_unless_resumed_or_overwritten(store, tmp_path, capsys):
    common = ["--member", "small_specialist", "--store", str(store), "--out", str(tmp_path),
              "--epochs", "1", *FAST]
    assert main(common + ["--max-steps", "1"]) == 0
    first = load_checkpoint(last_path(tmp_path / "models", "small_specialist"))
    capsys.readouterr()
    assert main(common + ["--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run of small_specialist" in err and "--resume" in err and "--overwrite" in err
    assert load_checkpoint(last_path(tmp_path / "models", "small_specialist"))["global_step"] == 1
    assert main(common + ["--max-steps", "2", "--resume"]) == 0
    assert load_checkpoint(last_path(tmp_path / "models", "small_specialist"))["global_step"] == 2
    assert main(common + ["--max-steps", "1", "--overwrite"]) == 0
    again = load_checkpoint(last_path(tmp_path / "models", "small_specialist"))
    assert again["global_step"] == 1
    for name, tensor in first["model"].items():   # the same seed started over: the same weights
        assert torch.equal(tensor, again["model"][name]), name
    steps = run_folder.read_rows(tmp_path / "logs" / "small_specialist_steps.csv")
    assert [r["global_step"] for r in steps] == [1]   # the old run's rows are gone


def test_out_naming_a_file_is_refused(store, tmp_path, capsys):
    file = tmp_path / "not_a_folder"
    file.write_text("x")
    assert main(["--member", "small_specialist", "--store", str(store), "--out", str(file), *FAST]) == 2
    assert "is a file" in capsys.readouterr().err


def _children(pid: int) -> set[int]:
    """Every descendant process of `pid`."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def _alive_after(pids: set[int], seconds: float) -> list[int]:
    """Those of `pids` still running (not zombies) after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if Path(f"/proc/{pid}/stat").exists()
                 and Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _start_training(store, run: Path, *extra) -> tuple[subprocess.Popen, Path]:
    """train.py with a reader worker, once it has written a checkpoint."""
    command = [sys.executable, str(ROOT / "trainers" / "train.py"), "--member", "small_specialist",
               "--store", str(store), "--out", str(run), "--epochs", "3", *FAST, "--workers", "1",
               "--save-every", "1", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = last_path(run / "models", "small_specialist")
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]
    return process, last


def test_kill_9_of_the_trainer_takes_its_reader_workers_with_it(store, tmp_path):
    process, _ = _start_training(store, tmp_path / "run")
    workers = _children(process.pid)
    assert workers
    process.kill()
    process.communicate(timeout=30)
    assert not _alive_after(workers, seconds=5), "reader workers outlived a killed trainer"


def test_ctrl_c_checkpoints_keeps_the_logs_and_says_how_to_resume(store, tmp_path):
    """With reader workers running: the run stops within seconds, no worker
    outlives it, the checkpoint holds the steps done, and resuming finishes."""
    run = tmp_path / "run"
    process, last = _start_training(store, run)
    workers = _children(process.pid)
    assert workers   # DALI's reader process is running
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    assert process.returncode == 130, err[-2000:]
    assert stopped_in < 15
    assert "Traceback" not in err
    resume = [line for line in err.splitlines() if "Resume with:" in line]
    assert len(resume) == 1 and "--resume" in resume[0]
    assert not _alive_after(workers, seconds=10), "orphaned workers"
    state = load_checkpoint(last)
    steps = run_folder.read_rows(run / "logs" / "small_specialist_steps.csv")
    assert state["global_step"] >= 1 and len(steps) == state["global_step"]
    assert main(["--member", "small_specialist", "--store", str(store), "--out", str(run),
                 "--epochs", "3", *FAST, "--resume", "--max-steps", str(state["global_step"] + 1)]) == 0
    assert load_checkpoint(last)["global_step"] == state["global_step"] + 1


def test_encoder_weights_from_a_file_for_three_and_four_channels(store, tmp_path):
    torch.manual_seed(3)
    donor = build_model(SMALL_ENCODER, 3, "none")
    weights = tmp_path / "encoder.pth"
    torch.save({"state_dict": donor.fpn.encoder.state_dict()}, weights)
    three = build_model(SMALL_ENCODER, 3, str(weights))
    for name, tensor in donor.fpn.encoder.state_dict().items():
        assert torch.equal(three.fpn.encoder.state_dict()[name], tensor), name
    four = build_model(SMALL_ENCODER, 4, str(weights))
    first = [n for n, p in four.fpn.encoder.named_parameters() if p.ndim == 4][0]
    assert four.fpn.encoder.state_dict()[first].shape[1] == 4
    other = [n for n, p in four.fpn.encoder.named_parameters() if p.ndim == 4][1]
    assert torch.equal(four.fpn.encoder.state_dict()[other], donor.fpn.encoder.state_dict()[other])
    wrong = tmp_path / "other.pth"
    torch.save(build_model("timm-efficientnet-b2", 3, "none").fpn.encoder.state_dict(), wrong)
    with pytest.raises(WeightsUnavailable, match="not weights for encoder"):
        build_model(SMALL_ENCODER, 3, str(wrong))
    # through train.py: the run records the file as its initialisation
    assert main(["--member", "small_specialist", "--store", str(store), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--max-steps", "1", *FAST, "--encoder-weights", str(weights)]) == 0
    saved = load_checkpoint(last_path(tmp_path / "run" / "models", "small_specialist"))
    assert saved["recipe"]["init"] == f"file:{weights}"


def test_offline_imagenet_weights_fail_within_seconds(monkeypatch, capsys, store, tmp_path):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    started = time.monotonic()
    status = main(["--member", "small_specialist", "--store", str(store), "--out", str(tmp_path),
                   "--epochs", "1", "--img-size", "64", "--device", "cpu", "--workers", "0",
                   "--encoder-weights", "imagenet"])   # the recipe's own encoder
    assert status == 2 and time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "did not answer" in err and "--encoder-weights none" in err and "Traceback" not in err


def test_a_ctrl_c_during_an_update_is_raised_once_after_it():
    """The Ctrl-C that lands inside a step (or a checkpoint write) waits for
    it, is raised once, and then lets the interrupted run save its last
    checkpoint (a second raise there once made the run exit with -2, not 130)."""
    stop = StopOnInterrupt()
    steps = []
    with stop:
        with pytest.raises(KeyboardInterrupt):
            with stop.updating():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("step finished")
        with stop.updating():   # the run's last save
            steps.append("saved")
    assert steps == ["step finished", "saved"]


def test_flags_that_cannot_work_are_refused_before_the_run_folder_is_made(store, tmp_path, capsys):
    run = tmp_path / "run"
    for bad, named in ((["--img-size", "50"], "--img-size 50"), (["--batch-size", "0"], "--batch-size"),
                       (["--grad-accum-steps", "0"], "--grad-accum-steps"),
                       (["--precision", "fp16"], "--precision fp16")):
        with pytest.raises(SystemExit) as exit_:
            main(["--member", "small_specialist", "--store", str(store), "--out", str(run),
                  *FAST, *bad])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and named in err and len(err.splitlines()) == 1, err
        assert not run.exists()


def test_a_config_file_with_recipe_fields_and_flags_over_it(store, tmp_path, capsys):
    """--config (YAML here) sets recipe fields and settings; only the flags
    typed override it (--max-steps), the rest keep the file's values."""
    settings = tmp_path / "run.yaml"
    settings.write_text("member: small_specialist\nmax_steps: 5\nseed: 7\n"
                        "recipe:\n  epochs: 1\n  focal_alpha: 0.5\n  augment: [[hflip, {p: 1.0}]]\n"
                        "  sampling: {area_weights: [5.0, 2.0, 1.0]}\n")
    run = tmp_path / "run"
    assert main(["--config", str(settings), "--store", str(store), "--out", str(run), *FAST,
                 "--max-steps", "1"]) == 0
    state = load_checkpoint(last_path(run / "models", "small_specialist"))
    assert state["global_step"] == 1 and state["seed"] == 7
    assert state["recipe"]["focal_alpha"] == 0.5 and state["recipe"]["img_size"] == 64
    assert state["recipe"]["augment"] == (("hflip", {"p": 1.0}),)
    assert state["recipe"]["sampling"]["area_weights"] == (5.0, 2.0, 1.0)
    # validated as the recipe table is: an unknown augmentation is named
    settings.write_text("member: small_specialist\nrecipe:\n  augment: [[sharpen_a_lot, {}]]\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(settings), "--store", str(store), "--out", str(tmp_path / "other")])
    assert exit_.value.code == 2 and not (tmp_path / "other").exists()
    # and a share of negative windows that is no share
    settings.write_text("member: small_specialist\nrecipe:\n  view: {negative_share: 1.5}\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(settings), "--store", str(store), "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and not (tmp_path / "other").exists()
    assert "view.negative_share 1.5" in err and len(err.splitlines()) == 1, err


SENTINEL = "SENTINEL-4b1d"


def test_credentials_are_never_written_or_printed(store, tmp_path, capfd):
    """A --storage-option secret: in no file of the run folder, in nothing
    printed, nor in the resume command, which names it for the user to give again."""
    run = tmp_path / "run"
    command = ["--member", "small_specialist", "--store", str(store), "--out", str(run), "--epochs",
               "1", "--max-steps", "2", *FAST, "--storage-option", f"secret={SENTINEL}",
               f"--storage-option=aws_secret_access_key={SENTINEL}"]
    assert main(command) == 0
    config = json.loads((run / "config.json").read_text())["members"]["small_specialist"]
    assert config["config"]["storage"]["options"]["secret"] == "<redacted>"
    again = resume_command(parse_args(command).config)
    assert "--storage-option 'secret=<SECRET>'" in again and SENTINEL not in again
    printed = capfd.readouterr()
    assert SENTINEL not in printed.out + printed.err
    for path in run.rglob("*"):
        assert not path.is_file() or SENTINEL.encode() not in path.read_bytes(), path


def test_a_run_stopped_while_validating_resumes(store, tmp_path, monkeypatch):
    """Stopped during validation (a reader worker dying, a Ctrl-C caught by
    DALI): the checkpoint written before validating holds the epoch's steps,
    and --resume validates them and finishes."""
    import trainers.training as training   # where train.py's training code looks up validate

    def dying(*args, **kwargs):
        raise RuntimeError("a reader worker died")

    run = tmp_path / "run"
    common = ["--member", "small_specialist", "--store", str(store), "--out", str(run),
              "--epochs", "1", "--max-steps", "2", "--save-every", "0", *FAST]
    with monkeypatch.context() as patch:
        patch.setattr(training, "validate", dying)
        with pytest.raises(RuntimeError, match="worker died"):
            main(common)
    state = load_checkpoint(last_path(run / "models", "small_specialist"))
    assert state["global_step"] == 2 and state["epoch_figures"]["train_loss"] > 0
    assert run_folder.member_result(run, "small_specialist") is None
    assert main(["--member", "small_specialist", "--out", str(run), "--resume"]) == 0
    assert run_folder.member_result(run, "small_specialist")["global_step"] == 2
    rows = run_folder.read_rows(run / "logs" / "small_specialist.csv")
    assert len(rows) == 1 and rows[0]["train_loss"] == state["epoch_figures"]["train_loss"]


WRITER = """
import sys
from trainers import run_folder
run, member = sys.argv[1], sys.argv[2]
for k in range(60):
    run_folder.write_config(run, member, {"k": k})
    run_folder.record_result(run, member, {"k": k})
"""


def test_members_trained_in_parallel_keep_each_others_entries(tmp_path):
    """Two processes (members on two GPUs) recording into one config.json:
    neither loses the other's entry or result."""
    members = ("highres_no_ela", "small_specialist")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), member], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
                                text=True) for member in members]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    for member in members:
        assert run_folder.member_result(tmp_path, member) == {"k": 59}
