"""The segmentation model shared by all six members.

smp's FPN (encoder from the recipe, one output class, 3 or 4 input channels;
smp adapts the first convolution for 4) whose logits pass through a tiny
learned output gate: output = logits * gate(logits). Encoder weights come
from ImageNet (the Hugging Face cache), a file on disk, or nowhere (random).
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import warnings
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.encoders._utils import patch_first_conv
from torch import nn

ENCODER_WEIGHTS = ("imagenet", "none")
# Seconds to wait for the weights hub to answer before treating the machine as
# offline: huggingface_hub would otherwise retry with backoff for about 30 s
# (docs/performance.md, "Training and sizes").
HUB_PROBE_SECONDS = 3


class WeightsUnavailable(RuntimeError):
    """Pretrained encoder weights were asked for and could not be had."""


def encoder_weights_arg(value: str) -> str:
    """argparse type of --encoder-weights: imagenet, none, or a weight file on disk."""
    if value in ENCODER_WEIGHTS or Path(value).is_file():
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: expected imagenet, none, or the path of a weight file (.pth, .bin, "
        ".safetensors) that exists")


def hub_reachable() -> bool:
    """Whether the weights hub answers a TCP connection within HUB_PROBE_SECONDS."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def _read_weight_file(path: Path) -> dict:
    """A state dict from a timm or smp weight file, unwrapped from the usual
    containers ("state_dict", "model") and prefixes ("encoder.", "fpn.encoder.")."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a foreign file
        raise WeightsUnavailable(f"{path}: not a readable weight file ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{path}: holds no state dict")
    for prefix in ("fpn.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _load_encoder_file(encoder: nn.Module, path: Path, name: str) -> None:
    """The file's weights into `encoder` (3 input channels); every encoder
    parameter the forward uses must be found, with its shape."""
    state = _read_weight_file(path)
    own = encoder.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    # the classifier head timm keeps and segmentation never runs may be absent
    needed = [k for k in own if k not in usable and not k.startswith(("conv_head.", "bn2.", "classifier."))]
    if needed:
        raise WeightsUnavailable(
            f"{path}: not weights for encoder {name!r}: {len(needed)} of its tensors are missing or "
            f"of another shape (e.g. {needed[0]!r}); pass the file of this encoder, or --encoder")
    encoder.load_state_dict(usable, strict=False)


class OutputGate(nn.Module):
    """1x1 conv 1->8, BN, ReLU, 3x3 conv 8->4, BN, ReLU, 1x1 conv 4->1, sigmoid."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv2d(1, 8, 1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            nn.Conv2d(4, 1, 1), nn.Sigmoid(),
        )

    def forward(self, logits):
        return logits * self.gate(logits)


class GatedFPN(nn.Module):
    """FPN whose logits pass through OutputGate; forward returns gated logits."""

    def __init__(self, fpn: nn.Module):
        super().__init__()
        self.fpn = fpn
        self.gate = OutputGate()

    def forward(self, x):
        return self.gate(self.fpn(x))


def build_model(encoder: str, in_channels: int, encoder_weights: str = "imagenet") -> GatedFPN:
    """The member model. encoder_weights: "imagenet" (downloaded once into the
    Hugging Face cache; an offline machine uses the cache or fails within
    seconds), "none" (random initialisation; never touches the network), or
    the path of a timm/smp weight file for this encoder."""
    from_file = encoder_weights not in ENCODER_WEIGHTS
    if from_file and not Path(encoder_weights).is_file():
        raise ValueError(f"encoder_weights {encoder_weights!r}: expected one of {ENCODER_WEIGHTS} "
                         "or the path of a weight file that exists")
    offline = encoder_weights == "imagenet" and not hub_reachable()
    weights = "imagenet" if encoder_weights == "imagenet" else None
    with warnings.catch_warnings(), _hub_offline(offline):
        # smp warns that "timm-" encoder names are deprecated; the recipe names
        # the encoder the reference pipeline trained, so the warning is noise here.
        warnings.filterwarnings("ignore", message=".*encoders are deprecated.*")
        try:
            fpn = smp.FPN(encoder_name=encoder, encoder_weights=weights, classes=1,
                          in_channels=3 if from_file else in_channels)
        except OSError as exc:  # huggingface_hub's network and cache errors are OSErrors
            why = (f"the weights hub did not answer within {HUB_PROBE_SECONDS} s and they are not "
                   "in the cache" if offline else type(exc).__name__)
            raise WeightsUnavailable(
                f"could not fetch {encoder_weights!r} weights for encoder {encoder!r} ({why}); "
                "pass `--encoder-weights none` to train from random initialisation, "
                "`--encoder-weights PATH` with a weight file on disk, or fill the Hugging Face "
                "cache (HF_HOME) on a connected machine first."
            ) from None
    if from_file:
        _load_encoder_file(fpn.encoder, Path(encoder_weights), encoder)
        if in_channels != 3:   # smp's own adaptation of a pretrained first convolution
            if hasattr(fpn.encoder, "set_in_channels"):
                fpn.encoder.set_in_channels(in_channels, pretrained=True)
            else:                  # timm's universal encoders lack the method
                patch_first_conv(fpn.encoder, in_channels, pretrained=True)
    return GatedFPN(fpn)


def _hub_offline(offline: bool):
    """huggingface_hub in offline mode (cache only, no retries) when asked."""
    if not offline:
        return contextlib.nullcontext()
    return mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True)


# Side of the probe input: FPN needs sides divisible by 32, and every encoder
# smp offers reaches its deepest stage at 64 px.
_PROBE_SIDE = 64


def freeze_unused(model: nn.Module, in_channels: int) -> list[str]:
    """Stop training the parameters the forward pass never reaches; their names.

    smp's timm-efficientnet encoders keep the classifier's conv_head and bn2,
    which the segmentation forward skips. DistributedDataParallel expects a
    gradient for every trainable parameter and fails at the second step
    without one. Freezing them (rather than deleting them) keeps every
    checkpoint's keys, so old and new checkpoints load alike; DDP and the
    optimiser skip frozen parameters. `find_unused_parameters=True` would
    instead walk the autograd graph after every backward pass.

    Found by one backward pass of a zero image in eval mode: nothing random is
    drawn and BatchNorm's running statistics do not move."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(torch.zeros(1, in_channels, _PROBE_SIDE, _PROBE_SIDE)).sum().backward()
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for name, parameter in model.named_parameters():
        if name in unused:
            parameter.requires_grad_(False)
    return unused
