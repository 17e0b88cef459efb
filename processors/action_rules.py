"""Action rules: decide outbound actions from call records and schedules; pure, no I/O.

Input: ``keyyo.call-records.v1`` (key = tenant). Outputs: ``keyyo.actions.v1`` (what to do) and
``keyyo.action-results.v1`` (``suppressed`` or ``expired`` for what a safeguard stopped). Each
tenant has its own clock (event time = the record's ``ended_at``, else ``started_at``).

State keys (tenant ``t``):

- ``d/t/<action_id>``: one per (rule, call) once decided: ``pending`` (waiting for its delay,
  with the action) or ``done``; forgotten after :data:`REMEMBER_MS`, long after any restatement;
- ``n/t/<number>``: the pending actions towards a number, so a callback or an answered call from
  it cancels them;
- ``h/t/<hour>``: rule actions emitted in an hour of stream time (the per-tenant cap);
- ``s/t/<signature>``: a schedule's next time; its timer makes the profile switch.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Any

import orjson

from processors.action_rules_config import RulesConfig, Schedule, TenantRules, is_mobile
from processors.contract import Invalid, Output, Store, json_object
from schemas.actions import ACCOUNT, PHONE, Action, action_id, normalise_phone, result
from schemas.call_record import CALL_RECORD_SCHEMA, RECORD_ID, RECORD_NUMBER, RECORD_TIME
from schemas.notification import TENANT_ID, parse_rfc3339_ms, rfc3339_ms
from schemas.topics import ACTION_RESULTS, ACTIONS

REMEMBER_MS = 48 * 3600_000
"""How long a (rule, call) decision is remembered: far past call-records' restatement window."""
HOUR_MS = 3600_000
_DIRECTIONS = frozenset({"inbound", "outbound", "internal"})
_OUTCOMES = frozenset({"answered", "missed", "abandoned", "voicemail", "no_answer"})


class Call:
    """What the rules need of a call record."""

    __slots__ = ("answered_by", "callee", "caller", "direction", "ended_ms", "event_ms", "outcome",
                 "record_id", "revision", "started_ms", "tenant")

    def __init__(self, rec: dict[str, Any]) -> None:
        self.tenant: str = rec["tenant"]
        self.record_id: str = rec["record_id"]
        self.revision: int = rec["revision"]
        self.direction: str = rec["direction"]
        self.outcome: str = rec["outcome"]
        self.caller: str = rec["caller"]
        self.callee: str = rec["callee"]
        self.answered_by: str | None = rec.get("answered_by")
        self.started_ms = parse_rfc3339_ms(rec["started_at"])
        ended = rec.get("ended_at")
        self.ended_ms = parse_rfc3339_ms(ended) if ended is not None else self.started_ms
        self.event_ms = self.ended_ms


def _check(rec: dict[str, Any], name: str, ok: bool) -> None:
    if not ok:
        raise Invalid(f"{name}: {'missing' if rec.get(name) is None else 'not a valid value'}")


def decode_record(key: bytes | None, value: bytes | None) -> Call:
    """The call of a ``keyyo.call-record.v1`` record; :class:`Invalid` says which field is wrong."""
    rec = json_object(value, CALL_RECORD_SCHEMA)
    tenant = rec.get("tenant")
    _check(rec, "tenant", type(tenant) is str and TENANT_ID.fullmatch(tenant) is not None)
    if key is None or key != tenant.encode():  # type: ignore[union-attr]
        raise Invalid(f"key: the record key must be the tenant {tenant!r}")
    rid = rec.get("record_id")
    _check(rec, "record_id", type(rid) is str and RECORD_ID.fullmatch(rid) is not None)
    rev = rec.get("revision")
    _check(rec, "revision", type(rev) is int and 1 <= rev <= 1_000_000)
    _check(rec, "direction", rec.get("direction") in _DIRECTIONS)
    _check(rec, "outcome", rec.get("outcome") in _OUTCOMES)
    for name in ("caller", "callee"):
        v = rec.get(name)
        _check(rec, name, type(v) is str and RECORD_NUMBER.fullmatch(v) is not None)
    v = rec.get("answered_by")
    _check(rec, "answered_by", v is None or (type(v) is str and RECORD_NUMBER.fullmatch(v) is not None))
    for name, nullable in (("started_at", False), ("ended_at", True)):
        v = rec.get(name)
        if v is None and nullable:
            continue
        _check(rec, name, type(v) is str and RECORD_TIME.fullmatch(v) is not None)
    try:
        return Call(rec)
    except ValueError:
        raise Invalid("started_at/ended_at: not a real date") from None


def _anonymous(number: str) -> bool:
    return number in ("", "anonymous") or not number.strip("+0")


class ActionRulesLogic:
    """The action-rules logic (see the module docstring)."""

    def __init__(self, config: RulesConfig | None = None) -> None:
        self.config = config or RulesConfig()

    decode = staticmethod(decode_record)

    @staticmethod
    def event_time_ms(call: Call) -> int:
        """A record's time is when its call ended."""
        return call.event_ms

    @staticmethod
    def time_domain(call: Call) -> str:
        """Each tenant has its own clock."""
        return call.tenant

    # -- records ----------------------------------------------------------------------------

    def on_event(self, store: Store, call: Call, now_ms: int) -> list[Output]:
        """Cancel what this call makes moot; decide what the rules ask for."""
        tr = self.config.tenants.get(call.tenant)
        if tr is None:
            return []
        t = call.tenant
        outputs: list[Output] = []
        # Also armed at each start, except in replay mode for a tenant without a clock yet: its
        # first record arms them (a dictionary read per schedule once they are).
        self._arm(store, tr, t, now_ms)
        outputs.extend(self._cancellations(store, call, now_ms))
        for rule in tr.rules:
            matches = self._matches(rule, call)
            if not matches and call.revision == 1:
                continue  # nothing can have been decided for this call by this rule
            aid = action_id(t, "rule", rule.name, call.record_id)
            dkey = f"d/{t}/{aid}"
            raw = store.get(dkey)
            decided = orjson.loads(raw) if raw is not None else None
            if decided is not None:
                if decided["s"] == "pending" and not matches and call.revision > decided["rev"]:
                    outputs.extend(self._cancel(store, t, aid, decided, now_ms,
                                                f"the call was restated as {call.outcome}"))
                continue
            if not matches:
                continue
            action = self._action(rule, call, aid, now_ms)
            if isinstance(action, Output):
                self._remember(store, dkey, {"s": "done"}, now_ms)
                outputs.append(action)
            elif rule.delay_ms > 0 and now_ms < call.ended_ms + rule.delay_ms:
                number = normalise_phone(action.callee or "")
                store.put(dkey, orjson.dumps({"s": "pending", "rev": call.revision, "n": number,
                                              "rule": rule.name, "a": action.to_json().decode()}))
                store.wake(dkey, call.ended_ms + rule.delay_ms)
                self._index(store, t, number, aid, add=True)
            else:
                self._remember(store, dkey, {"s": "done"}, now_ms)
                outputs.append(self._emit(store, tr, rule.expires_ms, action, now_ms))
        return outputs

    @staticmethod
    def _matches(rule: Any, call: Call) -> bool:
        if call.outcome not in rule.when or call.direction not in rule.directions:
            return False
        return rule.lines is None or call.callee in rule.lines or call.answered_by in rule.lines

    def _action(self, rule: Any, call: Call, aid: str, now_ms: int) -> Action | Output:
        """The action of a rule for a call, or the result saying why there is none."""
        tr = self.config.tenants[call.tenant]
        line = call.callee if call.direction == "inbound" else call.caller
        customer = call.caller if call.direction == "inbound" else call.callee
        account = rule.from_line or (rule.agent if rule.action != "sms" else None) or line
        local = datetime.fromtimestamp(call.started_ms / 1000, UTC).astimezone(tr.zone)
        expires = call.ended_ms + rule.expires_ms
        action = Action(
            action_id=aid, tenant=call.tenant, kind=rule.action, account=account, callee=customer,
            caller=rule.agent if rule.action == "connect" else None,
            callee_name=rule.callee_name if rule.action != "sms" else None,
            message=rule.render({"caller": call.caller, "callee": call.callee, "line": line,
                                 "time": local.strftime("%H:%M"), "date": local.strftime("%d/%m")})
            if rule.action == "sms" else None,
            profile=None, not_before=rfc3339_ms(max(now_ms, call.ended_ms + rule.delay_ms)),
            expires_at=rfc3339_ms(max(expires, now_ms)),
            origin={"rule": rule.name, "record_id": call.record_id, "revision": call.revision},
            created_at=rfc3339_ms(now_ms))
        why = None
        if _anonymous(customer):
            why = "the caller's number is hidden"
        elif not PHONE.fullmatch(customer):
            why = f"{customer!r} is not a number that can be called or texted"
        elif not ACCOUNT.fullmatch(account):
            why = f"{account!r} is not a Keyyo line that can act"
        elif rule.action == "sms" and not rule.sms_to_landlines and \
                not is_mobile(customer, tr.mobile_prefixes):
            why = f"{customer} does not look like a mobile number (set sms_to_landlines to text it)"
        if why is not None:
            return Output(ACTION_RESULTS.name, aid.encode(),
                          result(action, "suppressed", now_ms, reason=why))
        if now_ms >= expires:
            return Output(ACTION_RESULTS.name, aid.encode(), result(
                action, "expired", now_ms, reason=f"decided {(now_ms - call.ended_ms) // 1000} s after "
                "the call ended, past the rule's expiry"))
        return action

    def _emit(self, store: Store, tr: TenantRules, expiry_ms: int, action: Action, now_ms: int) -> Output:
        """The action written, unless quiet hours drop it or the hourly cap is reached."""
        aid = action.action_id
        not_before = max(now_ms, action.not_before_ms)
        quiet_end = quiet_until(tr, not_before)
        if quiet_end is not None:
            if tr.quiet == "drop":
                return Output(ACTION_RESULTS.name, aid.encode(), result(
                    action, "suppressed", now_ms, reason="decided during the tenant's quiet hours"))
            not_before = quiet_end
            action = _replace(action, not_before=rfc3339_ms(quiet_end),
                              expires_at=rfc3339_ms(quiet_end + expiry_ms))
        hour = now_ms // HOUR_MS
        hkey = f"h/{action.tenant}/{hour}"
        count = int(store.get(hkey) or b"0")
        if count >= tr.max_actions_per_hour:
            return Output(ACTION_RESULTS.name, aid.encode(), result(
                action, "suppressed", now_ms,
                reason=f"the tenant's cap of {tr.max_actions_per_hour} rule actions per hour was reached"))
        store.put(hkey, str(count + 1).encode())
        if count == 0:
            store.wake(hkey, (hour + 2) * HOUR_MS)
        return Output(ACTIONS.name, action.tenant.encode(), action.to_json())

    # -- cancellation -----------------------------------------------------------------------

    def _cancellations(self, store: Store, call: Call, now_ms: int) -> list[Output]:
        """Pending actions towards a number this call reached or was answered from."""
        if call.outcome != "answered":
            return []
        if call.direction == "outbound":
            number, why = call.callee, "the caller was called back"
        elif call.direction == "inbound":
            number, why = call.caller, "the caller called again and was answered"
        else:
            return []
        if _anonymous(number):
            return []
        number = normalise_phone(number)
        raw = store.get(f"n/{call.tenant}/{number}")
        if raw is None:
            return []
        outputs: list[Output] = []
        for aid in orjson.loads(raw):
            dkey = f"d/{call.tenant}/{aid}"
            decided = orjson.loads(store.get(dkey) or b"null")
            if decided is not None and decided["s"] == "pending" and \
                    orjson.loads(decided["a"])["origin"]["record_id"] != call.record_id:
                outputs.extend(self._cancel(store, call.tenant, aid, decided, now_ms, why))
        return outputs

    def _cancel(self, store: Store, t: str, aid: str, decided: dict[str, Any], now_ms: int,
                why: str) -> list[Output]:
        self._remember(store, f"d/{t}/{aid}", {"s": "done"}, now_ms)
        self._index(store, t, decided["n"], aid, add=False)
        return [Output(ACTION_RESULTS.name, aid.encode(),
                       result(orjson.loads(decided["a"]), "suppressed", now_ms, reason=why))]

    @staticmethod
    def _index(store: Store, t: str, number: str, aid: str, add: bool) -> None:
        nkey = f"n/{t}/{number}"
        ids: list[str] = orjson.loads(store.get(nkey) or b"[]")
        if add:
            ids.append(aid)
        elif aid in ids:
            ids.remove(aid)
        if ids:
            store.put(nkey, orjson.dumps(ids))
        else:
            store.delete(nkey)

    @staticmethod
    def _remember(store: Store, dkey: str, value: dict[str, Any], now_ms: int) -> None:
        store.put(dkey, orjson.dumps(value))
        store.wake(dkey, now_ms + REMEMBER_MS)

    # -- schedules --------------------------------------------------------------------------

    def known_domains(self) -> dict[str, bytes]:
        """The tenants with schedules: their partitions arm them at start, before any record."""
        return {t: t.encode() for t, tr in self.config.tenants.items() if tr.schedules}

    def on_start(self, store: Store, domain: str, now_ms: int) -> list[Output]:
        """Arm the tenant's schedules that have no next time yet."""
        tr = self.config.tenants.get(domain)
        if tr is not None:
            self._arm(store, tr, domain, now_ms)
        return []

    @staticmethod
    def _arm(store: Store, tr: TenantRules, t: str, now_ms: int) -> None:
        for sched in tr.schedules:
            skey = f"s/{t}/{sched.signature}"
            if store.get(skey) is None:
                at = next_occurrence(sched, tr, now_ms)
                store.put(skey, str(at).encode())
                store.wake(skey, at)

    # -- timers -----------------------------------------------------------------------------

    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        """A delay ended (``d/``), an hour's count is old (``h/``) or a schedule is due (``s/``)."""
        kind, t, rest = key.split("/", 2)
        tr = self.config.tenants.get(t)
        if kind == "h":
            store.delete(key)
            return []
        if kind == "s":
            return self._scheduled(store, key, tr, t, rest, now_ms)
        raw = store.get(key)
        if raw is None:
            return []
        decided = orjson.loads(raw)
        if decided["s"] != "pending":
            store.delete(key)  # remembered long enough
            return []
        self._index(store, t, decided["n"], rest, add=False)
        self._remember(store, key, {"s": "done"}, now_ms)
        a = orjson.loads(decided["a"])
        rule = next((r for r in tr.rules if r.name == decided["rule"]), None) if tr else None
        if tr is None or rule is None:
            return [Output(ACTION_RESULTS.name, rest.encode(), result(
                a, "suppressed", now_ms, reason="its rule was removed while it waited"))]
        action = Action(**a)
        if now_ms >= action.expires_ms:
            return [Output(ACTION_RESULTS.name, rest.encode(), result(
                a, "expired", now_ms, reason="its delay ended past the rule's expiry"))]
        return [self._emit(store, tr, rule.expires_ms, action, now_ms)]

    def _scheduled(self, store: Store, key: str, tr: TenantRules | None, t: str, sig: str,
                   now_ms: int) -> list[Output]:
        sched = next((s for s in tr.schedules if s.signature == sig), None) if tr else None
        raw = store.get(key)
        if sched is None or tr is None or raw is None:
            store.delete(key)  # the schedule was changed or removed
            return []
        at = int(raw)
        if now_ms < at:
            store.wake(key, at)
            return []
        aid = action_id(t, "schedule", sched.name, str(at))
        action = Action(
            action_id=aid, tenant=t, kind="profile", account=sched.line, callee=None, caller=None,
            callee_name=None, message=None, profile=sched.profile, not_before=rfc3339_ms(at),
            expires_at=rfc3339_ms(at + sched.expires_ms),
            origin={"schedule": sched.name, "at": rfc3339_ms(at)},
            created_at=rfc3339_ms(now_ms))
        nxt = next_occurrence(sched, tr, now_ms)
        store.put(key, str(nxt).encode())
        store.wake(key, nxt)
        if now_ms >= at + sched.expires_ms:
            return [Output(ACTION_RESULTS.name, aid.encode(), result(
                action, "expired", now_ms, reason="the tenant's clock passed the switch time by more "
                "than the schedule's expiry (the processor was not running)"))]
        return [Output(ACTIONS.name, t.encode(), action.to_json())]


def _replace(action: Action, **changes: str) -> Action:
    data = {name: getattr(action, name) for name in Action.__dataclass_fields__}
    data.update(changes)
    return Action(**data)


def _local_ms(day: date, at: dtime, tr: TenantRules) -> int:
    return int(datetime.combine(day, at, tzinfo=tr.zone).timestamp() * 1000)


def next_occurrence(sched: Schedule, tr: TenantRules, after_ms: int) -> int:
    """The first time after ``after_ms`` the schedule's local time falls on one of its days."""
    today = datetime.fromtimestamp(after_ms / 1000, UTC).astimezone(tr.zone).date()
    for d in range(9):
        day = today + timedelta(days=d)
        if day.weekday() in sched.days and (ms := _local_ms(day, sched.at, tr)) > after_ms:
            return ms
    raise AssertionError("a schedule has at least one day")  # pragma: no cover


def quiet_until(tr: TenantRules, at_ms: int) -> int | None:
    """When the quiet hours holding ``at_ms`` end, or None outside them (or without any)."""
    if tr.quiet_hours is None:
        return None
    start, end = tr.quiet_hours
    local = datetime.fromtimestamp(at_ms / 1000, UTC).astimezone(tr.zone)
    now = local.time().replace(tzinfo=None)
    if start <= end:
        quiet = start <= now < end
        end_day = local.date()
    else:  # across midnight
        quiet = now >= start or now < end
        end_day = local.date() + timedelta(days=1) if now >= start else local.date()
    return _local_ms(end_day, end, tr) if quiet else None
