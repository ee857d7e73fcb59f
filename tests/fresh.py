"""Code run in a fresh interpreter, and what it imported: the tests that a process, a module
or a data set leaves heavy packages unimported."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable


def imported(code: str, packages: Iterable[str]) -> list[str]:
    """Which of ``packages`` (top-level names) a fresh interpreter has imported once it ran
    ``code``, sorted."""
    probe = (
        f"{code}\nimport sys\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(packages)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return list(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
