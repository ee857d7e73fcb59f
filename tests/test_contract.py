"""The ONNX and job-queue contracts: one module both sides read and write."""

import json

import pytest

from convserve import contract
from convserve.contract import MetadataError, ModelMetadata, Normalization, Resize
from tests.fresh import imported


def _meta(**changes) -> ModelMetadata:
    fields = dict(
        labels=["cat", "dog"],
        channels=3,
        height=16,
        width=12,
        color_mode="RGB",
        resize=Resize(size=(16, 12)),
        feature_outputs={"block1": [4, 16, 12], "block2": [8, 8, 6]},
        normalization=Normalization(mean=[0.5] * 3, std=[0.25] * 3),
        dataset="shapes",
        run_id="abc",
        config_hash="0123",
        version="0.1.0",
        opset=18,
    )
    return ModelMetadata(**{**fields, **changes})


def test_names_of_inputs_and_outputs():
    assert contract.INPUT == "image"
    assert contract.feature_output("block2") == "features.block2"
    assert contract.block_of("features.block2") == "block2"
    assert contract.output_names(["a", "b"]) == ["probabilities", "features.a", "features.b"]
    with pytest.raises(ValueError, match="not a feature-map output"):
        contract.block_of("probabilities")


def test_metadata_round_trips_through_string_properties():
    meta = _meta()
    props = meta.to_props()
    assert all(k.startswith("convserve.") and isinstance(v, str) for k, v in props.items())
    assert props["convserve.color_mode"] == "RGB" and props["convserve.dataset"] == "shapes"
    assert json.loads(props["convserve.labels"]) == ["cat", "dog"]
    assert ModelMetadata.from_props(props) == meta
    assert meta.output_names() == ["probabilities", "features.block1", "features.block2"]


def test_a_text_field_that_looks_like_a_number_stays_text():
    meta = _meta(dataset="123", run_id="")
    assert ModelMetadata.from_props(meta.to_props()).dataset == "123"


def test_older_exports_keyed_by_output_name_are_read():
    props = _meta().to_props()
    props["convserve.feature_outputs"] = json.dumps({"features.block1": [4, 16, 12]})
    assert ModelMetadata.from_props(props).blocks == ["block1"]


def test_missing_and_malformed_metadata_say_what_is_wrong():
    props = _meta().to_props()
    del props["convserve.labels"]
    with pytest.raises(MetadataError, match="no convserve.labels metadata"):
        ModelMetadata.from_props(props)
    props = _meta().to_props()
    props["convserve.height"] = "tall"
    with pytest.raises(MetadataError, match="convserve.height is not JSON"):
        ModelMetadata.from_props(props)
    props = _meta().to_props()
    props["convserve.channels"] = "2"
    with pytest.raises(MetadataError, match=r"convserve\.channels: "):
        ModelMetadata.from_props(props)


def test_contract_imports_only_pydantic():
    heavy = ("torch", "onnx", "onnxruntime", "numpy", "mlflow", "fastapi")
    assert imported("import convserve.contract", heavy) == []
