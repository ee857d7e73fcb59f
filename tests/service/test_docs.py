"""The API docs work offline: Swagger UI and ReDoc load every asset from the server itself,
in Chromium with every non-local request blocked."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from tests.servers import uvicorn_server
from tests.service.test_web import ARGS, CHROMIUM, SHOTS
from tests.waiting import limit_ms

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(onnx_path, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    env = {"CONVSERVE_MODEL_URI": str(onnx_path)}
    with uvicorn_server(env, tmp_path_factory.mktemp("docs")) as url:
        yield url


def _offline_page(browser, blocked: list[str]):
    page = browser.new_page(viewport={"width": 1280, "height": 800})

    def route(r):
        host = urlparse(r.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return page


def test_swagger_ui_and_redoc_list_the_operations_without_internet(server):
    from playwright.sync_api import expect, sync_playwright

    operations = sum(
        len(methods) for methods in httpx.get(f"{server}/openapi.json").json()["paths"].values()
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    blocked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = _offline_page(browser, blocked)
        page.goto(f"{server}/docs")
        expect(page.locator(".opblock").first).to_be_visible(timeout=limit_ms(20))
        assert page.locator(".opblock").count() == operations
        expect(page.locator(".opblock-summary-path", has_text="/predict").first).to_be_visible()
        page.screenshot(path=str(SHOTS / "docs-swagger.png"))
        page = _offline_page(browser, blocked)
        page.goto(f"{server}/redoc")
        expect(page.get_by_text("Classify one image").first).to_be_attached(timeout=limit_ms(20))
        page.screenshot(path=str(SHOTS / "docs-redoc.png"))
        browser.close()
    # Nothing the pages need comes from elsewhere. ReDoc asks once for the Redocly logo in its
    # footer and drops the image when that fails (its own onError); nothing else goes out.
    assert set(blocked) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}


def test_the_page_links_to_the_docs_and_has_an_icon(server):
    page = httpx.get(server).text
    assert 'href="/docs"' in page
    icon = httpx.get(f"{server}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file
    assert httpx.get(f"{server}/docs").text.count("cdn") == 0
