"""The inspection service in-process: every endpoint, every bad input, batching and responsiveness."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager

import httpx
import numpy as np
import psutil
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from fastpadim import http_api as api_module  # where uploads are decoded
from fastpadim.batcher import MicroBatcher, PixelBudget
from fastpadim.model import Padim
from fastpadim.results import ScoredImage
from fastpadim.http_api import create_app
from fastpadim.serve import check_port, decode_upload, release_memory
from fastpadim.evaluation.synthetic import add_spot, surface

SIZE = 64


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [surface(rng, SIZE) for _ in range(8)]


def small_model(images, holdout: float, folds: int | str = "all") -> Padim:
    return Padim(weights="random", image_size=SIZE, crop_size=None, holdout=holdout, folds=folds, device="cpu",
                 workers=1).fit(images)


@pytest.fixture(scope="module")
def model(images) -> Padim:
    return small_model(images, holdout=0.25)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_upload_mb=0.5)) as c:
        yield c


@pytest.fixture(scope="module")
def good_png() -> bytes:
    return png_bytes(surface(np.random.default_rng(7), SIZE))


@pytest.fixture(scope="module")
def defect_png() -> bytes:
    rng = np.random.default_rng(8)
    return png_bytes(add_spot(rng, surface(rng, SIZE))[0])


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def constant_png(width: int, height: int, colour=(10, 200, 30)) -> bytes:
    """A complete, valid RGB PNG of one colour, compressed row by row (the test never holds width x height x 3
    bytes): 9000x9000 is about 250 KB, and decoding it would cost 243 MB and more."""
    row = b"\0" + bytes(colour) * width
    compressor = zlib.compressobj(6)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))


def dds_garbage() -> bytes:
    """A DDS header with a pixel format Pillow does not know, then garbage: Pillow raises NotImplementedError."""
    header = struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + bytes(44) + struct.pack("<4I", 32, 0x40000000, 0, 0)
    return b"DDS " + header + bytes(128 - 4 - len(header)) + b"\xde\xad\xbe\xef" * 64


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    return constant_png(9000, 9000)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def expected_score(model: Padim, data: bytes) -> float:
    return float(model.score_images([Image.open(io.BytesIO(data))])[0][0])


# ------------------------------------------------------------------------------------- endpoints
def test_health(client):
    reply = client.get("/health")
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok"


def test_model_info_comes_from_the_model(client, model):
    info = client.get("/v1/model").json()
    assert info["backbone"] == model.preset_.name
    assert info["input"] == {"image_size": SIZE, "crop_size": None, "map_size": SIZE}
    assert info["n_train_images"] == model.n_samples_seen_ == 6
    assert info["threshold"] == pytest.approx(model.threshold_)
    assert info["format_version"] >= 1
    assert info["weights_id"] == "random"


def test_openapi_describes_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/score/batch", "/health", "/v1/model"} <= set(paths)
    body = paths["/v1/score"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/*" in body


def test_page_is_served_without_external_assets(client):
    reply = client.get("/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    page = reply.text
    assert "v1/score" in page and 'type="file"' in page
    for marker in ('src="http', "src='http", 'href="http', "@import", "url(http", "//cdn"):
        assert marker not in page


def test_score_multipart_matches_the_model(client, model, good_png, defect_png):
    for data in (good_png, defect_png):
        reply = client.post("/v1/score", files={"file": ("part.png", data, "image/png")})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["score"] == pytest.approx(expected_score(model, data), rel=1e-4)
        assert body["threshold"] == pytest.approx(model.threshold_)
        assert body["is_anomalous"] == (body["score"] > model.threshold_)
        assert body["verdict"] == ("anomalous" if body["is_anomalous"] else "good")
        assert body["name"] == "part.png"
        assert set(body["timings_ms"]) >= {"decode", "queue", "model", "total"}
        assert body["timings_ms"]["total"] >= body["timings_ms"]["model"] > 0
        assert "heatmap_png_base64" not in body or body["heatmap_png_base64"] is None


def test_larger_upload_is_resized_at_decode_with_the_same_score(client, model):
    rng = np.random.default_rng(11)
    array = np.asarray(Image.fromarray(surface(rng, SIZE)).resize((150, 150), Image.Resampling.BICUBIC))
    data = png_bytes(array)
    upload = decode_upload(data, "l.png", model.preprocessing_)
    assert upload.image.size == (SIZE, SIZE) and upload.frame is None  # no full-size image is held
    body = client.post("/v1/score", files={"file": ("l.png", data, "image/png")}).json()
    assert body["score"] == pytest.approx(float(model.score_images([array])[0][0]), rel=1e-6)


def test_an_upload_the_model_would_squash_is_refused(client):
    wide = np.asarray(Image.fromarray(surface(np.random.default_rng(12), SIZE)).resize((200, 150)))
    reply = client.post("/v1/score", files={"file": ("w.png", png_bytes(wide), "image/png")})
    assert reply.status_code == 422
    assert reply.json()["detail"].startswith("w.png: 200x150 (width x height) would be squashed")


def test_heatmap_and_regions_are_in_the_uploaded_image_pixels(client, model):
    """A 160x160 upload to a 64 model: the overlay is 160x160, and the regions' boxes lie in it."""
    rng = np.random.default_rng(13)
    frame = np.asarray(Image.fromarray(add_spot(rng, surface(rng, SIZE))[0]).resize((160, 160)))
    body = client.post("/v1/score?heatmap=true&regions=true", files={"file": ("f.png", png_bytes(frame), "image/png")}).json()
    assert decode_png(body["heatmap_png_base64"]).size == (160, 160)
    assert body["is_anomalous"] == bool(body["regions"]) and body["regions_left_out"] == 0
    peaks = [r["peak"] for r in body["regions"]]
    assert peaks == sorted(peaks, reverse=True) and all(p > model.threshold_ for p in peaks)
    for r in body["regions"]:
        assert 0 <= r["x"] < r["x"] + r["width"] <= 160 and 0 <= r["y"] < r["y"] + r["height"] <= 160
        assert 0 < r["area"] <= r["width"] * r["height"]
    assert peaks[0] == pytest.approx(body["score"], rel=0.05)  # the strongest region holds (nearly) the image score
    assert set(body["timings_ms"]) >= {"heatmap", "regions"}
    plain = client.post("/v1/score", files={"file": ("f.png", png_bytes(frame), "image/png")}).json()
    assert "regions" not in plain and "regions" not in plain["timings_ms"]
    assert plain["score"] == pytest.approx(body["score"], rel=1e-6)


def decode_png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG" and image.mode == "RGB"
    return image


def test_score_raw_body_gives_the_same_score(client, good_png):
    multipart = client.post("/v1/score", files={"file": ("a.png", good_png, "image/png")}).json()
    for content_type in ("image/png", "application/octet-stream"):
        raw = client.post("/v1/score", content=good_png, headers={"content-type": content_type})
        assert raw.status_code == 200, raw.text
        assert raw.json()["score"] == pytest.approx(multipart["score"])


def test_score_heatmap_is_a_png_overlay(client, defect_png):
    body = client.post("/v1/score?heatmap=true", files={"file": ("d.png", defect_png, "image/png")}).json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"
    assert "heatmap" in body["timings_ms"]


def test_score_without_threshold_says_unknown(images, good_png):
    with TestClient(create_app(small_model(images, holdout=0.0, folds=0))) as c:
        body = c.post("/v1/score", files={"file": ("a.png", good_png, "image/png")}).json()
        assert body["verdict"] == "unknown" and body["is_anomalous"] is None and body["threshold"] is None
        for path in ("/v1/score?regions=true", "/v1/score/batch?regions=true"):  # regions need a threshold
            reply = c.post(path, files={"file": ("a.png", good_png, "image/png")})
            assert reply.status_code == 400 and reply.json()["detail"].startswith("regions need a threshold")


def test_batch_scores_all_images_in_one_batch(client, model, good_png, defect_png):
    files = [("file", ("g.png", good_png, "image/png")), ("file", ("d.png", defect_png, "image/png")),
             ("file", ("g2.png", good_png, "image/png"))]
    reply = client.post("/v1/score/batch?heatmap=true", files=files)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["scored"] == 3 and body["failed"] == 0 and body["batch_size"] >= 3
    names = [r["name"] for r in body["results"]]
    assert names == ["g.png", "d.png", "g2.png"]
    scores = [r["score"] for r in body["results"]]
    assert scores[0] == pytest.approx(expected_score(model, good_png), rel=1e-4)
    assert scores[1] == pytest.approx(expected_score(model, defect_png), rel=1e-4)
    assert scores[0] == pytest.approx(scores[2])
    assert all(r["heatmap_png_base64"] for r in body["results"])


def test_batch_gives_each_image_its_regions(client, good_png, defect_png):
    files = [("file", ("g.png", good_png, "image/png")), ("file", ("x.png", b"junk", "image/png")),
             ("file", ("d.png", defect_png, "image/png"))]
    body = client.post("/v1/score/batch?regions=true", files=files).json()
    good, bad, defect = body["results"]
    for entry in (good, defect):
        assert entry["is_anomalous"] == bool(entry["regions"]) and entry["regions_left_out"] == 0
    assert bad.get("regions") is None and "regions" in body["timings_ms"] and "heatmap" not in body["timings_ms"]


def test_batch_reports_a_bad_image_and_scores_the_rest(client, good_png):
    files = [("file", ("g.png", good_png, "image/png")), ("file", ("bad.png", b"not an image", "image/png"))]
    body = client.post("/v1/score/batch", files=files).json()
    assert body["scored"] == 1 and body["failed"] == 1
    good, bad = body["results"]
    assert good["score"] is not None and good.get("error") is None
    assert bad.get("score") is None and "bad.png" in bad["error"] and "not an image" in bad["error"]


def test_batch_of_only_bad_images_is_422(client):
    reply = client.post("/v1/score/batch", files=[("file", ("x.png", b"garbage", "image/png"))])
    assert reply.status_code == 422 and "no image could be read" in reply.json()["detail"]


# ------------------------------------------------------------------------------------ bad inputs
def truncated_png(good_png: bytes) -> bytes:
    return good_png[: len(good_png) // 2]


@pytest.mark.parametrize(
    "case, status, phrase",
    [
        ("non-image", 422, "not an image"),
        ("truncated", 422, "truncated"),
        ("tiny", 422, "at least"),
        ("empty body", 400, "empty body"),
        ("empty file", 422, "empty file"),
        ("too many pixels", 413, "huge.png: 9000x9000 = 81.0 MP is above the limit of 40 MP"),
        ("too large raw", 413, "limit"),
        ("too large part", 413, "limit"),
        ("wrong content type", 415, "text/plain"),
        ("wrong part type", 415, "not an image"),
        ("no file field", 400, "no 'file' field"),
        ("text field", 400, "file upload"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_service_keeps_serving(client, good_png, huge_png, case, status, phrase):
    big = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)  # ~1 MB PNG, limit 0.5 MiB
    requests = {
        "non-image": dict(files={"file": ("a.png", b"hello, this is text", "image/png")}),
        "truncated": dict(files={"file": ("t.png", truncated_png(good_png), "image/png")}),
        "tiny": dict(files={"file": ("s.png", png_bytes(np.zeros((8, 8, 3), np.uint8)), "image/png")}),
        "empty body": dict(content=b"", headers={"content-type": "image/png"}),
        "empty file": dict(files={"file": ("e.png", b"", "image/png")}),
        "too many pixels": dict(files={"file": ("huge.png", huge_png, "image/png")}),
        "too large raw": dict(content=png_bytes(big), headers={"content-type": "image/png"}),
        "too large part": dict(files={"file": ("big.png", png_bytes(big), "image/png")}),
        "wrong content type": dict(content=good_png, headers={"content-type": "text/plain"}),
        "wrong part type": dict(files={"file": ("a.txt", good_png, "text/plain")}),
        "no file field": dict(files={"image": ("a.png", good_png, "image/png")}),
        "text field": dict(data={"file": "a.png"}, files={"other": ("a.png", good_png, "image/png")}),
    }
    reply = client.post("/v1/score", **requests[case])
    assert reply.status_code == status, reply.text
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and phrase in detail and "\n" not in detail
    after = client.post("/v1/score", files={"file": ("a.png", good_png, "image/png")})
    assert after.status_code == 200


def test_decode_upload_reads_jpeg_and_grayscale():
    rng = np.random.default_rng(3)
    gray = surface(rng, SIZE)[..., 0]
    assert decode_upload(png_bytes(gray), "g").image.mode == "RGB"
    assert decode_upload(png_bytes(surface(rng, SIZE), "JPEG"), "j").image.size == (SIZE, SIZE)


def test_decode_upload_keeps_the_frame_only_when_the_reply_needs_it(model):
    """A large JPEG: decoded at reduced scale for a score alone; in full (exact size) for regions; kept for an overlay."""
    big = np.asarray(Image.fromarray(surface(np.random.default_rng(4), SIZE)).resize((512, 512)))
    data = png_bytes(big, "JPEG")
    alone = decode_upload(data, "j", model.preprocessing_)
    assert alone.image.size == (SIZE, SIZE) and alone.frame_size is None and alone.frame is None
    sized = decode_upload(data, "j", model.preprocessing_, None, True)
    assert sized.image.size == (SIZE, SIZE) and sized.frame_size == (512, 512) and sized.frame is None
    kept = decode_upload(data, "j", model.preprocessing_, None, False, True)
    assert kept.frame_size == (512, 512) and kept.frame.size == (512, 512)


# ------------------------------------------------------------------------------------ concurrency
class SlowModel:
    """Wraps ``iter_scored`` to take at least ``delay`` seconds and to record concurrent calls and batch sizes."""

    def __init__(self, model: Padim, delay: float):
        self.model, self.delay = model, delay
        self.active = self.most_active = 0
        self.batch_sizes: list[int] = []
        self.lock = threading.Lock()
        self.original = model.iter_scored

    def __call__(self, images, **kwargs):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.batch_sizes.append(len(images))
        try:
            time.sleep(self.delay)
            yield from self.original(images, **kwargs)
        finally:
            with self.lock:
                self.active -= 1


def test_concurrent_requests_share_batches_and_health_stays_responsive(images, good_png, monkeypatch):
    model = small_model(images, holdout=0.25)
    slow = SlowModel(model, delay=0.3)
    monkeypatch.setattr(model, "iter_scored", slow)
    app = create_app(model, max_batch=4, max_wait_ms=50)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                posts = [asyncio.create_task(http.post("/v1/score", files={"file": ("a.png", good_png, "image/png")}))
                         for _ in range(8)]
                await asyncio.sleep(0.1)  # the first batch is in the model now
                start = time.perf_counter()
                health = await http.get("/health")
                health_s = time.perf_counter() - start
                replies = await asyncio.gather(*posts)
        return replies, health, health_s

    replies, health, health_s = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert len({round(r.json()["score"], 5) for r in replies}) == 1
    assert health.status_code == 200 and health_s < 0.2  # answered while the model was busy (0.3 s per batch)
    assert slow.most_active == 1  # never two model runs at once
    assert sum(slow.batch_sizes) == 8 and max(slow.batch_sizes) == 4 and len(slow.batch_sizes) == 2
    assert max(r.json()["batch_size"] for r in replies) == 4


def test_batcher_never_splits_a_group_and_keeps_order():
    calls: list[list[int]] = []

    def run(items):
        calls.append(list(items))
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.02)
        await batcher.start()
        try:
            return await asyncio.gather(batcher.submit([1, 2, 3]), batcher.submit([4, 5]), batcher.submit([6]),
                                        batcher.submit([7, 8, 9, 10, 11]))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [r for r, _ in results] == [[10, 20, 30], [40, 50], [60], [70, 80, 90, 100, 110]]
    assert all(len(c) <= 4 or len(c) == 5 for c in calls)
    assert sorted(map(tuple, calls)) == sorted([(1, 2, 3), (4, 5, 6), (7, 8, 9, 10, 11)])


def test_batcher_survives_a_failing_batch():
    def run(items):
        if "boom" in items:
            raise RuntimeError("model failed")
        return items

    async def scenario():
        batcher = MicroBatcher(run, max_batch=1, max_wait_s=0)
        await batcher.start()
        try:
            with pytest.raises(RuntimeError, match="model failed"):
                await batcher.submit(["boom"])
            return await batcher.submit(["fine"])
        finally:
            await batcher.stop()

    assert asyncio.run(scenario())[0] == ["fine"]


def test_batcher_runs_on_idle_only_when_nothing_waits():
    calls: list = []

    def on_idle():
        calls.append("idle")
        raise RuntimeError("ignored")

    async def scenario():
        batcher = MicroBatcher(lambda items: calls.append(list(items)) or items, max_batch=1, max_wait_s=0,
                               on_idle=on_idle)
        await batcher.start()
        try:
            first = await asyncio.gather(*(batcher.submit([i]) for i in range(3)))
            await asyncio.sleep(0.05)
            second = await batcher.submit([3])
            await asyncio.sleep(0.05)
            return first, second
        finally:
            await batcher.stop()

    first, second = asyncio.run(scenario())
    assert [r for r, _ in first] == [[0], [1], [2]] and second[0] == [3]
    assert calls == [[0], [1], [2], "idle", [3], "idle"]


def test_model_failure_is_a_json_500_and_the_service_recovers(images, good_png, monkeypatch):
    model = small_model(images, holdout=0.25)
    original = model.iter_scored
    fail = {"once": True}

    def flaky(images, **kwargs):
        if fail.pop("once", False):
            raise RuntimeError("simulated failure")
        return original(images, **kwargs)

    monkeypatch.setattr(model, "iter_scored", flaky)
    with TestClient(create_app(model), raise_server_exceptions=False) as c:
        first = c.post("/v1/score", files={"file": ("a.png", good_png, "image/png")})
        second = c.post("/v1/score", files={"file": ("a.png", good_png, "image/png")})
    assert first.status_code == 500 and first.json()["detail"] == "internal error: RuntimeError: simulated failure"
    assert second.status_code == 200


# ------------------------------------------------------------------------------------------- CLI
def test_serve_refuses_a_missing_or_corrupt_model_in_one_line(tmp_path):
    from fastpadim.cli import app

    corrupt = tmp_path / "corrupt.padim"
    corrupt.write_bytes(b"\x00" * 100)
    for path, phrase in ((tmp_path / "missing.padim", "no such model file"), (corrupt, "not a fastpadim model")):
        result = CliRunner().invoke(app, ["serve", str(path), "--port", str(free_port())])
        assert result.exit_code == 1
        output = result.output.strip()
        assert phrase in output and len(output.splitlines()) == 1 and "Traceback" not in output


def test_serve_rejects_bad_options(model, tmp_path):
    from fastpadim.errors import FastpadimError

    for kwargs in ({"max_batch": 0}, {"max_wait_ms": -1}, {"max_upload_mb": 0}):
        with pytest.raises(FastpadimError):
            create_app(model, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def load_calls(monkeypatch):
    """Records model loads by the serve command (and makes them fail fast if one happens)."""
    import fastpadim

    calls = []

    def fake_load(path, **kwargs):
        calls.append(path)
        raise fastpadim.FastpadimError(f"{path}: loaded (the test expected no load)")

    monkeypatch.setattr(fastpadim, "load", fake_load)
    return calls


@pytest.mark.parametrize("option, value, phrase", [
    ("--max-batch", "0", "--max-batch must be at least 1"),
    ("--max-wait-ms", "-1", "--max-wait-ms must be >= 0"),
    ("--max-upload-mb", "0", "--max-upload-mb must be > 0"),
    ("--max-pixels", "100", "--max-pixels must lie between 1024"),
    ("--max-decoding-pixels", "0", "--max-decoding-pixels must be"),
    ("--port", "70000", "--port must be between 1 and 65535"),
])
def test_serve_checks_options_before_loading_the_model(tmp_path, load_calls, option, value, phrase):
    from fastpadim.cli import app

    args = ["serve", str(tmp_path / "m.padim"), option, value]
    if option != "--port":
        args += ["--port", str(free_port())]
    result = CliRunner().invoke(app, args)
    output = result.output.strip()
    assert result.exit_code == 1 and output.startswith("error: ") and phrase in output, output
    assert len(output.splitlines()) == 1 and load_calls == []


def test_serve_refuses_a_port_in_use_before_loading_the_model(tmp_path, load_calls):
    from fastpadim.cli import app

    with socket.socket() as other:  # another server on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(tmp_path / "m.padim"), "--port", str(port)])
    output = result.output.strip()
    assert result.exit_code == 1, output
    assert output.startswith(f"error: cannot listen on 127.0.0.1:{port}: address already in use; ")
    assert len(output.splitlines()) == 1 and "serving" not in output and load_calls == []
    check_port("127.0.0.1", port)  # free again: no error
    with pytest.raises(Exception, match="cannot listen on 203.0.113.7:"):
        check_port("203.0.113.7", port)  # not an address of this machine


# ------------------------------------------------------------------------------- memory and pixel limits
def test_huge_image_is_refused_from_its_header_quickly_and_cheaply(client, huge_png, good_png, monkeypatch):
    decoded = []
    original = api_module.decode_upload
    monkeypatch.setattr(api_module, "decode_upload",
                        lambda data, name, *a: decoded.append(name) or original(data, name, *a))
    before = rss_mb()
    start = time.perf_counter()
    reply = client.post("/v1/score", content=huge_png, headers={"content-type": "image/png"})
    took = time.perf_counter() - start
    grew = rss_mb() - before
    assert reply.status_code == 413, reply.text
    assert reply.json()["detail"] == ("<body>: 9000x9000 = 81.0 MP is above the limit of 40 MP; downscale the image or "
                                      "raise the pixel limit (--max-pixels)")
    assert took < 1.0 and grew < 200, (took, grew)  # decoding it took 5 s and 0.9 GB before the header check
    files = [("file", ("g.png", good_png, "image/png")), ("file", ("huge.png", huge_png, "image/png"))]
    body = client.post("/v1/score/batch", files=files).json()
    assert body["scored"] == 1 and body["failed"] == 1 and body["results"][0]["score"] is not None
    assert body["results"][1]["error"].startswith("huge.png: 9000x9000 = 81.0 MP is above the limit of 40 MP")
    assert decoded == ["g.png"]  # the huge image never reached the decoder
    assert rss_mb() - before < 200


def test_too_many_files_is_a_413_in_our_words(client, good_png):
    reply = client.post("/v1/score/batch", files=[("file", (f"{i}.png", good_png, "image/png")) for i in range(65)])
    assert reply.status_code == 413 and reply.json()["detail"] == "more than 64 files in one request; send at most 64"
    reply = client.post("/v1/score", files=[("file", (f"{i}.png", good_png, "image/png")) for i in range(2)])
    assert reply.status_code == 413
    assert reply.json()["detail"] == "more than one file sent to /v1/score; use /v1/score/batch for several"


def test_pixel_limit_is_an_option(model, good_png):
    with TestClient(create_app(model, max_pixels=SIZE * SIZE - 1)) as c:
        reply = c.post("/v1/score", files={"file": ("g.png", good_png, "image/png")})
    assert reply.status_code == 413
    assert "64x64 = 0.004096 MP is above the limit of 0.004095 MP" in reply.json()["detail"]
    for kwargs in ({"max_pixels": 10}, {"max_pixels": 10**12}, {"max_decoding_pixels": 0}):
        with pytest.raises(Exception, match="--max"):
            create_app(model, **kwargs)


@pytest.mark.skipif(not release_memory(), reason="no glibc malloc_trim here")
def test_memory_returns_to_idle_after_a_burst_of_large_images(client):
    large = constant_png(6000, 6000)  # 36 MP: allowed
    assert client.post("/v1/score", files={"file": ("w.png", large, "image/png")}).status_code == 200
    release_memory()
    idle = rss_mb()
    reply = client.post("/v1/score/batch", files=[("file", (f"{i}.png", large, "image/png")) for i in range(4)])
    assert reply.status_code == 200 and reply.json()["scored"] == 4
    budget = client.app.state.budget
    assert budget.in_use == 0 and 36_000_000 <= budget.most_in_use <= budget.capacity
    assert rss_mb() - idle < 100  # without handing freed memory back: +290 MB, for good


def test_pixel_budget_bounds_what_is_decoded_at_once():
    events = []

    async def scenario():
        budget = PixelBudget(100)
        budget.open()

        async def job(i, pixels):
            async with budget.reserve(pixels):
                events.append((i, budget.in_use))
                await asyncio.sleep(0.02)

        async def leaver():
            async with budget.reserve(50):
                pass

        first = asyncio.create_task(job(0, 60))
        await asyncio.sleep(0)
        gone = asyncio.create_task(leaver())  # waits behind job 0, then its client goes away
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, job(1, 60), job(2, 30), job(3, 500), return_exceptions=True)
        return budget

    budget = asyncio.run(scenario())
    assert [i for i, _ in events] == [0, 1, 2, 3]  # first come, first served (2 fits beside 1 but waits its turn)
    assert max(used for _, used in events) <= 100 == budget.most_in_use
    assert dict(events)[3] == 100  # above the capacity: clipped, runs alone
    assert budget.in_use == 0
    with pytest.raises(ValueError):
        PixelBudget(0)


@pytest.mark.parametrize("images_at_once", [1, 4])
def test_service_decodes_within_its_pixel_budget(model, good_png, monkeypatch, images_at_once):
    active, most = [0], [0]
    lock = threading.Lock()
    original = api_module.decode_upload

    def slow_decode(*args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return original(*args)

    monkeypatch.setattr(api_module, "decode_upload", slow_decode)
    with TestClient(create_app(model, max_decoding_pixels=images_at_once * SIZE * SIZE)) as c:
        reply = c.post("/v1/score/batch", files=[("file", (f"{i}.png", good_png, "image/png")) for i in range(4)])
        assert reply.status_code == 200 and reply.json()["scored"] == 4
        assert c.app.state.budget.most_in_use <= images_at_once * SIZE * SIZE
    assert most[0] == images_at_once


# ------------------------------------------------------------------------------- per-image failures
def test_decoder_exception_and_empty_file_fail_only_their_entries(client, model, good_png, defect_png):
    files = [("file", ("g.png", good_png, "image/png")), ("file", ("x.png", dds_garbage(), "image/png")),
             ("file", ("e.png", b"", "image/png")), ("file", ("d.png", defect_png, "image/png"))]
    reply = client.post("/v1/score/batch", files=files)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["scored"] == 2 and body["failed"] == 2
    good, dds, empty, defect = body["results"]
    assert good["score"] == pytest.approx(expected_score(model, good_png), rel=1e-4)
    assert defect["score"] == pytest.approx(expected_score(model, defect_png), rel=1e-4)
    assert dds.get("score") is None and dds["error"].startswith("x.png: cannot decode")
    assert "NotImplementedError" in dds["error"]
    assert empty.get("score") is None and empty["error"] == "e.png: empty file (0 bytes)"
    single = client.post("/v1/score", files={"file": ("x.png", dds_garbage(), "image/png")})
    assert single.status_code == 422 and "NotImplementedError" in single.json()["detail"]
    assert client.post("/v1/score", files={"file": ("g.png", good_png, "image/png")}).status_code == 200


@contextmanager
def real_server(app):
    """The app under uvicorn on a free port of 127.0.0.1, in a thread (TestClient has no real connections)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


def test_failures_keep_the_connection_usable(images, good_png, monkeypatch):
    """One keep-alive connection: a batch with a decoder failure, then a request whose model run fails (500), then
    good requests. Before, both failures were 500s after which uvicorn closed the connection under the client."""
    model = small_model(images, holdout=0.25)
    original = model.iter_scored
    fail = {}

    def flaky(images, **kwargs):
        if fail.pop("now", False):
            raise RuntimeError("simulated failure")
        return original(images, **kwargs)

    monkeypatch.setattr(model, "iter_scored", flaky)
    batch = httpx.Request("POST", "http://test/v1/score/batch", files=[
        ("file", ("g.png", good_png, "image/png")), ("file", ("x.png", dds_garbage(), "image/png"))])
    with real_server(create_app(model)) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def post(path, body, content_type):
            connection.request("POST", path, body=body, headers={"content-type": content_type})
            reply = connection.getresponse()
            return reply.status, json.loads(reply.read())

        status, body = post("/v1/score/batch", batch.read(), batch.headers["content-type"])
        assert status == 200 and body["scored"] == 1 and "NotImplementedError" in body["results"][1]["error"]
        first_socket = connection.sock
        fail["now"] = True
        status, body = post("/v1/score", good_png, "image/png")
        assert status == 500 and body["detail"] == "internal error: RuntimeError: simulated failure"
        status, body = post("/v1/score", good_png, "image/png")
        assert status == 200 and body["score"] > 0
        assert connection.sock is first_socket  # the same connection all along
        connection.close()


# ------------------------------------------------------------------------------------------ verdicts
def test_non_finite_score_never_becomes_a_verdict(images, good_png, defect_png):
    broken = small_model(images, holdout=0.25)
    broken.whitener_[0, 0, 0] = float("nan")
    assert torch.isnan(broken._whitener_compute).any()  # the factor the model scores with
    with TestClient(create_app(broken)) as c:
        one = c.post("/v1/score", files={"file": ("g.png", good_png, "image/png")})
        assert one.status_code == 422, one.text
        assert one.json()["detail"].startswith("g.png: the model produced a non-finite score")
        files = [("file", ("g.png", good_png, "image/png")), ("file", ("d.png", defect_png, "image/png"))]
        body = c.post("/v1/score/batch", files=files).json()
    assert body["scored"] == 0 and body["failed"] == 2
    for entry in body["results"]:
        assert entry.get("verdict") is None and entry.get("score") is None
        assert entry["error"].startswith(f"{entry['name']}: the model produced a non-finite score")


def test_non_finite_score_of_one_image_fails_only_its_entry(images, good_png, defect_png, monkeypatch):
    model = small_model(images, holdout=0.25)
    original = model.iter_scored

    def second_is_nan(images, **kwargs):
        for batch in original(images, **kwargs):
            yield [ScoredImage(r.index, r.name, float("nan"), r.anomaly_map, r.view) if r.index == 1 else r
                   for r in batch]

    monkeypatch.setattr(model, "iter_scored", second_is_nan)
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate((good_png, defect_png, good_png))]
    with TestClient(create_app(model)) as c:
        body = c.post("/v1/score/batch", files=files).json()
    first, nan, third = body["results"]
    assert body["scored"] == 2 and body["failed"] == 1
    assert first["verdict"] in ("good", "anomalous") and third["verdict"] in ("good", "anomalous")
    assert nan.get("verdict") is None and nan["error"].startswith("1.png: the model produced a non-finite score")


# ----------------------------------------------------------------------------------- rectangular frames
RECT = (48, 64)  # (height, width)


def frame_array(seed: int, size=(96, 128), spot: bool = False) -> np.ndarray:
    """A (height, width) textured frame: a crop of a larger generated surface, with a bright patch if asked."""
    rng = np.random.default_rng(seed)
    array = surface(rng, max(size))[: size[0], : size[1]].copy()
    if spot:
        array[size[0] // 3: size[0] // 2, size[1] // 3: size[1] // 2] = 255
    return array


@pytest.fixture(scope="module")
def rect_model() -> Padim:
    train = [frame_array(seed, RECT) for seed in range(8)]
    return Padim(weights="random", image_size=RECT, crop_size=None, holdout=0.25, device="cpu", workers=1).fit(train)


def test_a_rectangular_model_answers_in_the_frame_pixels(rect_model):
    """96x128 (height x width) uploads to a 48x64 model: overlays keep the frame's shape, boxes lie in it."""
    from fastpadim.serve import warm_up

    warm_up(rect_model)
    frames = [frame_array(20), frame_array(21, spot=True)]
    with TestClient(create_app(rect_model)) as c:
        info = c.get("/v1/model").json()
        assert info["input"] == {"image_size": [48, 64], "crop_size": None, "map_size": [48, 64]}
        one = c.post("/v1/score?heatmap=true&regions=true",
                     files={"file": ("s.png", png_bytes(frames[1]), "image/png")}).json()
        files = [("file", (f"{i}.png", png_bytes(f), "image/png")) for i, f in enumerate(frames)]
        many = c.post("/v1/score/batch?heatmap=true&regions=true", files=files).json()
    assert decode_png(one["heatmap_png_base64"]).size == (128, 96)  # PIL: (width, height)
    assert one["score"] == pytest.approx(float(rect_model.score_images([frames[1]])[0][0]), rel=1e-5)
    assert one["is_anomalous"] and one["regions"]
    patch = one["regions"][0]  # the patch, rows 32..47 and columns 42..63 of the frame, lies in the strongest box
    assert patch["x"] <= 42 and patch["x"] + patch["width"] >= 64 and patch["y"] <= 32 and patch["y"] + patch["height"] >= 48
    for entry in many["results"]:
        assert decode_png(entry["heatmap_png_base64"]).size == (128, 96)
        assert all(r["x"] + r["width"] <= 128 and r["y"] + r["height"] <= 96 for r in entry["regions"])


# ------------------------------------------------------------------------------ readable scores
def test_score_reply_has_the_normalized_score_and_false_alarm_probability(client, model, good_png, defect_png):
    good = client.post("/v1/score", files={"file": ("g.png", good_png, "image/png")}).json()
    defect = client.post("/v1/score", files={"file": ("d.png", defect_png, "image/png")}).json()
    keys = list(good)
    assert keys.index("score") + 1 == keys.index("normalized") and keys.index("normalized") + 1 == keys.index(
        "false_alarm_probability")
    for body in (good, defect):
        assert body["normalized"] == pytest.approx(body["score"] / body["threshold"], rel=1e-6)
        assert (body["normalized"] > 1) == body["is_anomalous"]
        assert 0 < body["false_alarm_probability"] <= 1
        assert body["false_alarm_probability"] == pytest.approx(model.calibration_.false_alarm_probability(body["score"]))
    assert defect["score"] > good["score"] and defect["false_alarm_probability"] <= good["false_alarm_probability"]


def test_batch_items_have_the_normalized_score_and_false_alarm_probability(client, good_png, defect_png):
    files = [("file", ("g.png", good_png, "image/png")), ("file", ("x.png", b"junk", "image/png")),
             ("file", ("d.png", defect_png, "image/png"))]
    body = client.post("/v1/score/batch", files=files).json()
    good, junk, defect = body["results"]
    for item in (good, defect):
        assert item["normalized"] == pytest.approx(item["score"] / body["threshold"], rel=1e-6)
        assert 0 < item["false_alarm_probability"] <= 1
    assert "normalized" not in junk and junk["error"]


def test_model_info_says_where_the_threshold_comes_from(client, model):
    calibration = client.get("/v1/model").json()["calibration"]
    assert calibration["method"] == model.calibration_.method
    assert calibration["n_good_images"] == model.calibration_.n > 0
    assert calibration["target"] == "fpr=0.01" and calibration["extrapolated"] in (True, False)


def test_without_calibration_the_readable_scores_are_null(images, good_png):
    plain = Padim(weights="random", image_size=SIZE, crop_size=None, holdout=0.0, folds=0, device="cpu",
                  workers=1).fit(images[:4])
    with TestClient(create_app(plain)) as c:
        body = c.post("/v1/score", files={"file": ("a.png", good_png, "image/png")}).json()
        assert body["normalized"] is None and body["false_alarm_probability"] is None and body["verdict"] == "unknown"
        assert c.get("/v1/model").json()["calibration"] is None


def test_score_heatmap_has_the_verdict_drawn_on_it(client, model, defect_png):
    from fastpadim.visualize import overlay

    body = client.post("/v1/score?heatmap=true", files={"file": ("d.png", defect_png, "image/png")}).json()
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"]))))
    (result,) = [r for batch in model.iter_scored([Image.open(io.BytesIO(defect_png))], keep_view=True) for r in batch]
    plain = np.asarray(overlay(result.view, result.frame_map, model.threshold_))
    assert drawn.shape == plain.shape
    band = int(np.argmin(np.any(np.abs(drawn.astype(int) - plain.astype(int)) > 2, axis=(1, 2))))
    assert 0 < band <= 0.4 * SIZE  # a dark band at the top, the heatmap as it was below it
    assert drawn[:band].mean() < 0.6 * plain[:band].mean() and (drawn[:band].max(axis=2) > 200).any()
