"""The web page in a real headless Chromium, served by a live uvicorn on loopback."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import bottle_root  # noqa: E402
from live_server import serving_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
BOTTLE = bottle_root() or Path("absent-bottle-data")  # conftest: beside the checkout, $FASTPADIM_BOTTLE, /work/shared
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed at /usr/bin/chromium (apt-get install chromium)"),
    pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {BOTTLE}"),
]


@contextmanager
def serving(model, **options):
    """``model`` served on a free loopback port, in a thread (``options``: http_api.create_app's, e.g. models=
    {name: (model, path)} with ``model`` None); yields its base URL."""
    from fastpadim.http_api import create_app

    with serving_app(create_app(model, **options)) as url:
        yield url


@pytest.fixture(scope="module")
def live_server():
    """A 128 px model with a 112 px centre crop, served."""
    from fastpadim.model import Padim
    from fastpadim.evaluation.synthetic import surface

    rng = np.random.default_rng(0)
    model = Padim(weights="random", image_size=128, crop_size=112, holdout=0.2, device="cpu", workers=1)
    model.fit([surface(rng, 128) for _ in range(6)])
    with serving(model) as url:
        yield url


@contextmanager
def browser_page(base_url: str, foreign: list[str], api_key: str | None = None):
    """A Chromium page on ``base_url``'s page, the model line loaded (after typing ``api_key`` into the field the
    page shows when the API answers 401); requests elsewhere are noted in ``foreign``."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.on("request", lambda r: None if r.url.startswith((base_url, "data:", "blob:")) else foreign.append(r.url))
            page.goto(base_url + "/")
            if api_key is not None:
                page.wait_for_selector("#apikey-form:not([hidden])")
                # the key form shows at the first 401; the model line says so once its own request is answered
                page.wait_for_function("document.getElementById('model').textContent.includes('model information unavailable')")
                page.fill("#apikey", api_key)
                page.click("#apikey-form button")
            page.wait_for_function("document.getElementById('model').textContent.includes('training images')")
            yield page
        finally:
            browser.close()


def test_page_scores_an_uploaded_bottle_and_shows_the_heatmap(live_server, tmp_path):
    image = sorted((BOTTLE / "test/broken_large").glob("*.png"))[0]
    foreign: list[str] = []
    with browser_page(live_server, foreign) as page:
        assert "input 128x128 → 112x112 map" in page.text_content("#model")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("body[data-scored='1']", timeout=60_000)

        assert page.is_visible("#result") and not page.is_visible("#error")
        score = float(page.text_content("#score"))
        assert np.isfinite(score) and score > 0
        verdict = page.text_content("#verdict")
        assert verdict in ("anomalous", "good")
        heatmap = page.locator("#heatmap")
        assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
        page.wait_for_function("document.getElementById('heatmap').complete")
        # the overlay is in the uploaded image's pixels (256x256), not the network's 112x112 crop
        assert heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [256, 256]
        assert page.locator("#original").evaluate("img => img.naturalWidth") == 256
        boxes = page.locator("#boxes .box").count()
        assert (boxes > 0) == (verdict == "anomalous")
        assert page.text_content("#regions").endswith(("region", "regions"))
        assert page.locator("#history-list li").count() == 1
        assert image.name in page.text_content("#history-list")
        page.screenshot(path=str(tmp_path / "page.png"))
    assert not foreign, f"the page fetched outside assets: {foreign}"


def test_page_keeps_a_wide_frame_wide(tmp_path):
    """A 96x192 (height x width) frame on a 48x96 model: the overlay comes back 192x96 and is shown 2:1, not square."""
    from PIL import Image

    from fastpadim.model import Padim
    from fastpadim.evaluation.synthetic import surface

    rng = np.random.default_rng(1)
    model = Padim(weights="random", image_size=(48, 96), crop_size=None, holdout=0.2, device="cpu", workers=1)
    model.fit([surface(rng, 96)[:48] for _ in range(6)])
    frame = tmp_path / "wide.png"
    Image.fromarray(surface(rng, 192)[:96]).save(frame)
    foreign: list[str] = []
    with serving(model) as url, browser_page(url, foreign) as page:
        assert "input 48x96 → 48x96 map" in page.text_content("#model")
        page.set_input_files("#file", str(frame))
        page.wait_for_selector("body[data-scored='1']", timeout=60_000)
        assert not page.is_visible("#error"), page.text_content("#error")
        page.wait_for_function("document.getElementById('heatmap').complete")
        heatmap = page.locator("#heatmap")
        assert heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [192, 96]
        shown = heatmap.evaluate("img => img.getBoundingClientRect().width / img.getBoundingClientRect().height")
        assert shown == pytest.approx(2.0, rel=0.03)  # the frame's aspect on screen (borders aside)
    assert not foreign, f"the page fetched outside assets: {foreign}"


def test_page_shows_the_normalized_score_and_false_alarm_probability(live_server):
    """Beside the raw score: "1.23× threshold" and "p(good ≥ this) 0.4 %"; the model line says how the threshold
    was set (calibration method and good images)."""
    import re

    image = sorted((BOTTLE / "test/broken_large").glob("*.png"))[0]
    foreign: list[str] = []
    with browser_page(live_server, foreign) as page:
        assert re.search(r"threshold \d+\.\d{3} \((out-of-fold|hold-out|good images), \d+ good images",
                         page.text_content("#model")), page.text_content("#model")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("body[data-scored='1']", timeout=60_000)
        assert not page.is_visible("#error"), page.text_content("#error")
        score = float(page.text_content("#score"))
        threshold = float(page.text_content("#threshold").removeprefix("threshold "))
        normalized = page.text_content("#normalized")
        assert re.fullmatch(r"\d+\.\d\d× threshold", normalized), normalized
        assert float(normalized.split("×")[0]) == pytest.approx(score / threshold, abs=0.01)
        assert (float(normalized.split("×")[0]) > 1) == (page.text_content("#verdict") == "anomalous")
        probability = page.text_content("#probability")
        match = re.fullmatch(r"p\(good ≥ this\) (?:([\d.]+) %|1 in [\d,]+)", probability)
        assert match, probability
        assert match.group(1) is None or 0 < float(match.group(1)) <= 100
    assert not foreign, f"the page fetched outside assets: {foreign}"


def test_page_says_in_one_line_that_the_service_keeps_no_records(live_server):
    foreign: list[str] = []
    with browser_page(live_server, foreign) as page:
        page.wait_for_function("!document.getElementById('inspections-note').textContent.includes('loading')")
        assert page.text_content("#inspections-note") == "this service keeps no records; start it with --record DB"
        assert not page.is_visible("#inspections-table")
        assert not page.is_visible("#picker")  # one model: nothing to choose
        assert not page.is_visible("#apikey-form")  # no key asked for
    assert not foreign, f"the page fetched outside assets: {foreign}"


def test_page_scores_several_images_and_operators_label_the_recorded_verdicts(tmp_path):
    """Two models behind an API key, recording into SQLite: the key typed in, the second model picked, three images
    in one upload (one batch request), three recorded rows with thumbnails; two labelled from the table, and the
    records hold the labels."""
    from conftest import SMALL, make_surfaces, with_spot
    from PIL import Image

    from fastpadim.kept_images import KeptImages
    from fastpadim.model import Padim
    from fastpadim.records import Records
    from fastpadim.serve import Recorder

    model = Padim(**{**SMALL, "holdout": 0.25}).fit(make_surfaces(8, seed=3))
    other = Padim(**{**SMALL, "holdout": 0.25}).fit(make_surfaces(8, seed=4))
    files = []
    for i, array in enumerate(make_surfaces(3, seed=5)):
        files.append(tmp_path / f"part-{i}.png")
        Image.fromarray(with_spot(array) if i == 0 else array).save(files[-1])
    db = tmp_path / "records.db"
    recorder = Recorder(Records(db), "test-station", KeptImages(tmp_path / "kept", keep_passed=1.0))
    foreign: list[str] = []
    with serving(None, models={"line": (model, None), "cap": (other, None)}, recorder=recorder, api_key="s3cret") as url, \
            browser_page(url, foreign, api_key="s3cret") as page:
        assert page.is_visible("#picker")
        assert page.locator("#models option").all_text_contents() == ["line v1", "cap v1"]
        page.select_option("#models", "cap")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('cap v1 · ')")

        page.set_input_files("#file", [str(f) for f in files])
        page.wait_for_selector("body[data-scored='3']", timeout=60_000)
        cards = page.locator("#results-list .card")
        assert cards.count() == 3
        assert page.text_content("#results-title") == "Last upload: 3 images"
        for i, f in enumerate(files):
            card = cards.nth(i)
            assert card.locator(".name").text_content() == f.name
            assert card.get_attribute("data-verdict") in ("anomalous", "good"), card.text_content()
            assert card.locator("img").get_attribute("src").startswith("data:image/png;base64,")  # the overlay
            assert "cap v1" in card.text_content() and "× threshold" in card.text_content()
            assert "p(good ≥ this)" in card.text_content()
        assert page.text_content("#served-by") == "cap v1"  # the detail shows the first image
        assert page.text_content("#name") == files[0].name

        page.wait_for_selector("body[data-inspections='3']")
        rows = page.locator("#inspections-rows tr")
        assert rows.count() == 3
        assert rows.locator("td.name").all_text_contents() == [f.name for f in reversed(files)]  # newest first
        assert all("cap v1" in text for text in rows.all_text_contents())
        page.wait_for_function("[...document.querySelectorAll('#inspections-rows img')]"
                               ".filter(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth === 64).length === 3")
        ids = [int(i) for i in rows.evaluate_all("rows => rows.map(r => r.dataset.id)")]
        alarm, defect, untouched = ids
        page.click(f"tr[data-id='{alarm}'] button[data-label='false_alarm']")
        page.click(f"tr[data-id='{defect}'] button[data-label='confirmed_defect']")
        page.wait_for_selector(f"tr[data-id='{alarm}'] .label-false_alarm")
        page.wait_for_selector(f"tr[data-id='{defect}'] .label-confirmed_defect")
        assert page.text_content(f"tr[data-id='{alarm}'] .label-text") == "false alarm"
        assert page.text_content(f"tr[data-id='{defect}'] .label-text") == "confirmed defect"
        assert page.text_content(f"tr[data-id='{untouched}'] .label-text") == ""
        # the label's own button goes; the others stay, "clear" among them
        assert page.locator(f"tr[data-id='{alarm}'] button").all_text_contents() == ["Confirmed defect", "clear"]

        page.wait_for_function("document.body.dataset.drift === 'waiting'")
        assert page.text_content("#drift-note") == "not enough images yet (3 of 50)"
        assert not page.is_visible("#drift-alarm")
        assert "of 3 images" in page.text_content("#drift-flagged")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        with Records(db) as records:
            assert records.get(alarm).label == "false_alarm"
            assert records.get(defect).label == "confirmed_defect"
            assert records.get(untouched).label is None
            assert {records.get(i).model for i in ids} == {"cap"}

        page.click(f"tr[data-id='{alarm}'] button[data-label='']")  # clear
        page.wait_for_function(f"document.querySelector(\"tr[data-id='{alarm}'] .label-text\").textContent === ''")
        with Records(db) as records:
            assert records.get(alarm).label is None
    assert not foreign, f"the page fetched outside assets: {foreign}"
