"""Dotted-path edits of plain config dicts: ``--set a.b=value`` overrides and sweep grids.

Works on the JSON form of a config, before validation; raises ``ValueError`` for a path that
cannot be set, which the loaders turn into a ``ConfigError``.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from typing import Any


def load_yaml(text: str) -> Any:
    """YAML as people write configs: ``2e-3`` and ``1e5`` are numbers (YAML 1.2), not the
    strings PyYAML's 1.1 rules make of them. PyYAML is imported on first use: answering
    predictions reads no config file."""
    import yaml

    return yaml.load(text, _config_loader())


@functools.cache
def _config_loader() -> Any:
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        pass

    ConfigLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
        list("-+0123456789."),
    )
    return ConfigLoader


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.activation=tanh`` -> (["model", "activation"], "tanh"); values are YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ValueError(f"override {text!r} has an empty key")
    return key.strip().split("."), load_yaml(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` override set (lists by index)."""
    result = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        set_path(result, path, value)
    return result


def expand_grid(
    base: dict[str, Any], grid: dict[str, list[Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every grid point (``{"init.name": "normal", ...}``) with ``base`` edited to match, in
    row-major order of ``grid``."""
    out = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values, strict=True))
        data = json.loads(json.dumps(base))
        for key, value in point.items():
            set_path(data, key.split("."), value)
        out.append((point, data))
    return out


def set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value`` in place, creating sections on the way."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        node = _child(node, part, path[: i + 1])
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, path)] = value
    else:
        node[last] = value


def _child(node: Any, part: str, where: list[str]) -> Any:
    if isinstance(node, list):
        return node[_index(part, node, where)]
    if not isinstance(node, dict):
        raise ValueError(f"cannot set {'.'.join(where)}: its parent is not a section")
    return node.setdefault(part, {})


def _index(part: str, node: list[Any], where: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"{'.'.join(where)}: list index must be 0..{len(node) - 1}")
    return int(part)
