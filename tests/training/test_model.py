import pytest
import torch

from convserve.training.config import ModelConfig
from convserve.training.model import build_model, count_parameters


@pytest.mark.parametrize(
    ("channels", "size"), [(1, (28, 28)), (3, (32, 32)), (3, (21, 37)), (1, (8, 8))]
)
def test_any_channels_and_size(channels, size):
    cfg = ModelConfig(blocks=[{"out_channels": 6}, {"out_channels": 12}], hidden=[10])
    model = build_model(cfg, channels, size, 5)
    logits, features = model.forward_features(torch.rand(2, channels, *size))
    assert logits.shape == (2, 5)
    assert list(features) == ["block1", "block2"]
    assert features["block1"].shape == (2, 6, *size)  # the activation output, before pooling
    assert tuple(features["block2"].shape[1:]) == model.feature_shapes["block2"]


def test_stable_module_names():
    cfg = ModelConfig(
        blocks=[
            {"out_channels": 4, "batch_norm": True, "dropout": 0.1},
            {"out_channels": 4, "pool": "avg"},
        ],
        hidden=[8, 6],
        dropout=0.2,
    )
    model = build_model(cfg, 1, (16, 16), 3)
    names = list(model.weight_layers())
    assert names == ["block1.conv", "block2.conv", "head.fc1", "head.fc2", "head.out"]
    assert isinstance(model.block1.bn, torch.nn.BatchNorm2d)
    assert model.block1.conv.bias is None  # batch norm has its own shift
    assert isinstance(model.block2.pool, torch.nn.AvgPool2d)
    assert isinstance(model.head.drop1, torch.nn.Dropout)


def test_conv_options_and_no_pooling():
    cfg = ModelConfig(
        blocks=[{"out_channels": 4, "kernel_size": 5, "stride": 2, "padding": 0, "pool": "none"}],
        hidden=[],
    )
    model = build_model(cfg, 1, (28, 28), 2)
    assert model.feature_shapes["block1"] == (4, 12, 12)
    assert model.head.out.in_features == 4 * 12 * 12


def test_normalisation_is_inside_the_model():
    cfg = ModelConfig(blocks=[{"out_channels": 2}], hidden=[])
    model = build_model(cfg, 3, (4, 4), 2, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    x = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(model.normalize(x)[0, 1], torch.full((4, 4), 0.5))


def test_too_many_pools_is_a_clear_error():
    cfg = ModelConfig(blocks=[{"out_channels": 2}] * 4, hidden=[])
    with pytest.raises(ValueError, match="shrink a 8x8 image to nothing"):
        build_model(cfg, 1, (8, 8), 2)


def test_convolution_needs_far_fewer_parameters_than_a_dense_layer():
    conv = build_model(
        ModelConfig(blocks=[{"out_channels": 16, "pool": "none"}], hidden=[]), 1, (28, 28), 10
    )
    dense = build_model(ModelConfig(blocks=[], hidden=[16 * 28 * 28]), 1, (28, 28), 10)
    conv_layer = sum(p.numel() for p in conv.block1.parameters())
    dense_layer = sum(p.numel() for p in dense.head.fc1.parameters())
    assert conv_layer == 16 * 9 + 16
    assert dense_layer == 784 * 16 * 784 + 16 * 784
    assert count_parameters(conv) < count_parameters(dense)
