"""The web page in headless Chromium (Debian's package, driven by Playwright with the system
executable): predict and see feature maps, train a tiny job and see it finish and promote,
watch a job's diagnostics live and beside another job's, and see API errors in words.
Screenshots go to test-artifacts/web/."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import mlflow
import onnx
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.servers import uvicorn_server, worker_process

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def stack(onnx_path, mlflow_url, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    name = f"web-{uuid.uuid4().hex[:6]}"
    mlflow.set_tracking_uri(mlflow_url)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="model",
            registered_model_name=name,
            save_as_external_data=False,
        )
    MlflowClient(mlflow_url).set_registered_model_alias(
        name, "champion", info.registered_model_version
    )
    env = {
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_API_TOKEN": "web-token",
        "CONVSERVE_MODEL_URI": f"models:/{name}@champion",
        "CONVSERVE_POLL_INTERVAL": "0.5",
        "CONVSERVE_CACHE_DIR": str(tmp_path / "cache"),
        "CONVSERVE_MLFLOW_UI_URL": mlflow_url,
        "CONVSERVE_QUEUE_PATH": str(tmp_path / "queue.db"),
    }
    with uvicorn_server(env, tmp_path) as url, worker_process(env, tmp_path):
        yield url, name


def test_predict_train_and_errors_in_the_browser(stack, tmp_path, mlflow_url):
    from playwright.sync_api import expect, sync_playwright

    url, name = stack
    SHOTS.mkdir(parents=True, exist_ok=True)
    digit = tmp_path / "digit.png"
    Image.new("L", (8, 8), 0).save(digit)
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"this is not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(url)
        expect(page.locator("#model-line")).to_contain_text(f"Model {name} version 1 @champion")
        expect(page.locator("#model-line")).to_contain_text("CPU")

        # 1. upload an image: probabilities and feature-map images appear
        page.set_input_files("#file", str(digit))
        expect(page.locator("#bars li")).to_have_count(5)
        expect(page.locator("#maps .tile")).to_have_count(6 + 8)
        page.locator("#maps .tile").nth(2).click()
        expect(page.locator("#zoom-text")).to_contain_text("block1, channel 2: mean")
        page.screenshot(path=str(SHOTS / "1-predict.png"), full_page=True)

        # 2. an API error is shown in words, not as a blank panel
        page.set_input_files("#file", str(junk))
        expect(page.locator("#predict-error")).to_contain_text("Prediction failed: 422")
        expect(page.locator("#predict-error")).to_contain_text("not an image")
        page.fill("#token", "wrong-token")
        page.click("#train-form button[type=submit]")
        expect(page.locator("#train-error")).to_contain_text("401")
        page.screenshot(path=str(SHOTS / "2-errors.png"), full_page=True)

        # 3. a tiny training job: it runs, finishes and its champion is announced
        page.fill("#token", "web-token")
        page.select_option("#preset", "He + ReLU")
        page.select_option("#f-data-name", "digits")
        page.fill("#f-blocks", "8")
        page.fill("#f-optim-epochs", "1")
        page.click("#train-form button[type=submit]")
        row = page.locator("#jobs tbody tr").first
        expect(row).to_have_attribute("data-status", "succeeded", timeout=120_000)
        expect(page.locator("#banner")).to_contain_text("new champion", timeout=60_000)
        expect(page.locator("#model-line")).to_contain_text("version 2")
        page.screenshot(path=str(SHOTS / "3-trained.png"), full_page=True)

        # the MLflow links open the runs table and the run's own page, not the Traces tab
        job_id = row.get_attribute("data-id")
        href = row.locator("a", has_text="MLflow run").get_attribute("href")
        assert re.fullmatch(rf"{mlflow_url}/#/experiments/\d+/runs/{job_id}", href)
        page.reload()  # the experiment exists now that a job ran in it
        expect(page.locator("#mlflow-link")).to_have_attribute(
            "href", re.compile(rf"^{mlflow_url}/#/experiments/\d+/runs$")
        )
        run_page = browser.new_page(viewport={"width": 1280, "height": 800})
        run_page.goto(href)
        expect(run_page.get_by_text("relu-he_normal-8").first).to_be_visible(timeout=30_000)
        expect(run_page.get_by_text("Parameters").first).to_be_visible(timeout=30_000)
        run_page.screenshot(path=str(SHOTS / "3-mlflow-run.png"))
        run_page.close()

        # 4. diagnosis: a running job's charts fill in live; then two jobs side by side
        first_id = row.get_attribute("data-id")
        page.select_option("#preset", "Xavier + tanh")
        page.select_option("#f-data-name", "digits")
        page.fill("#f-blocks", "8")
        page.fill("#f-optim-epochs", "12")
        page.click("#train-form button[type=submit]")
        expect(page.locator("#jobs tbody tr")).to_have_count(2)
        second = page.locator("#jobs tbody tr").first
        second_id = second.get_attribute("data-id")
        assert second_id != first_id
        card = page.locator(f"#diag-view .diag-card[data-id='{second_id}']")
        grad_lines = page.locator("#diag-view figure[data-stat=grad_std] polyline")
        # charted while it still runs: the page follows the newest running job by itself
        try:
            page.wait_for_function(
                """() => {
                    const card = document.querySelector("#diag-view .diag-card");
                    const line = document.querySelector(
                        "#diag-view figure[data-stat=grad_std] polyline");
                    return card && card.textContent.includes("(running)") && line;
                }""",
                timeout=120_000,
            )
        finally:
            page.screenshot(path=str(SHOTS / "4-diagnosis-live.png"), full_page=True)
        expect(card).to_contain_text("running")
        expect(second).to_have_attribute("data-status", "succeeded", timeout=180_000)
        expect(card).to_contain_text("(succeeded)", timeout=30_000)
        expect(card.locator(".verdict")).to_have_text(re.compile(r"^(healthy|\w+)$"))
        page.select_option("#diag-b", first_id)
        cards = page.locator("#diag-view .diag-card")
        expect(cards).to_have_count(2)
        expect(cards.nth(1)).to_have_attribute("data-id", first_id)
        # each statistic is a row: the two jobs' charts side by side, on one scale
        expect(page.locator("#diag-view figure[data-stat=grad_std] svg")).to_have_count(2)
        expect(page.locator("#diag-view figure[data-stat=act_std] svg")).to_have_count(2)
        # a line per layer: block1.conv, head.fc1, head.out (Xavier + tanh); block1.conv, head.out
        expect(grad_lines).to_have_count(5)
        label = page.locator("#diag-view figure[data-stat=grad_std] svg").first.get_attribute(
            "aria-label"
        )
        assert re.search(r"block1\.conv \d", label), label
        page.screenshot(path=str(SHOTS / "4-diagnosis-compare.png"), full_page=True)

        # 5. phone width: still readable, nothing wider than the screen
        page.set_viewport_size({"width": 390, "height": 844})
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 400
        page.screenshot(path=str(SHOTS / "5-phone.png"), full_page=True)
        browser.close()
