import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from convserve.training.checkpoint import load_model
from convserve.training.export import (
    ExportCheckFailed,
    check_export,
    export_onnx,
    read_metadata,
)
from convserve.training.run import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import tiny_config

    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(
        tmp, "model.blocks=[{out_channels: 6}, {out_channels: 8, pool: avg}]", "optim.max_steps=20"
    )
    result = train(cfg)
    model, config, spec, payload = load_model(result.best_checkpoint)
    path = tmp / "model.onnx"
    export_onnx(model, spec, config, "run-123", path)
    return model, config, spec, payload, path


def test_one_file_with_named_outputs_and_dynamic_batch(trained):
    _model, _, _, _, path = trained
    assert not list(path.parent.glob("*.data"))
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == [
        "probabilities",
        "features.block1",
        "features.block2",
    ]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert proto.opset_import[0].version == 18
    onnx.checker.check_model(proto, full_check=True)


def test_metadata_carries_what_the_service_needs(trained):
    _model, config, spec, _, path = trained
    meta = read_metadata(path)
    assert meta.labels == spec.classes
    assert (meta.channels, meta.height, meta.width, meta.color_mode) == (1, 8, 8, "L")
    assert meta.resize.method == "bilinear" and meta.resize.size == (8, 8)
    assert meta.feature_outputs == {"block1": [6, 8, 8], "block2": [8, 4, 4]}
    assert meta.output_names() == ["probabilities", "features.block1", "features.block2"]
    assert "before pooling" in meta.feature_tensor
    assert (meta.run_id, meta.config_hash, meta.opset) == ("run-123", config.digest(), 18)
    assert meta.version
    # stored as plain convserve.* strings that any ONNX tool shows
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["convserve.labels"]) == spec.classes
    assert props["convserve.height"] == "8"


def test_onnxruntime_matches_torch_with_normalisation_and_softmax_inside(trained):
    model, _, _, payload, path = trained
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = payload["sample"][:5]
    probs, f1, f2 = session.run(
        ["probabilities", "features.block1", "features.block2"], {"image": x.numpy()}
    )
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(f2, feats["block2"].numpy(), atol=1e-4)
    assert f1.shape == (5, 6, 8, 8)
    report = check_export(model, path, payload["sample"])
    assert report.batch_sizes == [1, 32]
    assert report.worst < 1e-4 and set(report.max_abs_diff) == {
        "probabilities",
        "features.block1",
        "features.block2",
    }


def test_parity_check_refuses_tampered_weights(trained, tmp_path):
    model, _, _, payload, path = trained
    proto = onnx.load(str(path))
    weights = max(proto.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
    array = onnx.numpy_helper.to_array(weights).copy()
    array.flat[0] += 0.5
    weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    with pytest.raises(ExportCheckFailed, match="differs from torch by more than 0.0001"):
        check_export(model, tampered, payload["sample"])


def test_checker_refuses_a_broken_graph(trained, tmp_path):
    model, _, _, payload, path = trained
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ExportCheckFailed):
        check_export(model, broken, payload["sample"])
