"""The ``convserve`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from convserve import __version__
from convserve.training.config import ConfigError, load_config, shipped_configs

if TYPE_CHECKING:
    from convserve.pipelines.experiments import Finding
    from convserve.pipelines.registry import Policy, Published
    from convserve.training.run import Callbacks, TrainResult

app = typer.Typer(
    help="Train CNNs whose initialisation and activations come from a config, see why they "
    "train well or badly, and track every run in MLflow.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"convserve {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


ConfigOption = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        help="A YAML file, or the name of a shipped config: " + ", ".join(shipped_configs()) + ".",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one field, e.g. --set model.activation=tanh "
        "--set init.name=xavier_uniform (values are YAML; list items by index).",
    ),
]


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
) -> None:
    """Train one model; print the final metrics, the diagnostics' verdicts and the run id.

    Exits 0 when training finishes, 1 when it diverges or is cancelled, 2 on a bad config.
    """
    from convserve.training.checkpoint import read_checkpoint
    from convserve.training.config import apply_overrides, validate_config
    from convserve.training.run import train as run_training

    try:
        if resume is not None:
            base = read_checkpoint(resume)["config"]
            cfg = validate_config(apply_overrides(base, set_ or []))
        else:
            cfg = load_config(config, set_ or [])
    except (ConfigError, FileNotFoundError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None

    progress, callbacks = _progress_callbacks("train")
    try:
        with progress:
            result = run_training(cfg, resume=resume, callbacks=callbacks)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    _report(result)
    if result.status != "finished":
        raise typer.Exit(1)


ModelNameOption = Annotated[str, typer.Option("--model-name", help="Registered model name.")]
MarginOption = Annotated[
    float,
    typer.Option(help="Promote only when the metric beats the champion's by at least this much."),
]


def _policy(
    register: bool, promote: bool, model_name: str, metric: str, direction: str, margin: float
) -> Policy:
    from convserve.pipelines.registry import Policy

    if direction not in ("maximize", "minimize"):
        err_console.print("[red]error:[/red] --direction must be maximize or minimize")
        raise typer.Exit(2)
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
    model_name: ModelNameOption = "convserve",
    margin: MarginOption = 0.0,
) -> None:
    """Train every point of a grid as nested MLflow runs, then export, register and promote
    the best. Exits 1 when no point finished or the best export fails its checks."""
    from convserve.pipelines.sweep import label, run_sweep
    from convserve.training.config import load_sweep
    from convserve.training.export import ExportCheckFailed

    try:
        spec = load_sweep(config, set_ or [])
    except ConfigError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    policy = _policy(register, promote, model_name, spec.metric, spec.direction, margin)

    def on_child(index: int, total: int, point: dict[str, object]) -> None:
        text = ", ".join(f"{k}={label(v)}" for k, v in point.items())
        console.print(f"[bold]{index + 1}/{total}[/bold] {text}")

    try:
        result = run_sweep(spec, policy=policy if register else None, on_child=on_child)
    except ExportCheckFailed as err:
        err_console.print(f"[red]export refused:[/red] {err}")
        raise typer.Exit(1) from None
    console.print("\n".join(result.summary))
    console.print(f"summary: {result.folder}")
    if result.parent_run_id:
        console.print(f"MLflow parent run id: {result.parent_run_id}")
    if result.best_run_id is None:
        err_console.print("[red]no grid point finished[/red]")
        raise typer.Exit(1)
    console.print(f"best run: {result.best_run_id}")
    _report_published(result.published)


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
    model_name: ModelNameOption = "convserve",
    metric: Annotated[
        str, typer.Option(help="Metric compared with the champion's.")
    ] = "best_val_accuracy",
    direction: Annotated[str, typer.Option(help="maximize or minimize.")] = "maximize",
    margin: MarginOption = 0.0,
) -> None:
    """Export to one self-contained ONNX file, check it (onnx.checker, onnxruntime, parity
    with torch below 1e-4), register and promote it. Exits 1 when a check fails."""
    from convserve.pipelines.registry import publish
    from convserve.training.export import ExportCheckFailed

    if (run_id is None) == (checkpoint is None):
        err_console.print("[red]error:[/red] give exactly one of --run-id and --checkpoint")
        raise typer.Exit(2)
    policy = _policy(register, promote, model_name, metric, direction, margin)
    try:
        published = publish(run_id=run_id, checkpoint=checkpoint, output=output, policy=policy)  # type: ignore[arg-type]
    except ExportCheckFailed as err:
        err_console.print(f"[red]export refused:[/red] {err}")
        raise typer.Exit(1) from None
    except (FileNotFoundError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    _report_published(published)


@app.command()
def serve(
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="A .onnx file, models:/NAME@ALIAS "
            "(followed) or models:/NAME/VERSION. "
            "Default: CONVSERVE_MODEL_URI, else "
            "models:/convserve@champion."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Default: CONVSERVE_HOST or 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: CONVSERVE_PORT or 8000.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="uvicorn worker processes. Default: CONVSERVE_WORKERS or 1.")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda. Default: CONVSERVE_DEVICE or auto.")
    ] = None,
) -> None:
    """Serve the model over HTTP: /predict, KServe v2, /metrics, hot reload of the alias.
    Every other setting is a CONVSERVE_* environment variable (see the README)."""
    import os

    import uvicorn
    from pydantic import ValidationError

    from convserve.service.settings import Settings

    for key, value in (
        ("MODEL_URI", model_uri),
        ("HOST", host),
        ("PORT", port),
        ("WORKERS", workers),
        ("DEVICE", device),
    ):
        if value is not None:
            os.environ[f"CONVSERVE_{key}"] = str(value)
    try:
        settings = Settings()
    except ValidationError as err:
        err_console.print(f"[red]error:[/red] bad CONVSERVE_* setting:\n{err}")
        raise typer.Exit(2) from None
    try:
        from convserve.service.model import providers_for

        providers_for(settings.device)
    except RuntimeError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    uvicorn.run(
        "convserve.service.app:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        access_log=False,
    )


@app.command()
def worker() -> None:
    """Consume training jobs, one at a time, from the queue: RedisHuey when REDIS_URL is set
    (any number of workers on any machines), else SqliteHuey (CONVSERVE_QUEUE_PATH). Also
    fails jobs whose worker died (no heartbeat for CONVSERVE_WORKER_LOST_AFTER seconds)."""
    import threading

    from mlflow.tracking import MlflowClient

    from convserve.pipelines.jobs import JobSettings, make_queue, reap

    logging.getLogger().setLevel(logging.INFO)
    settings = JobSettings()
    huey, _ = make_queue(settings)
    stop = threading.Event()

    def reaper() -> None:
        client = MlflowClient()
        while True:
            try:
                for run_id in reap(client, settings.worker_lost_after):
                    logging.getLogger("convserve.worker").warning("job %s: worker lost", run_id)
            except Exception as err:  # the tracking server may be down for a moment
                logging.getLogger("convserve.worker").warning("reaper pass failed: %s", err)
            if stop.wait(settings.reaper_interval):
                return

    threading.Thread(target=reaper, daemon=True, name="convserve-reaper").start()
    queue = f"redis {settings.queue_name}" if settings.redis_url else settings.queue_path
    console.print(f"convserve worker: queue {queue}, tracking {MlflowClient().tracking_uri}")
    consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False)
    try:
        consumer.run()
    finally:
        stop.set()


@app.command()
def up(
    home: Annotated[
        Path,
        typer.Option(
            help="State folder (MLflow store, artifacts, queue, "
            "runs, logs, token), reused on the next run."
        ),
    ] = Path(".convserve"),
    host: Annotated[str, typer.Option(help="Interface for MLflow and the API.")] = "127.0.0.1",
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port.")] = 5000,
    api_port: Annotated[int, typer.Option(help="API port.")] = 8000,
    model_name: ModelNameOption = "convserve",
    config: ConfigOption = "default",
) -> None:
    """Run the whole product on this machine: an MLflow server (SQLite, local artifacts), one
    worker and the API, supervised; trains and promotes the default model first when the
    registry has no champion. Ctrl-C stops everything."""
    import signal as signals

    from convserve.pipelines.stack import Stack

    if Path(config).exists():
        config = str(Path(config).resolve())
    stack = Stack(home.resolve(), host, mlflow_port, api_port, model_name, config)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C and SIGTERM both stop every child cleanly

    # Installed explicitly: a shell's background job starts with SIGINT ignored.
    signals.signal(signals.SIGINT, on_signal)
    signals.signal(signals.SIGTERM, on_signal)
    try:
        stack.start(console.print)
        console.print(f"""
[bold green]convserve is ready[/bold green]
  API:       {stack.api_url}/predict  (docs: {stack.api_url}/docs)
  MLflow:    {stack.tracking_uri}
  API token: {stack.token()}  (Authorization: Bearer <token> for /jobs and /admin)
  state:     {stack.home}
Press Ctrl-C to stop.""")
        stack.supervise(console.print, lambda: False)
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        stack.stop()
        raise typer.Exit(1) from None
    console.print("stopping...")
    stack.stop()
    console.print("stopped")


@app.command()
def bootstrap(
    model_name: ModelNameOption = "convserve",
    config: ConfigOption = "default",
    output_dir: Annotated[str, typer.Option(help="Folder for the run's checkpoints.")] = "runs",
) -> None:
    """Train, export, register and promote a first model when the registry (the
    MLFLOW_TRACKING_URI) has no champion yet; do nothing otherwise."""
    import mlflow

    from convserve.pipelines.stack import bootstrap as run_bootstrap

    progress, callbacks = _progress_callbacks("first model")
    with progress:
        published = run_bootstrap(
            mlflow.get_tracking_uri(), model_name, config, callbacks, output_dir
        )
    if published is None:
        console.print(f"models:/{model_name}@champion exists: nothing to do")
        return
    _report_published(published)


def _progress_callbacks(label: str) -> tuple[Progress, Callbacks]:
    """A rich progress bar (steps, loss, accuracy) and the training callbacks that drive it."""
    from convserve.training.run import Callbacks

    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task(label, total=None, status="")

    def on_step(step: int, loss: float, accuracy: float) -> None:
        progress.update(task, completed=step, status=f"loss {loss:.4f} acc {accuracy:.3f}")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        progress.console.print(
            f"epoch {epoch}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} | val loss {metrics['val_loss']:.4f} "
            f"acc {metrics['val_accuracy']:.4f}"
        )

    return progress, Callbacks(
        on_start=lambda total: progress.update(task, total=total),
        on_step=on_step,
        on_epoch=on_epoch,
    )


@app.command()
def experiments(
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this experiment (repeat "
            "for several): symmetry, vanishing, exploding, xavier_he, compute_cost, "
            "dying_relu, dense_vs_cnn, convolution, pooling, hierarchy."
        ),
    ] = None,
    output: Annotated[Path, typer.Option(help="Folder for report.md and its figures.")] = Path(
        "reports/experiments"
    ),
    quick: Annotated[bool, typer.Option(help="Reduced budgets (what the tests run).")] = False,
    track: Annotated[bool, typer.Option(help="Log the report to one MLflow run.")] = True,
) -> None:
    """Reproduce each lecture claim as a small seeded experiment and write a report: the
    criterion and its reason, the measured figures and the verdict. Exits 1 if a claim is not
    reproduced."""
    from convserve.pipelines.experiments import log_report, run_experiments, write_report

    def done(finding: Finding) -> None:
        mark = "[green]reproduced[/green]" if finding.reproduced else "[red]not reproduced[/red]"
        console.print(f"{finding.name}: {mark} ({finding.seconds:.0f} s) {finding.measured}")

    try:
        findings = run_experiments(output, only, quick, done)
    except ValueError as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    report = write_report(findings, output, quick)
    console.print(f"report: {report}")
    if track:
        console.print(f"MLflow run id: {log_report(findings, output, None)}")
    if not all(f.reproduced for f in findings):
        raise typer.Exit(1)


def _report_published(published: Published | None) -> None:
    if published is None:
        return
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in published.parity.max_abs_diff.items())
    console.print(
        f"ONNX: {published.onnx_path} (opset {published.parity.opset}; max |onnx - "
        f"torch| at batch {published.parity.batch_sizes}: {diffs})"
    )
    if published.version is not None:
        console.print(f"registered: models:/{published.model_name}/{published.version}")
    if published.decision is not None:
        d = published.decision
        console.print(f"alias: {d.alias} ({d.reason})")


def _report(result: TrainResult) -> None:
    table = Table(title=f"training {result.status}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "best_val_accuracy",
        "test_loss",
        "test_accuracy",
    ):
        if key in result.metrics:
            table.add_row(key, f"{result.metrics[key]:.4f}")
    console.print(table)
    colour = "green" if result.verdicts == ["healthy"] else "yellow"
    console.print(f"verdicts: [{colour}]{', '.join(result.verdicts)}[/{colour}]")
    if result.message:
        console.print(f"note: {result.message}")
    if result.best_checkpoint is not None:
        console.print(f"best checkpoint: {result.best_checkpoint}")
    if result.run_id:
        console.print(f"MLflow run id: {result.run_id}")


if __name__ == "__main__":
    app()
