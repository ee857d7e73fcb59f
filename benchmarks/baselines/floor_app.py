"""The HTTP floor bench_serve.py compares against: the minimal app's route, reading the upload
and answering a fixed body of the same shape, with no decoding and no model. Nothing that
serves this model over FastAPI can be faster than this.

    uvicorn floor_app:app --app-dir benchmarks/baselines
"""

from __future__ import annotations

from fastapi import FastAPI, File, UploadFile

app = FastAPI()
ANSWER = {
    "top_k": [{"label": str(i), "probability": 0.1} for i in range(5)],
    "probabilities": {str(i): 0.1 for i in range(10)},
}


@app.get("/readyz")
def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/predict")
async def predict(file: UploadFile = File(...)) -> dict[str, object]:
    await file.read()
    return ANSWER
