"""The lean graph: the served model's probabilities alone, on a graph without the feature
maps as outputs, and the whole graph for everything else."""

import logging
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from convserve import contract
from convserve.service.model import Source, lean_session, open_model
from convserve.service.sessions import with_outputs
from convserve.service.settings import Settings


def test_the_lean_graph_is_the_model_with_the_probabilities_as_its_one_output(onnx_path):
    whole = onnx.load(onnx_path)
    lean = onnx.load_from_string(with_outputs(onnx_path.read_bytes(), contract.PROBABILITIES))
    onnx.checker.check_model(lean)
    assert [o.name for o in whole.graph.output] == [
        "probabilities", "features.block1", "features.block2",
    ]  # fmt: skip
    assert [o.name for o in lean.graph.output] == ["probabilities"]
    assert lean.graph.output[0] == whole.graph.output[0]
    assert lean.graph.node == whole.graph.node
    assert lean.graph.initializer == whole.graph.initializer
    assert lean.metadata_props == whole.metadata_props
    assert lean.opset_import == whole.opset_import


@pytest.mark.parametrize(
    ("data", "keep", "says"),
    [
        (None, "features.block9", "0 outputs named 'features.block9'"),
        (b"\x3a\x10\x62", "probabilities", "ends inside a field"),
        (b"\x3a\xff", "probabilities", "ends inside a number"),
        (b"\x3b", "probabilities", "wire type 3"),
    ],
)
def test_a_graph_it_cannot_make_lean_is_refused_with_the_reason(onnx_path, data, keep, says):
    with pytest.raises(ValueError, match=says):
        with_outputs(data if data is not None else onnx_path.read_bytes(), keep)


class Runs:
    """A session's runs, counted, then passed on to the session."""

    def __init__(self, session):
        self.session, self.outputs = session, []

    def run(self, outputs, feeds, *options):
        self.outputs.append(list(outputs))
        return self.session.run(outputs, feeds, *options)


def test_the_probabilities_alone_run_on_the_lean_graph_and_feature_maps_on_the_whole(onnx_path):
    """After the load's checks the whole graph's session is closed; the first run that asks
    for a feature map opens it again, and it stays open."""
    model = open_model(Source(str(onnx_path), "model", "file", path=onnx_path), Settings())
    assert model.lean is not None
    assert [o.name for o in model.lean.get_outputs()] == ["probabilities"]
    assert model.session is None
    lean = Runs(model.lean)
    model.lean = lean  # type: ignore[assignment]
    x = np.random.default_rng(3).random((5, 1, 8, 8), np.float32)

    alone = model.run(x, ["probabilities"])["probabilities"]
    assert lean.outputs == [["probabilities"]]
    assert model.session is None

    both = model.run(x, ["probabilities", "features.block2"])
    assert lean.outputs == [["probabilities"]]
    whole = model.session
    assert whole is not None
    assert [o.name for o in whole.get_outputs()] == model.output_names
    np.testing.assert_allclose(alone, both["probabilities"], rtol=1e-5, atol=1e-6)
    assert both["features.block2"].shape == (5, 8, 4, 4)
    model.run(x, ["features.block1"])
    assert model.session is whole


def _cut(onnx_path, folder):
    """The file with its end cut off: not a model the lean graph can be made from."""
    path = folder / "cut.onnx"
    path.write_bytes(onnx_path.read_bytes()[:-7])
    return path


def _other_weights(onnx_path, folder):
    """The same graph with its first weights doubled: it loads, and answers otherwise."""
    model = onnx.load(onnx_path)
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 2, first.name))
    path = folder / "other.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("made_from", "says"),
    [
        (_cut, "the model ends inside"),
        (_other_weights, "its probabilities alone answered otherwise"),
    ],
)
def test_a_model_whose_lean_graph_cannot_be_trusted_is_served_whole(
    onnx_path, tmp_path, caplog, made_from, says
):
    """The lean graph is made from the model's file and checked against the loaded session:
    a file it cannot read, or one that answers otherwise than the session, leaves the model
    served by its whole graph, as the log says."""
    model = open_model(Source(str(onnx_path), "model", "file", path=onnx_path), Settings())
    path = made_from(onnx_path, tmp_path)
    model.source = replace(model.source, uri=str(path), path=path)
    with caplog.at_level(logging.INFO, logger="convserve.service.model"):
        assert lean_session(model) is None
    assert f"{path}: served by its whole graph" in caplog.text
    assert says in caplog.text
