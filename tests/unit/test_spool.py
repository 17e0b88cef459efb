"""The disk spool: durable appends, ordered reads, replay position, torn tails."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError

from ingest.metrics import IngestMetrics
from ingest.publisher import Publisher, _SpoolState, settled_within
from ingest.spool import Spool, SpooledRecord, encode


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


def test_reads_while_another_thread_appends_see_every_record_in_order(tmp_path: Path) -> None:
    """The replay reads in one worker thread while the spool writer appends in another (the edge
    keeps spooling new requests during a replay): a read must never see the other's file position."""
    spool = Spool(tmp_path)
    total, problems = 3000, []

    def append() -> None:
        for start in range(0, total, 3):
            spool.append(frames(3, start))

    writer = threading.Thread(target=append)
    writer.start()
    offset, seen = 0, 0
    while seen < total:
        try:
            records = spool.read(offset, 7)
        except Exception as exc:  # what the shared file position did to the reads before
            problems.append(repr(exc))
            break
        for r in records:
            if r.value != b'{"n":%d}' % seen:
                problems.append(f"record {seen}: {r.value!r}")
            seen += 1
        if records:
            offset = records[-1].end
    writer.join()
    spool.close()
    assert problems == []
    assert offset == spool.size


async def test_the_replay_goes_on_after_a_read_that_failed(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """An error the replay did not foresee (here a failed read) is logged and tried again: the
    spool must not stay full for the rest of the edge's life."""
    publisher = Publisher("127.0.0.1:1", 1.0, IngestMetrics(), spool_dir=tmp_path)
    spool = Spool(tmp_path)
    spool.append(frames(1))
    spool.mark_replayed(spool.size)  # in Kafka already: once read, the spool is emptied
    state = publisher._spool = _SpoolState(spool, 1 << 20, 1 << 19, active=True)
    reads: list[int] = []
    read = spool.read

    def failing_once(start: int, max_records: int) -> list[SpooledRecord]:
        reads.append(start)
        if len(reads) == 1:
            raise OSError("a disk hiccup")
        return read(start, max_records)

    spool.read = failing_once  # type: ignore[method-assign]
    replayer = asyncio.create_task(publisher._spool_replayer())
    try:
        for _ in range(100):
            if not state.active:
                break
            await asyncio.sleep(0.05)
    finally:
        replayer.cancel()
        await publisher._producer.stop()  # never started: nothing to flush
        spool.close()
    assert not state.active and spool.size == 0
    assert len(reads) == 2
    assert "spool replay failed" in caplog.text and "a disk hiccup" in caplog.text
