"""What an operator scrapes: ``GET /metrics`` in Prometheus's text format (the ``prometheus_client`` library).

Requests by route and status, their latency, the sizes of the batches the model computed, the queue's depth,
the decode workers in use, and every refusal by its reason (a request's 400/408/413/503, a connection closed by
a bound). Each server has its own registry, so two in one process (the tests) do not mix their counts.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One server's counters; :meth:`exposition` is the body of ``GET /metrics``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int], decoding: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("captioner_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("captioner_request_seconds", "time from a request's arrival to its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("captioner_batch_size", "requests encoded and decoded together",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.refusals = Counter("captioner_refusals", "requests and connections refused, by reason",
                                ["reason"], registry=self.registry)
        Gauge("captioner_queue_depth", "requests waiting for the model", registry=self.registry
              ).set_function(queue_depth)
        Gauge("captioner_decoding", "decode workers busy with an upload", registry=self.registry
              ).set_function(decoding)

    def answered(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
