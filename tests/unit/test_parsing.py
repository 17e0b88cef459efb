"""Validation and normalisation of notifications: every field, every refusal, and a property test."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.parsing import (
    ALIASES,
    FIELDS,
    Refusal,
    event_id,
    notification_url_template,
    parse_notification,
)
from schemas.notification import Notification

RECEIVED_MS = 1_795_000_000_123
SCHEMA = json.loads(
    resources.files("schemas").joinpath("json/keyyo.notification.v1.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

BASE = {
    "account": "33123456789", "caller": "33612345678", "callee": "33123456789",
    "callref": "785412369", "type": "SETUP", "version": "1",
    "dref": "99354f2b1d7e4c4ba62c1f3a9d0e5a5f", "dref_replace": "", "session_id": "",
    "is_acd": "0", "redirecting_number": "", "tsms": "1795000000000",
}


def parse(overrides: dict[str, str | None] | None = None,
          extra: list[tuple[str, str]] | None = None) -> Notification | Refusal:
    params = dict(BASE)
    for name, value in (overrides or {}).items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    return parse_notification("acme", [*params.items(), *(extra or [])], "62.39.136.157",
                              RECEIVED_MS)


def accepted(overrides: dict[str, str | None] | None = None) -> Notification:
    result = parse(overrides)
    assert isinstance(result, Notification), result
    VALIDATOR.validate(result.to_dict())
    return result


def test_guide_example_is_normalised() -> None:
    n = accepted()
    assert n.to_dict() == {
        "schema": "keyyo.notification.v1",
        "event_id": event_id("acme", "33123456789", BASE["dref"], "SETUP", "785412369"),
        "tenant": "acme", "type": "SETUP", "account": "33123456789", "caller": "33612345678",
        "callee": "33123456789", "callref": "785412369", "dref": BASE["dref"],
        "dref_replace": None, "session_id": None, "is_acd": False, "redirecting_number": None,
        "version": 1, "event_time": "2026-11-18T11:06:40.000Z",
        "received_at": "2026-11-18T11:06:40.123Z", "source_ip": "62.39.136.157",
    }


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"dref_replace": "abc"}, "dref_replace", "abc"),
        ({"session_id": "s" * 40}, "session_id", "s" * 40),
        ({"is_acd": "1"}, "is_acd", True),
        ({"is_acd": ""}, "is_acd", False),
        ({"is_acd": None}, "is_acd", False),
        ({"redirecting_number": "33198765432"}, "redirecting_number", "33198765432"),
        ({"caller": "anonymous"}, "caller", "anonymous"),
        ({"caller": ""}, "caller", ""),
        ({"caller": "+33612345678"}, "caller", "+33612345678"),
        ({"callee": "1" * 22}, "callee", "1" * 22),
        ({"account": "3" * 64}, "account", "3" * 64),
        ({"type": "connect"}, "type", "CONNECT"),
        ({"type": "RELEASE"}, "type", "RELEASE"),
        ({"version": None}, "version", 1),
        ({"version": "2"}, "version", 2),
        ({"tsms": "1795000000"}, "event_time", "2026-11-18T11:06:40.000Z"),
        ({"tsms": ""}, "event_time", "2026-11-18T11:06:40.123Z"),
        ({"tsms": None}, "event_time", "2026-11-18T11:06:40.123Z"),
        ({"dref": "x" * 32}, "dref", "x" * 32),
        ({"callref": "c" * 64}, "callref", "c" * 64),
    ],
)
def test_accepted_values(overrides: dict[str, str | None], field: str, expected: Any) -> None:
    assert getattr(accepted(overrides), field) == expected


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"type": "RING"}, "invalid_field", "type"),
        ({"type": ""}, "invalid_field", "type"),
        ({"account": ""}, "invalid_field", "account"),
        ({"account": "anonymous"}, "invalid_field", "account"),
        ({"account": "33a23"}, "invalid_field", "account"),
        ({"account": "3" * 65}, "invalid_field", "account"),
        ({"caller": "3" * 65}, "invalid_field", "caller"),
        ({"caller": "06 12 34"}, "invalid_field", "caller"),
        ({"callee": "++33"}, "invalid_field", "callee"),
        ({"callref": "c" * 65}, "invalid_field", "callref"),
        ({"callref": "a b"}, "invalid_field", "callref"),
        ({"dref": "x" * 33}, "invalid_field", "dref"),
        ({"dref": "é"}, "invalid_field", "dref"),
        ({"dref_replace": "x" * 33}, "invalid_field", "dref_replace"),
        ({"session_id": "s" * 41}, "invalid_field", "session_id"),
        ({"session_id": "a\nb"}, "invalid_field", "session_id"),
        ({"is_acd": "2"}, "invalid_field", "is_acd"),
        ({"is_acd": "yes"}, "invalid_field", "is_acd"),
        ({"redirecting_number": "abc"}, "invalid_field", "redirecting_number"),
        ({"version": "x"}, "invalid_field", "version"),
        ({"version": "12345"}, "invalid_field", "version"),
        ({"tsms": "179500000000"}, "invalid_field", "tsms"),
        ({"tsms": "17950000000000"}, "invalid_field", "tsms"),
        ({"tsms": "179500000000x"}, "invalid_field", "tsms"),
        ({"account": "+" + "3" * 64}, "invalid_field", "account"),
        ({"caller": "+" + "3" * 64}, "invalid_field", "caller"),
        ({"redirecting_number": "+" + "3" * 64}, "invalid_field", "redirecting_number"),
        ({"type": "\u017fetup"}, "invalid_field", "type"),  # a Unicode long s upper-cases to S
        ({"type": "\uff33\uff25\uff34\uff35\uff30"}, "invalid_field", "type"),  # full-width
        ({"tsms": "9999999999999"}, "event_time_out_of_range", "tsms"),
        ({"tsms": str(RECEIVED_MS + 300_001)}, "event_time_out_of_range", "tsms"),
        ({"tsms": str(RECEIVED_MS - 86_400_001)}, "event_time_out_of_range", "tsms"),
        ({"tsms": "0000000000000"}, "event_time_out_of_range", "tsms"),
        ({"caller": "_CALLER_"}, "unsubstituted_keyword", "caller"),
        ({"dref_replace": "_DREF_REPLACE_"}, "unsubstituted_keyword", "dref_replace"),
        ({"tsms": "_TSMS_"}, "unsubstituted_keyword", "tsms"),
        *[({name: None}, "missing_field", name)
          for name in ("account", "type", "caller", "callee")],
    ],
)
def test_refusals(overrides: dict[str, str | None], error: str, field: str) -> None:
    result = parse(overrides)
    assert isinstance(result, Refusal), result
    assert (result.error, result.field, result.status) == (error, field, 400)
    assert result.detail


@pytest.mark.parametrize(
    "extra",
    [[("type", "CONNECT")], [("N_TYPE", "SETUP")], [("drefreplace", "")], [("DREF", "abc")]],
)
def test_a_parameter_given_twice_under_any_spelling_is_refused(extra: list[tuple[str, str]]) -> None:
    result = parse(extra=extra)
    assert isinstance(result, Refusal)
    assert result.error == "repeated_parameter"
    assert result.field == ALIASES[extra[0][0]]


@pytest.mark.parametrize(
    ("spelling", "field"),
    [("ACCOUNT", "account"), ("CALLER", "caller"), ("CALLEE", "callee"), ("CALLREF", "callref"),
     ("N_TYPE", "type"), ("N_VERSION", "version"), ("DREF", "dref"),
     ("DREF_REPLACE", "dref_replace"), ("SESSION_ID", "session_id"), ("IS_ACD", "is_acd"),
     ("REDIRECTING_NUMBER", "redirecting_number"), ("TSMS", "tsms"),
     ("drefreplace", "dref_replace"), ("sessionid", "session_id"), ("isacd", "is_acd"),
     ("redirectingnumber", "redirecting_number")],
)
def test_keyword_and_integrator_spellings(spelling: str, field: str) -> None:
    values = {"dref_replace": "abcd", "session_id": "sess1", "is_acd": "1",
              "redirecting_number": "33100000000"}
    params = {k: v for k, v in BASE.items() if k != field}
    value = values.get(field, BASE[field])
    result = parse_notification("acme", [*params.items(), (spelling, value)], "1.2.3.4", RECEIVED_MS)
    assert isinstance(result, Notification), result
    normalised = result.to_dict()[field if field not in ("tsms",) else "event_time"]
    if field == "is_acd":
        assert normalised is True
    elif field == "version":
        assert normalised == 1
    elif field == "type":
        assert normalised == "SETUP"
    elif field != "tsms":
        assert normalised == value


def test_unknown_parameters_are_ignored() -> None:
    result = parse(extra=[("foo", "bar"), ("utm_source", "x")])
    assert isinstance(result, Notification)


def test_event_id_is_deterministic_and_tells_events_apart() -> None:
    a, b = accepted(), accepted()
    assert a.event_id == b.event_id
    assert accepted({"type": "CONNECT"}).event_id != a.event_id
    assert accepted({"account": "33123456790"}).event_id != a.event_id
    assert parse_notification("other", list(BASE.items()), "x", RECEIVED_MS).event_id != a.event_id  # type: ignore[union-attr]


def test_url_template_names_every_keyword_and_uses_none_as_a_name() -> None:
    url = notification_url_template("https://hooks.example.com/", "acme")
    parts = urlsplit(url)
    assert parts.path == "/v1/keyyo/acme/notifications"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [n for n, _ in pairs]
    assert "key" in names
    assert sorted(v for _, v in pairs if v.startswith("_")) == sorted(k for k, _ in FIELDS.values())
    keyword = re.compile(r"_[A-Z_]+_")
    assert not [n for n in names if keyword.search(n)]
    # Keyyo substitutes every keyword; the result parses as a valid notification.
    substituted = [(n, BASE.get(ALIASES.get(n, ""), "secret")) for n in names]
    assert isinstance(parse_notification("acme", substituted, "x", RECEIVED_MS), Notification)


names = st.one_of(st.sampled_from(sorted(ALIASES)), st.text(max_size=12))
values = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["SETUP", "CONNECT", "RELEASE", "", "0", "1", "anonymous", "_CALLER_"]),
    st.from_regex(r"\+?[0-9]{1,70}", fullmatch=True),
    st.from_regex(r"[0-9]{10,13}", fullmatch=True),
)


@settings(max_examples=400, deadline=None)
@given(params=st.lists(st.tuples(names, values), max_size=20), base=st.booleans())
def test_no_input_crashes_the_parser(params: list[tuple[str, str]], base: bool) -> None:
    pairs = [*(BASE.items() if base else []), *params]
    result = parse_notification("acme", pairs, "127.0.0.1", RECEIVED_MS)
    if isinstance(result, Refusal):
        assert 400 <= result.status < 500
        assert result.field is None or result.field in FIELDS
    else:
        VALIDATOR.validate(result.to_dict())


def test_event_time_bounds_are_inclusive_and_configurable() -> None:
    assert isinstance(parse({"tsms": str(RECEIVED_MS + 300_000)}), Notification)
    assert isinstance(parse({"tsms": str(RECEIVED_MS - 86_400_000)}), Notification)
    late = parse_notification("acme", [*{**BASE, "tsms": str(RECEIVED_MS - 7 * 86_400_000)}.items()],
                              "x", RECEIVED_MS, max_behind_ms=8 * 86_400_000)
    assert isinstance(late, Notification)
    refused = parse({"tsms": "9999999999999"})
    assert isinstance(refused, Refusal)
    assert refused.detail == ("event time 2286-11-20T17:46:39.999Z is more than 300 s ahead of the "
                              "receive time 2026-11-18T11:06:40.123Z: check the sender's clock")


def test_keyyos_own_minimal_template_is_accepted_without_dref_and_callref() -> None:
    # http://www.exemple.tld/notification.php?account=_ACCOUNT_&caller=_CALLER_&callee=_CALLEE_&type=_N_TYPE_
    params = [("account", "33123456789"), ("caller", "33612345678"), ("callee", "33123456789"),
              ("type", "SETUP")]
    first = parse_notification("acme", params, "62.39.136.157", RECEIVED_MS)
    assert isinstance(first, Notification)
    assert (first.dref, first.callref, first.event_time) == (None, None, first.received_at)
    again = parse_notification("acme", params, "62.39.136.157", RECEIVED_MS + 1)
    assert isinstance(again, Notification) and again.event_id != first.event_id  # no way to tell
    # with _TSMS_, a second delivery is recognised as the same notification
    timed = [*params, ("tsms", str(RECEIVED_MS - 500))]
    a = parse_notification("acme", timed, "62.39.136.157", RECEIVED_MS)
    b = parse_notification("acme", timed, "62.39.136.157", RECEIVED_MS + 900)
    assert isinstance(a, Notification) and isinstance(b, Notification) and a.event_id == b.event_id
    for empty in ("dref", "callref"):
        n = parse_notification("acme", [*params, (empty, "")], "62.39.136.157", RECEIVED_MS)
        assert isinstance(n, Notification) and getattr(n, empty) is None
