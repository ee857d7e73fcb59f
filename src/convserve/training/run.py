"""A whole training run: data, model, init, epochs, checkpoints, diagnostics, MLflow."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from convserve.training import distributed, plots
from convserve.training.checkpoint import ModelSpec, read_checkpoint, save_checkpoint
from convserve.training.config import TrainConfig
from convserve.training.data import DataBundle, Split, load_data
from convserve.training.data.augment import build_augment, describe
from convserve.training.diagnosis import Diagnosis, diagnose
from convserve.training.diagnostics import Diagnostics, Snapshot, capture_values
from convserve.training.init import initialize
from convserve.training.loop import (
    Diverged,
    Recipe,
    StepCallbacks,
    Stopped,
    evaluate,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from convserve.training.model import ConvNet, build_model, count_parameters
from convserve.training.tracking import Tracker, tracking_uri

log = logging.getLogger(__name__)

Status = Literal["finished", "diverged", "cancelled"]


@dataclass
class TrainResult:
    status: Status
    run_id: str | None
    metrics: dict[str, float]
    diagnosis: Diagnosis
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    message: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)


@dataclass
class Callbacks:
    """Progress for the CLI and jobs; all optional."""

    on_start: Callable[[int], None] | None = None  # total steps
    on_step: Callable[[int, float, float], None] | None = None
    on_epoch: Callable[[int, dict[str, float]], None] | None = None
    should_stop: Callable[[], bool] | None = None


def resolve_device(name: str, dist: distributed.Dist | None = None) -> torch.device:
    """The device ``name`` says; in a data-parallel run on GPUs, this rank's GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device=cuda was asked for, but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use device=cpu or device=auto"
        )
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist is not None:
        return torch.device("cuda", dist.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_for(cfg: TrainConfig, data: DataBundle) -> ConvNet:
    """Build and initialise the model that ``cfg`` describes for ``data``."""
    model = build_model(
        cfg.model, data.channels, data.image_size, data.num_classes, data.mean, data.std
    )
    batch = data.train.sample(256)[0]  # what data-dependent initialisers (lsuv) measure on
    initialize(model, cfg.init, model.layer_activation, cfg.model.negative_slope, batch)
    return model


def class_balance(
    balance: str, train: Split, counts: list[int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-class loss weights, per-example sampling weights) for ``data.balance``: each
    class weighted by the inverse of its share, so every class counts alike on average."""
    if balance == "none":
        return None, None
    present = torch.tensor(counts, dtype=torch.float64)
    per_class = torch.where(present > 0, present.sum() / (len(counts) * present.clamp_min(1)), 0.0)
    if balance == "weights":
        return per_class.float(), None
    return None, per_class[train.labels]


def _checkpoint_dir(cfg: TrainConfig, run_id: str | None) -> Path:
    name = run_id or time.strftime("local-%Y%m%d-%H%M%S")
    return Path(cfg.tracking.output_dir) / name


def _restore(
    resume: str | Path,
    model: ConvNet,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[int, int, float, str | None]:
    """Load the checkpoint ``resume`` into the model, optimizer and scheduler: (the epoch to
    start, the step reached, the best metric, the run it belongs to)."""
    payload = read_checkpoint(resume)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return payload["epoch"] + 1, payload["step"], payload["best_metric"], payload["run_id"]


def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    run_id: str | None = None,
    callbacks: Callbacks | None = None,
    tags: dict[str, str] | None = None,
    client: Any = None,
    end_run: bool = True,
) -> TrainResult:
    """Train ``cfg`` from scratch (or from the checkpoint ``resume``) and return the outcome.

    ``run_id`` continues an existing MLflow run (a scheduled job); ``tags`` are added to the
    run; ``client`` is the MLflow client to write through (default: one for the config's
    tracking URI); ``end_run=False`` leaves the run open for its owner (a job's worker ends it
    after publishing). Divergence and cancellation end the run with a status and a message,
    never with an exception; any other error marks the MLflow run ``FAILED`` and is raised.
    """
    cb = callbacks or Callbacks()
    dist = distributed.from_env(cfg.device)  # started by torchrun: one rank of several
    if dist is not None:
        distributed.check(
            cfg.data.batch_size, dist.world, balance=cfg.data.balance, compile=cfg.optim.compile
        )
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device, dist)
    data = load_data(cfg.data, cfg.seed, tracking_uri(cfg.tracking))
    spec = ModelSpec(data.classes, data.channels, data.image_size, data.mean, data.std, data.name)
    model = build_for(cfg, data).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim)
    start_epoch, step, best = 1, 0, -math.inf
    if resume is not None:
        start_epoch, step, best, saved_run = _restore(resume, model, optimizer, scheduler)
        run_id = run_id or saved_run
    if dist is not None and not dist.main:  # rank 0 alone logs and keeps checkpoints
        cfg = cfg.model_copy(
            update={"tracking": cfg.tracking.model_copy(update={"enabled": False})}
        )
        run_id = None
    tracker = Tracker(cfg.tracking, client, end_run)
    run_id = tracker.start(
        cfg,
        run_id,
        tags={
            "convserve.dataset": data.name,
            "convserve.parameters": str(count_parameters(model)),
            **(tags or {}),
        },
    )
    try:
        if data.uploaded is not None and tracker.run_id is not None:
            from convserve.training.uploads import log_input

            log_input(tracker.client, tracker.run_id, *data.uploaded, "training")
        ckpt_dir = _checkpoint_dir(cfg, run_id)
        session = _Session(
            cfg, data, spec, model, optimizer, scheduler, tracker, device, ckpt_dir, cb, dist
        )
        return session.run(start_epoch, step, best)
    except BaseException as err:
        if tracker.run_id is not None:
            message = f"{type(err).__name__}: {err}"[:5000]
            tracker.set_tags({"convserve.status": "failed", "convserve.message": message})
            tracker.end("FAILED")
        raise


class _Session:
    """The state of one run while it trains; ``train`` builds it, ``run`` drives it."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: DataBundle,
        spec: ModelSpec,
        model: ConvNet,
        optimizer: torch.optim.Optimizer,
        scheduler: object,
        tracker: Tracker,
        device: torch.device,
        ckpt_dir: Path,
        cb: Callbacks,
        dist: distributed.Dist | None = None,
    ) -> None:
        self.cfg, self.data, self.spec, self.model = cfg, data, spec, model
        self.optimizer, self.scheduler, self.tracker = optimizer, scheduler, tracker
        self.device, self.ckpt_dir, self.cb = device, ckpt_dir, cb
        self.dist = dist
        self.main = dist is None or dist.main  # logs, checkpoints and plots
        # this rank's part of the global batch, and the replica that exchanges gradients
        self.batch_size = cfg.data.batch_size // (dist.world if dist else 1)
        self.wrapped: torch.nn.Module | None = None
        if dist is not None:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, device_ids=ids)
        self.history: list[dict[str, float]] = []
        self.snapshots: list[Snapshot] = []
        self.diag = Diagnostics(model, cfg.diagnostics) if cfg.diagnostics.enabled else None
        counts = data.train.class_counts(data.num_classes)
        self.transform = build_augment(cfg.data.augment, data.channels, data.image_size)
        loss_weights, self.sample_weights = class_balance(cfg.data.balance, data.train, counts)
        self.recipe = Recipe.build(cfg.optim, device, loss_weights, dist)
        if self.recipe.channels_last:
            model.to(memory_format=torch.channels_last)
        self.class_counts = dict(zip(data.classes, counts, strict=True))
        # The same parameters, traced: plain steps run it, measured steps the eager module.
        self.compiled: torch.nn.Module | None = (
            torch.compile(model) if cfg.optim.compile else None  # type: ignore[assignment]
        )
        self.plot_dir = ckpt_dir / "plots"
        self.best = -math.inf
        self.best_path: Path | None = None
        self.last_path: Path | None = None
        self.diverged: tuple[int, str | None] | None = None  # (step, first non-finite layer)
        # A few validation images travel in every checkpoint, for the export parity check.
        self.sample = data.val.sample(32)[0]

    def _on_step(self, step: int, loss: float, accuracy: float) -> None:
        if step % self.cfg.tracking.log_every == 0:
            self.tracker.log_metrics(
                {"train_loss_step": loss, "train_accuracy_step": accuracy}, step
            )
        if self.cb.on_step is not None:
            self.cb.on_step(step, loss, accuracy)

    def _on_snapshot(self, snap: Snapshot) -> None:
        self.snapshots.append(snap)
        tags = self._diagnosis_tags(self._diagnose(running=True))
        self.tracker.log_metrics(snap.metrics(), snap.step, tags)

    def _diagnose(self, running: bool = False) -> Diagnosis:
        cfg = self.cfg
        return diagnose(
            self.snapshots,
            cfg.diagnostics,
            activation=cfg.model.activation,
            init=cfg.init.name,
            scale=cfg.init.scale,
            diverged=self.diverged,
            running=running,
        )

    @staticmethod
    def _diagnosis_tags(diagnosis: Diagnosis) -> dict[str, str]:
        """The cause, searchable (``tags.convserve.diagnosis = 'exploding'``), its words for
        the runs table, the whole diagnosis as JSON, and the run page's description."""
        return {
            "convserve.diagnosis": diagnosis.verdict,
            "convserve.diagnosis.summary": diagnosis.summary,
            "convserve.diagnosis.evidence": diagnosis.evidence,
            "convserve.diagnosis.advice": diagnosis.advice,
            "convserve.diagnosis.json": diagnosis.to_json(),
            "mlflow.note.content": diagnosis.markdown()[:8000],
        }

    def _save(
        self, name: str, epoch: int, step: int, best: float, metrics: dict[str, float]
    ) -> Path | None:
        if not self.main:
            return None
        return save_checkpoint(
            self.ckpt_dir / name,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            config=self.cfg,
            spec=self.spec,
            epoch=epoch,
            step=step,
            best_metric=best,
            metrics=metrics,
            run_id=self.tracker.run_id,
            sample=self.sample,
        )

    def run(self, start_epoch: int, step: int, best: float) -> TrainResult:
        """Train from ``start_epoch`` to the end, an early stop, a divergence or a cancel."""
        self._begin()
        self.best, self.best_path, self.last_path = best, None, None
        status: Status = "finished"
        message = ""
        since_best = 0
        try:
            for epoch in range(start_epoch, self.cfg.optim.epochs + 1):
                step, budget_spent = self._epoch(epoch, step)
                since_best = 0 if self._checkpoint(epoch, step) else since_best + 1
                if budget_spent:
                    break
                patience = self.cfg.optim.early_stopping
                if patience is not None and since_best >= patience:
                    message = f"early stopping after epoch {epoch}"
                    break
        except Diverged as err:
            status, message = "diverged", str(err)
            self.diverged = (err.step, err.layer)
            self.tracker.set_tags(
                {
                    "convserve.diverged_step": str(err.step),
                    "convserve.diverged_layer": str(err.layer),
                }
            )
        except Stopped as err:
            status, message = "cancelled", str(err)
            self._keep_where_stopped(start_epoch, err.step)
        return self._finish(status, message, self.best_path, self.last_path)

    def _begin(self) -> None:
        """Announce the step budget; plot the histograms at initialisation."""
        cfg = self.cfg
        steps_per_epoch = math.ceil(len(self.data.train) / cfg.data.batch_size)
        total = steps_per_epoch * cfg.optim.epochs
        if cfg.optim.max_steps is not None:
            total = min(total, cfg.optim.max_steps)
        if self.cb.on_start is not None:
            self.cb.on_start(total)
        # What the run trained on: images per class, and the augmentation in words.
        self.tracker.log_dict(self.class_counts, "class_counts.json")
        counts = ", ".join(f"{k}: {v}" for k, v in self.class_counts.items())
        self.tracker.set_tags(
            {
                "convserve.class_counts": counts[:5000],
                "convserve.augment": describe(cfg.data.augment),
            }
        )
        if self.diag is not None and cfg.diagnostics.plots and self.main:
            x, y = self.data.train.sample(256)
            plots.value_histograms(
                capture_values(self.model, self.diag, x.to(self.device), y.to(self.device)),
                "init",
                self.plot_dir,
            )

    def _epoch(self, epoch: int, step: int) -> tuple[int, bool]:
        """Train and validate one epoch, log it; (the global step, step budget spent)."""
        cfg = self.cfg
        result = train_one_epoch(
            self.model,
            self.data.train,
            self.optimizer,
            device=self.device,
            batch_size=self.batch_size,
            seed=cfg.seed * 1000 + epoch,
            start_step=step,
            max_steps=cfg.optim.max_steps,
            recipe=self.recipe,
            transform=self.transform,
            sample_weights=self.sample_weights,
            compiled=self.compiled,
            wrapped=self.wrapped,
            diagnostics=self.diag,
            diag_every=cfg.diagnostics.every,
            callbacks=StepCallbacks(self._on_step, self._on_snapshot, self.cb.should_stop),
        )
        val = evaluate(
            self.model,
            self.data.val,
            device=self.device,
            batch_size=cfg.data.batch_size,
            num_classes=self.data.num_classes,
        )
        metrics = {
            "epoch": float(epoch),
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "val_loss": val.loss,
            "val_accuracy": val.accuracy,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self.history.append(metrics)
        self.tracker.log_metrics(metrics, result.steps)
        if self.cb.on_epoch is not None:
            self.cb.on_epoch(epoch, metrics)
        if self.scheduler is not None:
            self.scheduler.step()  # type: ignore[attr-defined]
        return result.steps, result.budget_spent

    def _checkpoint(self, epoch: int, step: int) -> bool:
        """Save ``last.pt``, and ``best.pt`` when validation accuracy improved (returned)."""
        metrics = self.history[-1]
        improved = metrics["val_accuracy"] > self.best
        self.best = max(self.best, metrics["val_accuracy"])
        self.last_path = self._save("last.pt", epoch, step, self.best, metrics)
        if self.last_path is None:  # not rank 0: it keeps no checkpoint
            return improved
        # In the run's artifacts too: a job lost with its worker resumes from it elsewhere.
        self.tracker.log_artifact(self.last_path, "checkpoints")
        if improved or self.best_path is None:
            self.best_path = self._save("best.pt", epoch, step, self.best, metrics)
        return improved

    def _keep_where_stopped(self, start_epoch: int, step: int) -> None:
        """A cancelled run keeps ``last.pt`` where it stopped: the epoch counts as not done,
        so a resume repeats it."""
        done = self.history[-1] if self.history else {}
        epoch = int(done.get("epoch", start_epoch - 1))
        self.last_path = self._save("last.pt", epoch, step, self.best, done)
        if self.last_path is not None:
            self.tracker.log_artifact(self.last_path, "checkpoints")

    def _finish(
        self, status: Status, message: str, best_path: Path | None, last_path: Path | None
    ) -> TrainResult:
        cfg, data = self.cfg, self.data
        final: dict[str, float] = dict(self.history[-1]) if self.history else {}
        if best_path is not None:
            best = read_checkpoint(best_path)
            final["best_val_accuracy"] = best["best_metric"]
            self.model.load_state_dict(best["model"])
        split = data.test if data.test is not None else data.val
        evaluation = evaluate(
            self.model,
            split,
            device=self.device,
            batch_size=cfg.data.batch_size,
            num_classes=data.num_classes,
        )
        if status != "diverged":
            final.update({"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss})
            summary = {"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss}
            if "best_val_accuracy" in final:
                summary["best_val_accuracy"] = final["best_val_accuracy"]
            self.tracker.log_metrics(summary, 0)
        diagnosis = self._diagnose()
        self.tracker.log_dict(diagnosis.to_dict(), "diagnosis.json")
        self._write_plots(status, evaluation.confusion)
        self.tracker.log_artifacts(self.plot_dir, "plots")
        if best_path is not None:
            self.tracker.log_artifact(best_path, "checkpoints")
        self.tracker.set_tags(
            {
                **self._diagnosis_tags(diagnosis),
                "convserve.status": status,
                **({"convserve.message": message} if message else {}),
            }
        )
        self.tracker.end(
            {"finished": "FINISHED", "diverged": "FAILED", "cancelled": "KILLED"}[status]
        )
        if self.diag is not None:
            self.diag.close()
        return TrainResult(
            status,
            self.tracker.run_id,
            final,
            diagnosis,
            best_path,
            last_path,
            message,
            self.history,
            self.snapshots,
        )

    def _write_plots(self, status: Status, confusion: torch.Tensor) -> None:
        if not self.cfg.diagnostics.plots or not self.main:
            return
        folder = self.plot_dir
        if self.history:
            plots.learning_curves(self.history, folder / "learning_curves.png")
        if self.snapshots:
            plots.gradient_flow(self.snapshots, folder / "gradient_flow.png")
        if status != "diverged":
            plots.confusion_matrix(confusion, self.data.classes, folder / "confusion_matrix.png")
            plots.first_layer_filters(self.model, folder / "first_layer_filters.png")
            images, labels = self.data.val.sample(256)
            plots.feature_maps(self.model, images[:4].to(self.device), folder)
            if self.diag is not None:
                plots.value_histograms(
                    capture_values(
                        self.model, self.diag, images.to(self.device), labels.to(self.device)
                    ),
                    "final",
                    folder,
                )
