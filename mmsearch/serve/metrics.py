"""Prometheus metrics of one server: requests by route and status, latency per route and per stage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()  # one per app: tests run several in one process
        self.requests = Counter("mmsearch_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram("mmsearch_request_seconds", "HTTP request latency", ["route"], buckets=BUCKETS,
                                 registry=self.registry)
        self.stages = Histogram("mmsearch_stage_seconds", "time per stage (encode + search, thumbnail, transcode)",
                                ["stage"], buckets=BUCKETS, registry=self.registry)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages.labels(name).observe(time.perf_counter() - t0)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
