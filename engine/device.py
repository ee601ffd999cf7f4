"""Which device to run on: --device auto|cpu|cuda[:N], for training and prediction.

Its own module, apart from engine/loader.py, so that prediction picks its
device without importing the loader's DALI, Numba and Kornia (an offline
notebook need not carry them). Torch is imported only where a device is
resolved, so that a command line offers DEVICES (--help) without it.
"""
from __future__ import annotations

import functools
import subprocess

DEVICES = ("auto", "cpu", "cuda")   # what every command line offers for --device


@functools.cache
def gpus_seen_by_driver() -> list[str]:
    """GPUs `nvidia-smi -L` lists (empty without nvidia-smi or a GPU)."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in done.stdout.splitlines() if line.startswith("GPU ")] if done.returncode == 0 else []


def _cuda_unusable_message(asked: str) -> str:
    import torch

    gpus = gpus_seen_by_driver()
    if not gpus:
        return f"device {asked!r} asked for, but CUDA is not available on this machine"
    return (f"nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0]}) but torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}) cannot use them: the NVIDIA driver is likely "
            "too old for this CUDA build. Update the driver (nvidia-smi shows its version and the "
            "newest CUDA it supports), or pass --device cpu to run on the CPU on purpose")


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without CUDA is an error, and so
    is 'auto' where the driver sees a GPU that torch cannot use (rather than
    training on the CPU for days without anyone noticing)."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if gpus_seen_by_driver():
            raise ValueError(_cuda_unusable_message(device))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(_cuda_unusable_message(device))
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: training and prediction run on 'cpu' or 'cuda'")
    return dev
