"""Numeric precision per device: one rule for training, validation, mining and prediction.

On CUDA every forward pass runs under autocast, bf16 where the GPU supports
it (Ampere and newer: no loss scaling needed) and fp16 with a gradient scaler
otherwise; on the CPU everything stays float32 (CPU autocast is slower than
float32 for these convolutions on small machines and changes results).
A model validated or mined in another precision than it was trained in would
select checkpoints and flag images on numbers training never saw.
"""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 or fp16 on CUDA, None (float32) elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str):
    """The context every forward pass on `device` runs under."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device | str) -> torch.amp.GradScaler | None:
    """A gradient scaler where fp16 needs one (CUDA without bf16), else None."""
    return torch.amp.GradScaler("cuda") if autocast_dtype(device) == torch.float16 else None


def precision_name(device: torch.device | str) -> str:
    dtype = autocast_dtype(device)
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
