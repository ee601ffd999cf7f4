"""The segmentation model shared by all six members (MEMBERS.md, "Shared by all members").

smp's FPN (encoder from the recipe, one output class, 3 or 4 input channels;
smp adapts the first convolution for 4) whose logits pass through a tiny
learned output gate: output = logits * gate(logits).
"""
from __future__ import annotations

import warnings

import segmentation_models_pytorch as smp
import torch
from torch import nn

ENCODER_WEIGHTS = ("imagenet", "none")


class WeightsUnavailable(RuntimeError):
    """Pretrained encoder weights were asked for and could not be fetched."""


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
    """The member model. encoder_weights "none" never touches the network."""
    if encoder_weights not in ENCODER_WEIGHTS:
        raise ValueError(f"encoder_weights {encoder_weights!r}: expected one of {ENCODER_WEIGHTS}")
    weights = None if encoder_weights == "none" else encoder_weights
    with warnings.catch_warnings():
        # smp warns that "timm-" encoder names are deprecated; the recipe names
        # the encoder the reference pipeline trained, so the warning is noise here.
        warnings.filterwarnings("ignore", message=".*encoders are deprecated.*")
        try:
            fpn = smp.FPN(encoder_name=encoder, encoder_weights=weights, classes=1,
                          in_channels=in_channels)
        except OSError as exc:  # huggingface_hub's network and cache errors are OSErrors
            raise WeightsUnavailable(
                f"could not fetch {encoder_weights!r} weights for encoder {encoder!r} "
                f"({type(exc).__name__}); this machine may be offline. Pass "
                "`--encoder-weights none` to train from random initialisation, or put the "
                "weights in the Hugging Face cache (HF_HOME) first."
            ) from None
    return GatedFPN(fpn)


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
