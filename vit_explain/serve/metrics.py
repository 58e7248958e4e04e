"""Prometheus metrics in KServe's names, on a registry of the app's own.

KServe's model server reports ``request_predict_seconds`` and ``request_explain_seconds``
(histograms labelled ``model_name``); dashboards built for it read these unchanged. The server
adds what a batching server needs watched: requests in flight against ``--max-queue``, items
waiting for a graph call, the batch sizes the graph saw, and refusals by reason. A registry per
app (not prometheus-client's global one) lets a service mount several apps, and tests start many.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

#: Latency buckets from 5 ms to 60 s: one image on a busy CPU up to a full queue's wait.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The app's metrics; :meth:`render` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.explain_seconds = Histogram("request_explain_seconds", "Time to answer an :explain request",
                                         ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.predict_seconds = Histogram("request_predict_seconds", "Time to answer a :predict request",
                                         ["model_name"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("vit_explain_requests_in_flight",
                               "Requests admitted and not yet answered (bounded by --max-queue)", registry=r)
        self.queue_depth = Gauge("vit_explain_queue_depth", "Instances waiting for a graph call",
                                 ["model_name"], registry=r)
        self.batch_size = Histogram("vit_explain_batch_size", "Instances per graph call", ["model_name"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.rejections = Counter("vit_explain_rejections", "Requests refused, by reason", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
