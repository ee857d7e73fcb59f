"""The image environments: each lock agrees with pyproject.toml, each Dockerfile installs only
from its lock before it copies any code, and what each deployed process can import resolves
inside its image's environment alone."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.compose import ROOT
from tests.deploy.images import LOCKS, image_env

SRC = ROOT / "src" / "convserve"
# The images' platform: Linux x86_64, CPython 3.11 (python:3.11-slim)
PLATFORM = {
    **default_environment(),
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
}


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock_inputs() -> dict[str, tuple[list[str], list[str]]]:
    """lock name -> (extras, groups), as `make lock` compiles it (the Makefile's recipe)."""
    recipe = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    inputs = {}
    for line in recipe.splitlines():
        if "$(UV_COMPILE)" in line and "-o $(LOCKS)/" in line:
            name = line.split("-o $(LOCKS)/")[1].split(".txt")[0]
            extras = re.findall(r"--extra (\S+)", line)
            groups = re.findall(r"--group pyproject\.toml:(\S+)", line)
            inputs[name] = (extras, groups)
    return inputs


def _requirements(extras: list[str], groups: list[str]) -> list[Requirement]:
    project = _pyproject()
    name = project["project"]["name"]
    reqs: list[Requirement] = []
    todo = list(extras)
    if extras:
        reqs += [Requirement(r) for r in project["project"]["dependencies"]]
    while todo:
        for raw in project["project"]["optional-dependencies"][todo.pop()]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == name:  # convserve[other-extra]
                todo += sorted(req.extras)
            else:
                reqs.append(req)
    for group in groups:
        reqs += [Requirement(r) for r in project["dependency-groups"][group]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(PLATFORM)]


def _pins(lock: Path) -> dict[str, str]:
    text = lock.read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
    return {canonicalize_name(k): v for k, v in pins.items()}


def test_every_lock_agrees_with_pyproject():
    inputs = _lock_inputs()
    assert set(inputs) == {"api", "api-gpu", "trainer", "mlflow"}
    assert {p.stem for p in LOCKS.glob("*.txt")} == set(inputs)
    for name, (extras, groups) in inputs.items():
        lock = LOCKS / f"{name}.txt"
        pins = _pins(lock)
        for req in _requirements(extras, groups):
            pinned = pins.get(canonicalize_name(req.name))
            assert pinned, f"{lock.name} lacks {req}: run `make lock`"
            assert req.specifier.contains(pinned, prereleases=True), (
                f"{lock.name} pins {req.name}=={pinned}, pyproject.toml asks {req}: run `make lock`"
            )
        # every pin carries hashes: pip install --require-hashes takes nothing else
        blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().split("\n", 2)[2])
        assert all("--hash=sha256:" in b for b in blocks if "==" in b), lock.name


def test_a_lock_that_disagrees_is_found():
    lock = (LOCKS / "api.txt").read_text()
    pinned = _pins(LOCKS / "api.txt")["fastapi"]
    broken = lock.replace(f"fastapi=={pinned}", "fastapi==0.100.0")
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", broken, re.M))
    (req,) = [r for r in _requirements(["service"], []) if r.name == "fastapi"]
    assert not req.specifier.contains(pins["fastapi"])


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "deploy").glob("Dockerfile.*")))
def test_each_dockerfile_installs_from_its_lock_before_any_code(dockerfile):
    text = dockerfile.read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all(
        "--require-hashes" in line
        or "--no-deps --no-build-isolation ." in line
        or "--index-url" in line  # the trainer's documented CPU-torch variant
        for line in installs
    ), installs
    for code in ("COPY pyproject.toml", "COPY src"):  # the MLflow image copies neither
        assert code not in text or text.index("--require-hashes") < text.index(code), code
    assert "\nHEALTHCHECK " in text and "\nUSER 10001" in text


def test_the_build_context_leaves_out_the_venv_and_everything_else():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :][:1] == ["*"]  # all out, then what the images copy
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for dockerfile in (ROOT / "deploy").glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                copied.update(line.split()[1:-1])
    assert all(any(c == k or c.startswith(k + "/") for k in kept) for c in copied), copied
    assert ".venv" not in kept and "tests" not in kept


def test_the_trainer_cpu_variant_drops_only_torch_and_its_cuda_libraries(tmp_path):
    text = (ROOT / "deploy" / "Dockerfile.trainer").read_text()
    (program,) = re.findall(r"awk '(.*?)'", text)
    out = subprocess.run(
        ["awk", program, str(LOCKS / "trainer.txt")], capture_output=True, text=True
    )
    (tmp_path / "rest.txt").write_text(out.stdout)
    dropped = set(_pins(LOCKS / "trainer.txt")) - set(_pins(tmp_path / "rest.txt"))
    assert {"torch", "torchvision", "triton"} <= dropped
    assert all(
        d in ("torch", "torchvision", "triton") or d.startswith(("nvidia-", "cuda-"))
        for d in dropped
    )
    assert {"sympy", "onnxruntime", "mlflow"} <= set(_pins(tmp_path / "rest.txt"))


# -- what each process imports ---------------------------------------------------------------


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """Dotted modules ``path`` imports: all of them, or those at module level only; none
    under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: -node.level] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if not (module_level_only and nested):
                visit(child, top and not nested)

    visit(tree, True)
    return found


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "convserve":
        return None
    base = SRC.parent.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def closure(roots: list[str], module_level_only: set[str]) -> set[str]:
    """Every module the roots can import on any path (function-level imports included, but
    for the modules in ``module_level_only``), following convserve's own modules."""
    seen: set[str] = set()
    external: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            if not name.startswith("convserve"):
                external.add(name)
            continue
        top_only = any(name == m or name.startswith(m + ".") for m in module_level_only)
        for imported in _imports(path, top_only):
            todo.append(imported)
            parent = imported.rsplit(".", 1)[0]
            if parent.startswith("convserve"):
                todo.append(parent)
    stdlib = sys.stdlib_module_names
    return {
        m for m in external if m.split(".")[0] not in stdlib and m.split(".")[0] != "__future__"
    }


def _importable_in(image: str, modules: set[str]) -> list[str]:
    """The modules (or ``module.attribute`` names) that fail to import in ``image``'s env."""
    script = (
        "import importlib, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as err:\n"
        "        mod, _, attr = name.rpartition('.')\n"
        "        try:\n"
        "            if not mod or not hasattr(importlib.import_module(mod), attr):\n"
        "                bad.append(f'{name}: {err}')\n"
        "        except Exception as err2:\n"
        "            bad.append(f'{name}: {err2}')\n"
        "    except Exception as err:\n"
        "        bad.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(bad))\n"
    )
    python = image_env(image) / "bin" / "python"
    out = subprocess.run(
        [str(python), "-c", script, *sorted(modules)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


SERVING_ROOTS = (
    ["convserve.cli", "convserve.cli.stack", "convserve.service"]
    + [f"convserve.service.{p.stem}" for p in (SRC / "service").glob("*.py")]
    + [f"convserve.service.api.{p.stem}" for p in (SRC / "service" / "api").glob("*.py")]
)


@pytest.mark.slow
def test_everything_serving_can_import_resolves_in_the_api_image():
    """The service on every path (a local file, models:/ over http(s), s3-style stores through
    MLflow's client, metrics, the page, the docs, KServe v2, the jobs API) and the command
    line that starts it. The CLI's other commands are imported only at module level: their
    bodies run in the trainer image."""
    cli_modules = {"convserve.cli"}
    modules = closure(SERVING_ROOTS, module_level_only=cli_modules)
    assert {"onnxruntime", "fastapi", "httpx", "prometheus_client"} <= {
        m.split(".")[0] for m in modules
    }
    assert not any(m.split(".")[0] == "torch" for m in modules)
    assert _importable_in("api", modules) == []
    # and the serve command's own body, which the module-level rule leaves out
    serve = closure(["convserve.jobs", "convserve.service.entry"], set())
    assert _importable_in("api", serve) == []


@pytest.mark.slow
def test_everything_the_worker_and_bootstrap_can_import_resolves_in_the_trainer_image():
    roots = ["convserve.cli", "convserve.pipelines", "convserve.training"] + [
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        for folder in ("pipelines", "training")
        for p in (SRC / folder).rglob("*.py")
    ]
    modules = closure(roots, module_level_only={"convserve.cli"})
    assert {"torch", "mlflow", "optuna", "huey"} <= {m.split(".")[0] for m in modules}
    assert _importable_in("trainer", modules) == []


def test_the_closure_sees_imports_inside_functions():
    modules = closure(["convserve.service.registry"], set())
    assert "httpx" in modules and "mlflow.artifacts" in modules  # both imported in functions


def _build_checks(dockerfile: str, args: dict[str, str]) -> list[str]:
    """The ``python -c`` checks a Dockerfile's RUN steps make, with ``args`` put in."""
    text = (ROOT / "deploy" / dockerfile).read_text().replace("\\\n", "")
    scripts = re.findall(r'python -c "(.*?)"(?:;|\s|$)', text)
    for name, value in args.items():
        scripts = [s.replace(f"${name}", value) for s in scripts]
    return scripts


def _run_in(image: str, scripts: list[str]) -> list[subprocess.CompletedProcess[str]]:
    python = str(image_env(image) / "bin" / "python")
    return [subprocess.run([python, "-c", s], capture_output=True, text=True) for s in scripts]


@pytest.mark.slow
def test_the_api_images_build_checks_pass_in_their_environments():
    """The CPU image's check passes on its lock; the GPU image's checks pass on the GPU lock,
    whose CUDA and cuDNN libraries load without a GPU (onnxruntime-gpu's CUDA 13 wheels
    install under nvidia/cu13/); each variant's check refuses the other's onnxruntime."""
    cpu = _build_checks("Dockerfile.api", {"VARIANT": "cpu"})
    gpu = _build_checks("Dockerfile.api", {"VARIANT": "gpu"})
    assert len(cpu) == len(gpu) == 2 and "get_available_providers" in cpu[0]
    assert [r.returncode for r in _run_in("api", cpu[:1])] == [0]
    done = _run_in("api-gpu", gpu)
    assert [r.returncode for r in done] == [0, 0], [r.stdout + r.stderr for r in done]
    assert "CUDAExecutionProvider" in done[0].stdout
    assert "libcudnn.so" in done[1].stdout and "cu13" in done[1].stdout
    assert _run_in("api-gpu", cpu[:1])[0].returncode == 1  # the CUDA provider is unexpected
    assert _run_in("api", gpu[:1])[0].returncode == 1  # the CUDA provider is missing
