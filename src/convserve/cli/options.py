"""Options that several commands share."""

from __future__ import annotations

from typing import Annotated

import typer

from convserve.training import shipped_configs

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
ModelNameOption = Annotated[
    str | None,
    typer.Option(
        "--model-name",
        help="Registered model name. Default: the uploaded data set's name for a run trained "
        "on one, else convserve.",
    ),
]
DefaultModelOption = Annotated[
    str,
    typer.Option(
        "--model-name", help="The registered model bare /predict answers with (its champion)."
    ),
]
MarginOption = Annotated[
    float,
    typer.Option(help="Promote only when the metric beats the champion's by at least this much."),
]
