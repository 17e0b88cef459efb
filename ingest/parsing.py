"""Validation and normalisation of one Keyyo notification: pure, no I/O.

``parse_notification`` turns the request's parameters into a :class:`Notification` or a
:class:`Refusal` naming the field and the reason. It never raises on any input.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_plus

from schemas.notification import Notification, NotificationType, rfc3339_ms

# Canonical field -> (Keyyo keyword, max length)
FIELDS: Final[dict[str, tuple[str, int]]] = {
    "account": ("_ACCOUNT_", 64),
    "caller": ("_CALLER_", 64),
    "callee": ("_CALLEE_", 64),
    "callref": ("_CALLREF_", 64),
    "type": ("_N_TYPE_", 16),
    "version": ("_N_VERSION_", 4),
    "dref": ("_DREF_", 32),
    "dref_replace": ("_DREF_REPLACE_", 32),
    "session_id": ("_SESSION_ID_", 40),
    "is_acd": ("_IS_ACD_", 1),
    "redirecting_number": ("_REDIRECTING_NUMBER_", 64),
    "tsms": ("_TSMS_", 13),
}
REQUIRED: Final = ("account", "type", "caller", "callee")
"""The keywords of Keyyo's own example URL; ``dref`` and ``callref`` are strongly advised (without
them calls are paired by line and numbers, approximately) but not required."""
SECRET_PARAM: Final = "key"  # noqa: S105 - the name of the parameter, not a secret


def _aliases() -> dict[str, str]:
    table: dict[str, str] = {}
    for name, (keyword, _) in FIELDS.items():
        bare = keyword.strip("_")  # N_TYPE
        for alias in (name, bare, bare.lower(), name.replace("_", ""), name.upper()):
            table[alias] = name
    return table


ALIASES: Final[dict[str, str]] = _aliases()
"""Every accepted parameter spelling -> canonical field name."""

_NUMBER = re.compile(r"\+?[0-9]{1,64}")
_IDENT = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_KEYWORD = re.compile(r"_[A-Z][A-Z_]*_")
_TYPES: Final[dict[str, NotificationType]] = {
    "SETUP": "SETUP", "CONNECT": "CONNECT", "RELEASE": "RELEASE",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused: answered as JSON and kept in the rejected topic."""

    error: str
    """Machine-readable reason."""
    field: str | None
    """The field at fault, when there is one."""
    detail: str
    """Human-readable reason."""
    status: int = 400
    """HTTP status to answer."""

    def body(self) -> dict[str, str | None]:
        """The JSON body of the answer."""
        return {"error": self.error, "field": self.field, "detail": self.detail}


def _invalid(field: str, detail: str) -> Refusal:
    return Refusal("invalid_field", field, detail)


def collect_fields(params: Iterable[tuple[str, str]]) -> dict[str, str] | Refusal:
    """Map request parameters to canonical fields; refuse a field given twice (under any spelling).

    Unknown parameter names are ignored (a template may carry the integrator's own parameters).
    """
    fields: dict[str, str] = {}
    for raw_name, value in params:
        name = ALIASES.get(raw_name)
        if name is None:
            continue
        if name in fields:
            return Refusal("repeated_parameter", name, f"parameter {name!r} is given more than once")
        fields[name] = value
    return fields


def query_pairs(raw_query: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of a raw (still percent-encoded) query string, blanks kept.

    Decodes only the pairs that need it: Keyyo's values are digits and hex.
    """
    pairs: list[tuple[str, str]] = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            name, value = unquote_plus(name), unquote_plus(value)
        pairs.append((name, value))
    return pairs


def event_id(tenant: str, account: str, dref: str | None, kind: str, callref: str | None,
             caller: str = "", callee: str = "", event_ms: int = 0) -> str:
    """Deterministic id of a notification: a duplicate delivery of it gets the same id.

    With a DREF: tenant, account, DREF, type and CALLREF. Without (the minimal template): tenant,
    account, type, CALLREF, numbers and event time, so a duplicate is recognised only when Keyyo
    sent ``_TSMS_`` (the receive time differs between deliveries).
    """
    if dref:
        identity = "\x1f".join((tenant, account, dref, kind, callref or ""))
    else:
        identity = "\x1f".join(("", tenant, account, kind, callref or "", caller, callee, str(event_ms)))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


def _check_number(field: str, value: str, *, allow_anonymous: bool) -> Refusal | None:
    if len(value) > FIELDS[field][1]:
        return _invalid(field, f"longer than {FIELDS[field][1]} characters")
    if _NUMBER.fullmatch(value) or (allow_anonymous and value == "anonymous"):
        return None
    return _invalid(field, "expected digits, optionally prefixed by '+'"
                    + (", or 'anonymous'" if allow_anonymous else ""))


def _check_ident(field: str, value: str) -> Refusal | None:
    limit = FIELDS[field][1]
    if len(value) > limit:
        return _invalid(field, f"longer than {limit} characters")
    if not _IDENT.fullmatch(value):
        return _invalid(field, "expected printable ASCII without spaces")
    return None


def parse_tsms(value: str) -> int | Refusal:
    """Keyyo's ``_TSMS_``: 13 digits of milliseconds, or 10 digits read as seconds."""
    if value.isascii() and value.isdigit():
        if len(value) == 13:
            return int(value)
        if len(value) == 10:
            return int(value) * 1000
    return _invalid("tsms", "expected 13 digits (milliseconds since the epoch) or 10 (seconds)")


MAX_AHEAD_MS: Final = 300_000
"""Default: an event time more than 5 minutes ahead of the receive time is refused."""
MAX_BEHIND_MS: Final = 86_400_000
"""Default: an event time more than a day behind the receive time is refused."""


def parse_notification(
    tenant: str,
    params: Iterable[tuple[str, str]],
    source_ip: str,
    received_ms: int,
    max_ahead_ms: int = MAX_AHEAD_MS,
    max_behind_ms: int = MAX_BEHIND_MS,
) -> Notification | Refusal:
    """Validate and normalise one notification's parameters (never raises).

    ``tsms`` must lie within ``max_ahead_ms`` after and ``max_behind_ms`` before ``received_ms``:
    Keyyo's clock and ours agree within minutes, and one wrong clock must not move the processors'
    time for every other tenant.
    """
    fields = collect_fields(params)
    if isinstance(fields, Refusal):
        return fields
    for name, value in fields.items():
        if value[:1] == "_" and _KEYWORD.fullmatch(value):
            return Refusal(
                "unsubstituted_keyword", name,
                f"value is the keyword {value} itself: the notification URL template is "
                "misconfigured (a keyword was not substituted)",
            )
    for name in REQUIRED:
        if name not in fields:
            return Refusal("missing_field", name, f"required parameter {name!r} is missing")

    type_text = fields["type"]
    kind = _TYPES.get(type_text.upper()) if type_text.isascii() else None  # no Unicode case folding
    if kind is None:
        return _invalid("type", "expected SETUP, CONNECT or RELEASE")
    account = fields["account"]
    refusal = _check_number("account", account, allow_anonymous=False)
    if refusal:
        return refusal
    caller, callee = fields["caller"], fields["callee"]
    for name, value in (("caller", caller), ("callee", callee)):
        if value:
            refusal = _check_number(name, value, allow_anonymous=True)
            if refusal:
                return refusal
    optional: dict[str, str | None] = {}
    for name in ("callref", "dref", "dref_replace", "session_id"):
        text = fields.get(name) or None
        if text is not None:
            refusal = _check_ident(name, text)
            if refusal:
                return refusal
        optional[name] = text
    redirecting = fields.get("redirecting_number") or None
    if redirecting is not None:
        refusal = _check_number("redirecting_number", redirecting, allow_anonymous=False)
        if refusal:
            return refusal
    acd_text = fields.get("is_acd", "")
    if acd_text not in ("", "0", "1"):
        return _invalid("is_acd", "expected 0 or 1")
    version_text = fields.get("version") or "1"
    if not (version_text.isascii() and version_text.isdigit() and len(version_text) <= 4):
        return _invalid("version", "expected a small integer")
    tsms_text = fields.get("tsms")
    event_ms = received_ms
    if tsms_text:
        parsed = parse_tsms(tsms_text)
        if isinstance(parsed, Refusal):
            return parsed
        if parsed > received_ms + max_ahead_ms or parsed < received_ms - max_behind_ms:
            return Refusal(
                "event_time_out_of_range", "tsms",
                f"event time {rfc3339_ms(parsed)} is more than "
                + (f"{max_ahead_ms // 1000} s ahead of" if parsed > received_ms
                   else f"{max_behind_ms // 1000} s behind")
                + f" the receive time {rfc3339_ms(received_ms)}: check the sender's clock")
        event_ms = parsed
    received_at = rfc3339_ms(received_ms)
    return Notification(
        event_id=event_id(tenant, account, optional["dref"], kind, optional["callref"], caller, callee,
                          event_ms),
        tenant=tenant,
        type=kind,
        account=account,
        caller=caller,
        callee=callee,
        callref=optional["callref"],
        dref=optional["dref"],
        dref_replace=optional["dref_replace"],
        session_id=optional["session_id"],
        is_acd=acd_text == "1",
        redirecting_number=redirecting,
        version=int(version_text),
        event_time=received_at if event_ms == received_ms else rfc3339_ms(event_ms),
        received_at=received_at,
        source_ip=source_ip,
    )


def notification_url_template(base: str, tenant: str) -> str:
    """The URL to paste into the Keyyo Manager (line > CTI > API serveur) for ``tenant``.

    Parameter names are the canonical lowercase names, so no keyword is used as a name.
    """
    query = "&".join(f"{name}={keyword}" for name, (keyword, _) in FIELDS.items())
    return f"{base.rstrip('/')}/v1/keyyo/{tenant}/notifications?{SECRET_PARAM}=<SECRET>&{query}"
