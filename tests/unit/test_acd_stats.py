"""ACD statistics, pure: hand-computed figures for call flows written with the scenario builders.

Notifications go through the call-records logic (in-memory driver), its records through the
acd-stats logic (another in-memory driver), as on the real pipeline. Every expected number below
is worked out by hand in the comments, not by the code under test.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources
from typing import Any

import jsonschema
import orjson
import pytest

from processors.acd_config import AcdConfig, AcdConfigError, TenantAcd, parse_acd_config
from processors.acd_stats import AcdStatsLogic
from processors.driver import Driver
from schemas.acd_stats import SERVICE_LEVEL_FORMULAS, service_level
from schemas.notification import Notification, parse_rfc3339_ms, rfc3339_ms
from schemas.topics import ACD_STATS, DEAD_LETTERS
from tests.scenarios import incoming_call, run

SCHEMA = jsonschema.Draft202012Validator(json.loads(
    resources.files("schemas").joinpath("json/keyyo.acd-stats.v1.schema.json").read_text()))
A, B, C = "33100000001", "33100000002", "33100000003"
NINE = 1_794_992_400_000  # 2026-11-18T09:00:00Z = 10:00 in Paris
MIN = 60_000
_sessions = itertools.count(1)


def acd(at: int, **kw: Any) -> Any:
    return incoming_call(acd_session=f"{next(_sessions):040x}", at=at, **kw)


def records_of(*flows: Any) -> list[dict[str, Any]]:
    """The call records of flows (highest revision each), in the order they closed."""
    events: list[Notification] = sorted((n for f in flows for n in f.events),
                                        key=lambda n: parse_rfc3339_ms(n.event_time))
    result = run(events)
    assert not result.dead_letters
    return result.records


def stats(records: list[dict[str, Any]], config: AcdConfig | None = None,
          settle: bool = False) -> tuple[Driver, dict[str, dict[str, Any]]]:
    """Feed records to acd-stats; the latest figures per key (every output checked on the way)."""
    driver = Driver(AcdStatsLogic(config), processor="acd-stats")
    for r in records:
        driver.send(r["tenant"].encode(), orjson.dumps(r), parse_rfc3339_ms(r["ended_at"]))
    if settle:
        driver.flush(3 * 3600_000)
    return driver, latest(driver)


def latest(driver: Driver) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    seen: set[tuple[bytes, int]] = set()
    for o in driver.outputs:
        if o.topic != ACD_STATS.name:
            continue
        value = orjson.loads(o.value)
        SCHEMA.validate(value)
        assert (o.key, value["revision"]) not in seen  # one value per revision
        seen.add((o.key, value["revision"]))
        assert o.key.decode() == f"{value['tenant']}|{value['queue']}|{value['interval_start']}"
        prev = out.get(o.key.decode())
        assert prev is None or value["revision"] == prev["revision"] + 1
        out[o.key.decode()] = value
    return out


def the_mix() -> list[Any]:
    """Seven ACD calls and one ordinary call, all starting between 09:01 and 09:12 UTC."""
    return [
        # 1. ring-all, B answers after 12 s (within SL), talks 100 s; A and C stop ringing
        acd(NINE + 1 * MIN).rings(A).rings(B, after=0).rings(C, after=0).answers(B, after=12)
        .hangs_up(A, after=0).hangs_up(C, after=0).hangs_up(B, after=100),
        # 2. one after another: A rings 15 s, then B rings and answers after 10 s: wait 25 s, talk 60
        acd(NINE + 2 * MIN).rings(A).hangs_up(A, after=15).rings(B, after=0).answers(B, after=10)
        .hangs_up(B, after=60),
        # 3. short abandon: the caller hangs up after 3 s
        acd(NINE + 3 * MIN).rings(A).hangs_up(after=3),
        # 4. abandon after 10 s: within SL, not short
        acd(NINE + 4 * MIN).rings(A).rings(B, after=0).hangs_up(after=10),
        # 5. long abandon: A rings 20 s, B 15 s more: wait 35 s
        acd(NINE + 5 * MIN).rings(A).hangs_up(A, after=20).rings(B, after=0).hangs_up(B, after=15),
        # 6. voicemail picks up after 30 s on A's leg, 40 s message
        acd(NINE + 6 * MIN).rings(A).answers(A, after=30, voicemail="1234567890123456789012")
        .hangs_up(after=40),
        # 7. not an ACD call: not counted
        incoming_call(at=NINE + 7 * MIN).rings(A).answers(A, after=2).hangs_up(after=5),
        # 8. C answers after exactly 20 s (within SL: <=), talks 30 s
        acd(NINE + 8 * MIN).rings(C).answers(C, after=20).hangs_up(after=30),
    ]


def test_every_figure_of_an_interval_by_hand() -> None:
    _, figures = stats(records_of(*the_mix()))
    assert list(figures) == ["acme|default|2026-11-18T09:00:00.000Z"]
    f = figures["acme|default|2026-11-18T09:00:00.000Z"]
    assert f["interval_end"] == "2026-11-18T09:15:00.000Z"
    assert f["local_start"] == "2026-11-18T10:00:00+01:00"
    assert (f["interval_minutes"], f["timezone"]) == (15, "Europe/Paris")
    assert {k: f[k] for k in ("offered", "answered", "abandoned", "voicemail", "short_abandoned",
                              "answered_within_sl", "abandoned_within_sl")} == {
        "offered": 7, "answered": 3, "abandoned": 3, "voicemail": 1, "short_abandoned": 1,
        "answered_within_sl": 2,   # calls 1 (12 s) and 8 (20 s); call 2 waited 25 s
        "abandoned_within_sl": 2,  # calls 3 (3 s) and 4 (10 s)
    }
    # A = 3, B = 3 - 1 short = 2, A_sl = 2: 2 / (3 + 2)
    assert f["service_level"] == 0.4
    assert f["service_level_formula"] == "abandons_against" and f["short_abandons_excluded"]
    assert f["wait_seconds"] == 135.0                       # 12+25+3+10+35+30+20
    assert f["avg_wait_seconds"] == round(135 / 7, 3)
    assert f["answered_wait_seconds"] == 57.0 and f["asa_seconds"] == 19.0   # (12+25+20) / 3
    assert f["abandoned_wait_seconds"] == 48.0 and f["avg_abandon_seconds"] == 16.0  # (3+10+35) / 3
    assert f["talk_seconds"] == 190.0 and f["avg_talk_seconds"] == round(190 / 3, 3)  # 100+60+30
    assert f["max_wait_seconds"] == 35.0
    assert f["agents"] == [
        # A rang in calls 1-6 and answered none (call 6 was voicemail on its leg)
        {"line": A, "offered": 6, "answered": 0, "missed": 6, "talk_seconds": 0.0},
        # B: answered 1 (100 s) and 2 (60 s), missed 4 and 5
        {"line": B, "offered": 4, "answered": 2, "missed": 2, "talk_seconds": 160.0},
        # C: missed 1, answered 8 (30 s)
        {"line": C, "offered": 2, "answered": 1, "missed": 1, "talk_seconds": 30.0},
    ]
    assert f["revision"] == 7 and not f["final"]  # one revision per counted call


@pytest.mark.parametrize(("formula", "exclude_short", "expected"), [
    # A = 3, A_sl = 2; abandons: B = 3, B_sl = 2, 1 short. Excluding it: B = 2, B_sl = 1.
    ("abandons_against", True, 0.4),               # 2 / (3 + 2)
    ("abandons_within_sl_ignored", True, 0.5),     # 2 / (3 + 2 - 1)
    ("abandons_within_sl_count_for", True, 0.6),   # (2 + 1) / (3 + 2)
    ("abandons_ignored", True, 0.6667),            # 2 / 3
    ("abandons_against", False, 0.3333),           # 2 / (3 + 3)
    ("abandons_within_sl_ignored", False, 0.5),    # 2 / (3 + 3 - 2)
    ("abandons_within_sl_count_for", False, 0.6667),  # (2 + 2) / (3 + 3)
    ("abandons_ignored", False, 0.6667),           # 2 / 3
])
def test_each_service_level_formula(formula: str, exclude_short: bool, expected: float) -> None:
    config = AcdConfig(TenantAcd(service_level_formula=formula, exclude_short_abandons=exclude_short))
    _, figures = stats(records_of(*the_mix()), config)
    (f,) = figures.values()
    assert (f["service_level"], f["service_level_formula"], f["short_abandons_excluded"]) == (
        expected, formula, exclude_short)


def test_service_level_is_null_without_a_denominator() -> None:
    # Only a short abandon (excluded) and a voicemail: nothing to measure.
    _, figures = stats(records_of(
        acd(NINE).rings(A).hangs_up(after=2),
        acd(NINE + MIN).rings(A).answers(A, after=5, voicemail="1" * 22).hangs_up(after=9)))
    (f,) = figures.values()
    assert (f["offered"], f["service_level"], f["asa_seconds"], f["avg_talk_seconds"]) == (
        2, None, None, None)
    assert f["avg_abandon_seconds"] == 2.0 and f["max_wait_seconds"] == 5.0
    for formula in SERVICE_LEVEL_FORMULAS:
        assert service_level(0, 1, 1, 0, 1, formula, True) is None


def test_a_call_just_before_a_boundary_counts_in_the_interval_it_started_in() -> None:
    before = acd(NINE + 15 * MIN - 500).rings(A).answers(A, after=4).hangs_up(after=30)  # 09:14:59.5
    on = acd(NINE + 15 * MIN).rings(B).hangs_up(after=7)                                 # 09:15:00.0
    _, figures = stats(records_of(before, on))
    assert {k: (f["offered"], f["answered"], f["abandoned"]) for k, f in figures.items()} == {
        "acme|default|2026-11-18T09:00:00.000Z": (1, 1, 0),
        "acme|default|2026-11-18T09:15:00.000Z": (1, 0, 1),
    }


@pytest.mark.parametrize(("minutes", "expected"), [
    # Paris goes from 03:00 CEST back to 02:00 CET at 01:00 UTC on 2026-10-25.
    (60, {"2026-10-25T00:00:00.000Z": "2026-10-25T02:00:00+02:00",
          "2026-10-25T01:00:00.000Z": "2026-10-25T02:00:00+01:00",
          "2026-10-25T02:00:00.000Z": "2026-10-25T03:00:00+01:00"}),
    (15, {"2026-10-25T00:30:00.000Z": "2026-10-25T02:30:00+02:00",
          "2026-10-25T01:30:00.000Z": "2026-10-25T02:30:00+01:00",
          "2026-10-25T02:00:00.000Z": "2026-10-25T03:00:00+01:00"}),
])
def test_the_autumn_dst_change_gives_two_distinct_local_hours(minutes: int, expected: dict[str, str]) -> None:
    midnight = 1_792_886_400_000  # 2026-10-25T00:00:00Z
    flows = [acd(midnight + m * MIN).rings(A).answers(A, after=5).hangs_up(after=10)
             for m in (40, 100, 125)]   # 02:40 CEST, 02:40 CET, 03:05 CET
    _, figures = stats(records_of(*flows), AcdConfig(TenantAcd(interval_minutes=minutes)))
    got = {f["interval_start"]: f["local_start"] for f in figures.values()}
    assert got == expected
    assert all(f["offered"] == 1 for f in figures.values())
    assert all(parse_rfc3339_ms(f["interval_end"]) - parse_rfc3339_ms(f["interval_start"]) == minutes * MIN
               for f in figures.values())


def test_the_spring_dst_change_and_a_half_hour_zone_align_locally() -> None:
    spring = 1_774_746_000_000  # 2026-03-29T01:00:00Z: Paris jumps from 02:00 CET to 03:00 CEST
    flows = [acd(spring - 10 * MIN).rings(A).hangs_up(after=8),   # 01:50 CET
             acd(spring + 10 * MIN).rings(A).hangs_up(after=8)]   # 03:10 CEST
    _, figures = stats(records_of(*flows), AcdConfig(TenantAcd(interval_minutes=60)))
    assert {f["interval_start"]: f["local_start"] for f in figures.values()} == {
        "2026-03-29T00:00:00.000Z": "2026-03-29T01:00:00+01:00",
        "2026-03-29T01:00:00.000Z": "2026-03-29T03:00:00+02:00"}
    # Kolkata is UTC+05:30: its hours start at hh:30 UTC.
    flows = [acd(NINE + 10 * MIN).rings(A).hangs_up(after=8),   # 14:40 IST
             acd(NINE + 40 * MIN).rings(A).hangs_up(after=8)]   # 15:10 IST
    _, figures = stats(records_of(*flows), AcdConfig(TenantAcd(interval_minutes=60, timezone="Asia/Kolkata")))
    assert {f["interval_start"]: f["local_start"] for f in figures.values()} == {
        "2026-11-18T08:30:00.000Z": "2026-11-18T14:00:00+05:30",
        "2026-11-18T09:30:00.000Z": "2026-11-18T15:00:00+05:30"}


def restated(record: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**record, "revision": record["revision"] + 1, **changes}


def test_a_restated_record_replaces_its_contribution_and_duplicates_count_once() -> None:
    (first,) = records_of(acd(NINE + MIN).rings(A).hangs_up(after=30))   # abandoned after 30 s
    second = restated(first, outcome="answered", answered_by=A, wait_seconds=12.0, talk_seconds=50.0,
                      answered_at=rfc3339_ms(parse_rfc3339_ms(first["started_at"]) + 12_000))
    second["legs"] = [{**first["legs"][0], "connect_at": second["answered_at"]}]
    _, figures = stats([first, first, second, first, second])
    (f,) = figures.values()
    assert (f["offered"], f["answered"], f["abandoned"], f["answered_within_sl"]) == (1, 1, 0, 1)
    assert (f["abandoned_wait_seconds"], f["max_wait_seconds"], f["asa_seconds"]) == (0.0, 12.0, 12.0)
    assert f["agents"] == [{"line": A, "offered": 1, "answered": 1, "missed": 0, "talk_seconds": 18.0}]
    assert f["revision"] == 2  # duplicates and the stale revision changed nothing


def test_a_restatement_that_moves_a_call_to_another_interval() -> None:
    one, two = records_of(acd(NINE + MIN).rings(A).hangs_up(after=40),
                          acd(NINE + 2 * MIN).rings(B).hangs_up(after=10))
    moved = restated(one, started_at=rfc3339_ms(NINE + 16 * MIN),
                     ended_at=rfc3339_ms(NINE + 16 * MIN + 40_000))
    _, figures = stats([one, two, moved])
    old = figures["acme|default|2026-11-18T09:00:00.000Z"]
    new = figures["acme|default|2026-11-18T09:15:00.000Z"]
    # the 40 s wait left the first interval: its maximum falls back to the 10 s of the other call
    assert (old["offered"], old["abandoned"], old["max_wait_seconds"], old["revision"]) == (1, 1, 10.0, 3)
    assert (new["offered"], new["abandoned"], new["max_wait_seconds"], new["revision"]) == (1, 1, 40.0, 1)


def test_final_after_grace_restated_within_the_window_refused_after_it() -> None:
    early = acd(NINE + MIN).rings(A).answers(A, after=5).hangs_up(after=60)
    later = acd(NINE + 30 * MIN).rings(B).hangs_up(after=4)   # moves acme's time past 09:17
    first, nxt = records_of(early, later)
    driver, figures = stats([first, nxt])
    f = figures["acme|default|2026-11-18T09:00:00.000Z"]
    assert f["final"] and f["revision"] == 2 and f["offered"] == 1   # final: same figures, revision + 1
    # a call of 09:05 closing two hours late: within the 48 h window, a new revision, still final
    late = records_of(acd(NINE + 5 * MIN).rings(C).hangs_up(after=6))[0]
    late_at = NINE + 2 * 3600_000
    driver.send(b"acme", orjson.dumps(late), late_at)
    f = latest(driver)["acme|default|2026-11-18T09:00:00.000Z"]
    assert (f["offered"], f["abandoned"], f["final"], f["revision"]) == (2, 1, True, 3)
    # three days later, another 09:0x call: the interval is closed to restatement
    (three_days,) = records_of(acd(NINE + 72 * 3600_000).rings(B).hangs_up(after=4))
    driver.send(b"acme", orjson.dumps(three_days), NINE + 72 * 3600_000)
    too_late = records_of(acd(NINE + 6 * MIN).rings(C).hangs_up(after=6))[0]
    driver.send(b"acme", orjson.dumps(too_late), NINE + 72 * 3600_000)
    (dead,) = driver.values(DEAD_LETTERS.name)
    assert "closed to restatement" in dead["reason"] and "restate_hours 48" in dead["reason"]
    assert dead["processor"] == "acd-stats"
    # the 09:00 and 09:30 intervals were forgotten with every call they held
    assert {k.split("/")[3] for k in driver.store.processor_keys() if k[0] in "am"} == {
        str(NINE + 72 * 3600_000)}
    assert [k for k in driver.store.processor_keys() if k[0] == "k"] == [f"k/acme/{three_days['record_id']}"]


def test_state_is_forgotten_after_the_window() -> None:
    driver, _ = stats(records_of(*the_mix()), settle=False)
    assert driver.store.processor_keys()
    driver.flush(49 * 3600_000)
    assert driver.store.processor_keys() == []


def test_one_tenants_clock_never_finalises_anothers_intervals() -> None:
    mine = records_of(acd(NINE + MIN, tenant="acme").rings(A).hangs_up(after=9))
    theirs = records_of(acd(NINE + 50 * MIN, tenant="other").rings(A).hangs_up(after=9))
    _, figures = stats(mine + theirs)
    assert not figures["acme|default|2026-11-18T09:00:00.000Z"]["final"]
    assert figures["other|default|2026-11-18T09:45:00.000Z"]["offered"] == 1


def test_queues_by_number_then_by_agent_line_else_default() -> None:
    config = parse_acd_config({"acd": {"tenants": {"acme": {"queues": [
        {"name": "sales", "numbers": ["33199999999"]},
        {"name": "support", "agents": [C]},
    ]}}}})
    by_number = acd(NINE + MIN, redirecting="33199999999").rings(A).hangs_up(after=5)
    by_agent = acd(NINE + 2 * MIN).rings(B).hangs_up(B, after=5).rings(C, after=0).hangs_up(after=5)
    neither = acd(NINE + 3 * MIN).rings(A).hangs_up(after=5)
    _, figures = stats(records_of(by_number, by_agent, neither), config)
    assert {k.split("|")[1]: f["offered"] for k, f in figures.items()} == {
        "sales": 1, "support": 1, "default": 1}


def test_replay_gives_the_same_bytes() -> None:
    records = records_of(*the_mix())
    runs = [stats(records, settle=True)[0].outputs for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 8   # 7 calls, then final; nothing on forget


def test_bad_records_are_dead_lettered_and_the_rest_counted() -> None:
    good = records_of(acd(NINE + MIN).rings(A).hangs_up(after=5))[0]
    driver = Driver(AcdStatsLogic(), processor="acd-stats")
    bad = [
        (b"acme", b"{not json", "not JSON"),
        (b"acme", orjson.dumps({**good, "schema": "x"}), "schema"),
        (b"other", orjson.dumps(good), "key"),
        (b"acme", orjson.dumps({**good, "wait_seconds": -1}), "wait_seconds"),
        (b"acme", orjson.dumps({**good, "started_at": "yesterday"}), "started_at"),
        (b"acme", orjson.dumps({**good, "legs": [{"account": 5}]}), "legs[0].account"),
        (b"acme", orjson.dumps({**good, "outcome": "lost"}), "outcome"),
        (b"acme", orjson.dumps({**good, "record_id": "../x"}), "record_id"),
    ]
    for key, value, _ in bad:
        driver.send(key, value, NINE)
    driver.send(b"acme", orjson.dumps(good), NINE)
    reasons = [d["reason"] for d in driver.values(DEAD_LETTERS.name)]
    assert len(reasons) == len(bad)
    for reason, (_, _, field) in zip(reasons, bad, strict=True):
        assert field in reason
    assert latest(driver)["acme|default|2026-11-18T09:00:00.000Z"]["offered"] == 1


@pytest.mark.parametrize(("doc", "message"), [
    ({"acd": {"interval_minutes": 20}}, "acd.interval_minutes: 20 is not 15, 30 or 60"),
    ({"acd": {"timezone": "Mars/Olympus"}}, "unknown time zone"),
    ({"acd": {"service_level_formula": "best"}}, "acd.service_level_formula"),
    ({"acd": {"short_abandon_seconds": 30}}, "exceeds service_level_seconds"),
    ({"acd": {"grace_seconds": "2m"}}, "wrong type"),
    ({"acd": {"colour": 1}}, "acd.colour: unknown setting"),
    ({"acd": {"queues": []}}, "queues are per tenant"),
    ({"acd": {"tenants": {"t": {"queues": [{"name": "a|b", "numbers": ["1"]}]}}}}, "not a queue name"),
    ({"acd": {"tenants": {"t": {"queues": [{"name": "q"}]}}}}, "give numbers or agents"),
    ({"acd": {"tenants": {"t": {"queues": [{"name": "q", "agents": ["x"]}]}}}}, "line numbers"),
])
def test_configuration_mistakes_are_one_clear_line(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(AcdConfigError, match=message.replace("|", r"\|").replace(".", r"\.")):
        parse_acd_config(doc)


def test_tenant_settings_override_the_defaults() -> None:
    config = parse_acd_config({"acd": {"service_level_seconds": 30, "tenants": {
        "acme": {"interval_minutes": 30, "timezone": "Europe/London"}}}})
    assert config.tenant("acme") == TenantAcd(interval_minutes=30, timezone="Europe/London",
                                              service_level_seconds=30.0)
    assert config.tenant("other") == TenantAcd(service_level_seconds=30.0)


def test_hidden_or_anonymous_numbers_are_counted() -> None:
    good = records_of(acd(NINE + MIN).rings(A).hangs_up(after=5))[0]
    _, figures = stats([{**good, "callee": "anonymous"},
                        {**good, "record_id": "f" * 32, "callee": "", "redirecting_number": None}])
    assert figures["acme|default|2026-11-18T09:00:00.000Z"]["offered"] == 2
