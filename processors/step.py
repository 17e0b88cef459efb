"""The per-record work of one partition, pure: shared by the runtime and the in-memory driver.

:meth:`Step.record` takes one input record through decoding, the time bound, the due timers of
its time domain and the logic, and returns what to write: outputs, or a dead letter saying why
the record was set aside. It never raises for anything a record can contain. :meth:`Step.timers`
fires due timers (the runtime calls it after each transaction's records and when idle).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from processors.contract import Invalid, Logic, Refused, StartsDomains
from processors.output import Output
from processors.state import Store
from schemas.notification import rfc3339_ms
from schemas.topics import DEAD_LETTERS

log = logging.getLogger("keyyo.processor")

DEAD_LETTER_SCHEMA = "keyyo.dead-letter.v1"
KEPT_VALUE_BYTES = 64 * 1024
"""A dead letter keeps at most this much of the record's value (its full size is given)."""


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one record from harming the others (documented in the README)."""

    max_ahead_ms: int = 600_000
    """An event time more than this ahead of its record's timestamp (and, live, of the wall
    clock) is refused: one wrong clock must not close other calls early."""
    max_value_bytes: int = 256 * 1024
    """Largest output or state value one record may produce (the broker refuses ~1 MB)."""


class InputRecord(Protocol):
    """What the step reads of an input record (aiokafka's ``ConsumerRecord`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int | None:
        """The record's Kafka timestamp in ms (the producer's clock)."""
        ...


@dataclass(frozen=True, slots=True)
class Record:
    """An input record built by hand (the in-memory driver's)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int | None = None


def _clip(raw: bytes | None, limit: int) -> str | None:
    return raw[:limit].decode("utf-8", "replace") if raw is not None else None


class Step:
    """One partition's per-record work over its :class:`Store`."""

    def __init__(self, logic: Logic[Any], store: Store, processor: str, *,
                 mode: Literal["live", "replay"] = "live", allowed_lateness_ms: int = 5000,
                 limits: Limits | None = None,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.logic = logic
        # The logic's methods, bound once rather than looked up at each call (the look-ups'
        # `_PyObject_GetMethod` alone was 0.8 % of a compiled drain's samples).
        self._decode = logic.decode
        self._event_time_ms = logic.event_time_ms
        self._time_domain = logic.time_domain
        self._on_event = logic.on_event
        self._on_timer = logic.on_timer
        self.store = store
        self.processor = processor
        self.mode = mode
        self.allowed_lateness_ms = allowed_lateness_ms
        self.limits = limits or Limits()
        self.dead_letter_topic = DEAD_LETTERS.name
        self.clock = clock
        self.dead_letters = 0
        self._last_trace = 0.0

    def now(self, domain: str, wall_ms: int) -> int:
        """Stream time of ``domain``: its highest event time, and live at least wall - lateness."""
        return self._floored(self.store.time(domain), wall_ms)

    def _floored(self, time_ms: int, wall_ms: int) -> int:
        """A domain's time as :meth:`now` gives it, from its event time."""
        if self.mode == "live":
            return max(time_ms, wall_ms - self.allowed_lateness_ms)
        return time_ms

    # -- records ----------------------------------------------------------------------------

    def record(self, rec: InputRecord, wall_ms: int) -> list[Output]:
        """Outputs of one record: its domain's due timers, then the logic's (or a dead letter)."""
        try:
            event = self._decode(rec.key, rec.value)
            event_ms = self._event_time_ms(event)
            domain = self._time_domain(event)
        except Exception as exc:  # whatever a record holds, it is set aside
            reason = str(exc) if isinstance(exc, Invalid) else f"undecodable: {type(exc).__name__}: {exc}"
            return [self.dead_letter(rec, reason)]
        refusal = self._time_refusal(event_ms, rec.timestamp, wall_ms)
        if refusal is not None:
            return [self.dead_letter(rec, refusal)]
        now = self._floored(self.store.advance(domain, event_ms), wall_ms)  # the time, read once
        outputs = self._due(domain, now, rec.partition)
        produced, problem = self._isolated(domain, self._on_event, event, now, "processing failed", rec)
        outputs.extend(produced if problem is None else [self.dead_letter(rec, problem)])
        return outputs

    def _isolated(self, domain: str, work: Callable[[Store, Any, int], list[Output]], subject: Any,
                  now: int, failed: str,
                  where: InputRecord | tuple[str, int, int | None]) -> tuple[list[Output], str | None]:
        """Run one piece of the logic, ``work(store, subject, now)`` (its ``on_event``, ``on_timer``
        or ``on_start``, called directly: a partial per record cost a call more), so that, if it
        fails or outgrows a bound, its work is undone and the reason returned instead of its
        outputs. ``where``: the record, or (what, partition, None), for the log of a failure (a
        record's topic, partition and offset are read only then)."""
        store = self.store
        store.domain = domain
        store.begin_step()
        try:
            produced = work(store, subject, now)
            problem = self._oversized(produced)
        except Refused as exc:
            problem = f"refused: {exc}"
        except Exception as exc:  # a bug, or an input the logic did not foresee
            if isinstance(where, tuple):
                self._log_bug(exc, *where)
            else:
                self._log_bug(exc, where.topic, where.partition, where.offset)
            problem = f"{failed}: {type(exc).__name__}: {exc}"
        if problem is not None:
            store.rollback_step()
            return [], problem
        store.end_step()
        return produced, None

    def _time_refusal(self, event_ms: int, record_ms: int | None, wall_ms: int) -> str | None:
        ahead = self.limits.max_ahead_ms
        if record_ms is not None and record_ms > 0 and event_ms > record_ms + ahead:
            return (f"event time {rfc3339_ms(event_ms)} is more than {ahead // 1000} s ahead of the "
                    f"record's timestamp {rfc3339_ms(record_ms)}")
        if self.mode == "live" and event_ms > wall_ms + ahead:
            return (f"event time {rfc3339_ms(event_ms)} is more than {ahead // 1000} s ahead of the "
                    f"wall clock {rfc3339_ms(wall_ms)}")
        return None

    def _oversized(self, produced: list[Output]) -> str | None:
        limit = self.limits.max_value_bytes
        for out in produced:
            # A value rendered later is a snapshot of state checked below; should it still be
            # too large, Kafka refuses it and the runtime sets the record aside after its attempts.
            if isinstance(out.value, bytes) and len(out.value) > limit:
                return f"an output to {out.topic} of {len(out.value)} bytes exceeds {limit} bytes"
        if (largest := self.store.step_largest()) > limit:
            return f"state entry of {largest} bytes exceeds {limit} bytes"
        return None

    # -- start ------------------------------------------------------------------------------

    def start(self, owns: Callable[[bytes], bool], wall_ms: int, partition: int) -> list[Output]:
        """A partition's start: ``on_start`` for each domain the logic knows of whose key
        ``owns`` (contract, rule 7); in replay mode a domain without a clock yet is skipped."""
        logic = self.logic
        if not isinstance(logic, StartsDomains):
            return []
        outputs: list[Output] = []
        for domain, key in logic.known_domains().items():
            if not owns(key) or (self.mode == "replay" and self.store.time(domain) == 0):
                continue
            now = self.now(domain, wall_ms)
            produced, problem = self._isolated(domain, logic.on_start, domain, now, "start failed",
                                               ("start", partition, None))
            outputs.extend(produced if problem is None
                           else [self._timer_dead_letter(partition, domain, "start", problem)])
        return outputs

    # -- timers -----------------------------------------------------------------------------

    def has_due(self, wall_ms: int) -> bool:
        """True when some domain has a timer at or before its stream time."""
        for domain in self.store.domains():
            wake = self.store.next_wake(domain)
            if wake is not None and wake <= self.now(domain, wall_ms):
                return True
        return False

    def timers(self, wall_ms: int, partition: int) -> list[Output]:
        """Fire every domain's due timers."""
        outputs: list[Output] = []
        for domain in self.store.domains():
            wake = self.store.next_wake(domain)
            if wake is not None:
                now = self.now(domain, wall_ms)
                if wake <= now:
                    outputs.extend(self._due(domain, now, partition))
        return outputs

    def flush(self, advance_ms: int, partition: int) -> list[Output]:
        """Burst mode's end: move every domain's time on by ``advance_ms`` and fire what is due."""
        for domain in self.store.domains():
            self.store.advance(domain, self.store.time(domain) + advance_ms)
        return self.timers(self.clock(), partition)

    def _due(self, domain: str, now: int, partition: int) -> list[Output]:
        store = self.store
        if (wake := store.next_wake(domain)) is None or wake > now:
            return []
        outputs: list[Output] = []
        for key in list(store.due(domain, now)):
            produced, problem = self._isolated(domain, self._on_timer, key, now, "timer failed",
                                               ("timer", partition, None))
            outputs.extend(produced if problem is None
                           else [self._timer_dead_letter(partition, domain, key, problem)])
        return outputs

    # -- dead letters -----------------------------------------------------------------------

    def dead_letter(self, rec: InputRecord, reason: str, attempts: int = 1) -> Output:
        """The dead-letter record of ``rec`` (its value clipped to :data:`KEPT_VALUE_BYTES`)."""
        self.dead_letters += 1
        value = {
            "schema": DEAD_LETTER_SCHEMA, "processor": self.processor, "topic": rec.topic,
            "partition": rec.partition, "offset": rec.offset, "timer": None,
            "key": _clip(rec.key, 1024), "value": _clip(rec.value, KEPT_VALUE_BYTES),
            "value_bytes": len(rec.value) if rec.value is not None else None,
            "reason": reason[:2000], "attempts": attempts, "at": rfc3339_ms(self.clock()),
        }
        return Output(self.dead_letter_topic, f"{rec.topic}:{rec.partition}:{rec.offset}".encode(),
                      orjson.dumps(value))

    def _timer_dead_letter(self, partition: int, domain: str, key: str, reason: str) -> Output:
        self.dead_letters += 1
        value = {
            "schema": DEAD_LETTER_SCHEMA, "processor": self.processor, "topic": None,
            "partition": partition, "offset": None, "timer": key[:1024], "key": domain[:1024],
            "value": None, "value_bytes": None, "reason": reason[:2000], "attempts": 1,
            "at": rfc3339_ms(self.clock()),
        }
        return Output(self.dead_letter_topic, f"timer:{partition}:{key[:200]}".encode(),
                      orjson.dumps(value))

    def unrendered(self, partition: int) -> Callable[[Output, Exception], Output]:
        """What :func:`~processors.output.coalesce` writes instead of an output of ``partition``
        whose rendering raised: a dead letter whose ``timer`` is ``output:<topic>`` and ``key`` the
        output's key, with the error (the state stays as it is; the next change of the same
        figures writes them again)."""
        def dead_letter(out: Output, exc: Exception) -> Output:
            self._log_bug(exc, out.topic, partition, None)
            return self._timer_dead_letter(partition, out.key.decode("utf-8", "replace"),
                                           f"output:{out.topic}",
                                           f"rendering failed: {type(exc).__name__}: {exc}")
        return dead_letter

    def _log_bug(self, exc: Exception, topic: str, partition: int, offset: int | None) -> None:
        """A traceback at most once a minute: a flood of bad records must not flood the logs."""
        extra = {"processor": self.processor, "topic": topic, "partition": partition, "offset": offset,
                 "error": repr(exc)[:500]}
        if time.monotonic() - self._last_trace > 60:
            self._last_trace = time.monotonic()
            log.error("processing failed; record set aside", exc_info=exc, extra=extra)
        else:
            log.warning("processing failed; record set aside", extra=extra)
