"""``python -m convserve.training``: one training run, in every process ``torchrun`` starts.

On one machine, ``convserve train --nproc-per-node N`` runs it for you. On several, start
the same command on each node with a c10d rendezvous::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint node0.example:29400 --rdzv-id my-run \\
        -m convserve.training --config default --set optim.epochs=5

Rank 0 prints each epoch and the result, logs to MLflow and keeps the checkpoints. SIGTERM or
SIGINT to any rank stops every rank at the next step they agree on; rank 0 keeps ``last.pt``
at that exact place (``--resume`` continues from it as if the run had not stopped) and the
run ends ``stopped``. Exits 0 when training finishes or was stopped so (torchrun would report
a rank that exits otherwise as failed), 1 when it diverges, 2 on a bad config.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from convserve.processes import SignalFlag

if TYPE_CHECKING:
    from convserve.training.run import TrainResult


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convserve.training",
        description="One training run; under torchrun, one rank of a data-parallel run.",
    )
    parser.add_argument("--config", default="default", help="a YAML file or a shipped name")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="FIELD=VALUE, repeatable"
    )
    parser.add_argument("--resume", help="a checkpoint (last.pt) to continue from")
    parser.add_argument("--run-id", help="continue this MLflow run (a queued job's)")
    parser.add_argument(
        "--keep-run-open", action="store_true", help="leave the MLflow run for its job to end"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    # first of all: a stop asked for while torch loads is kept, not a dead rank
    stop = SignalFlag()  # SIGINT and SIGTERM may come together: no lock in the handler
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))

    def say(text: str, err: bool = False) -> None:
        if rank == 0:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)

    from convserve.training.config import ConfigError
    from convserve.training.configfiles import apply_overrides, load_config, validate_config

    try:
        if args.resume:
            from convserve.training.checkpoint import read_checkpoint

            base = read_checkpoint(args.resume)["config"]
            cfg = validate_config(apply_overrides(base, args.overrides))
        else:
            cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        say(f"error: {err}", err=True)
        return 2

    from convserve.training import distributed
    from convserve.training.run import Callbacks, train

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
        say(f"epoch {epoch}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys))

    world = int(os.environ.get("WORLD_SIZE", "1"))
    say(f"training on {world} process{'es' if world > 1 else ''}: {cfg.run_name()}")
    try:
        result = train(
            cfg,
            resume=args.resume,
            run_id=args.run_id,
            callbacks=Callbacks(
                on_epoch=on_epoch, should_stop=stop.is_set, stop_status=lambda: "stopped"
            ),
            end_run=not args.keep_run_open,
        )
        distributed.leave(together=True)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        say(f"error: {err}", err=True)
        return 2
    finally:
        distributed.leave()
    _report(result, say)
    return 0 if result.status in ("finished", "stopped") else 1


def _report(result: TrainResult, say: Callable[[str], None]) -> None:
    """The run's outcome in lines; the last, ``result: {...}``, is read by the worker."""
    for key in ("val_accuracy", "best_val_accuracy", "test_accuracy"):
        if key in result.metrics:
            say(f"{key}: {result.metrics[key]:.4f}")
    say(f"diagnosis: {result.diagnosis.verdict} ({result.diagnosis.summary})")
    if result.message:
        say(f"note: {result.message}")
    if result.best_checkpoint is not None:
        say(f"best checkpoint: {result.best_checkpoint}")
    if result.run_id:
        say(f"MLflow run id: {result.run_id}")
    say(f"status: {result.status}")
    summary = {"status": result.status, "run_id": result.run_id, "message": result.message}
    say("result: " + json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
