"""Call records and call updates: what analytics consumers and CRMs read.

Typed models of ``keyyo.call-record.v1`` (topic ``keyyo.call-records.v1``) and
``keyyo.call-update.v1`` (topic ``keyyo.call-updates.v1``); JSON Schemas in ``schemas/json``.
"""

from __future__ import annotations

import re
from typing import Literal, TypedDict

CALL_RECORD_SCHEMA = "keyyo.call-record.v1"
CALL_UPDATE_SCHEMA = "keyyo.call-update.v1"

RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""A ``record_id`` as readers of the records check it."""
RECORD_NUMBER = re.compile(r"\+?[0-9]{0,64}|anonymous")
"""A number in a call record: as notified, so also empty (hidden) or ``anonymous``."""
RECORD_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?Z")
"""A time in a call record: RFC 3339 UTC."""


class LegOut(TypedDict):
    """One dialog of a call."""

    dref: str | None
    """Null for a leg notified without a DREF (its record's correlation is approximate)."""
    callref: str | None
    account: str
    caller: str
    callee: str
    setup_at: str | None
    connect_at: str | None
    release_at: str | None
    replaces: str | None


class CallRecord(TypedDict):
    """A finished call; consumers keep the highest ``revision`` per ``record_id``."""

    schema: str
    record_id: str
    tenant: str
    revision: int
    direction: Literal["inbound", "outbound", "internal"]
    outcome: Literal["answered", "missed", "abandoned", "voicemail", "no_answer"]
    caller: str
    callee: str
    answered_by: str | None
    started_at: str
    answered_at: str | None
    ended_at: str | None
    wait_seconds: float
    talk_seconds: float
    duration_seconds: float
    is_acd: bool
    session_id: str | None
    transferred: bool
    redirecting_number: str | None
    legs: list[LegOut]
    closed_by: Literal["release", "timeout"]
    correlation: Literal["exact", "approximate"]


class CallUpdate(TypedDict):
    """The state of a call in progress after a change."""

    schema: str
    call_id: str
    tenant: str
    state: Literal["ringing", "answered", "ended"]
    caller: str
    callee: str
    is_acd: bool
    session_id: str | None
    updated_at: str
    event_id: str
    legs: list[LegOut]
