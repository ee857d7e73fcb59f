"""The ceiling bench_serve.py measures convserve's compute-bound points against: a bare ASGI
app under uvicorn, with no framework, that does a prediction's work and nothing else. It
reads the whole body, takes the one upload out of the multipart form by its delimiters,
decodes it with Pillow, runs the model on the event loop (batch 1, the session as
``convserve serve`` opens it for a worker of one onnxruntime thread, of the graph with the
probabilities alone, as convserve runs a request for them) and answers the probabilities as
JSON. With as many worker processes as convserve, a server over uvicorn
that runs each request's image on its own loses no more to serving than this.

    CONVSERVE_BENCH_MODEL=large64.onnx \\
        uvicorn bare_infer_app:app --app-dir benchmarks/baselines --workers 2
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from bare_app import lifespan  # beside this file, on uvicorn's --app-dir
from PIL import Image

from convserve.service.sessions import open_session, with_outputs

graph = with_outputs(Path(os.environ["CONVSERVE_BENCH_MODEL"]).read_bytes(), "probabilities")
session = open_session(graph, "cpu", 1, 1)
labels = json.loads(session.get_modelmeta().custom_metadata_map["convserve.labels"])
_, channels, height, width = session.get_inputs()[0].shape
mode = "L" if channels == 1 else "RGB"
input_name = session.get_inputs()[0].name


def predict(body: bytes) -> bytes:
    start = body.index(b"\r\n\r\n") + 4  # the end of the one part's headers
    end = body.rindex(b"\r\n--")  # the closing delimiter
    image = Image.open(io.BytesIO(body[start:end])).convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image).reshape(height, width, channels)
    x = np.empty((1, channels, height, width), np.float32)  # scaled and reordered in one pass
    np.multiply(pixels.transpose(2, 0, 1), np.float32(1 / 255), out=x[0])
    (probs,) = session.run(["probabilities"], {input_name: x})
    answer = {"probabilities": dict(zip(labels, probs[0].tolist(), strict=True))}
    return json.dumps({"predictions": [answer]}).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    answer = predict(b"".join(chunks))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
