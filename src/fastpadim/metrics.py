"""Prometheus metrics of ``fastpadim serve`` (``/metrics``): requests, verdicts, normalized scores, the model
version and the drift monitor's numbers (``fastpadim.drift``).

Each ``ServiceMetrics`` has its own registry (never prometheus_client's global one): several apps in one process
(tests, a reload) then never collide. ``MetricsMiddleware`` labels requests by their route template
("/v1/inspections/{id}/label"), never the raw path, so the number of series stays bounded.
"""

from __future__ import annotations

import math
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .drift import QUANTILES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
NORMALIZED_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 4.0)  # score / threshold: 1 is the threshold
OTHER = "other"  # the route of requests that matched none; the method of unusual ones
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def gauge_value(value) -> float:
    """A status number as a gauge's value: None (not computed yet) is NaN."""
    return float("nan") if value is None else float(value)


class ServiceMetrics:
    """The service's counters, histograms and gauges in their own registry; ``render()`` for ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastpadim_requests_total", "HTTP requests by method, route template and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("fastpadim_request_seconds", "HTTP request latency in seconds", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.verdicts = Counter("fastpadim_verdicts_total", "Images judged, by model and verdict",
                                ["model", "verdict"], registry=r)
        self.normalized = Histogram("fastpadim_normalized_score", "Image scores / threshold (1 is the threshold)",
                                    ["model"], buckets=NORMALIZED_BUCKETS, registry=r)
        self.model_version = Gauge("fastpadim_model_version", "Version of the loaded model file", ["model"],
                                   registry=r)
        self.drift_alarm = Gauge("fastpadim_drift_alarm", "1 while the drift monitor raises an alarm", ["model"],
                                 registry=r)
        self.drift_ks = Gauge("fastpadim_drift_ks_statistic",
                              "Kolmogorov-Smirnov distance of passed images' scores to the calibration's (NaN: "
                              "not tested yet)", ["model"], registry=r)
        self.drift_flagged = Gauge("fastpadim_drift_flagged_share", "Share of the drift window above the threshold",
                                   ["model"], registry=r)
        self.drift_expected = Gauge("fastpadim_drift_expected_share",
                                    "Share above the threshold the calibration expects", ["model"], registry=r)
        self.score_quantile = Gauge("fastpadim_score_quantile", "Quantiles of normalized scores in the drift window",
                                    ["model", "quantile"], registry=r)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def verdict(self, model: str, verdict: str, normalized: float | None) -> None:
        """One judged image; its normalized score (None without a threshold, or not finite) is not observed."""
        self.verdicts.labels(model, verdict).inc()
        if normalized is not None and math.isfinite(normalized):
            self.normalized.labels(model).observe(normalized)

    def model_loaded(self, model: str, version: int) -> None:
        self.model_version.labels(model).set(version)

    def drift(self, model: str, status: dict) -> None:
        """The gauges from ``DriftMonitor.status()``."""
        self.drift_alarm.labels(model).set(1 if status["alarm"] else 0)
        self.drift_ks.labels(model).set(gauge_value(status.get("ks_statistic")))
        self.drift_flagged.labels(model).set(gauge_value(status.get("flagged_share")))
        self.drift_expected.labels(model).set(gauge_value(status.get("expected_share")))
        quantiles = status.get("quantiles") or {}
        for quantile in map(str, QUANTILES):  # all of them, NaN while the window is empty
            self.score_quantile.labels(model, quantile).set(gauge_value(quantiles.get(quantile)))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def mount_path(scope, root_path: str) -> str | None:
    """The path of the mount that served a request (Starlette records no route for one, but extends the root
    path by the mount's path), or None."""
    root = scope.get("root_path", "")
    return (root[len(root_path):] or None) if root.startswith(root_path) else None


class MetricsMiddleware:
    """Pure ASGI: times each HTTP request to its last byte and counts it under its route template (the matched
    FastAPI route's path, which the router leaves in the scope; a mount's path for its files), or "other" where
    none matched (a plain Starlette route leaves no trace: add routes with FastAPI's decorators)."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the response started

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        root = scope.get("root_path", "")
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or mount_path(scope, root) or OTHER
            method = scope["method"] if scope["method"] in METHODS else OTHER  # any word is a method: bounded
            self.metrics.request(method, route, status, time.perf_counter() - start)
