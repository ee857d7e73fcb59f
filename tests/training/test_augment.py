"""Augmentation, class balance and mixed precision: what each does to the batches and the
step, on real data and real training runs."""

import json

import mlflow
import pytest
import torch

from convserve.training.config import AugmentConfig
from convserve.training.data import Split
from convserve.training.data.augment import build_augment, describe
from convserve.training.run import class_balance, train


def test_augmentation_changes_training_images_only_and_keeps_their_shape():
    assert build_augment(AugmentConfig(), 1, (8, 8)) is None
    cfg = AugmentConfig(pad_crop=2, rotation=15, crop_scale=(0.6, 1.0), color_jitter=0.3)
    transform = build_augment(cfg, 1, (8, 8))
    assert transform is not None
    assert describe(cfg) == (
        "random crop (pad 2), random resized crop (area 0.6-1), rotation up to 15 degrees, "
        "colour jitter 0.3"
    )
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    split = Split(torch.arange(64) % 4, images=images)
    plain = next(split.batches(64))[0]
    augmented = next(split.batches(64, transform=transform))[0]
    assert augmented.shape == plain.shape and augmented.dtype == plain.dtype
    assert float(augmented.min()) >= 0.0 and float(augmented.max()) <= 1.0
    changed = (augmented != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.9  # each image gets its own random change
    assert torch.equal(next(split.batches(64))[0], plain)  # without it, images are as stored


def test_the_sampler_draws_classes_evenly_and_the_weights_invert_the_shares():
    labels = torch.tensor([0] * 90 + [1] * 10)
    split = Split(labels, images=torch.zeros(100, 1, 4, 4, dtype=torch.uint8))
    counts = split.class_counts(2)
    assert counts == [90, 10]
    loss_weights, none = class_balance("weights", split, counts)
    assert none is None and loss_weights.tolist() == pytest.approx([100 / 180, 100 / 20])
    no_weights, sample_weights = class_balance("sampler", split, counts)
    assert no_weights is None
    drawn = torch.cat(
        [y for seed in range(10) for _, y in split.batches(50, seed=seed, weights=sample_weights)]
    )
    share = float((drawn == 1).float().mean())
    assert 0.4 < share < 0.6, share  # 10% of the data, about half of the batches
    assert class_balance("none", split, counts) == (None, None)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_like_full_precision(tiny, precision):
    full = train(tiny("optim.epochs=2"))
    mixed = train(tiny("optim.epochs=2", f"optim.precision={precision}"))
    assert mixed.status == "finished" and mixed.diagnosis.verdict == "healthy"
    assert mixed.metrics["train_loss"] != full.metrics["train_loss"]  # it did run in 16 bits
    assert mixed.metrics["val_accuracy"] > full.metrics["val_accuracy"] - 0.05
    # the fp16 gradient scale is divided out of the diagnostics
    g_full = full.snapshots[0].layers["block1.conv"]["grad_std"]
    g_mixed = mixed.snapshots[0].layers["block1.conv"]["grad_std"]
    assert g_mixed == pytest.approx(g_full, rel=0.1)


def test_a_run_records_its_class_counts_and_augmentation(tiny, sqlite_uri):
    result = train(
        tiny(
            "tracking.enabled=true",
            f"tracking.tracking_uri={sqlite_uri}",
            "data.augment.pad_crop=1",
            "data.augment.rotation=10",
            "data.balance=sampler",
            "optim.epochs=2",
        )
    )
    assert result.status == "finished" and result.metrics["val_accuracy"] > 0.5
    run = mlflow.tracking.MlflowClient(sqlite_uri).get_run(result.run_id)
    assert run.data.tags["convserve.augment"] == "random crop (pad 1), rotation up to 10 degrees"
    assert run.data.params["data.balance"] == "sampler"
    path = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="class_counts.json", tracking_uri=sqlite_uri
    )
    with open(path) as f:
        counts = json.load(f)
    assert list(counts) == [str(i) for i in range(10)] and sum(counts.values()) > 1000


def test_own_images_are_split_class_by_class(tmp_path):
    """An image folder with one class of 40 and one of 5: both are in every split, in
    proportion (a plain random split could leave the small one out of validation)."""
    from PIL import Image

    from convserve.training.config import DataConfig
    from convserve.training.data import load_data

    for name, count in (("big", 40), ("small", 5)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("L", (8, 8), 10 * i % 255).save(tmp_path / name / f"{i}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), val_fraction=0.2, test_fraction=0.2)
    data = load_data(cfg, seed=0)
    counts = {s: getattr(data, s).class_counts(2) for s in ("train", "val", "test")}
    assert counts == {"train": [24, 3], "val": [8, 1], "test": [8, 1]}
    again = load_data(cfg, seed=0)
    assert torch.equal(again.train.labels, data.train.labels)  # deterministic by seed


@pytest.mark.slow
def test_a_compiled_model_trains_and_keeps_its_diagnostics(tiny):
    eager = train(tiny("optim.max_steps=25"))
    compiled = train(tiny("optim.max_steps=25", "optim.compile=true"))
    assert compiled.status == "finished" and compiled.diagnosis.verdict == "healthy"
    assert len(compiled.snapshots) == len(eager.snapshots) == 3  # steps 1, 11, 21
    assert compiled.metrics["val_accuracy"] == pytest.approx(
        eager.metrics["val_accuracy"], abs=0.05
    )
