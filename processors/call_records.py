"""Call records: correlate a tenant's dialogs (legs) into calls; pure, no I/O.

``CallRecords.on_event(store, notification, now_ms)`` and ``on_timer(store, key, now_ms)`` read
and stage state in a :class:`~processors.state.Store` and return the outputs to write. Time is
event time (ms); ``now_ms`` is the partition's stream time.

State keys (per tenant ``t``): ``c/t/<call id>`` the call (:func:`pack_call`); ``i/t/d/<dref>``,
``i/t/s/<session>``, ``i/t/c/<callref>`` indexes to the call. Legs sharing a session, a callref, or linked by
DREF_REPLACE -> DREF are one call. A call's id is derived from the DREF of its first leg
(:func:`_call_id`), so that DREF needs no index entry: a DREF without one is looked up as the
call of its derived id (an entry is written for it only once its call is merged into another).

Notifications without a DREF (Keyyo's minimal URL template) are paired by line and numbers in
arrival order: ``p/t/<line> <caller> <callee>`` holds the open legs of that line and pair of
numbers, oldest first, and the short ids of the last notifications seen there (duplicates). A
SETUP opens a leg; CONNECT and RELEASE go to the oldest open leg (CONNECT to the oldest not yet
connected; a CONNECT by voicemail, whose callee is a 22-digit answering number, counts as one to
the line itself). Such a leg gets an internal id (a space and the event id, which no DREF can be), is
shown with a null ``dref``, and its record says ``correlation: approximate``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from processors.contract import Invalid, Output, Refused, Store
from schemas.call_record import CALL_RECORD_SCHEMA, CALL_UPDATE_SCHEMA
from schemas.notification import (
    ContractViolation,
    Notification,
    notification_from_json,
    parse_rfc3339_ms,
    rfc3339_ms,
)
from schemas.topics import CALL_RECORDS, CALL_UPDATES

try:  # the optional native fold (processors/native, built by `make compile`)
    from processors import _native  # type: ignore[attr-defined]
except ImportError:
    _native = None


class NativeEvent(Protocol):
    """A notification as the native fold decodes it (``processors._native.Event``): the record's
    value and where each field is in it, not yet a :class:`Notification`. Its other attributes are
    the notification's (``event.caller``...: made on first use), so code that reads a decoded
    notification's fields reads an event alike; ``isinstance`` and ``dataclasses.replace`` need
    ``notification()``."""

    @property
    def tenant(self) -> str: ...
    @property
    def event_ms(self) -> int:
        """``parse_rfc3339_ms(event_time)``."""
        ...
    def notification(self) -> Notification:
        """The :class:`Notification` Python makes of the same value (made once, on first use)."""
        ...


Event = Notification | NativeEvent
"""What :meth:`CallRecords.decode` returns: the native fold's event when the compiled build read
the value, else the :class:`Notification`."""

Call = dict[str, Any]
Leg = list[Any]
"""A leg, in state and here: a list, its fields at the positions below (named once, in the code)."""
(DREF, CALLREF, ACCOUNT, CALLER, CALLEE, SETUP_AT, CONNECT_AT, RELEASE_AT, REPLACES, SESSION_ID, IS_ACD,
 REDIRECTING, FIRST_AT, VOICEMAIL, APPROX) = range(15)


@dataclass(frozen=True)
class CallRecordsConfig:
    """Closing rules, in event-time milliseconds."""

    linger_ms: int = 10_000
    """After the last leg is released, wait this long for a new leg before closing."""
    ring_timeout_ms: int = 300_000
    """A leg that rings this long without CONNECT or RELEASE is given up."""
    max_duration_ms: int = 4 * 3600_000
    """A connected leg without RELEASE after this long is given up."""
    retention_ms: int = 600_000
    """A closed call stays this long so late events restate it (revision + 1)."""
    max_legs: int = 64
    """A call holds at most this many legs: an event that would add (or merge in) more is refused
    and dead-lettered, and the call stops growing."""
    max_events: int = 256
    """A call folds at most this many distinct notifications; later ones are refused likewise."""
    decoded_calls: int = 16_384
    """The compiled build's native fold keeps at most this many calls decoded between their
    events (≈ 1.4 KB each; past it, it forgets them all and reads their values again); 0 keeps
    none. Without the native fold, unused."""


_LEG_FIELDS = ("dref", "callref", "account", "caller", "callee", "setup_at", "connect_at", "release_at",
               "replaces", "session_id", "is_acd", "redirecting_number", "first_at", "voicemail", "approx")
"""The names of a leg's positions (those of the object form written before the compact one)."""


def pack_call(call: Call) -> bytes:
    """A call's state value: a JSON array, legs as arrays (field names once, in the code, not in
    every value: ≈ 200 bytes for a one-leg call instead of ≈ 540); its id and tenant are in its key."""
    return orjson.dumps([
        1, call["revision"], call["closed"], call["closed_by"], call["closed_at"], call["last_event"],
        call["events"], list(call["legs"].values())])


def unpack_call(raw: bytes, tenant: str, call_id: str) -> Call:
    """The call of a state value (also of the object form written before the compact one)."""
    data = orjson.loads(raw)
    if type(data) is dict:
        data["legs"] = {dref: [leg.get(name, False) for name in _LEG_FIELDS]
                        for dref, leg in data["legs"].items()}
        return data
    _, revision, closed, closed_by, closed_at, last_event, events, legs = data
    return {"id": call_id, "tenant": tenant, "legs": {leg[DREF]: leg for leg in legs},
            "events": events, "closed": closed, "revision": revision, "closed_by": closed_by,
            "closed_at": closed_at, "last_event": last_event}


def _call_id(tenant: str, dref: str) -> str:
    return hashlib.sha256(f"{tenant}\x1f{dref}".encode()).hexdigest()[:32]


def _secs(start: int | None, end: int | None) -> float:
    if start is None or end is None:
        return 0.0
    return round(max(0, end - start) / 1000, 3)


def _iso(ms: int | None) -> str | None:
    return rfc3339_ms(ms) if ms is not None else None


class CallRecords:
    """The call-records logic."""

    def __init__(self, config: CallRecordsConfig | None = None, *, native: Any = _native) -> None:
        """``native``: the native fold's module (``processors._native`` when `make compile` built
        it), or None for Python alone. It decodes values laid out as the edge writes them, does the
        common case of :meth:`on_event` (a DREF, at most one call, within its bounds) and the
        timers of calls, byte for byte as the Python below; Python does the rest."""
        self.config = cfg = config or CallRecordsConfig()
        self._native = None if native is None else native.Fold(
            cfg.linger_ms, cfg.ring_timeout_ms, cfg.max_duration_ms, cfg.retention_ms, cfg.max_legs,
            cfg.max_events, CALL_UPDATES.name, CALL_UPDATE_SCHEMA, CALL_RECORDS.name, CALL_RECORD_SCHEMA,
            Output, Notification, cfg.decoded_calls)

    # -- input --------------------------------------------------------------------------

    def decode(self, key: bytes | None, value: bytes | None) -> Event:
        """A notification from its record, checked against the contract; :class:`Invalid` if not."""
        if self._native is not None and key is not None and value is not None:
            # A value laid out as the edge writes it, keyed by its tenant: read natively, and made
            # a Notification only if Python folds it.
            event: NativeEvent | None = self._native.decode(key, value)
            if event is not None:
                return event
        if value is None:
            raise Invalid("value: missing (a tombstone)")
        try:
            n = notification_from_json(value)
        except ContractViolation as exc:
            raise Invalid(str(exc)) from None
        if key is None or key != n.tenant.encode():
            # Key = tenant keeps a tenant's calls on one partition; another key would split them.
            raise Invalid(f"key: the record key must be the tenant {n.tenant!r}")
        return n

    @staticmethod
    def event_time_ms(n: Event) -> int:
        """Event time of a notification."""
        if isinstance(n, Notification):
            return parse_rfc3339_ms(n.event_time)
        return n.event_ms

    @staticmethod
    def time_domain(n: Event) -> str:
        """Each tenant has its own clock: its early or late traffic only moves its own calls."""
        return n.tenant

    # -- events -------------------------------------------------------------------------

    def on_event(self, store: Store, event: Event, now_ms: int) -> list[Output]:
        """Fold one notification into its call; return the call update (and a restated record)."""
        if self._native is not None:
            done: list[Output] | None = self._native.on_event(store, event)
            if done is not None:
                return done
        n = event if isinstance(event, Notification) else event.notification()
        t = n.tenant
        approximate = n.dref is None
        if approximate:
            paired = self._pair(store, n)
            if paired is None:
                return []  # a duplicate delivery
            n = replace(n, dref=paired)
        dref: str = n.dref  # type: ignore[assignment]
        own_id = _call_id(t, dref)
        own_key = f"i/{t}/d/{dref}"
        index_keys = [own_key]
        if n.dref_replace:
            index_keys.append(f"i/{t}/d/{n.dref_replace}")
        if n.session_id:
            index_keys.append(f"i/{t}/s/{n.session_id}")
        if n.callref:
            index_keys.append(f"i/{t}/c/{n.callref}")
        pointed: dict[str, str] = {}  # index key -> the call it leads to
        found: dict[str, bytes | None] = {}  # call id -> its state, once read
        for key in index_keys:
            raw = store.get(key)
            if raw is not None:
                call_id = pointed[key] = raw.decode()
                if call_id not in found:
                    found[call_id] = None
            elif key[len(t) + 3] == "d":  # a DREF without an entry: the call its id derives
                call_id = own_id if key is own_key else _call_id(t, key[len(t) + 5:])
                state = found.get(call_id) or store.get(f"c/{t}/{call_id}")
                if state is not None:
                    pointed[key] = call_id
                    found[call_id] = state
        calls = []
        for call_id, state in found.items():
            if state is None:
                state = store.get(f"c/{t}/{call_id}")
            if state is not None:
                calls.append(unpack_call(state, t, call_id))
        self._check_bounds(calls, dref)
        if not calls:
            call = self._new_call(t, own_id)
        else:
            call = self._merge(store, calls) if len(calls) > 1 else calls[0]
        events = call["events"]
        short_id = n.event_id[:12]
        if short_id in events:
            return []  # an exact duplicate
        if len(events) >= self.config.max_events:
            raise Refused(f"the call already holds {len(events)} events, max_events is "
                          f"{self.config.max_events}")
        events.append(short_id)
        event_ms = parse_rfc3339_ms(n.event_time)
        leg = self._fold(call, n, dref, event_ms)
        if approximate:
            leg[APPROX] = True
        call["closed"] = False  # if it was closed, the next close restates it with revision + 1
        call_id = call["id"]
        for key in index_keys:  # entries already leading here cost no changelog write
            if pointed.get(key) != call_id and not (key is own_key and own_id == call_id):
                store.put(key, call_id.encode())
        self._save(store, call)
        self._arm(store, call)
        return [self._update(call, n.event_id, event_ms)]

    MAX_PAIRING = 64
    """Open legs (and recent notifications) kept per line and pair of numbers without a DREF."""

    def _pair(self, store: Store, n: Notification) -> str | None:
        """The internal leg id of a notification without a DREF; None for a duplicate."""
        callee = n.callee
        if n.type == "CONNECT" and len(callee) == 22 and callee.isdigit():
            callee = n.account  # voicemail answers a call to the line with its own number
        key = f"p/{n.tenant}/{n.account} {n.caller} {callee}"
        raw = store.get(key)
        pairing: dict[str, list[Any]] = orjson.loads(raw) if raw is not None else {"open": [], "seen": []}
        short = n.event_id[:12]
        if short in pairing["seen"]:
            return None
        pairing["seen"] = [*pairing["seen"][-(self.MAX_PAIRING - 1):], short]
        opened = pairing["open"]
        own = f" {n.event_id}"
        if n.type == "SETUP":
            leg = own
            opened.append([own, False])
        elif n.type == "CONNECT":
            target = next((o for o in opened if not o[1]), opened[0] if opened else None)
            if target is None:  # CONNECT before its SETUP: a leg of its own, still open
                opened.append([own, True])
                leg = own
            else:
                target[1] = True
                leg = target[0]
        else:
            leg = opened.pop(0)[0] if opened else own
        del opened[:-self.MAX_PAIRING]
        store.put(key, orjson.dumps(pairing))
        # Forgotten once every leg it could still pair would have been given up.
        store.wake(key, parse_rfc3339_ms(n.event_time) + self.config.max_duration_ms
                   + self.config.retention_ms)
        return leg

    def _check_bounds(self, calls: list[Call], dref: str) -> None:
        if len(calls) == 1 and len(calls[0]["legs"]) < self.config.max_legs:
            return  # the common case: one call, room for one more leg
        legs = {d for c in calls for d in c["legs"]}
        legs.add(dref)
        if len(legs) > self.config.max_legs:
            raise Refused(f"the call would hold {len(legs)} legs, more than max_legs "
                          f"{self.config.max_legs}")

    @staticmethod
    def _new_call(tenant: str, call_id: str) -> Call:
        return {"id": call_id, "tenant": tenant, "legs": {}, "events": [],
                "closed": False, "revision": 0, "closed_by": None, "closed_at": None,
                "last_event": None}

    @staticmethod
    def _fold(call: Call, n: Notification, dref: str, event_ms: int) -> Leg:
        legs = call["legs"]
        leg: Leg | None = legs.get(dref)
        if leg is None:
            new: Leg = [dref, n.callref, n.account, n.caller, n.callee, None, None, None,
                        n.dref_replace, n.session_id, n.is_acd, n.redirecting_number, event_ms, False, False]
            leg = legs[dref] = new
        kind = n.type
        if kind == "SETUP":
            # SETUP describes the dialog best: its values win over those of an earlier CONNECT.
            leg[CALLREF], leg[CALLER], leg[CALLEE] = n.callref, n.caller, n.callee
            leg[REPLACES] = n.dref_replace or leg[REPLACES]
            if leg[SETUP_AT] is None or event_ms < leg[SETUP_AT]:
                leg[SETUP_AT] = event_ms
        elif kind == "CONNECT":
            if leg[CONNECT_AT] is None or event_ms < leg[CONNECT_AT]:
                leg[CONNECT_AT] = event_ms
            answering = n.callee if n.callee != n.account else ""
            if len(answering) == 22 and answering.isdigit():
                leg[VOICEMAIL] = True
        elif leg[RELEASE_AT] is None or event_ms > leg[RELEASE_AT]:
            leg[RELEASE_AT] = event_ms
        if event_ms < leg[FIRST_AT]:
            leg[FIRST_AT] = event_ms
        leg[SESSION_ID] = leg[SESSION_ID] or n.session_id
        leg[IS_ACD] = leg[IS_ACD] or n.is_acd
        leg[REDIRECTING] = leg[REDIRECTING] or n.redirecting_number
        if call["last_event"] is None or event_ms > call["last_event"]:
            call["last_event"] = event_ms
        return leg

    def _merge(self, store: Store, calls: list[Call]) -> Call:
        """Several calls turn out to be one: keep the earliest, fold the others into it."""
        calls.sort(key=lambda c: (min(leg[FIRST_AT] for leg in c["legs"].values()), c["id"]))
        keep = calls[0]
        for other in calls[1:]:
            for dref, leg in other["legs"].items():
                keep["legs"].setdefault(dref, leg)
            keep["events"].extend(e for e in other["events"] if e not in keep["events"])
            keep["revision"] = max(keep["revision"], other["revision"])
            if other["last_event"] is not None:
                keep["last_event"] = max(keep["last_event"] or 0, other["last_event"])
            for key in self._index_keys(other):  # the merged call's own DREF too: its id is gone
                store.put(key, keep["id"].encode())
            store.delete(f"c/{other['tenant']}/{other['id']}")
            store.unwake(f"c/{other['tenant']}/{other['id']}")
        keep["closed"] = False
        return keep

    # -- timers -------------------------------------------------------------------------

    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        """Close a call whose time has come, or forget a closed one after its retention (or forget
        the pairing of legs without a DREF of a quiet line)."""
        if self._native is not None:
            done: list[Output] | None = self._native.on_timer(store, key, now_ms)
            if done is not None:
                return done
        raw = store.get(key)
        if raw is None:
            return []
        if key.startswith("p/"):
            store.delete(key)
            return []
        _, tenant, call_id = key.split("/", 2)
        call = unpack_call(raw, tenant, call_id)
        cfg = self.config
        if call["closed"]:
            if now_ms >= call["closed_at"] + cfg.retention_ms:
                for index in self._index_keys(call):
                    if store.get(index) == call["id"].encode():
                        store.delete(index)
                store.delete(key)
            else:
                store.wake(key, call["closed_at"] + cfg.retention_ms)
            return []
        closing = self._closing(call, now_ms)
        if closing is None:
            self._arm(store, call)
            return []
        call["closed"] = True
        call["closed_by"] = closing
        call["closed_at"] = now_ms
        call["revision"] += 1
        record = self.record(call)
        self._save(store, call)
        store.wake(key, now_ms + cfg.retention_ms)
        return [Output(CALL_RECORDS.name, call["tenant"].encode(), orjson.dumps(record))]

    def _deadline(self, leg: Leg) -> int:
        if leg[CONNECT_AT] is not None:
            return int(leg[CONNECT_AT]) + self.config.max_duration_ms
        start = leg[SETUP_AT] if leg[SETUP_AT] is not None else leg[FIRST_AT]
        return int(start) + self.config.ring_timeout_ms

    def _wake_at(self, call: Call) -> int:
        legs = call["legs"].values()
        open_legs = [leg for leg in legs if leg[RELEASE_AT] is None]
        if not open_legs:
            return int(max(leg[RELEASE_AT] for leg in legs)) + self.config.linger_ms
        return max(self._deadline(leg) for leg in open_legs)

    def _closing(self, call: Call, now_ms: int) -> str | None:
        if now_ms < self._wake_at(call):
            return None
        return "timeout" if any(leg[RELEASE_AT] is None for leg in call["legs"].values()) else "release"

    def _arm(self, store: Store, call: Call) -> None:
        store.wake(f"c/{call['tenant']}/{call['id']}", self._wake_at(call))

    # -- state --------------------------------------------------------------------------

    def _load(self, store: Store, tenant: str, call_id: str) -> Call | None:
        raw = store.get(f"c/{tenant}/{call_id}")
        return unpack_call(raw, tenant, call_id) if raw is not None else None

    def _save(self, store: Store, call: Call) -> None:
        store.put(f"c/{call['tenant']}/{call['id']}", pack_call(call))

    @staticmethod
    def _index_keys(call: Call) -> list[str]:
        t = call["tenant"]
        keys: list[str] = []
        for leg in call["legs"].values():
            keys.append(f"i/{t}/d/{leg[DREF]}")
            if leg[REPLACES]:
                keys.append(f"i/{t}/d/{leg[REPLACES]}")
            if leg[SESSION_ID]:
                keys.append(f"i/{t}/s/{leg[SESSION_ID]}")
            if leg[CALLREF]:
                keys.append(f"i/{t}/c/{leg[CALLREF]}")
        return keys

    # -- outputs ------------------------------------------------------------------------

    @staticmethod
    def _ordered_legs(call: Call) -> list[Leg]:
        legs = list(call["legs"].values())
        if len(legs) > 1:
            legs.sort(key=lambda leg: (leg[SETUP_AT] if leg[SETUP_AT] is not None else leg[FIRST_AT],
                                       leg[DREF]))
        return legs

    def _update(self, call: Call, event_id: str, event_ms: int) -> Output:
        legs = self._ordered_legs(call)
        first = legs[0]
        if len(legs) == 1:  # most updates: one leg, no search
            state = ("ended" if first[RELEASE_AT] is not None
                     else "answered" if first[CONNECT_AT] is not None else "ringing")
            is_acd, session_id = first[IS_ACD], first[SESSION_ID] or None
        else:
            if all(leg[RELEASE_AT] is not None for leg in legs):
                state = "ended"
            elif any(leg[CONNECT_AT] is not None for leg in legs):
                state = "answered"
            else:
                state = "ringing"
            is_acd = any(leg[IS_ACD] for leg in legs)
            session_id = next((leg[SESSION_ID] for leg in legs if leg[SESSION_ID]), None)
        update = {
            "schema": CALL_UPDATE_SCHEMA, "call_id": call["id"], "tenant": call["tenant"],
            "state": state, "caller": first[CALLER], "callee": first[CALLEE],
            "is_acd": is_acd, "session_id": session_id,
            "updated_at": rfc3339_ms(event_ms), "event_id": event_id,
            "legs": [self._leg_out(leg) for leg in legs],
        }
        return Output(CALL_UPDATES.name, call["tenant"].encode(), orjson.dumps(update))

    @staticmethod
    def _leg_out(leg: Leg) -> dict[str, Any]:
        setup_at, connect_at, release_at = leg[SETUP_AT], leg[CONNECT_AT], leg[RELEASE_AT]
        return {
            "dref": None if leg[APPROX] else leg[DREF], "callref": leg[CALLREF],
            "account": leg[ACCOUNT], "caller": leg[CALLER], "callee": leg[CALLEE],
            "setup_at": None if setup_at is None else rfc3339_ms(setup_at),
            "connect_at": None if connect_at is None else rfc3339_ms(connect_at),
            "release_at": None if release_at is None else rfc3339_ms(release_at),
            "replaces": leg[REPLACES],
        }

    def record(self, call: Call) -> dict[str, Any]:
        """The call record of a closed call (definitions in the README)."""
        legs = self._ordered_legs(call)
        first = legs[0]
        accounts = {leg[ACCOUNT] for leg in legs}
        setups = [leg[SETUP_AT] for leg in legs if leg[SETUP_AT] is not None]
        started = min(setups) if setups else min(leg[FIRST_AT] for leg in legs)
        connected = sorted((leg for leg in legs if leg[CONNECT_AT] is not None),
                           key=lambda leg: (leg[CONNECT_AT], leg[DREF]))
        answered = connected[0][CONNECT_AT] if connected else None
        releases = [leg[RELEASE_AT] for leg in legs if leg[RELEASE_AT] is not None]
        if call["closed_by"] == "release" or not releases:
            ended = max(releases) if releases else call["last_event"]
        else:
            ended = call["last_event"]
        is_acd = any(leg[IS_ACD] for leg in legs)
        if first[CALLER] in accounts and first[CALLEE] in accounts:
            direction = "internal"
        elif first[CALLER] == first[ACCOUNT] and first[CALLEE] != first[ACCOUNT]:
            direction = "outbound"
        else:
            direction = "inbound"
        if connected:
            outcome = "voicemail" if connected[0][VOICEMAIL] else "answered"
        elif is_acd:
            outcome = "abandoned"
        elif direction == "outbound":
            outcome = "no_answer"
        else:
            outcome = "missed"
        answered_by = connected[0][ACCOUNT] if connected and not connected[0][VOICEMAIL] else None
        return {
            "schema": CALL_RECORD_SCHEMA, "record_id": call["id"], "tenant": call["tenant"],
            "revision": call["revision"], "direction": direction, "outcome": outcome,
            "caller": first[CALLER], "callee": first[CALLEE], "answered_by": answered_by,
            "started_at": _iso(started), "answered_at": _iso(answered), "ended_at": _iso(ended),
            "wait_seconds": _secs(started, answered if answered is not None else ended),
            "talk_seconds": _secs(answered, ended) if answered is not None else 0.0,
            "duration_seconds": _secs(started, ended),
            "is_acd": is_acd,
            "session_id": next((leg[SESSION_ID] for leg in legs if leg[SESSION_ID]), None),
            "transferred": any(leg[REPLACES] for leg in legs),
            "redirecting_number": next((leg[REDIRECTING] for leg in legs if leg[REDIRECTING]), None),
            "legs": [self._leg_out(leg) for leg in legs],
            "closed_by": call["closed_by"],
            "correlation": "approximate" if any(leg[APPROX] for leg in legs) else "exact",
        }
