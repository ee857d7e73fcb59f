"""How the code reads: no function of the package over 70 lines."""

import ast
from pathlib import Path

import pytest

import convserve

ROOT = Path(convserve.__file__).parent
LIMIT = 70


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > LIMIT
    ]


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_the_limit(path):
    assert _long_functions(path) == []


def test_the_rule_catches_a_long_function(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * LIMIT)
    assert _long_functions(long) == [f"f ({LIMIT + 1} lines, line 1)"]
