"""``convserve serve``, ``worker``, ``up`` and ``bootstrap``: the running product."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from convserve.cli.app import app, bad_settings, console, err_console, fail
from convserve.cli.options import ConfigOption, DefaultModelOption
from convserve.cli.report import TrainProgress, report_published


@app.command()
def serve(
    model_uri: Annotated[
        str | None,
        typer.Option(
            help="A .onnx file, models:/NAME@ALIAS (followed) or models:/NAME/VERSION. "
            "Default: CONVSERVE_MODEL_URI, else models:/convserve@champion."
        ),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Default: CONVSERVE_HOST or 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: CONVSERVE_PORT or 8000.")] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help="Also serve KServe v2 over gRPC on this port. Default: CONVSERVE_GRPC_PORT, "
            "else no gRPC."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes. Default: CONVSERVE_WORKERS, else one per core this process "
            "may use (at most 8; one with a GPU), each with cores/workers onnxruntime threads."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu or cuda. Default: CONVSERVE_DEVICE or auto.")
    ] = None,
) -> None:
    """Serve the models over HTTP (/predict, KServe v2, /metrics) and, with --grpc-port,
    KServe v2 over gRPC: the default model (--model-uri) and every registered model with a
    champion (CONVSERVE_MODELS), each hot-reloaded on its own.
    Every other setting is a CONVSERVE_* environment variable (see the README)."""
    from pydantic import ValidationError

    from convserve.jobs import JobSettings
    from convserve.processes import port_taken
    from convserve.service.entry import exec_server
    from convserve.service.settings import Settings

    given = dict(
        model_uri=model_uri,
        host=host,
        port=port,
        grpc_port=grpc_port,
        workers=workers,
        device=device,
    )
    try:
        # Options given on the command line win over CONVSERVE_* variables.
        settings = Settings(**{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
        job_settings = JobSettings()
    except ValidationError as err:
        raise bad_settings(err, tuple(given)) from None
    if settings.grpc_port:
        # Each worker process binds it with SO_REUSEPORT, which would share it out with another
        # process that did the same (a second serve) rather than fail: checked first, here.
        problem = port_taken(settings.host, settings.grpc_port)
        if problem:
            raise fail(
                f"cannot serve gRPC on {settings.host}:{settings.grpc_port} "
                f"(CONVSERVE_GRPC_PORT, --grpc-port): {problem}"
            )
    # the server in this process's place, without the command line's libraries; it checks
    # the device (onnxruntime is imported once, there)
    exec_server(settings, job_settings)


@app.command()
def worker(
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Run no worker: exit 0 when the worker of this machine or container wrote "
            "its liveness file (CONVSERVE_WORKER_LIVENESS_FILE) within "
            "CONVSERVE_WORKER_ALIVE_AFTER seconds, else 1. The container health check.",
        ),
    ] = False,
) -> None:
    """Consume training jobs, one at a time, from the queue: RedisHuey when REDIS_URL is set
    (any number of workers on any machines), else SqliteHuey (CONVSERVE_QUEUE_PATH). Jobs run
    in a job process that exits after CONVSERVE_WORKER_IDLE_EXIT idle seconds, so an idle
    worker holds no torch. Also fails jobs whose worker died (no heartbeat for
    CONVSERVE_WORKER_LOST_AFTER seconds). Ctrl-C lets the running job finish; SIGTERM drains:
    the running job or trial stops at its next step, keeps its exact place in a checkpoint and
    goes back to the queue, and the worker exits within CONVSERVE_DRAIN_SECONDS (45)."""
    from pydantic import ValidationError

    from convserve.jobs import JobSettings

    try:
        settings = JobSettings()
    except ValidationError as err:
        raise bad_settings(err) from None
    if check:
        from convserve.pipelines.liveness import check as check_liveness

        problem = check_liveness(Path(settings.worker_liveness_file), settings.worker_alive_after)
        if problem:
            raise fail(problem, code=1)
        console.print("the worker is alive")
        return

    from convserve.pipelines.worker import run_worker, unusable_backends

    problems = unusable_backends(settings)
    if problems:
        raise fail("the worker cannot start; unusable:\n  " + "\n  ".join(problems))

    logging.getLogger().setLevel(logging.INFO)
    run_worker(settings, console.print)


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
    model_name: DefaultModelOption = "convserve",
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
        # soft_wrap: a URL or the token is never broken across lines, whatever the width.
        console.print(
            f"""
[bold green]convserve is ready[/bold green]
  web page:  {stack.api_url}/
  MLflow:    {stack.tracking_uri}/#/experiments
  API docs:  {stack.api_url}/docs
  API token: {stack.token()}
             (send it as "Authorization: Bearer <token>" to POST /jobs and /admin)
  state:     {stack.home}
Press Ctrl-C to stop.""",
            soft_wrap=True,
        )
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
    model_name: DefaultModelOption = "convserve",
    config: ConfigOption = "default",
    output_dir: Annotated[str, typer.Option(help="Folder for the run's checkpoints.")] = "runs",
) -> None:
    """Train, export, register and promote a first model when the registry (the
    MLFLOW_TRACKING_URI) has no champion yet; do nothing otherwise."""
    import mlflow

    from convserve.pipelines.stack import bootstrap as run_bootstrap

    with TrainProgress("first model") as progress:
        published = run_bootstrap(
            mlflow.get_tracking_uri(), model_name, config, progress.callbacks, output_dir
        )
    if published is None:
        console.print(f"models:/{model_name}@champion exists: nothing to do")
        return
    report_published(published)
