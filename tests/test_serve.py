"""The inspection service in-process: every endpoint, every bad input, batching and responsiveness."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from fastpadim.batcher import MicroBatcher
from fastpadim.model import Padim
from fastpadim.serve import create_app, decode_upload
from fastpadim.synthetic import add_spot, surface

SIZE = 64


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [surface(rng, SIZE) for _ in range(8)]


def small_model(images, holdout: float) -> Padim:
    return Padim(weights="random", image_size=SIZE, crop_size=None, holdout=holdout, device="cpu", workers=1).fit(images)


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


def expected_score(model: Padim, data: bytes) -> float:
    return float(model.score([Image.open(io.BytesIO(data))])[0][0])


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
    with TestClient(create_app(small_model(images, holdout=0.0))) as c:
        body = c.post("/v1/score", files={"file": ("a.png", good_png, "image/png")}).json()
    assert body["verdict"] == "unknown" and body["is_anomalous"] is None and body["threshold"] is None


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
        ("empty file", 400, "empty file"),
        ("too large raw", 413, "limit"),
        ("too large part", 413, "limit"),
        ("wrong content type", 415, "text/plain"),
        ("wrong part type", 415, "not an image"),
        ("no file field", 400, "no 'file' field"),
        ("text field", 400, "file upload"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_service_keeps_serving(client, good_png, case, status, phrase):
    big = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)  # ~1 MB PNG, limit 0.5 MiB
    requests = {
        "non-image": dict(files={"file": ("a.png", b"hello, this is text", "image/png")}),
        "truncated": dict(files={"file": ("t.png", truncated_png(good_png), "image/png")}),
        "tiny": dict(files={"file": ("s.png", png_bytes(np.zeros((8, 8, 3), np.uint8)), "image/png")}),
        "empty body": dict(content=b"", headers={"content-type": "image/png"}),
        "empty file": dict(files={"file": ("e.png", b"", "image/png")}),
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
    assert decode_upload(png_bytes(gray), "g").mode == "RGB"
    assert decode_upload(png_bytes(surface(rng, SIZE), "JPEG"), "j").size == (SIZE, SIZE)


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
    from fastpadim import commands  # noqa: F401 - registers serve
    from fastpadim.cli import app

    corrupt = tmp_path / "corrupt.padim"
    corrupt.write_bytes(b"\x00" * 100)
    for path, phrase in ((tmp_path / "missing.padim", "no such model file"), (corrupt, "not a fastpadim model")):
        result = CliRunner().invoke(app, ["serve", str(path), "--port", "1"])
        assert result.exit_code == 1
        output = result.output.strip()
        assert phrase in output and len(output.splitlines()) == 1 and "Traceback" not in output


def test_serve_rejects_bad_options(model, tmp_path):
    from fastpadim.errors import FastpadimError

    for kwargs in ({"max_batch": 0}, {"max_wait_ms": -1}, {"max_upload_mb": 0}):
        with pytest.raises(FastpadimError):
            create_app(model, **kwargs)
