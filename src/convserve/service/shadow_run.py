"""The shadow process of one challenger (``python -m convserve.service.shadow_run MODEL.onnx
FD DEVICE INPUT OUTPUT``; ``shadow.py`` starts it and says why). It loads the model, maps the
shared slots (file descriptor ``FD``), and until its stdin closes answers each frame, a batch
in a slot, with the comparison of the challenger's answers to the champion's. It imports
numpy and onnxruntime alone, so that it holds little memory beside the model.

A frame is a 4-byte little-endian length, then a pickle: to this process ``(slot, images,
(C, H, W), champion probabilities)``, back ``(agree, challenger confidence, champion
confidence, seconds)`` (sums over the images; the CPU time of the run) or an error's text.
Both ends are this service's processes.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

SLOT_BYTES = 2 << 20  # one batch's images at most (float32)
BACKLOG = 8  # batches under way in a challenger's process before requests are skipped
SLOTS = BACKLOG + 1  # those under way, and the one being filled
NICE = 19  # the CPU priority where SCHED_IDLE is missing
HEADER = struct.Struct("<I")


def frame(value: Any) -> bytes:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _read(stream: BinaryIO) -> Any:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    return pickle.loads(stream.read(size))


def compare(champion: np.ndarray, challenger: np.ndarray) -> tuple[int, float, float]:
    """Over ``[N, classes]`` probabilities: the images whose top class both give, and the
    sums of each one's top probability."""
    agree = int(np.sum(champion.argmax(1) == challenger.argmax(1)))
    return agree, float(challenger.max(1).sum()), float(champion.max(1).sum())


def _lowest_priority() -> None:
    """SCHED_IDLE where the system has it (Linux): a waking answering process always takes
    the core from this one, which runs on what is left (a share of weight 3 against 1024);
    else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(NICE)


def main(path: str, fd: int, device: str, input_name: str, output: str) -> int:
    """Load the challenger, then answer frames until stdin closes (at the lowest priority
    from the first one on: the load is done once, at the usual one)."""
    from convserve.service.sessions import open_session

    try:
        session = open_session(Path(path), device, 1, 1)
    except Exception as err:
        print(f"shadow: {err}", file=sys.stderr)
        return 2
    memory = mmap.mmap(fd, SLOTS * SLOT_BYTES)
    # the run's CPU time, not its wait for a core at the lowest priority (on a GPU: its time)
    on_gpu = "CUDAExecutionProvider" in session.get_providers()
    clock = time.perf_counter if on_gpu else time.thread_time
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _lowest_priority()
    while (request := _read(stdin)) is not None:
        slot, images, shape, champion = request
        batch = np.ndarray((images, *shape), np.float32, buffer=memory, offset=slot * SLOT_BYTES)
        start = clock()
        try:
            (probs,) = session.run([output], {input_name: batch})
            reply: Any = (*compare(champion, probs), clock() - start)
        except Exception as err:  # onnxruntime raises its own untyped errors
            reply = f"{type(err).__name__}: {err}"
        del batch
        stdout.write(frame(reply))
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
