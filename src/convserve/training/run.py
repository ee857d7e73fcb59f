"""A whole training run: data, model, init, epochs, checkpoints, diagnostics, MLflow."""

from __future__ import annotations

import dataclasses
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
from convserve.training.attribution import Setup
from convserve.training.checkpoint import ModelSpec, read_checkpoint, rng_state, save_checkpoint
from convserve.training.config import TrainConfig
from convserve.training.data import DataBundle, Split, load_data
from convserve.training.data.augment import build_augment, describe
from convserve.training.diagnosis import Diagnosis, diagnose
from convserve.training.diagnostics import Diagnostics, Snapshot, capture_values
from convserve.training.init import initialize
from convserve.training.loop import (
    Diverged,
    Position,
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

# "stopped": asked to stop (SIGTERM, a draining worker), to be resumed; "cancelled": by its user
Status = Literal["finished", "diverged", "cancelled", "stopped"]


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
    # why training stopped when ``should_stop`` said so ("cancelled" when not given)
    stop_status: Callable[[], Status] | None = None
    # tags of the caller's, set with the run's last ones while it is still RUNNING (given the
    # run's end status): a sweep's trial state
    end_tags: Callable[[str], dict[str, str]] | None = None


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


def _asks_for_more(cfg: TrainConfig, payload: dict[str, Any]) -> bool:
    """Whether ``cfg`` trains longer than the finished run of ``payload`` did (more epochs,
    or a larger step budget): a resume that extends a run."""
    saved = TrainConfig.model_validate(payload["config"]).optim
    steps, saved_steps = cfg.optim.max_steps or math.inf, saved.max_steps or math.inf
    return cfg.optim.epochs > saved.epochs or steps > saved_steps


def _already_finished(
    cfg: TrainConfig, payload: dict[str, Any], start: _Start, path: Path
) -> TrainResult:
    """``--resume`` of a run that ended: its outcome as it was, nothing trained or written."""
    diagnosis = diagnose(
        start.snapshots,
        cfg.diagnostics,
        setup=Setup.of(cfg),
    )
    message = f"the run had finished already (epoch {payload['epoch']}, step {payload['step']})"
    return TrainResult(
        "finished",
        payload["run_id"],
        dict(payload.get("metrics", {})),
        diagnosis,
        None,
        path,
        message + ": nothing to resume",
        start.history,
        start.snapshots,
    )


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


@dataclass
class _Start:
    """Where a run starts: from scratch, or from a checkpoint's exact position."""

    epoch: int = 1
    step: int = 0
    best: float = -math.inf
    position: Position | None = None  # within ``epoch``
    history: list[dict[str, float]] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    scaler: dict[str, Any] | None = None
    finished: bool = False  # the checkpoint's run had ended: nothing is left to train
    best_epoch: dict[str, Any] | None = None  # the best epoch's weights, epoch, step, metrics
    since_best: int = 0  # epochs without improvement (early stopping)


def _restore(
    payload: dict[str, Any], model: ConvNet, optimizer: torch.optim.Optimizer, scheduler: Any
) -> _Start:
    """Load a checkpoint into the model, optimizer and scheduler; where training goes on."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    start = _Start(payload["epoch"] + 1, payload["step"], payload["best_metric"])
    saved = payload.get("position")
    if saved is not None:  # a checkpoint of this format: the exact place to go on from
        start.epoch = saved["epoch"]
        start.position = Position(saved["batches"], tuple(saved["tally"]), saved["rng"])
    start.history = list(payload.get("history", []))
    start.snapshots = [Snapshot(s["step"], s["layers"]) for s in payload.get("snapshots", [])]
    start.scaler, start.finished = payload.get("scaler"), bool(payload.get("finished"))
    start.best_epoch, start.since_best = payload.get("best_epoch"), payload.get("since_best", 0)
    return start


def _join(cfg: TrainConfig) -> distributed.Dist | None:
    """This rank's place when torchrun started the process, after checking what a
    data-parallel run cannot do; None for one process."""
    dist = distributed.from_env(cfg.device)
    if dist is not None:
        distributed.check(
            cfg.data.batch_size, dist.world, balance=cfg.data.balance, compile=cfg.optim.compile
        )
    return dist


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
    after publishing). Divergence, a stop and a cancel end the run with a status and a
    message, never with an exception; any other error marks the MLflow run ``FAILED`` and is
    raised. A resume of a finished run returns its outcome, training and writing nothing."""
    cb = callbacks or Callbacks()
    dist = _join(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device, dist)
    data = load_data(cfg.data, cfg.seed, tracking_uri(cfg.tracking))
    spec = ModelSpec(data.classes, data.channels, data.image_size, data.mean, data.std, data.name)
    model = build_for(cfg, data).to(device)
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim)
    start, payload = _Start(), None
    if resume is not None:
        payload = read_checkpoint(resume)
        start = _restore(payload, model, optimizer, scheduler)
        run_id = run_id or payload["run_id"]
    if payload is not None and start.finished and not _asks_for_more(cfg, payload):
        return _already_finished(cfg, payload, start, Path(str(resume)))
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
        if resume is not None:  # what an earlier stop or failure left on the run is gone
            tracker.clear_tags(["convserve.message", "convserve.status"])
        session = _Session(
            cfg, data, spec, model, optimizer, scheduler, tracker, device, ckpt_dir, cb, dist
        )
        return session.run(start)
    except BaseException as err:
        if tracker.run_id is not None:
            message = f"{type(err).__name__}: {err}"[:5000]
            tracker.set_tags({"convserve.status": "failed", "convserve.message": message})
            tracker.end("FAILED")
        raise


# how a run's end reads in MLflow
_MLFLOW_STATUS = {
    "finished": "FINISHED",
    "diverged": "FAILED",
    "cancelled": "KILLED",
    "stopped": "KILLED",
}


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
        # the best epoch so far, in ``last.pt`` too: a resume elsewhere writes best.pt again
        self.best_epoch: dict[str, Any] | None = None
        self.since_best = 0
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
            setup=Setup.of(cfg),
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
            "convserve.diagnosis.knob": diagnosis.knob,
            "convserve.diagnosis.json": diagnosis.to_json(),
            "mlflow.note.content": diagnosis.markdown()[:8000],
        }

    def _save(
        self,
        name: str,
        epoch: int,
        step: int,
        metrics: dict[str, float],
        weights: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path | None:
        """Write ``name`` (rank 0 only) after ``epoch`` complete epochs and ``step`` steps;
        ``weights``: other than the model's (the best epoch's)."""
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
            best_metric=self.best,
            metrics=metrics,
            run_id=self.tracker.run_id,
            sample=self.sample,
            weights=weights,
            extra=extra,
        )

    def _save_last(
        self,
        epoch: int,
        step: int,
        metrics: dict[str, float],
        position: Position | None = None,
        finished: bool = False,
        name: str = "last.pt",
    ) -> Path | None:
        """``last.pt`` (or ``name``), with what an exact resume needs; ``position``: where
        the next epoch stopped (default: at its start)."""
        where = position or Position(0, (0.0, 0, 0), rng_state())
        scaler = self.recipe.scaler
        resume = {
            "position": {"epoch": epoch + 1, **dataclasses.asdict(where)},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "history": self.history,
            "snapshots": [{"step": s.step, "layers": s.layers} for s in self.snapshots],
            "finished": finished,
            "best_epoch": self.best_epoch,
            "since_best": self.since_best,
        }
        return self._save(name, epoch, step, metrics, extra=resume)

    def run(self, start: _Start) -> TrainResult:
        """Train from ``start`` to the end, an early stop, a divergence or a stop."""
        self.history, self.snapshots = list(start.history), list(start.snapshots)
        if start.scaler is not None and self.recipe.scaler is not None:
            self.recipe.scaler.load_state_dict(start.scaler)
        self._begin(fresh=start.step == 0)
        self.best, self.best_path, self.last_path = start.best, None, None
        self.best_epoch, self.since_best = start.best_epoch, start.since_best
        if self.best_epoch is not None:
            b = self.best_epoch
            self.best_path = self._save(
                "best.pt", b["epoch"], b["step"], b["metrics"], weights=b["weights"]
            )
        status: Status = "finished"
        message = ""
        step, position = start.step, start.position
        self.step = step
        # a resume from the last epoch's checkpoint of a run that had ended (lost while it
        # finished) trains nothing more: it goes on to finish
        last_epoch = start.epoch - 1 if self._ended(start) else self.cfg.optim.epochs
        try:
            for epoch in range(start.epoch, last_epoch + 1):
                step, budget_spent = self._epoch(epoch, step, position)
                position, self.step = None, step
                self._checkpoint(epoch, step)
                self._epoch_plots()
                if budget_spent:
                    break
                patience = self.cfg.optim.early_stopping
                if patience is not None and self.since_best >= patience:
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
            status = self.cb.stop_status() if self.cb.stop_status is not None else "cancelled"
            message = f"{status} at step {err.step}; --resume continues from that step"
            self.step = err.step
            self._keep_where_stopped(err)
        return self._finish(status, message, self.best_path, self.last_path)

    def _ended(self, start: _Start) -> bool:
        """Whether ``start``, an epoch's end, is where training ended: the step budget spent
        or early stopping's patience run out."""
        optim = self.cfg.optim
        spent = optim.max_steps is not None and start.step >= optim.max_steps
        patience = optim.early_stopping
        return spent or (patience is not None and start.since_best >= patience)

    def _begin(self, fresh: bool) -> None:
        """Announce the step budget; plot the histograms at initialisation (``fresh``: a
        run that starts at step 0)."""
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
        if self.diag is not None and cfg.tracking.plots != "none" and self.main and fresh:
            x, y = self.data.train.sample(256)
            plots.value_histograms(
                capture_values(self.model, self.diag, x.to(self.device), y.to(self.device)),
                "init",
                self.plot_dir,
            )

    def _epoch(self, epoch: int, step: int, position: Position | None) -> tuple[int, bool]:
        """Train (from ``position`` within it) and validate one epoch, log it; (the global
        step, step budget spent)."""
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
            resume_at=position,
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

    def _checkpoint(self, epoch: int, step: int) -> None:
        """Save ``last.pt``, and ``best.pt`` when validation accuracy improved."""
        metrics = self.history[-1]
        improved = metrics["val_accuracy"] > self.best
        self.best = max(self.best, metrics["val_accuracy"])
        self.since_best = 0 if improved else self.since_best + 1
        if not self.main:  # not rank 0: it keeps no checkpoint
            return
        if improved or self.best_epoch is None:
            weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best_epoch = dict(weights=weights, epoch=epoch, step=step, metrics=metrics)
        self.last_path = self._save_last(epoch, step, metrics)
        if self.last_path is not None:  # in the artifacts too: a lost job resumes elsewhere
            self.tracker.log_artifact(self.last_path, "checkpoints")
        if improved or self.best_path is None:
            self.best_path = self._save("best.pt", epoch, step, metrics)

    def _keep_where_stopped(self, stopped: Stopped) -> None:
        """A stopped run keeps ``last.pt`` at the exact place it stopped (the epoch's batches
        done, the random generators' states), from which a resume goes on as if it had never
        stopped."""
        done = self.history[-1] if self.history else {}
        epoch = int(done["epoch"]) if done else 0
        self.last_path = self._save_last(epoch, stopped.step, done, stopped.position)
        if self.last_path is not None:
            self.tracker.log_artifact(self.last_path, "checkpoints")

    def _finish(
        self, status: Status, message: str, best_path: Path | None, last_path: Path | None
    ) -> TrainResult:
        cfg, data = self.cfg, self.data
        final: dict[str, float] = dict(self.history[-1]) if self.history else {}
        # A later --resume of a finished run says so and does nothing: its last.pt says
        # "finished" once everything below is logged, not before (a job lost in between
        # resumes from the last epoch's last.pt and logs it all).
        pending = None
        if status == "finished" and self.history:  # the last weights, before best.pt's load
            pending = self._save_last(
                int(final["epoch"]), self.step, final, finished=True, name="last.finished.pt"
            )
        evaluation = None
        if status != "stopped":  # a stopped run is measured when it has finished
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
        if evaluation is not None and status != "diverged":
            final.update({"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss})
            summary = {"test_accuracy": evaluation.accuracy, "test_loss": evaluation.loss}
            if "best_val_accuracy" in final:
                summary["best_val_accuracy"] = final["best_val_accuracy"]
            self.tracker.log_metrics(summary, self.step)
        diagnosis = self._diagnose()
        self.tracker.log_dict(diagnosis.to_dict(), "diagnosis.json")
        if evaluation is not None:
            self._write_plots(status, evaluation.confusion)
            self.tracker.log_artifacts(self.plot_dir, "plots")
        if best_path is not None:
            self.tracker.log_artifact(best_path, "checkpoints")
        self.tracker.set_tags(
            {
                **self._diagnosis_tags(diagnosis),
                "convserve.status": status,
                **({"convserve.message": message} if message else {}),
                **(self.cb.end_tags(status) if self.cb.end_tags is not None else {}),
            }
        )
        if pending is not None:
            last_path = pending.replace(pending.with_name("last.pt"))
            self.tracker.log_artifact(last_path, "checkpoints")
        self.tracker.end(_MLFLOW_STATUS[status])
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

    def _epoch_plots(self) -> None:
        """``tracking.plots: epoch``: the learning curves and gradient flow so far, logged
        after every epoch."""
        if self.cfg.tracking.plots != "epoch" or not self.main:
            return
        self._progress_plots()
        self.tracker.log_artifacts(self.plot_dir, "plots")

    def _progress_plots(self) -> None:
        if self.history:
            plots.learning_curves(self.history, self.plot_dir / "learning_curves.png")
        if self.snapshots:
            plots.gradient_flow(self.snapshots, self.plot_dir / "gradient_flow.png")

    def _write_plots(self, status: Status, confusion: torch.Tensor) -> None:
        if self.cfg.tracking.plots == "none" or not self.main:
            return
        folder = self.plot_dir
        self._progress_plots()
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
