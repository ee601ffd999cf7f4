"""The member model: FPN + output gate, channels, and what happens with weights."""
import socket

import pytest
import torch
from torch import nn

from engine.recipes import RECIPES
from trainers.model import GatedFPN, WeightsUnavailable, build_model
from trainers.train import main

SIZE = 64


@pytest.fixture
def network_calls(monkeypatch):
    """Every outgoing connection is refused and recorded; retries do not sleep."""
    calls = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise ConnectionRefusedError(111, "connection refused (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda seconds: None)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", "/nonexistent-hf-cache")
    return calls


@pytest.mark.parametrize("channels", [3, 4])
def test_output_is_the_gated_fpn_logits(channels):
    torch.manual_seed(0)
    recipe = RECIPES["comprehensive" if channels == 4 else "highres_no_ela"]
    model = build_model(recipe.encoder, recipe.in_channels, "none").eval()
    x = torch.randn(2, channels, SIZE, SIZE)
    with torch.no_grad():
        out = model(x)
        logits = model.fpn(x)
        expected = logits * model.gate.gate(logits)
    assert out.shape == (2, 1, SIZE, SIZE)
    torch.testing.assert_close(out, expected)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == channels


def test_gate_layers_are_as_specified():
    model = build_model(RECIPES["highres_no_ela"].encoder, 3, "none")
    assert isinstance(model, GatedFPN)
    layers = list(model.gate.gate)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Sigmoid"]
    convs = [layer for layer in layers if isinstance(layer, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 8, (1, 1)), (8, 4, (3, 3)), (4, 1, (1, 1))]


def test_no_weights_means_no_network(network_calls):
    build_model(RECIPES["highres_no_ela"].encoder, 3, "none")
    assert network_calls == []


def test_unavailable_weights_give_a_clear_error(network_calls):
    with pytest.raises(WeightsUnavailable, match="--encoder-weights none"):
        build_model(RECIPES["highres_no_ela"].encoder, 3, "imagenet")
    assert network_calls, "imagenet weights must actually be asked for"


def test_cli_reports_unavailable_weights_without_a_traceback(network_calls, demo_store, tmp_path, capsys):
    status = main(["--member", "highres_no_ela", "--store", str(demo_store), "--out", str(tmp_path),
                   "--encoder-weights", "imagenet", "--img-size", str(SIZE), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2
    assert "could not fetch 'imagenet' weights" in err and "Traceback" not in err


def test_unknown_weights_name_is_refused():
    with pytest.raises(ValueError, match="'imagenet21k'"):
        build_model(RECIPES["highres_no_ela"].encoder, 3, "imagenet21k")
