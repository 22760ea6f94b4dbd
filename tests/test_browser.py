"""The web page in a real headless Chromium, served by a live uvicorn on loopback."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import bottle_root  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
BOTTLE = bottle_root() or Path("absent-bottle-data")  # conftest: beside the checkout, $FASTPADIM_BOTTLE, /work/shared
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed at /usr/bin/chromium (apt-get install chromium)"),
    pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {BOTTLE}"),
]


@pytest.fixture(scope="module")
def live_server():
    """The service on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    from fastpadim.model import Padim
    from fastpadim.http_api import create_app
    from fastpadim.evaluation.synthetic import surface

    rng = np.random.default_rng(0)
    model = Padim(weights="random", image_size=128, crop_size=112, holdout=0.2, device="cpu", workers=1)
    model.fit([surface(rng, 128) for _ in range(6)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this very socket (no race)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_page_scores_an_uploaded_bottle_and_shows_the_heatmap(live_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[dev]')")
    sync_playwright = sync_api.sync_playwright

    image = sorted((BOTTLE / "test/broken_large").glob("*.png"))[0]
    foreign: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("request", lambda r: None if r.url.startswith((live_server, "data:", "blob:")) else foreign.append(r.url))
            page.goto(live_server + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('training images')")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("body[data-scored='1']", timeout=60_000)

            assert page.is_visible("#result") and not page.is_visible("#error")
            score = float(page.text_content("#score"))
            assert np.isfinite(score) and score > 0
            assert page.text_content("#verdict") in ("anomalous", "good")
            heatmap = page.locator("#heatmap")
            assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
            page.wait_for_function("document.getElementById('heatmap').complete")
            assert heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [112, 112]
            assert page.locator("#original").evaluate("img => img.naturalWidth") == 256
            assert page.locator("#history-list li").count() == 1
            assert image.name in page.text_content("#history-list")
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()
    assert not foreign, f"the page fetched outside assets: {foreign}"
