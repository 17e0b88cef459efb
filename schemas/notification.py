"""The notification event (``keyyo.notification.v1``): one Keyyo call event, normalised by ingest.

Field names are a published contract: more may be added, none renamed.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

SCHEMA = "keyyo.notification.v1"
REJECTED_SCHEMA = "keyyo.notification-rejected.v1"

NotificationType = Literal["SETUP", "CONNECT", "RELEASE"]
NOTIFICATION_TYPES: tuple[str, ...] = ("SETUP", "CONNECT", "RELEASE")


@functools.lru_cache(maxsize=4096)
def _second_prefix(epoch_s: int) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def rfc3339_ms(epoch_ms: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-27T03:47:13.123Z``."""
    seconds, millis = divmod(epoch_ms, 1000)
    return f"{_second_prefix(seconds)}{millis:03d}Z"


@functools.lru_cache(maxsize=1024)
def parse_rfc3339_ms(text: str) -> int:
    """Milliseconds since the epoch from an RFC 3339 timestamp as written by :func:`rfc3339_ms`."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000 + 0.5)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 µs more to build, per request
class Notification:
    """One normalised Keyyo call notification, the value of ``keyyo.notifications.v1``."""

    event_id: str
    """Hash of tenant, account, dref, type and callref: a duplicate delivery gets the same id."""
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
    callref: str
    """Keyyo's call identifier."""
    dref: str
    """Dialog identifier: one per leg."""
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
