"""Prometheus metrics of the ingest edge, on a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("accepted", "spooled", "rejected", "unauthorized", "forbidden", "throttled", "unavailable",
            "malformed")


class IngestMetrics:
    """Counters, histogram and gauges exported at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        requests = Counter(
            "keyyo_ingest_requests", "Requests (notifications and the actions API) by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        # Bound children up front: no label lookup on the hot path.
        self.requests = {outcome: requests.labels(outcome) for outcome in OUTCOMES}
        self.produce_seconds = Histogram(
            "keyyo_ingest_produce_seconds", "Time from send to Kafka's acks=all acknowledgement.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.spool_bytes = Gauge(
            "keyyo_ingest_spool_bytes", "Bytes in the disk spool not yet replayed to Kafka.",
            registry=self.registry,
        )
        self.spool_replayed = Counter(
            "keyyo_ingest_spool_replayed_records", "Spooled records replayed to Kafka.",
            registry=self.registry,
        )
        incomplete = Counter(
            "keyyo_ingest_incomplete_template",
            "Notifications accepted without _DREF_ (calls paired approximately) or without _TSMS_ "
            "(event time = receive time): the tenant's URL template lacks them.", ["missing"],
            registry=self.registry,
        )
        self.incomplete_template = {name: incomplete.labels(name) for name in ("dref", "tsms")}
        self.actions_accepted = Counter(
            "keyyo_ingest_actions_accepted", "Actions API requests written to the actions topic, by kind.",
            ["kind"], registry=self.registry,
        )
        previous = Counter(
            "keyyo_ingest_previous_key_requests",
            "Requests authenticated with a tenant's previous notification key or actions API token "
            "(a rotation under way; the log names the tenant).", ["credential"], registry=self.registry,
        )
        self.previous_key = {name: previous.labels(name) for name in ("key", "api_token")}
        reloads = Counter(
            "keyyo_ingest_config_reloads", "Configuration reloads on SIGHUP, by result.", ["result"],
            registry=self.registry,
        )
        self.reloads = {result: reloads.labels(result) for result in ("applied", "failed")}
        self.rejected_unrecorded = Counter(
            "keyyo_ingest_rejected_unrecorded",
            "Refused requests that could not be written to the rejected topic.",
            registry=self.registry,
        )
