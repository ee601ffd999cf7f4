"""Numeric precision per device: one rule for training, validation, mining and prediction.

`precision` (train.py's --precision) chooses: "fp32" (no autocast), "bf16"
(bf16 autocast, on CUDA or the CPU), "fp16" (fp16 autocast with a gradient
scaler, CUDA only), or "auto": on CUDA bf16 where the GPU supports it
(Ampere and newer: no loss scaling needed) and fp16 with a gradient scaler
otherwise; on the CPU float32 (CPU autocast is slower than float32 for these
convolutions on small machines and changes results). A run validates in the
precision it trains in: a model validated in another precision would select
checkpoints on numbers training never saw. Mining and prediction use "auto".
"""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`; None: float32."""
    device = torch.device(device)
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16: for CUDA only (its gradient scaler); on the CPU "
                             "choose fp32 or bf16")
        return DTYPES[precision]
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str, precision: str = "auto"):
    """The context every forward pass on `device` runs under."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str = "auto") -> torch.amp.GradScaler | None:
    """A gradient scaler where fp16 needs one, else None."""
    return (torch.amp.GradScaler("cuda") if autocast_dtype(device, precision) == torch.float16
            else None)


def precision_name(device: torch.device | str, precision: str = "auto") -> str:
    dtype = autocast_dtype(device, precision)
    return "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
