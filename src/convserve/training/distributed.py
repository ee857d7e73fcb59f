"""Data-parallel training with ``torch.distributed``: one process per device, started by
``torchrun`` (``convserve train --nproc-per-node N`` starts it on this machine).

Each process holds a replica of the model in ``DistributedDataParallel``, which averages the
gradients of every step over the processes (gloo on CPUs, NCCL on GPUs). The global batch is
the config's ``data.batch_size``, split evenly: each process takes ``batch_size / world`` images
per step from its ``DistributedSampler`` shard of the same shuffled order, so a step sees the
images one process would have seen in the same step. Only rank 0 logs to MLflow and writes
checkpoints. Every step's loss and accuracy and the diagnostics' snapshots are the global
batch's: the ranks exchange sums (of losses, of activations and gradients and their squares,
of the units that fired), never their own statistics, so one process and several measure the
same figures for the same batch and weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from convserve.processes import die_with_parent, signal_children


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(
        self, nonfinite: bool, stop: bool, counts: tuple[float, int, int]
    ) -> tuple[bool, bool, tuple[float, int, int]]:
        """In one exchange: whether any rank's loss is non-finite, whether any rank was asked
        to stop (every rank then leaves the step together: none waits in a collective for one
        that left), and the step's counts (summed loss, correct, examples) over every rank."""
        t = torch.tensor([float(nonfinite), float(stop), *counts], dtype=torch.float64)
        torch_dist.all_reduce(t)
        return bool(t[0]), bool(t[1]), (float(t[2]), int(t[3]), int(t[4]))

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks, in place (a tensor on the CPU)."""
        torch_dist.all_reduce(t)
        return t


def from_env(device: str) -> Dist | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``); None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not torch_dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank)


def leave(together: bool = False) -> None:
    """Leave the process group; ``together`` (every rank ended its run): once all ranks are
    here, so that none closes its connections while another still uses them (gloo aborts a
    rank whose peer went away)."""
    if torch_dist.is_initialized():
        if together:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def check(batch_size: int, world: int, *, balance: str, compile: bool) -> None:
    """What a data-parallel run cannot do, said before anything starts."""
    if batch_size % world:
        raise ValueError(
            f"data.batch_size {batch_size} is the global batch: it must split evenly over "
            f"{world} processes"
        )
    if balance == "sampler":
        raise ValueError(
            "data.balance=sampler draws one weighted stream of images; with several processes "
            "use data.balance=weights"
        )
    if compile:
        raise ValueError("optim.compile is for one process; leave it off with processes")


def torchrun(nproc: int, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``python -m convserve.training *args`` on
    ``nproc`` processes of this machine (``torchrun --standalone``), with the cores shared
    among them (torchrun would give each one thread, and say so)."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "convserve.training",
        *args,
    ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (cores or 1) // nproc))
    return argv, {**os.environ, "OMP_NUM_THREADS": threads}


class Torchrun:
    """``torchrun`` (``torchrun(nproc, args)``) in a session of its own, which gets SIGTERM
    when its starter dies. ``stop`` signals its ranks, not torchrun: each rank stops at the
    step they agree on, rank 0 writes ``last.pt`` at that exact place, and every rank exits
    0, so torchrun ends as for a finished run (signalled itself, it would report its ranks
    as failed)."""

    def __init__(
        self, nproc: int, args: list[str], env: dict[str, str] | None = None, **popen: Any
    ):
        argv, environ = torchrun(nproc, args)
        self.proc = subprocess.Popen(
            argv,
            env={**environ, **(env or {})},
            start_new_session=True,  # a terminal's Ctrl-C reaches the ranks through ``stop``
            preexec_fn=die_with_parent,
            **popen,
        )
        self.asked: int | None = None  # the signal a stop was asked with
        self.delivered = False

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the ranks to stop (again at each ``poll`` until they have started)."""
        self.asked = signum
        self.delivered = bool(signal_children(self.proc.pid, signum))

    def poll(self) -> int | None:
        """torchrun's exit code, None while it runs; passes on a stop the ranks missed."""
        if self.asked is not None and not self.delivered:
            self.stop(self.asked)
        return self.proc.poll()
