"""Call records: correlate a tenant's dialogs (legs) into calls; pure, no I/O.

``CallRecords.on_event(store, notification, now_ms)`` and ``on_timer(store, key, now_ms)`` read
and stage state in a :class:`~processors.state.Store` and return the outputs to write. Time is
event time (ms); ``now_ms`` is the partition's stream time.

State keys (per tenant ``t``): ``c/t/<call id>`` the call (:func:`pack_call`); ``i/t/d/<dref>``,
``i/t/s/<session>``, ``i/t/c/<callref>`` indexes to the call. Legs sharing a session, a callref, or linked by
DREF_REPLACE -> DREF are one call.

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
import operator
from dataclasses import dataclass, replace
from typing import Any

import orjson

from processors.contract import Invalid, Output, Refused, Store
from schemas.call_record import CALL_RECORD_SCHEMA, CALL_UPDATE_SCHEMA
from schemas.notification import (
    ContractViolation,
    Notification,
    notification_from_wire,
    parse_rfc3339_ms,
    rfc3339_ms,
)
from schemas.topics import CALL_RECORDS, CALL_UPDATES

Call = dict[str, Any]
Leg = dict[str, Any]


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


_LEG_FIELDS = ("dref", "callref", "account", "caller", "callee", "setup_at", "connect_at", "release_at",
               "replaces", "session_id", "is_acd", "redirecting_number", "first_at", "voicemail", "approx")


_LEG_VALUES = operator.itemgetter(*_LEG_FIELDS[:-1])


def pack_call(call: Call) -> bytes:
    """A call's state value: a JSON array, legs as arrays (field names once, in the code, not in
    every value: ≈ 200 bytes for a one-leg call instead of ≈ 540); its id and tenant are in its key."""
    return orjson.dumps([
        1, call["revision"], call["closed"], call["closed_by"], call["closed_at"], call["last_event"],
        call["events"], [(*_LEG_VALUES(leg), leg.get("approx", False)) for leg in call["legs"].values()]])


def unpack_call(raw: bytes, tenant: str, call_id: str) -> Call:
    """The call of a state value (also of the object form written before the compact one)."""
    data = orjson.loads(raw)
    if type(data) is dict:
        return data
    _, revision, closed, closed_by, closed_at, last_event, events, legs = data
    fields = _LEG_FIELDS
    return {"id": call_id, "tenant": tenant, "legs": {leg[0]: dict(zip(fields, leg))  # noqa: B905 - packed by pack_call
                                                      for leg in legs},
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

    def __init__(self, config: CallRecordsConfig | None = None) -> None:
        self.config = config or CallRecordsConfig()

    # -- input --------------------------------------------------------------------------

    @staticmethod
    def decode(key: bytes | None, value: bytes | None) -> Notification:
        """A notification from its record, checked against the contract; :class:`Invalid` if not."""
        if value is None:
            raise Invalid("value: missing (a tombstone)")
        try:
            n = notification_from_wire(orjson.loads(value))
        except orjson.JSONDecodeError as exc:
            raise Invalid(f"value: not JSON ({exc})") from None
        except ContractViolation as exc:
            raise Invalid(str(exc)) from None
        if key is None or key != n.tenant.encode():
            # Key = tenant keeps a tenant's calls on one partition; another key would split them.
            raise Invalid(f"key: the record key must be the tenant {n.tenant!r}")
        return n

    @staticmethod
    def event_time_ms(n: Notification) -> int:
        """Event time of a notification."""
        return parse_rfc3339_ms(n.event_time)

    @staticmethod
    def time_domain(n: Notification) -> str:
        """Each tenant has its own clock: its early or late traffic only moves its own calls."""
        return n.tenant

    # -- events -------------------------------------------------------------------------

    def on_event(self, store: Store, n: Notification, now_ms: int) -> list[Output]:
        """Fold one notification into its call; return the call update (and a restated record)."""
        t = n.tenant
        approximate = n.dref is None
        if approximate:
            paired = self._pair(store, n)
            if paired is None:
                return []  # a duplicate delivery
            n = replace(n, dref=paired)
        index_keys = [f"i/{t}/d/{n.dref}"]
        if n.dref_replace:
            index_keys.append(f"i/{t}/d/{n.dref_replace}")
        if n.session_id:
            index_keys.append(f"i/{t}/s/{n.session_id}")
        if n.callref:
            index_keys.append(f"i/{t}/c/{n.callref}")
        ids: list[str] = []
        for key in index_keys:
            raw = store.get(key)
            if raw is not None and raw.decode() not in ids:
                ids.append(raw.decode())
        calls = [c for c in (self._load(store, t, i) for i in ids) if c is not None]
        self._check_bounds(calls, n)
        if not calls:
            call = self._new_call(t, n.dref)  # type: ignore[arg-type]
        else:
            call = self._merge(store, calls) if len(calls) > 1 else calls[0]
        short_id = n.event_id[:12]
        if short_id in call["events"]:
            return []  # an exact duplicate
        if len(call["events"]) >= self.config.max_events:
            raise Refused(f"the call already holds {len(call['events'])} events, max_events is "
                          f"{self.config.max_events}")
        call["events"].append(short_id)
        event_ms = parse_rfc3339_ms(n.event_time)
        self._fold(call, n, event_ms)
        if approximate:
            call["legs"][n.dref]["approx"] = True
        outputs: list[Output] = []
        if call["closed"]:
            call["closed"] = False  # reopened: the next close restates it with revision + 1
        call_ref = call["id"].encode()
        index_keys.extend(f"i/{t}/d/{leg['replaces']}" for leg in call["legs"].values() if leg["replaces"])
        for key in index_keys:
            if store.get(key) != call_ref:  # unchanged entries cost no changelog write
                store.put(key, call_ref)
        outputs.append(self._update(call, n.event_id, event_ms))
        self._save(store, call)
        self._arm(store, call)
        return outputs

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

    def _check_bounds(self, calls: list[Call], n: Notification) -> None:
        legs = {dref for c in calls for dref in c["legs"]}
        legs.add(n.dref)
        if len(legs) > self.config.max_legs:
            raise Refused(f"the call would hold {len(legs)} legs, more than max_legs "
                          f"{self.config.max_legs}")

    def _new_call(self, tenant: str, dref: str) -> Call:
        return {"id": _call_id(tenant, dref), "tenant": tenant, "legs": {}, "events": [],
                "closed": False, "revision": 0, "closed_by": None, "closed_at": None,
                "last_event": None}

    def _fold(self, call: Call, n: Notification, event_ms: int) -> None:
        leg = call["legs"].get(n.dref)
        if leg is None:
            leg = call["legs"][n.dref] = {
                "dref": n.dref, "callref": n.callref, "account": n.account, "caller": n.caller,
                "callee": n.callee, "setup_at": None, "connect_at": None, "release_at": None,
                "replaces": n.dref_replace, "session_id": n.session_id, "is_acd": n.is_acd,
                "redirecting_number": n.redirecting_number, "first_at": event_ms,
                "voicemail": False,
            }
        if n.type == "SETUP":
            # SETUP describes the dialog best: its values win over those of an earlier CONNECT.
            leg.update(callref=n.callref, caller=n.caller, callee=n.callee,
                       replaces=n.dref_replace or leg["replaces"])
            leg["setup_at"] = event_ms if leg["setup_at"] is None else min(leg["setup_at"], event_ms)
        elif n.type == "CONNECT":
            leg["connect_at"] = event_ms if leg["connect_at"] is None else min(leg["connect_at"], event_ms)
            answering = n.callee if n.callee != n.account else ""
            if len(answering) == 22 and answering.isdigit():
                leg["voicemail"] = True
        else:
            leg["release_at"] = event_ms if leg["release_at"] is None else max(leg["release_at"], event_ms)
        leg["first_at"] = min(leg["first_at"], event_ms)
        leg["session_id"] = leg["session_id"] or n.session_id
        leg["is_acd"] = leg["is_acd"] or n.is_acd
        leg["redirecting_number"] = leg["redirecting_number"] or n.redirecting_number
        call["last_event"] = event_ms if call["last_event"] is None else max(call["last_event"], event_ms)

    def _merge(self, store: Store, calls: list[Call]) -> Call:
        """Several calls turn out to be one: keep the earliest, fold the others into it."""
        calls.sort(key=lambda c: (min(leg["first_at"] for leg in c["legs"].values()), c["id"]))
        keep = calls[0]
        for other in calls[1:]:
            for dref, leg in other["legs"].items():
                keep["legs"].setdefault(dref, leg)
            keep["events"].extend(e for e in other["events"] if e not in keep["events"])
            keep["revision"] = max(keep["revision"], other["revision"])
            if other["last_event"] is not None:
                keep["last_event"] = max(keep["last_event"] or 0, other["last_event"])
            for key in self._index_keys(other):
                store.put(key, keep["id"].encode())
            store.delete(f"c/{other['tenant']}/{other['id']}")
            store.unwake(f"c/{other['tenant']}/{other['id']}")
        keep["closed"] = False
        return keep

    # -- timers -------------------------------------------------------------------------

    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        """Close a call whose time has come, or forget a closed one after its retention (or forget
        the pairing of legs without a DREF of a quiet line)."""
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
        if leg["connect_at"] is not None:
            return int(leg["connect_at"]) + self.config.max_duration_ms
        start = leg["setup_at"] if leg["setup_at"] is not None else leg["first_at"]
        return int(start) + self.config.ring_timeout_ms

    def _wake_at(self, call: Call) -> int:
        open_legs = [leg for leg in call["legs"].values() if leg["release_at"] is None]
        if not open_legs:
            return int(max(leg["release_at"] for leg in call["legs"].values())) + self.config.linger_ms
        return max(self._deadline(leg) for leg in open_legs)

    def _closing(self, call: Call, now_ms: int) -> str | None:
        open_legs = [leg for leg in call["legs"].values() if leg["release_at"] is None]
        if now_ms < self._wake_at(call):
            return None
        return "timeout" if open_legs else "release"

    def _arm(self, store: Store, call: Call) -> None:
        key, at = f"c/{call['tenant']}/{call['id']}", self._wake_at(call)
        if store.wake_time(key) != at:
            store.wake(key, at)

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
            keys.append(f"i/{t}/d/{leg['dref']}")
            if leg["replaces"]:
                keys.append(f"i/{t}/d/{leg['replaces']}")
            if leg["session_id"]:
                keys.append(f"i/{t}/s/{leg['session_id']}")
            if leg["callref"]:
                keys.append(f"i/{t}/c/{leg['callref']}")
        return keys

    # -- outputs ------------------------------------------------------------------------

    @staticmethod
    def _ordered_legs(call: Call) -> list[Leg]:
        return sorted(call["legs"].values(),
                      key=lambda leg: (leg["setup_at"] if leg["setup_at"] is not None
                                       else leg["first_at"], leg["dref"]))

    def _update(self, call: Call, event_id: str, event_ms: int) -> Output:
        legs = self._ordered_legs(call)
        if all(leg["release_at"] is not None for leg in legs):
            state = "ended"
        elif any(leg["connect_at"] is not None for leg in legs):
            state = "answered"
        else:
            state = "ringing"
        first = legs[0]
        update = {
            "schema": CALL_UPDATE_SCHEMA, "call_id": call["id"], "tenant": call["tenant"],
            "state": state, "caller": first["caller"], "callee": first["callee"],
            "is_acd": any(leg["is_acd"] for leg in legs),
            "session_id": next((leg["session_id"] for leg in legs if leg["session_id"]), None),
            "updated_at": rfc3339_ms(event_ms), "event_id": event_id,
            "legs": [self._leg_out(leg) for leg in legs],
        }
        return Output(CALL_UPDATES.name, call["tenant"].encode(), orjson.dumps(update))

    @staticmethod
    def _leg_out(leg: Leg) -> dict[str, Any]:
        return {
            "dref": None if leg.get("approx") else leg["dref"], "callref": leg["callref"],
            "account": leg["account"],
            "caller": leg["caller"], "callee": leg["callee"], "setup_at": _iso(leg["setup_at"]),
            "connect_at": _iso(leg["connect_at"]), "release_at": _iso(leg["release_at"]),
            "replaces": leg["replaces"],
        }

    def record(self, call: Call) -> dict[str, Any]:
        """The call record of a closed call (definitions in the README)."""
        legs = self._ordered_legs(call)
        first = legs[0]
        accounts = {leg["account"] for leg in legs}
        setups = [leg["setup_at"] for leg in legs if leg["setup_at"] is not None]
        started = min(setups) if setups else min(leg["first_at"] for leg in legs)
        connected = sorted((leg for leg in legs if leg["connect_at"] is not None),
                           key=lambda leg: (leg["connect_at"], leg["dref"]))
        answered = connected[0]["connect_at"] if connected else None
        releases = [leg["release_at"] for leg in legs if leg["release_at"] is not None]
        if call["closed_by"] == "release" or not releases:
            ended = max(releases) if releases else call["last_event"]
        else:
            ended = call["last_event"]
        is_acd = any(leg["is_acd"] for leg in legs)
        if first["caller"] in accounts and first["callee"] in accounts:
            direction = "internal"
        elif first["caller"] == first["account"] and first["callee"] != first["account"]:
            direction = "outbound"
        else:
            direction = "inbound"
        if connected:
            outcome = "voicemail" if connected[0]["voicemail"] else "answered"
        elif is_acd:
            outcome = "abandoned"
        elif direction == "outbound":
            outcome = "no_answer"
        else:
            outcome = "missed"
        answered_by = connected[0]["account"] if connected and not connected[0]["voicemail"] else None
        return {
            "schema": CALL_RECORD_SCHEMA, "record_id": call["id"], "tenant": call["tenant"],
            "revision": call["revision"], "direction": direction, "outcome": outcome,
            "caller": first["caller"], "callee": first["callee"], "answered_by": answered_by,
            "started_at": _iso(started), "answered_at": _iso(answered), "ended_at": _iso(ended),
            "wait_seconds": _secs(started, answered if answered is not None else ended),
            "talk_seconds": _secs(answered, ended) if answered is not None else 0.0,
            "duration_seconds": _secs(started, ended),
            "is_acd": is_acd,
            "session_id": next((leg["session_id"] for leg in legs if leg["session_id"]), None),
            "transferred": any(leg["replaces"] for leg in legs),
            "redirecting_number": next(
                (leg["redirecting_number"] for leg in legs if leg["redirecting_number"]), None),
            "legs": [self._leg_out(leg) for leg in legs],
            "closed_by": call["closed_by"],
            "correlation": "approximate" if any(leg.get("approx") for leg in legs) else "exact",
        }
