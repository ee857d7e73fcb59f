"""``convserve train``, ``sweep``, ``export`` and ``experiments``."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from convserve.cli.app import app, console, err_console, fail
from convserve.cli.options import ConfigOption, MarginOption, ModelNameOption, SetOption
from convserve.cli.report import TrainProgress, report_published, report_run
from convserve.pipelines.experiment_names import REGISTRY
from convserve.processes import SignalFlag
from convserve.redact import redact

if TYPE_CHECKING:
    from convserve.pipelines.experiments import Finding
    from convserve.pipelines.registry import Policy
    from convserve.training.config import SweepConfig


@app.command()
def train(
    config: ConfigOption = "default",
    set_: SetOption = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue from a checkpoint (last.pt); its config is used, with --set applied, "
            "and its MLflow run is continued."
        ),
    ] = None,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            min=1,
            help="Data-parallel processes on this machine (torchrun; gloo on CPUs, NCCL on "
            "GPUs): data.batch_size stays the global batch, split evenly among them.",
        ),
    ] = 1,
) -> None:
    """Train one model; print the final metrics, the diagnosis and the run id.

    SIGTERM or Ctrl-C stop training at the next step and keep ``last.pt`` at that place:
    ``--resume`` goes on from it as if the run had not stopped (a second Ctrl-C interrupts).
    Exits 0 when training finishes, 1 when it diverges or is stopped, 2 on a bad config.
    """
    from convserve.training.config import ConfigError
    from convserve.training.configfiles import apply_overrides, load_config, validate_config

    try:
        if resume is not None:
            from convserve.training.checkpoint import read_checkpoint

            base = read_checkpoint(resume)["config"]
            cfg = validate_config(apply_overrides(base, set_ or []))
        else:
            cfg = load_config(config, set_ or [])  # a bad config stops here, before torch loads
    except (ConfigError, FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None

    if nproc_per_node > 1:
        raise typer.Exit(_torchrun(nproc_per_node, config, set_ or [], resume, cfg.device))

    from convserve.training.run import train as run_training

    try:
        with TrainProgress("train") as progress, _stop_on_signals() as stop:
            callbacks = progress.callbacks
            callbacks.should_stop, callbacks.stop_status = stop.is_set, lambda: "stopped"
            result = run_training(cfg, resume=resume, callbacks=callbacks)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    report_run(result)
    if result.status != "finished":
        raise typer.Exit(1)


@contextlib.contextmanager
def _on_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM inside the block; the earlier handlers after it."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[SignalFlag]:
    """SIGTERM or a first Ctrl-C set the flag: training stops at the next step and keeps
    ``last.pt`` at that place (``--resume`` goes on from it); a second Ctrl-C interrupts."""
    stop = SignalFlag()  # set in the handler: no lock (processes.SignalFlag)

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    with _on_signals(on_signal):
        yield stop


def _torchrun(
    nproc: int, config: str, overrides: list[str], resume: Path | None, device: str
) -> int:
    """``torchrun --standalone`` with ``nproc`` processes of ``python -m convserve.training``;
    its exit code (1 when SIGINT or SIGTERM stopped it: they are passed to the ranks, which
    stop together at the next step and keep ``last.pt`` there)."""
    import time

    import torch

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.device_count() < nproc:
        raise fail(
            f"--nproc-per-node {nproc} needs {nproc} GPUs; torch sees {torch.cuda.device_count()}"
        )
    from convserve.training.distributed import Torchrun

    args = [
        *(["--resume", str(resume)] if resume is not None else ["--config", config]),
        *(arg for override in overrides for arg in ("--set", override)),
    ]
    console.print(f"training on {nproc} processes (torchrun, {'NCCL' if cuda else 'gloo'})")
    run = Torchrun(nproc, args)

    # passed to the ranks: they stop at the next step, and rank 0 keeps last.pt there
    with _on_signals(lambda signum, frame: run.stop(signum)):
        while run.poll() is None:
            time.sleep(0.2)
    if run.asked is not None:
        console.print("stopped by a signal: --resume continues from the step it stopped at")
        return 1
    return run.proc.returncode


def _policy(
    register: bool,
    promote: bool,
    model_name: str | None,
    metric: str,
    direction: str,
    margin: float,
) -> Policy:
    _check_direction(direction)
    from convserve.pipelines.registry import Policy

    return Policy(model_name, register, promote, metric, direction, margin)  # type: ignore[arg-type]


@app.command()
def sweep(
    config: Annotated[
        str,
        typer.Option(
            "--config", "-c", help="A sweep YAML file, or the name of a shipped sweep (lecture)."
        ),
    ] = "lecture",
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="Override a field of the sweep, e.g. --set base.optim.epochs=1."
        ),
    ] = None,
    register: Annotated[bool, typer.Option(help="Export, check and register the best run.")] = True,
    promote: Annotated[
        bool, typer.Option(help="Move the champion alias if the best run beats the champion.")
    ] = True,
    model_name: ModelNameOption = None,
    margin: MarginOption = 0.0,
    queue: Annotated[
        bool,
        typer.Option(
            "--queue",
            help="Put the sweep on the job queue (REDIS_URL, else CONVSERVE_QUEUE_PATH) for "
            "`convserve worker` processes to train its trials, `parallelism` at a time, and "
            "follow it here; Ctrl-C cancels it.",
        ),
    ] = False,
) -> None:
    """Run a sweep's Optuna study (every grid point, or `trials` points drawn by the random
    or TPE sampler, with pruning), each trial a nested MLflow run; then export, register and
    promote the best. Here, one trial after another; with --queue, on the workers. Exits 1
    when no trial finished or the best export fails its checks."""
    from convserve.training.config import ConfigError
    from convserve.training.configfiles import load_sweep

    try:
        spec = load_sweep(config, set_ or [])
    except ConfigError as err:
        raise fail(str(err)) from None
    _check_direction(spec.direction)
    if queue:  # the workers train: this process imports neither torch nor Optuna
        raise typer.Exit(_queued_sweep(spec, register, promote, model_name, margin))
    policy = _policy(register, promote, model_name, spec.metric, spec.direction, margin)
    from convserve.pipelines.sweep import label, run_sweep
    from convserve.training.export import ExportCheckFailed

    def on_trial(number: int, total: int, point: dict[str, object]) -> None:
        text = ", ".join(f"{k}={label(v)}" for k, v in point.items())
        console.print(f"[bold]trial {number + 1}/{total}[/bold] {text}")

    try:
        result = run_sweep(spec, policy=policy if register else None, on_trial=on_trial)
    except ExportCheckFailed as err:
        err_console.print(f"[red]export refused:[/red] {err}")
        raise typer.Exit(1) from None
    console.print("\n".join(result.summary))
    console.print(f"summary: {result.folder}")
    if result.parent_run_id:
        console.print(f"MLflow parent run id: {result.parent_run_id}")
    if result.best_run_id is None:
        err_console.print("[red]no trial finished[/red]")
        raise typer.Exit(1)
    console.print(f"best run: {result.best_run_id}")
    report_published(result.published)


def _queued_sweep(
    spec: SweepConfig, register: bool, promote: bool, model_name: str | None, margin: float
) -> int:
    """Submit the sweep as a job and follow its trials until it ends; its exit code."""
    import json
    import time

    from convserve.jobs import JobQueue, JobRequest, JobSettings, Tag, cancel, job_status
    from convserve.jobs import submit as submit_job
    from convserve.training.tracking import mlflow_client, tracking_uri

    settings = JobSettings()
    client = mlflow_client(tracking_uri(spec.base.tracking))
    request = JobRequest(
        sweep=spec, register_model=register, promote=promote, model_name=model_name, margin=margin
    )
    job_id = submit_job(request, client, JobQueue(settings))
    where = f"redis {settings.queue_name}" if settings.redis_url else settings.queue_path
    console.print(
        f"sweep job {job_id}: {spec.size()} trials, {spec.parallelism} at a time, on the "
        f"workers of {where} (tracking {redact(client.tracking_uri)})"
    )
    last = ""
    try:
        while True:
            run = client.get_run(job_id)
            status = job_status(run)
            trials = json.loads(run.data.tags.get(Tag.PROGRESS, "{}")).get("trials")
            if trials:
                line = (
                    f"trials: {trials['finished']} finished, {trials['pruned']} pruned, "
                    f"{trials['failed']} failed, {trials['running']} running, "
                    f"{trials['waiting']} waiting"
                )
                if line != last:
                    console.print(line)
                    last = line
            if status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        cancel(client, client.get_run(job_id))
        err_console.print(f"[yellow]sweep job {job_id} cancelled[/yellow]")
        return 1
    tags = run.data.tags
    console.print(f"sweep job {job_id}: {status}")
    if "convserve.best_run_id" in tags:
        console.print(f"best run: {tags['convserve.best_run_id']}")
    if "convserve.registered_version" in tags:
        promoted = tags.get("convserve.promoted") == "true"
        console.print(
            f"registered {tags.get('convserve.registered_model')} version "
            f"{tags['convserve.registered_version']}" + (" (champion)" if promoted else "")
        )
    if status == "failed":
        err_console.print(f"[red]{tags.get('convserve.error', 'no trial finished')}[/red]")
    return 0 if status == "succeeded" else 1


def _check_direction(direction: str) -> None:
    if direction not in ("maximize", "minimize"):
        raise fail("--direction must be maximize or minimize")


@app.command()
def export(
    run_id: Annotated[
        str | None, typer.Option(help="Export this MLflow run's best checkpoint.")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Export a checkpoint file.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the .onnx file (default: next to the checkpoint).",
        ),
    ] = None,
    register: Annotated[
        bool, typer.Option(help="Register the checked export as a new model version.")
    ] = True,
    promote: Annotated[
        bool, typer.Option(help="Champion/challenger promotion of the new version.")
    ] = True,
    model_name: ModelNameOption = None,
    metric: Annotated[
        str, typer.Option(help="Metric compared with the champion's.")
    ] = "best_val_accuracy",
    direction: Annotated[str, typer.Option(help="maximize or minimize.")] = "maximize",
    margin: MarginOption = 0.0,
) -> None:
    """Export to one self-contained ONNX file, check it (onnx.checker, onnxruntime, parity
    with torch below 1e-4), register and promote it. Exits 1 when a check fails."""
    if (run_id is None) == (checkpoint is None):
        raise fail("give exactly one of --run-id and --checkpoint")
    policy = _policy(register, promote, model_name, metric, direction, margin)
    # torch and MLflow once the options are known to be good: a wrong call fails at once
    from convserve.pipelines.registry import publish
    from convserve.training.export import ExportCheckFailed

    try:
        published = publish(run_id=run_id, checkpoint=checkpoint, output=output, policy=policy)  # type: ignore[arg-type]
    except ExportCheckFailed as err:
        err_console.print(f"[red]export refused:[/red] {err}")
        raise typer.Exit(1) from None
    except (FileNotFoundError, ValueError) as err:
        raise fail(str(err)) from None
    report_published(published)


@app.command()
def promote(
    model_name: Annotated[
        str,
        typer.Argument(metavar="MODEL", help="The registered model whose challenger is judged."),
    ],
    min_requests: Annotated[
        int, typer.Option(min=1, help="Shadowed images the challenger answered, at least.")
    ] = 100,
    min_agreement: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share agreeing with the champion, at least.")
    ] = 0.9,
    max_latency_ratio: Annotated[
        float, typer.Option(min=0.0, help="Its inference time over the champion's, at most.")
    ] = 1.5,
) -> None:
    """Promote a model's challenger on its live evidence: what the serving processes logged
    to its run while it was shadowed on live traffic (the live.* metrics; CONVSERVE_SHADOW_SHARE
    or PUT /v1/models/NAME/rollout). Moves the champion alias to it when the evidence holds and
    records the decision on the version either way; exits 1 when it is not promoted."""
    import mlflow

    from convserve.service import rollout
    from convserve.service.registry import registry_for

    registry = registry_for(mlflow.get_tracking_uri())
    criteria = rollout.Criteria(min_requests, min_agreement, max_latency_ratio)
    try:
        decision = rollout.promote(registry, model_name, criteria)
    except LookupError as err:
        raise fail(str(err)) from None
    except Exception as err:  # the registry could not be read or written
        raise fail(f"the registry at {redact(registry.tracking_uri)}: {err}", code=1) from None
    if not decision.promoted:
        err_console.print(
            f"not promoted: {model_name} version {decision.version}: {decision.reason}"
        )
        raise typer.Exit(1)
    was = f" (was version {decision.previous_champion})" if decision.previous_champion else ""
    console.print(
        f"promoted: {model_name} version {decision.version} is the champion{was}: {decision.reason}"
    )


@app.command()
def experiments(
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this experiment (repeat for several): " + ", ".join(REGISTRY) + "."
        ),
    ] = None,
    output: Annotated[Path, typer.Option(help="Folder for report.md and its figures.")] = Path(
        "reports/experiments"
    ),
    quick: Annotated[bool, typer.Option(help="Reduced budgets (what the tests run).")] = False,
    track: Annotated[bool, typer.Option(help="Log the report to one MLflow run.")] = True,
) -> None:
    """Reproduce each lecture claim as a small seeded experiment and write a report: the
    criterion and its reason, the measured figures and the verdict (reproduced, partly
    reproduced, not reproduced). Exits 1 if a claim is not reproduced at all."""
    from convserve.pipelines.experiments import log_report, run_experiments, write_report

    def done(finding: Finding) -> None:
        colour = "green" if finding.reproduced else "yellow" if finding.partly else "red"
        mark = f"[{colour}]{finding.verdict}[/{colour}]"
        console.print(f"{finding.name}: {mark} ({finding.seconds:.0f} s) {finding.measured}")

    try:
        findings = run_experiments(output, only, quick, done)
    except ValueError as err:
        raise fail(str(err)) from None
    report = write_report(findings, output, quick)
    console.print(f"report: {report}")
    if track:
        console.print(f"MLflow run id: {log_report(findings, output, None)}")
    if any(not (f.reproduced or f.partly) for f in findings):
        raise typer.Exit(1)
