"""``keyyo-stream execute actions``: send the actions to Keyyo, at most once, and say what happened.

One consumer per process in a consumer group over ``keyyo.actions.v1`` (read_committed, manual
commits). The results topic is also the executor's journal: every result of an action goes to the
results partition numbered like the action's own partition, so on taking a partition over the
executor reads that results partition back and knows which actions were attempted.

For each action: if its journal says it is finished, it is skipped; if an attempt of an SMS or a
call started without a result (the previous owner stopped mid-request), it is reported ``unknown``
and never sent. Otherwise it waits in its line's queue (one task per line, so a slow line holds up
no other), for its ``not_before`` and the line's pacing (one request per ``min_interval_s``), then
``sending`` is written and committed to Kafka *before* the request leaves, and the final result
after. A partition's committed offset is its lowest unfinished action.

Fencing: each owned partition's results are written in transactions of a transactional id of that
partition's own (``<group>.<actions topic>.<partition>``), which its next owner starts before it
reads the journal. That start fences every earlier producer of the id, so a process that lost the
partition without knowing it (a "zombie", cut off from the group but not from Keyyo) can no longer
commit ``sending``, hence never sends: the one action it may have sent is the one whose ``sending``
committed before the new owner started, which the new owner then reads and reports ``unknown``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from deploy.tail import topic_partitions
from processors.keyyo_api import ExecutorConfig, backoff_s, classify, request_for
from processors.runtime import stop_consumer
from schemas.actions import (
    FINAL_STATUSES,
    NOT_REPEATABLE,
    RETRYING,
    SENDING,
    Action,
    ActionInvalid,
    action_from_wire,
    result,
)
from schemas.notification import parse_rfc3339_ms

log = logging.getLogger("keyyo.executor")

HEALTH_PORT = 9131
"""The executor's preferred side port (the next free one when it is busy)."""
STOP_WRITE_S = 30.0
"""While stopping, how long a result write waits for an absent Kafka before it is abandoned."""
COMMIT_WAIT_S = 10.0
"""How long an offset commit may wait for Kafka (a later one carries the same offsets)."""
STUCK_AFTER_S = 10.0
"""A partition whose oldest result has waited this long to be written is reported stuck
(``/readyz``, ``keyyo_executor_stuck_partitions``): its actions wait meanwhile."""


class _Abandoned(Exception):
    """A result could not be written before shutdown; the action stays unfinished."""


class _Fenced(Exception):
    """Another executor owns the partition now: nothing more is written or sent for it here."""


class _Journal:
    """One owned partition's writes to its results partition, each acknowledged only once its
    transaction is committed, by a producer whose transactional id is the partition's own (so the
    partition's next owner fences it). Writes that arrive while a transaction commits go out
    together in the next one."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partition: int) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self.on_fenced: Callable[[], None] = lambda: None
        """Called once, when Kafka first refuses a write because another producer took the id."""
        self.fenced = False
        self.unwritten_since: float | None = None
        """When the oldest write not yet committed was asked for (monotonic); None when every write
        is committed. A write waiting long means Kafka is away or refuses this partition's writes."""
        self._pending: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        """A future done once the record is committed; failed with :class:`_Fenced` or the
        :class:`KafkaError` that aborted its transaction."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fenced:
            fut.set_exception(_Fenced())
            return fut
        if self.unwritten_since is None:
            self.unwritten_since = time.monotonic()
        self._pending.append((key, value, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"journal-writer-{self.partition}")
        return fut

    async def _run(self) -> None:
        while self._pending and not self.fenced:
            batch, self._pending = self._pending, []
            try:
                await self.producer.begin_transaction()
                sent = [await self.producer.send(self.topic, value, key=key, partition=self.partition)
                        for key, value, _ in batch]
                await asyncio.gather(*sent)
                await self.producer.commit_transaction()
            except ProducerFenced:
                self.fenced = True
                self.on_fenced()
                _settle(batch, _Fenced())
                _settle(self._pending, _Fenced())
                self._pending = []
                return
            except KafkaError as exc:
                with contextlib.suppress(Exception):
                    await self.producer.abort_transaction()
                _settle(batch, exc)  # the writer tries again; unwritten_since keeps counting
                continue
            _settle(batch, None)
            self.unwritten_since = time.monotonic() if self._pending else None

    async def close(self) -> None:
        """Stop writing (whatever is still pending fails) and stop the producer."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
        _settle(self._pending, _Fenced())
        self._pending = []
        with contextlib.suppress(Exception):  # bounded even with Kafka away
            await asyncio.wait_for(self.producer.stop(), 5)


def _settle(batch: list[tuple[bytes, bytes, asyncio.Future[None]]], exc: BaseException | None) -> None:
    for _, _, fut in batch:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)
            fut.add_done_callback(_retrieved)  # a writer gone meanwhile (shutdown) is no error


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def wall_ms() -> int:
    """The default clock."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class ExecutorSettings:
    """How one executor process runs."""

    bootstrap: str
    group: str
    actions_topic: str
    results_topic: str
    commit_interval_s: float = 1.0
    poll_ms: int = 200


class ExecutorMetrics:
    """Exported at ``/metrics`` on the side port."""

    def __init__(self, group: str) -> None:
        self.registry = CollectorRegistry()
        self.actions = Counter("keyyo_executor_actions", "Actions finished, by kind and status.",
                               ["group", "kind", "status"], registry=self.registry)
        self.requests = Counter("keyyo_executor_requests", "Requests sent to Keyyo, by endpoint and "
                                "answer (HTTP status, or error).", ["group", "endpoint", "answer"],
                                registry=self.registry)
        self.latency = Histogram("keyyo_executor_keyyo_seconds", "Keyyo's answer time.",
                                 ["group", "endpoint"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
                                 registry=self.registry)
        self.queue_age = Histogram(
            "keyyo_executor_queue_age_seconds", "From an action's not_before to its first request.",
            ["group"], buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900), registry=self.registry
        ).labels(group)
        self.queued = Gauge("keyyo_executor_queued", "Actions waiting in this process's line queues.",
                            ["group"], registry=self.registry).labels(group)
        self.partitions = Gauge("keyyo_executor_assigned_partitions", "Action partitions owned.",
                                ["group"], registry=self.registry).labels(group)
        self.fenced = Counter("keyyo_executor_fenced", "Partitions this process found another "
                              "executor had taken over (fenced: nothing more sent from them here).",
                              ["group"], registry=self.registry).labels(group)
        self.stuck = Gauge("keyyo_executor_stuck_partitions", "Owned partitions whose oldest result "
                           "has waited over 10 s to be written (Kafka away, or refusing): their "
                           "actions wait.", ["group"], registry=self.registry).labels(group)
        self.group = group


@dataclass(order=True)
class _Item:
    due_ms: int
    offset: int
    action: Action = field(compare=False)
    attempts: int = field(default=0, compare=False)
    first_attempt_ms: int | None = field(default=None, compare=False)


@dataclass(eq=False)
class _Line:
    """One Keyyo line's queue and its worker."""

    account: str
    last_request_ms: int = 0
    heap: list[_Item] = field(default_factory=list)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Part:
    """An owned action partition."""

    tp: TopicPartition
    writer: _Journal
    journal: dict[str, str] = field(default_factory=dict)
    """Action id -> its latest status in the results partition."""
    unresolved: set[int] = field(default_factory=set)
    in_flight: dict[str, int] = field(default_factory=dict)
    """Action ids queued or being sent -> offset."""
    next_offset: int | None = None
    committed: int | None = None
    lines: dict[str, _Line] = field(default_factory=dict)
    backlog: list[Any] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    restore_task: asyncio.Task[None] | None = None
    closing: bool = False

    def commit_offset(self) -> int | None:
        """Lowest unfinished offset, else one past the last read."""
        return min(self.unresolved) if self.unresolved else self.next_offset


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.executor.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.executor.take(assigned)


class Executor:
    """Consumes actions and performs them against Keyyo's API (see the module docstring)."""

    def __init__(self, settings: ExecutorSettings, config: ExecutorConfig, metrics: ExecutorMetrics,
                 clock: Callable[[], int] = wall_ms) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.parts: dict[TopicPartition, _Part] = {}
        self.joined = False
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._session: aiohttp.ClientSession | None = None
        self._auth: dict[str, aiohttp.DigestAuthMiddleware] = {}
        metrics.stuck.set_function(lambda: len(self.stuck()))  # at each scrape: the loop may be waiting

    def stop(self) -> None:
        """Finish the requests in flight, write their results, commit, leave the group."""
        self._stopping.set()

    def readiness(self) -> dict[str, bool]:
        """For ``/readyz``: joined the group, every owned partition's journal read, none stuck."""
        return {"joined": self.joined, "restored": all(p.ready.is_set() for p in self.parts.values()),
                "progressing": not self.stuck()}

    def detail(self) -> dict[str, Any]:
        """``/readyz``'s detail: queued actions per line, and the stuck partitions."""
        out: dict[str, Any] = {"queued": {line.account: len(line.heap) for p in self.parts.values()
                                          for line in p.lines.values() if line.heap}}
        if stuck := self.stuck():
            out["stuck"] = stuck
        return out

    def stuck(self) -> dict[str, dict[str, Any]]:
        """Owned partitions whose oldest result has waited over :data:`STUCK_AFTER_S` to be
        written, and for how long (a fenced partition is not waiting: it is given up)."""
        now = time.monotonic()
        return {f"{p.tp.topic}:{p.tp.partition}": {"waiting_s": round(now - since, 1)}
                for p in self.parts.values()
                if not p.writer.fenced and (since := p.writer.unwritten_since) is not None
                and now - since > STUCK_AFTER_S}

    async def run(self) -> None:
        """Consume and execute until :meth:`stop`."""
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s,
                                        sock_connect=self.config.connect_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)
        consumer = self._consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap, group_id=s.group, client_id=f"{s.group}-consumer",
            isolation_level="read_committed", enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=10000, heartbeat_interval_ms=1000, max_poll_interval_ms=300000)
        try:
            await consumer.start()
            await self._check_partitions(consumer)
            consumer.subscribe([s.actions_topic], listener=_Listener(self))
            last_commit = time.monotonic()
            while not self._stopping.is_set():
                batches = await consumer.getmany(timeout_ms=s.poll_ms, max_records=1000)
                for tp, records in batches.items():
                    part = self.parts.get(tp)
                    if part is None or part.closing:
                        continue
                    if part.ready.is_set():
                        for rec in records:
                            await self._dispatch(part, rec)
                    else:
                        part.backlog.extend(records)
                if time.monotonic() - last_commit >= s.commit_interval_s:
                    await self._commit(list(self.parts.values()))
                    last_commit = time.monotonic()
                self.metrics.queued.set(sum(len(x.heap) for p in self.parts.values()
                                            for x in p.lines.values()))
            await self.release(list(self.parts))
        finally:
            for part in list(self.parts.values()):
                await self._close(part)
            await stop_consumer(consumer)
            await self._session.close()

    async def _check_partitions(self, consumer: AIOKafkaConsumer) -> None:
        s = self.settings
        actions = await topic_partitions(consumer, s.actions_topic)
        results = await topic_partitions(consumer, s.results_topic)
        if not actions or not results:
            raise RuntimeError(f"{s.actions_topic if not actions else s.results_topic} is missing; "
                               "run `keyyo-stream topics create`")
        if len(results) < len(actions):
            raise RuntimeError(
                f"{self.settings.results_topic} has {len(results)} partitions, fewer than the "
                f"{len(actions)} of {self.settings.actions_topic}: it must have as many (it is the "
                "executor's journal); run `keyyo-stream topics create`")

    # -- partitions ---------------------------------------------------------------------------

    def take(self, assigned: list[TopicPartition]) -> None:
        """New partitions: read each one's journal, then start on its actions."""
        self.joined = True
        s = self.settings
        for tp in assigned:
            if tp in self.parts:
                continue
            journal = _Journal(self._journal_producer(tp), s.results_topic, tp.partition)
            part = self.parts[tp] = _Part(tp, journal)
            journal.on_fenced = functools.partial(self._fenced, part)
            part.restore_task = asyncio.create_task(self._restore(part), name=f"journal-{tp.partition}")
        self.metrics.partitions.set(len(self.parts))

    def _journal_producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        """The producer of a partition's results: its transactional id is the partition's own, so
        starting it fences the partition's earlier owners."""
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap, transactional_id=f"{s.group}.{tp.topic}.{tp.partition}",
            client_id=f"{s.group}-results-p{tp.partition}", linger_ms=0)

    async def release(self, revoked: list[TopicPartition]) -> None:
        """Given up: finish the requests in flight, write their results, commit, forget."""
        parts = [self.parts[tp] for tp in revoked if tp in self.parts]
        for part in parts:
            part.closing = True
        await asyncio.gather(*(self._close(part) for part in parts))
        await self._commit(parts)
        for part in parts:
            self.parts.pop(part.tp, None)
        self.metrics.partitions.set(len(self.parts))

    async def _close(self, part: _Part) -> None:
        part.closing = True
        if part.restore_task is not None and not part.restore_task.done():
            part.restore_task.cancel()
            await asyncio.wait({part.restore_task}, timeout=10)
        for line in part.lines.values():
            line.wakeup.set()
        tasks = [line.task for line in part.lines.values() if line.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await part.writer.close()

    async def _restore(self, part: _Part) -> None:
        """Fence the partition's earlier owners (their open transaction is aborted or completed),
        then read its journal (its results partition) to its end."""
        s = self.settings
        while True:  # Kafka away is waited out; a revocation meanwhile cancels this task
            try:
                await part.writer.producer.start()
                break
            except KafkaError as exc:
                log.warning("journal writer not started yet; retrying", extra={
                    "partition": part.tp.partition, "error": repr(exc)[:300]})
                with contextlib.suppress(Exception):
                    await part.writer.producer.stop()
                part.writer.producer = self._journal_producer(part.tp)
                await asyncio.sleep(1.0)
        rtp = TopicPartition(s.results_topic, part.tp.partition)
        reader = AIOKafkaConsumer(bootstrap_servers=s.bootstrap, enable_auto_commit=False,
                                  isolation_level="read_committed", client_id=f"{s.group}-journal")
        started = time.monotonic()
        count = 0
        await reader.start()
        try:
            reader.assign([rtp])
            await reader.seek_to_beginning(rtp)
            end = (await reader.end_offsets([rtp]))[rtp]
            while await reader.position(rtp) < end:
                for records in (await reader.getmany(rtp, timeout_ms=500, max_records=5000)).values():
                    for rec in records:
                        count += 1
                        self._journal(part, rec.value)
        finally:
            with contextlib.suppress(KafkaError, TimeoutError):  # bounded, even when cancelled mid-start
                await asyncio.wait_for(reader.stop(), 5)
        log.info("journal of partition %d read: %d actions", part.tp.partition, len(part.journal),
                 extra={"partition": part.tp.partition, "records": count,
                                        "actions": len(part.journal),
                                        "seconds": round(time.monotonic() - started, 2)})
        # Records fetched meanwhile first, in order; ready only once none is left (records keep
        # arriving in the backlog until then), so no later offset is dispatched, or committed, first.
        while part.backlog:
            backlog, part.backlog = part.backlog, []
            for rec in backlog:
                await self._dispatch(part, rec)
        part.ready.set()

    def _journal(self, part: _Part, value: bytes | None) -> None:
        if value is None:
            return
        try:
            r = orjson.loads(value)
            aid, status, account = r["action_id"], r["status"], r["account"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        part.journal[aid] = status
        if r.get("attempts"):  # the line's last request was no later than this result
            line = part.lines.get(account)
            if line is None:
                line = part.lines[account] = _Line(account)
            line.last_request_ms = max(line.last_request_ms, parse_rfc3339_ms(r["at"]))

    # -- actions ------------------------------------------------------------------------------

    async def _dispatch(self, part: _Part, rec: Any) -> None:
        """One action read from the partition: skip it, settle it, or queue it on its line."""
        with contextlib.suppress(_Abandoned, _Fenced):  # the next owner decides
            await self._dispatch_one(part, rec)

    async def _dispatch_one(self, part: _Part, rec: Any) -> None:
        part.next_offset = max(part.next_offset or 0, rec.offset + 1)
        try:
            action = action_from_wire(rec.key, rec.value)
        except ActionInvalid as exc:
            await self._rejected(part, rec, str(exc))
            return
        status = part.journal.get(action.action_id)
        if status in FINAL_STATUSES or action.action_id in part.in_flight:
            return  # done already, or a duplicate of one in progress
        if status == SENDING and action.kind in NOT_REPEATABLE:
            part.unresolved.add(rec.offset)
            await self._finish(part, _Item(0, rec.offset, action), "unknown", reason=(
                "an attempt started but its result was never recorded (the executor stopped during "
                "it): Keyyo may have executed it, so it is not sent again"))
            return
        if not self.config.can_send(action.account):
            part.unresolved.add(rec.offset)
            await self._finish(part, _Item(0, rec.offset, action), "rejected",
                               reason=f"no credentials for line {action.account} in the executor's config")
            return
        part.unresolved.add(rec.offset)
        part.in_flight[action.action_id] = rec.offset
        line = part.lines.get(action.account)
        if line is None:
            line = part.lines[action.account] = _Line(action.account)
        heapq.heappush(line.heap, _Item(action.not_before_ms, rec.offset, action))
        if line.task is None or line.task.done():
            line.task = asyncio.create_task(self._line_worker(part, line), name=f"line-{line.account}")
        line.wakeup.set()

    async def _rejected(self, part: _Part, rec: Any, reason: str) -> None:
        log.warning("invalid action", extra={"partition": rec.partition, "offset": rec.offset,
                                             "reason": reason})
        try:
            data = orjson.loads(rec.value or b"")
            if not isinstance(data, dict) or not isinstance(data.get("action_id"), str):
                return  # cannot even say which action: nothing to report it under
            stub = {"action_id": data["action_id"][:64], "tenant": str(data.get("tenant"))[:64],
                    "kind": str(data.get("kind"))[:16], "account": str(data.get("account"))[:20],
                    "callee": None, "origin": None}
        except orjson.JSONDecodeError:
            return
        await self._write(part, stub["action_id"], result(stub, "rejected", self.clock(), reason=reason,
                                                          offset=rec.offset))

    async def _line_worker(self, part: _Part, line: _Line) -> None:
        """Send a line's actions one at a time, earliest ``not_before`` first, paced."""
        while not part.closing:
            if not line.heap:
                line.wakeup.clear()
                await line.wakeup.wait()
                continue
            item = line.heap[0]
            now = self.clock()
            wait_ms = max(item.due_ms, line.last_request_ms + int(self.config.min_interval_s * 1000)) - now
            if wait_ms > 0 and now < item.action.expires_ms:
                line.wakeup.clear()  # woken early by an action due sooner, or by closing
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait_ms, item.action.expires_ms - now, 60_000) / 1000):
                        await line.wakeup.wait()
                continue
            heapq.heappop(line.heap)
            try:
                await self._attempt(part, line, item)
            except (_Abandoned, _Fenced):
                return  # stopping with Kafka away, or fenced: left unfinished, for the next owner

    async def _attempt(self, part: _Part, line: _Line, item: _Item) -> None:
        action = item.action
        now = self.clock()
        if now >= action.expires_ms:
            tried = f" after {item.attempts} attempt(s) Keyyo did not execute" if item.attempts else ""
            await self._finish(part, item, "expired", reason=f"not sent before its expires_at{tried}")
            return
        if item.first_attempt_ms is None:
            item.first_attempt_ms = now
            self.metrics.queue_age.observe(max(0, now - action.not_before_ms) / 1000)
        item.attempts += 1
        # Durable before the request leaves: after a crash, an attempt without a result is unknown.
        await self._write(part, action.action_id, result(
            action, SENDING, now, reason="request leaving", attempts=item.attempts,
            first_attempt_ms=item.first_attempt_ms, offset=item.offset))
        line.last_request_ms = self.clock()
        status, body, error = await self._request(action)
        verdict, reason = classify(action.kind, status, body, error)
        if verdict == "retry":
            if item.attempts < self.config.max_attempts or part.closing:
                # Safe to send again: said so, so that a next owner does not report it unknown.
                await self._write(part, action.action_id, result(
                    action, RETRYING, self.clock(), reason=reason, attempts=item.attempts, http_status=status,
                    body=body, first_attempt_ms=item.first_attempt_ms, offset=item.offset))
                if not part.closing:
                    item.due_ms = self.clock() + int(backoff_s(self.config, item.attempts) * 1000)
                    heapq.heappush(line.heap, item)
                return
            verdict, reason = ("failed" if error == "not_sent" or status == 500 else "unknown"), \
                f"{reason}; gave up after {item.attempts} attempts"
        await self._finish(part, item, verdict, reason=reason, http_status=status, body=body)

    async def _request(self, action: Action) -> tuple[int | None, str | None, str | None]:
        """(HTTP status, body, error) of one request; error ``not_sent`` or ``lost``."""
        assert self._session is not None
        endpoint, params = request_for(action)
        url = f"{self.config.base_url}/{endpoint}"
        middlewares: tuple[aiohttp.DigestAuthMiddleware, ...] = ()
        password = self.config.credentials(action.account)
        if password is not None:
            mw = self._auth.get(action.account)
            if mw is None:
                mw = self._auth[action.account] = aiohttp.DigestAuthMiddleware(action.account, password)
            middlewares = (mw,)
        started = time.monotonic()
        try:
            async with self._session.get(url, params=params, middlewares=middlewares) as resp:
                body = (await resp.read()).decode("utf-8", "replace")
                self.metrics.requests.labels(self.metrics.group, endpoint, str(resp.status)).inc()
                return resp.status, body[:500], None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            self.metrics.requests.labels(self.metrics.group, endpoint, "not_sent").inc()
            log.warning("keyyo not reachable", extra={"endpoint": endpoint, "error": type(exc).__name__})
            return None, None, "not_sent"
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.metrics.requests.labels(self.metrics.group, endpoint, "lost").inc()
            log.warning("keyyo request lost", extra={"endpoint": endpoint, "error": type(exc).__name__,
                                                     "action_id": action.action_id})
            return None, None, "lost"
        finally:
            self.metrics.latency.labels(self.metrics.group, endpoint).observe(time.monotonic() - started)

    async def _finish(self, part: _Part, item: _Item, status: str, *, reason: str,
                      http_status: int | None = None, body: str | None = None) -> None:
        action = item.action
        await self._write(part, action.action_id, result(
            action, status, self.clock(), reason=reason, attempts=item.attempts, http_status=http_status,
            body=body, first_attempt_ms=item.first_attempt_ms, offset=item.offset))
        part.journal[action.action_id] = status
        part.in_flight.pop(action.action_id, None)
        part.unresolved.discard(item.offset)
        self.metrics.actions.labels(self.metrics.group, action.kind, status).inc()
        log.info("action %s %s of %s: %s", action.kind, action.action_id, action.tenant, status,
                 extra={"action_id": action.action_id, "tenant": action.tenant, "kind": action.kind,
                        "status": status, "attempts": item.attempts})

    async def _write(self, part: _Part, aid: str, value: bytes) -> None:
        """A result into the results partition of the action's partition, committed; retried
        while Kafka is away (nothing proceeds until it is written). While stopping, given up after
        :data:`STOP_WRITE_S`: the journal then shows the attempt without its result, so the next
        owner reports it ``unknown`` (never sends it again), which is the safe side. Raises
        :class:`_Fenced` once another executor owns the partition."""
        delay = 0.2
        stopping_since: float | None = None

        def give_up() -> bool:
            nonlocal stopping_since
            if not self._stopping.is_set():
                return False
            stopping_since = stopping_since or time.monotonic()
            if time.monotonic() - stopping_since <= STOP_WRITE_S:
                return False
            log.error("result abandoned at shutdown, Kafka away", extra={"action_id": aid})
            return True

        while True:
            fut = part.writer.submit(aid.encode(), value)
            while not fut.done():
                await asyncio.wait({fut}, timeout=1.0)
                if not fut.done() and give_up():
                    fut.add_done_callback(_retrieved)
                    raise _Abandoned
            try:
                fut.result()
                return
            except KafkaError as exc:
                log.warning("result not written yet; retrying", extra={"error": repr(exc)})
                if give_up():
                    raise _Abandoned from exc
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    def _fenced(self, part: _Part) -> None:
        """Another executor started the partition's transactional id: stop its lines here."""
        part.closing = True
        self.metrics.fenced.inc()
        log.error("fenced: another executor owns this partition now; nothing more is sent from it "
                  "here", extra={"topic": part.tp.topic, "partition": part.tp.partition})
        for line in part.lines.values():
            line.wakeup.set()

    async def _commit(self, parts: list[_Part]) -> None:
        assert self._consumer is not None
        offsets = {}
        for part in parts:
            if part.writer.fenced:
                continue  # its offsets are its new owner's to commit
            offset = part.commit_offset()
            if offset is not None and offset != part.committed:
                offsets[part.tp] = offset
        if not offsets:
            return
        try:  # bounded: with the coordinator gone, aiokafka would wait for it as long as it takes
            await asyncio.wait_for(self._consumer.commit(offsets), COMMIT_WAIT_S)
        except (KafkaError, TimeoutError) as exc:  # the next commit carries the same offsets
            log.warning("offset commit failed", extra={"error": repr(exc)})
            return
        for part in parts:
            if part.tp in offsets:
                part.committed = offsets[part.tp]
