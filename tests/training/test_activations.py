import math

import pytest
import torch

from convserve.training.activations import activation_names, gain_for, get_act_layer
from convserve.training.config import ModelConfig
from convserve.training.model import build_model


@pytest.mark.parametrize("name", activation_names())
def test_every_activation_builds_and_runs(name):
    cfg = ModelConfig(blocks=[{"out_channels": 4}], hidden=[8], activation=name)
    model = build_model(cfg, 1, (8, 8), 3)
    out = model(torch.rand(5, 1, 8, 8))
    assert out.shape == (5, 3) and torch.isfinite(out).all()
    assert model.layer_activation["block1.conv"] == name
    assert model.layer_activation["head.fc1"] == name
    assert gain_for(name) > 0


def test_leaky_relu_takes_the_configured_slope():
    act = get_act_layer("leaky_relu", 0.2)()
    assert act(torch.tensor([-1.0])).item() == pytest.approx(-0.2)
    assert gain_for("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))


def test_per_block_override():
    cfg = ModelConfig(
        blocks=[{"out_channels": 4, "activation": "tanh"}, {"out_channels": 4}], activation="relu"
    )
    model = build_model(cfg, 1, (8, 8), 2)
    assert isinstance(model.block1.act, torch.nn.Tanh)
    assert isinstance(model.block2.act, torch.nn.ReLU)


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of: elu, gelu"):
        get_act_layer("swish")
