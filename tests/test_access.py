"""Plant-network access (``fastpadim.access``): the API key (file, environment, headers), serving beyond loopback only
with one, CORS only when asked for, and /docs served from the package with nothing fetched from the internet."""

from __future__ import annotations

import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastpadim.access import (
    ApiKeyMiddleware, check_exposure, install_cors, install_offline_docs, is_loopback, load_api_key,
)
from fastpadim.errors import FastpadimError

KEY = "s3cret-key"


def build(key: str | None = KEY, origins: list[str] | None = None) -> FastAPI:
    """A small app wired as serve wires its own: offline docs, the key, then CORS outermost."""
    app = FastAPI(title="t", docs_url=None, redoc_url=None)
    app.get("/")(lambda: {"page": True})
    app.get("/health")(lambda: {"ok": True})
    app.get("/metrics")(lambda: "m")
    app.post("/v1/score")(lambda: {"score": 1.0})
    install_offline_docs(app)
    if key:
        app.add_middleware(ApiKeyMiddleware, api_key=key)
    install_cors(app, origins or [])
    return app


# ------------------------------------------------------------------------------------------ the key
def test_the_key_comes_from_the_file_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTPADIM_API_KEY", raising=False)
    assert load_api_key(None) is None
    monkeypatch.setenv("FASTPADIM_API_KEY", "  from-env \n")
    assert load_api_key(None) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file  \nsecond line\n")
    assert load_api_key(key_file) == "from-file"


@pytest.mark.parametrize("content, message", [(None, "cannot read the API key file"), ("", "is empty"),
                                              ("\n  \n", "is empty"), (b"\xff\xfe\x00", "not UTF-8")])
def test_a_missing_empty_or_unreadable_key_file_is_one_line(tmp_path, content, message):
    key_file = tmp_path / "key"
    if isinstance(content, bytes):
        key_file.write_bytes(content)
    elif content is not None:
        key_file.write_text(content)
    with pytest.raises(FastpadimError, match=message) as error:
        load_api_key(key_file)
    assert "\n" not in str(error.value)


def test_serving_beyond_loopback_needs_a_key():
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
        check_exposure(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.20", "line-pc.plant", ""):
        assert not is_loopback(host), host
        check_exposure(host, KEY)
    with pytest.raises(FastpadimError, match=r"^serving on 0\.0\.0\.0 needs an API key: --api-key-file FILE or "
                                             r"FASTPADIM_API_KEY \(clients send 'Authorization: Bearer KEY'"):
        check_exposure("0.0.0.0", None)


def test_the_api_and_metrics_need_the_key_the_page_health_and_docs_do_not():
    client = TestClient(build())
    for path in ("/", "/health", "/docs", "/openapi.json", "/docs/static/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    for request in (lambda **kw: client.post("/v1/score", **kw), lambda **kw: client.get("/metrics", **kw)):
        refused = request()
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.json() == {"detail": "missing or wrong API key; send 'Authorization: Bearer KEY' or "
                                            "'X-API-Key: KEY'"}
        assert request(headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert request(headers={"X-API-Key": KEY + "x"}).status_code == 401
        assert request(headers={"Authorization": KEY}).status_code == 401  # no scheme
        assert request(headers={"Authorization": f"Basic {KEY}"}).status_code == 401
        assert request(headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert request(headers={"authorization": f"bearer {KEY}"}).status_code == 200
        assert request(headers={"X-API-Key": KEY}).status_code == 200
    # exact paths only: nothing opens by prefix but the docs' files
    assert client.get("/health/../v1/score").status_code in (401, 404, 405)
    assert client.get("/healthz").status_code == 401
    assert client.get("/docs/static/../../metrics").status_code != 200


# ------------------------------------------------------------------------------------------ CORS
def test_cors_is_off_unless_origins_are_given():
    plain = TestClient(build())
    preflight = {"Origin": "http://hmi.plant:8080", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "X-API-Key"}
    answer = plain.options("/v1/score", headers=preflight)
    assert "access-control-allow-origin" not in answer.headers
    simple = plain.get("/health", headers={"Origin": "http://hmi.plant:8080"})
    assert "access-control-allow-origin" not in simple.headers

    client = TestClient(build(origins=["http://hmi.plant:8080"]))
    answer = client.options("/v1/score", headers=preflight)  # the preflight carries no key, and passes
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://hmi.plant:8080"
    assert "x-api-key" in answer.headers["access-control-allow-headers"].lower()
    assert client.options("/v1/score", headers={**preflight, "Origin": "http://evil.example"}).status_code == 400
    scored = client.post("/v1/score", headers={"Origin": "http://hmi.plant:8080", "X-API-Key": KEY})
    assert scored.status_code == 200 and scored.headers["access-control-allow-origin"] == "http://hmi.plant:8080"
    refused = client.post("/v1/score", headers={"Origin": "http://hmi.plant:8080"})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://hmi.plant:8080"
    assert client.options("/v1/score").status_code == 401  # an OPTIONS that is no preflight needs the key


@pytest.mark.parametrize("origin", ["hmi.plant", "http://hmi.plant/", "http://hmi.plant/app", "http://", "*.plant",
                                    "http://a b", "http://[::1", "http://user@hmi.plant"])
def test_bad_origins_are_refused(origin):
    with pytest.raises(FastpadimError, match="scheme://host"):
        install_cors(FastAPI(), [origin])


def test_good_origins_are_taken():
    for origins in (["*"], ["https://hmi.plant"], ["http://10.0.0.5:3000", "http://[::1]:8000"]):
        install_cors(FastAPI(), origins)


# ------------------------------------------------------------------------------------------ offline docs
def test_docs_come_from_the_package_and_reference_nothing_outside_the_app():
    client = TestClient(build(key=None))
    page = client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert re.findall(r"https?://", page.text) == []
    assert "validatorUrl" in page.text and '"validatorUrl": null' in page.text.replace("'", '"')
    linked = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert {"/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css", "/openapi.json"} <= set(linked)
    for path in linked:
        asset = client.get(path)
        assert asset.status_code == 200 and len(asset.content) > 100, path
    assert client.get("/docs/static/swagger-ui-bundle.js").headers["content-type"].startswith(
        ("text/javascript", "application/javascript"))
    assert client.get("/redoc").status_code == 404
