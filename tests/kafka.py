"""Test-side Kafka helpers: where the broker is, and reading a topic to its end."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from deploy.kafka_local import LocalKafka, free_port


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
    except Exception:  # noqa: BLE001 - no engine, no socket, no permission: all mean "no docker"
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
    with local_broker() as broker:
        yield Broker(broker.bootstrap, "local")


@contextmanager
def local_broker() -> Iterator[LocalKafka]:
    """A broker of our own in a temporary home, killed and removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="keyyo-kafka-"))
    broker = LocalKafka(home=home, port=free_port())
    broker.start(progress=False)
    try:
        yield broker
    finally:
        broker.stop(wait_seconds=20)
        shutil.rmtree(home, ignore_errors=True)


async def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[ConsumerRecord]:
    """Every committed record of ``topic`` up to its current end, in partition then offset order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
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


async def read_values(bootstrap: str, topic: str) -> list[dict[str, object]]:
    """The JSON values of :func:`read_topic`."""
    return [orjson.loads(r.value) for r in await read_topic(bootstrap, topic)]


async def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "") -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate()`` (sync or async) until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)
