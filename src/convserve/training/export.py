"""ONNX export with named feature-map outputs, and the checks every export must pass.

The names and the metadata follow ``convserve.contract``: ``image`` in, ``probabilities`` and
``features.<block>`` out (the output of each block's activation, before pooling and dropout),
``ModelMetadata`` in ``metadata_props``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from convserve import __version__, contract
from convserve.contract import INPUT, ModelMetadata, Normalization, Resize
from convserve.training.checkpoint import ModelSpec
from convserve.training.config import TrainConfig
from convserve.training.data import fit_for
from convserve.training.model import ConvNet

log = logging.getLogger(__name__)

OPSET = 18
PARITY_TOLERANCE = 1e-4


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
    return contract.output_names(model.block_names)


def metadata(
    model: ConvNet, spec: ModelSpec, config: TrainConfig, run_id: str | None
) -> ModelMetadata:
    """What the service needs to serve the export, as the contract's metadata model."""
    height, width = spec.image_size
    return ModelMetadata(
        labels=spec.classes,
        channels=spec.channels,  # type: ignore[arg-type]
        height=height,
        width=width,
        color_mode="L" if spec.channels == 1 else "RGB",
        resize=Resize(size=(height, width)),
        feature_outputs={n: list(model.feature_shapes[n]) for n in model.block_names},
        normalization=Normalization(mean=spec.mean, std=spec.std),
        fit=fit_for(config.data),
        dataset=spec.dataset,
        run_id=run_id or "",
        config_hash=config.digest(),
        version=__version__,
        opset=OPSET,
    )


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
        input_names=[INPUT],
        output_names=output_names(model),
        dynamic_shapes={INPUT: {0: batch}},
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    if program is None:
        raise ExportCheckFailed("torch.onnx.export returned no program")
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(model, spec, config, run_id).to_props())
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
        actual = session.run(names, {INPUT: x.numpy()})
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


def read_metadata(path: Path) -> ModelMetadata:
    """An export's ``convserve.*`` metadata, read as the service reads it."""
    proto = onnx.load(str(path), load_external_data=False)
    return ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
