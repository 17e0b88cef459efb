"""A broker that goes away: 503s or spooled 200s, and after it is back, every 200 exactly once.

These tests kill and restart a broker of their own (the local launcher), so they need Java and
Maven even when the session broker comes from elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from deploy.kafka_local import LocalKafka, temporary_broker
from devtools.traffic import answered_incoming
from tests.integration.edge import Edge, running_edge
from tests.kafka import local_launcher_available, read_values, wait_for

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.broker_control,
    pytest.mark.skipif(not local_launcher_available(), reason="needs Java and Maven"),
]


@pytest.fixture(scope="module")
def own_broker() -> Iterator[LocalKafka]:
    with temporary_broker() as broker:
        yield broker


@pytest.fixture
def broker_up(own_broker: LocalKafka) -> LocalKafka:
    if not own_broker.running():
        own_broker.start(progress=False)
    return own_broker


def calls(n: int, line: str = "33123456789") -> list[dict[str, str]]:
    """``n`` notifications, from answered incoming calls."""
    out: list[dict[str, str]] = []
    t = time.time_ns() // 1_000_000 - 3600_000  # within the edge's event-time bounds
    while len(out) < n:
        out.extend(answered_incoming(line, f"3361234{len(out):04d}", t))
        t += 1000
    return out[:n]


async def send(edge: Edge, params: list[dict[str, str]]) -> list[tuple[int, dict[str, str]]]:
    """Send each notification; return (status, body) of each."""
    results = []
    for p in params:
        async with edge.client.get("/v1/keyyo/acme/notifications",
                                   params={"key": "s3cret-acme", **p}) as resp:
            results.append((resp.status, await resp.json()))
            if resp.status == 503:
                assert resp.headers["Retry-After"] == "1"
    return results


def acknowledged(results: list[tuple[int, dict[str, str]]]) -> list[str]:
    return [body["event_id"] for status, body in results if status == 200]


async def test_without_spool_kafka_down_means_503_and_every_200_lands_once(
    broker_up: LocalKafka, prefix: str,
) -> None:
    traffic = calls(30)
    async with running_edge(broker_up.bootstrap, prefix, budget_s=1.0) as edge:
        before = await send(edge, traffic[:10])
        broker_up.kill()
        during = await send(edge, traffic[10:14])
        assert [s for s, _ in during] == [503] * 4
        await wait_for(lambda: not edge.publisher.kafka_ok, 10, what="kafka marked down")
        status, body = await edge.get("/readyz")
        assert status == 503 and body["checks"]["kafka"] is False
        await asyncio.to_thread(broker_up.start, progress=False)
        await wait_for(lambda: edge.publisher.kafka_ok, 60, what="kafka back")
        after = await send(edge, traffic[14:])
        values = await read_values(broker_up.bootstrap, edge.topic)
    ok = acknowledged(before) + acknowledged(after)
    assert len(ok) == 26
    counts = Counter(v["event_id"] for v in values)
    assert all(counts[event_id] == 1 for event_id in ok), counts
    assert max(counts.values()) == 1  # a 503'd event may land (it was in flight), never twice


async def test_with_spool_kafka_down_means_spooled_200s_replayed_in_order_exactly_once(
    broker_up: LocalKafka, prefix: str, tmp_path: Path,
) -> None:
    traffic = calls(40)
    async with running_edge(broker_up.bootstrap, prefix, budget_s=1.0,
                            spool_dir=tmp_path / "spool") as edge:
        before = await send(edge, traffic[:10])
        broker_up.kill()
        during = await send(edge, traffic[10:30])
        assert [(s, b["stored"]) for s, b in during] == [(200, "spooled")] * 20
        status, body = await edge.get("/readyz")
        assert status == 503 and body["checks"]["kafka"] is False
        await asyncio.to_thread(broker_up.start, progress=False)
        await wait_for(lambda: edge.publisher.kafka_ok, 60, what="kafka back")
        after = await send(edge, traffic[30:])
        await wait_for(lambda: (tmp_path / "spool" / "spool.log").stat().st_size == 0, 90,
                       what="spool drained")
        values = await read_values(broker_up.bootstrap, edge.topic)
    ok = acknowledged(before) + acknowledged(during) + acknowledged(after)
    assert len(ok) == 40
    assert [v["event_id"] for v in values] == ok  # one key, one partition: arrival order kept


async def test_spool_survives_an_edge_restart(
    broker_up: LocalKafka, prefix: str, tmp_path: Path,
) -> None:
    traffic = calls(12)
    spool = tmp_path / "spool"
    async with running_edge(broker_up.bootstrap, prefix, budget_s=1.0, spool_dir=spool) as edge:
        direct = await send(edge, traffic[:2])
        broker_up.kill()
        spooled = await send(edge, traffic[2:])
        topic = edge.topic
    assert {b.get("stored") for _, b in spooled} == {"spooled"}
    assert (spool / "spool.log").stat().st_size > 0
    await asyncio.to_thread(broker_up.start, progress=False)
    async with running_edge(broker_up.bootstrap, prefix, spool_dir=spool, create=False):
        await wait_for(lambda: (spool / "spool.log").stat().st_size == 0, 90, what="spool drained")
    values = await read_values(broker_up.bootstrap, topic)
    assert [v["event_id"] for v in values] == acknowledged(direct) + acknowledged(spooled)


async def test_readiness_turns_off_before_the_spool_is_full(
    broker_up: LocalKafka, prefix: str, tmp_path: Path,
) -> None:
    traffic = calls(30)
    async with running_edge(broker_up.bootstrap, prefix, budget_s=0.5,
                            spool_dir=tmp_path / "spool", spool_max_bytes=8000) as edge:
        await send(edge, traffic[:1])
        broker_up.kill()
        spool_ready_when_full = None
        statuses = []
        for params in traffic[1:]:
            ready = edge.publisher.spool_ready
            (status, _), = await send(edge, [params])
            statuses.append(status)
            if status == 503:
                spool_ready_when_full = ready
                break
        await asyncio.to_thread(broker_up.start, progress=False)
        await wait_for(lambda: (tmp_path / "spool" / "spool.log").stat().st_size == 0, 90,
                       what="spool drained")
    assert 200 in statuses and statuses[-1] == 503
    assert spool_ready_when_full is False


async def test_a_processor_rides_out_a_broker_outage_without_setting_anything_aside(
    broker_up: LocalKafka, prefix: str,
) -> None:
    """Kafka away is not the records' fault: the partition waits (and says it is stuck), then
    goes on; every call gets its record, nothing reaches the dead-letter topic."""
    from devtools.simulate import KafkaSender
    from devtools.simulator import Chaos, play
    from processors.registry import CALL_RECORDS_SPEC
    from schemas.topics import DEAD_LETTERS, NOTIFICATIONS
    from tests.integration.pipeline import FAST, provision, records, running_processor, traffic
    from tests.truth import expected_records, final_records

    bootstrap = broker_up.bootstrap
    await provision(bootstrap, prefix)
    now = time.time_ns() // 1_000_000
    calls_before, sends_before = traffic(seed=41, rate=8, duration=2, start_ms=now, chaos=Chaos())
    calls_after, sends_after = traffic(seed=42, rate=8, duration=2, start_ms=now + 1000, chaos=Chaos())
    topic = NOTIFICATIONS.full_name(prefix)
    async def produce(sends: list[Any]) -> None:
        sender = KafkaSender(bootstrap, topic)
        await sender.producer.start()
        try:
            await play(sends, sender, lambda: time.time_ns() // 1_000_000)
        finally:
            await sender.producer.stop()

    # Calls close 6 s after their last RELEASE: during the outage, so their transactions wait.
    logic = CALL_RECORDS_SPEC.logic(**{**FAST, "linger": 6})
    async with running_processor(bootstrap, prefix, logic=logic, stuck_after_s=2.0) as runtime:
        await wait_for(lambda: runtime.joined and not runtime.restoring, 30, what="processor ready")
        await produce(sends_before)
        await asyncio.to_thread(broker_up.stop)
        # The calls' closes come due while Kafka is away: their transaction waits, and says so.
        await wait_for(runtime.stuck, 30, interval=0.2, what="the outage seen in /readyz")
        stuck_while_away = runtime.stuck()
        await asyncio.to_thread(lambda: broker_up.start(progress=False))
        await produce(sends_after)
        expected = expected_records(calls_before + calls_after)

        async def complete() -> bool:
            return final_records(await records(bootstrap, prefix)).keys() >= expected.keys()

        await wait_for(complete, 90, interval=0.5, what="every call's record")
        ready = runtime.readiness()
        failed = {s.labels["kind"]: s.value for m in runtime.metrics.registry.collect()
                  if m.name == "keyyo_processor_failed_transactions" for s in m.samples
                  if s.name.endswith("_total")}
    assert stuck_while_away, "the outage was not visible"
    assert failed.get("refused", 0) == 0, failed  # never taken for the records' fault
    assert await read_values(bootstrap, DEAD_LETTERS.full_name(prefix)) == []
    got = final_records(await records(bootstrap, prefix))
    assert {k: got[k] for k in expected} == expected
    assert ready["progressing"]


async def test_the_executor_rides_out_a_broker_outage_and_sends_once(
    broker_up: LocalKafka, prefix: str,
) -> None:
    """An action that comes due while Kafka is away is not sent then (its ``sending`` cannot be
    committed), and is sent once after Kafka is back, by the same executor, which never stopped."""
    from deploy.topics import create_topics
    from devtools.sandbox import Sandbox, running
    from schemas.topics import ACTION_RESULTS, ACTIONS
    from tests.integration.test_executor import LINES, PASSWORDS, executor, final_results, publish, sms

    bootstrap = broker_up.bootstrap
    await create_topics(bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=1)
    sb = Sandbox(passwords=PASSWORDS)
    first = sms(1, LINES[0])
    due_while_away = sms(2, LINES[1], not_before=time.time_ns() // 1_000_000 + 10_000)
    async with running(sb) as url, executor(bootstrap, prefix, url) as ex:
        await publish(bootstrap, prefix, [first, due_while_away])

        async def first_sent() -> bool:
            got = await final_results(bootstrap, prefix)
            return got.get(first.action_id, {}).get("status") == "sent"

        await wait_for(first_sent, 30, interval=0.2, what="the first SMS sent")
        assert LINES[1] in ex.detail()["queued"], "the second SMS left its queue before its time"
        await asyncio.to_thread(broker_up.stop)
        # Out of its line's queue: its attempt has begun, and waits for `sending` to commit.
        await wait_for(lambda: LINES[1] not in ex.detail()["queued"], 30, interval=0.1,
                       what="the second SMS due while Kafka is away")
        # Its `sending` waits for Kafka: after 10 s the partition says so in /readyz and the metric.
        await wait_for(lambda: "stuck" in ex.detail(), 30, interval=0.2, what="the wait seen in /readyz")
        stuck_while_away = (ex.readiness()["progressing"], list(ex.detail()["stuck"]))
        gauge_while_away = [s.value for m in ex.metrics.registry.collect() for s in m.samples
                            if s.name == "keyyo_executor_stuck_partitions"]
        sent_while_away = [r for r in sb.requests if r["params"].get("MSG") == due_while_away.message]
        await asyncio.to_thread(lambda: broker_up.start(progress=False))
        back_at = time.time()

        async def second_sent() -> bool:
            got = await final_results(bootstrap, prefix)
            return got.get(due_while_away.action_id, {}).get("status") == "sent"

        await wait_for(second_sent, 90, interval=0.5, what="the second SMS sent once Kafka is back")
        assert ex.readiness() == {"joined": True, "restored": True, "progressing": True}
        assert "stuck" not in ex.detail()
    assert stuck_while_away == (False, [f"{prefix}keyyo.actions.v1:0"])
    assert gauge_while_away == [1]
    assert sent_while_away == [], "an SMS left while its `sending` could not be committed"
    second = [r for r in sb.requests if r["params"].get("MSG") == due_while_away.message and r["executed"]]
    assert len(second) == 1 and second[0]["at"] >= back_at
    executed = [r["params"]["MSG"] for r in sb.requests if r["executed"]]
    assert executed == [first.message, due_while_away.message]


async def test_an_executor_stopped_with_kafka_away_exits_and_nothing_is_sent_twice(
    broker_up: LocalKafka, prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped while its request is at Keyyo and Kafka is away: the result cannot be written, so
    after ``STOP_WRITE_S`` it is abandoned and the process exits anyway; the next owner finds
    ``sending`` without a result and reports the SMS ``unknown``, never sending it again."""
    import processors.executor as executor_module
    from deploy.topics import create_topics
    from devtools.sandbox import Faults, Sandbox, running
    from schemas.topics import ACTION_RESULTS, ACTIONS
    from tests.integration.test_executor import LINES, PASSWORDS, executor, final_results, publish, sms

    monkeypatch.setattr(executor_module, "STOP_WRITE_S", 3.0)
    bootstrap = broker_up.bootstrap
    await create_topics(bootstrap, prefix, topics=(ACTIONS, ACTION_RESULTS), partitions=1)
    sb = Sandbox(passwords=PASSWORDS, faults=Faults(hang_rate=1.0, hang_seconds=4.0))
    hung = sms(1, LINES[0])
    async with running(sb) as url:
        await publish(bootstrap, prefix, [hung])
        stopped_in = None
        async with executor(bootstrap, prefix, url) as ex:
            await wait_for(lambda: any(r["executed"] for r in sb.requests), 30, interval=0.1,
                           what="the request at Keyyo")
            await asyncio.to_thread(broker_up.stop)
            started = time.monotonic()
            ex.stop()
        stopped_in = time.monotonic() - started  # the context waited for run() to return
        await asyncio.to_thread(lambda: broker_up.start(progress=False))
        sb.faults = Faults()
        async with executor(bootstrap, prefix, url):
            async def settled() -> bool:
                return bool((await final_results(bootstrap, prefix)).get(hung.action_id, {}).get("final"))

            await wait_for(settled, 60, interval=0.3, what="the SMS settled by the next owner")
    assert stopped_in < 30, f"the executor took {stopped_in:.0f} s to stop with Kafka away"
    assert (await final_results(bootstrap, prefix))[hung.action_id]["status"] == "unknown"
    assert len([r for r in sb.requests if r["executed"]]) == 1


@asynccontextmanager
async def closes_waiting_for_kafka(broker_up: LocalKafka, prefix: str, seed: int, rate: float,
                                   **overrides: Any) -> AsyncIterator[tuple[Any, list[Any]]]:
    """A call-records runtime whose notifications are all folded and committed, then Kafka stopped
    while the calls' closes come due (their transactions wait for it); yields (runtime, calls)."""
    from devtools.simulator import Chaos
    from tests.integration.pipeline import provision, running_processor, send_to_kafka, traffic, updates

    bootstrap = broker_up.bootstrap
    await provision(bootstrap, prefix)
    start_ms = time.time_ns() // 1_000_000
    calls, sends = traffic(seed=seed, rate=rate, duration=2, start_ms=start_ms, chaos=Chaos())
    async with running_processor(bootstrap, prefix, logic=_lingering(), **overrides) as runtime:
        await wait_for(lambda: runtime.joined and not runtime.restoring, 30, what="processor ready")
        await send_to_kafka(bootstrap, prefix, sends)

        async def all_folded() -> bool:  # committed: what is left open is the closes' transactions
            return len(await updates(bootstrap, prefix)) >= len(sends)

        await wait_for(all_folded, 30, interval=0.2, what="every notification's update")
        await asyncio.to_thread(broker_up.stop)
        yield runtime, calls


def _lingering() -> Any:
    from processors.registry import CALL_RECORDS_SPEC
    from tests.integration.pipeline import FAST

    return CALL_RECORDS_SPEC.logic(**{**FAST, "linger": 4})  # the closes come due while Kafka is away


async def every_record_once_after_kafka_is_back(broker_up: LocalKafka, prefix: str, calls: list[Any]) -> None:
    """Kafka started again, a new process writes every call's record, once (whatever transaction
    was left open is aborted and redone)."""
    from tests.integration.pipeline import records, running_processor
    from tests.truth import expected_records, final_records

    await asyncio.to_thread(lambda: broker_up.start(progress=False))
    expected = expected_records(calls)
    async with running_processor(broker_up.bootstrap, prefix, logic=_lingering()):
        async def complete() -> bool:
            return final_records(await records(broker_up.bootstrap, prefix)).keys() >= expected.keys()

        await wait_for(complete, 90, interval=0.5, what="every call's record after the restart")
    got = final_records(await records(broker_up.bootstrap, prefix))
    assert {k: got[k] for k in expected} == expected


async def test_a_processor_stopped_with_kafka_away_exits(broker_up: LocalKafka, prefix: str) -> None:
    """SIGTERM while Kafka is away, with records processed but their transaction not committed:
    the process still ends in bounded time, and a new one after Kafka is back writes every record
    once (the uncommitted transaction is aborted and redone)."""
    started = None
    waiting = closes_waiting_for_kafka(broker_up, prefix, seed=43, rate=8, close_wait_s=5.0)
    async with waiting as (runtime, calls):
        await wait_for(lambda: runtime.stuck(), 30, interval=0.2, what="a transaction waiting for Kafka")
        started = time.monotonic()
    stopped_in = time.monotonic() - started
    await every_record_once_after_kafka_is_back(broker_up, prefix, calls)
    assert stopped_in < 45, f"the processor took {stopped_in:.0f} s to stop with Kafka away"


async def test_partitions_given_up_with_kafka_away_close_side_by_side(
        broker_up: LocalKafka, prefix: str) -> None:
    """A rebalance that takes partitions away while their transactions wait for Kafka (their
    transaction coordinator gone, say) closes them side by side: each waits ``close_wait_s`` at
    most, together, not one after the other (which, partition by partition, would outlast the
    group's rebalance timeout). Every call's record is still written once after Kafka is back."""
    waiting = closes_waiting_for_kafka(broker_up, prefix, seed=47, rate=12, close_wait_s=8.0)
    async with waiting as (runtime, calls):
        await wait_for(lambda: sum(p.busy for p in runtime.parts.values()) >= 2, 30, interval=0.1,
                       what="two partitions' transactions waiting for Kafka")
        parts = list(runtime.parts.values())
        revoking = asyncio.create_task(runtime._revoke({p.tp for p in parts}))
        # One after the other, the second partition would start closing only after the first had
        # waited its 8 s.
        await wait_for(lambda: all(p.closing for p in parts) and not revoking.done(), 4, interval=0.05,
                       what="every partition closing at once")
        await asyncio.wait_for(revoking, 30)
        assert not runtime.parts
    await every_record_once_after_kafka_is_back(broker_up, prefix, calls)
