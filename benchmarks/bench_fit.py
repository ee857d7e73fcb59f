"""What fitting an upload costs, in process: microseconds per image for the service's whole
preprocessing (``imaging.preprocess``: header check, decode, colour mode, fit) with the digit
fit and with ``fit=none`` (a stretch), and the fit alone (``fitting.fit_digit`` on the decoded
image).

Two inputs: the upload ``bench_serve.py`` posts (a 28x28 grey PNG of noise: every pixel is
ink or background, the fit's worst case for its size) and the drawn digits of the fitting test
(420 PNGs of 200x200: fonts and pen strokes, dark on light and light on dark). Each figure is
the fastest of ``--repeats`` passes, the fit and the stretch taking turns, so that a slow
spell of a shared machine falls on both.

Run: .venv/bin/python benchmarks/bench_fit.py
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_serve import upload_png
from tests.service.digits import corpus

from convserve.contract import Fit
from convserve.service.fitting import fit_digit, report_for
from convserve.service.imaging import decode, preprocess

MNIST = Fit(method="digit", box=20 / 28, center="mass", background="dark")
MAX_PIXELS = 40_000_000


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def fit_alone(images: dict[bytes, Image.Image]) -> Callable[[bytes], object]:
    """The digit fit of each upload's decoded image, without decoding it again."""
    return lambda data: fit_digit(images[data], 28, 28, MNIST, report_for(images[data]))


def per_image_us(work: Callable[[bytes], object], uploads: list[bytes], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        for data in uploads:
            work(data)
    return (time.perf_counter() - start) / (rounds * len(uploads)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=40, help="passes per figure, best kept")
    args = parser.parse_args()
    inputs = {
        "bench_serve's 28x28 upload": ([upload_png()], 200),
        "420 drawn digits, 200x200": ([png(image) for _, _, image in corpus()], 1),
    }
    print(f"{'input':28s} {'step':24s} {'us/image':>9s}")
    for name, (uploads, rounds) in inputs.items():
        images = {data: decode(data, MAX_PIXELS, 512).convert("L") for data in uploads}
        steps: dict[str, Callable[[bytes], object]] = {
            "preprocess, digit fit": lambda d: preprocess(d, 1, 28, 28, MAX_PIXELS, MNIST),
            "preprocess, fit=none": lambda d: preprocess(d, 1, 28, 28, MAX_PIXELS, None),
            "fit_digit alone": fit_alone(images),
        }
        best = {step: float("inf") for step in steps}
        for _ in range(args.repeats):
            for step, work in steps.items():
                best[step] = min(best[step], per_image_us(work, uploads, rounds))
        for step, us in best.items():
            print(f"{name:28s} {step:24s} {us:9.1f}")
        fit_cost = best["preprocess, digit fit"] - best["preprocess, fit=none"]
        print(f"{name:28s} {'the fit adds':24s} {fit_cost:9.1f}")


if __name__ == "__main__":
    main()
