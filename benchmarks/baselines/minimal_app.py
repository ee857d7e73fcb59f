"""The minimal app bench_serve.py compares against: FastAPI + onnxruntime, nothing else.

What a person writes in an afternoon to serve an exported model: one upload, decoded with
Pillow, stretched to the input size, one ``session.run`` per request, the probabilities as
JSON. No batching, metrics, validation of the image, fitting, hot reload or feature maps.

    CONVSERVE_BENCH_MODEL=model.onnx uvicorn minimal_app:app --app-dir benchmarks/baselines
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

session = ort.InferenceSession(
    os.environ["CONVSERVE_BENCH_MODEL"], providers=["CPUExecutionProvider"]
)
meta = session.get_modelmeta().custom_metadata_map
labels = json.loads(meta["convserve.labels"])
_, channels, height, width = session.get_inputs()[0].shape
mode = "L" if channels == 1 else "RGB"
input_name = session.get_inputs()[0].name

app = FastAPI()


@app.get("/readyz")
def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/predict")
async def predict(file: UploadFile = File(...)) -> dict[str, object]:
    image = Image.open(io.BytesIO(await file.read())).convert(mode).resize((width, height))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = x.reshape(1, channels, height, width) if channels == 1 else x.transpose(2, 0, 1)[None]
    (probs,) = session.run(["probabilities"], {input_name: x})
    order = np.argsort(-probs[0])[:5]
    return {
        "top_k": [{"label": labels[i], "probability": float(probs[0][i])} for i in order],
        "probabilities": {label: float(p) for label, p in zip(labels, probs[0], strict=True)},
    }
