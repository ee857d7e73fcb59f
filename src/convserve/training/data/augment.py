"""Training-time augmentation from ``data.augment``: torchvision.transforms.v2, applied to each
uint8 ``[C, H, W]`` training image on its own (in DataLoader workers when ``num_workers`` > 0),
never to validation or test images."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from convserve.training.config import AugmentConfig

Transform = Callable[[Tensor], Tensor]


def build_augment(cfg: AugmentConfig, channels: int, size: tuple[int, int]) -> Transform | None:
    """The transform ``cfg`` describes for images of ``channels`` and ``size``; None when off."""
    if not cfg.enabled:
        return None
    # imported here: torchvision loads its models (and torch._dynamo) on import, a second
    # or more of every training process's start that a run without augmentation never uses
    from torchvision.transforms import v2

    steps: list[Callable[..., Tensor]] = []
    if cfg.pad_crop:
        steps.append(v2.RandomCrop(size, padding=cfg.pad_crop))
    if cfg.crop_scale is not None:
        steps.append(
            v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True)
        )
    if cfg.rotation:
        steps.append(v2.RandomRotation(cfg.rotation))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.color_jitter:
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j if channels == 3 else 0))
    return v2.Compose(steps)


def describe(cfg: AugmentConfig) -> str:
    """In words, for the run's tags: "random crop (pad 2), rotation up to 10 degrees"."""
    parts = []
    if cfg.pad_crop:
        parts.append(f"random crop (pad {cfg.pad_crop})")
    if cfg.crop_scale is not None:
        parts.append(f"random resized crop (area {cfg.crop_scale[0]:g}-{cfg.crop_scale[1]:g})")
    if cfg.rotation:
        parts.append(f"rotation up to {cfg.rotation:g} degrees")
    if cfg.hflip:
        parts.append(f"horizontal flip (p {cfg.hflip:g})")
    if cfg.color_jitter:
        parts.append(f"colour jitter {cfg.color_jitter:g}")
    return ", ".join(parts) or "none"
