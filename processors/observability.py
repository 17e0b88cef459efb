"""Metrics and the health side port of a processor process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class ProcessorMetrics:
    """Exported at ``/metrics`` on the side port."""

    def __init__(self, processor: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"processor": processor}
        self.records_in = Counter(
            "keyyo_processor_records_in", "Input records processed.", ["processor"],
            registry=self.registry).labels(**labels)
        self.records_out = Counter(
            "keyyo_processor_records_out", "Records written, by topic.", ["processor", "topic"],
            registry=self.registry)
        self.commit_seconds = Histogram(
            "keyyo_processor_commit_seconds", "Time to commit one transaction.", ["processor"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry).labels(**labels)
        self.aborts = Counter("keyyo_processor_aborts", "Transactions aborted.", ["processor"],
                              registry=self.registry).labels(**labels)
        self.dead_letters = Counter("keyyo_processor_dead_letters", "Input records set aside.",
                                    ["processor"], registry=self.registry).labels(**labels)
        self.lag = Gauge("keyyo_processor_lag", "Records behind the end of the input, by partition.",
                         ["processor", "partition"], registry=self.registry)
        self.state_entries = Gauge("keyyo_processor_state_entries", "State entries, by partition.",
                                   ["processor", "partition"], registry=self.registry)
        self.failures = Counter(
            "keyyo_processor_failed_transactions", "Transactions that failed, by kind: kafka_away "
            "(retried without end) or refused (the record is set aside after max attempts).",
            ["processor", "kind"], registry=self.registry)
        self.stuck = Gauge("keyyo_processor_partition_stuck",
                           "1 while a partition's transactions keep failing (see /readyz).",
                           ["processor", "partition"], registry=self.registry)
        self.restore_remaining = Gauge(
            "keyyo_processor_restore_remaining", "Changelog records still to replay, by partition "
            "(0 once restored).", ["processor", "partition"], registry=self.registry)
        self.restored_records = Counter(
            "keyyo_processor_restored_records", "Changelog records replayed into state.",
            ["processor"], registry=self.registry).labels(**labels)
        self.assigned = Gauge("keyyo_processor_assigned_partitions", "Input partitions owned.",
                              ["processor"], registry=self.registry).labels(**labels)
        self.processor = processor

    def transactions(self) -> int:
        """Transactions committed so far (the commit histogram's count)."""
        return int(sum(s.value for m in self.registry.collect() for s in m.samples
                       if s.name == "keyyo_processor_commit_seconds_count"))


class HasRegistry(Protocol):
    """Metrics a side port can serve."""

    registry: CollectorRegistry


HealthCheck = Callable[[], dict[str, bool]]
Detail = Callable[[], dict[str, Any]]


@asynccontextmanager
async def health_server(host: str, port: int, metrics: HasRegistry,
                        readiness: HealthCheck, detail: Detail | None = None,
                        next_free: int = 0) -> AsyncIterator[int]:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics``; yield the bound port.

    With ``next_free`` > 0, a busy ``port`` is not an error: the next free one of the following
    ``next_free`` ports is taken (so several processes on one host run with default options).
    """

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        checks = readiness()
        ok = all(checks.values())
        body: dict[str, Any] = {"ready": ok, "checks": checks}
        if detail is not None:
            body.update(detail())
        return web.json_response(body, status=200 if ok else 503)

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    last = port + next_free if port else port
    for candidate in range(port, last + 1):
        site = web.TCPSite(runner, host, candidate)
        try:
            await site.start()
            break
        except OSError:
            if candidate == last:
                await runner.cleanup()
                raise
    bound = candidate
    server: Any = site._server  # private: the only way to learn the port bound for port 0
    if server is not None and server.sockets:
        bound = server.sockets[0].getsockname()[1]
    try:
        yield int(bound)
    finally:
        await runner.cleanup()
