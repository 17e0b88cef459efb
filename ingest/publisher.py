"""The edge's only Kafka client: acks=all idempotent writes, with an optional disk spool.

``publish`` returns only once a record is durable: acknowledged by Kafka, or (spool enabled)
fsync'd to the spool, which a background task replays in order when Kafka is back. While the
spool holds records, new ones are appended behind them so the topic keeps arrival order.

Hot path: records are appended to an open batch of their partition (``create_batch``); one lane
task per partition hands batches to the producer (``send_batch``) one after the other, so order
is kept and records pile up in the open batch while the previous one is in flight. One Kafka
future per batch, not per record; one sweeper enforces the budget instead of a timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.protocol.metadata import MetadataRequest

from ingest.metrics import IngestMetrics
from ingest.spool import Spool, SpooledRecord, encode

log = logging.getLogger("keyyo.ingest.publisher")

REPLAY_BATCH = 500
ORIGINAL_SEND_GRACE_S = 45.0
"""How long, counted while Kafka answers, the replay waits for the first send of a spooled record
to settle before it sends the spooled copy: above the producer's 30 s request timeout, so a send
Kafka took is seen delivered; a send still unsettled after that is wedged, and waiting longer
would stall every record queued behind it (the copy may then land twice, same ``event_id``)."""


async def settled_within(first: asyncio.Future[None], reachable: Callable[[], bool], grace_s: float,
                         poll_s: float = 0.25) -> str:
    """Wait for ``first`` to settle, counting only the time while ``reachable()`` holds, for at
    most ``grace_s`` of it. ``delivered``, ``failed``, or ``unsettled`` when the grace ran out."""
    counted = 0.0
    while not first.done() and counted < grace_s:
        started = time.perf_counter()
        up = reachable()
        await asyncio.wait([first], timeout=min(poll_s, grace_s - counted) if up else poll_s)
        if up:
            counted += time.perf_counter() - started
    if not first.done():
        return "unsettled"
    return "delivered" if not first.cancelled() and first.exception() is None else "failed"


class Outcome(enum.Enum):
    """Where a record ended up."""

    KAFKA = "kafka"
    SPOOLED = "spooled"
    UNAVAILABLE = "unavailable"


@dataclass(slots=True, eq=False)
class _Batch:
    """Records for one partition and who waits for them."""

    builder: BatchBuilder
    delivery: asyncio.Future[None]
    """Resolves when Kafka acknowledged the batch, fails when it will not."""
    deadline: float
    started: float
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Lane:
    """The batches of one partition, handed to the producer in order by one task."""

    topic: str
    partition: int
    queue: deque[_Batch] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None


@dataclass
class _Pending:
    frame: bytes
    done: asyncio.Future[None]
    original: asyncio.Future[None] | None


@dataclass
class _SpoolState:
    spool: Spool
    max_bytes: int
    ready_bytes: int
    queue: list[_Pending] = field(default_factory=list)
    queued_bytes: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Spool offset -> the producer future of a send that timed out before it was spooled.
    originals: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    # Spool offset -> the producer future of its replayed copy, until the batch is marked replayed.
    copies: dict[int, asyncio.Future[object]] = field(default_factory=dict)
    active: bool = False


class Publisher:
    """Durable writes to Kafka for the ingest edge."""

    def __init__(
        self,
        bootstrap_servers: str,
        budget_s: float,
        metrics: IngestMetrics,
        linger_ms: int = 0,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 256 * 1024 * 1024,
        spool_ready_fraction: float = 0.8,
    ) -> None:
        self.budget_s = budget_s
        self.metrics = metrics
        self.kafka_ok = False
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            request_timeout_ms=30000,
            # One batch in flight per partition: let it grow under load (one tenant = one partition).
            max_batch_size=1024 * 1024,
            client_id="keyyo-ingest",
        )
        self._spool_dir = spool_dir
        self._spool_limits = (spool_max_bytes, int(spool_max_bytes * spool_ready_fraction))
        self._spool: _SpoolState | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._inflight: set[_Batch] = set()
        self._partitions: dict[str, list[int]] = {}
        self._key_partition: dict[tuple[str, bytes], int] = {}
        self._partitioner = DefaultPartitioner()

    async def start(self) -> None:
        """Open the spool (replaying any left from a previous run) and connect to Kafka.

        Starts even when Kafka is down: requests then get 503 or are spooled.
        """
        if self._spool_dir is not None:
            spool = await asyncio.to_thread(Spool, self._spool_dir)
            self._spool = _SpoolState(spool, *self._spool_limits)
            self._spool.active = spool.pending_bytes > 0
            self.metrics.spool_bytes.set(spool.pending_bytes)
            self._tasks.append(asyncio.create_task(self._spool_writer(), name="spool-writer"))
            self._tasks.append(asyncio.create_task(self._spool_replayer(), name="spool-replayer"))
        try:
            await asyncio.wait_for(self._producer.start(), timeout=max(self.budget_s, 5.0))
            self.kafka_ok = True
        except (KafkaError, TimeoutError) as exc:
            log.warning("kafka not reachable at start, will keep trying: %s", exc)
        self._tasks.append(asyncio.create_task(self._probe(), name="kafka-probe"))
        self._tasks.append(asyncio.create_task(self._sweep(), name="budget-sweeper"))

    async def stop(self) -> None:
        """Wait for batches in flight, flush the producer, stop background tasks, close the spool."""
        deliveries = [b.delivery for b in self._inflight]
        if deliveries:
            await asyncio.wait(deliveries, timeout=self.budget_s * 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._producer.flush(), timeout=self.budget_s * 5)
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a background task must never hold the shutdown up
            _, stuck = await asyncio.wait(self._tasks, timeout=10)
            for task in stuck:
                log.error("background task %s did not stop; abandoned", task.get_name())
        # Records still queued for the spool were never answered 200: fail them.
        if self._spool is not None:
            for pending in self._spool.queue:
                if not pending.done.done():
                    pending.done.set_exception(RuntimeError("shutting down"))
            self._spool.spool.close()
        try:
            await asyncio.wait_for(self._producer.stop(), timeout=self.budget_s * 2)
        except TimeoutError:
            # aiokafka would keep retrying in the background: abandon unacknowledged batches
            # now, or a record already in the spool could land twice (sender/client internals).
            sender = getattr(self._producer, "_sender", None)
            if sender is not None:
                await sender.close()
            await self._producer.client.close()
            log.warning("kafka unreachable at shutdown; unsent records stay in the spool (if any)")

    @property
    def spool_ready(self) -> bool:
        """False once the spool holds more than its ready fraction."""
        state = self._spool
        return state is None or state.spool.pending_bytes < state.ready_bytes

    async def _probe(self) -> None:
        """Keep ``kafka_ok`` current (for /readyz), retrying the producer's start if needed."""
        started = self.kafka_ok
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
                # that comes as its inner call completes, and stop() then waits on this task forever.
                if not started:
                    async with asyncio.timeout(5.0):
                        await self._producer.start()
                    started = True
                async with asyncio.timeout(3.0):
                    await self._refresh_metadata()
                self.kafka_ok = True
                for topic in list(self._partitions):
                    partitions = sorted(await self._producer.partitions_for(topic))
                    if partitions != self._partitions[topic]:
                        self._partitions[topic] = partitions
                        self._key_partition.clear()
            except (KafkaError, TimeoutError, OSError):
                self.kafka_ok = False
            await asyncio.sleep(1.0 if self.kafka_ok else 0.5)

    async def _refresh_metadata(self) -> None:
        """Ask a broker for the metadata of the topics this edge writes to (none before its first
        write), never for the whole cluster's: on a cluster of many topics, every partition's
        metadata once a second was CPU and garbage-collector work on the edge's event loop."""
        client = self._producer.client
        if self._partitions:
            for topic in self._partitions:
                client.add_topic(topic)  # already there in the common case
            if not await client.force_metadata_update():
                raise KafkaError("no broker answered a metadata request")
            return
        node = client.get_random_node()
        if node is None:
            raise KafkaError("no broker known")
        await client.send(node, MetadataRequest([]))  # an empty list names no topic (v1 and later)

    async def publish(self, topic: str, key: bytes, value: bytes) -> Outcome:
        """Write one record durably within the budget, or say it could not be."""
        spool = self._spool
        if spool is not None and spool.active:
            return await self._to_spool(spool, topic, key, value, None)
        batch: _Batch | None = None
        try:
            partition = self._key_partition.get((topic, key))
            if partition is None:
                partition = await self._partition_for(topic, key)
            batch = self._append(topic, partition, key, value)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            batch.waiters.append(waiter)
            await waiter
            return Outcome.KAFKA
        except (TimeoutError, KafkaError) as exc:
            if self.kafka_ok:  # once per outage, not once per request
                log.warning("kafka did not take a record within %.1fs: %r", self.budget_s, exc)
            self.kafka_ok = False
        if spool is None:
            return Outcome.UNAVAILABLE
        original = batch.delivery if batch is not None else None
        if original is not None and original.done() and original.exception() is not None:
            original = None  # it failed for sure: only the spool copy will be sent
        return await self._to_spool(spool, topic, key, value, original)

    async def _partition_for(self, topic: str, key: bytes) -> int:
        """The partition Kafka's default partitioner gives ``key`` (murmur2, as Java clients do)."""
        partitions = self._partitions.get(topic)
        if partitions is None:
            async with asyncio.timeout(self.budget_s):
                partitions = sorted(await self._producer.partitions_for(topic))
            self._partitions[topic] = partitions
        partition = int(self._partitioner(key, partitions, partitions))
        self._key_partition[(topic, key)] = partition
        return partition

    def _append(self, topic: str, partition: int, key: bytes, value: bytes) -> _Batch:
        lane = self._lanes.get((topic, partition))
        if lane is None:
            lane = self._lanes[(topic, partition)] = _Lane(topic, partition)
        batch = lane.queue[-1] if lane.queue else None
        if batch is None or batch.builder.append(key=key, value=value, timestamp=None) is None:
            now = time.perf_counter()
            batch = _Batch(self._producer.create_batch(), asyncio.get_running_loop().create_future(),
                           now + self.budget_s, now)
            if batch.builder.append(key=key, value=value, timestamp=None) is None:
                raise KafkaError(f"record of {len(value)} bytes is larger than a batch")
            lane.queue.append(batch)
            self._inflight.add(batch)
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(lane))
        return batch

    async def _run_lane(self, lane: _Lane) -> None:
        """Hand the lane's batches to the producer, oldest first, until none is left."""
        try:
            while lane.queue:
                batch = lane.queue.popleft()
                try:
                    future = await self._producer.send_batch(
                        batch.builder, lane.topic, partition=lane.partition)
                except Exception as exc:  # every failure goes to the waiters
                    self._settle(batch, exc)
                    continue
                future.add_done_callback(functools.partial(self._delivered, batch))
        finally:
            lane.task = None

    def _delivered(self, batch: _Batch, future: asyncio.Future[object]) -> None:
        exc = None if not future.cancelled() else KafkaError("cancelled")
        self._settle(batch, exc or future.exception())

    def _settle(self, batch: _Batch, exc: BaseException | None) -> None:
        self._inflight.discard(batch)
        if exc is None:
            batch.delivery.set_result(None)
            elapsed = time.perf_counter() - batch.started
            observe = self.metrics.produce_seconds.observe
            for waiter in batch.waiters:
                if not waiter.done():
                    waiter.set_result(None)
                    observe(elapsed)
            return
        error = exc if isinstance(exc, KafkaError) else KafkaError(repr(exc))
        batch.delivery.set_exception(error)
        batch.delivery.exception()  # seen: the waiters get it
        for waiter in batch.waiters:
            if not waiter.done():
                waiter.set_exception(error)

    async def _sweep(self) -> None:
        """Fail the waiters of batches Kafka has not acknowledged within the budget."""
        while True:
            await asyncio.sleep(0.05)
            now = time.perf_counter()
            for batch in [b for b in self._inflight if b.deadline <= now]:
                self._inflight.discard(batch)
                for waiter in batch.waiters:
                    if not waiter.done():
                        waiter.set_exception(TimeoutError())

    async def _to_spool(
        self, spool: _SpoolState, topic: str, key: bytes, value: bytes,
        original: asyncio.Future[None] | None,
    ) -> Outcome:
        frame = encode(topic, key, value)
        if spool.spool.pending_bytes + spool.queued_bytes + len(frame) > spool.max_bytes:
            return Outcome.UNAVAILABLE
        spool.active = True
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        spool.queue.append(_Pending(frame, done, original))
        spool.queued_bytes += len(frame)
        spool.wakeup.set()
        try:
            await done
        except RuntimeError:
            return Outcome.UNAVAILABLE
        return Outcome.SPOOLED

    async def _spool_writer(self) -> None:
        """Group commit: write every queued record, one fsync, then answer them all."""
        state = self._spool
        assert state is not None
        while True:
            await state.wakeup.wait()
            state.wakeup.clear()
            if not state.queue:
                continue
            batch, state.queue, state.queued_bytes = state.queue, [], 0
            async with state.lock:
                offset = state.spool.size
                try:
                    await asyncio.to_thread(state.spool.append, [p.frame for p in batch])
                except OSError as exc:
                    log.error("spool write failed: %s", exc)
                    for p in batch:
                        p.done.set_exception(RuntimeError("spool write failed"))
                    continue
                for p in batch:
                    if p.original is not None:
                        state.originals[offset] = p.original
                    offset += len(p.frame)
                    if not p.done.done():
                        p.done.set_result(None)
            self.metrics.spool_bytes.set(state.spool.pending_bytes)

    async def _spool_replayer(self) -> None:
        """Send spooled records to Kafka in order; empty the spool once all are in."""
        state = self._spool
        assert state is not None
        failures = 0
        while True:
            try:
                pause = await self._replay_next(state)
                failures = 0
            except Exception as exc:  # a bug or a disk error must not end the replay for the edge's life
                failures += 1
                if failures == 1:  # the traceback once, then a line a minute while it lasts
                    log.exception("spool replay failed; trying again every second")
                elif failures % 60 == 0:
                    log.error("spool replay still failing after %d attempts: %r", failures, exc)
                pause = 1.0
            if pause:
                await asyncio.sleep(pause)

    async def _replay_next(self, state: _SpoolState) -> float:
        """Replay the next batch of spooled records, if any; the pause before the next call."""
        if not state.active:
            return 0.05
        start = state.spool.replayed
        records = await asyncio.to_thread(state.spool.read, start, REPLAY_BATCH)
        if not records:
            async with state.lock:
                if state.spool.size == state.spool.replayed and not state.queue:
                    await asyncio.to_thread(state.spool.reset)
                    state.originals.clear()
                    state.copies.clear()
                    state.active = False
                    log.info("spool replayed; writing to kafka directly again")
                    self.metrics.spool_bytes.set(0)
                    return 0.0
            return 0.01
        try:
            await self._replay(state, start, records)
        except (KafkaError, TimeoutError) as exc:
            self.kafka_ok = False
            log.info("spool replay waiting for kafka: %r", exc)
            return 1.0
        await asyncio.to_thread(state.spool.mark_replayed, records[-1].end)
        end = records[-1].end
        for kept in (state.originals, state.copies):
            for done_offset in [o for o in kept if o < end]:
                del kept[done_offset]
        self.metrics.spool_bytes.set(state.spool.pending_bytes)
        self.metrics.spool_replayed.inc(len(records))
        return 0.0

    async def _replay(self, state: _SpoolState, start: int, records: list[SpooledRecord]) -> None:
        """Send ``records`` (spooled from ``start`` on) and wait until Kafka has every one.

        Raises when Kafka does not take them in time; the next attempt sends again only what
        surely did not land (a send still pending or delivered is waited for, not repeated)."""
        mine: list[asyncio.Future[object]] = []
        offset = start
        for rec in records:
            here, offset = offset, rec.end
            first = state.originals.get(here)
            if first is not None:
                waited = time.perf_counter()
                outcome = await settled_within(first, lambda: self.kafka_ok, ORIGINAL_SEND_GRACE_S)
                if outcome == "delivered":
                    continue  # kept: a later attempt of this batch skips it again
                del state.originals[here]
                if outcome == "unsettled":
                    log.warning("spool replay: the first send of a spooled record is still unsettled "
                                "after %.0fs with kafka up; sending its spooled copy (should the first "
                                "land too, the event is there twice, same event_id)", ORIGINAL_SEND_GRACE_S)
                else:
                    log.info("spool replay: the first send of a spooled record failed (after %.1fs); "
                             "sending its spooled copy", time.perf_counter() - waited)
            copy = state.copies.get(here)
            if copy is None or copy.cancelled() or (copy.done() and copy.exception() is not None):
                async with asyncio.timeout(10.0):
                    copy = state.copies[here] = await self._producer.send(
                        rec.topic, value=rec.value, key=rec.key)
            mine.append(copy)
        if mine:
            # asyncio.wait, not gather: a timeout must not cancel sends the producer still retries.
            await asyncio.wait(mine, timeout=30.0)
        for copy in mine:
            if not copy.done():
                raise TimeoutError("the spool's replay was not acknowledged within 30s")
            if copy.cancelled() or copy.exception() is not None:
                raise KafkaError(f"the spool's replay failed: {copy.exception()!r}"
                                 if not copy.cancelled() else "the spool's replay was cancelled")
