"""The screenshots of docs/line.md: the service's web page after scoring, its inspections labelled, its drift panel.

    python docs/screenshots.py MODEL.padim IMAGES... [--out docs/images] [--false-alarm NAME] [--defect NAME]
    python docs/screenshots.py --url http://127.0.0.1:8000/ IMAGES... [--false-alarm NAME] [--defect NAME]

Starts ``fastpadim serve MODEL --record <temp DB>`` on a free loopback port (every image kept, so each row has a
thumbnail), or uses the service already running at ``--url`` (its own records keep the labels), uploads IMAGES
through the page in headless Chromium (one batch request per 64), labels two inspections on the page (the newest
row of image NAME, or else a flagged one "false alarm", another flagged one, or the next row, "confirmed defect")
and writes:

    serve-scored.png       the page after scoring: a card per image with its overlay, the first one in detail
    serve-inspections.png  the recent inspections table with the two labels
    serve-drift.png        the drift panel (it tests once 50 images are in; fewer show "not enough images yet")

The records and kept images live in a temporary folder, deleted at the end. Needs Playwright for Python and a
Chromium (/usr/bin/chromium, else Playwright's own).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
START_TIMEOUT_S = 180  # loading a model with real weights on a busy machine
SCORE_TIMEOUT_S = 600
VIEWPORT = {"width": 1280, "height": 900}


class Failed(Exception):
    """One line for the user; the script exits with 1."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model: Path, port: int, folder: Path) -> subprocess.Popen:
    """``fastpadim serve`` on loopback, recording into ``folder``; returns once /health answers."""
    command = [sys.executable, "-m", "fastpadim", "serve", str(model), "--port", str(port),
               "--record", str(folder / "records.db"), "--keep", str(folder / "kept"), "--keep-passed", "1"]
    env = {k: v for k, v in os.environ.items() if k != "FASTPADIM_API_KEY"}  # the page is shown without a key field
    with open(folder / "serve.log", "wb") as log:  # the child holds its own copy of the file
        service = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.poll() is not None:
            lines = (folder / "serve.log").read_text(errors="replace").strip().splitlines()
            raise Failed(f"fastpadim serve stopped: {lines[-1] if lines else f'exit code {service.returncode}'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return service
        except OSError:
            time.sleep(0.5)
    stop(service)
    raise Failed(f"fastpadim serve did not answer within {START_TIMEOUT_S} s (see its log: {folder / 'serve.log'})")


def stop(service: subprocess.Popen) -> None:
    service.terminate()
    try:
        service.wait(timeout=20)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait()


def label_two(page, names: tuple[str | None, str | None] = (None, None)) -> None:
    """'False alarm' and 'Confirmed defect' on the newest rows of the images ``names``, or else on the newest
    flagged row and the next flagged one (or the next row)."""
    rows = page.locator("#inspections-rows tr")
    verdicts = rows.locator("td.verdict").all_text_contents()
    shown = rows.locator("td.name").all_text_contents()
    ids = rows.evaluate_all("rows => rows.map(r => r.dataset.id)")
    if len(ids) < 2:
        raise Failed(f"{len(ids)} inspection recorded; two are needed to show the labels")
    order = [i for i, v in zip(ids, verdicts) if v == "anomalous"] + [i for i, v in zip(ids, verdicts) if v != "anomalous"]
    for k, name in enumerate(names):
        if name is not None:
            if name not in shown:
                raise Failed(f"{name} is not among the inspections the page lists")
            order.insert(k, ids[shown.index(name)])
    for row_id, label in zip(order, ("false_alarm", "confirmed_defect")):
        page.click(f"tr[data-id='{row_id}'] button[data-label='{label}']")
        page.wait_for_selector(f"tr[data-id='{row_id}'] .label-{label}")


def screenshots(url: str, images: list[Path], out: Path, names=(None, None)) -> list[Path]:
    """The three PNGs, written into ``out``; a step of the page that fails is one line (Failed)."""
    from playwright.sync_api import Error as PageError
    from playwright.sync_api import sync_playwright

    written = [out / "serve-scored.png", out / "serve-inspections.png", out / "serve-drift.png"]
    try:
        with sync_playwright() as pw:
            shoot(pw, url, images, written, names)
    except PageError as exc:
        raise Failed(f"the page did not get there: {str(exc).splitlines()[0]}") from None
    return written


def shoot(pw, url: str, images: list[Path], written: list[Path], names=(None, None)) -> None:
    launch = {"executable_path": str(CHROMIUM)} if CHROMIUM.exists() else {}
    browser = pw.chromium.launch(args=CHROMIUM_ARGS, headless=True, **launch)
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.includes('training images')")
        page.set_input_files("#file", [str(p) for p in images])
        page.wait_for_selector(f"body[data-scored='{len(images)}']", timeout=SCORE_TIMEOUT_S * 1000)
        page.wait_for_function("[...document.querySelectorAll('#results-list img, #heatmap')].every(i => i.complete)")
        errors = page.locator("#results-list .card[data-verdict='error']").all_text_contents()
        if errors:
            raise Failed(f"{len(errors)} of {len(images)} images got no verdict, e.g. {errors[0]}")
        # after scoring: header, the cards and the first image in detail (the inspections below are the next shot)
        bottom = page.locator("#result").evaluate("e => e.getBoundingClientRect().bottom + window.scrollY")
        page.screenshot(path=str(written[0]), full_page=True,
                        clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom + 16})

        # the page lists the last 20 (a running service may hold more than these images)
        page.wait_for_function(f"Number(document.body.dataset.inspections || 0) >= {min(len(images), 20)}")
        page.wait_for_function("[...document.querySelectorAll('#inspections-rows img')].every(i => i.complete)")
        label_two(page, names)
        page.mouse.move(0, 0)  # no button drawn hovered
        page.locator("#inspections").screenshot(path=str(written[1]))

        page.wait_for_selector("body[data-drift]")
        page.locator("#drift").screenshot(path=str(written[2]))
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", help="model file (.padim or .onnx); not with --url")
    parser.add_argument("images", type=Path, nargs="+", help="images to upload through the page")
    parser.add_argument("--url", help="a running service's page (its records keep the labels) instead of MODEL")
    parser.add_argument("--false-alarm", metavar="NAME", help="label the newest inspection of this image 'false alarm'")
    parser.add_argument("--defect", metavar="NAME", help="label the newest inspection of this image 'confirmed defect'")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="folder for the PNGs (default docs/images)")
    args = parser.parse_args(argv)
    names = (args.false_alarm, args.defect)
    if args.url and args.model is not None:  # argparse gives the first image to the optional MODEL
        args.images, args.model = [args.model, *args.images], None
    try:
        for path in [args.model, *args.images] if args.model else args.images:
            if not path.is_file():
                raise Failed(f"no such file: {path}")
        with tempfile.TemporaryDirectory(prefix="fastpadim-screenshots-") as folder:
            if args.url:
                shots = screenshots(args.url, args.images, Path(folder), names)
            else:
                port = free_port()
                service = start_service(args.model, port, Path(folder))
                try:
                    shots = screenshots(f"http://127.0.0.1:{port}/", args.images, Path(folder), names)
                finally:
                    stop(service)
            args.out.mkdir(parents=True, exist_ok=True)
            written = [Path(shutil.move(shot, args.out / shot.name)) for shot in shots]  # all three, or none
    except Failed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
