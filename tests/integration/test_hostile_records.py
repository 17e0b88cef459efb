"""Bad records on a real broker: set aside with the reason, never a stalled partition.

Every record here goes to partition 0 of the notification topic, so the valid call of another
tenant shares the partition with the bad ones: it must still get its record.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from deploy.topics import create_topics
from processors.call_records import CallRecords
from processors.driver import Driver
from schemas.notification import parse_rfc3339_ms, rfc3339_ms
from schemas.topics import CALL_UPDATES, DEAD_LETTERS, NOTIFICATIONS, Topic
from tests.integration.pipeline import provision, records, running_processor
from tests.kafka import Broker, read_values, wait_for
from tests.scenarios import incoming_call

pytestmark = pytest.mark.asyncio(loop_scope="session")
A, B = "33100000001", "33100000002"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def shifted(events: list[Any], to_ms: int) -> list[bytes]:
    """The events' wire values with their times moved so the first is at ``to_ms``."""
    delta = to_ms - parse_rfc3339_ms(events[0].event_time)
    out = []
    for n in events:
        value = n.to_dict()
        value["event_time"] = rfc3339_ms(parse_rfc3339_ms(n.event_time) + delta)
        out.append(orjson.dumps(value))
    return out


async def test_bad_records_are_dead_lettered_and_the_other_tenant_gets_its_record(
    broker: Broker, prefix: str,
) -> None:
    await provision(broker.bootstrap, prefix)
    topic = NOTIFICATIONS.full_name(prefix)
    start = now_ms()
    base = incoming_call().rings(A).events[0].to_dict() | {"event_time": rfc3339_ms(start)}
    bad: list[tuple[bytes, bytes]] = [
        (b"acme", orjson.dumps(base | {"event_time": start})),
        (b"acme", orjson.dumps(base | {"event_time": "9999-12-31T23:59:59.999Z"})),
        (b"acme", orjson.dumps(base | {"event_id": None})),
        (b"acme", orjson.dumps(base | {"tenant": ["acme"]})),
        (b"acme", orjson.dumps(base | {"callee": "4" * 1_000_000})),
        (b"globex", orjson.dumps(base)),  # key is not the tenant
        (b"acme", orjson.dumps(base | {"event_time": rfc3339_ms(start + 3 * 24 * 3600_000)})),
    ]
    good = incoming_call(tenant="globex").rings(B).answers(B).hangs_up(B).events
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=2_000_000)
    await producer.start()
    try:
        async with running_processor(broker.bootstrap, prefix) as runtime:
            await wait_for(lambda: runtime.readiness()["restored"] and runtime.joined, 30)
            for key, value in bad:
                await producer.send_and_wait(topic, value, key=key, partition=0)
            for value in shifted(good, start):
                await producer.send_and_wait(topic, value, key=b"globex", partition=0)

            async def globex_recorded() -> bool:
                return any(r["tenant"] == "globex" for r in await records(broker.bootstrap, prefix))

            await wait_for(globex_recorded, 30, interval=0.3, what="globex's record")
            ready = runtime.readiness()
            lag = [s for m in runtime.metrics.registry.collect() if m.name == "keyyo_processor_lag"
                   for s in m.samples if s.labels["partition"] == "0"]
    finally:
        await producer.stop()
    dead = await read_values(broker.bootstrap, DEAD_LETTERS.full_name(prefix))
    reasons = [d["reason"] for d in sorted(dead, key=lambda d: d["offset"])]
    assert [r.split(":")[0][:15] for r in reasons] == [
        "event_time", "event_time", "event_id", "tenant", "callee", "key",
        "event time " + rfc3339_ms(start + 3 * 24 * 3600_000)[:4]]
    assert "more than 600 s ahead" in reasons[-1]
    assert all(d["partition"] == 0 and d["topic"] == topic for d in dead)
    assert ready == {"joined": True, "restored": True, "progressing": True}
    assert lag and lag[0].value == 0
    [record] = [r for r in await records(broker.bootstrap, prefix) if r["tenant"] == "globex"]
    assert (record["outcome"], record["closed_by"]) == ("answered", "release")


async def test_an_output_kafka_refuses_is_set_aside_after_bounded_attempts(
    broker: Broker, prefix: str,
) -> None:
    """The call-updates topic takes at most 2,500 bytes a batch: the update of an ACD call that
    rang many agents outgrows it. The broker refuses the transaction; the partition goes one
    record at a time, reports itself stuck, sets that one record aside after two attempts, and
    goes on: the other tenant's call still gets its record."""
    limit = 2500
    await create_topics(broker.bootstrap, prefix, partitions=3, topics=(
        Topic(CALL_UPDATES.name, "tenant", 3, "delete", None, {"max.message.bytes": str(limit)}),))
    await provision(broker.bootstrap, prefix)
    start = now_ms()
    flow = incoming_call(acd_session="s-1")
    for i in range(12):
        flow.rings(f"331000000{i:02d}")
    # The first SETUP whose call update is too large for the topic (computed by the pure logic).
    driver = Driver(CallRecords())
    sizes = []
    for n in flow.events:
        sizes += [len(o.value) for o in driver.send(b"acme", n.to_json()) if o.topic == CALL_UPDATES.name]
    too_big = next(i for i, size in enumerate(sizes) if size > limit - 200)
    acme = shifted(flow.events[:too_big + 1], start)
    good = shifted(incoming_call(tenant="globex").rings(B).answers(B).hangs_up(B).events, start)
    topic = NOTIFICATIONS.full_name(prefix)
    seen_stuck: list[dict[str, Any]] = []
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        async with running_processor(broker.bootstrap, prefix, max_attempts=2,
                                     stuck_after_failures=2) as runtime:
            await wait_for(lambda: runtime.readiness()["restored"] and runtime.joined, 30)
            for value in acme:
                await producer.send_and_wait(topic, value, key=b"acme", partition=0)
                await asyncio.sleep(0.3)  # mostly one record a transaction, as at live rates
            for value in good:
                await producer.send_and_wait(topic, value, key=b"globex", partition=0)

            async def globex_recorded() -> bool:
                if stuck := runtime.stuck():
                    seen_stuck.append(stuck)
                return any(r["tenant"] == "globex" for r in await records(broker.bootstrap, prefix))

            await wait_for(globex_recorded, 60, interval=0.2, what="globex's record")
            ready = runtime.readiness()
    finally:
        await producer.stop()
    [dead] = await read_values(broker.bootstrap, DEAD_LETTERS.full_name(prefix))
    assert dead["offset"] == too_big and dead["attempts"] == 2
    assert dead["reason"].startswith("not accepted by Kafka after 2 attempts: ")
    assert "MessageSizeTooLarge" in dead["reason"]
    assert seen_stuck and "MessageSizeTooLarge" in next(iter(seen_stuck[0].values()))["error"]
    assert ready["progressing"]
    updates = await read_values(broker.bootstrap, CALL_UPDATES.full_name(prefix))
    assert len([u for u in updates if u["tenant"] == "acme"]) == too_big
    await wait_for(lambda: _acme_record(broker.bootstrap, prefix, too_big), 30, interval=0.3)


async def _acme_record(bootstrap: str, prefix: str, legs: int) -> bool:
    return any(r["tenant"] == "acme" and len(r["legs"]) == legs for r in await records(bootstrap, prefix))

