"""ACD statistics: fold call records into per (tenant, queue, interval) figures; pure, no I/O.

Input: ``keyyo.call-records.v1`` (key = tenant). Only ACD calls (``is_acd``) count; every record
moves its tenant's clock (event time = ``ended_at``, else ``started_at``). A call belongs to the
interval holding its ``started_at``, aligned in the tenant's time zone.

State keys (tenant ``t``, queue ``q``, interval start ``iv`` in ms):

- ``a/t/q/iv``: the interval's counts and sums (milliseconds), its revision and ``final`` flag;
  its timer makes it final at end + grace, then forgets it at end + restatement window;
- ``k/t/<record_id>``: what a call contributed (queue, interval, slot, revision, outcome, wait,
  talk, flags, agents), so a restated record replaces exactly its earlier contribution;
- ``m/t/q/iv/<slot>``: the record ids of an interval, so its entries can be forgotten together and
  its maximum wait recomputed when a restatement lowers it.

Each change emits the interval's figures with revision + 1 (definitions in the README).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from processors.acd_config import AcdConfig, TenantAcd
from processors.contract import Invalid, Output, Refused, Store, json_object
from schemas.acd_stats import (
    ACD_STATS_SCHEMA,
    COUNTS,
    DERIVED,
    SUMS,
    derived,
    interval_start,
    stats_key,
)
from schemas.call_record import CALL_RECORD_SCHEMA, RECORD_ID, RECORD_NUMBER, RECORD_TIME
from schemas.notification import TENANT_ID, canonical_time_ms, parse_rfc3339_ms, rfc3339_ms
from schemas.topics import ACD_STATS

try:  # the optional native decoding and rendering (processors/native, built by `make compile`)
    from processors import _native  # type: ignore[attr-defined]
except ImportError:
    _native = None

_OUTCOMES = {"answered": "a", "voicemail": "v", "abandoned": "b", "missed": "b", "no_answer": "b"}
"""An ACD call not answered (abandoned; missed or no_answer from another producer) is abandoned."""
WITHIN_SL, SHORT = 1, 2
QUARTER_MS = 900_000
_YEAR_2200_MS = 7_258_118_400_000


@dataclass(slots=True)
class AcdCall:
    """What the figures need of a call record."""

    tenant: str
    record_id: str
    revision: int
    is_acd: bool
    outcome: str
    """``a`` answered, ``b`` abandoned, ``v`` voicemail."""
    started_ms: int
    event_ms: int
    answered_ms: int | None
    wait_ms: int
    talk_ms: int
    callee: str
    redirecting: str | None
    legs: tuple[tuple[str, int | None, int | None], ...]
    """(agent line, connect ms, release ms), in the record's order (rung first, first)."""

    def __init__(self, tenant: str, record_id: str, revision: int, is_acd: bool, outcome: str,
                 started_ms: int, event_ms: int, answered_ms: int | None, wait_ms: int, talk_ms: int,
                 callee: str, redirecting: str | None,
                 legs: tuple[tuple[str, int | None, int | None], ...]) -> None:
        # Written out for mypyc, as Notification's; tests/unit/test_inits.py holds it to the fields.
        self.tenant = tenant
        self.record_id = record_id
        self.revision = revision
        self.is_acd = is_acd
        self.outcome = outcome
        self.started_ms = started_ms
        self.event_ms = event_ms
        self.answered_ms = answered_ms
        self.wait_ms = wait_ms
        self.talk_ms = talk_ms
        self.callee = callee
        self.redirecting = redirecting
        self.legs = legs


def _str(rec: dict[str, Any], name: str, pattern: re.Pattern[str], nullable: bool = False) -> Any:
    value = rec.get(name)
    if value is None and nullable:
        return None
    if type(value) is not str or not pattern.fullmatch(value):
        raise Invalid(f"{name}: {'missing or ' if value is None else ''}not a valid value")
    return value


def _time(rec: dict[str, Any], name: str, nullable: bool = True) -> int | None:
    value = rec.get(name)
    if value is None and nullable:
        return None
    # Most times are laid out as the call-records processor writes them, in a second seen before.
    if type(value) is str and (ms := canonical_time_ms(value)) is not None and 0 <= ms < _YEAR_2200_MS:
        return ms
    if type(value) is not str or not RECORD_TIME.fullmatch(value):
        raise Invalid(f"{name}: not an RFC 3339 UTC time")
    try:
        ms = parse_rfc3339_ms(value)
    except ValueError:
        raise Invalid(f"{name}: not a real date") from None
    if not 0 <= ms < _YEAR_2200_MS:
        raise Invalid(f"{name}: outside the years 1970-2199")
    return ms


def _seconds_ms(rec: dict[str, Any], name: str) -> int:
    value = rec.get(name)
    if (type(value) is not float and type(value) is not int) or not 0 <= value <= 864_000:
        raise Invalid(f"{name}: not a number of seconds between 0 and 864000")
    return round(value * 1000)


_KNOWN_TENANTS: set[bytes] = set()
"""Record keys already checked as tenant ids."""


def decode_record(key: bytes | None, value: bytes | None) -> AcdCall:
    """The call of a ``keyyo.call-record.v1`` record; :class:`Invalid` says which field is wrong.

    Every record is checked for what moves its tenant's clock (schema, tenant = key, ``is_acd``,
    its times); an ACD call also for everything its figures use.
    """
    rec = json_object(value, CALL_RECORD_SCHEMA)
    tenant = rec.get("tenant")
    if key is None or key not in _KNOWN_TENANTS:
        tenant = _str(rec, "tenant", TENANT_ID)
        if key is None or key != tenant.encode():
            raise Invalid(f"key: the record key must be the tenant {tenant!r}")
        if len(_KNOWN_TENANTS) < 100_000:
            _KNOWN_TENANTS.add(key)
    elif type(tenant) is not str or key != tenant.encode():
        raise Invalid(f"key: the record key must be the tenant {tenant!r}")
    is_acd = rec.get("is_acd")
    if is_acd is not True:
        if is_acd is not False:
            raise Invalid("is_acd: not a boolean")
        ended = _time(rec, "ended_at")
        at = ended if ended is not None else _time(rec, "started_at", nullable=False)
        return AcdCall(tenant, "", 0, False, "", at, at, None, 0, 0, "", None, ())  # type: ignore[arg-type]
    revision = rec.get("revision")
    if type(revision) is not int or not 1 <= revision <= 1_000_000:
        raise Invalid("revision: not an integer from 1")
    started = _time(rec, "started_at", nullable=False)
    ended = _time(rec, "ended_at")
    outcome = _OUTCOMES.get(rec.get("outcome"))  # type: ignore[arg-type]
    if outcome is None:
        raise Invalid(f"outcome: expected one of {', '.join(_OUTCOMES)}")
    legs_raw = rec.get("legs")
    if type(legs_raw) is not list or not legs_raw or len(legs_raw) > 1024:
        raise Invalid("legs: expected a list of 1 to 1024 legs")
    legs = []
    for i, leg in enumerate(legs_raw):
        if type(leg) is not dict:
            raise Invalid(f"legs[{i}]: not an object")
        try:
            line = _str(leg, "account", RECORD_NUMBER)
            connect = _time(leg, "connect_at")
            legs.append((line, connect, _time(leg, "release_at") if connect is not None else None))
        except Invalid as exc:
            raise Invalid(f"legs[{i}].{exc}") from None
    return AcdCall(
        tenant, _str(rec, "record_id", RECORD_ID), revision, True, outcome, started,  # type: ignore[arg-type]
        ended if ended is not None else started,  # type: ignore[arg-type]
        _time(rec, "answered_at"), _seconds_ms(rec, "wait_seconds"), _seconds_ms(rec, "talk_seconds"),
        _str(rec, "callee", RECORD_NUMBER), _str(rec, "redirecting_number", RECORD_NUMBER, nullable=True),
        tuple(legs))


class AcdStatsLogic:
    """The acd-stats logic (see the module docstring)."""

    def __init__(self, config: AcdConfig | None = None, *, native: Any = _native) -> None:
        """``native``: the native module (``processors._native`` when `make compile` built it), or
        None for Python alone. It decodes the records it can read with certainty, as
        :func:`decode_record` does; counts an ACD call seen for the first time as :meth:`on_event`
        does, staging the same entries; and writes the figures of intervals with the bytes orjson
        writes for :meth:`figures`. Python does the others (restatements, states it does not
        expect)."""
        self.config = config or AcdConfig()
        self._intervals: dict[tuple[str, int, int], int] = {}
        self._headers: dict[tuple[Any, ...], tuple[bytes, dict[str, Any], tuple[bytes, bytes, bytes]]] = {}
        self._native_decode = None if native is None else native.decode_call_record
        self._native_figures = None if native is None else native.Figures(COUNTS, SUMS, DERIVED)
        self._native_count = None if native is None else native.count_call

    def decode(self, key: bytes | None, value: bytes | None) -> AcdCall:
        """:func:`decode_record`, natively when the native module is there and reads the value."""
        if self._native_decode is not None and key is not None and value is not None:
            call: AcdCall | None = self._native_decode(key, value, CALL_RECORD_SCHEMA, AcdCall)
            if call is not None:
                return call
        return decode_record(key, value)

    @staticmethod
    def event_time_ms(call: AcdCall) -> int:
        """A record's time is when its call ended."""
        return call.event_ms

    @staticmethod
    def time_domain(call: AcdCall) -> str:
        """Each tenant has its own clock."""
        return call.tenant

    # -- intervals --------------------------------------------------------------------------

    def interval_start(self, ms: int, tc: TenantAcd) -> int:
        """:func:`~schemas.acd_stats.interval_start` in the tenant's zone, cached per UTC quarter."""
        key = (tc.timezone, tc.interval_minutes, ms // QUARTER_MS)
        start = self._intervals.get(key)
        if start is None:
            start = interval_start(ms, tc.zone, tc.interval_minutes)
            if start % QUARTER_MS == 0:  # the offset is whole quarters: a UTC quarter is in one interval
                if len(self._intervals) > 100_000:
                    self._intervals.clear()
                self._intervals[key] = start
        return start

    # -- events -----------------------------------------------------------------------------

    def on_event(self, store: Store, call: AcdCall, now_ms: int) -> list[Output]:
        """Count (or restate) one call in its interval; return the interval's new figures."""
        if not call.is_acd:
            return []
        t = call.tenant
        tc = self.config.tenant(t)
        kkey = f"k/{t}/{call.record_id}"
        raw = store.get(kkey)
        old = orjson.loads(raw) if raw is not None else None
        if old is not None and old[3] >= call.revision:
            return []  # this revision (or a later one) is already counted
        queue = tc.queue_of(call.callee, call.redirecting, [leg[0] for leg in call.legs])
        iv = self.interval_start(call.started_ms, tc)
        closed_at = iv + tc.interval_ms + tc.restate_ms
        if now_ms >= closed_at:
            raise Refused(f"the call started in the interval of {rfc3339_ms(iv)}, closed to "
                          f"restatement since {rfc3339_ms(closed_at)} (restate_hours "
                          f"{tc.restate_hours:g}); stream time is {rfc3339_ms(now_ms)}")
        akey = f"a/{t}/{queue}/{iv}"
        if old is None and self._native_count is not None:
            # Counted for the first time: natively, unless the interval's state or the call is
            # of a shape the native code does not expect (it then writes nothing).
            counted: bytes | None = self._native_count(
                store, call, kkey, akey, f"m/{t}/{queue}/{iv}/", queue, iv, tc.interval_minutes,
                iv + tc.interval_ms, tc.grace_ms, tc.restate_ms, tc.service_level_seconds * 1000,
                tc.short_abandon_seconds * 1000, now_ms)
            if counted is not None:
                interval = {"t": t, "q": queue, "iv": iv, "m": tc.interval_minutes}
                return [Output(ACD_STATS.name, self._header(interval, tc)[0],
                               functools.partial(self._render_stored, counted, interval, tc, now_ms),
                               latest=True)]
        contribution = self._contribution(call, tc, queue, iv)
        outputs: list[Output] = []
        agg = self._load(store, akey)
        if old is not None and old[0] == queue and old[1] == iv and agg is not None:
            contribution[2] = old[2]
            self._apply(agg, old, -1)
        else:
            if old is not None:
                outputs.extend(self._withdraw(store, t, old, tc, now_ms))
            if agg is None:
                agg = self._new_interval(store, akey, t, queue, iv, tc, now_ms)
            contribution[2] = agg["n"]
            store.put(f"m/{t}/{queue}/{iv}/{agg['n']}", call.record_id.encode())
            agg["n"] += 1
        store.put(kkey, orjson.dumps(contribution))
        self._apply(agg, contribution, +1)
        outputs.append(self._emit(store, akey, agg, tc, now_ms))
        return outputs

    @staticmethod
    def _contribution(call: AcdCall, tc: TenantAcd, queue: str, iv: int) -> list[Any]:
        o, w = call.outcome, call.wait_ms
        flags = 0
        if o != "v" and w <= tc.service_level_seconds * 1000:
            flags |= WITHIN_SL
        if o == "b" and w < tc.short_abandon_seconds * 1000:
            flags |= SHORT
        agents: dict[str, list[int]] = {}
        voicemail_at = call.answered_ms if o == "v" else None
        for line, connect, release in call.legs:
            a = agents.setdefault(line, [0, 0, 0])
            a[0] += 1
            if connect is not None and connect != voicemail_at:
                a[1] += 1
                if release is not None:
                    a[2] += max(0, release - connect)
        return [queue, iv, 0, call.revision, o, w, call.talk_ms if o == "a" else 0, flags,
                [[line, *a] for line, a in agents.items()]]

    @staticmethod
    def _apply(agg: dict[str, Any], c: list[Any], sign: int) -> None:
        """Add (sign 1) or take away (sign -1) one call's contribution."""
        counts, sums = agg["c"], agg["s"]
        _, _, _, _, o, w, talk, flags, agents = c
        counts[0] += sign
        sums[0] += sign * w
        if o == "a":
            counts[1] += sign
            sums[1] += sign * w
            sums[3] += sign * talk
            if flags & WITHIN_SL:
                counts[5] += sign
        elif o == "b":
            counts[2] += sign
            sums[2] += sign * w
            if flags & SHORT:
                counts[4] += sign
            if flags & WITHIN_SL:
                counts[6] += sign
        else:
            counts[3] += sign
        if sign > 0:
            if agg["mx"] is not None:
                agg["mx"] = max(agg["mx"], w)
        elif w >= agg["mx"]:
            agg["mx"] = None  # recomputed from the members before the figures are written
        ag = agg["ag"]
        for line, offered, answered, talk_ms in agents:
            a = ag.setdefault(line, [0, 0, 0])
            a[0] += sign * offered
            a[1] += sign * answered
            a[2] += sign * talk_ms
            if a[0] <= 0:
                del ag[line]

    def _withdraw(self, store: Store, t: str, old: list[Any], tc: TenantAcd, now_ms: int) -> list[Output]:
        """Take a restated call out of the interval (or queue) it was counted in."""
        okey = f"a/{t}/{old[0]}/{old[1]}"
        oagg = self._load(store, okey)
        if oagg is None:
            return []  # that interval was forgotten already
        self._apply(oagg, old, -1)
        store.delete(f"m/{t}/{old[0]}/{old[1]}/{old[2]}")
        return [self._emit(store, okey, oagg, tc, now_ms)]

    def _new_interval(self, store: Store, akey: str, t: str, queue: str, iv: int, tc: TenantAcd,
                      now_ms: int) -> dict[str, Any]:
        end = iv + tc.interval_ms
        final = now_ms >= end + tc.grace_ms
        store.wake(akey, end + (tc.restate_ms if final else tc.grace_ms))
        return {"t": t, "q": queue, "iv": iv, "m": tc.interval_minutes, "rev": 0, "final": final,
                "n": 0, "c": [0] * len(COUNTS), "s": [0] * len(SUMS), "mx": -1, "ag": {}}

    # -- timers -----------------------------------------------------------------------------

    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        """An interval's end + grace (it becomes final) or end + restatement window (forgotten)."""
        agg = self._load(store, key)
        if agg is None:
            return []
        tc = self.config.tenant(agg["t"])
        end = agg["iv"] + agg["m"] * 60_000
        if not agg["final"]:
            final_at = end + tc.grace_ms
            if now_ms < final_at:
                store.wake(key, final_at)
                return []
            agg["final"] = True
            store.wake(key, end + tc.restate_ms)
            return [self._emit(store, key, agg, tc, now_ms)]
        forget_at = end + tc.restate_ms
        if now_ms < forget_at:
            store.wake(key, forget_at)
            return []
        self._forget(store, agg)
        store.delete(key)
        return []

    @staticmethod
    def _members(store: Store, agg: dict[str, Any]) -> Iterator[tuple[str, str, list[Any] | None]]:
        """Each slot of the interval still listing a call: its key, the call's contribution key,
        and the contribution if it is still counted here (None once restated elsewhere)."""
        t, q, iv = agg["t"], agg["q"], agg["iv"]
        for slot in range(agg["n"]):
            mkey = f"m/{t}/{q}/{iv}/{slot}"
            if (rid := store.get(mkey)) is None:
                continue
            kkey = f"k/{t}/{rid.decode()}"
            raw = store.get(kkey)
            c = orjson.loads(raw) if raw is not None else None
            yield mkey, kkey, c if c is not None and c[0] == q and c[1] == iv else None

    def _forget(self, store: Store, agg: dict[str, Any]) -> None:
        for mkey, kkey, contribution in list(self._members(store, agg)):
            if contribution is not None:
                store.delete(kkey)
            store.delete(mkey)

    # -- state and output -------------------------------------------------------------------

    @staticmethod
    def _load(store: Store, key: str) -> dict[str, Any] | None:
        raw = store.get(key)
        return orjson.loads(raw) if raw is not None else None

    def _max_wait(self, store: Store, agg: dict[str, Any]) -> int:
        """The longest wait among the interval's calls, read from their contributions."""
        return max((c[5] for _, _, c in self._members(store, agg) if c is not None), default=-1)

    def _emit(self, store: Store, key: str, agg: dict[str, Any], tc: TenantAcd, now_ms: int) -> Output:
        if agg["mx"] is None:
            agg["mx"] = self._max_wait(store, agg)
        agg["rev"] += 1
        store.put(key, orjson.dumps(agg))
        record_key = self._header(agg, tc)[0]
        # Rendered only if no later change of this interval follows in the same transaction;
        # ``agg`` is not touched again (each record loads its own copy), so it is a snapshot.
        return Output(ACD_STATS.name, record_key,
                      functools.partial(self._render, agg, tc, now_ms), latest=True)

    def _render(self, agg: dict[str, Any], tc: TenantAcd, now_ms: int) -> bytes:
        return self._render_natively(agg, agg, tc, now_ms) or orjson.dumps(self.figures(agg, tc, now_ms))

    def _render_stored(self, raw: bytes, interval: dict[str, Any], tc: TenantAcd, now_ms: int) -> bytes:
        """:meth:`_render` of an interval's state as the store holds it (the native count's)."""
        # What the native code leaves, Python writes (the same bytes): no second native attempt.
        return (self._render_natively(raw, interval, tc, now_ms)
                or orjson.dumps(self.figures(orjson.loads(raw), tc, now_ms)))

    def _render_natively(self, state: dict[str, Any] | bytes, interval: dict[str, Any], tc: TenantAcd,
                         now_ms: int) -> bytes | None:
        """The figures of ``interval`` written natively from its state (a dict, or the JSON the
        store holds); None without the native module or for a state it leaves to Python."""
        if self._native_figures is None:
            return None
        head, middle, tail = self._header(interval, tc)[2]
        rendered: bytes | None = self._native_figures.render(
            head, state, now_ms, tc.service_level_formula, tc.exclude_short_abandons, middle, tail)
        return rendered

    def _header(self, agg: dict[str, Any],
                tc: TenantAcd) -> tuple[bytes, dict[str, Any], tuple[bytes, bytes, bytes]]:
        """The record key, the fields that never change for an interval, and the parts of its
        value the native rendering copies: those fields as the start of a JSON object, then the
        service-level settings and the thresholds as members, each followed by a comma (cached)."""
        t, q, iv, minutes = agg["t"], agg["q"], agg["iv"], agg["m"]
        cache_key = (t, q, iv, minutes, tc)
        cached = self._headers.get(cache_key)
        if cached is None:
            start = rfc3339_ms(iv)
            local = datetime.fromtimestamp(iv / 1000, UTC).astimezone(tc.zone)
            header = {
                "schema": ACD_STATS_SCHEMA, "tenant": t, "queue": q, "interval_start": start,
                "interval_end": rfc3339_ms(iv + minutes * 60_000), "interval_minutes": minutes,
                "timezone": tc.timezone, "local_start": local.isoformat()}
            settings = {"service_level_formula": tc.service_level_formula,
                        "short_abandons_excluded": tc.exclude_short_abandons}
            thresholds = {"service_level_seconds": tc.service_level_seconds,
                          "short_abandon_seconds": tc.short_abandon_seconds}
            cached = (stats_key(t, q, start), header, (
                orjson.dumps(header)[:-1] + b",", orjson.dumps(settings)[1:-1] + b",",
                orjson.dumps(thresholds)[1:-1] + b","))
            if len(self._headers) > 50_000:
                self._headers.clear()
            self._headers[cache_key] = cached
        return cached

    def figures(self, agg: dict[str, Any], tc: TenantAcd, now_ms: int) -> dict[str, Any]:
        """The ``keyyo.acd-stats.v1`` value of an interval (the specification of the native
        rendering, which ``tests/unit/test_native.py`` holds to the same bytes)."""
        header = self._header(agg, tc)[1]
        f: dict[str, Any] = dict(zip(COUNTS, agg["c"], strict=True))
        f.update((name, ms / 1000) for name, ms in zip(SUMS, agg["s"], strict=True))
        f["service_level_formula"] = tc.service_level_formula
        f["short_abandons_excluded"] = tc.exclude_short_abandons
        return {
            **header, "revision": agg["rev"], "final": agg["final"], "updated_at": rfc3339_ms(now_ms),
            **f, **derived(f),
            "service_level_seconds": tc.service_level_seconds,
            "short_abandon_seconds": tc.short_abandon_seconds,
            "max_wait_seconds": agg["mx"] / 1000 if agg["mx"] >= 0 else None,
            "agents": [{"line": line, "offered": a[0], "answered": a[1], "missed": a[0] - a[1],
                        "talk_seconds": a[2] / 1000} for line, a in sorted(agg["ag"].items())],
        }
