"""Test-side Kafka helpers: where the broker is, and reading a topic to its end."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord

from deploy.kafka_local import temporary_broker
from deploy.tail import topic_partitions


@dataclass
class Broker:
    """The broker the test session uses, and how it was provided."""

    bootstrap: str
    kind: str
    """``env`` (KAFKA_BOOTSTRAP_SERVERS), ``docker`` (testcontainers) or ``local`` (our launcher)."""


def _docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


def local_launcher_available() -> bool:
    """True when Java and Maven (or cached jars) let us start our own broker."""
    return shutil.which("java") is not None and shutil.which("mvn") is not None


@contextmanager
def session_broker() -> Iterator[Broker]:
    """``KAFKA_BOOTSTRAP_SERVERS`` if set; else Docker via testcontainers; else the local launcher."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield Broker(env, "env")
        return
    if os.environ.get("KEYYO_TEST_DOCKER", "1") != "0" and _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield Broker(container.get_bootstrap_server(), "docker")
        return
    with temporary_broker() as broker:
        yield Broker(broker.bootstrap, "local")


async def read_topic(bootstrap: str, topic: str, within_s: float = 30.0) -> list[ConsumerRecord]:
    """Every committed record of ``topic`` up to its current end, in partition then offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + within_s
        while True:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: at {positions}, end {ends}")
            batch = await consumer.getmany(timeout_ms=200)
            for part in batch.values():
                records.extend(part)
        records.sort(key=lambda r: (r.partition, r.offset))
        return records
    finally:
        await consumer.stop()


async def settled(bootstrap: str, topic: str, within_s: float = 30.0) -> None:
    """Wait until no transaction is open on ``topic`` (each partition's last stable offset is its
    end). A transaction's commit returns before the broker has written its markers, so a
    read_committed reader right after a writer finished may otherwise stop short of its last one."""
    committed = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    everything = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_uncommitted")
    await committed.start()
    await everything.start()
    try:
        tps = await topic_partitions(committed, topic)
        deadline = time.monotonic() + within_s
        while (stable := await committed.end_offsets(tps)) != (ends := await everything.end_offsets(tps)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: a transaction still open (stable {stable}, end {ends})")
            await asyncio.sleep(0.1)
    finally:
        await committed.stop()
        await everything.stop()


async def read_values(bootstrap: str, topic: str) -> list[dict[str, object]]:
    """The JSON values of :func:`read_topic`."""
    return [orjson.loads(r.value) for r in await read_topic(bootstrap, topic)]


async def wait_for(predicate: Any, within_s: float = 30.0, interval: float = 0.05, what: str = "") -> None:
    """Poll ``predicate()`` (sync or async) until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or predicate}")
        await asyncio.sleep(interval)
