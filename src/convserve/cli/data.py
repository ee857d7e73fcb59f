"""``convserve data``: add a labelled image set (a folder or an archive), list, show and
delete uploaded data sets. Train on one with ``--set data.name=dataset --set data.id=ID``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convserve.cli.app import app, console, fail

data_app = typer.Typer(
    help="Your own labelled images: add a folder or archive of class folders, list, show, "
    "delete. Train on one with `--set data.name=dataset --set data.id=ID_OR_NAME`.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


def _client():  # type: ignore[no-untyped-def]
    from convserve.training.tracking import mlflow_client

    return mlflow_client()


@data_app.command("add")
def add(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder of class folders (class_a/img.jpg, ...), or a zip or tar archive of one",
            exists=True,
        ),
    ],
    name: Annotated[str, typer.Option(help="What to call it (letters, digits, _ . -)")],
) -> None:
    """Check every image, keep the decodable ones once, store them in MLflow and print the
    report: images per class, sizes, duplicates, skipped files, classes too small to split.
    The service's limits apply (CONVSERVE_MAX_DATASET_*, CONVSERVE_MAX_PIXELS)."""
    import re

    from convserve.service.settings import Settings
    from convserve.training import uploads

    if not re.fullmatch(r"[\w.-]{1,100}", name):
        raise fail(f"--name {name!r}: use letters, digits, _ . - (at most 100)")
    try:
        run, report, created = uploads.add(source, name, _client(), Settings().dataset_limits())
    except uploads.DatasetError as err:
        raise fail(str(err)) from None
    console.print(uploads.report_table(report.to_dict()))
    state = "stored" if created else "already stored (same images)"
    console.print(f"{state}: MLflow run {run.info.run_id}")
    console.print(f"train on it: convserve train --set data.name=dataset --set data.id={report.id}")


@data_app.command("list")
def list_() -> None:
    """Uploaded data sets, newest first."""
    from convserve.training import uploads

    runs = uploads.listing(_client())
    if not runs:
        console.print("no data set yet: convserve data add FOLDER_OR_ARCHIVE --name NAME")
    for run in runs:
        r = uploads.report_of(run)
        console.print(f"{r['id']}  {r['name']}  {r['images']} images, {len(r['classes'])} classes")


@data_app.command("show")
def show(
    dataset: Annotated[str, typer.Argument(help="Its id, or its name (newest version)")],
) -> None:
    """One data set's report."""
    from convserve.training import uploads

    run = uploads.find(_client(), dataset)
    if run is None:
        raise fail(f"no data set {dataset!r} (convserve data list)", 1)
    console.print(uploads.report_table(uploads.report_of(run)))


@data_app.command("delete")
def delete(
    dataset: Annotated[str, typer.Argument(help="Its id, or its name (newest version)")],
) -> None:
    """Delete it from MLflow (runs that trained on it keep their record of it)."""
    from convserve.training import uploads

    run = uploads.delete(_client(), dataset)
    if run is None:
        raise fail(f"no data set {dataset!r} (convserve data list)", 1)
    console.print(f"deleted {uploads.report_of(run)['name']} ({uploads.report_of(run)['id']})")
