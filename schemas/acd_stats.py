"""ACD statistics: the figures of one (tenant, queue, interval), as ``keyyo.acd-stats.v1``.

The counts and sums are what is stored and added up; every average and the service level are
derived from them by :func:`derived`, which the processor and ``keyyo-stream report acd`` share
(so a total over many intervals is recomputed from its counts and sums, never averaged).
JSON Schema: ``schemas/json/keyyo.acd-stats.v1.schema.json``; definitions in the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, TypedDict
from zoneinfo import ZoneInfo

ACD_STATS_SCHEMA = "keyyo.acd-stats.v1"

ServiceLevelFormula = Literal[
    "abandons_against", "abandons_within_sl_ignored", "abandons_within_sl_count_for", "abandons_ignored"]
SERVICE_LEVEL_FORMULAS: tuple[str, ...] = (
    "abandons_against", "abandons_within_sl_ignored", "abandons_within_sl_count_for", "abandons_ignored")
"""The usual definitions (A = answered, B = abandoned, A_sl / B_sl = within the threshold; with
short abandons excluded, B and B_sl lose the short abandons first):

- ``abandons_against``: A_sl / (A + B)
- ``abandons_within_sl_ignored``: A_sl / (A + B - B_sl)
- ``abandons_within_sl_count_for``: (A_sl + B_sl) / (A + B)
- ``abandons_ignored``: A_sl / A
"""

COUNTS = ("offered", "answered", "abandoned", "voicemail", "short_abandoned", "answered_within_sl",
          "abandoned_within_sl")
"""The counted figures, in the order the state keeps them."""
SUMS = ("wait_seconds", "answered_wait_seconds", "abandoned_wait_seconds", "talk_seconds")
"""The summed figures (seconds), in the order the state keeps them (as milliseconds)."""


class AgentFigures(TypedDict):
    """One agent line rung in the interval."""

    line: str
    offered: int
    answered: int
    missed: int
    talk_seconds: float


def service_level(answered: int, abandoned: int, short_abandoned: int, answered_within_sl: int,
                  abandoned_within_sl: int, formula: str, exclude_short: bool) -> float | None:
    """The service level (0-1) by ``formula``; None when its denominator is 0.

    Short abandons are within the threshold (``short_abandon_seconds`` <= ``service_level_seconds``
    is enforced by the configuration), so excluding them takes them out of B and B_sl alike.
    """
    b, b_sl = abandoned, abandoned_within_sl
    if exclude_short:
        b, b_sl = b - short_abandoned, b_sl - short_abandoned
    a, a_sl = answered, answered_within_sl
    if formula == "abandons_against":
        num, den = a_sl, a + b
    elif formula == "abandons_within_sl_ignored":
        num, den = a_sl, a + b - b_sl
    elif formula == "abandons_within_sl_count_for":
        num, den = a_sl + b_sl, a + b
    elif formula == "abandons_ignored":
        num, den = a_sl, a
    else:
        raise ValueError(f"unknown service level formula {formula!r}")
    return round(num / den, 4) if den > 0 else None


def _mean(total: float, n: int) -> float | None:
    return round(total / n, 3) if n > 0 else None


DERIVED = ("service_level", "asa_seconds", "avg_wait_seconds", "avg_abandon_seconds", "avg_talk_seconds")
"""The figures derived from the counts and sums, in the order the value holds them."""


def derived_values(counts: Sequence[int], sums: Sequence[float], formula: str,
                   exclude_short: bool) -> tuple[float | None, ...]:
    """The :data:`DERIVED` figures of the counts (in :data:`COUNTS`' order) and the sums (seconds,
    in :data:`SUMS`' order) under the service-level settings."""
    offered, answered, abandoned, _, short_abandoned, answered_within_sl, abandoned_within_sl = counts
    wait, answered_wait, abandoned_wait, talk = sums
    return (service_level(answered, abandoned, short_abandoned, answered_within_sl, abandoned_within_sl,
                          formula, exclude_short),
            _mean(answered_wait, answered), _mean(wait, offered), _mean(abandoned_wait, abandoned),
            _mean(talk, answered))


def derived(f: dict[str, Any]) -> dict[str, Any]:
    """The averages and service level of figures that hold the counts, the sums, and the
    service-level settings (``service_level_formula``, ``short_abandons_excluded``)."""
    values = derived_values([f[name] for name in COUNTS], [f[name] for name in SUMS],
                            f["service_level_formula"], f["short_abandons_excluded"])
    return dict(zip(DERIVED, values, strict=True))


class AcdStats(TypedDict):
    """Value of ``keyyo.acd-stats.v1`` (key ``tenant|queue|interval_start``)."""

    schema: str
    tenant: str
    queue: str
    interval_start: str
    interval_end: str
    interval_minutes: int
    timezone: str
    local_start: str
    revision: int
    final: bool
    updated_at: str
    offered: int
    answered: int
    abandoned: int
    voicemail: int
    short_abandoned: int
    answered_within_sl: int
    abandoned_within_sl: int
    service_level: float | None
    service_level_formula: str
    service_level_seconds: float
    short_abandon_seconds: float
    short_abandons_excluded: bool
    asa_seconds: float | None
    avg_wait_seconds: float | None
    max_wait_seconds: float | None
    avg_abandon_seconds: float | None
    avg_talk_seconds: float | None
    talk_seconds: float
    wait_seconds: float
    answered_wait_seconds: float
    abandoned_wait_seconds: float
    agents: list[AgentFigures]


def interval_start(ms: int, zone: ZoneInfo, minutes: int) -> int:
    """Start (UTC ms) of the ``minutes`` interval holding ``ms``, aligned in ``zone`` at the UTC
    offset in force at ``ms``: a DST change never gives an interval of another length, and the
    hour repeated in autumn gives two distinct intervals."""
    offset = datetime.fromtimestamp(ms / 1000, zone).utcoffset()
    offset_ms = int(offset.total_seconds() * 1000) if offset is not None else 0
    local = ms + offset_ms
    return local - local % (minutes * 60_000) - offset_ms


def stats_key(tenant: str, queue: str, interval_start: str) -> bytes:
    """The record key: one compacted entry per (tenant, queue, interval)."""
    return f"{tenant}|{queue}|{interval_start}".encode()
