"""A run folder: what one training run of one or more members leaves behind.

    RUN/config.json                  per member: its configuration (trainers/config.py,
                                     credentials redacted), the resolved recipe, the command
                                     (redacted), package versions, device, world size, store
                                     and its fingerprint, and once it ended by its own rules,
                                     its result
    RUN/models/<member>_best.pth     best on the member's selection metric (the model, no
                                     optimiser state: a third of the size of _last)
    RUN/models/<member>_last.pth     where a resumed run continues (with the optimiser state)
    RUN/logs/<member>_steps.csv      one row per optimiser step: loss, lr, samples/s, data wait
    RUN/logs/<member>.csv            one row per validation: the train loss since the last
                                     one and every validation metric
    RUN/logs/<member>.png            the curves over steps
    RUN/logs/tensorboard/<member>/   TensorBoard event files (when tensorboard is installed)

All members of an ensemble train into one run folder (the mined and
fine-tuned members read highres_no_ela's checkpoint from it). Every file is
written whole or not at all (common/atomic.py); the CSVs grow by appending
whole rows, so an interrupted run keeps every row it logged. Members
trained at the same time into one folder (one per GPU) each change their own
entry of config.json under a lock on RUN/config.json.lock, so none loses
another's.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from common.atomic import atomic_open

DEFAULT_RUN = Path("runs/default")
STEP_FIELDS = ("global_step", "epoch", "step", "loss", "lr", "samples_per_s", "data_wait_share")
EPOCH_FIELDS = ("epoch", "step", "global_step", "train_loss", "lr", "seconds", "samples_per_s",
                "data_wait_share", "select_on", "select_score", "mean_image_mcc", "pooled_mcc",
                "mean_image_dice", "pooled_dice", "mean_image_recall", "pooled_recall",
                "recall_dice")
PACKAGES = ("torch", "torchvision", "segmentation-models-pytorch", "timm", "nvidia-dali-cuda130",
            "kornia", "numpy", "numba", "zarr", "opencv-python-headless")
# readable names of the logged metrics, for plots
METRIC_NAMES = {"mean_image_mcc": "mean per-image MCC", "pooled_mcc": "pooled pixel MCC",
                "mean_image_dice": "mean per-image Dice", "pooled_dice": "pooled pixel Dice",
                "mean_image_recall": "mean per-image recall", "pooled_recall": "pooled pixel recall",
                "recall_dice": "0.6 recall + 0.4 Dice"}


class RunFolderError(RuntimeError):
    """A run folder that cannot take this run as asked."""


def models_dir(run: Path) -> Path:
    return Path(run) / "models"


# A member's checkpoints in models_dir (trainers/checkpoint.py writes and reads
# them); named here, without torch, for the command lines that only look for them.
class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit this run."""


def best_path(models_dir: Path, member: str) -> Path:
    return Path(models_dir) / f"{member}_best.pth"


def last_path(models_dir: Path, member: str) -> Path:
    return Path(models_dir) / f"{member}_last.pth"


def logs_dir(run: Path) -> Path:
    return Path(run) / "logs"


def member_files(run: Path, member: str) -> list[Path]:
    """Everything a member's run wrote into the folder (config.json aside)."""
    logs = logs_dir(run)
    return [*models_dir(run).glob(f"{member}_*.pth"), logs / f"{member}.csv",
            logs / f"{member}_steps.csv", logs / f"{member}.png", logs / "tensorboard" / member,
            *logs.glob(f"{member}_samples_rank*.npy")]


def prepare(run: Path, member: str, *, resume: bool, overwrite: bool) -> None:
    """Make the folder ready for a run of `member`: a rerun over a member's
    earlier run is refused unless it resumes it or overwrites it."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise RunFolderError(f"--out {run}: is a file; a run writes a folder (models/, logs/)")
    earlier = [p for p in member_files(run, member) if p.exists()]
    if earlier and not (resume or overwrite):
        raise RunFolderError(
            f"{run}: already holds a run of {member} ({earlier[0]}); continue it with --resume, "
            "start it over with --overwrite, or choose another --out")
    if overwrite and not resume:
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    models_dir(run).mkdir(parents=True, exist_ok=True)
    logs_dir(run).mkdir(parents=True, exist_ok=True)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def redacted_command(argv: list[str]) -> list[str]:
    """`argv` with the values of credential-like --storage-option's replaced."""
    from engine.storage import REDACTED, is_secret

    flag, words = "--storage-option", []
    for k, word in enumerate(argv):
        if word.startswith(flag + "="):
            prefix, option = flag + "=", word[len(flag) + 1:]
        elif k and argv[k - 1] == flag:
            prefix, option = "", word
        else:
            words.append(word)
            continue
        name = option.partition("=")[0]
        words.append(f"{prefix}{name}={REDACTED}" if is_secret(name) else word)
    return words


@contextlib.contextmanager
def _members(run: Path):
    """RUN/config.json's members, read and written back under the folder's lock."""
    path = Path(run) / "config.json"
    with open(Path(run) / "config.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # released when the file closes
        members = json.loads(path.read_text())["members"] if path.is_file() else {}
        yield members
        with atomic_open(path) as f:
            json.dump({"members": members}, f, indent=2, default=str)


def write_config(run: Path, member: str, config: dict) -> Path:
    """Record `config` as the member's entry of RUN/config.json; its path."""
    with _members(run) as members:
        members[member] = {**config, "command": redacted_command(sys.argv), "versions": versions()}
    return Path(run) / "config.json"


def record_result(run: Path, member: str, result: dict) -> None:
    """Add how the member's run ended to its entry of RUN/config.json."""
    with _members(run) as members:
        members[member]["result"] = result


def member_entry(run: Path, member: str) -> dict:
    """The member's entry of RUN/config.json ({} when it has none)."""
    path = Path(run) / "config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["members"].get(member, {})


def member_result(run: Path, member: str) -> dict | None:
    """The member's recorded result: None until a run of it ended by its own rules."""
    return member_entry(run, member).get("result")


def recorded_config(run: Path, member: str | None) -> dict | None:
    """The configuration a run of `member` recorded (trainers/config.py
    RunConfig.public()), or None."""
    return member_entry(run, member).get("config") if member else None


def append_rows(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    """Whole rows appended (a header first in a new file), flushed to disk."""
    if not rows:
        return
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


class TensorBoard:
    """Scalars into RUN/logs/tensorboard/<member> when tensorboard is installed; else nothing."""

    def __init__(self, run: Path, member: str, enabled: bool):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:   # tensorboard is optional
                return
            self.writer = SummaryWriter(str(logs_dir(run) / "tensorboard" / member))

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(run: Path, member: str) -> Path:
    """RUN/logs/<member>.png from the step and validation CSVs: loss per step
    (and its running mean), learning rate, and the validation metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = read_rows(logs_dir(run) / f"{member}_steps.csv")
    checks = read_rows(logs_dir(run) / f"{member}.csv")
    fig, (ax_loss, ax_lr, ax_val) = plt.subplots(1, 3, figsize=(15, 4.2))
    fig.suptitle(f"{member}: training run {Path(run).name}")
    x = [r["global_step"] for r in steps]
    loss = [r["loss"] for r in steps]
    ax_loss.plot(x, loss, marker="." if len(x) < 50 else None, alpha=0.45, label="per step")
    if len(loss) >= 10:
        window = max(5, len(loss) // 20)
        mean = [sum(loss[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                for i in range(len(loss))]
        ax_loss.plot(x, mean, label=f"running mean of {window}")
    ax_loss.set(title="training loss", xlabel="optimiser step", ylabel="loss (the recipe's)")
    ax_loss.legend(loc="upper right")
    ax_lr.plot(x, [r["lr"] for r in steps], marker="." if len(x) < 50 else None)
    ax_lr.set(title="learning rate", xlabel="optimiser step", ylabel="learning rate")
    cx = [r["global_step"] for r in checks]
    select_on = checks[-1]["select_on"] if checks else None
    for key, label in METRIC_NAMES.items():
        if checks and key in checks[0]:
            style = dict(linewidth=2.5, marker="o") if key == select_on else dict(marker=".", alpha=0.6)
            ax_val.plot(cx, [r[key] for r in checks], label=label + (" (selects)" if key == select_on else ""),
                        **style)
    ax_val.set(title="validation (higher is better)", xlabel="optimiser step", ylabel="metric value")
    if checks:
        ax_val.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = logs_dir(run) / f"{member}.png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)
    return path
