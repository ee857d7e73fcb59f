"""A train job on several data-parallel processes of its worker's machine: ``torchrun``."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from convserve.pipelines.heartbeat import Heartbeat
from convserve.training.config import TrainConfig
from convserve.training.distributed import Torchrun

log = logging.getLogger(__name__)


def train_processes(
    cfg: TrainConfig,
    nproc: int,
    run_id: str,
    tracking_uri: str,
    beat: Heartbeat,
    resume: Path | None,
) -> tuple[str, str]:
    """``torchrun`` runs ``python -m convserve.training`` on the job's run (rank 0 logs to it
    and uploads its checkpoints), while this worker beats, publishes the progress and stops
    the ranks (SIGTERM: they keep ``last.pt``) when the job is cancelled, its lease is
    lost, or its worker drains. (status, message)."""
    run = Torchrun(
        nproc,
        _arguments(cfg, run_id, resume),
        env={"MLFLOW_TRACKING_URI": tracking_uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc = run.proc
    output = _Output(proc, run_id, beat)
    while run.poll() is None:
        if run.asked is None and beat.should_stop():
            run.stop()  # every rank stops at the step they agree on; rank 0 keeps last.pt
        time.sleep(0.2)
    output.join()
    if "status" in output.result:
        return str(output.result["status"]), str(output.result.get("message", ""))
    return "failed", f"torchrun exited {proc.returncode}: " + " / ".join(output.tail[-5:])


def _arguments(cfg: TrainConfig, run_id: str, resume: Path | None) -> list[str]:
    """``python -m convserve.training``'s arguments: the config written beside the run's
    checkpoints, or the checkpoint to resume."""
    folder = Path(cfg.tracking.output_dir) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.json"
    config.write_text(cfg.model_dump_json())
    if resume is not None:
        start = ["--resume", str(resume), "--set", f"tracking.output_dir={cfg.tracking.output_dir}"]
    else:
        start = ["--config", str(config)]
    return [*start, "--run-id", run_id, "--keep-run-open"]


class _Output:
    """Reads the processes' output in a thread: logs it, keeps its tail, passes epochs to the
    heartbeat and keeps rank 0's ``result:`` line."""

    def __init__(self, proc: subprocess.Popen[str], run_id: str, beat: Heartbeat) -> None:
        self.proc, self.run_id, self.beat = proc, run_id, beat
        self.result: dict[str, Any] = {}
        self.tail: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            log.info("job %s: %s", self.run_id, line.rstrip())
            self.tail[:] = [*self.tail[-20:], line.rstrip()]
            if line.startswith("epoch "):
                self.beat.on_epoch(int(line.split()[1].rstrip(":")), {})
            elif line.startswith("result: "):
                self.result.update(json.loads(line.removeprefix("result: ")))

    def join(self) -> None:
        self._thread.join(timeout=10)
