"""Data-parallel training with ``torch.distributed``: one process per device, started by
``torchrun`` (``convserve train --nproc-per-node N`` starts it on this machine).

Each process holds a replica of the model in ``DistributedDataParallel``, which averages the
gradients of every step over the processes (gloo on CPUs, NCCL on GPUs). The global batch is
the config's ``data.batch_size``, split evenly: each process takes ``batch_size / world`` images
per step from its ``DistributedSampler`` shard of the same shuffled order, so a step sees the
images one process would have seen in the same step. Only rank 0 logs to MLflow and writes
checkpoints; every rank measures the diagnostics' snapshots on its part of the batch, and the
statistics are averaged over the ranks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from convserve.training.diagnostics import Snapshot


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, nonfinite: bool, stop: bool) -> tuple[bool, bool]:
        """Whether any rank's loss is non-finite, and whether rank 0 was asked to stop: every
        rank then leaves the step together (no rank waits in a collective for one that
        left)."""
        flags = torch.tensor([float(nonfinite), float(stop and self.main)])
        torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    def total(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks."""
        t = torch.tensor(values, dtype=torch.float64)
        torch_dist.all_reduce(t)
        return t.tolist()  # type: ignore[no-any-return]

    def mean_snapshot(self, snap: Snapshot) -> Snapshot:
        """A snapshot's statistics averaged over the ranks (each measured its own images)."""
        keys = [(layer, k) for layer, stats in snap.layers.items() for k in sorted(stats)]
        values = self.total([snap.layers[layer][k] for layer, k in keys])
        layers: dict[str, dict[str, float]] = {layer: {} for layer in snap.layers}
        for (layer, k), v in zip(keys, values, strict=True):
            layers[layer][k] = v / self.world
        return Snapshot(snap.step, layers)  # type: ignore[arg-type]


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


def leave() -> None:
    if torch_dist.is_initialized():
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
