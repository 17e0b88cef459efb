"""The dataclasses whose ``__init__`` is written out (so that mypyc compiles it: see
``Notification``) take exactly their fields, in order, with the fields' defaults, and set each."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from processors.acd_stats import AcdCall
from processors.output import Output
from schemas.notification import Notification

# A value of each field's type (a compiled class checks types), no two of the same type equal, and
# none equal to its field's default: a missed, swapped or misnamed assignment shows.
VALUES: dict[type, dict[str, Any]] = {
    Notification: {
        "event_id": "e" * 32, "tenant": "acme", "type": "CONNECT", "account": "33100000001",
        "caller": "33600000002", "callee": "33100000003", "callref": "4", "dref": "5",
        "dref_replace": "6", "session_id": "7", "is_acd": True, "redirecting_number": "33100000008",
        "version": 2, "event_time": "2026-11-29T07:00:00.009Z", "received_at": "2026-11-29T07:00:00.010Z",
        "source_ip": "192.0.2.11", "schema": "keyyo.notification.v0"},
    Output: {"topic": "call-updates.v1", "key": b"acme", "value": b"{}", "latest": True},
    AcdCall: {
        "tenant": "acme", "record_id": "r" * 32, "revision": 3, "is_acd": True, "outcome": "a",
        "started_ms": 4, "event_ms": 5, "answered_ms": 6, "wait_ms": 7, "talk_ms": 8,
        "callee": "33100000009", "redirecting": "33100000010", "legs": (("33100000011", 12, 13),)},
}


@pytest.mark.parametrize("cls", list(VALUES), ids=lambda cls: cls.__name__)
def test_init_takes_the_fields(cls: type) -> None:
    fields = dataclasses.fields(cls)
    values = VALUES[cls]
    assert list(values) == [f.name for f in fields]  # every field, in order

    by_name = cls(**values)
    by_position = cls(*values.values())
    for f in fields:
        assert getattr(by_name, f.name) == values[f.name], f.name
        assert getattr(by_position, f.name) == values[f.name], f.name
        assert values[f.name] != f.default, f.name
    assert by_name == by_position

    required = {f.name: values[f.name] for f in fields if f.default is dataclasses.MISSING}
    defaulted = cls(**required)
    for f in fields:
        if f.default is not dataclasses.MISSING:
            assert getattr(defaulted, f.name) == f.default, f.name
    with pytest.raises(TypeError):
        cls(**values, unknown=1)
    with pytest.raises(TypeError):
        cls(*values.values(), "one too many")
