"""The notification event (``keyyo.notification.v1``): one Keyyo call event, normalised by ingest.

Field names are a published contract: more may be added, none renamed.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal

import orjson

SCHEMA = "keyyo.notification.v1"
REJECTED_SCHEMA = "keyyo.notification-rejected.v1"

NotificationType = Literal["SETUP", "CONNECT", "RELEASE"]
NOTIFICATION_TYPES: tuple[str, ...] = ("SETUP", "CONNECT", "RELEASE")


@functools.lru_cache(maxsize=4096)
def _day_prefix(epoch_day: int) -> str:
    return (_EPOCH_DATE + timedelta(days=epoch_day)).strftime("%Y-%m-%dT")


_EPOCH_DATE = date(1970, 1, 1)


_SECONDS: dict[int, str] = {}
"""Recent seconds as ``YYYY-MM-DDTHH:MM:SS.`` (a call's times are rendered in every update of it)."""


def rfc3339_ms(epoch_ms: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-27T03:47:13.123Z`` (the second's part cached)."""
    second, millis = divmod(epoch_ms, 1000)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) >= 65_536:
            _SECONDS.clear()
        day, rest = divmod(second, 86_400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        prefix = _SECONDS[second] = f"{_day_prefix(day)}{hours:02d}:{minutes:02d}:{seconds:02d}."
    return f"{prefix}{millis:03d}Z"


class ContractViolation(ValueError):
    """A value that breaks the ``keyyo.notification.v1`` contract; the message names the field."""


_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_EVENT_ID = re.compile(r"[0-9a-f]{32}")
_NUMBER = re.compile(r"\+?[0-9]{1,64}")
_IDENT = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(
    r"(?:19[7-9][0-9]|2[01][0-9]{2})-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
"""Years 1970-2199: a time outside them is a wrong clock, and would overflow once shifted."""
TENANT_ID = _TENANT
"""A tenant id (the record key of every topic, and part of state keys)."""
LINE_NUMBER = _NUMBER
"""A line or phone number as notified: digits, optionally after ``+``."""
_STRINGS: tuple[tuple[str, re.Pattern[str], int, bool, bool], ...] = (
    # field, pattern, max length, may be empty, may be null
    ("event_id", _EVENT_ID, 32, False, False),
    ("tenant", _TENANT, 64, False, False),
    ("account", _NUMBER, 64, False, False),
    ("caller", _NUMBER, 64, True, False),
    ("callee", _NUMBER, 64, True, False),
    ("callref", _IDENT, 64, False, True),
    ("dref", _IDENT, 32, False, True),
    ("dref_replace", _IDENT, 32, False, True),
    ("session_id", _IDENT, 40, False, True),
    ("redirecting_number", _NUMBER, 64, False, True),
    ("event_time", _TIMESTAMP, 24, False, False),
    ("received_at", _TIMESTAMP, 24, False, False),
)


def _violation(field: str, detail: str) -> ContractViolation:
    return ContractViolation(f"{field}: {detail}")


def notification_from_wire(data: object) -> Notification:
    """A :class:`Notification` from a decoded wire value, checked field by field against the
    contract (types, sizes, patterns, time range); raises :class:`ContractViolation`."""
    if not isinstance(data, dict):
        raise ContractViolation("value is not a JSON object")
    if data.get("schema") != SCHEMA:
        raise _violation("schema", f"expected {SCHEMA!r}")
    try:
        values = _STRING_VALUES(data)
    except KeyError as exc:
        raise _violation(str(exc.args[0]), "missing") from None
    for (name, pattern, limit, empty_ok, null_ok), value in zip(_STRINGS, values, strict=True):
        # The common case costs a type check, a length and one match; the rest says why not.
        if type(value) is str and 0 < len(value) <= limit and pattern.fullmatch(value):
            continue
        if (value is None and null_ok) or (value == "" and empty_ok):
            continue
        if value == "anonymous" and name in ("caller", "callee"):
            continue
        raise _string_violation(name, value, limit)
    if data.get("type") not in NOTIFICATION_TYPES:
        raise _violation("type", "expected SETUP, CONNECT or RELEASE")
    if type(data.get("is_acd")) is not bool:
        raise _violation("is_acd", "expected a boolean")
    version = data.get("version")
    if type(version) is not int or not 0 <= version <= 9999:
        raise _violation("version", "expected an integer from 0 to 9999")
    source_ip = data.get("source_ip")
    if type(source_ip) is not str or not 0 < len(source_ip) <= 64:
        raise _violation("source_ip", "expected a string of 1 to 64 characters")
    try:
        parse_rfc3339_ms(data["event_time"])
    except ValueError as exc:
        raise _violation("event_time", f"not a valid time: {exc}") from None
    return Notification(*_FIELD_VALUES(data))


def notification_from_json(raw: bytes) -> Notification:
    """A :class:`Notification` from its record value, checked against the contract exactly as
    :func:`notification_from_wire` checks it; raises :class:`ContractViolation` (also for a value
    that is not JSON).

    A value laid out as the edge writes it (its fields in order, ASCII, no escapes) is read and
    checked by one regular expression, without building a dict; any other value, valid or not,
    takes the field-by-field path, which also says what is wrong.
    """
    try:
        match = _CANONICAL.fullmatch(raw.decode("ascii"))
    except UnicodeDecodeError:
        match = None
    if match is not None:
        (event_id, tenant, kind, account, caller, callee, callref, dref, dref_replace, session_id,
         is_acd, redirecting, version, event_time, received_at, source_ip) = match.groups()
        try:
            parse_rfc3339_ms(event_time)
        except ValueError as exc:
            raise _violation("event_time", f"not a valid time: {exc}") from None
        return Notification(event_id, tenant, kind, account, caller, callee, callref, dref,  # type: ignore[arg-type]
                            dref_replace, session_id, is_acd == "true", redirecting, int(version),
                            event_time, received_at, source_ip)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContractViolation(f"value: not JSON ({exc})") from None
    return notification_from_wire(data)


def _canonical_layout() -> re.Pattern[str]:
    """The edge's layout of a notification as one pattern: each field's group accepts exactly
    what the field-by-field check accepts, minus escapes and non-ASCII (left to that check)."""
    def bounded(limit: int, body: str) -> str:
        return f'(?=[^"]{{1,{limit}}}"){body}'
    ident = r'[\x21\x23-\x5b\x5d-\x7e]+'  # printable ASCII but '"' and '\'
    number = r'\+?[0-9]+'
    timestamp = _TIMESTAMP.pattern

    def text(body: str) -> str:
        return f'"({body})"'

    def nullable(body: str) -> str:
        return f'(?:null|"({body})")'
    fields = [
        ("event_id", text(_EVENT_ID.pattern)),
        ("tenant", text(_TENANT.pattern)),
        ("type", text("SETUP|CONNECT|RELEASE")),
        ("account", text(bounded(64, number))),
        ("caller", text(f"(?:{bounded(64, number)}|anonymous)?")),
        ("callee", text(f"(?:{bounded(64, number)}|anonymous)?")),
        ("callref", nullable(bounded(64, ident))),
        ("dref", nullable(bounded(32, ident))),
        ("dref_replace", nullable(bounded(32, ident))),
        ("session_id", nullable(bounded(40, ident))),
        ("is_acd", "(true|false)"),
        ("redirecting_number", nullable(bounded(64, number))),
        ("version", "(0|[1-9][0-9]{0,3})"),
        ("event_time", text(timestamp)),
        ("received_at", text(timestamp)),
        ("source_ip", text(r'[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}')),
        ("schema", f'"{re.escape(SCHEMA)}"'),
    ]
    assert [name for name, _ in fields] == list(Notification.__dataclass_fields__)
    return re.compile("{" + ",".join(f'"{name}":{body}' for name, body in fields) + "}")


def _string_violation(name: str, value: object, limit: int) -> ContractViolation:
    if value is None:
        return _violation(name, "must not be null")
    if type(value) is not str:
        return _violation(name, f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        return _violation(name, f"longer than {limit} characters ({len(value)})")
    if not value:
        return _violation(name, "must not be empty")
    return _violation(name, "does not match the contract's pattern")


_STRING_VALUES = operator.itemgetter(*(entry[0] for entry in _STRINGS))


_SECOND = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")
_SECOND_MS: dict[str, int] = {}
"""Seconds already parsed, ``YYYY-MM-DDTHH:MM:SS`` (ASCII digits, checked by ``datetime``) -> ms:
a stream's times fall in few distinct seconds, so most times cost one lookup."""


def canonical_time_ms(text: str) -> int | None:
    """Milliseconds since the epoch of a time laid out as :func:`rfc3339_ms` writes it whose second
    was parsed before; None for any other text (which :func:`parse_rfc3339_ms` then checks in full)."""
    if len(text) == 24 and text[19] == "." and text[23] == "Z":
        second = _SECOND_MS.get(text[:19])
        if second is not None:
            millis = text[20:23]
            if millis.isascii() and millis.isdigit():
                return second + int(millis)
    return None


def parse_rfc3339_ms(text: str) -> int:
    """Milliseconds since the epoch from an RFC 3339 timestamp (``ValueError`` if it is not one)."""
    ms = canonical_time_ms(text)
    if ms is not None:
        return ms
    ms = int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000 + 0.5)
    if len(text) == 24 and text[19] == "." and text[23] == "Z" and _SECOND.fullmatch(text, 0, 19):
        if len(_SECOND_MS) >= 65_536:
            _SECOND_MS.clear()
        _SECOND_MS[text[:19]] = ms - int(text[20:23])
    return ms


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 µs more to build, per request
class Notification:
    """One normalised Keyyo call notification, the value of ``keyyo.notifications.v1``. Treat it
    as read-only once made (the native fold's decoded event hands the same one to every caller)."""

    event_id: str
    """Hash of tenant, account, dref, type and callref (without a dref: of the numbers and event
    time too): a duplicate delivery gets the same id."""
    tenant: str
    """The Keyyo customer the notification URL belongs to; also the record key."""
    type: NotificationType
    """SETUP (ringing or dialling), CONNECT (answered) or RELEASE (ended)."""
    account: str
    """The Keyyo line that notifies (international digits)."""
    caller: str
    """Calling number, ``anonymous``, or empty when hidden."""
    callee: str
    """Called number (a 22-digit answering number when voicemail answered)."""
    callref: str | None
    """Keyyo's call identifier; null when the notification URL does not carry ``_CALLREF_``."""
    dref: str | None
    """Dialog identifier, one per leg; null when the notification URL does not carry ``_DREF_``
    (Keyyo's own minimal example): the leg is then paired by line and numbers, approximately."""
    dref_replace: str | None
    """On interception or attended transfer, the DREF of the dialog this one replaces."""
    session_id: str | None
    """Shared by every leg one incoming ACD (numéro d'accueil) call generates."""
    is_acd: bool
    """True when the call comes through a numéro d'accueil."""
    redirecting_number: str | None
    """On a forwarded call, the line that forwarded it."""
    version: int
    """Keyyo notification API version."""
    event_time: str
    """RFC 3339 UTC, milliseconds: from Keyyo's ``_TSMS_`` when given, else ``received_at``."""
    received_at: str
    """RFC 3339 UTC, milliseconds: when the edge received the request."""
    source_ip: str
    """Address the request came from."""
    schema: str = SCHEMA
    """Always ``keyyo.notification.v1``."""

    def __init__(self, event_id: str, tenant: str, type: NotificationType, account: str, caller: str,
                 callee: str, callref: str | None, dref: str | None, dref_replace: str | None,
                 session_id: str | None, is_acd: bool, redirecting_number: str | None, version: int,
                 event_time: str, received_at: str, source_ip: str, schema: str = SCHEMA) -> None:
        # The dataclass's own __init__, written out: compiled by mypyc (`make compile`) it is native
        # code, 0.24 µs against 1.1 µs for the generated one, which stays interpreted; every
        # notification the edge accepts or a processor reads builds one.
        # tests/unit/test_inits.py holds it to the fields above.
        self.event_id = event_id
        self.tenant = tenant
        self.type = type
        self.account = account
        self.caller = caller
        self.callee = callee
        self.callref = callref
        self.dref = dref
        self.dref_replace = dref_replace
        self.session_id = session_id
        self.is_acd = is_acd
        self.redirecting_number = redirecting_number
        self.version = version
        self.event_time = event_time
        self.received_at = received_at
        self.source_ip = source_ip
        self.schema = schema

    def to_dict(self) -> dict[str, Any]:
        """The wire form as a dict."""
        return asdict(self)

    def to_json(self) -> bytes:
        """The wire form: UTF-8 JSON."""
        return orjson.dumps(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Notification:
        """Build from the wire form; unknown (newer) fields are ignored."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})

    @classmethod
    def from_json(cls, raw: bytes) -> Notification:
        """Parse the wire form."""
        return cls.from_dict(orjson.loads(raw))


_FIELD_VALUES = operator.itemgetter(*Notification.__dataclass_fields__)
"""Every field of a wire value, in the dataclass's order (all present once validated)."""
_CANONICAL = _canonical_layout()


@dataclass(frozen=True, slots=True)
class RejectedNotification:
    """A request the edge refused, the value of ``keyyo.notifications.rejected.v1``."""

    tenant: str
    """Tenant named in the URL path."""
    method: str
    """HTTP method."""
    path: str
    """Request path."""
    query: str
    """The raw query string, as received."""
    body: str | None
    """The raw body (POST), decoded as UTF-8 with replacement, at most 64 KiB."""
    source_ip: str
    """Address the request came from."""
    received_at: str
    """RFC 3339 UTC, milliseconds."""
    status: int
    """HTTP status answered."""
    error: str
    """Machine-readable reason (``invalid_field``, ``missing_field``, ``repeated_parameter``...)."""
    field: str | None
    """The field at fault, when there is one."""
    detail: str
    """Human-readable reason."""
    schema: str = REJECTED_SCHEMA
    """Always ``keyyo.notification-rejected.v1``."""

    def to_json(self) -> bytes:
        """The wire form: UTF-8 JSON."""
        return orjson.dumps(self)
