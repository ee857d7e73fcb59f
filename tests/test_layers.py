"""The import rule between the packages (README, "Architecture"): each layer imports only the
layers below it, and the service only the torch-free parts of them. Read from the source with
``ast``, every import, at module level or inside a function."""

import ast
from pathlib import Path

import pytest

import convserve
from tests.fresh import imported

ROOT = Path(convserve.__file__).parent

# module prefix -> the convserve modules it may import (a prefix allows a whole package)
BOTTOM = [
    "convserve.contract",
    "convserve.redact",
    "convserve.logs",
    "convserve.processes",
]  # any layer may use
ALLOWED = {
    "convserve.contract": [],
    # credentials out of text, and the log lines' format: used by every layer
    "convserve.redact": [],
    "convserve.logs": ["convserve.redact"],
    # a child that dies with its parent; a process's children
    "convserve.processes": [],
    # the job queue's contract: the request is a training config; its run is tracked as one
    "convserve.jobs": [
        *BOTTOM,
        "convserve.training.config",
        "convserve.training.tracking",
    ],
    "convserve.training": ["convserve.training", *BOTTOM, "convserve"],
    "convserve.pipelines": [
        "convserve.pipelines",
        "convserve.training",
        "convserve.jobs",
        *BOTTOM,
        "convserve",
    ],
    # DESIGN: the contracts, the config schema (and its YAML files), the data-set store, how
    # an MLflow store is opened
    "convserve.service": [
        "convserve.service",
        *BOTTOM,
        "convserve.jobs",
        "convserve.training.config",
        "convserve.training.configfiles",
        "convserve.training.uploads",
        "convserve.training.tracking",
        "convserve",
    ],
    "convserve.cli": ["convserve"],
}
NO_TORCH = (
    "convserve.contract",
    "convserve.redact",
    "convserve.logs",
    "convserve.processes",
    "convserve.jobs",
    "convserve.service",
    "convserve.training.config",
    "convserve.training.configfiles",
    "convserve.training.overrides",
    "convserve.training.uploads",
    "convserve.training.tracking",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _allowed(target: str, allowed: list[str]) -> bool:
    """``target`` is an allowed module, inside one, or a package on the way to one
    (``from convserve.pipelines import queue`` names ``convserve.pipelines``). ``convserve``
    itself allows only the package's own ``__init__`` (``__version__``)."""
    for a in allowed:
        if a == "convserve":
            if target in ("convserve", "convserve.__version__"):
                return True
        elif target == a or target.startswith(a + ".") or a.startswith(target + "."):
            return True
    return False


MODULES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_every_import_points_down(path):
    name = _module_name(path)
    if name == "convserve" or name.startswith("convserve.cli"):
        return  # the package's __init__ and the top layer may import anything
    layer = next((k for k in ALLOWED if name == k or name.startswith(k + ".")), None)
    assert layer is not None, f"{name} belongs to no layer"
    targets = [t for t in _imports(path) if t.startswith("convserve")]
    wrong = sorted(t for t in targets if not _allowed(t, ALLOWED[layer]))
    assert not wrong, f"{name} imports {wrong}, outside {ALLOWED[layer]}"


@pytest.mark.parametrize(
    "path",
    [p for p in MODULES if _module_name(p).startswith(NO_TORCH)],
    ids=lambda p: _module_name(p),
)
def test_torch_free_modules_never_import_torch(path):
    assert not {t for t in _imports(path) if t.split(".")[0] in ("torch", "torchvision")}


def test_the_rule_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from convserve.training.run import train\n")
    assert "convserve.training.run" in _imports(bad)
    assert not _allowed("convserve.training.run", ALLOWED["convserve.service"])
    assert not _allowed("convserve.service.app", ALLOWED["convserve.pipelines"])
    assert not _allowed("convserve.pipelines.worker", ALLOWED["convserve.service"])
    assert not _allowed("convserve.pipelines.worker", ALLOWED["convserve.jobs"])


def test_the_worker_process_never_imports_torch():
    """``convserve worker`` runs its jobs in a job process (``pipelines/tasks.py``): the
    worker itself, its reaper and its liveness file hold no torch while it waits."""
    code = "import convserve.pipelines.worker, convserve.cli.stack"
    assert imported(code, ["torch", "torchvision"]) == []
