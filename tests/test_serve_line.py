"""The service on the line: records and kept images, operator feedback, several models by name, reloading under
load, drift and metrics, and what a plant network needs (API key, CORS, offline docs)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import SMALL, make_surfaces, with_spot
from live_server import serving_app
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import fastpadim
from fastpadim.http_api import create_app
from fastpadim.kept_images import KeptImages
from fastpadim.lineage import versioned_path
from fastpadim.records import Records
from fastpadim.serve import Recorder

STATION = "line-3"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, train_arrays):
    """bottle.padim: a small model with a threshold, version 1."""
    path = tmp_path_factory.mktemp("models") / "bottle.padim"
    fastpadim.Padim(**{**SMALL, "holdout": 0.25}).fit(train_arrays).save(path)
    return path


@pytest.fixture(scope="module")
def model(model_file):
    return fastpadim.load(model_file, device="cpu")


@pytest.fixture(scope="module")
def good_png(test_arrays) -> bytes:
    return png(test_arrays[0])


@pytest.fixture(scope="module")
def defect_png(test_arrays) -> bytes:
    return png(with_spot(test_arrays[1]))


@pytest.fixture
def recorder(tmp_path):
    with Records(tmp_path / "line.db") as records:
        yield Recorder(records, STATION, KeptImages(tmp_path / "kept", keep_passed=1.0))


@pytest.fixture
def recorded(model, model_file, recorder):
    with TestClient(create_app(model, str(model_file), recorder=recorder)) as client:
        yield client, recorder


def post(client, data: bytes, name: str = "part.png", path: str = "/v1/score"):
    return client.post(path, files={"file": (name, data, "image/png")})


# -------------------------------------------------------------------------------------------- records
def test_every_verdict_is_recorded_with_what_gave_it(recorded, model, model_file, good_png, defect_png):
    client, recorder = recorded
    reply = post(client, defect_png, "d.png", "/v1/score?regions=true")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "bottle" and body["model_version"] == 1 and isinstance(body["inspection_id"], int)
    got = recorder.records.get(body["inspection_id"])
    assert (got.source, got.station, got.path, got.model, got.model_version) == ("serve", STATION, "d.png", "bottle", 1)
    assert got.digest == hashlib.sha256(defect_png).hexdigest() and got.model_file == os.path.abspath(model_file)
    assert got.score == pytest.approx(body["score"]) and got.normalized == pytest.approx(body["normalized"])
    assert got.false_alarm_probability == pytest.approx(body["false_alarm_probability"])
    assert got.threshold == pytest.approx(model.threshold_) and got.verdict == body["verdict"] == "anomalous"
    assert got.regions == body["regions"] and got.regions and got.timings_ms["total"] > 0
    kept = recorder.kept.contains(got.image_path)
    assert kept is not None and kept.read_bytes() == defect_png and kept.suffix == ".png"
    assert kept.parent.parent == recorder.kept.folder and kept.name == got.digest[:16] + ".png"

    junk = post(client, b"not an image", "junk.png")
    assert junk.status_code == 422
    (error,) = recorder.records.recent(limit=1)
    assert error.verdict == "error" and error.path == "junk.png" and error.score is None
    assert error.error == junk.json()["detail"] and error.image_path is None  # an error is never kept

    files = [("file", ("g.png", good_png, "image/png")), ("file", ("x.png", b"junk", "image/png"))]
    batch = client.post("/v1/score/batch", files=files).json()
    assert batch["model"] == "bottle" and batch["model_version"] == 1
    good, bad = batch["results"]
    assert recorder.records.get(good["inspection_id"]).verdict == good["verdict"] == "good"
    assert recorder.records.get(bad["inspection_id"]).verdict == "error"
    assert recorder.records.count() == 4


def test_recording_failure_keeps_the_reply(recorded, good_png, monkeypatch, caplog):
    client, recorder = recorded

    def broken(_batch):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(recorder.records, "add_many", broken)
    reply = post(client, good_png)
    assert reply.status_code == 200 and "inspection_id" not in reply.json() and reply.json()["score"] > 0
    assert any("RECORDING FAILED" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_inspections_are_listed_labelled_and_their_images_served(recorded, good_png, defect_png, tmp_path):
    client, recorder = recorded
    first = post(client, good_png, "g.png").json()["inspection_id"]
    second = post(client, defect_png, "d.png").json()["inspection_id"]
    listed = client.get("/v1/inspections").json()
    assert [i["id"] for i in listed["inspections"]] == [second, first] and listed["record"] == recorder.records.url
    assert listed["inspections"][0]["image_url"] == f"/v1/inspections/{second}/image"
    image = client.get(f"/v1/inspections/{second}/image")
    assert image.status_code == 200 and image.content == defect_png and image.headers["content-type"] == "image/png"

    labelled = client.post(f"/v1/inspections/{first}/label", json={"label": "false_alarm", "by": "anna"})
    assert labelled.status_code == 200, labelled.text
    assert labelled.json()["label"] == "false_alarm" and labelled.json()["labelled_by"] == "anna"
    assert [i["id"] for i in client.get("/v1/inspections?labelled=true").json()["inspections"]] == [first]
    assert [i["id"] for i in client.get("/v1/inspections?verdict=anomalous").json()["inspections"]] == [second]
    assert client.post(f"/v1/inspections/{first}/label", json={"label": None}).json()["label"] is None
    bad = client.post(f"/v1/inspections/{first}/label", json={"label": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("label must be one of false_alarm")
    assert client.post("/v1/inspections/999/label", json={"label": "false_alarm"}).status_code == 404
    assert client.get("/v1/inspections/999/image").status_code == 404

    # only files inside the keep folder are ever served, whatever path the records hold
    secret = tmp_path / "secret.png"
    secret.write_bytes(good_png)
    for path in (str(secret), str(recorder.kept.folder / ".." / "secret.png"), "/etc/passwd"):
        recorder.records.set_image_path(first, path)
        assert client.get(f"/v1/inspections/{first}/image").status_code == 404
        assert client.get("/v1/inspections").json()["inspections"][1]["image_url"] is None
    assert client.get("/v1/inspections/..%2F..%2Fsecret.png/image").status_code in (404, 422)


def test_without_records_the_feedback_routes_say_how_to_start(model, model_file):
    with TestClient(create_app(model, str(model_file))) as client:
        for reply in (client.get("/v1/inspections"), client.get("/v1/inspections/1/image"),
                      client.post("/v1/inspections/1/label", json={"label": "false_alarm"})):
            assert reply.status_code in (404, 409)
            assert reply.json()["detail"] == "this service keeps no records; start it with --record DB"


def test_retention_deletes_the_oldest_images_and_forgets_them(tmp_path, good_png, defect_png):
    kept = KeptImages(tmp_path / "kept", keep_passed=0.0, max_mb=1.5 * len(good_png) / 2**20, max_days=2,
                      rng=random.Random(0))
    assert kept.wanted("anomalous") and not kept.wanted("good") and not kept.wanted("error")
    # files of others in the keep folder (a model, a camera's day folder) are never counted nor deleted
    foreign = [kept.folder / "models" / "bottle.padim", kept.folder / "2024-01-01" / "cam.png"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(good_png * 4)
        os.utime(path, (time.time() - 40 * 86400,) * 2)
    old = kept.keep(good_png, "a" * 64)
    os.utime(old, (time.time() - 3 * 86400,) * 2)  # beyond the age limit
    assert kept.prune() == [old] and not old.exists()
    first = kept.keep(good_png, "b" * 64)
    os.utime(first, (time.time() - 60,) * 2)
    second = kept.keep(defect_png, "c" * 64)
    assert kept.due() and kept.prune() == [first] and second.exists()  # above the size limit: the oldest goes
    assert all(path.exists() for path in foreign)

    with Records(tmp_path / "r.db") as records:
        recorder = Recorder(records, STATION, KeptImages(tmp_path / "k2", max_mb=1.0))
        from fastpadim.records import Inspection

        entry = Inspection(path="d.png", source="serve", station=STATION, model="bottle", model_version=1,
                           verdict="anomalous", digest="d" * 64)
        (id_,) = recorder.record([(entry, defect_png)])
        path = records.get(id_).image_path
        assert path and os.path.exists(path)
        os.remove(path)
        later_run = Recorder(records, STATION, KeptImages(tmp_path / "k2", max_mb=1.0))  # e.g. after a restart
        later_run.forget([type(second)(path)])
        assert records.get(id_).image_path is None


# ------------------------------------------------------------------------------------- several models
def test_several_models_are_served_by_name(model, model_file, good_png):
    app = create_app(models={"bottle": (model, str(model_file)), "screw": (model, None)})
    with TestClient(app) as client:
        reply = post(client, good_png)
        assert reply.status_code == 400
        assert reply.json()["detail"] == "several models are served (bottle, screw): name one with ?model=NAME"
        assert post(client, good_png, path="/v1/score?model=screw").json()["model"] == "screw"
        assert post(client, good_png, path="/v1/score/batch?model=bottle").json()["model"] == "bottle"
        assert post(client, good_png, path="/v1/score?model=nut").status_code == 404
        assert client.get("/v1/model?model=nut").status_code == 404
        assert client.get("/v1/model").status_code == 400
        info = client.get("/v1/model?model=bottle").json()
        assert info["name"] == "bottle" and info["version"] == 1 and info["model_file"] == str(model_file)
        listed = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert listed["bottle"]["versions"] == [1] and listed["screw"]["versions"] == []
        assert listed["bottle"]["threshold"] == pytest.approx(model.threshold_)
        assert client.post("/v1/model/reload", json={"model": "screw"}).status_code == 422  # not from a file


def test_serve_refuses_two_models_of_one_name_and_bad_plant_options(tmp_path, monkeypatch):
    from fastpadim.cli import app

    loads = []
    monkeypatch.setattr(fastpadim, "load", lambda path, **kw: loads.append(path))
    monkeypatch.delenv("FASTPADIM_API_KEY", raising=False)
    (tmp_path / "a").mkdir()
    cases = [
        (["serve", str(tmp_path / "bottle.padim"), str(tmp_path / "a/bottle.v2.padim")], "two models are named bottle"),
        (["serve", str(tmp_path / "m.padim"), "--host", "0.0.0.0"], "serving on 0.0.0.0 needs an API key"),
        (["serve", str(tmp_path / "m.padim"), "--keep", str(tmp_path / "k")], "--keep needs --record DB"),
        (["serve", str(tmp_path / "m.padim"), "--record", "postgresql://u@127.0.0.1:1/db"], "--keep DIR is needed"),
        (["serve", str(tmp_path / "m.padim"), "--record", str(tmp_path / "r.db"), "--keep-passed", "2"],
         "--keep-passed must be between 0 and 1"),
    ]
    for args, phrase in cases:
        result = CliRunner().invoke(app, [*args, "--port", str(free_port())])
        output = result.output.strip()
        assert result.exit_code == 1 and phrase in output and len(output.splitlines()) == 1, output
    assert loads == []


# ------------------------------------------------------------------------------------ reload under load
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_versions(model_file, tmp_path_factory):
    """bottle.padim (v1) and bottle.v2.padim (updated with more good images) in a folder of their own."""
    folder = tmp_path_factory.mktemp("versions")
    v1 = folder / "bottle.padim"
    v1.write_bytes(model_file.read_bytes())
    updated = fastpadim.load(v1, device="cpu")
    more = make_surfaces(6, seed=5)
    updated.partial_fit(more[:2], threshold_images=more[2:])
    updated.save(versioned_path(v1, 2))
    return v1


def test_reload_under_load_drops_no_request(two_versions, good_png):
    v1 = two_versions
    app = create_app(fastpadim.load(v1, device="cpu"), str(v1), loader=lambda path: fastpadim.load(path, device="cpu"))
    replies, stop = [], threading.Event()

    def client_loop():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = http.post(f"{url}/v1/score", files={"file": ("g.png", good_png, "image/png")})
                    replies.append((started, time.monotonic(), r.status_code, r.json().get("model_version")))
                except Exception as exc:  # noqa: BLE001 - a dropped request is what the test looks for
                    replies.append((started, time.monotonic(), repr(exc), None))

    with serving_app(app) as url:
        threads = [threading.Thread(target=client_loop) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.8)
            with httpx.Client(timeout=60) as http:
                up = http.post(f"{url}/v1/model/reload", json={"version": 2})
                up_done = time.monotonic()
                time.sleep(1.0)
                back_start = time.monotonic()
                back = http.post(f"{url}/v1/model/reload", json={"model": "bottle", "version": 1})
                back_done = time.monotonic()
                time.sleep(0.6)
                missing = http.post(f"{url}/v1/model/reload", json={"version": 7})
                models = http.get(f"{url}/v1/models").json()["models"]
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert up.status_code == 200, up.text
    assert up.json()["version"] == 2 and up.json()["previous_version"] == 1
    assert up.json()["model_file"].endswith("bottle.v2.padim")
    assert back.status_code == 200 and back.json()["version"] == 1 and back.json()["previous_version"] == 2
    assert missing.status_code == 404 and "no version 7 of bottle" in missing.json()["detail"]
    assert models[0]["versions"] == [1, 2] and models[0]["version"] == 1
    assert len(replies) > 20 and all(status == 200 for _, _, status, _ in replies), \
        [r for r in replies if r[2] != 200][:3]
    assert all(version in (1, 2) for *_, version in replies)
    between = [v for start, end, _, v in replies if start > up_done and end < back_start]
    after = [v for start, _, _, v in replies if start > back_done]
    assert between and set(between) == {2} and after and set(after) == {1}


def test_sighup_reloads_the_newest_and_a_failed_load_keeps_the_model(two_versions, tmp_path, good_png, caplog):
    import asyncio
    import logging
    import signal

    for version in (1, 2):
        versioned_path(tmp_path / "bottle.padim", version).write_bytes(versioned_path(two_versions, version).read_bytes())
    v1 = tmp_path / "bottle.padim"
    app = create_app(fastpadim.load(v1, device="cpu"), str(v1), loader=lambda path: fastpadim.load(path, device="cpu"),
                     reload_on_hangup=True)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(300):
                await asyncio.sleep(0.05)
                if (await http.get("/v1/model")).json()["version"] == 2:
                    break
            versioned_path(v1, 3).write_bytes(b"\x00" * 100)  # a newest file that does not load
            failed = await http.post("/v1/model/reload")
            scored = await http.post("/v1/score", files={"file": ("g.png", good_png, "image/png")})
            return failed, scored

    with caplog.at_level(logging.INFO, logger="fastpadim"):
        failed, scored = asyncio.run(scenario())
    assert any(r.getMessage().startswith("reloaded bottle: version 1 -> 2") for r in caplog.records)
    assert failed.status_code == 422 and "not a fastpadim model" in failed.json()["detail"]
    assert scored.status_code == 200 and scored.json()["model_version"] == 2


# ---------------------------------------------------------------------------------- drift and metrics
def test_drift_and_metrics_follow_the_scored_images(model, model_file, good_png, defect_png):
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(create_app(model, str(model_file))) as client:
        for data in (good_png, good_png, defect_png):
            assert post(client, data).status_code == 200
        assert post(client, b"junk").status_code == 422
        drift = client.get("/v1/drift").json()
        assert drift["model"] == "bottle" and drift["images"] == 3 and drift["alarm"] is False
        assert drift["flagged_share"] == pytest.approx(1 / 3)
        reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(reply.text) for s in family.samples}
    assert samples[("fastpadim_verdicts_total", (("model", "bottle"), ("verdict", "good")))] == 2
    assert samples[("fastpadim_verdicts_total", (("model", "bottle"), ("verdict", "anomalous")))] == 1
    assert samples[("fastpadim_verdicts_total", (("model", "bottle"), ("verdict", "error")))] == 1
    assert samples[("fastpadim_model_version", (("model", "bottle"),))] == 1
    assert samples[("fastpadim_drift_flagged_share", (("model", "bottle"),))] == pytest.approx(1 / 3)
    assert samples[("fastpadim_requests_total", (("method", "POST"), ("route", "/v1/score"), ("status", "200")))] == 3


# --------------------------------------------------------------------------------------- plant network
def test_api_key_cors_and_offline_docs(model, model_file, good_png):
    with TestClient(create_app(model, str(model_file), api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/model").status_code == 401 and post(client, good_png).status_code == 401
        assert client.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://hmi"}).headers
        docs = client.get("/docs")
        assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
        assert "cdn" not in docs.text.lower() and "https://" not in docs.text
        assert client.get("/docs/static/swagger-ui-bundle.js").status_code == 200
    with TestClient(create_app(model, str(model_file), cors_origins=("http://hmi.plant:8080",))) as client:
        reply = client.get("/health", headers={"Origin": "http://hmi.plant:8080"})
        assert reply.headers["access-control-allow-origin"] == "http://hmi.plant:8080"
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://evil"}).headers


# ------------------------------------------------------------------------------------------- PostgreSQL
def test_records_through_the_service_into_postgresql(postgres_db, model, model_file, good_png, tmp_path):
    with Records(postgres_db) as records:
        recorder = Recorder(records, STATION, KeptImages(tmp_path / "kept", keep_passed=1.0))
        with TestClient(create_app(model, str(model_file), recorder=recorder)) as client:
            body = post(client, good_png).json()
            listed = client.get("/v1/inspections").json()
        got = records.get(body["inspection_id"])
    assert got.verdict == body["verdict"] and got.station == STATION and got.model == "bottle"
    assert listed["inspections"][0]["id"] == body["inspection_id"] and "postgresql" in listed["record"]
