"""Prometheus metrics (``fastpadim.metrics``): each ServiceMetrics in its own registry, the exposition parses and holds
the samples recorded, and the middleware labels requests by route template, never the raw path."""

from __future__ import annotations

import math

import pytest
from fastapi import FastAPI, Response
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fastpadim.access import install_offline_docs
from fastpadim.metrics import MetricsMiddleware, ServiceMetrics


def samples(metrics: ServiceMetrics) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from the rendered text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain") and isinstance(body, bytes)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_verdicts_scores_model_version_and_drift_are_exposed():
    metrics = ServiceMetrics()
    for verdict, normalized in (("good", 0.4), ("good", 0.95), ("anomalous", 1.7), ("unknown", None)):
        metrics.verdict("bottle", verdict, normalized)
    metrics.verdict("cable", "good", float("nan"))
    metrics.model_loaded("bottle", 3)
    metrics.drift("bottle", {"alarm": True, "ks_statistic": 0.41, "flagged_share": 0.12, "expected_share": 0.01,
                             "quantiles": {"0.5": 0.6, "0.9": 0.95, "0.99": 1.4}})
    metrics.drift("cable", {"alarm": False, "ks_statistic": None, "flagged_share": None, "expected_share": 0.01,
                            "quantiles": None})
    found = samples(metrics)
    assert value(found, "fastpadim_verdicts_total", model="bottle", verdict="good") == 2
    assert value(found, "fastpadim_verdicts_total", model="bottle", verdict="anomalous") == 1
    assert value(found, "fastpadim_verdicts_total", model="bottle", verdict="unknown") == 1
    assert value(found, "fastpadim_verdicts_total", model="cable", verdict="good") == 1
    assert value(found, "fastpadim_normalized_score_count", model="bottle") == 3  # not the one without a threshold
    assert value(found, "fastpadim_normalized_score_bucket", model="bottle", le="0.5") == 1
    assert value(found, "fastpadim_normalized_score_bucket", model="bottle", le="1.0") == 2
    assert value(found, "fastpadim_normalized_score_bucket", model="bottle", le="+Inf") == 3
    assert value(found, "fastpadim_normalized_score_sum", model="bottle") == pytest.approx(0.4 + 0.95 + 1.7)
    assert ("fastpadim_normalized_score_count", (("model", "cable"),)) not in found  # NaN not observed
    assert value(found, "fastpadim_model_version", model="bottle") == 3
    assert value(found, "fastpadim_drift_alarm", model="bottle") == 1
    assert value(found, "fastpadim_drift_alarm", model="cable") == 0
    assert value(found, "fastpadim_drift_ks_statistic", model="bottle") == pytest.approx(0.41)
    assert math.isnan(value(found, "fastpadim_drift_ks_statistic", model="cable"))
    assert value(found, "fastpadim_drift_flagged_share", model="bottle") == pytest.approx(0.12)
    assert value(found, "fastpadim_drift_expected_share", model="cable") == pytest.approx(0.01)
    assert value(found, "fastpadim_score_quantile", model="bottle", quantile="0.99") == pytest.approx(1.4)
    assert math.isnan(value(found, "fastpadim_score_quantile", model="cable", quantile="0.5"))


def test_each_instance_has_its_own_registry():
    first, second = ServiceMetrics(), ServiceMetrics()  # no "Duplicated timeseries" error
    first.verdict("bottle", "good", 0.5)
    assert value(samples(first), "fastpadim_verdicts_total", model="bottle", verdict="good") == 1
    assert ("fastpadim_verdicts_total", (("model", "bottle"), ("verdict", "good"))) not in samples(second)
    assert REGISTRY.get_sample_value("fastpadim_verdicts_total", {"model": "bottle", "verdict": "good"}) is None


def test_the_middleware_labels_requests_by_route_template():
    metrics = ServiceMetrics()
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.post("/v1/inspections/{id}/label")
    def label(id: int):
        return {"id": id}

    @app.get("/boom")
    def boom():
        raise RuntimeError("boom")

    @app.get("/metrics")
    def exposition():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    install_offline_docs(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    client = TestClient(app, raise_server_exceptions=False)
    for i in range(3):
        assert client.post(f"/v1/inspections/{i}/label").status_code == 200
    assert client.post("/v1/inspections/x/label").status_code == 422
    assert client.get("/v1/inspections/7/label").status_code == 405
    assert client.get("/no/such/path/123").status_code == 404
    assert client.get("/another/unknown").status_code == 404
    assert client.request("BREW", "/no/such").status_code in (404, 405)
    assert client.get("/boom").status_code == 500
    assert client.get("/docs/static/swagger-ui.css").status_code == 200

    found = samples(metrics)
    template = "/v1/inspections/{id}/label"
    assert value(found, "fastpadim_requests_total", method="POST", route=template, status="200") == 3
    assert value(found, "fastpadim_requests_total", method="POST", route=template, status="422") == 1
    assert value(found, "fastpadim_requests_total", method="GET", route=template, status="405") == 1
    assert value(found, "fastpadim_requests_total", method="GET", route="other", status="404") == 2
    assert value(found, "fastpadim_requests_total", method="other", route="other", status="404") == 1
    assert value(found, "fastpadim_requests_total", method="GET", route="/boom", status="500") == 1
    assert value(found, "fastpadim_requests_total", method="GET", route="/docs/static", status="200") == 1
    assert value(found, "fastpadim_request_seconds_count", route=template) == 5
    assert value(found, "fastpadim_request_seconds_bucket", route=template, le="10.0") == 5
    assert value(found, "fastpadim_request_seconds_sum", route=template) > 0
    routes = {dict(labels).get("route") for name, labels in found if name == "fastpadim_requests_total"}
    assert routes == {template, "other", "/boom", "/docs/static"}  # no raw path
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
