"""Reading training and sweep configs: YAML files (or the shipped ones by name), ``--set``
overrides, validation with messages that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from convserve.training import CONFIG_DIR, shipped_configs
from convserve.training import overrides as _overrides
from convserve.training.config import (
    ConfigError,
    SweepConfig,
    TrainConfig,
    format_validation_error,
)


def apply_overrides(data: dict[str, Any], changes: list[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` set; a bad override is a ``ConfigError``."""
    try:
        return _overrides.apply_overrides(data, changes)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a config shipped with convserve (``default``, ``he_relu``)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = ", ".join(shipped_configs())
    raise ConfigError(f"no config file {str(name_or_path)!r}; shipped configs: {names}")


def read_config_dict(name_or_path: str | Path | None) -> dict[str, Any]:
    if name_or_path is None:
        return {}
    path = resolve_config_path(name_or_path)
    import yaml

    try:
        data = _overrides.load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | None = None
) -> TrainConfig:
    """Read a YAML config (or the defaults), apply ``--set`` overrides and validate."""
    data = apply_overrides(read_config_dict(name_or_path), overrides or [])
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid training config:\n" + format_validation_error(err)) from err


def load_sweep(name_or_path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read a sweep YAML (a file, or a shipped one under configs/sweeps) and validate it."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = CONFIG_DIR / "sweeps" / f"{name_or_path}.yaml"
        if not shipped.exists():
            names = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "sweeps").glob("*.yaml")))
            raise ConfigError(f"no sweep file {str(name_or_path)!r}; shipped sweeps: {names}")
        path = shipped
    data = apply_overrides(read_config_dict(path), overrides or [])
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("invalid sweep config:\n" + format_validation_error(err)) from err
