"""Every processor, declared once: its name, topics, store, own options and how its logic is built.

The CLI (``keyyo-stream process NAME``), the local stack, the tests and the benchmarks look
processors up here; adding one is one :class:`ProcessorSpec` plus its pure logic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from processors.acd_config import load_acd_config
from processors.acd_stats import AcdStatsLogic
from processors.action_rules import ActionRulesLogic
from processors.action_rules_config import load_rules
from processors.call_records import CallRecords, CallRecordsConfig
from processors.contract import Logic
from processors.runtime import RuntimeSettings
from schemas.topics import (
    ACD_STATS,
    ACTION_RESULTS,
    ACTIONS,
    CALL_RECORDS,
    CALL_UPDATES,
    DEAD_LETTERS,
    NOTIFICATIONS,
    Topic,
)


@dataclass(frozen=True)
class Option:
    """One processor-specific command-line option (``--name``), with its default and help."""

    name: str
    """Option name without the leading dashes, e.g. ``ring-timeout``."""
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def dest(self) -> str:
        """Where the value arrives: the name with dashes turned into underscores."""
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class ProcessorSpec:
    """A processor's declaration."""

    name: str
    """``keyyo-stream process NAME``; the default group is ``<output prefix>keyyo.<name>``."""
    input: Topic
    outputs: tuple[Topic, ...]
    store: str
    """Names the changelog: ``<group>.<store>.changelog``."""
    health_port: int
    """Preferred side port; the next free one is taken when it is busy."""
    options: tuple[Option, ...]
    build: Callable[[Mapping[str, Any]], Logic[Any]]
    """The logic, from the option values (keyed by :attr:`Option.dest`)."""
    description: str
    default_mode: str = "live"
    """``live`` (quiet tenants' time follows the wall clock) or ``replay`` (event time only)."""
    default_slice_ms: int = 8
    """Processing time per transaction and partition: lower commits (and shows results) sooner,
    higher spends less on transactions."""
    default_commit_interval_ms: int = 0
    """How long a transaction stays open taking records as they arrive (see
    :attr:`~processors.runtime.RuntimeSettings.commit_interval_ms`)."""

    def group(self, output_prefix: str = "") -> str:
        """The default consumer group."""
        return f"{output_prefix}keyyo.{self.name}"

    def logic(self, **values: Any) -> Logic[Any]:
        """The logic with these option values (keyed by :attr:`Option.dest`; the others at their
        defaults)."""
        return self.build({**{o.dest: o.default for o in self.options}, **values})

    def settings(self, bootstrap: str, prefix: str = "", output_prefix: str | None = None,
                 **overrides: Any) -> RuntimeSettings:
        """Runtime settings of one process: input under ``prefix``, outputs (and the default group)
        under ``output_prefix`` (default: ``prefix``), any other setting overridden."""
        out = prefix if output_prefix is None else output_prefix
        return RuntimeSettings(**{
            "bootstrap": bootstrap, "group": self.group(out), "input_topic": self.input.full_name(prefix),
            "output_prefix": out, "store": self.store, "mode": self.default_mode,
            "slice_ms": self.default_slice_ms, "commit_interval_ms": self.default_commit_interval_ms,
            **overrides})


def _call_records(v: Mapping[str, Any]) -> Logic[Any]:
    return CallRecords(CallRecordsConfig(
        linger_ms=int(v["linger"] * 1000), ring_timeout_ms=int(v["ring_timeout"] * 1000),
        max_duration_ms=int(v["max_duration"] * 1000), retention_ms=int(v["retention"] * 1000),
        max_legs=int(v["max_legs"]), max_events=int(v["max_events"]),
        decoded_calls=int(v["decoded_calls"])))


CALL_RECORDS_SPEC = ProcessorSpec(
    name="call-records",
    input=NOTIFICATIONS,
    outputs=(CALL_UPDATES, CALL_RECORDS, DEAD_LETTERS),
    store="state",
    health_port=9101,
    options=(
        Option("linger", float, 10.0, "seconds after the last RELEASE before a call closes"),
        Option("ring-timeout", float, 300.0, "seconds a leg may ring without CONNECT/RELEASE"),
        Option("max-duration", float, 4 * 3600.0, "seconds a connected leg may go without RELEASE"),
        Option("retention", float, 600.0, "seconds a closed call is kept for late events"),
        Option("max-legs", int, 64, "legs one call may hold; an event past it is dead-lettered"),
        Option("max-events", int, 256, "notifications one call may fold; later ones are dead-lettered"),
        Option("decoded-calls", int, 16_384, "calls the compiled build keeps decoded between their events "
               "(about 1.4 KB each; 0 for none)"),
    ),
    build=_call_records,
    description="Correlate notifications into call records and live call updates.",
    # A transaction has a fixed cost whatever it holds (its requests, markers, the offsets:
    # 1.5-3.5 ms of the process's time each, measured). Draining a backlog, 50 ms slices gave
    # 1.5-1.6x the records/s of 8 ms ones in separate benchmark runs (median 1.06x in drains
    # interleaved in one process); at 1,000 notifications/s (no backlog: transactions take what
    # waits, far below a slice) the latency stayed the same (README, Call-records benchmark,
    # twelfth pass).
    default_slice_ms=50,
)

ACD_STATS_SPEC = ProcessorSpec(
    name="acd-stats",
    input=CALL_RECORDS,
    outputs=(ACD_STATS, DEAD_LETTERS),
    store="state",
    health_port=9111,
    options=(
        Option("config", str, None, "TOML file with [acd] defaults and [acd.tenants.<id>] overrides "
               "and queues (without it: every default, one queue per tenant)"),
    ),
    build=lambda v: AcdStatsLogic(load_acd_config(v["config"])),
    description="Contact-centre figures per tenant, queue and interval from the call records.",
    # Event time only: backfilling old records after an outage must not find their intervals
    # closed by the wall clock. Quiet tenants' last intervals turn final with their next record.
    default_mode="replay",
    # Figures of 15-minute intervals need no millisecond freshness: larger transactions cost
    # far less per record (measured: 8 ms slices ~12k records/s, 50 ms ~25k on the benchmark).
    default_slice_ms=50,
)

ACTION_RULES_SPEC = ProcessorSpec(
    name="action-rules",
    input=CALL_RECORDS,
    outputs=(ACTIONS, ACTION_RESULTS, DEAD_LETTERS),
    store="state",
    health_port=9121,
    options=(
        Option("rules", str, None, "TOML file with [tenants.<id>] rules and schedules (README, "
               "Outbound actions; without it no tenant has any)"),
    ),
    build=lambda v: ActionRulesLogic(load_rules(v["rules"])),
    description="Decide outbound actions (SMS, callbacks, profile switches) from call records and "
                "schedules, exactly once per rule and call.",
)

PROCESSORS: dict[str, ProcessorSpec] = {
    spec.name: spec for spec in (CALL_RECORDS_SPEC, ACD_STATS_SPEC, ACTION_RULES_SPEC)}
"""Every declared processor, by name."""
