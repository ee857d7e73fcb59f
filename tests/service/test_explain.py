"""Occlusion maps: hiding a digit's ink costs the top class more probability than hiding its
background, on the real model through the real app and onnxruntime."""

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.datasets import load_digits

from convserve.service import explain
from convserve.service.app import create_app
from convserve.service.settings import Settings


@pytest.fixture
def client(onnx_path):
    settings = Settings(model_uri=str(onnx_path), api_token="t", poll_interval=3600)
    with TestClient(create_app(settings)) as c:
        yield c


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def test_patches_cover_every_pixel_and_the_map_averages_them():
    assert explain.patch_and_stride(28, 28) == (4, 2)
    assert explain.patch_and_stride(8, 8) == (1, 1)
    image = np.ones((1, 5, 5), np.float32)
    copies, corners = explain.occluded(image, 2, 2, np.array([0.0]))
    assert corners[-1] == (3, 3)  # the last patch reaches the edge
    assert len(copies) == len(corners) == 9
    covered = np.zeros((5, 5), bool)
    for copy, (y, x) in zip(copies, corners, strict=True):
        assert (copy[0, y : y + 2, x : x + 2] == 0).all() and copy.sum() == 25 - 4
        covered[y : y + 2, x : x + 2] = True
    assert covered.all()
    # a drop of 1 only where the patch covers pixel (0, 0), 0 elsewhere
    probs = np.array([0.0 if c == (0, 0) else 1.0 for c in corners])
    heat = explain.drop_map(1.0, probs, corners, 2, 5, 5)
    assert heat[0, 0] == 1.0 and heat[4, 4] == 0.0


def test_the_ink_explains_more_than_the_background(client):
    digits = load_digits()
    images = (digits.images * 255 / 16).round()
    ink_wins, shown = 0, 0
    for i in range(40):
        pixels = images[i]
        r = client.post(
            "/predict",
            params={"explain": "occlusion", "fit": "none"},
            files={"file": ("d.png", _png(pixels))},
        )
        assert r.status_code == 200, r.text
        answer = r.json()["predictions"][0]
        ex = answer["explanation"]
        if ex["label"] != str(digits.target[i]):
            continue  # explain what the model gets right
        shown += 1
        heat = np.array(ex["heatmap"])
        assert heat.shape == (8, 8) and ex["occlusions"] == 64 and ex["patch"] == 1
        assert ex["probability"] == pytest.approx(answer["top_k"][0]["probability"])
        assert ex["max_drop"] == pytest.approx(heat.max(), abs=1e-4)
        seen = np.array(Image.open(io.BytesIO(base64.b64decode(answer["input"]["png"]))))
        assert seen.shape == (8, 8) and np.abs(seen.astype(int) - pixels).max() <= 1
        ink, background = pixels > 128, pixels == 0
        ink_wins += heat[ink].mean() > heat[background].mean()
    assert shown >= 20
    assert ink_wins >= 0.8 * shown, (ink_wins, shown)
    assert r.json()["time"]["explain_ms"] > 0


def test_explain_is_refused_for_too_many_images_and_off_by_default(client):
    png = _png(np.zeros((8, 8)))
    files = [("files", (f"{i}.png", png)) for i in range(5)]
    r = client.post("/predict", params={"explain": "occlusion"}, files=files)
    assert r.status_code == 413 and "at most 4 images" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("x.png", png)})
    assert "explanation" not in r.json()["predictions"][0]
    assert "png" not in r.json()["predictions"][0]["input"]
    r = client.post("/predict", params={"return_input": "true"}, files={"file": ("x.png", png)})
    assert r.json()["predictions"][0]["input"]["png"]
    assert "explain_ms" not in r.json()["time"]
    r = client.post("/predict", params={"explain": "gradcam"}, files={"file": ("x.png", png)})
    assert r.status_code == 422
