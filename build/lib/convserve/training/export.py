"""ONNX export with named feature-map outputs, and the checks every export must pass.

The graph takes ``image`` (float32 ``[batch, channels, height, width]``, pixels in [0, 1]);
normalisation and softmax are inside it. Outputs: ``probabilities`` ``[batch, classes]`` and
``features.<block>`` for every convolutional block: the output of the block's activation,
before pooling and dropout. Everything the service needs travels in ``metadata_props``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from convserve import __version__
from convserve.training.checkpoint import ModelSpec
from convserve.training.config import TrainConfig
from convserve.training.model import ConvNet

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "image"
PROBABILITIES = "probabilities"
PARITY_TOLERANCE = 1e-4
FEATURE_TENSOR = (
    "output of the block's activation function (after convolution and batch norm, before "
    "pooling and dropout), shape [batch, channels, height, width]"
)


class ExportCheckFailed(RuntimeError):
    """An export that must not be registered; the message says which check failed."""


class _Exported(nn.Module):
    """``image -> (probabilities, *feature maps)`` in block order."""

    def __init__(self, model: ConvNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        logits, features = self.model.forward_features(image)
        return (torch.softmax(logits, dim=1), *(features[n] for n in self.model.block_names))


def output_names(model: ConvNet) -> list[str]:
    return [PROBABILITIES, *(f"features.{n}" for n in model.block_names)]


def metadata(
    model: ConvNet, spec: ModelSpec, config: TrainConfig, run_id: str | None
) -> dict[str, str]:
    """The ``metadata_props`` of an export: all the service needs to serve it."""
    height, width = spec.image_size
    return {
        "convserve.labels": json.dumps(spec.classes),
        "convserve.channels": str(spec.channels),
        "convserve.height": str(height),
        "convserve.width": str(width),
        "convserve.color_mode": "L" if spec.channels == 1 else "RGB",
        "convserve.resize": json.dumps(
            {"method": "bilinear", "mode": "stretch", "size": [height, width]}
        ),
        "convserve.input": json.dumps(
            {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "range": [0.0, 1.0]}
        ),
        "convserve.feature_outputs": json.dumps(
            {f"features.{n}": list(model.feature_shapes[n]) for n in model.block_names}
        ),
        "convserve.feature_tensor": FEATURE_TENSOR,
        "convserve.normalization": json.dumps(
            {"mean": spec.mean, "std": spec.std, "inside_graph": True}
        ),
        "convserve.dataset": spec.dataset,
        "convserve.run_id": run_id or "",
        "convserve.config_hash": config.digest(),
        "convserve.version": __version__,
        "convserve.opset": str(OPSET),
    }


def export_onnx(
    model: ConvNet, spec: ModelSpec, config: TrainConfig, run_id: str | None, path: Path
) -> onnx.ModelProto:
    """Write one self-contained ``.onnx`` file (no external data) and return its proto."""
    model = model.cpu().eval()
    wrapper = _Exported(model).eval()
    example = torch.rand(2, spec.channels, *spec.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        wrapper,
        (example,),
        None,
        input_names=[INPUT_NAME],
        output_names=output_names(model),
        dynamic_shapes={"image": {0: batch}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if program is None:
        raise ExportCheckFailed("torch.onnx.export returned no program")
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(model, spec, config, run_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return proto


@dataclass
class ParityReport:
    max_abs_diff: dict[str, float]  # per output, the worst over every checked batch size
    batch_sizes: list[int]
    opset: int

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())


def check_export(
    model: ConvNet, path: Path, images: Tensor, tolerance: float = PARITY_TOLERANCE
) -> ParityReport:
    """``onnx.checker`` (full), onnxruntime load, then torch against onnxruntime on ``images``
    at batch size 1 and at the whole batch; raises ``ExportCheckFailed`` on any failure."""
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ExportCheckFailed(f"onnx.checker rejected {path.name}: {err}") from err
    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportCheckFailed(f"{path.name} refers to external data; exports are one file")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise ExportCheckFailed(f"onnxruntime cannot load {path.name}: {err}") from err
    names = output_names(model)
    got = [o.name for o in session.get_outputs()]
    if got != names:
        raise ExportCheckFailed(f"outputs are {got}, expected {names}")
    wrapper = _Exported(model.cpu().eval()).eval()
    worst = dict.fromkeys(names, 0.0)
    sizes = sorted({1, images.size(0)})
    for size in sizes:
        x = images[:size].cpu().float()
        with torch.no_grad():
            expected = [t.numpy() for t in wrapper(x)]
        actual = session.run(names, {INPUT_NAME: x.numpy()})
        for name, e, a in zip(names, expected, actual, strict=True):
            if e.shape != a.shape:
                raise ExportCheckFailed(
                    f"{name}: shape {a.shape} from onnxruntime, {e.shape} "
                    f"from torch at batch {size}"
                )
            diff = float(np.max(np.abs(e - a))) if e.size else 0.0
            worst[name] = max(worst[name], diff if np.isfinite(diff) else float("inf"))
    report = ParityReport(worst, sizes, OPSET)
    if report.worst > tolerance:
        bad = {k: f"{v:.3g}" for k, v in worst.items() if v > tolerance}
        raise ExportCheckFailed(f"onnxruntime differs from torch by more than {tolerance:g}: {bad}")
    return report


def read_metadata(path: Path) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
