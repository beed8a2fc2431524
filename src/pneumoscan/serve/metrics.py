"""Prometheus metrics of one app, in a registry of its own (several apps in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# the routes a label may name; anything else is "other", so a scanner cannot blow up the label set
ROUTES = ("/healthz", "/metrics", "/v1/model", "/v1/model/card", "/v1/predict", "/openapi.json", "/")


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/static/"):
        return "/static"
    return "other"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model, *, batching: dict):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("pneumoscan_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.latency = Histogram("pneumoscan_http_request_duration_seconds",
                                 "time from the request's arrival to the end of the response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("pneumoscan_predictions", "screened images by prediction status", ["status"],
                                   registry=r)
        self.batch_size = Histogram("pneumoscan_batch_size", "images per network call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.network_seconds = Histogram("pneumoscan_network_seconds", "duration of one network call (a batch)",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("pneumoscan_queue_depth", "images decoded and waiting for the network",
                                 registry=r)
        self.in_progress = Gauge("pneumoscan_requests_in_progress",
                                 "screening requests being uploaded, decoded, queued or scored (bounded by "
                                 "--max-pending)", registry=r)
        self.rejected = Counter("pneumoscan_busy_rejections", "requests refused with 503 (over --max-pending)",
                                registry=r)
        self.audit_failures = Counter("pneumoscan_audit_failures", "audit lines that could not be written",
                                      registry=r)
        self.unauthorized = Counter("pneumoscan_unauthorized", "requests refused with 401", ["reason"], registry=r)
        self.protocol_rejections = Counter(
            "pneumoscan_protocol_rejections", "connections refused before a request reached the app: malformed or "
            "oversize request heads, heads not received in time, the connection limit, plain HTTP on the HTTPS "
            "port, failed TLS handshakes", ["reason"], registry=r)
        info = Info("pneumoscan_model", "the served model", registry=r)
        info.info({"name": str(model.name), "sha256": str(model.sha256), "backend": str(model.backend.name),
                   "runtime": str(model.runtime), **{k: str(v) for k, v in batching.items()}})

    def render(self) -> bytes:
        return generate_latest(self.registry)
