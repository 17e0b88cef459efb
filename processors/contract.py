"""The processor contract: what a processor's logic supplies and what the runtime promises it.

A processor is pure logic plus one :class:`~processors.registry.ProcessorSpec` declaration. The
logic implements :class:`Logic`; the runtime (and the in-memory :class:`~processors.driver.Driver`
the tests use) calls it through the same per-record step, :class:`~processors.step.Step`.

The rules, which the logic may rely on and must keep:

1. **Deterministic.** ``on_event`` and ``on_timer`` depend only on the state, the event (or timer
   key) and ``now_ms``. A transaction that aborts is redone from the same state with the same
   input, so a call may be re-run; it must give the same outputs.
2. **Staged state.** Everything the logic writes goes through the :class:`~processors.state.Store`
   it is given; nothing else survives a restart or a rebalance.
3. **Time.** ``now_ms`` is the stream time of the event's *time domain* (``time_domain``, the
   tenant here): the highest event time of that domain, and in live mode at least the wall clock
   minus the allowed lateness. One domain's events never move another domain's clock. An event
   whose time is far ahead of its record's timestamp (or of the wall clock, live) is refused before
   it reaches the logic.
4. **Timers.** A timer set with ``store.wake(key, at)`` belongs to the domain being processed. Due
   timers of a domain fire (``on_timer``) before the next event of that domain is folded, in the
   order of their times; each fires once, then it is gone unless the logic sets it again.
5. **Latest only.** An :class:`Output` marked ``latest`` (figures on a compacted topic) may be
   left out when a later output of the same topic and key is written in the same transaction.
6. **Refusals.** ``decode`` raises :class:`Invalid` for a record that breaks the input contract;
   ``on_event`` raises :class:`Refused` for an event it will not fold (a bound exceeded). Either
   way the record goes to the dead-letter topic with the reason, in the same transaction, and the
   state is left as it was before the record. Any other exception is treated the same way (and
   logged as a bug): one record never stops a partition.
7. **Known domains** (optional, :class:`StartsDomains`). A logic that must act for a domain
   before any record of it arrives (a tenant's schedules) names the domains it knows of and the
   input key their records carry (``known_domains``). When a partition starts (after its state is
   restored, on every assignment), the partition's first transaction calls ``on_start`` for each
   such domain whose key falls in that partition, at the domain's stream time, in isolation as for
   a record. It must be idempotent (a start may repeat): set up what is missing, change nothing
   else. In replay mode a domain without a clock yet (no record seen) is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import orjson

from processors.output import Output
from processors.state import Store

__all__ = ["Invalid", "Logic", "Output", "Refused", "StartsDomains", "Store", "json_object"]

E = TypeVar("E")


class Invalid(ValueError):
    """A record that breaks the processor's input contract; the message says which field and why."""


class Refused(Exception):
    """An event the logic will not fold (for example a bound exceeded); the message says why."""


def json_object(value: bytes | None, schema: str) -> dict[str, Any]:
    """A record value that must be a JSON object of ``schema``; :class:`Invalid` otherwise."""
    if value is None:
        raise Invalid("value: missing (a tombstone)")
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise Invalid(f"value: not JSON ({exc})") from None
    if type(data) is not dict:
        raise Invalid("value: not a JSON object")
    if data.get("schema") != schema:
        raise Invalid(f"schema: expected {schema!r}")
    return data


class Logic(Protocol[E]):
    """What a processor supplies: decoding, time, and the pure per-event and per-timer logic."""

    def decode(self, key: bytes | None, value: bytes | None) -> E:
        """The event in a record; raises :class:`Invalid` when the record breaks the contract."""
        ...

    def event_time_ms(self, event: E) -> int:
        """Event time of an event, in milliseconds since the epoch."""
        ...

    def time_domain(self, event: E) -> str:
        """Whose clock the event moves (the tenant): timers set while folding it belong there."""
        ...

    def on_event(self, store: Store, event: E, now_ms: int) -> list[Output]:
        """Fold one event into state; return the outputs to write."""
        ...

    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        """The timer of ``key`` is due; return the outputs to write."""
        ...


@runtime_checkable
class StartsDomains(Protocol):
    """A logic that acts for domains known before their first record (rule 7)."""

    def known_domains(self) -> Mapping[str, bytes]:
        """Domain -> the input record key its records carry (which decides its partition)."""
        ...

    def on_start(self, store: Store, domain: str, now_ms: int) -> list[Output]:
        """A partition holding ``domain`` starts: set up what is missing; return outputs."""
        ...
