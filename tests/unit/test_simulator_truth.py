"""The simulator's ground truth and the call-records logic agree, flow by flow and under chaos."""

from __future__ import annotations

import random

import pytest

from devtools.simulator import SCENARIOS, Chaos, PlannedCall, Planner, plan_traffic, schedule
from ingest.parsing import parse_notification
from processors.call_records import CallRecordsConfig
from schemas.notification import Notification
from tests.scenarios import T0, run
from tests.truth import comparable, expected_records, final_records

CONFIG = CallRecordsConfig(linger_ms=10_000, ring_timeout_ms=60_000, max_duration_ms=120_000)


def notifications(tenant: str, params_list: list[dict[str, str]]) -> list[Notification]:
    out = []
    for params in params_list:
        n = parse_notification(tenant, list(params.items()), "127.0.0.1", T0)
        assert isinstance(n, Notification), n
        out.append(n)
    return out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_flow_gives_the_expected_record(scenario: str) -> None:
    planner = Planner(["acme"], 5, random.Random(1))
    call = planner.plan(T0, scenario)
    result = run(notifications("acme", call.notifications()), CONFIG)
    assert [comparable(r) for r in result.records] == [call.expected()]


def test_a_dropped_release_closes_by_timeout_as_expected() -> None:
    planner = Planner(["acme"], 5, random.Random(2))
    call: PlannedCall = planner.plan(T0, "acd_simultaneous_answered")
    call.dropped.add(call.legs[1].dref)  # the agent who answered never hangs up
    result = run(notifications("acme", call.notifications()), CONFIG)
    assert [comparable(r) for r in result.records] == [call.expected()]
    assert result.records[0]["closed_by"] == "timeout"


def test_a_mix_under_chaos_gives_every_expected_record_once() -> None:
    rng = random.Random(3)
    planner = Planner(["acme", "globex"], 6, rng, time_scale=0.2)
    chaos = Chaos(duplicate=0.2, reorder=0.2, delay=0.1, delay_ms=800, drop_release=0.1)
    calls = plan_traffic(planner, rate=3, duration=60, start_ms=T0, chaos=chaos)
    sends = schedule(calls, chaos, rng)
    events = [n for s in sends for n in notifications(s.tenant, [s.params])]
    result = run(events, CONFIG)
    expected = expected_records(calls)
    got = final_records(result.records)
    assert len(calls) > 100
    assert got.keys() == expected.keys()
    for match, record in expected.items():
        assert got[match] == record, record["legs"][0]["dref"]


SINGLE_LEG = ("inbound_answered", "inbound_missed", "outbound_answered", "outbound_unanswered",
              "voicemail")


@pytest.mark.parametrize("scenario", SINGLE_LEG)
def test_keyyos_minimal_template_gives_approximate_records(scenario: str) -> None:
    planner = Planner(["acme"], 5, random.Random(4))
    call = planner.plan(T0, scenario)
    call.minimal = True
    assert set(call.notifications()[0]) == {"account", "caller", "callee", "type", "tsms"}
    result = run(notifications("acme", call.notifications()), CONFIG)
    assert [comparable(r) for r in result.records] == [call.expected()]
    assert result.records[0]["correlation"] == "approximate"


def test_a_minimal_template_mix_with_duplicates_pairs_every_call() -> None:
    rng = random.Random(5)
    planner = Planner(["acme", "globex"], 4, rng, time_scale=0.5)
    chaos = Chaos(duplicate=0.3)  # reordering is what pairing by arrival order cannot survive
    calls = plan_traffic(planner, rate=2, duration=120, start_ms=T0, chaos=chaos,
                         scenarios=list(SINGLE_LEG))
    for call in calls:
        call.minimal = True
    events = [n for s in schedule(calls, chaos, rng) for n in notifications(s.tenant, [s.params])]
    result = run(events, CONFIG)
    expected = expected_records(calls)
    assert len(calls) > 150 and len(expected) == len(calls)
    assert final_records(result.records) == expected
