import json
import math

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from convserve.training.checkpoint import load_model, read_checkpoint
from convserve.training.configfiles import load_config
from convserve.training.run import Callbacks, resolve_device, train


def test_same_config_and_seed_give_the_same_metrics(tiny):
    a = train(tiny("optim.max_steps=25"))
    b = train(tiny("optim.max_steps=25"))
    c = train(tiny("optim.max_steps=25", "seed=1"))
    assert a.metrics == b.metrics
    assert a.metrics != c.metrics


def test_a_cpu_run_trains_channels_last_and_saves_weights_any_model_loads(tiny):
    """On a CPU too, the training steps' convolutions see NHWC batches and weights (oneDNN's
    and the pooling kernels' fast layout, benchmarks/bench_train.py --memory-format); the
    checkpoint loads into a model built in PyTorch's default layout."""
    seen: list[tuple[bool, bool]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        # a step's forward pass (the model's size probe runs without gradients), in the
        # second block: with one channel, either layout's strides would pass
        step = module.training and torch.is_grad_enabled()
        if isinstance(module, torch.nn.Conv2d) and step and module.in_channels > 1:
            nhwc = torch.channels_last
            seen.append(
                (args[0].is_contiguous(memory_format=nhwc),
                 module.weight.is_contiguous(memory_format=nhwc))
            )  # fmt: skip

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        blocks = [{"out_channels": 4}, {"out_channels": 4}]
        model = {"blocks": blocks, "hidden": [], "activation": "relu"}
        result = train(tiny("optim.max_steps=3", model=model))
    finally:
        hook.remove()
    assert len(seen) >= 3 and all(batch and weight for batch, weight in seen), seen
    loaded, _, _, payload = load_model(result.best_checkpoint)
    x = payload["sample"]
    assert loaded.block2.conv.weight.is_contiguous()  # loaded in the default layout
    assert loaded(x).shape == (x.size(0), 10)


def test_checkpoint_holds_model_optimizer_epoch_best_and_config(tiny):
    cfg = tiny("optim.epochs=2")
    result = train(cfg)
    payload = read_checkpoint(result.best_checkpoint)
    assert set(payload) >= {"model", "optimizer", "epoch", "step", "best_metric", "config", "spec"}
    assert payload["config"] == cfg.model_dump(mode="json")
    assert payload["best_metric"] == pytest.approx(result.metrics["best_val_accuracy"])
    assert payload["spec"]["classes"] == [str(i) for i in range(10)]
    model, loaded_cfg, spec, _ = load_model(result.best_checkpoint)
    assert loaded_cfg == cfg and spec.image_size == (8, 8)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_resume_continues_where_the_last_checkpoint_stopped(tiny):
    full = train(tiny("optim.epochs=3"))
    first = train(tiny("optim.epochs=2"))
    trained: list[int] = []
    callbacks = Callbacks(on_epoch=lambda epoch, metrics: trained.append(epoch))
    resumed = train(tiny("optim.epochs=3"), resume=first.last_checkpoint, callbacks=callbacks)
    assert trained == [3]  # the history carries the epochs before it
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    assert read_checkpoint(resumed.last_checkpoint)["epoch"] == 3
    assert resumed.history[-1]["val_accuracy"] == pytest.approx(full.history[-1]["val_accuracy"])


def test_step_budget_and_early_stopping(tiny):
    steps = []
    result = train(
        tiny("optim.epochs=50", "optim.max_steps=7"),
        callbacks=Callbacks(on_step=lambda s, loss, acc: steps.append(s)),
    )
    assert steps == list(range(1, 8)) and len(result.history) == 1
    result = train(tiny("optim.epochs=40", "optim.early_stopping=1", "optim.lr=0.5"))
    assert len(result.history) < 40 and "early stopping" in result.message


def test_should_stop_cancels_between_steps(tiny):
    steps = []
    result = train(
        tiny("optim.epochs=5"),
        callbacks=Callbacks(
            on_step=lambda s, loss, acc: steps.append(s), should_stop=lambda: len(steps) >= 3
        ),
    )
    assert result.status == "cancelled" and steps == [1, 2, 3]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["none", "step", "cosine"])
def test_optimizers_and_schedules(tiny, optimizer, schedule):
    result = train(
        tiny(
            f"optim.optimizer={optimizer}",
            f"optim.schedule={schedule}",
            "optim.epochs=2",
            "optim.lr=0.05",
            "optim.grad_clip=1.0",
        )
    )
    assert result.status == "finished"
    assert result.metrics["val_accuracy"] > 0.3
    if schedule == "step":
        assert result.history[1]["lr"] == pytest.approx(0.005)


def test_cuda_where_there_is_none_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="device=cuda was asked for"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_tracking_to_the_default_sqlite_store(tiny, sqlite_uri, tmp_path):
    cfg = tiny(
        "tracking.enabled=true",
        f"tracking.tracking_uri={sqlite_uri}",
        "tracking.plots=end",
        "optim.epochs=2",
        "tracking.log_every=5",
    )
    result = train(cfg)
    client = MlflowClient(sqlite_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["init.name"] == "he_normal"
    assert run.data.params["model.blocks.0.out_channels"] == "8"
    assert run.data.tags["convserve.diagnosis"] == result.diagnosis.verdict
    assert json.loads(run.data.tags["convserve.diagnosis.json"]) == json.loads(
        json.dumps(result.diagnosis.to_dict())
    )
    assert run.data.tags["mlflow.note.content"].startswith(
        f"**Diagnosis: {result.diagnosis.verdict}**"
    )
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="diagnosis.json", tracking_uri=sqlite_uri
    )
    with open(local) as f:
        assert json.load(f)["verdict"] == result.diagnosis.verdict
    assert run.data.tags["convserve.dataset"] == "digits"
    metrics = run.data.metrics
    for key in (
        "train_loss",
        "val_accuracy",
        "test_accuracy",
        "train_loss_step",
        "diag.block1.conv.grad_std",
        "diag.block1.conv.weight_grad_norm",
        "diag.block1.conv.dead",
        "diag.head.out.update_ratio",
        "diag.grad_ratio",
    ):
        assert key in metrics, key
    assert len(client.get_metric_history(result.run_id, "val_accuracy")) == 2
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    for name in (
        "learning_curves",
        "activations_init",
        "activations_final",
        "gradients_init",
        "gradients_final",
        "gradient_flow",
        "confusion_matrix",
        "first_layer_filters",
        "feature_maps_0",
    ):
        assert f"plots/{name}.png" in artifacts, name
    # best.pt to export from, last.pt to resume from (a job lost with its worker)
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == [
        "checkpoints/best.pt",
        "checkpoints/last.pt",
    ]


def _plots(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path.removeprefix("plots/") for a in client.list_artifacts(run_id, "plots")}


def test_plots_are_written_only_when_asked_for_and_apart_from_the_diagnostics(tiny, sqlite_uri):
    """none (the default) writes none, with diagnostics on; end without diagnostics writes
    the figures that need none of them; epoch logs the curves after each epoch."""
    client = MlflowClient(sqlite_uri)
    tracked = ("tracking.enabled=true", f"tracking.tracking_uri={sqlite_uri}")
    plain = train(tiny(*tracked))
    assert plain.snapshots and _plots(client, plain.run_id) == set()
    bare = train(tiny(*tracked, "tracking.plots=end", "diagnostics.enabled=false"))
    assert _plots(client, bare.run_id) == {
        "learning_curves.png",
        "confusion_matrix.png",
        "first_layer_filters.png",
        *(f"feature_maps_{i}.png" for i in range(4)),
    }
    seen: list[set[str]] = []
    cfg = tiny(*tracked, "tracking.plots=epoch", "optim.epochs=2")

    def after_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run = client.search_runs([client.get_experiment_by_name("convserve").experiment_id])[0]
        seen.append(_plots(client, run.info.run_id))

    train(cfg, callbacks=Callbacks(on_epoch=after_epoch))
    # on_epoch comes before the epoch's plots: epoch 2 sees epoch 1's
    assert seen[0] == set() and seen[1] >= {"learning_curves.png", "gradient_flow.png"}
    # earlier configs, checkpoints and queued jobs said diagnostics.plots: read as before
    assert tiny("diagnostics.plots=true").tracking.plots == "end"
    assert tiny("diagnostics.plots=false", "tracking.plots=epoch").tracking.plots == "epoch"
    assert "plots" not in tiny("diagnostics.plots=false").diagnostics.model_dump()


def test_diverged_run_is_failed_in_mlflow_with_its_step(tiny, sqlite_uri):
    result = train(
        tiny(
            "tracking.enabled=true",
            f"tracking.tracking_uri={sqlite_uri}",
            "model.blocks=" + str([{"out_channels": 8, "pool": "none"}] * 3),
            "model.hidden=[32, 32]",
            "init.scale=6",
            "optim.optimizer=sgd",
            "optim.lr=0.1",
        )
    )
    assert result.status == "diverged"
    run = MlflowClient(sqlite_uri).get_run(result.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["convserve.status"] == "diverged"
    assert int(run.data.tags["convserve.diverged_step"]) >= 0
    assert run.data.tags["convserve.diagnosis"] == "exploding"
    assert "became non-finite at step" in run.data.tags["convserve.diagnosis.json"]


@pytest.mark.slow
def test_tracking_to_a_real_mlflow_server(tiny, mlflow_url, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    result = train(
        tiny("tracking.enabled=true", "tracking.experiment=server-test", "tracking.plots=end")
    )
    client = MlflowClient(mlflow_url)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert math.isclose(run.data.metrics["val_accuracy"], result.metrics["val_accuracy"])
    local = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="plots/learning_curves.png", tracking_uri=mlflow_url
    )
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_default_config_reaches_95_percent_on_the_default_data(tmp_path):
    cfg = load_config(
        "default",
        [
            "tracking.enabled=false",
            f"tracking.output_dir={tmp_path}",
            "device=cpu",
        ],
    )
    result = train(cfg)
    assert result.status == "finished"
    assert result.metrics["best_val_accuracy"] >= 0.95
    assert result.diagnosis.verdict == "healthy", result.diagnosis


def test_the_diagnosis_is_on_the_run_while_it_trains(tiny, sqlite_uri):
    """After each epoch the run's tags already hold the diagnosis so far, its last phase
    called "latest"; at the end, "end"."""
    seen: list[dict] = []
    client = MlflowClient(sqlite_uri)

    def on_epoch(epoch: int, _metrics: dict[str, float]) -> None:
        run = client.search_runs(
            [client.get_experiment_by_name("live").experiment_id], "", max_results=1
        )[0]
        seen.append(json.loads(run.data.tags["convserve.diagnosis.json"]))

    result = train(
        tiny(
            "tracking.enabled=true",
            f"tracking.tracking_uri={sqlite_uri}",
            "tracking.experiment=live",
            "optim.epochs=2",
        ),
        callbacks=Callbacks(on_epoch=on_epoch),
    )
    assert len(seen) == 2
    assert seen[0]["phases"][-1]["name"] == "latest"
    assert seen[1]["phases"][-1]["steps"][0] > seen[0]["phases"][-1]["steps"][0]
    final = json.loads(client.get_run(result.run_id).data.tags["convserve.diagnosis.json"])
    assert final["phases"][-1]["name"] == "end"
