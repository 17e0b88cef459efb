"""Outbound actions and their results: the contract between deciders and the executor.

``keyyo.action.v1`` (topic ``keyyo.actions.v1``, key = tenant) asks for one thing to be done
through Keyyo's server API; ``keyyo.action-result.v1`` (topic ``keyyo.action-results.v1``, key =
``action_id``, compacted) says what became of it. The action-rules processor and the edge's
actions API write actions; the executor (and, for suppressed actions, the rules processor) write
results. JSON Schemas in ``schemas/json``; no I/O here.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.notification import TENANT_ID, parse_rfc3339_ms, rfc3339_ms

ACTION_SCHEMA = "keyyo.action.v1"
RESULT_SCHEMA = "keyyo.action-result.v1"

KINDS = ("sms", "call", "connect", "profile")
"""``sms`` (sendsms), ``call`` (makecall: the line rings, then calls ``callee``), ``connect``
(makecall with CALLER: ``account`` calls ``caller``, who is then put through to ``callee``),
``profile`` (setprofil)."""
NOT_REPEATABLE = frozenset({"sms", "call", "connect"})
"""Kinds never sent twice: an attempt whose outcome is unknown is reported ``unknown``."""

FINAL_STATUSES = ("sent", "failed", "unknown", "expired", "suppressed", "rejected")
SENDING = "sending"
"""Not final: an attempt started (written, durably, before the request leaves)."""
RETRYING = "retrying"
"""Not final: the last attempt was certainly not executed (``500 Come Back Later``, Keyyo
unreachable) or the action is idempotent; it will be tried again."""
STATUSES = (*FINAL_STATUSES, SENDING, RETRYING)

ACCOUNT = re.compile(r"[0-9]{6,20}")
"""A Keyyo line: international digits without ``+``."""
PHONE = re.compile(r"\+?[0-9]{3,20}")
"""A number to call or text."""
PROFILE = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")
MAX_MESSAGE = 160
"""Characters in an SMS (Keyyo documents 64, unverified; its own guide's examples run longer)."""
MAX_NAME = 64
_ACTION_ID = re.compile(r"[0-9a-f]{32}")


class ActionInvalid(ValueError):
    """An action that breaks the contract; ``field`` names the culprit."""

    def __init__(self, field: str | None, detail: str) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.field = field
        self.detail = detail


def action_id(tenant: str, *parts: str) -> str:
    """A deterministic id: the same decision (tenant, origin parts) always gets the same id."""
    return hashlib.sha256("\x1f".join((tenant, *parts)).encode()).hexdigest()[:32]


def normalise_phone(number: str) -> str:
    """International digits without ``+``: ``+33612…`` and French ``0612…`` become ``33612…``."""
    if number.startswith("+"):
        return number[1:]
    if number.startswith("00"):
        return number[2:]
    if len(number) == 10 and number.startswith("0"):
        return "33" + number[1:]
    return number


@dataclass(frozen=True, slots=True)
class Action:
    """One ``keyyo.action.v1`` value."""

    action_id: str
    """32 hex digits, deterministic (rule and record, or the API's idempotency key)."""
    tenant: str
    kind: str
    """One of :data:`KINDS`."""
    account: str
    """The Keyyo line that acts (and whose credentials the executor uses)."""
    callee: str | None
    """Who is called or texted (null for ``profile``)."""
    caller: str | None
    """``connect`` only: who ``account`` calls first."""
    callee_name: str | None
    """Name shown for ``call``/``connect`` (CALLEE_NAME)."""
    message: str | None
    """``sms`` only."""
    profile: str | None
    """``profile`` only: the profile name to switch ``account`` to."""
    not_before: str
    """RFC 3339 UTC: not sent before this (quiet hours, delays)."""
    expires_at: str
    """RFC 3339 UTC: never sent after this; then reported ``expired``."""
    origin: dict[str, Any]
    """``{"rule": name, "record_id": id}``, ``{"schedule": name, "at": time}`` or ``{"api": key}``."""
    created_at: str
    schema: str = ACTION_SCHEMA

    def to_json(self) -> bytes:
        """The wire value."""
        return orjson.dumps(self)  # orjson writes a dataclass's fields in order

    @property
    def not_before_ms(self) -> int:
        """``not_before`` in ms."""
        return parse_rfc3339_ms(self.not_before)

    @property
    def expires_ms(self) -> int:
        """``expires_at`` in ms."""
        return parse_rfc3339_ms(self.expires_at)


def _text(data: dict[str, Any], name: str, pattern: re.Pattern[str] | None, required: bool,
          limit: int = 64) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise ActionInvalid(name, "required")
        return None
    if not isinstance(value, str):
        raise ActionInvalid(name, "must be a string")
    if len(value) > limit:
        raise ActionInvalid(name, f"at most {limit} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise ActionInvalid(name, f"must match {pattern.pattern}")
    return value


def _time(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ActionInvalid(name, "must be an RFC 3339 time string")
    try:
        return parse_rfc3339_ms(value)
    except ValueError:
        raise ActionInvalid(name, "not an RFC 3339 UTC time (2026-01-31T12:00:00Z)") from None


DEFAULT_EXPIRY_MS = {"sms": 2 * 3600_000, "call": 15 * 60_000, "connect": 15 * 60_000,
                     "profile": 3600_000}
"""How long an action may wait to be sent when its request gives no ``expires_at``."""
MAX_EXPIRY_MS = 7 * 24 * 3600_000


def check_fields(kind: str, data: dict[str, Any]) -> dict[str, str | None]:
    """The kind-specific fields of an action, validated (a field that does not belong to the
    kind is refused rather than ignored, so a mistyped request never does something else)."""
    if kind not in KINDS:
        raise ActionInvalid("kind", f"must be one of {', '.join(KINDS)}")
    fields: dict[str, str | None] = {
        "account": _text(data, "account", ACCOUNT, True, 20),
        "callee": _text(data, "callee", PHONE, kind != "profile", 21),
        "caller": _text(data, "caller", PHONE, kind == "connect", 21),
        "callee_name": _text(data, "callee_name", None, False, MAX_NAME),
        "message": _text(data, "message", None, kind == "sms", MAX_MESSAGE),
        "profile": _text(data, "profile", PROFILE, kind == "profile", 64),
    }
    allowed = {"sms": {"account", "callee", "message"},
               "call": {"account", "callee", "callee_name"},
               "connect": {"account", "callee", "caller", "callee_name"},
               "profile": {"account", "profile"}}[kind]
    for name, value in fields.items():
        if value is not None and name not in allowed:
            raise ActionInvalid(name, f"not a field of a {kind} action")
    return fields


API_FIELDS = frozenset({"kind", "account", "callee", "caller", "callee_name", "message", "profile",
                        "not_before", "expires_at"})


def action_from_request(tenant: str, body: object, now_ms: int, idempotency_key: str | None,
                        random_id: str) -> Action:
    """The action a ``POST /v1/keyyo/{tenant}/actions`` body asks for; :class:`ActionInvalid`
    names the field. ``random_id`` makes the id when no idempotency key is given."""
    if not isinstance(body, dict):
        raise ActionInvalid(None, "the body must be a JSON object")
    for name in body:
        if name not in API_FIELDS:
            raise ActionInvalid(str(name)[:64], "unknown field")
    kind = body.get("kind")
    if not isinstance(kind, str):
        raise ActionInvalid("kind", f"required, one of {', '.join(KINDS)}")
    fields = check_fields(kind, body)
    not_before = _time(body, "not_before") or now_ms
    expires = _time(body, "expires_at")
    if expires is None:
        expires = max(now_ms, not_before) + DEFAULT_EXPIRY_MS[kind]
    if expires <= now_ms:
        raise ActionInvalid("expires_at", "already past")
    if expires < not_before:
        raise ActionInvalid("expires_at", "before not_before")
    if expires - now_ms > MAX_EXPIRY_MS:
        raise ActionInvalid("expires_at", "more than 7 days ahead")
    if idempotency_key is not None and not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise ActionInvalid("Idempotency-Key", "1 to 128 printable ASCII characters")
    aid = action_id(tenant, "api", idempotency_key) if idempotency_key else random_id
    return Action(
        action_id=aid, tenant=tenant, kind=kind, not_before=rfc3339_ms(not_before),
        expires_at=rfc3339_ms(expires), origin={"api": idempotency_key},
        created_at=rfc3339_ms(now_ms), **fields)  # type: ignore[arg-type]


def action_from_wire(key: bytes | None, value: bytes | None) -> Action:
    """An action read from ``keyyo.actions.v1``; :class:`ActionInvalid` says what is wrong."""
    try:
        data = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        raise ActionInvalid("value", f"not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ActionInvalid("value", "not a JSON object")
    if data.get("schema") != ACTION_SCHEMA:
        raise ActionInvalid("schema", f"expected {ACTION_SCHEMA!r}")
    aid = _text(data, "action_id", _ACTION_ID, True)
    tenant = _text(data, "tenant", TENANT_ID, True)
    if key is None or key.decode("utf-8", "replace") != tenant:
        raise ActionInvalid("key", "the record key must be the tenant")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise ActionInvalid("kind", f"required, one of {', '.join(KINDS)}")
    fields = check_fields(kind, data)
    times = {name: _time(data, name) for name in ("not_before", "expires_at", "created_at")}
    for name, ms in times.items():
        if ms is None:
            raise ActionInvalid(name, "required")
    origin = data.get("origin")
    if not isinstance(origin, dict):
        raise ActionInvalid("origin", "must be an object")
    return Action(action_id=aid, tenant=tenant, kind=kind, origin=origin,  # type: ignore[arg-type]
                  not_before=rfc3339_ms(times["not_before"]),  # type: ignore[arg-type]
                  expires_at=rfc3339_ms(times["expires_at"]),  # type: ignore[arg-type]
                  created_at=rfc3339_ms(times["created_at"]), **fields)  # type: ignore[arg-type]


def result(action: Action | dict[str, Any], status: str, at_ms: int, *, reason: str,
           attempts: int = 0, http_status: int | None = None, body: str | None = None,
           first_attempt_ms: int | None = None, offset: int | None = None) -> bytes:
    """A ``keyyo.action-result.v1`` value."""
    if isinstance(action, Action):
        head = {"action_id": action.action_id, "tenant": action.tenant, "kind": action.kind,
                "account": action.account, "callee": action.callee, "origin": action.origin}
    else:
        head = {name: action.get(name)
                for name in ("action_id", "tenant", "kind", "account", "callee", "origin")}
    return orjson.dumps({
        "schema": RESULT_SCHEMA, **head,
        "status": status, "final": status in FINAL_STATUSES, "attempts": attempts, "http_status": http_status,
        "body": body[:500] if body is not None else None, "reason": reason[:1000],
        "first_attempt_at": rfc3339_ms(first_attempt_ms) if first_attempt_ms is not None else None,
        "at": rfc3339_ms(at_ms), "offset": offset,
    })
