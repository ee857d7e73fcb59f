"""The CNN builder: convolutional blocks, then flatten and a fully connected head.

Module names are stable and readable (``block1.conv``, ``head.fc1``, ``head.out``) because
feature maps, diagnostics and ONNX outputs are named after them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from convserve.training.activations import ActFactory, get_act_layer
from convserve.training.config import BlockConfig, ModelConfig

_POOL: dict[str, type[nn.Module]] = dict(max=nn.MaxPool2d, avg=nn.AvgPool2d)


class Normalize(nn.Module):
    """(x - mean) / std per channel, with statistics of the training split as buffers.

    Keeping it inside the model means checkpoints and the ONNX graph take raw [0, 1] pixels.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ConvBlock(nn.Module):
    """conv -> [batch norm] -> activation -> [pool] -> [dropout]; the feature map is ``act``'s."""

    def __init__(self, in_channels: int, cfg: BlockConfig, act_layer: ActFactory) -> None:
        super().__init__()
        padding = cfg.kernel_size // 2 if cfg.padding is None else cfg.padding
        self.conv = nn.Conv2d(
            in_channels,
            cfg.out_channels,
            cfg.kernel_size,
            cfg.stride,
            padding,
            bias=not cfg.batch_norm,
        )
        self.bn = nn.BatchNorm2d(cfg.out_channels) if cfg.batch_norm else nn.Identity()
        self.act = act_layer()
        if cfg.pool == "none":
            self.pool: nn.Module = nn.Identity()
        else:
            self.pool = _POOL[cfg.pool](cfg.pool_size, cfg.pool_stride or cfg.pool_size)
        self.drop = nn.Dropout2d(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feature = self.act(self.bn(self.conv(x)))
        return self.drop(self.pool(feature)), feature

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


class ConvNet(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.normalize = Normalize(mean or [0.0] * in_channels, std or [1.0] * in_channels)
        # Which activation follows each conv/linear layer: initialisers read their gain from it.
        self.layer_activation: dict[str, str] = {}

        channels = in_channels
        self.block_names: list[str] = []
        for i, block_cfg in enumerate(cfg.blocks, start=1):
            act_name = block_cfg.activation or cfg.activation
            block = ConvBlock(channels, block_cfg, get_act_layer(act_name, cfg.negative_slope))
            self.add_module(f"block{i}", block)
            self.block_names.append(f"block{i}")
            self.layer_activation[f"block{i}.conv"] = act_name
            channels = block_cfg.out_channels

        with torch.no_grad():  # the flatten size is computed, never configured
            probe = torch.zeros(1, in_channels, *image_size)
            try:
                for name in self.block_names:
                    probe = self.get_submodule(name)(probe)
            except RuntimeError as err:
                probe = torch.zeros(0)
                if "too small" not in str(err):
                    raise
        if probe.numel() == 0:
            raise ValueError(
                f"the blocks shrink a {image_size[0]}x{image_size[1]} image to nothing; "
                "use fewer pooling layers, smaller strides or a larger data.image_size"
            )
        self.feature_shapes = self._feature_shapes()
        self.head = self._build_head(cfg, probe.numel(), num_classes)

    def _build_head(self, cfg: ModelConfig, in_features: int, num_classes: int) -> nn.Sequential:
        act_layer = get_act_layer(cfg.activation, cfg.negative_slope)
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        width = in_features
        for i, hidden in enumerate(cfg.hidden, start=1):
            if cfg.dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(cfg.dropout)
            layers[f"fc{i}"] = nn.Linear(width, hidden)
            layers[f"act{i}"] = act_layer()
            self.layer_activation[f"head.fc{i}"] = cfg.activation
            width = hidden
        layers["out"] = nn.Linear(width, num_classes)
        self.layer_activation["head.out"] = "identity"  # softmax lives in the loss / ONNX graph
        return nn.Sequential(layers)

    def _feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        shapes = {}
        with torch.no_grad():
            x = torch.zeros(1, self.in_channels, *self.image_size)
            for name in self.block_names:
                x, feature = self.block(name).forward_features(x)
                shapes[name] = tuple(feature.shape[1:])
        return shapes  # type: ignore[return-value]

    def block(self, name: str) -> ConvBlock:
        block = self.get_submodule(name)
        assert isinstance(block, ConvBlock)
        return block

    def forward_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits and the activation output of every convolutional block, by block name."""
        x = self.normalize(x)
        features = {}
        for name in self.block_names:
            x, features[name] = self.block(name).forward_features(x)
        return self.head(x), features

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        for name in self.block_names:
            x = self.get_submodule(name)(x)
        return self.head(x)

    def weight_layers(self) -> dict[str, nn.Conv2d | nn.Linear]:
        """Every conv and linear layer by qualified name, in forward order."""
        return {
            name: module
            for name, module in self.named_modules()
            if isinstance(module, nn.Conv2d | nn.Linear)
        }


def build_model(
    cfg: ModelConfig,
    in_channels: int,
    image_size: tuple[int, int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ConvNet:
    return ConvNet(cfg, in_channels, image_size, num_classes, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
