"""No convserve process sends onnxruntime's usage events: traced, a process that opens a
session through convserve makes no lookup of the events' collector, over the same time in
which plain onnxruntime, beside it, does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import wait_until

# the collector's host name in a DNS query, as strace prints it
COLLECTOR = rb"\6mobile\6events\4data"
OPEN_A_SESSION = """
import sys, time
if sys.argv[1] == "convserve":
    from convserve.service.sessions import open_session
    open_session(sys.argv[2], "cpu", 1, 1)
else:
    import onnxruntime
    onnxruntime.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
print("open", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    """This environment without what turns onnxruntime's events off (a CI machine's ``CI``)."""
    off = {"CI", "ORT_DISABLE_TELEMETRY", "ORT_RUNNING_UNIT_TESTS"}
    return {k: v for k, v in os.environ.items() if k not in off}


def test_importing_convserve_turns_onnxruntime_s_events_off_unless_the_environment_says():
    run = [sys.executable, "-c", "import os, convserve; print(os.environ['ORT_DISABLE_TELEMETRY'])"]
    assert subprocess.run(run, env=_env(), capture_output=True, text=True).stdout == "1\n"
    given = {**_env(), "ORT_DISABLE_TELEMETRY": "yes"}
    assert subprocess.run(run, env=given, capture_output=True, text=True).stdout == "yes\n"


def _can_trace() -> bool:
    """Whether strace is installed (make test installs it) and may trace here (a container
    without the ptrace capability may not)."""
    if shutil.which("strace") is None:
        return False
    run = ["strace", "-f", "-o", os.devnull, sys.executable, "-c", "pass"]
    return subprocess.run(run, capture_output=True).returncode == 0


def test_a_convserve_process_sends_no_usage_events(onnx_path, tmp_path):
    if not _can_trace():
        pytest.skip("strace is not installed or may not trace here")
    traces = {name: tmp_path / f"{name}.trace" for name in ("convserve", "onnxruntime")}
    strace = ["strace", "-f", "-e", "trace=sendto,sendmsg,sendmmsg", "-s", "64", "-o"]
    processes = {
        name: subprocess.Popen(
            [*strace, str(trace), sys.executable, "-c", OPEN_A_SESSION, name, str(onnx_path)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # strace and the process it runs: one group to stop
        )
        for name, trace in traces.items()
    }
    try:
        for process in processes.values():
            assert process.stdout is not None and process.stdout.readline() == b"open\n"

        def looked_up(trace: Path) -> bool:
            return COLLECTOR in trace.read_bytes()

        try:  # plain onnxruntime looks the collector up some seconds after its session opens
            wait_until(lambda: looked_up(traces["onnxruntime"]), 60, "the events' lookup")
        except AssertionError:
            pytest.skip("this onnxruntime sends no usage events here: nothing to turn off")
        assert not looked_up(traces["convserve"])
    finally:
        for process in processes.values():
            os.killpg(process.pid, signal.SIGKILL)  # strace killed alone leaves its tracee
            process.wait()
