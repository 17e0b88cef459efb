"""The exactly-once processing loop shared by every processor.

One consumer per process in a consumer group (``read_committed``, no auto-commit). For each owned
input partition: a transactional producer whose id derives from (group, topic, partition) — the
fencing aiokafka's lack of KIP-447 calls for — a :class:`~processors.state.Store` restored from
its changelog partition before any input of it is processed, and a worker task. The worker turns
the partition's fetched records into transactions: outputs, changelog entries (coalesced per key)
and the input offsets, each taking at most ``slice_ms`` of processing, so partitions commit often
and one partition's commit overlaps another's processing. A revoked partition's worker finishes
its transaction before the partition is given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, ProducerFenced
from aiokafka.partitioner import DefaultPartitioner

from processors import checkpoint
from processors.contract import Logic, StartsDomains
from processors.observability import ProcessorMetrics
from processors.output import Output, coalesce
from processors.state import Store
from processors.step import Limits, Step

try:  # the optional native module (processors/native, built by `make compile`): its record batch
    from processors import _native  # type: ignore[attr-defined]
except ImportError:
    _native = None

log = logging.getLogger("keyyo.processor")

BATCH_BYTES = 512 * 1024
"""Largest record batch the runtime's producers send (their ``max_batch_size``)."""


class _Tagged(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds its fields to each line's own (the standard adapter would replace them)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


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
    max_records: int = 10000
    """Records fetched per poll."""
    poll_ms: int = 100
    """Longest wait for input; timers are checked at least this often."""
    slice_ms: int = 8
    """A transaction takes a partition's waiting records for at most this much processing time."""
    commit_interval_ms: int = 0
    """A transaction stays open this long after it begins, taking records as they arrive (within
    its slice), before it commits: fewer, fuller transactions when input trickles in. 0: commit
    as soon as the waiting records are processed."""
    queue_high: int = 20000
    """A partition with this many records waiting is paused until it is below half."""
    until_idle_s: float | None = None
    """Burst mode: exit once every owned partition is at its end for this long."""
    flush_at_end_ms: int | None = None
    """Burst mode: before exiting, advance stream time by this much so every timer fires."""
    limits: Limits = field(default_factory=Limits)
    """Bounds on what one record may do (time ahead, output and state sizes)."""
    max_attempts: int = 3
    """A record whose transaction Kafka refuses this many times (not for being away) is set aside."""
    stuck_after_failures: int = 3
    """Consecutive failed transactions after which a partition is reported stuck (``/readyz``)."""
    stuck_after_s: float = 10.0
    """A transaction open this long (Kafka not answering) also reports its partition stuck."""
    state_dir: Path | None = None
    """Where partition checkpoints are kept (None: none; every restore replays the changelog)."""
    checkpoint_max_age_ms: int = 20 * 3600_000
    """Older checkpoints are ignored: below the changelog's ``delete.retention.ms`` (24 h), so no
    tombstone a checkpoint predates has been compacted away."""
    restore_batch: int = 5000
    """Changelog records applied between two yields to the event loop while restoring."""
    close_wait_s: float = 30.0
    """How long giving up a partition (stop or rebalance) waits for its transaction in progress;
    past it (Kafka away) the transaction is abandoned, to be aborted by Kafka or the next owner."""

    @property
    def changelog_topic(self) -> str:
        """``<group>.<store>.changelog``."""
        return f"{self.group}.{self.store}.changelog"


@dataclass(eq=False)
class _Partition:
    """An owned input partition: its producer, state, fetched records, and its worker."""

    tp: TopicPartition
    producer: AIOKafkaProducer
    store: Store
    step: Step
    position: int = -1
    """Next input offset to process (known once the first records are fetched)."""
    failures: int = 0
    """Consecutive failed transactions."""
    last_error: str | None = None
    attempts: dict[int, int] = field(default_factory=dict)
    """Offset -> failed transactions it was the first record of, since the partition went careful."""
    careful: bool = False
    """After a refused transaction: one record per transaction, so the faulty one is found."""
    stuck_since: float | None = None
    txn_started: float | None = None
    """When the open transaction began (monotonic), while one is open."""
    restore: dict[str, Any] | None = None
    """While restoring: progress for ``/readyz`` (records applied, remaining, source)."""
    restore_span: tuple[int, int] = (0, 0)
    """The changelog offsets the last restore replayed, [from, end)."""
    restored: bool = False
    """The state is complete (a checkpoint may be written when the partition is given up)."""
    changelog_offset: int = 0
    """The changelog offset the committed state reflects: the restore's end, then one past this
    process's last changelog record in a committed transaction. Computed, not asked of Kafka at
    close, so writes by another owner (if this process was a zombie) are never claimed."""
    fenced: bool = False
    queue: deque[Any] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    closing: bool = False
    busy: bool = False
    paused: bool = False
    starting: bool = False
    """For a logic with ``on_start``, until the partition's first transaction commits (that
    transaction runs it)."""


class _BatchWriter:
    """Appends records to one producer batch per (topic, partition) and sends each when full.

    ``send_batch`` costs one future per batch instead of one per record; records of a partition
    keep their order. Partitions come from Kafka's default partitioner, as ``send`` would pick.
    With the native module, a batch is its ``RecordBatch`` (transactional, as every runtime
    producer is), which encodes each record where aiokafka's builder takes a Python and a Cython
    call: the same bytes (tests/unit/test_record_batch.py).
    """

    def __init__(self, producer: AIOKafkaProducer, partitions: dict[str, list[int]],
                 key_partition: dict[tuple[str, bytes], int], native: Any = None) -> None:
        self.producer = producer
        self.native = native
        self.partitions = partitions
        self.key_partition = key_partition
        self.open: dict[tuple[str, int], Any] = {}
        self.futures: list[asyncio.Future[Any]] = []
        self.counts: list[int] = []
        self.last_offsets: dict[tuple[str, int], int] = {}
        """Offset of the last record written to each (topic, partition), once flushed."""

    def append(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> bool:
        """``add`` without awaiting, when it needs no await (its partition known, room in its
        open batch): True if appended; else False, and nothing was done (call ``add``)."""
        if partition is None:
            partition = self.key_partition.get((topic, key))
            if partition is None:
                return False
        batch = self.open.get((topic, partition))
        return batch is not None and self._put(batch, key, value)

    async def add(self, topic: str, key: bytes, value: bytes | None, partition: int | None = None) -> None:
        if partition is None:
            partition = self.key_partition.get((topic, key))
            if partition is None:
                if topic not in self.partitions:
                    self.partitions[topic] = sorted(await self.producer.partitions_for(topic))
                partition = int(_PARTITIONER(key, self.partitions[topic], self.partitions[topic]))
                self.key_partition[(topic, key)] = partition
        batch = self.open.get((topic, partition))
        if batch is None or not self._put(batch, key, value):
            if batch is not None:
                await self._send(topic, partition, batch)
            batch = self.open[(topic, partition)] = (
                self.producer.create_batch() if self.native is None
                else self.native.RecordBatch(BATCH_BYTES, True))
            if not self._put(batch, key, value):
                raise ValueError(f"a record of {len(value or b'')} bytes does not fit a batch")

    async def add_entries(self, topic: str, partition: int, entries: dict[str, bytes | None]) -> None:
        """``add`` of each entry (key, value) of ``entries`` to ``partition``; with native batches,
        one call per batch instead of several Python calls per entry."""
        if self.native is None:
            for key, value in entries.items():
                raw = key.encode()
                if not self.append(topic, raw, value, partition):
                    await self.add(topic, raw, value, partition=partition)
            return
        batch = self.open.get((topic, partition))
        done = 0 if batch is None else batch.add_entries(entries)
        while done < len(entries):  # a new batch: the entry refused opens it, then the others
            # (finding it walks the entries before it: once per batch of 512 KB)
            key, value = next(itertools.islice(entries.items(), done, None))
            await self.add(topic, key.encode(), value, partition=partition)
            done = self.open[(topic, partition)].add_entries(entries, done + 1)

    async def add_outputs(self, outputs: list[Output], targets: dict[str, str],
                          prefix: str) -> dict[str, int]:
        """``add`` of each output to its topic (``targets``: base name -> full name, completed with
        ``prefix``); returns how many went to each base topic. With native batches, one call
        appends all but those it cannot (a topic, key or partition not seen yet, a full batch, a
        value to render), which are added here one by one."""
        written: dict[str, int] = {}
        done = 0
        while done < len(outputs):
            if self.native is not None:
                done = self.native.add_outputs(outputs, done, targets, self.key_partition, self.open, written)
                if done == len(outputs):
                    break
            out = outputs[done]
            topic = targets.get(out.topic)
            if topic is None:  # once per topic: its full name
                topic = targets[out.topic] = prefix + out.topic
            value = out.rendered()
            if not self.append(topic, out.key, value):  # (most records: no coroutine made)
                await self.add(topic, out.key, value)
            written[out.topic] = written.get(out.topic, 0) + 1
            done += 1
        return written

    def _put(self, batch: Any, key: bytes, value: bytes | None) -> bool:
        """Append to ``batch`` (native or aiokafka's); False when it is full."""
        if self.native is not None:
            return bool(batch.add(key, value))
        return batch.append(key=key, value=value, timestamp=None) is not None

    async def _send(self, topic: str, partition: int, batch: Any) -> None:
        self.counts.append(batch.record_count())
        self.futures.append(await self.producer.send_batch(batch, topic, partition=partition))

    async def flush(self) -> None:
        """Send the open batches and wait until Kafka has every record."""
        for (topic, partition), batch in self.open.items():
            await self._send(topic, partition, batch)
        self.open = {}
        for meta, count in zip(await asyncio.gather(*self.futures), self.counts, strict=True):
            if count:
                where = (meta.topic, meta.partition)
                self.last_offsets[where] = max(self.last_offsets.get(where, -1), meta.offset + count - 1)
        self.futures = []
        self.counts = []


_PARTITIONER = DefaultPartitioner()

GC_THRESHOLD = (50_000, 20, 100)
"""The cyclic garbage collector's thresholds in a processor's process (`keyyo-stream process`,
and the benchmarks' drains). With Python's (700, 10, 10), a call-records drain of 280k
notifications spent 1.5-1.9 s of its ≈ 20 s in collections (≈ 1,000 young ones and 8-10 full
ones, each walking every tracked object: records, outputs, batches, futures in flight); with
these, 0.3 s (5 young, 1 full). Only objects in reference cycles wait longer to be freed
(everything else is freed by reference counting as before)."""

RECORDS_PER_CLOCK = 32
"""A transaction reads the wall clock and checks its slice once per this many records."""


class Runtime:
    """Runs a :class:`Logic` over the input topic with exactly-once outputs and state."""

    def __init__(self, settings: RuntimeSettings, logic: Logic[Any], metrics: ProcessorMetrics,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000, *,
                 native: Any = _native) -> None:
        """``native``: the native module whose record batches the transactions are written with
        (``processors._native`` when `make compile` built it), or None for aiokafka's."""
        self.settings = settings
        self.native = native
        self.logic = logic
        self.metrics = metrics
        self.clock = clock
        self.log = _Tagged(log, {"processor": settings.group})
        """The processor's logger: every line says which processor (group) it is from."""
        self.parts: dict[TopicPartition, _Partition] = {}
        self.restoring: set[TopicPartition] = set()
        self.joined = False
        self.failed = False
        """Set when a partition worker died of an unexpected error."""
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[str, list[int]] = {}
        self._key_partition: dict[tuple[str, bytes], int] = {}
        self._targets: dict[str, str] = {}
        self._kept: dict[TopicPartition, tuple[Store, int]] = {}
        """State of partitions given up in a rebalance, with its changelog offset, in case they
        come back to this process."""

    def detail(self) -> dict[str, Any]:
        """``/readyz``'s detail: stuck partitions and why, restoring partitions and how far."""
        out: dict[str, Any] = {}
        if stuck := self.stuck():
            out["stuck"] = stuck
        restoring = {f"{p.tp.topic}:{p.tp.partition}": p.restore for p in self.parts.values()
                     if p.restore is not None}
        if restoring:
            out["restoring"] = restoring
        return out

    def readiness(self) -> dict[str, bool]:
        """For ``/readyz``: joined the group, every owned partition restored, none stuck."""
        return {"joined": self.joined, "restored": not self.restoring, "progressing": not self.stuck()}

    def stuck(self) -> dict[str, dict[str, Any]]:
        """Partitions that cannot make progress, and why (``/readyz``'s detail): transactions
        failing in a row, or one open for longer than ``stuck_after_s``."""
        now = time.monotonic()
        out: dict[str, dict[str, Any]] = {}
        for p in self.parts.values():
            if p.stuck_since is not None:
                since, error = p.stuck_since, p.last_error
            elif p.txn_started is not None and now - p.txn_started > self.settings.stuck_after_s:
                since, error = p.txn_started, "transaction not answered by Kafka"
            else:
                continue
            out[f"{p.tp.topic}:{p.tp.partition}"] = {
                "failures": p.failures, "stuck_for_s": round(now - since, 1), "offset": p.position,
                "error": error}
        return out

    def stop(self) -> None:
        """Finish the batch in progress, commit it, leave the group."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until :meth:`stop` (or, in burst mode, until the input is drained).

        This loop only fetches and hands records to each partition's worker; the workers process
        and commit concurrently, so one partition's commit overlaps another's processing.
        """
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
                for tp, records in batches.items():
                    part = self.parts.get(tp)
                    if part is None or part.closing or not records:
                        continue
                    if part.position < 0:
                        part.position = records[0].offset
                    part.queue.extend(records)
                    part.wakeup.set()
                    if len(part.queue) >= s.queue_high and not part.paused:
                        consumer.pause(tp)
                        part.paused = True
                self._report(consumer)
                if s.until_idle_s is not None:
                    drained = (self.joined and not self.restoring and not batches
                               and await self._at_end(consumer))
                    if not drained:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= s.until_idle_s:
                        break
            await asyncio.gather(*(self._close(part, flush_ms=s.flush_at_end_ms)
                                   for part in list(self.parts.values())))
        finally:  # partitions side by side: with Kafka away each may wait close_wait_s
            await asyncio.gather(*(self._close(part) for part in list(self.parts.values())))
            await stop_consumer(consumer)

    async def _at_end(self, consumer: AIOKafkaConsumer) -> bool:
        for tp, part in self.parts.items():
            end = consumer.last_stable_offset(tp)
            if part.queue or part.busy or end is None or await consumer.position(tp) < end:
                return False
        return True

    # -- processing ----------------------------------------------------------------------

    async def _work(self, part: _Partition) -> None:
        """A partition's worker: a transaction for its waiting records, or for its due timers."""
        s = self.settings
        while not part.closing:
            if not part.queue:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(s.poll_ms / 1000):  # not wait_for: see publisher._probe
                        await part.wakeup.wait()
                part.wakeup.clear()
                if part.closing:
                    break
            if part.queue or part.starting or part.step.has_due(self.clock()):
                await self._process(part)
            if part.paused and len(part.queue) < s.queue_high // 2 and self._consumer is not None:
                self._consumer.resume(part.tp)
                part.paused = False

    async def _process(self, part: _Partition, flush_ms: int | None = None) -> None:
        """One transaction: outputs and changelog entries of the records it takes from the queue
        (and their offsets) and of the timers that are due."""
        s = self.settings
        store, producer, step = part.store, part.producer, part.step
        records: list[Any] = []
        part.busy = True
        part.txn_started = time.monotonic()
        try:
            await producer.begin_transaction()
            writer = self._writer(producer)
            outputs: list[Output] = []
            if part.starting:  # before any record, as the driver does
                outputs.extend(step.start(await self._owns(part), self.clock(), part.tp.partition))
            budget = s.slice_ms / 1000  # processing time left to this transaction
            commit_at = time.perf_counter() + s.commit_interval_ms / 1000
            while True:
                until = time.perf_counter() + budget
                while part.queue and (not records or (time.perf_counter() < until and not part.careful)):
                    # A run of records on one reading of the clocks: read for each record, the
                    # wall clock alone (a Python call) took 0.8 % of a drain's samples. A run
                    # takes well under a millisecond, so the slice and live mode's time hold.
                    wall_ms = self.clock()
                    for _ in range(1 if part.careful else RECORDS_PER_CLOCK):
                        if not part.queue:
                            break
                        rec = part.queue.popleft()
                        records.append(rec)
                        tries = part.attempts.get(rec.offset, 0) if part.careful else 0
                        if tries >= s.max_attempts:
                            reason = f"not accepted by Kafka after {tries} attempts: {part.last_error}"
                            outputs.append(step.dead_letter(rec, reason, attempts=tries))
                        else:
                            outputs.extend(step.record(rec, wall_ms))
                budget = until - time.perf_counter()
                wait = commit_at - time.perf_counter()
                if (part.queue or budget <= 0 or wait <= 0 or part.careful or part.closing
                        or flush_ms is not None or self._stopping.is_set()):
                    break
                part.wakeup.clear()  # wait for more records, within the commit interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await part.wakeup.wait()
            if flush_ms is not None:
                outputs.extend(step.flush(flush_ms, part.tp.partition))
            outputs.extend(step.timers(self.clock(), part.tp.partition))
            await self._write(writer, coalesce(outputs, step.unrendered(part.tp.partition)))
            await self._write_changelog(writer, part)
            await writer.flush()
            if records:
                await producer.send_offsets_to_transaction({part.tp: records[-1].offset + 1}, s.group)
            started = time.perf_counter()
            await producer.commit_transaction()
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            last = writer.last_offsets.get((s.changelog_topic, part.tp.partition))
            if last is not None:
                part.changelog_offset = last + 1
        except ProducerFenced:
            self.log.warning("fenced: another process owns the partition now",
                             extra={"topic": part.tp.topic, "partition": part.tp.partition})
            store.abort()
            part.fenced = True  # its state is no longer this process's to keep or checkpoint
            part.closing = True
            return
        except Exception as exc:
            await self._failed(part, records, exc)
            return
        finally:
            part.busy = False
            part.txn_started = None
        store.commit()
        part.starting = False
        self.metrics.dead_letters.inc(step.dead_letters)
        step.dead_letters = 0
        if records:
            part.position = records[-1].offset + 1
            self.metrics.records_in.inc(len(records))
            if part.careful and all(offset < part.position for offset in part.attempts):
                part.careful = False
                part.attempts.clear()
        if part.stuck_since is not None:
            self.log.info("partition progressing again", extra={
                "topic": part.tp.topic, "partition": part.tp.partition, "offset": part.position})
            self.metrics.stuck.labels(self.metrics.processor, str(part.tp.partition)).set(0)
        part.failures, part.stuck_since = 0, None

    async def _failed(self, part: _Partition, records: list[Any], exc: Exception) -> None:
        """Abort; when Kafka refused the transaction (not when it is away), go one record at a
        time and count the attempts of the first record, so a faulty one is set aside."""
        part.store.abort()
        part.step.dead_letters = 0
        self.metrics.aborts.inc()
        away = _kafka_away(exc)
        part.failures += 1
        part.last_error = f"{type(exc).__name__}: {exc}"[:500]
        first = records[0].offset if records else None
        self.log.error("transaction failed, aborted; it will be tried again", extra={
            "topic": part.tp.topic, "partition": part.tp.partition, "offset": first,
            "records": len(records), "kafka_away": away, "error": part.last_error})
        self.metrics.failures.labels(self.metrics.processor, "kafka_away" if away else "refused").inc()
        with contextlib.suppress(Exception):
            await part.producer.abort_transaction()
        if first is not None and not away:
            part.careful = True
            part.attempts[first] = part.attempts.get(first, 0) + 1
        if part.failures >= self.settings.stuck_after_failures and part.stuck_since is None:
            part.stuck_since = time.monotonic()
            self.metrics.stuck.labels(self.metrics.processor, str(part.tp.partition)).set(1)
            self.log.error("partition stuck: transactions keep failing", extra={
                "topic": part.tp.topic, "partition": part.tp.partition, "offset": first,
                "failures": part.failures, "error": part.last_error})
        if records and self._consumer is not None:
            part.queue.clear()  # read again from the first record of the aborted batch
            self._consumer.seek(part.tp, records[0].offset)
        await asyncio.sleep(min(0.25 * 2 ** min(part.failures, 5), 5.0))

    async def _owns(self, part: _Partition) -> Callable[[bytes], bool]:
        """Whether an input key falls in ``part`` (Kafka's default partitioner, as producers pick)."""
        everyone = sorted(await part.producer.partitions_for(part.tp.topic))
        return lambda key: int(_PARTITIONER(key, everyone, everyone)) == part.tp.partition

    def _writer(self, producer: AIOKafkaProducer) -> _BatchWriter:
        return _BatchWriter(producer, self._partitions, self._key_partition, self.native)

    async def _write(self, writer: _BatchWriter, outputs: list[Output]) -> None:
        written = await writer.add_outputs(outputs, self._targets, self.settings.output_prefix)
        for base, count in written.items():  # counted once per topic and transaction
            self.metrics.records_out.labels(self.metrics.processor, base).inc(count)

    async def _write_changelog(self, writer: _BatchWriter, part: _Partition) -> None:
        await writer.add_entries(self.settings.changelog_topic, part.tp.partition, part.store.staged())

    # -- partitions ----------------------------------------------------------------------

    async def _assign(self, assigned: set[TopicPartition]) -> None:
        """Register the partitions and return at once: each restores its state in its own task
        (yielding often), so the rebalance completes, heartbeats and signals are served, and
        records fetched meanwhile wait in the partition's queue."""
        self.joined = True
        for tp in [tp for tp in self._kept if tp not in assigned]:
            del self._kept[tp]  # given to another process: its state is theirs now
        new = [self._partition(tp) for tp in sorted(assigned) if tp not in self.parts]
        for part in new:
            self.parts[part.tp] = part
            self.restoring.add(part.tp)
            part.worker = asyncio.create_task(self._open_then_work(part),
                                              name=f"partition-{part.tp.partition}")
            part.worker.add_done_callback(functools.partial(self._worker_done, part))
        self.metrics.assigned.set(len(self.parts))

    async def _open_then_work(self, part: _Partition) -> None:
        await self._open(part)
        self.restoring.discard(part.tp)
        if not part.closing:
            await self._work(part)

    def _worker_done(self, part: _Partition, task: asyncio.Task[None]) -> None:
        """A worker that died of a bug stops the process: better a restart than a stalled partition."""
        if task.cancelled() or task.exception() is None:
            return
        self.log.error("partition worker failed; stopping", exc_info=task.exception(), extra={
            "topic": part.tp.topic, "partition": part.tp.partition, "offset": part.position})
        self.failed = True
        self.stop()

    def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap, transactional_id=f"{s.group}.{tp.topic}.{tp.partition}",
            client_id=f"{s.group}-p{tp.partition}", linger_ms=5, max_batch_size=BATCH_BYTES,
        )

    def _partition(self, tp: TopicPartition) -> _Partition:
        s = self.settings
        producer = self._producer(tp)
        store = Store()
        step = Step(self.logic, store, s.group, mode=s.mode, allowed_lateness_ms=s.allowed_lateness_ms,
                    limits=s.limits, clock=self.clock)
        part = _Partition(tp, producer, store, step)
        part.starting = isinstance(self.logic, StartsDomains)  # else no transaction just to start
        return part

    async def _open(self, part: _Partition) -> None:
        """Fence the previous owner (its open transaction is aborted), then restore the state;
        Kafka being away is waited out, a revocation meanwhile stops it."""
        started = time.monotonic()
        while not part.closing:
            try:
                await part.producer.start()
                restored, source = await self._restore(part)
                break
            except KafkaError as exc:
                self.log.warning("restoring a partition failed; trying again", extra={
                    "topic": part.tp.topic, "partition": part.tp.partition, "error": repr(exc)[:300]})
                with contextlib.suppress(Exception):
                    await part.producer.stop()
                part.producer = self._producer(part.tp)
                part.store.clear()  # half a restore is no base for the next one
                await asyncio.sleep(1.0)
        else:
            return
        if part.closing:
            return
        part.restored = True
        part.restore = None
        self.metrics.restore_remaining.labels(self.metrics.processor, str(part.tp.partition)).set(0)
        self.log.info("partition restored", extra={
            "topic": part.tp.topic, "partition": part.tp.partition, "entries": len(part.store),
            "changelog_records": restored, "source": source, "changelog_span": part.restore_span,
            "seconds": round(time.monotonic() - started, 2),
            "records_per_s": round(restored / max(time.monotonic() - started, 1e-3))})

    async def _restore(self, part: _Partition) -> tuple[int, str]:
        """Bring the partition's store up to date: from the state this process kept when it last
        owned the partition, or from a local checkpoint, replaying only the changelog after it;
        else from the whole changelog. Returns the changelog records applied and the source."""
        s = self.settings
        store, partition = part.store, part.tp.partition
        tp = TopicPartition(s.changelog_topic, partition)
        start, source = 0, "changelog"
        kept = self._kept.pop(part.tp, None)
        if kept is not None:
            part.store = part.step.store = store = kept[0]
            start, source = kept[1], "kept in memory"
        elif s.state_dir is not None:
            loaded, why = checkpoint.read(checkpoint.path_for(s.state_dir, tp.topic, partition),
                                          tp.topic, partition, s.checkpoint_max_age_ms)
            if loaded is not None:
                for key, value in loaded.entries.items():
                    store.restore(key, value)
                start, source = loaded.offset, "checkpoint"
            elif why != "no checkpoint":
                self.log.warning("partition checkpoint not used: " + why, extra={
                    "topic": tp.topic, "partition": partition})
        consumer = AIOKafkaConsumer(bootstrap_servers=s.bootstrap,
                                    isolation_level="read_committed", enable_auto_commit=False)
        await consumer.start()
        count = 0
        gauge = self.metrics.restore_remaining.labels(self.metrics.processor, str(partition))
        try:
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            if start > end:  # the changelog was recreated: the saved state is not its state
                self.log.warning("saved state is ahead of the changelog; restoring it all", extra={
                    "topic": tp.topic, "partition": partition, "saved_offset": start, "end": end})
                store.clear()
                start, source = 0, "changelog"
            # Explicit offsets: a seek_to_beginning is resolved lazily, and was seen to land at the end.
            first = max(start, (await consumer.beginning_offsets([tp]))[tp])
            consumer.seek(tp, first)
            total = max(0, end - first)
            part.restore = {"source": source, "applied": 0, "remaining": total}
            last_note = began = time.monotonic()
            while not part.closing and (position := await consumer.position(tp)) < end:
                part.restore["remaining"] = end - position
                gauge.set(end - position)
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=s.restore_batch)
                for rec in batch.get(tp, []):
                    store.restore(rec.key.decode(), rec.value)
                count += len(batch.get(tp, []))
                part.restore["applied"] = count
                if time.monotonic() - last_note >= 1:
                    last_note = time.monotonic()
                    self.log.info("restoring partition", extra={
                        "topic": tp.topic, "partition": partition, "applied": count,
                        "remaining": end - position, "source": source,
                        "records_per_s": round(count / (last_note - began))})
                await asyncio.sleep(0)  # heartbeats, signals and health checks between batches
        finally:
            await consumer.stop()
        self.metrics.restored_records.inc(count)
        part.restore_span = (first, end)
        part.changelog_offset = end
        return count, source

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        """Give up partitions side by side: with Kafka slow, each may wait ``close_wait_s`` for its
        transaction, and one after the other they would outlast the group's rebalance timeout."""
        parts = [part for tp in sorted(revoked) if (part := self.parts.get(tp)) is not None]
        await asyncio.gather(*(self._close(part) for part in parts))
        self.metrics.assigned.set(len(self.parts))

    async def _close(self, part: _Partition, flush_ms: int | None = None) -> None:
        """Let the worker finish its transaction (within ``close_wait_s``), optionally fire every
        timer, stop the producer."""
        self.parts.pop(part.tp, None)
        part.closing = True
        part.wakeup.set()
        abandoned = False
        if part.worker is not None and not part.worker.done():
            await asyncio.wait({part.worker}, timeout=self.settings.close_wait_s)
            if not part.worker.done():  # Kafka away: its transaction cannot end
                abandoned = True
                self.log.warning("transaction abandoned: Kafka did not answer; it is aborted by Kafka "
                                 "or by the partition's next owner", extra={
                                     "topic": part.tp.topic, "partition": part.tp.partition})
                part.worker.cancel()
                await asyncio.wait({part.worker}, timeout=5)
        if flush_ms is not None and not abandoned:
            part.queue.clear()  # only the timers: records left are read again by the next owner
            await self._flush_at_end(part, flush_ms)
        with contextlib.suppress(Exception):  # bounded: with Kafka away it would wait to flush
            await asyncio.wait_for(part.producer.stop(), 5)
        if part.restored and not part.fenced and not self.failed and not abandoned:
            await self._save(part, keep=flush_ms is None and not self._stopping.is_set())
        for gauge in (self.metrics.lag, self.metrics.state_entries, self.metrics.stuck,
                      self.metrics.restore_remaining):
            with contextlib.suppress(KeyError):
                gauge.remove(self.metrics.processor, str(part.tp.partition))

    async def _flush_at_end(self, part: _Partition, flush_ms: int) -> None:
        """Burst mode's last transaction, tried again if Kafka refuses it (an aborted flush takes
        back its timers and clocks, so a retry is the same flush); if it never commits, the run
        fails rather than end as if every call had been closed."""
        for _ in range(self.settings.max_attempts):
            await self._process(part, flush_ms=flush_ms)
            if part.failures == 0 or part.fenced:
                return
        self.log.error("burst end: the last timers were not written; run again to close them", extra={
            "topic": part.tp.topic, "partition": part.tp.partition, "error": part.last_error})
        self.failed = True

    async def _save(self, part: _Partition, keep: bool) -> None:
        """The partition is given up with every transaction committed: note the changelog offset
        its state reflects; keep the state in memory (a rebalance may give it back) and write a
        checkpoint (a restart replays only what follows)."""
        s = self.settings
        tp = TopicPartition(s.changelog_topic, part.tp.partition)
        offset = part.changelog_offset
        if keep:
            self._kept[part.tp] = (part.store, offset)
        if s.state_dir is not None:
            started = time.monotonic()
            try:
                size = await asyncio.to_thread(
                    checkpoint.write, checkpoint.path_for(s.state_dir, tp.topic, tp.partition),
                    tp.topic, tp.partition, offset, dict(part.store.committed()))
            except OSError as exc:
                self.log.warning("checkpoint not written", extra={
                    "topic": tp.topic, "partition": tp.partition, "error": str(exc)})
                return
            self.log.info("partition checkpoint written", extra={
                "topic": tp.topic, "partition": tp.partition, "offset": offset,
                "entries": len(part.store), "bytes": size,
                "seconds": round(time.monotonic() - started, 2)})

    def _report(self, consumer: AIOKafkaConsumer) -> None:
        for tp, part in self.parts.items():
            high = consumer.highwater(tp)
            if high is not None and part.position >= 0:
                self.metrics.lag.labels(self.metrics.processor, str(tp.partition)).set(
                    max(0, high - part.position))
            self.metrics.state_entries.labels(self.metrics.processor, str(tp.partition)).set(
                len(part.store))


STOP_LEAVE_S = 10.0
"""While stopping, how long leaving the consumer group may take (Kafka away: it cannot)."""


async def stop_consumer(consumer: AIOKafkaConsumer, within_s: float = STOP_LEAVE_S) -> None:
    """Stop a group consumer in bounded time. With Kafka away, leaving the group waits for a
    coordinator that is gone (the group drops the member after its session timeout instead), and
    aiokafka's fetcher lets its own task's cancellation out of ``stop``: neither stops the caller,
    unless the caller itself is being cancelled."""
    try:
        await asyncio.wait_for(consumer.stop(), within_s)
    except (KafkaError, TimeoutError) as exc:
        log.warning("consumer not stopped cleanly (Kafka away?)", extra={"error": repr(exc)[:300]})
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.warning("consumer not stopped cleanly (Kafka away?)", extra={"error": "CancelledError"})


def _kafka_away(exc: BaseException) -> bool:
    """True when the failure is Kafka being unreachable or slow, not a refusal of what was sent:
    such failures are retried for as long as it takes and never set a record aside."""
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | TimeoutError | ConnectionError):
        return True
    return isinstance(exc, KafkaError) and bool(exc.retriable)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runtime._revoke(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.runtime._assign(set(assigned))
