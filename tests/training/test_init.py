import math

import pytest
import torch
from torch import nn

from convserve.training.config import InitConfig, ModelConfig
from convserve.training.init import fans, get_initializer, initialize, initializer_names
from convserve.training.model import build_model

torch.manual_seed(0)


def _linear(fan_in=1000, fan_out=1000):
    return nn.Sequential(nn.Linear(fan_in, fan_out))


def _init(module, name, activation="relu", slope=0.01, batch=None, **kwargs):
    initialize(module, InitConfig(name=name, **kwargs), {"0": activation}, slope, batch)
    return module[0].weight.detach()


def _close(value, target, rel=0.05):
    assert abs(value - target) <= rel * abs(target), f"{value} not within {rel:.0%} of {target}"


@pytest.mark.parametrize("name", initializer_names())
def test_every_initialiser_initialises_a_whole_model(name):
    cfg = ModelConfig(blocks=[{"out_channels": 8}, {"out_channels": 8}], hidden=[16])
    model = build_model(cfg, 1, (12, 12), 3)
    batch = torch.rand(64, 1, 12, 12)
    initialize(model, InitConfig(name=name), model.layer_activation, 0.01, batch)
    for layer in model.weight_layers().values():
        assert torch.isfinite(layer.weight).all()
        if name not in ("default",) and layer.bias is not None:
            assert torch.all(layer.bias == 0)
    assert torch.isfinite(model(batch)).all()


def test_he_normal_std_is_sqrt_2_over_fan_in():
    w = _init(_linear(), "he_normal")
    _close(float(w.std()), math.sqrt(2 / 1000))
    _close(float(w.mean()) + 1.0, 1.0, rel=0.01)


def test_he_normal_on_a_convolution_uses_the_receptive_field():
    conv = nn.Sequential(nn.Conv2d(64, 128, 5))
    w = _init(conv, "he_normal")
    assert fans(w) == (64 * 25, 128 * 25)
    _close(float(w.std()), math.sqrt(2 / (64 * 25)))


def test_he_gain_follows_the_leaky_relu_slope_and_mode():
    w = _init(_linear(1000, 500), "he_normal", activation="leaky_relu", slope=0.2)
    _close(float(w.std()), math.sqrt(2 / (1 + 0.2**2) / 1000))
    w = _init(_linear(1000, 500), "he_normal", mode="fan_out")
    _close(float(w.std()), math.sqrt(2 / 500))
    w = _init(_linear(), "he_normal", gain=1.0)  # an explicit gain wins
    _close(float(w.std()), math.sqrt(1 / 1000))


def test_he_uniform_bounds_and_std():
    w = _init(_linear(), "he_uniform")
    bound = math.sqrt(3) * math.sqrt(2 / 1000)
    assert float(w.abs().max()) <= bound
    _close(float(w.std()), math.sqrt(2 / 1000))


def test_xavier_uniform_std_and_bound():
    w = _init(_linear(1000, 600), "xavier_uniform", activation="tanh")
    _close(float(w.std()), math.sqrt(2 / 1600))
    assert float(w.abs().max()) <= math.sqrt(6 / 1600)


def test_xavier_normal_std():
    w = _init(_linear(1000, 600), "xavier_normal", activation="tanh")
    _close(float(w.std()), math.sqrt(2 / 1600))


def test_constant_makes_every_filter_identical():
    conv = nn.Sequential(nn.Conv2d(3, 16, 3))
    w = _init(conv, "constant", value=0.3)
    assert torch.all(w == 0.3)
    assert all(torch.equal(w[0], w[i]) for i in range(16))
    assert torch.all(_init(_linear(), "zeros") == 0)


def test_normal_and_uniform_use_their_parameters():
    w = _init(_linear(), "normal", mean=0.5, std=0.01)
    _close(float(w.mean()), 0.5, rel=0.01)
    _close(float(w.std()), 0.01)
    w = _init(_linear(), "uniform", a=-0.2, b=0.6)
    assert float(w.min()) >= -0.2 and float(w.max()) <= 0.6
    _close(float(w.mean()), 0.2)


def test_orthogonal_rows_are_orthonormal_times_gain():
    w = _init(_linear(300, 200), "orthogonal", activation="identity")
    torch.testing.assert_close(w @ w.T, torch.eye(200), atol=1e-4, rtol=0)
    w = _init(_linear(300, 200), "orthogonal", activation="relu")
    torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(200), atol=1e-4, rtol=0)


def test_lsuv_gives_unit_output_variance_in_every_layer():
    cfg = ModelConfig(
        blocks=[{"out_channels": 16}, {"out_channels": 16}], hidden=[32], activation="tanh"
    )
    model = build_model(cfg, 1, (16, 16), 4)
    batch = torch.rand(256, 1, 16, 16)
    initialize(
        model, InitConfig(name="lsuv", lsuv_tolerance=0.02), model.layer_activation, batch=batch
    )
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, n=n: outputs.__setitem__(n, o))
        for n, m in model.weight_layers().items()
    ]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    for name, out in outputs.items():
        assert abs(float(out.var()) - 1.0) < 0.02, name


def test_lsuv_without_data_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a batch"):
        _init(_linear(10, 10), "lsuv")


def test_default_is_pytorchs_own():
    w = _init(_linear(), "default")
    _close(float(w.std()), 1 / math.sqrt(3 * 1000))  # U(+-1/sqrt(fan_in))


def test_scale_and_bias():
    layer = _linear()
    initialize(layer, InitConfig(name="he_normal", scale=3.0, bias=0.1), {"0": "relu"})
    _close(float(layer[0].weight.detach().std()), 3 * math.sqrt(2 / 1000))
    assert torch.all(layer[0].bias == 0.1)


def test_unknown_initialiser_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of: constant, default"):
        get_initializer("glorot")
