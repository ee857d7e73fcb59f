"""Training throughput on the user's own kind of data: ``convserve train`` against a plain
PyTorch loop written like torchvision's classification reference, on the same generated image
folder (a few thousand JPEGs of coloured shapes in 10 class folders) and the same model.

Both read the JPEGs through a DataLoader with the same number of workers and batch size, and
both are timed over the same optimizer steps inside the first epoch, after a few warm-up
steps (no validation, no checkpoint inside the window). convserve runs with diagnostics off
and on. Prints images/s and the ratio to the plain loop, at 64x64 and 128x128.
Target: at least 0.9x the plain loop with diagnostics off.

``--memory-format``: the time of one optimizer step (Adam, batch 64, one thread) of five
models in the layout convserve trains in on a CPU (channels last, NHWC) and in PyTorch's
default (NCHW), alternately, best of three: the speed-up that layout brings.

First, whole runs: the default config for 2 epochs (diagnostics on, plots as by default, and
with ``tracking.plots=end``) against the same run as a plain loop. Target: at least 0.9x.

    .venv/bin/python benchmarks/bench_train.py --images 4000 --workers 2
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from convserve.training.configfiles import validate_config
from convserve.training.data import load_data
from convserve.training.model import build_model
from convserve.training.run import Callbacks, train

WARMUP = 5


def make_folder(root: Path, images: int, size: int, seed: int = 0) -> None:
    """``root/<class>/<n>.jpg``: class k draws shape k % 3 in colour k, at random places."""
    rng = random.Random(seed)
    colours = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(10)]
    for n in range(images):
        k = n % 10
        image = Image.new("RGB", (size, size), tuple(rng.randrange(60) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        x, y, r = (
            rng.randrange(size // 2),
            rng.randrange(size // 2),
            rng.randrange(size // 6, size // 2),
        )
        box = (x, y, x + r, y + r)
        [draw.ellipse, draw.rectangle, draw.pieslice][k % 3](
            box, fill=colours[k], **({} if k % 3 != 2 else {"start": 0, "end": 270})
        )
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class{k}" / f"{n}.jpg", quality=90)


def convserve_rate(root: Path, size: int, steps: int, workers: int, diagnostics: bool) -> float:
    cfg = validate_config(
        {
            "device": "cpu",
            "data": {
                "name": "imagefolder",
                "root": str(root),
                "image_size": size,
                "num_workers": workers,
                "batch_size": 64,
                "test_fraction": 0.0,
            },
            "diagnostics": {"enabled": diagnostics},
            "optim": {"optimizer": "sgd", "lr": 0.01, "epochs": 1, "max_steps": steps},
            "tracking": {"enabled": False, "output_dir": str(root.parent / "runs")},
        }
    )
    stamps: dict[int, float] = {}

    def on_step(step: int, _loss: float, _acc: float) -> None:
        stamps[step] = time.perf_counter()

    train(cfg, callbacks=Callbacks(on_step=on_step))
    return (steps - WARMUP) * 64 / (stamps[steps] - stamps[WARMUP])


def plain_rate(root: Path, size: int, steps: int, workers: int) -> float:
    """torchvision's reference loop: ImageFolder, PIL decoding, v2 to a float tensor."""
    torch.manual_seed(0)
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers)
    model = build_model(validate_config({}).model, 3, (size, size), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    stamps = {}
    for step, (x, y) in enumerate(loader, start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        stamps[step] = time.perf_counter()
        if step == steps:
            break
    return (steps - WARMUP) * 64 / (stamps[steps] - stamps[WARMUP])


def default_run_seconds(plots: str, folder: Path) -> float:
    """``convserve train`` with the default config (diagnostics on) for 2 epochs, tracking
    off, ``tracking.plots`` as given: the whole run's wall time."""
    cfg = validate_config(
        {
            "device": "cpu",
            "optim": {"epochs": 2},
            "tracking": {"enabled": False, "plots": plots, "output_dir": str(folder)},
        }
    )
    start = time.perf_counter()
    result = train(cfg)
    assert result.status == "finished"
    return time.perf_counter() - start


def plain_default_seconds() -> float:
    """The same run as a plain loop: the same data and model, Adam at the default lr, 2
    epochs of shuffled batches of 64, validation after each, the test split at the end."""
    cfg = validate_config({"device": "cpu", "optim": {"epochs": 2}})
    start = time.perf_counter()
    torch.manual_seed(0)
    data = load_data(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.channels, data.image_size, data.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    x, y = data.train.sample(len(data.train))

    def evaluate(images: torch.Tensor, labels: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            right = sum(
                int((model(images[i : i + 256]).argmax(1) == labels[i : i + 256]).sum())
                for i in range(0, len(images), 256)
            )
        model.train()
        return right / len(images)

    for _ in range(cfg.optim.epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        evaluate(*data.val.sample(len(data.val)))
    assert data.test is not None
    evaluate(*data.test.sample(len(data.test)))
    return time.perf_counter() - start


def default_runs(repeats: int) -> None:
    """The default config's 2-epoch run against the plain loop, plots off (the default) and
    at the end. Target: at least 0.9x with diagnostics on and the default plots."""
    times: dict[str, list[float]] = {"plain": [], "none": [], "end": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # alternately, so that noise hits all three alike
            times["plain"].append(plain_default_seconds())
            for plots in ("none", "end"):
                times[plots].append(default_run_seconds(plots, Path(tmp)))
    best = {k: min(v) for k, v in times.items()}
    print(
        f"default config, 2 epochs: plain loop {best['plain']:.2f} s, convserve with "
        f"diagnostics {best['none']:.2f} s ({best['plain'] / best['none']:.2f}x, target >= "
        f"0.9), with tracking.plots=end {best['end']:.2f} s "
        f"({best['plain'] / best['end']:.2f}x)"
    )


MODELS = {  # name: (blocks' filters, pooling, activation, hidden, channels, size)
    "default, 1x28x28, 16-32": ([16, 32], "max", "relu", [], 1, 28),
    "the same, average pooling": ([16, 32], "avg", "relu", [], 1, 28),
    "shapes, 1x16x16, 16-16-16": ([16, 16, 16], "max", "tanh", [64, 64, 64], 1, 16),
    "tests' tiny, 1x8x8, 8": ([8], "max", "relu", [], 1, 8),
    "RGB 3x64x64, 32-64": ([32, 64], "max", "relu", [], 3, 64),
}


def step_ms(name: str, channels_last: bool, steps: int = 30) -> float:
    """Milliseconds per Adam step on random batches of 64, after three warm-up steps."""
    filters, pool, activation, hidden, channels, size = MODELS[name]
    model_cfg = validate_config(
        {
            "model": {
                "blocks": [{"out_channels": f, "pool": pool} for f in filters],
                "hidden": hidden,
                "activation": activation,
            }
        }
    ).model
    torch.manual_seed(0)
    model = build_model(model_cfg, channels, (size, size), 10)
    x, y = torch.randn(64, channels, size, size), torch.randint(0, 10, (64,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for n in range(3 + steps):
        if n == 3:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def memory_formats(repeats: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("one Adam step, batch 64, one thread (ms, best of the repeats):")
    for name in MODELS:
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for last in (False, True):
                times[last].append(step_ms(name, last))
        nchw, nhwc = min(times[False]), min(times[True])
        print(f"  {name:28s} NCHW {nchw:7.2f}  channels last {nhwc:7.2f}  {nchw / nhwc:.2f}x")
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument(
        "--steps", type=int, default=40, help="steps timed per run (plus 5 warm-up)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128])
    parser.add_argument(
        "--memory-format", action="store_true", help="only the NCHW against channels-last steps"
    )
    args = parser.parse_args()
    if args.memory_format:
        memory_formats(max(3, args.repeats))
        return
    default_runs(args.repeats)
    steps = args.steps + WARMUP
    print(
        f"{args.images} JPEGs, 10 classes, batch 64, {args.workers} DataLoader workers, "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps, best of {args.repeats}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = Path(tmp) / f"images{size}"
            make_folder(root, args.images, size)
            rates: dict[str, list[float]] = {"plain": [], "convserve": [], "convserve+diag": []}
            for _ in range(args.repeats):  # alternately, so that noise hits all three alike
                rates["plain"].append(plain_rate(root, size, steps, args.workers))
                rates["convserve"].append(convserve_rate(root, size, steps, args.workers, False))
                rates["convserve+diag"].append(
                    convserve_rate(root, size, steps, args.workers, True)
                )
            best = {k: max(v) for k, v in rates.items()}
            ratio = best["convserve"] / best["plain"]
            with_diag = best["convserve+diag"] / best["plain"]
            print(
                f"{size}x{size}: plain loop {best['plain']:7.1f} images/s, convserve "
                f"{best['convserve']:7.1f} ({ratio:.2f}x, target >= 0.9), "
                f"with diagnostics {best['convserve+diag']:7.1f} ({with_diag:.2f}x)"
            )


if __name__ == "__main__":
    main()
