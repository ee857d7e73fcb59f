"""Training throughput on the user's own kind of data: ``convserve train`` against a plain
PyTorch loop written like torchvision's classification reference, on the same generated image
folder (a few thousand JPEGs of coloured shapes in 10 class folders) and the same model.

Both read the JPEGs through a DataLoader with the same number of workers and batch size, and
both are timed over the same optimizer steps inside the first epoch, after a few warm-up
steps (no validation, no checkpoint inside the window). convserve runs with diagnostics off
and on. Prints images/s and the ratio to the plain loop, at 64x64 and 128x128.
Target: at least 0.9x the plain loop with diagnostics off.

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
            "diagnostics": {"enabled": diagnostics, "plots": False},
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
    args = parser.parse_args()
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
