"""Signals in the product's processes: a stop set by one handler while another runs."""

import os
import signal
import subprocess
import sys
import time

# The job process's handlers (tasks.main): SIGINT stops after the task, SIGTERM drains.
CHILD = """
import signal, sys
from convserve.processes import SignalFlag
stopping, draining = SignalFlag(), SignalFlag()
signal.signal(signal.SIGINT, lambda *_: stopping.set())
def drain(*_):
    draining.set()
    stopping.set()
signal.signal(signal.SIGTERM, drain)
print("ready", flush=True)
while not stopping.is_set():  # busy, as a training step is
    pass
sys.exit(0 if draining.wait(1.0) else 3)
"""


def test_sigint_then_sigterm_at_once_never_hangs_a_process():
    """A worker asked to stop its job at once sends SIGINT, then SIGTERM, microseconds
    apart: the second handler runs inside the first. With ``threading.Event`` (whose ``set``
    takes a lock the first handler holds) about 3% of such processes hung for good; with
    ``SignalFlag`` every one ends, drained."""
    hung, codes = 0, []
    for i in range(100):
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        os.kill(child.pid, signal.SIGINT)
        until = time.perf_counter() + (i % 40) * 2e-6  # 0 to 80 us apart
        while time.perf_counter() < until:
            pass
        os.kill(child.pid, signal.SIGTERM)
        try:
            codes.append(child.wait(timeout=10))
        except subprocess.TimeoutExpired:
            hung += 1
            child.kill()
            child.wait()
    assert hung == 0 and set(codes) == {0}, (hung, codes)


def test_a_signal_flag_waits_until_set_or_the_timeout():
    import threading

    from convserve.processes import SignalFlag

    flag = SignalFlag()
    start = time.monotonic()
    assert flag.wait(0.2) is False and time.monotonic() - start >= 0.2
    threading.Timer(0.1, flag.set).start()
    assert flag.wait(5) is True and flag.is_set()
