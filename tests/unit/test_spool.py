"""The disk spool: durable appends, ordered reads, replay position, torn tails."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka.errors import KafkaError

from ingest.publisher import settled_within
from ingest.spool import Spool, encode


def frames(n: int, start: int = 0) -> list[bytes]:
    return [encode("topic", b"acme", b'{"n":%d}' % i) for i in range(start, start + n)]


def test_records_come_back_in_order_and_replay_position_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(frames(3))
    spool.append(frames(2, start=3))
    records = spool.read(0, 10)
    assert [r.value for r in records] == [b'{"n":%d}' % i for i in range(5)]
    assert {(r.topic, r.key) for r in records} == {("topic", b"acme")}
    spool.mark_replayed(records[1].end)
    spool.close()

    reopened = Spool(tmp_path)
    assert reopened.pending_bytes == reopened.size - records[1].end
    rest = reopened.read(reopened.replayed, 10)
    assert [r.value for r in rest] == [b'{"n":2}', b'{"n":3}', b'{"n":4}']
    reopened.reset()
    assert (reopened.size, reopened.pending_bytes, reopened.read(0, 10)) == (0, 0, [])


def test_a_torn_tail_is_cut_when_the_spool_is_opened(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(frames(2))
    good_size = spool.size
    spool.close()
    with open(tmp_path / "spool.log", "ab") as f:
        f.write(frames(1, start=9)[0][:-3])  # a crash in the middle of a write
    reopened = Spool(tmp_path)
    assert reopened.size == good_size
    assert [r.value for r in reopened.read(0, 10)] == [b'{"n":0}', b'{"n":1}']
    reopened.append(frames(1, start=2))
    assert [r.value for r in reopened.read(0, 10)][-1] == b'{"n":2}'


def test_values_may_contain_separators(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([encode("t", b"k", b"a\0b\0c")])
    assert spool.read(0, 1)[0].value == b"a\0b\0c"


# The replay's wait for the first send of a spooled record (ingest.publisher.settled_within): plain
# futures stand for the producer's, so each outcome and the grace's clock are seen exactly.

async def test_a_first_send_that_lands_or_fails_is_reported_as_soon_as_it_settles() -> None:
    loop = asyncio.get_running_loop()
    landed: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.05, landed.set_result, None)
    assert await settled_within(landed, lambda: True, grace_s=5.0, poll_s=1.0) == "delivered"
    failed: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.05, failed.set_exception, KafkaError("gone"))
    assert await settled_within(failed, lambda: True, grace_s=5.0, poll_s=1.0) == "failed"


async def test_the_grace_counts_only_while_kafka_answers() -> None:
    """A long outage is not the first send's fault: the copy is sent only once Kafka has answered
    for the whole grace and the first send still has not settled."""
    loop = asyncio.get_running_loop()
    wedged: asyncio.Future[None] = loop.create_future()
    up = False
    started = loop.time()

    def reachable() -> bool:
        return up

    async def kafka_back_after(delay: float) -> None:
        nonlocal up
        await asyncio.sleep(delay)
        up = True

    back = asyncio.create_task(kafka_back_after(0.3))
    assert await settled_within(wedged, reachable, grace_s=0.2, poll_s=0.05) == "unsettled"
    await back
    assert loop.time() - started >= 0.3 + 0.2 - 0.06  # the outage, then the whole grace
    assert not wedged.done()  # never cancelled: the producer still owns it
