"""Processes and their signals, for every layer: a child that dies with its parent, and the
children of a process (the ranks ``torchrun`` started), found in ``/proc``; whether a port is
free for a server to bind; and memory a process freed, given back to the system."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import time
from pathlib import Path


class SignalFlag:
    """A stop that a signal handler sets and threads read. ``threading.Event.set`` takes a
    lock: when a second signal comes while the first one's handler holds it (SIGINT, then
    the SIGTERM of a worker asked to stop its job at once), the second handler runs in the
    same thread, inside the first, and waits for that lock forever. Setting this flag takes
    no lock; ``wait`` looks at it every ``POLL`` seconds."""

    POLL = 0.05

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Until the flag is set (True) or ``timeout`` seconds have passed (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = self.POLL if end is None else min(self.POLL, end - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Linux: this process gets ``signum`` when its parent dies, even by SIGKILL (elsewhere,
    nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``; elsewhere none)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (name) state ppid ...": the name may hold spaces and parentheses
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def signal_children(pid: int, signum: int) -> list[int]:
    """Send ``signum`` to each child of ``pid``; the children it reached."""
    reached = []
    for child in children(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)
            reached.append(child)
    return reached


def port_taken(host: str, port: int) -> str | None:
    """Why a server could not bind ``host:port`` now (``"Address already in use"``), or None.
    Bound as the servers bind, with SO_REUSEADDR (a port a stopped server left in TIME_WAIT is
    free) and without SO_REUSEPORT, so a port that another process shares out with
    SO_REUSEPORT (another ``convserve serve``'s gRPC) counts as taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            return err.strerror or str(err)
    return None


def give_back_freed_memory() -> None:
    """Give the memory this process freed back to the system (glibc keeps freed memory of
    its heap for later, and a process would stay at its peak); nothing where the C library
    is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
