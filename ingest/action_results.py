"""The edge's view of ``keyyo.action-results.v1``: the latest result of recent actions, in memory.

Read from the beginning of the (compacted) topic, every partition, without a consumer group, so
each edge process (and worker) can answer ``GET /v1/keyyo/{tenant}/actions/{action_id}`` for any
action, whichever process executed it. The newest ``kept`` actions are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from deploy.tail import topic_partitions

log = logging.getLogger("keyyo.ingest")


class ActionResults:
    """Follows the results topic; :meth:`get` gives an action's latest result."""

    def __init__(self, bootstrap: str, topic: str, kept: int = 50_000) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.kept = kept
        self.latest: OrderedDict[str, tuple[str, bytes]] = OrderedDict()
        """Action id -> (tenant, latest result value)."""
        self.caught_up = False
        self._task: asyncio.Task[None] | None = None

    def get(self, action_id: str) -> tuple[str, bytes] | None:
        """(tenant, latest result) of an action, if known."""
        return self.latest.get(action_id)

    def add(self, value: bytes | None) -> None:
        """Take one result record into account."""
        if value is None:
            return
        try:
            data = orjson.loads(value)
            aid, tenant = data["action_id"], data["tenant"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if not isinstance(aid, str) or not isinstance(tenant, str):
            return
        self.latest[aid] = (tenant, value)
        self.latest.move_to_end(aid)
        while len(self.latest) > self.kept:
            self.latest.popitem(last=False)

    async def start(self) -> None:
        """Follow the topic in the background (it may not exist yet: then retried)."""
        self._task = asyncio.create_task(self._follow(), name="action-results")

    async def stop(self) -> None:
        """Stop following (bounded: a consumer stopped halfway through its start may not close
        cleanly, and the edge's shutdown must not wait on it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 5)

    async def _follow(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                        isolation_level="read_committed", client_id="keyyo-ingest-results")
            try:
                await consumer.start()
                tps = await topic_partitions(consumer, self.topic)
                if not tps:
                    await asyncio.sleep(5)
                    continue
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                ends = await consumer.end_offsets(tps)
                while True:
                    for records in (await consumer.getmany(timeout_ms=500, max_records=5000)).values():
                        for rec in records:
                            self.add(rec.value)
                    if not self.caught_up and all(
                            [await consumer.position(tp) >= ends[tp] for tp in tps]):
                        self.caught_up = True
                        log.info("action results read", extra={"actions": len(self.latest)})
            except KafkaError as exc:
                log.warning("action results not readable yet; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(5)
            finally:
                with contextlib.suppress(KafkaError, TimeoutError):
                    await asyncio.wait_for(consumer.stop(), 5)
