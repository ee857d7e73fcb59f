"""One epoch of training, evaluation, optimisers and schedules (torchvision ``train.py`` style)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convserve.training.config import OptimConfig
from convserve.training.data import Split
from convserve.training.diagnostics import Diagnostics, Snapshot, find_nonfinite


class Diverged(Exception):
    """The loss became NaN or infinite at ``step``; ``layer`` is where non-finite values start."""

    def __init__(self, step: int, layer: str | None, loss: float) -> None:
        self.step, self.layer, self.loss = step, layer, loss
        where = f"first non-finite values in {layer}" if layer else "the loss itself"
        super().__init__(f"training diverged at step {step}: loss is {loss}; {where}")


class Stopped(Exception):
    """Training was asked to stop (cancelled) between two steps; ``step`` steps were done."""

    def __init__(self, step: int) -> None:
        self.step = step
        super().__init__(f"cancelled at step {step}")


@dataclass
class StepCallbacks:
    """Called by ``train_one_epoch``; each one is optional."""

    on_step: Callable[[int, float, float], None] | None = None  # (step, loss, accuracy)
    on_snapshot: Callable[[Snapshot], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    steps: int  # the global step after this epoch
    budget_spent: bool  # max_steps reached
    snapshots: list[Snapshot] = field(default_factory=list)


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose one of: sgd, adam, adamw")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch."""
    if cfg.schedule == "none":
        return None
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of: none, step, cosine")


def train_one_epoch(
    model: nn.Module,
    split: Split,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    batch_size: int,
    seed: int,
    start_step: int,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    diagnostics: Diagnostics | None = None,
    diag_every: int = 50,
    callbacks: StepCallbacks | None = None,
) -> EpochResult:
    """Train over ``split`` once (or until ``max_steps``); raises ``Diverged`` or ``Stopped``."""
    cb = callbacks or StepCallbacks()
    model.train()
    step, total_loss, correct, seen = start_step, 0.0, 0, 0
    snapshots: list[Snapshot] = []
    for x, y in split.batches(batch_size, shuffle=True, seed=seed):
        if max_steps is not None and step >= max_steps:
            break
        if cb.should_stop is not None and cb.should_stop():
            raise Stopped(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        measure = diagnostics is not None and step % diag_every == 0
        optimizer.zero_grad(set_to_none=True)
        if measure:
            assert diagnostics is not None
            with diagnostics.measure():
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                loss.backward()
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise Diverged(step, find_nonfinite(model, x), loss_value)
        if not measure:
            loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if measure:
            assert diagnostics is not None
            diagnostics.before_step()
        optimizer.step()
        step += 1
        batch_correct = int((logits.detach().argmax(1) == y).sum())
        total_loss += loss_value * y.size(0)
        correct += batch_correct
        seen += y.size(0)
        if measure:
            assert diagnostics is not None
            snap = diagnostics.after_step(step)
            snapshots.append(snap)
            if cb.on_snapshot is not None:
                cb.on_snapshot(snap)
        if cb.on_step is not None:
            cb.on_step(step, loss_value, batch_correct / y.size(0))
    return EpochResult(
        loss=total_loss / max(seen, 1),
        accuracy=correct / max(seen, 1),
        steps=step,
        budget_spent=max_steps is not None and step >= max_steps,
        snapshots=snapshots,
    )


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: Tensor  # [classes, classes], rows are true labels


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, *, device: torch.device, batch_size: int, num_classes: int
) -> EvalResult:
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for x, y in split.batches(batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        pred = logits.argmax(1)
        correct += int((pred == y).sum())
        seen += y.size(0)
        confusion += torch.bincount(
            (y * num_classes + pred).cpu(), minlength=num_classes * num_classes
        ).view(num_classes, num_classes)
    return EvalResult(total_loss / max(seen, 1), correct / max(seen, 1), confusion)
