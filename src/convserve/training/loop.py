"""One epoch of training, evaluation, optimisers and schedules (torchvision ``train.py`` style)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convserve.training.checkpoint import rng_state, set_rng_state, torch_rng_state
from convserve.training.config import OptimConfig
from convserve.training.data import Split
from convserve.training.data.augment import Transform
from convserve.training.diagnostics import Diagnostics, Snapshot, find_nonfinite
from convserve.training.distributed import Dist


class Diverged(Exception):
    """The loss became NaN or infinite at ``step``; ``layer`` is where non-finite values start."""

    def __init__(self, step: int, layer: str | None, loss: float) -> None:
        self.step, self.layer, self.loss = step, layer, loss
        where = f"first non-finite values in {layer}" if layer else "the loss itself"
        super().__init__(f"training diverged at step {step}: loss is {loss}; {where}")


@dataclass
class Position:
    """Where within an epoch training stopped: the epoch's batches done, its tally so far
    (summed loss, correct answers, examples seen) and every random generator's state before
    the next batch; a checkpoint holding it resumes at exactly that batch."""

    batches: int
    tally: tuple[float, int, int]
    rng: dict[str, Any]


class Stopped(Exception):
    """Training was asked to stop between two steps; ``step`` steps were done, and the
    epoch stopped at ``position``."""

    def __init__(self, step: int, position: Position | None = None) -> None:
        self.step, self.position = step, position
        super().__init__(f"stopped at step {step}")


@dataclass
class StepCallbacks:
    """Called by ``train_one_epoch``; each one is optional."""

    on_step: Callable[[int, float, float], None] | None = None  # (step, loss, accuracy)
    on_snapshot: Callable[[Snapshot], None] | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass
class Recipe:
    """How each optimizer step is taken, beyond the model and the batch: gradient clipping,
    per-class loss weights, mixed precision and the memory format."""

    grad_clip: float | None = None
    loss_weights: Tensor | None = None  # one per class: a weighted cross-entropy
    device_type: str = "cpu"
    autocast_dtype: torch.dtype | None = None  # None: full precision
    scaler: torch.amp.GradScaler | None = None  # fp16: keeps small gradients representable
    # NHWC batches and weights: what CUDA convolutions run fastest on, and on a CPU what
    # oneDNN's convolutions and torch's pooling kernels do (a step 1.2-1.6x faster than NCHW,
    # benchmarks/bench_train.py --memory-format)
    channels_last: bool = False
    dist: Dist | None = None  # a data-parallel run: the ranks agree on divergence and stops

    @classmethod
    def build(
        cls,
        cfg: OptimConfig,
        device: torch.device,
        loss_weights: Tensor | None = None,
        dist: Dist | None = None,
    ) -> Recipe:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        return cls(
            cfg.grad_clip,
            None if loss_weights is None else loss_weights.to(device),
            device.type,
            dtype,
            scaler,
            channels_last=device.type in ("cuda", "cpu"),
            dist=dist,
        )

    def autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    steps: int  # the global step after this epoch
    budget_spent: bool  # max_steps reached
    snapshots: list[Snapshot] = field(default_factory=list)


def _sgd(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _adam(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _adamw(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


OptimizerFactory = Callable[[list[nn.Parameter], OptimConfig], torch.optim.Optimizer]
_OPTIMIZERS: dict[str, OptimizerFactory] = dict(sgd=_sgd, adam=_adam, adamw=_adamw)

Scheduler = torch.optim.lr_scheduler.LRScheduler
# Stepped once per epoch; "none" keeps the learning rate constant.
_SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, OptimConfig], Scheduler | None]] = dict(
    none=lambda optimizer, cfg: None,
    step=lambda optimizer, cfg: torch.optim.lr_scheduler.StepLR(
        optimizer, cfg.step_size, cfg.gamma
    ),
    cosine=lambda optimizer, cfg: torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=cfg.epochs
    ),
)


def optimizer_names() -> list[str]:
    return sorted(_OPTIMIZERS)


def schedule_names() -> list[str]:
    return sorted(_SCHEDULES)


def _lookup(registry: dict[str, Any], kind: str, name: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(registry))}"
        ) from None


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return _lookup(_OPTIMIZERS, "optimizer", cfg.optimizer)(params, cfg)  # type: ignore[no-any-return]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> Scheduler | None:
    """Stepped once per epoch."""
    return _lookup(_SCHEDULES, "schedule", cfg.schedule)(optimizer, cfg)  # type: ignore[no-any-return]


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
    recipe: Recipe | None = None,
    diagnostics: Diagnostics | None = None,
    diag_every: int = 50,
    callbacks: StepCallbacks | None = None,
    transform: Transform | None = None,
    sample_weights: Tensor | None = None,
    compiled: nn.Module | None = None,
    wrapped: nn.Module | None = None,
    resume_at: Position | None = None,
) -> EpochResult:
    """Train over ``split`` once (or until ``max_steps``); raises ``Diverged`` or ``Stopped``.

    Every ``diag_every`` steps, the step is measured: activations and back-propagated
    gradients are recorded on the way, weights before and after the update compared.
    ``transform`` augments each training image; ``sample_weights`` (one per example) draws
    the batches in proportion to them; ``compiled`` (``torch.compile(model)``) takes the
    unmeasured steps, the hooks of the measured ones stay on the eager ``model``. In a
    data-parallel run (``recipe.dist``) ``batch_size`` is this rank's part of the batch, every
    step runs through ``wrapped`` (``DistributedDataParallel``), and every step's loss and
    accuracy and each snapshot are the global batch's. ``resume_at``: where a stopped epoch
    was left (``Stopped.position``); it goes on from there as if it had never stopped."""
    cb, recipe = callbacks or StepCallbacks(), recipe or Recipe()
    model.train()
    done = resume_at.batches if resume_at is not None else 0
    step, tally = start_step, _Tally(*(resume_at.tally if resume_at is not None else ()))
    snapshots: list[Snapshot] = []
    dist, stepper = recipe.dist, wrapped if wrapped is not None else model
    shard = None if dist is None else (dist.rank, dist.world)
    batches = split.batches(
        batch_size, True, seed, transform=transform, weights=sample_weights, shard=shard,
        pin_memory=device.type == "cuda", skip=done,
    )  # fmt: skip
    if resume_at is not None:
        set_rng_state(resume_at.rng)
    while max_steps is None or step < max_steps:
        rng = torch_rng_state()  # before the batch is drawn: what a resume starts from
        batch = next(batches, None)
        if batch is None:
            break  # an epoch whose last batch is done ends (validated, checkpointed) first
        stop = cb.should_stop is not None and cb.should_stop()
        x, y = _to_device(*batch, device, recipe)
        measure = diagnostics if step % diag_every == 0 else None
        try:
            if stop and dist is None:
                raise Stopped(step)
            counts, snap = _train_step(
                stepper, compiled, optimizer, x, y, step, recipe, measure, stop
            )
        except Stopped:  # where this epoch goes on: at this batch, its draw included
            raise Stopped(step, Position(done, tally.state(), rng_state(rng))) from None
        if snap is not None:
            snapshots.append(snap)
            if cb.on_snapshot is not None:
                cb.on_snapshot(snap)
        step, done = step + 1, done + 1
        loss_value, accuracy = tally.add(*counts)
        if cb.on_step is not None:
            cb.on_step(step, loss_value, accuracy)
    spent = max_steps is not None and step >= max_steps
    return EpochResult(*tally.result(), steps=step, budget_spent=spent, snapshots=snapshots)


@dataclass
class _Tally:
    """An epoch's summed loss and correct answers over the examples seen (every rank's)."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss_sum: float, correct: int, seen: int) -> tuple[float, float]:
        """Count a batch; its mean loss and accuracy."""
        self.loss += loss_sum
        self.correct += correct
        self.seen += seen
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def state(self) -> tuple[float, int, int]:
        return self.loss, self.correct, self.seen

    def result(self) -> tuple[float, float]:
        """The epoch's mean loss and accuracy."""
        return self.loss / max(self.seen, 1), self.correct / max(self.seen, 1)


def _to_device(x: Tensor, y: Tensor, device: torch.device, recipe: Recipe) -> tuple[Tensor, Tensor]:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if recipe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


Counts = tuple[float, int, int]  # a batch's summed loss, correct answers and size


def _train_step(
    model: nn.Module,
    compiled: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    step: int,
    recipe: Recipe,
    diagnostics: Diagnostics | None,
    stop: bool,
) -> tuple[Counts, Snapshot | None]:
    """One step, measured by ``diagnostics`` when given (on the eager ``model``; in a
    data-parallel run its snapshot is the global batch's), else through ``compiled``."""
    if diagnostics is None:
        plain = compiled if compiled is not None else model
        return _step(plain, optimizer, x, y, step, recipe, stop), None
    return _measured_step(model, optimizer, x, y, step, recipe, diagnostics, stop)


def _forward_backward(
    model: nn.Module, x: Tensor, y: Tensor, step: int, recipe: Recipe, stop: bool = False
) -> Counts:
    """The batch's counts after ``backward``; a non-finite loss raises
    ``Diverged``. In a data-parallel run the counts are the global batch's, and a
    divergence, or a stop asked of any rank, is agreed before the backward pass whose
    gradients the ranks exchange: every rank raises at the same step."""
    with recipe.autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y, weight=recipe.loss_weights)
    loss_value = float(loss.detach())
    nonfinite = not math.isfinite(loss_value)
    counts: Counts = (loss_value * y.size(0), int((logits.argmax(1) == y).sum()), y.size(0))
    inner = getattr(model, "module", model)  # DistributedDataParallel's replica
    if recipe.dist is not None:
        anywhere, stopped, counts = recipe.dist.agree(nonfinite, stop, counts)
        if stopped:
            raise Stopped(step)
        if anywhere:
            raise Diverged(step, find_nonfinite(inner, x) if nonfinite else None, loss_value)
    elif nonfinite:
        raise Diverged(step, find_nonfinite(inner, x), loss_value)
    (recipe.scaler.scale(loss) if recipe.scaler is not None else loss).backward()
    return counts


def _update(model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe) -> None:
    scaler = recipe.scaler
    if recipe.grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    step: int,
    recipe: Recipe,
    stop: bool = False,
) -> Counts:
    optimizer.zero_grad(set_to_none=True)
    counts = _forward_backward(model, x, y, step, recipe, stop)
    _update(model, optimizer, recipe)
    return counts


def _measured_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    step: int,
    recipe: Recipe,
    diagnostics: Diagnostics,
    stop: bool = False,
) -> tuple[Counts, Snapshot]:
    """One step with the diagnostics' hooks on; the snapshot is taken after the update (in a
    data-parallel run, from the sums of every rank)."""
    optimizer.zero_grad(set_to_none=True)
    diagnostics.grad_scale = float(recipe.scaler.get_scale()) if recipe.scaler is not None else 1.0
    diagnostics.ranks = recipe.dist.world if recipe.dist is not None else 1
    with diagnostics.measure():
        counts = _forward_backward(model, x, y, step, recipe, stop)
    diagnostics.before_step()
    _update(model, optimizer, recipe)
    reduce = recipe.dist.sum_tensor if recipe.dist is not None else None
    return counts, diagnostics.after_step(step + 1, reduce)


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
