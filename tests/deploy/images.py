"""The image environments, built here as the images build them: a virtualenv per lock file
(``deploy/locks/<image>.txt``) with exactly what the Dockerfile installs from it (``pip
install --require-hashes -r``), then convserve itself without dependencies, as the
Dockerfile's last layer does. Each environment is cached by its lock's hash, outside the
checkout (``CONVSERVE_IMAGE_ENVS``, by default ``~/.cache/convserve/image-envs``): it is
built once per lock change; convserve is reinstalled when its source changes."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ROOT / "deploy" / "locks"
# The images' Python (python:3.11-slim): this machine's 3.11, the one the dev venv was made from.
PYTHON = Path(sys.base_prefix) / "bin" / "python3.11"
# Images without convserve in them
NO_APP = {"mlflow"}


def cache_root() -> Path:
    default = Path.home() / ".cache" / "convserve" / "image-envs"
    return Path(os.environ.get("CONVSERVE_IMAGE_ENVS", default))


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def _source_digest() -> str:
    files = [ROOT / "pyproject.toml", ROOT / "README.md"]
    files += sorted(
        p for p in (ROOT / "src").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    return _digest(*(str(p.relative_to(ROOT)).encode() + p.read_bytes() for p in files))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (pytest-xdist workers, or two checkouts on one machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: list[str | Path], log: Path) -> None:
    with open(log, "ab") as out:
        done = subprocess.run([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} failed; see {log}:\n{log.read_text()[-3000:]}"
        )


def _pip(env: Path, log: Path, *args: str | Path) -> None:
    """``pip install`` inside ``env``, as a Dockerfile's RUN step does."""
    python = env / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], log)


def lock_path(image: str) -> Path:
    return LOCKS / f"{image}.txt"


def image_env(image: str) -> Path:
    """The virtualenv of ``image`` (``api``, ``api-gpu``, ``trainer``, ``mlflow``), built from
    its lock if it is not cached yet; convserve installed in it as of this checkout."""
    lock = lock_path(image)
    root = cache_root()
    env = root / f"{image}-{_digest(lock.read_bytes(), str(PYTHON).encode())}"
    with _locked(root / f"{image}.lock"):
        if not (env / ".complete").exists():
            shutil.rmtree(env, ignore_errors=True)
            log = root / f"{image}.log"
            log.write_text("")
            _run([PYTHON, "-m", "venv", env], log)
            _pip(env, log, "--require-hashes", "-r", lock)
            (env / ".complete").write_text(lock.read_text())
            # the other environments of this image (older locks) go
            for old in root.glob(f"{image}-*"):
                if old != env and old.is_dir() and len(old.name) == len(env.name):
                    shutil.rmtree(old, ignore_errors=True)
        if image not in NO_APP:
            _install_app(env, root / f"{image}.log")
    return env


def _install_app(env: Path, log: Path) -> None:
    """``pip install --no-deps .`` of this checkout, as the Dockerfile's last layer, from a
    copy (a build writes ``build/`` and ``*.egg-info`` beside the sources)."""
    digest = _source_digest()
    stamp = env / ".convserve-source"
    if stamp.exists() and stamp.read_text() == digest:
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "convserve"
        copy.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, copy / name)
        shutil.copytree(
            ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        _pip(env, log, "--no-deps", "--no-build-isolation", "--force-reinstall", copy)
    stamp.write_text(digest)


def main(images: list[str]) -> None:
    """Build the environments of ``images`` (all of them when none is named) at once, each in
    its own pip process: ``make test`` does so before the suite, as it installs Chromium, so
    that the tests of the deployed processes start from built environments."""
    images = images or sorted(p.stem for p in LOCKS.glob("*.txt"))
    print(f"image environments ({', '.join(images)}) in {cache_root()}", flush=True)
    with ThreadPoolExecutor(len(images)) as pool:
        for image, env in zip(images, pool.map(image_env, images), strict=True):
            print(f"  {image}: {env}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
