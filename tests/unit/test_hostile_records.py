"""One bad record never stops a partition, corrupts a value or moves another tenant's time.

Every record goes through the runtime's own per-record step (the in-memory driver); what a
record can hold that breaks the contract, a bound or the logic is dead-lettered with the reason,
and the other tenant's call on the same partition still gets its record.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import pytest

from processors.call_records import CallRecords, CallRecordsConfig, unpack_call
from processors.contract import Output, Store
from processors.driver import Driver
from processors.step import Limits
from schemas.notification import parse_rfc3339_ms
from schemas.topics import CALL_RECORDS, DEAD_LETTERS
from tests.scenarios import T0, incoming_call

DEAD_LETTER = jsonschema.Draft202012Validator(json.loads(
    resources.files("schemas").joinpath("json/keyyo.dead-letter.v1.schema.json").read_text()))
A, B = "33100000001", "33100000002"


def wire(n: Any) -> dict[str, Any]:
    return dict(n.to_dict())


def send(driver: Driver, value: dict[str, Any] | bytes, key: bytes | None = None,
         ts: int | None = None) -> list[Output]:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    if key is None and isinstance(value, dict):
        key = str(value.get("tenant")).encode()
    return driver.send(key, raw, ts)


def good_call_of_globex(driver: Driver, start: int = T0) -> None:
    flow = incoming_call(tenant="globex").rings(B).answers(B).hangs_up(B)
    for n in flow.events:
        driver.send(b"globex", n.to_json(), parse_rfc3339_ms(n.event_time))


def dead_letters(driver: Driver) -> list[dict[str, Any]]:
    letters = driver.values(DEAD_LETTERS.name)
    for d in letters:
        DEAD_LETTER.validate(d)
    return letters


def records_of(driver: Driver, tenant: str) -> list[dict[str, Any]]:
    return [r for r in driver.values(CALL_RECORDS.name) if r["tenant"] == tenant]


BASE = wire(incoming_call().rings(A).events[0])


@pytest.mark.parametrize(("change", "reason"), [
    ({"event_time": 1795000000000}, "event_time: expected a string, got int"),
    ({"event_time": "9999-12-31T23:59:59.999Z"}, "event_time: does not match"),
    ({"event_time": "2026-02-30T10:00:00.000Z"}, "event_time: not a valid time"),
    ({"event_id": None}, "event_id: must not be null"),
    ({"tenant": 42}, "tenant: expected a string, got int"),
    ({"caller": "3" * 1_000_000}, "caller: longer than 64 characters (1000000)"),
    ({"account": "+" + "3" * 64}, "account: longer than 64 characters"),
    ({"is_acd": "yes"}, "is_acd: expected a boolean"),
    ({"version": 10**20}, "version: expected an integer"),
    ({"type": "setup"}, "type: expected SETUP"),
    ({"dref": "a b"}, "dref: does not match"),
    ({"schema": "keyyo.other.v1"}, "schema: expected"),
])
def test_a_record_breaking_the_contract_is_dead_lettered_and_the_partition_goes_on(
        change: dict[str, Any], reason: str) -> None:
    driver = Driver(CallRecords())
    bad = {**BASE, **change}
    send(driver, bad, key=b"acme")
    good_call_of_globex(driver)
    driver.flush(3600_000)
    [letter] = dead_letters(driver)
    assert reason in letter["reason"]
    assert letter["offset"] == 0 and letter["attempts"] == 1
    assert letter["value_bytes"] == len(json.dumps(bad).encode()) and len(letter["value"]) <= 64 * 1024
    assert [r["outcome"] for r in records_of(driver, "globex")] == ["answered"]
    assert records_of(driver, "acme") == []


def test_not_json_a_tombstone_and_a_key_that_is_not_the_tenant_are_dead_lettered() -> None:
    driver = Driver(CallRecords())
    send(driver, b"{not json", key=b"acme")
    driver.send(b"acme", None)
    send(driver, BASE, key=b"globex")  # a direct producer's mistake: would split the call
    good_call_of_globex(driver)
    driver.flush(3600_000)
    reasons = [d["reason"] for d in dead_letters(driver)]
    assert reasons[0].startswith("value: not JSON")
    assert reasons[1] == "value: missing (a tombstone)"
    assert reasons[2] == "key: the record key must be the tenant 'acme'"
    assert len(records_of(driver, "globex")) == 1


def test_a_call_stops_growing_at_its_leg_bound() -> None:
    driver = Driver(CallRecords(CallRecordsConfig(max_legs=5)))
    flow = incoming_call()
    for i in range(12):  # well-formed SETUPs sharing one CALLREF, each with its own DREF
        flow.rings(f"331000000{i:02d}", callref="785412369")
    for n in flow.events:
        driver.send(b"acme", n.to_json(), parse_rfc3339_ms(n.event_time))
    good_call_of_globex(driver)
    driver.flush(3600_000)
    letters = dead_letters(driver)
    assert len(letters) == 7
    assert all(d["reason"] == "refused: the call would hold 6 legs, more than max_legs 5" for d in letters)
    [acme] = records_of(driver, "acme")
    assert len(acme["legs"]) == 5 and acme["closed_by"] == "timeout"
    assert len(records_of(driver, "globex")) == 1


def test_an_output_over_the_size_bound_is_dead_lettered_and_the_state_left_as_it_was() -> None:
    driver = Driver(CallRecords(), limits=Limits(max_value_bytes=1100))  # the 4th leg goes past it
    flow = incoming_call(acd_session="s1")
    for line in (A, B, "33100000003", "33100000004"):
        flow.rings(line)
    for n in flow.events:
        driver.send(b"acme", n.to_json(), parse_rfc3339_ms(n.event_time))
    letters = dead_letters(driver)
    assert letters and "bytes exceeds 1100 bytes" in letters[0]["reason"]
    kept = [k for k in driver.store.processor_keys() if k.startswith("c/")]
    assert len(kept) == 1
    _, tenant, call_id = kept[0].split("/", 2)
    assert len(unpack_call(driver.store.get(kept[0]) or b"{}", tenant, call_id)["legs"]) < 4


class Wrapping:
    """The call-records logic, wrapped rather than subclassed: its class may be compiled (`make
    compile`), and an interpreted class cannot inherit from a compiled one."""

    def __init__(self) -> None:
        self.inner = CallRecords()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Exploding(Wrapping):
    """Call-records logic with a bug that one caller number triggers."""

    def on_event(self, store: Store, n: Any, now_ms: int) -> list[Output]:
        if n.caller == "33999999999":
            store.put("garbage", b"half-done work")
            raise KeyError("a bug")
        return self.inner.on_event(store, n, now_ms)


def failures_logged(caplog: pytest.LogCaptureFixture) -> list[tuple[Any, ...]]:
    """(topic, partition, offset, error) of each failure the step logged."""
    return [(r.topic, r.partition, r.offset, r.error) for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "processing failed; record set aside"]


def test_an_exception_in_the_logic_sets_the_record_aside_and_undoes_its_work(
        caplog: pytest.LogCaptureFixture) -> None:
    driver = Driver(Exploding(), topic="notifications", partition=3)
    good_call_of_globex(driver)
    for n in incoming_call(caller="33999999999").rings(A).events:
        driver.send(b"acme", n.to_json(), parse_rfc3339_ms(n.event_time))
    driver.flush(3600_000)
    [letter] = dead_letters(driver)
    assert letter["reason"] == "processing failed: KeyError: 'a bug'"
    assert (letter["topic"], letter["partition"], letter["offset"]) == ("notifications", 3, 3)
    assert driver.store.get("garbage") is None
    assert len(records_of(driver, "globex")) == 1
    # The log says which record, read from the record only now that it failed.
    assert failures_logged(caplog) == [("notifications", 3, 3, "KeyError('a bug')")]


class TimerBug(Wrapping):
    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        if "acme" in key:
            raise RuntimeError("timer bug")
        return self.inner.on_timer(store, key, now_ms)


def test_a_failing_timer_is_dead_lettered_once_and_does_not_fire_again(
        caplog: pytest.LogCaptureFixture) -> None:
    driver = Driver(TimerBug(), partition=2)
    for n in incoming_call().rings(A).hangs_up(A).events:
        driver.send(b"acme", n.to_json(), parse_rfc3339_ms(n.event_time))
    good_call_of_globex(driver)
    driver.flush(3600_000)
    driver.flush(3600_000)
    letters = dead_letters(driver)
    assert [d["reason"] for d in letters] == ["timer failed: RuntimeError: timer bug"]
    assert letters[0]["timer"].startswith("c/acme/") and letters[0]["offset"] is None
    assert len(records_of(driver, "globex")) == 1
    assert failures_logged(caplog) == [("timer", 2, None, "RuntimeError('timer bug')")]


class UnrenderableFigures(Wrapping):
    """Call-records logic that also writes a ``latest`` output rendered at the transaction's end
    (as acd-stats' figures are), whose rendering fails for one tenant (a state it cannot read)."""

    def on_event(self, store: Store, n: Any, now_ms: int) -> list[Output]:
        def render() -> bytes:
            if n.tenant == "acme":
                raise ValueError("unreadable interval")
            return b'{"figures": 1}'
        figures = Output("figures", n.tenant.encode(), render, latest=True)
        return [*self.inner.on_event(store, n, now_ms), figures]


def test_an_output_that_cannot_be_rendered_is_dead_lettered_and_the_transaction_written() -> None:
    driver = Driver(UnrenderableFigures())
    for n in incoming_call().rings(A).hangs_up(A).events:
        out = driver.send(b"acme", n.to_json(), parse_rfc3339_ms(n.event_time))
        assert [o.topic for o in out] == ["keyyo.call-updates.v1", DEAD_LETTERS.name]
    good_call_of_globex(driver)
    driver.flush(3600_000)
    letters = dead_letters(driver)
    assert [d["reason"] for d in letters] == ["rendering failed: ValueError: unreadable interval"] * 2
    assert {(d["timer"], d["key"], d["offset"]) for d in letters} == {("output:figures", "acme", None)}
    assert len(records_of(driver, "acme")) == 1 and len(records_of(driver, "globex")) == 1
    assert driver.values("figures") == [{"figures": 1}] * 3  # globex's, one per notification


def test_an_event_far_ahead_of_its_record_timestamp_is_refused_and_moves_no_clock() -> None:
    driver = Driver(CallRecords())
    good = incoming_call(tenant="globex").rings(B)
    for n in good.events:
        driver.send(b"globex", n.to_json(), parse_rfc3339_ms(n.event_time))
    future = {**BASE, "event_time": "2286-11-20T17:46:39.999Z"}
    send(driver, future, ts=T0)
    year_2100 = {**BASE, "event_time": "2100-01-01T00:00:00.000Z"}
    send(driver, year_2100, ts=T0)
    reasons = [d["reason"] for d in dead_letters(driver)]
    assert reasons[0].startswith("event_time: does not match")
    assert "is more than 600 s ahead of the record's timestamp" in reasons[1]
    assert driver.store.time("acme") == 0
    good.answers(B, after=60).hangs_up(B, after=30)
    for n in good.events[1:]:
        driver.send(b"globex", n.to_json(), parse_rfc3339_ms(n.event_time))
    driver.flush(3600_000)
    [r] = records_of(driver, "globex")
    assert (r["outcome"], r["closed_by"], r["talk_seconds"]) == ("answered", "release", 30.0)


def test_live_mode_refuses_an_event_far_ahead_of_the_wall_clock() -> None:
    driver = Driver(CallRecords(), mode="live", wall_ms=T0)
    ahead = {**BASE, "event_time": "2026-11-18T12:06:40.000Z"}  # T0 + 1 h, no record timestamp
    send(driver, ahead)
    [letter] = dead_letters(driver)
    assert "ahead of the wall clock 2026-11-18T11:06:40.000Z" in letter["reason"]


def test_one_tenants_early_clock_does_not_close_another_tenants_ringing_call() -> None:
    """Per-tenant time: acme's clock running 5 minutes ahead (within the bound) moves acme's
    calls only; globex's ringing call is not timed out by it."""
    config = CallRecordsConfig(ring_timeout_ms=120_000)
    driver = Driver(CallRecords(config))
    ringing = incoming_call(tenant="globex").rings(B)
    for n in ringing.events:
        driver.send(b"globex", n.to_json(), parse_rfc3339_ms(n.event_time))
    early = incoming_call().rings(A, after=300)  # acme's clock says T0 + 300 s
    for n in early.events:
        driver.send(b"acme", n.to_json(), T0)
    assert records_of(driver, "globex") == []
    ringing.answers(B, after=20).hangs_up(B, after=40)
    for n in ringing.events[1:]:
        driver.send(b"globex", n.to_json(), parse_rfc3339_ms(n.event_time))
    driver.flush(3600_000)
    [r] = records_of(driver, "globex")
    assert (r["outcome"], r["closed_by"]) == ("answered", "release")
