"""The call-records logic, flow by flow, without a broker."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from importlib import resources

import jsonschema
import orjson
import pytest

from processors.call_records import CallRecords, CallRecordsConfig, pack_call, unpack_call
from processors.driver import Driver
from schemas.notification import Notification, parse_rfc3339_ms, rfc3339_ms
from schemas.topics import CALL_RECORDS, CALL_UPDATES
from tests.scenarios import EXTERNAL, incoming_call, outgoing_call, run

A, B, C = "33100000001", "33100000002", "33100000003"
RECORD = jsonschema.Draft202012Validator(json.loads(
    resources.files("schemas").joinpath("json/keyyo.call-record.v1.schema.json").read_text()))
UPDATE = jsonschema.Draft202012Validator(json.loads(
    resources.files("schemas").joinpath("json/keyyo.call-update.v1.schema.json").read_text()))


def only_record(events, **kw):  # type: ignore[no-untyped-def]
    result = run(events, **kw)
    assert len(result.records) == 1, result.records
    for r in result.records:
        RECORD.validate(r)
    for u in result.updates:
        UPDATE.validate(u)
    return result.records[0]


def test_answered_incoming_call() -> None:
    flow = incoming_call().rings(A).answers(A, after=4).hangs_up(A, after=30)
    r = only_record(flow.events)
    assert (r["direction"], r["outcome"], r["answered_by"], r["closed_by"]) == (
        "inbound", "answered", A, "release")
    assert (r["caller"], r["callee"]) == (EXTERNAL, A)
    assert (r["wait_seconds"], r["talk_seconds"], r["duration_seconds"]) == (4.0, 30.0, 34.0)
    assert r["started_at"] == "2026-11-18T11:06:40.000Z" and r["revision"] == 1
    assert len(r["legs"]) == 1 and not r["transferred"]


def test_updates_follow_the_call_for_a_screen_pop() -> None:
    flow = incoming_call().rings(A).answers(A).hangs_up(A)
    result = run(flow.events)
    assert [u["state"] for u in result.updates] == ["ringing", "answered", "ended"]
    assert {u["call_id"] for u in result.updates} == {result.records[0]["record_id"]}


def test_missed_incoming_call() -> None:
    r = only_record(incoming_call().rings(A).hangs_up(A, after=20).events)
    assert (r["outcome"], r["answered_by"], r["wait_seconds"], r["talk_seconds"]) == (
        "missed", None, 20.0, 0.0)


def test_outgoing_answered_and_unanswered() -> None:
    r = only_record(outgoing_call().rings(A).answers(A, after=6).hangs_up(A, after=60).events)
    assert (r["direction"], r["outcome"], r["caller"], r["callee"]) == ("outbound", "answered", A, EXTERNAL)
    r = only_record(outgoing_call().rings(A).hangs_up(A, after=25).events)
    assert (r["direction"], r["outcome"]) == ("outbound", "no_answer")


def test_acd_call_rings_agents_simultaneously_one_answers() -> None:
    flow = incoming_call(acd_session="sess-1").rings(A).rings(B).rings(C)
    flow.answers(B, after=5).hangs_up(A, after=0).hangs_up(C, after=0).hangs_up(B, after=40)
    r = only_record(flow.events)
    assert (r["outcome"], r["answered_by"], r["is_acd"], r["session_id"]) == (
        "answered", B, True, "sess-1")
    assert len(r["legs"]) == 3 and r["wait_seconds"] == 5.0


def test_acd_call_rings_agents_one_after_another_and_is_abandoned() -> None:
    flow = incoming_call(acd_session="sess-2").rings(A).hangs_up(A, after=15)
    flow.rings(B, after=0).hangs_up(B, after=15)
    r = only_record(flow.events)
    assert (r["outcome"], r["answered_by"], len(r["legs"])) == ("abandoned", None, 2)
    assert r["wait_seconds"] == 30.0


def test_interception_links_by_dref_replace() -> None:
    flow = incoming_call().rings(A).intercepted_by(B, original=A, after=3)
    flow.hangs_up(A, after=0.1).answers(B, after=0.1).hangs_up(B, after=30)
    r = only_record(flow.events)
    assert (r["outcome"], r["answered_by"], r["transferred"], len(r["legs"])) == ("answered", B, True, 2)
    assert r["legs"][1]["replaces"] == r["legs"][0]["dref"]
    assert (r["caller"], r["callee"], r["direction"]) == (EXTERNAL, A, "inbound")


def test_forwarded_call_keeps_the_redirecting_number() -> None:
    r = only_record(incoming_call(redirecting=C).rings(A).answers(A).hangs_up(A).events)
    assert r["redirecting_number"] == C


def test_internal_call_between_two_lines() -> None:
    flow = incoming_call(caller=A).rings(B, callref="777")
    out = outgoing_call(to=B)
    out.t = flow.t
    out.rings(A, callref="777")
    events = sorted(flow.events + out.events, key=lambda n: n.event_time)
    flow.events, out.events = [], []
    flow.t = out.t = max(flow.t, out.t)
    flow.answers(B, after=2).hangs_up(B, after=10)
    out.answers(A, after=2).hangs_up(A, after=10)
    r = only_record(events + sorted(flow.events + out.events, key=lambda n: n.event_time))
    assert (r["direction"], r["outcome"], len(r["legs"])) == ("internal", "answered", 2)


def test_voicemail_answers_with_a_22_digit_number() -> None:
    r = only_record(incoming_call().rings(A).answers(A, voicemail="1" * 22).hangs_up(A).events)
    assert (r["outcome"], r["answered_by"]) == ("voicemail", None)


def test_events_in_any_order_and_duplicates_give_the_same_record() -> None:
    flow = incoming_call(acd_session="s9").rings(A).rings(B).answers(B).hangs_up(A).hangs_up(B, after=9)
    expected = only_record(flow.events)
    shuffled = list(flow.events)
    random.Random(7).shuffle(shuffled)
    reordered = only_record(shuffled + shuffled[:3])
    # The id comes from the first dialog seen, so it follows arrival order; nothing else does.
    assert {**reordered, "record_id": None} == {**expected, "record_id": None}


def test_connect_and_release_before_setup() -> None:
    flow = incoming_call().rings(A).answers(A).hangs_up(A, after=5)
    setup, connect, release = flow.events
    r = only_record([connect, release, setup])
    assert (r["started_at"], r["outcome"], r["talk_seconds"]) == (setup.event_time, "answered", 5.0)


def test_a_ring_never_answered_nor_released_closes_by_timeout() -> None:
    config = CallRecordsConfig(ring_timeout_ms=60_000)
    r = only_record(incoming_call().rings(A).events, config=config)
    assert (r["closed_by"], r["outcome"], r["ended_at"]) == ("timeout", "missed", r["started_at"])


def test_a_connected_leg_without_release_closes_after_the_maximum_duration() -> None:
    config = CallRecordsConfig(max_duration_ms=3600_000)
    r = only_record(incoming_call().rings(A).answers(A, after=3).events, config=config)
    assert (r["closed_by"], r["outcome"], r["answered_by"]) == ("timeout", "answered", A)


def test_a_late_event_restates_the_record_with_a_higher_revision() -> None:
    flow = incoming_call(acd_session="s5").rings(A).hangs_up(A, after=5)
    late = incoming_call(acd_session="s5")
    late.t = flow.t + 60_000
    late.rings(B).answers(B).hangs_up(B)
    events = flow.events + late.events
    result = run(events)
    revisions = [(r["revision"], r["outcome"], len(r["legs"])) for r in result.records]
    assert revisions == [(1, "abandoned", 1), (2, "answered", 2)]
    assert len({r["record_id"] for r in result.records}) == 1


def test_a_new_leg_within_the_linger_period_joins_the_call() -> None:
    flow = incoming_call(acd_session="s6").rings(A).hangs_up(A, after=5).rings(B, after=8).answers(B)
    flow.hangs_up(B)
    r = only_record(flow.events)
    assert (r["revision"], r["answered_by"], len(r["legs"])) == (1, B, 2)


def test_closed_calls_are_forgotten_after_retention() -> None:
    result = run(incoming_call().rings(A).hangs_up(A).events)
    assert len(result.records) == 1
    assert result.store.processor_keys() == []


@pytest.mark.parametrize("tenant", ["acme", "globex"])
def test_tenants_never_mix(tenant: str) -> None:
    one = incoming_call(tenant="acme", acd_session="same").rings(A).hangs_up(A)
    two = incoming_call(tenant=tenant, acd_session="same").rings(B).hangs_up(B)
    result = run(one.events + two.events)
    assert len(result.records) == (1 if tenant == "acme" else 2)


# -- Keyyo's minimal URL template: no DREF, paired by line and numbers ---------------------------


def minimal_call(at_s: float = 0, line: str = A, caller: str = EXTERNAL):  # type: ignore[no-untyped-def]
    from tests.scenarios import T0
    return incoming_call(at=T0 + int(at_s * 1000), caller=caller, minimal=True)


def test_a_minimal_template_call_is_recorded_as_approximate() -> None:
    r = only_record(minimal_call().rings(A).answers(A, after=3).hangs_up(after=20).events)
    assert (r["outcome"], r["answered_by"], r["wait_seconds"], r["talk_seconds"]) == (
        "answered", A, 3.0, 20.0)
    assert r["correlation"] == "approximate"
    assert [(leg["dref"], leg["callref"]) for leg in r["legs"]] == [(None, None)]


def test_overlapping_calls_between_the_same_numbers_pair_in_arrival_order() -> None:
    # The same caller rings A twice (call waiting): the CONNECT goes to the older ringing leg,
    # the first RELEASE to the oldest open leg.
    first = minimal_call().rings(A)
    second = minimal_call(at_s=1).rings(A)
    events = [first.events[0], second.events[0]]
    first.answers(A, after=2).hangs_up(after=10)
    second.t = first.t
    second.hangs_up(after=1)
    events += first.events[1:] + second.events[1:]
    result = run(events)
    outcomes = sorted((r["outcome"], r["talk_seconds"]) for r in result.records)
    assert outcomes == [("answered", 10.0), ("missed", 0.0)]
    assert {r["correlation"] for r in result.records} == {"approximate"}


def test_minimal_duplicates_with_tsms_count_once_and_lines_never_mix() -> None:
    on_a = minimal_call().rings(A).answers(A, after=3).hangs_up(after=5)
    on_b = minimal_call().rings(B).hangs_up(after=4)
    events = sorted([*on_a.events, *on_a.events, *on_b.events], key=lambda n: n.event_time)
    result = run(events)
    assert sorted((r["legs"][0]["account"], r["outcome"]) for r in result.records) == [
        (A, "answered"), (B, "missed")]
    assert not result.dead_letters


def test_the_pairing_of_a_line_is_bounded_and_forgotten() -> None:
    flood = minimal_call()
    for _ in range(100):  # SETUPs never answered nor released
        flood.rings(A, after=0.01)
    result = run(flood.events, CallRecordsConfig(ring_timeout_ms=60_000))
    assert len(result.records) == 100 and {r["closed_by"] for r in result.records} == {"timeout"}
    assert not [k for k in result.store.processor_keys() if k.startswith("p/")]


def test_call_state_is_compact_and_reads_back_the_same_and_the_older_form() -> None:
    """A call's state value is an array (field names not repeated); it reads back to the same
    call, and a value written in the earlier object form (old changelogs, checkpoints) still reads."""
    driver = Driver(CallRecords())
    flow = incoming_call(acd_session="s9").rings("33100000001").rings("33100000002").answers("33100000002")
    for n in flow.events:
        driver.send(b"acme", n.to_json(), parse_rfc3339_ms(n.event_time))
    [key] = [k for k in driver.store.processor_keys() if k.startswith("c/")]
    _, tenant, call_id = key.split("/", 2)
    raw = driver.store.get(key)
    assert raw is not None and raw.startswith(b"[1,")
    call = unpack_call(raw, tenant, call_id)
    assert call["id"] == call_id and call["tenant"] == tenant and len(call["legs"]) == 2
    assert pack_call(call) == raw
    fields = ("dref", "callref", "account", "caller", "callee", "setup_at", "connect_at", "release_at",
              "replaces", "session_id", "is_acd", "redirecting_number", "first_at", "voicemail", "approx")
    older = {**call, "legs": {dref: dict(zip(fields, leg, strict=True))
                              for dref, leg in call["legs"].items()}}
    assert unpack_call(orjson.dumps(older), tenant, call_id) == call  # the older object form
    assert len(raw) < 450  # two legs; the object form took ≈ 1,000 bytes


def test_a_calls_first_dref_has_no_index_entry_and_a_merged_calls_dref_gets_one() -> None:
    """A call's id is derived from its first DREF, which therefore needs no index entry; when two
    calls turn out to be one, the DREF whose call went away is indexed to the call kept."""
    flow = incoming_call().rings(A, callref="111").rings(B, after=1, callref="222")
    dref_a, dref_b = flow.dialogs[A].dref, flow.dialogs[B].dref
    link = replace(flow.events[1], type="CONNECT", callref="111", event_id="ab" * 16,
                   event_time=rfc3339_ms(flow.t + 2000))
    driver = Driver(CallRecords())

    def send(n: Notification) -> None:
        driver.send(b"acme", n.to_json(), parse_rfc3339_ms(n.event_time))

    send(flow.events[0])
    send(flow.events[1])
    keys = set(driver.store.processor_keys())
    calls = sorted(k for k in keys if k.startswith("c/"))
    assert len(calls) == 2 and keys - set(calls) == {"i/acme/c/111", "i/acme/c/222"}
    first_call = driver.values(CALL_UPDATES.name)[0]["call_id"]
    send(link)  # leg B's call and leg A's turn out to be one: A's, the earlier, is kept
    assert set(driver.store.processor_keys()) == {
        f"c/acme/{first_call}", "i/acme/c/111", "i/acme/c/222", f"i/acme/d/{dref_b}"}
    assert driver.store.get(f"i/acme/d/{dref_b}") == first_call.encode()
    assert f"i/acme/d/{dref_a}" not in driver.store.processor_keys()
    flow.t += 3000
    flow.hangs_up(B).hangs_up(A)
    for n in flow.events[2:]:
        send(n)
    driver.flush(10 * 3600_000)
    driver.flush(10 * 3600_000)
    [record] = driver.values(CALL_RECORDS.name)
    assert (record["record_id"], len(record["legs"]), record["closed_by"]) == (first_call, 2, "release")
    assert driver.store.processor_keys() == []
