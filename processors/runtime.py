"""The exactly-once processing loop shared by every processor.

One consumer per process in a consumer group (``read_committed``, no auto-commit). For each owned
input partition: a transactional producer whose id derives from (group, topic, partition) — the
fencing aiokafka's lack of KIP-447 calls for — and a :class:`~processors.state.Store` restored
from its changelog partition before any input of it is processed. Each batch of a partition is
one transaction: outputs, changelog entries (coalesced per key) and the input offsets.
Rebalances wait for the batch in progress to commit (a lock), then drop or add partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ProducerFenced
from aiokafka.partitioner import DefaultPartitioner

from processors.observability import ProcessorMetrics
from processors.output import Output
from processors.state import Store
from schemas.notification import rfc3339_ms

log = logging.getLogger("keyyo.processor")

STREAM_TIME_KEY = "\x00stream-time"
"""State entry holding the partition's stream time, so a restart resumes it."""


class Logic(Protocol):
    """What a processor supplies: decoding, event time, and the pure per-event/timer logic."""

    def decode(self, raw: bytes) -> Any:
        """The event in a record value; raises ValueError (or KeyError/TypeError) when invalid."""

    def event_time_ms(self, event: Any) -> int:
        """Event time of an event."""

    def on_event(self, store: Store, event: Any, now_ms: int) -> list[Output]:
        """Fold one event into state; return outputs."""

    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        """A timer of ``key`` is due; return outputs."""


@dataclass(frozen=True)
class RuntimeSettings:
    """How one processor process runs."""

    bootstrap: str
    group: str
    """Consumer group; also names transactional ids and the changelog topic."""
    input_topic: str
    """Full input topic name."""
    output_prefix: str = ""
    """Prefix of output topic names."""
    store: str = "state"
    mode: Literal["live", "replay"] = "live"
    """live: an idle partition's time follows the wall clock; replay: event time only."""
    allowed_lateness_ms: int = 5000
    """Live mode: stream time is at least wall clock minus this."""
    max_records: int = 20000
    """Records fetched per poll."""
    poll_ms: int = 100
    """Longest wait for input, so commits and timers run at least this often."""
    until_idle_s: float | None = None
    """Burst mode: exit once every owned partition is at its end for this long."""
    flush_at_end_ms: int | None = None
    """Burst mode: before exiting, advance stream time by this much so every timer fires."""
    dead_letter_topic: str = "keyyo.dead-letters.v1"

    @property
    def changelog_topic(self) -> str:
        """``<group>.<store>.changelog``."""
        return f"{self.group}.{self.store}.changelog"


@dataclass(eq=False)
class _Partition:
    tp: TopicPartition
    producer: AIOKafkaProducer
    store: Store
    stream_time: int = 0
    position: int = -1
    """Next input offset to process."""


class _BatchWriter:
    """Appends records to one producer batch per (topic, partition) and sends each when full.

    ``send_batch`` costs one future per batch instead of one per record; records of a partition
    keep their order. Partitions come from Kafka's default partitioner, as ``send`` would pick.
    """

    def __init__(self, producer: AIOKafkaProducer, partitions: dict[str, list[int]],
                 key_partition: dict[tuple[str, bytes], int]) -> None:
        self.producer = producer
        self.partitions = partitions
        self.key_partition = key_partition
        self.open: dict[tuple[str, int], Any] = {}
        self.futures: list[asyncio.Future[Any]] = []

    async def add(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        if partition is None:
            partition = self.key_partition.get((topic, key))
            if partition is None:
                if topic not in self.partitions:
                    self.partitions[topic] = sorted(await self.producer.partitions_for(topic))
                partition = int(_PARTITIONER(key, self.partitions[topic], self.partitions[topic]))
                self.key_partition[(topic, key)] = partition
        batch = self.open.get((topic, partition))
        if batch is None or batch.append(key=key, value=value, timestamp=None) is None:
            if batch is not None:
                await self._send(topic, partition, batch)
            batch = self.open[(topic, partition)] = self.producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch")

    async def _send(self, topic: str, partition: int, batch: Any) -> None:
        self.futures.append(await self.producer.send_batch(batch, topic, partition=partition))

    async def flush(self) -> None:
        """Send the open batches and wait until Kafka has every record."""
        for (topic, partition), batch in self.open.items():
            await self._send(topic, partition, batch)
        self.open = {}
        await asyncio.gather(*self.futures)
        self.futures = []


_PARTITIONER = DefaultPartitioner()


class Runtime:
    """Runs a :class:`Logic` over the input topic with exactly-once outputs and state."""

    def __init__(self, settings: RuntimeSettings, logic: Logic, metrics: ProcessorMetrics,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.settings = settings
        self.logic = logic
        self.metrics = metrics
        self.clock = clock
        self.parts: dict[TopicPartition, _Partition] = {}
        self.restoring: set[TopicPartition] = set()
        self.joined = False
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[str, list[int]] = {}
        self._key_partition: dict[tuple[str, bytes], int] = {}

    def readiness(self) -> dict[str, bool]:
        """For ``/readyz``: joined the group and every owned partition restored."""
        return {"joined": self.joined, "restored": not self.restoring}

    def stop(self) -> None:
        """Finish the batch in progress, commit it, leave the group."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until :meth:`stop` (or, in burst mode, until the input is drained)."""
        s = self.settings
        consumer = self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap, group_id=s.group, client_id=f"{s.group}-consumer",
            isolation_level="read_committed", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=10000, heartbeat_interval_ms=1000,
            max_poll_interval_ms=120000, rebalance_timeout_ms=60000,
        )
        await consumer.start()
        consumer.subscribe([s.input_topic], listener=_Listener(self))
        idle_since: float | None = None
        try:
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=s.poll_ms, max_records=s.max_records)
                async with self._lock:
                    # Partitions have their own producer and store: their transactions overlap.
                    await asyncio.gather(*(
                        self._process(self.parts[tp], records)
                        for tp, records in batches.items() if tp in self.parts and records))
                    await self._fire_idle_timers()
                self._report(consumer)
                if s.until_idle_s is not None:
                    drained = self.joined and not batches and await self._at_end(consumer)
                    if not drained:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= s.until_idle_s:
                        break
            if s.flush_at_end_ms is not None:
                async with self._lock:
                    for part in self.parts.values():
                        part.stream_time += s.flush_at_end_ms
                    await self._fire_idle_timers()
        finally:
            await consumer.stop()
            for part in list(self.parts.values()):
                await self._drop(part)

    async def _at_end(self, consumer: AIOKafkaConsumer) -> bool:
        for tp in self.parts:
            end = consumer.last_stable_offset(tp)
            if end is None or await consumer.position(tp) < end:
                return False
        return True

    def _now(self, part: _Partition) -> int:
        if self.settings.mode == "live":
            return max(part.stream_time, self.clock() - self.settings.allowed_lateness_ms)
        return part.stream_time

    # -- processing ----------------------------------------------------------------------

    async def _process(self, part: _Partition, records: list[Any]) -> None:
        s = self.settings
        store, producer = part.store, part.producer
        stream_time_before = part.stream_time
        try:
            await producer.begin_transaction()
            writer = self._writer(producer)
            for rec in records:
                try:
                    event = self.logic.decode(rec.value)
                except (ValueError, KeyError, TypeError) as exc:
                    await self._dead_letter(writer, rec, exc)
                    continue
                event_ms = self.logic.event_time_ms(event)
                if event_ms > part.stream_time:
                    part.stream_time = event_ms
                now = self._now(part)
                await self._write(writer, self._due(part, now))
                await self._write(writer, self.logic.on_event(store, event, now))
            await self._write(writer, self._due(part, self._now(part)))
            if part.stream_time != stream_time_before:
                store.put(STREAM_TIME_KEY, str(part.stream_time).encode())
            await self._write_changelog(writer, part)
            await writer.flush()
            await producer.send_offsets_to_transaction({part.tp: records[-1].offset + 1}, s.group)
            started = time.perf_counter()
            await producer.commit_transaction()
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
        except ProducerFenced:
            log.warning("fenced: another process owns the partition now",
                        extra={"topic": part.tp.topic, "partition": part.tp.partition})
            store.abort()
            await self._drop(part)
            return
        except Exception as exc:
            store.abort()
            part.stream_time = stream_time_before
            self.metrics.aborts.inc()
            log.error("batch failed, aborted; it will be processed again",
                      extra={"topic": part.tp.topic, "partition": part.tp.partition,
                             "offset": records[0].offset, "error": repr(exc)})
            with contextlib.suppress(Exception):
                await producer.abort_transaction()
            if self._consumer is not None:
                self._consumer.seek(part.tp, records[0].offset)
            await asyncio.sleep(0.5)
            return
        store.commit()
        part.position = records[-1].offset + 1
        self.metrics.records_in.inc(len(records))

    def _due(self, part: _Partition, now: int) -> list[Output]:
        outputs: list[Output] = []
        for key in list(part.store.due(now)):
            outputs.extend(self.logic.on_timer(part.store, key, now))
        return outputs

    async def _fire_idle_timers(self) -> None:
        """Timers that are due (live mode: the wall clock moves an idle partition's time)."""
        await asyncio.gather(*(self._fire_timers(part) for part in list(self.parts.values())
                               if (wake := part.store.next_wake()) is not None
                               and wake <= self._now(part)))

    async def _fire_timers(self, part: _Partition) -> None:
        """One transaction with the outputs of a partition's due timers."""
        try:
            await part.producer.begin_transaction()
            writer = self._writer(part.producer)
            await self._write(writer, self._due(part, self._now(part)))
            await self._write_changelog(writer, part)
            await writer.flush()
            await part.producer.commit_transaction()
        except ProducerFenced:
            part.store.abort()
            await self._drop(part)
            return
        except Exception as exc:
            part.store.abort()
            self.metrics.aborts.inc()
            log.error("timer transaction failed, aborted", extra={
                "topic": part.tp.topic, "partition": part.tp.partition, "error": repr(exc)})
            with contextlib.suppress(Exception):
                await part.producer.abort_transaction()
            return
        part.store.commit()

    def _writer(self, producer: AIOKafkaProducer) -> _BatchWriter:
        return _BatchWriter(producer, self._partitions, self._key_partition)

    async def _write(self, writer: _BatchWriter, outputs: Iterable[Output]) -> None:
        prefix = self.settings.output_prefix
        for out in outputs:
            await writer.add(prefix + out.topic, out.key, out.value)
            self.metrics.records_out.labels(self.metrics.processor, out.topic).inc()

    async def _write_changelog(self, writer: _BatchWriter, part: _Partition) -> None:
        topic = self.settings.changelog_topic
        for key, value in part.store.staged().items():
            await writer.add(topic, key.encode(), value, partition=part.tp.partition)

    async def _dead_letter(self, writer: _BatchWriter, rec: Any, exc: Exception) -> None:
        self.metrics.dead_letters.inc()
        value = {
            "schema": "keyyo.dead-letter.v1", "processor": self.settings.group, "topic": rec.topic,
            "partition": rec.partition, "offset": rec.offset,
            "key": rec.key.decode("utf-8", "replace") if rec.key is not None else None,
            "value": rec.value.decode("utf-8", "replace") if rec.value is not None else None,
            "reason": f"{type(exc).__name__}: {exc}", "at": rfc3339_ms(self.clock()),
        }
        key = f"{rec.topic}:{rec.partition}:{rec.offset}".encode()
        await writer.add(self.settings.output_prefix + self.settings.dead_letter_topic, key,
                         orjson.dumps(value))

    # -- partitions ----------------------------------------------------------------------

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            self.joined = True
            new = sorted(tp for tp in assigned if tp not in self.parts)
            self.restoring.update(new)
            for part in await asyncio.gather(*(self._open(tp) for tp in new)):
                self.parts[part.tp] = part
                self.restoring.discard(part.tp)
            self.metrics.assigned.set(len(self.parts))

    async def _open(self, tp: TopicPartition) -> _Partition:
        """Fence the previous owner (its open transaction is aborted), then restore the state."""
        s = self.settings
        producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap, transactional_id=f"{s.group}.{tp.topic}.{tp.partition}",
            client_id=f"{s.group}-p{tp.partition}", linger_ms=5, max_batch_size=512 * 1024,
        )
        await producer.start()
        store = Store()
        restored = await self._restore(store, tp.partition)
        log.info("partition restored", extra={"topic": tp.topic, "partition": tp.partition,
                                              "entries": len(store), "changelog_records": restored})
        return _Partition(tp, producer, store, stream_time=int(store.get(STREAM_TIME_KEY) or 0))

    async def _restore(self, store: Store, partition: int) -> int:
        tp = TopicPartition(self.settings.changelog_topic, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.bootstrap,
                                    isolation_level="read_committed", enable_auto_commit=False)
        await consumer.start()
        count = 0
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=10000)
                for rec in batch.get(tp, []):
                    store.restore(rec.key.decode(), rec.value)
                    count += 1
        finally:
            await consumer.stop()
        return count

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            for tp in revoked:
                part = self.parts.get(tp)
                if part is not None:
                    await self._drop(part)
            self.metrics.assigned.set(len(self.parts))

    async def _drop(self, part: _Partition) -> None:
        self.parts.pop(part.tp, None)
        with contextlib.suppress(Exception):
            await part.producer.stop()
        for gauge in (self.metrics.lag, self.metrics.state_entries):
            with contextlib.suppress(KeyError):
                gauge.remove(self.metrics.processor, str(part.tp.partition))

    def _report(self, consumer: AIOKafkaConsumer) -> None:
        for tp, part in self.parts.items():
            high = consumer.highwater(tp)
            if high is not None and part.position >= 0:
                self.metrics.lag.labels(self.metrics.processor, str(tp.partition)).set(
                    max(0, high - part.position))
            self.metrics.state_entries.labels(self.metrics.processor, str(tp.partition)).set(
                len(part.store))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runtime._revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.runtime._assign(set(assigned))
