"""Training throughput with diagnostics on versus off, on the default model and data, and
on wide plain networks (hidden layers of 256, 512 and 1,024 units, ``--widths``).

Runs both settings alternately in one process (the machine is shared and noisy) and prints
images/s and the ratio, then the snapshot's own cost from interleaved plain and measured
steps (the steadier figure on a noisy machine). Target: diagnostics cost at most 15% at the
default interval, at every width (the distinct-filter statistic is n log n in the units, not
n squared as comparing every pair of units was).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from convserve.training.config import TrainConfig
from convserve.training.data import DataBundle, load_data
from convserve.training.diagnostics import Diagnostics
from convserve.training.loop import (
    Recipe,
    _measured_step,
    _step,
    make_optimizer,
    train_one_epoch,
)
from convserve.training.run import build_for, seed_everything


def images_per_second(cfg: TrainConfig, data: DataBundle, diagnostics: bool, steps: int) -> float:
    seed_everything(cfg.seed)
    model = build_for(cfg, data)
    optimizer = make_optimizer(model, cfg.optim)
    diag = Diagnostics(model, cfg.diagnostics) if diagnostics else None
    start = time.perf_counter()
    result = train_one_epoch(
        model,
        data.train,
        optimizer,
        device=torch.device("cpu"),
        batch_size=cfg.data.batch_size,
        seed=0,
        start_step=0,
        max_steps=steps,
        diagnostics=diag,
        diag_every=cfg.diagnostics.every,
    )
    elapsed = time.perf_counter() - start
    if diag is not None:
        diag.close()
    return result.steps * cfg.data.batch_size / elapsed


def step_cost(cfg: TrainConfig, data: DataBundle, pairs: int = 20) -> tuple[float, float]:
    """Median time of a plain training step and of a measured one, interleaved on one batch:
    the snapshot's own cost, without the throughput runs' noise."""
    seed_everything(cfg.seed)
    model = build_for(cfg, data)
    optimizer = make_optimizer(model, cfg.optim)
    diag = Diagnostics(model, cfg.diagnostics)
    x, y = data.train.sample(cfg.data.batch_size)
    plain, measured = [], []
    for i in range(pairs + 3):
        start = time.perf_counter()
        _step(model, optimizer, x, y, i, Recipe())
        middle = time.perf_counter()
        _measured_step(model, optimizer, x, y, i, Recipe(), diag)
        end = time.perf_counter()
        if i >= 3:  # the first steps warm up allocators and hooks
            plain.append(middle - start)
            measured.append(end - middle)
    diag.close()
    return statistics.median(plain), statistics.median(measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024])
    args = parser.parse_args()
    base = TrainConfig()
    data = load_data(base.data, base.seed)  # once: every setting trains on the same batches
    print(
        f"diagnostics every {base.diagnostics.every} steps, batch {base.data.batch_size}, "
        f"{args.steps} steps x {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    models = {"default CNN": base}
    for width in args.widths:  # a plain network: 4 hidden layers of `width` units, no blocks
        model = base.model.model_copy(update={"blocks": [], "hidden": [width] * 4})
        models[f"MLP 4x{width}"] = base.model_copy(update={"model": model})
    for name, cfg in models.items():
        on, off = [], []
        for i in range(args.repeats):  # alternate which goes first: neither gets the warm slot
            for diagnostics in (False, True) if i % 2 == 0 else (True, False):
                ips = images_per_second(cfg, data, diagnostics, args.steps)
                (on if diagnostics else off).append(ips)
        best_on, best_off = max(on), max(off)
        plain, measured = step_cost(cfg, data)
        every = cfg.diagnostics.every
        print(
            f"{name:12s} off: {best_off:8.1f} images/s   on: {best_on:8.1f} images/s   "
            f"ratio on/off {best_on / best_off:.3f} "
            f"(overhead {100 * (1 - best_on / best_off):.1f}%, target <= 15%); "
            f"step {plain * 1e3:.2f} ms, measured step {measured * 1e3:.2f} ms: "
            f"{100 * (measured - plain) / (every * plain):.1f}% at every={every}"
        )


if __name__ == "__main__":
    main()
