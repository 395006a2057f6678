"""The pages in a real browser: headless Chromium (Debian's package) driven by Playwright.

The demo page is served by the real V2 server app (``kiln.serving.server.create_app``)
over the model store of the tiny run, on a loopback port. The server has no ``/`` route
of its own yet, so the test adds one that returns ``kiln.html.demo_page`` (same origin as
the infer endpoint, as it will be once the server serves the page itself).
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageStat

from kiln.html import demo_page
from kiln.report import SECTIONS, write_report

from helpers import serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # headless Chromium on real pages


def test_report_opens_with_every_section_and_image(tiny_runs, report_of, page, tmp_path: Path) -> None:
    path = write_report(report_of(tiny_runs.second), tmp_path / "report.html")
    page.goto(path.as_uri())
    page.wait_for_load_state("load")

    for name in SECTIONS:
        assert page.locator(f"#section-{name}").is_visible(), name
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, done: e.complete, alt: e.alt}))")
    assert len(images) >= 8
    assert all(i["done"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("L")
    stat = ImageStat.Stat(shot)
    assert shot.height > 2000  # the whole report, not an empty viewport
    assert stat.stddev[0] > 10 and len(shot.getcolors(256 * 256) or range(257)) > 16, "screenshot is blank"


def _draw_one(page) -> None:
    """A slightly slanted vertical stroke (a '1') drawn with pointer events."""
    box = page.locator("#pad").bounding_box()
    x, top, bottom = box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.15, box["y"] + box["height"] * 0.85
    page.mouse.move(x, top)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x - 8 * i / 20, top + (bottom - top) * i / 20)
    page.mouse.up()


@pytest.fixture
def demo_server(tiny_runs):
    from fastapi.responses import HTMLResponse

    from kiln.serving.server import create_app

    app = create_app(tiny_runs.store, "mnist", intra_op_threads=1, poll_interval_s=0)
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.add_api_route("/", lambda: HTMLResponse(demo_page("mnist")), methods=["GET"])
    with serve(app) as running:
        yield running


def test_demo_page_shows_what_the_server_answers(demo_server, page, tiny_runs) -> None:
    page.goto(demo_server.url + "/")
    with page.expect_request("**/v2/models/mnist/infer") as sent:
        _draw_one(page)
    page.wait_for_function("document.getElementById('version').textContent !== ''", timeout=10_000)
    request = sent.value.post_data_json
    (tensor,) = request["inputs"]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("pixels", "UINT8", [1, 28, 28])
    pixels = np.array(tensor["data"], dtype=np.int64).reshape(28, 28)
    assert pixels.min() >= 0 and pixels.max() <= 255

    # centred the MNIST way: ink fits 20 pixels, its centre of mass at the image's centre
    rows, cols = np.nonzero(pixels)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 == 20
    mass = pixels.sum()
    centre = ((pixels.sum(axis=1) * np.arange(28)).sum() / mass, (pixels.sum(axis=0) * np.arange(28)).sum() / mass)
    assert centre == pytest.approx((13.5, 13.5), abs=0.75)

    direct = httpx.post(f"{demo_server.url}/v2/models/mnist/infer", json=request, timeout=10).json()
    outputs = {o["name"]: o["data"] for o in direct["outputs"]}
    assert page.locator("#label").inner_text() == str(outputs["label"][0])
    assert page.locator("#version").inner_text() == direct["model_version"] == tiny_runs.second.deployed_version
    for k, p in enumerate(outputs["probabilities"]):
        assert page.locator(f"#p-{k}").inner_text() == f"{100 * p:.1f}%"
    # centred like MNIST, a drawn '1' is read as one by the small real model
    assert outputs["label"][0] == 1, outputs["probabilities"]
    assert page.locator("#error").inner_text() == ""


def test_demo_page_says_when_the_model_does_not_answer(page, tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    app = FastAPI()
    app.add_api_route("/", lambda: HTMLResponse(demo_page("nosuchmodel")), methods=["GET"])
    with serve(app) as running:
        page.goto(running.url + "/")
        _draw_one(page)
        page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=10_000)
    assert "The model did not answer" in page.locator("#error").inner_text()
    assert page.locator("#label").inner_text() == "\u2013"
