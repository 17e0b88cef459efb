"""The fast reading of a notification record accepts and refuses exactly what the field-by-field
check does, with the same result or the same reason."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.notification import (
    _CANONICAL,
    ContractViolation,
    Notification,
    notification_from_json,
    notification_from_wire,
)

BASE: dict[str, Any] = {
    "event_id": "ad0250292a58b3b3e6a7da5fd30a8563", "tenant": "tenant054", "type": "SETUP",
    "account": "33154000007", "caller": "33618470054", "callee": "33154000007",
    "callref": "775696002146", "dref": "f823ea2170816f4292d003d5198968e7", "dref_replace": None,
    "session_id": None, "is_acd": False, "redirecting_number": "33154000003", "version": 1,
    "event_time": "2026-11-18T11:06:40.000Z", "received_at": "2026-11-18T11:06:40.000Z",
    "source_ip": "127.0.0.1", "schema": "keyyo.notification.v1",
}

TRICKY: list[Any] = [
    None, "", " ", "anonymous", "Anonymous", "0", "+", "+33", "++33", "3" * 64, "+" + "3" * 63,
    "+" + "3" * 64, "3" * 65, "a" * 32, "a" * 33, "a" * 40, "a" * 41, "a" * 64, "a" * 65,
    "ab\"c", "ab\\c", "ab c", "é", "x\x1fy", "tenant-1.x_y", "-tenant", "SETUP", "CONNECT",
    "RELEASE", "setup", "2026-11-18T11:06:40.000Z", "2026-13-45T11:06:40.000Z",
    "2026-02-30T11:06:40.000Z", "1969-12-31T23:59:59.999Z", "2200-01-01T00:00:00.000Z",
    "2026-11-18T11:06:40Z", "ad0250292a58b3b3e6a7da5fd30a856G", "AD0250292A58B3B3E6A7DA5FD30A8563",
    0, 1, 9999, 10000, -1, 1.0, True, False, [], {}, "\u0000", "keyyo.notification.v1",
]


def slow(raw: bytes) -> Notification:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContractViolation(f"value: not JSON ({exc})") from None
    return notification_from_wire(data)


def outcome(read: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", read(raw)
    except ContractViolation as exc:
        return "refused", str(exc)


def assert_same(raw: bytes) -> None:
    assert outcome(notification_from_json, raw) == outcome(slow, raw), raw


def test_the_edges_layout_takes_the_fast_reading() -> None:
    assert _CANONICAL.fullmatch(orjson.dumps(BASE).decode())
    assert notification_from_json(orjson.dumps(BASE)) == Notification(**BASE)


@pytest.mark.parametrize("field", list(BASE))
def test_every_tricky_value_of_every_field_is_judged_alike(field: str) -> None:
    for value in TRICKY:
        assert_same(orjson.dumps({**BASE, field: value}))
    missing = {k: v for k, v in BASE.items() if k != field}
    assert_same(orjson.dumps(missing))
    assert_same(orjson.dumps({**missing, field: BASE[field]}))  # another order
    assert_same(orjson.dumps({**BASE, "extra": 1}))


def test_values_that_are_not_notifications() -> None:
    for raw in (b"", b"{", b"[]", b"null", b"{}", b"\xff\xfe", orjson.dumps(BASE) + b" ",
                orjson.dumps(BASE).replace(b'"is_acd":false', b'"is_acd":0'),
                orjson.dumps(BASE).replace(b'"version":1', b'"version":01')):
        assert_same(raw)


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({name: st.one_of(st.sampled_from(TRICKY), st.text(max_size=70),
                                              st.from_regex(r"\+?[0-9]{1,66}", fullmatch=True))
                              for name in ("account", "caller", "callee", "callref", "dref",
                                           "session_id", "redirecting_number", "source_ip",
                                           "tenant", "event_time")}),
       st.lists(st.sampled_from(list(BASE)), max_size=3))
def test_generated_values_are_judged_alike(changes: dict[str, Any], keep: list[str]) -> None:
    value = {**BASE, **{k: v for k, v in changes.items() if k not in keep}}
    assert_same(orjson.dumps(value))
