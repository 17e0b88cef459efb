"""Restore never costs the group membership: a changelog compacts, a big changelog is restored
while heartbeats, health checks and signals are served, and a restart replays only the tail after
the partition checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from deploy.topics import set_configs
from devtools.simulate import KafkaSender, wall_ms
from devtools.simulator import Chaos, play
from processors.registry import CALL_RECORDS_SPEC as SPEC
from schemas.topics import CHANGELOG_CONFIGS, NOTIFICATIONS
from tests.integration.pipeline import (
    FAST_ARGS,
    group_of,
    provision,
    records,
    send_to_kafka,
    stop_process,
    traffic,
)
from tests.kafka import Broker, read_topic, wait_for
from tests.truth import expected_records, final_records

pytestmark = pytest.mark.asyncio(loop_scope="session")


def changelog_of(prefix: str) -> str:
    return f"{group_of(prefix)}.{SPEC.store}.changelog"


def log_lines(path: Path, message: str) -> list[dict]:  # type: ignore[type-arg]
    return [orjson.loads(line) for line in path.read_text().splitlines() if f'"msg":"{message}"' in line]


def processor(bootstrap: str, prefix: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "deploy.cli", "--log-level", "info", "process", SPEC.name,
           "--bootstrap", bootstrap, "--prefix", prefix, "--health-port", "0", *FAST_ARGS, *extra]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def fill_changelog(bootstrap: str, topic: str, per_partition: int, keys: int) -> None:
    """``per_partition`` superseded writes of ``keys`` keys to each of 3 partitions."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, max_batch_size=1024 * 1024,
                                acks=1)
    await producer.start()
    value = b'{"filler":"' + b"x" * 150 + b'"}'
    try:
        for partition in range(3):
            batch = producer.create_batch()
            futures = []
            for i in range(per_partition):
                key = f"z/filler/{i % keys}".encode()
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_a_changelog_shrinks_to_its_live_entries(broker: Broker, prefix: str) -> None:
    await provision(broker.bootstrap, prefix)
    topic = changelog_of(prefix)
    # Provisioning again gives an existing changelog the settings; here rolled every second.
    await set_configs(broker.bootstrap, topic, {"cleanup.policy": "compact", **CHANGELOG_CONFIGS,
                                                "segment.ms": "1000", "max.compaction.lag.ms": "1000"})
    for _ in range(4):
        await fill_changelog(broker.bootstrap, topic, per_partition=5000, keys=50)
        await asyncio.sleep(1.2)  # each round in a segment of its own
    written = 4 * 3 * 5000  # superseded writes of 150 live keys

    async def compacted() -> bool:
        # The active segment (the last round) is never compacted; the three before it are.
        return len(await read_topic(broker.bootstrap, topic)) <= 150 + written // 4

    await wait_for(compacted, 90, interval=3, what="the log cleaner to compact the changelog")
    remaining = await read_topic(broker.bootstrap, topic)
    assert len({(r.partition, r.key) for r in remaining}) == 150  # every live key is still there


async def test_a_million_entry_changelog_is_restored_without_losing_the_group(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    await provision(broker.bootstrap, prefix)
    await fill_changelog(broker.bootstrap, changelog_of(prefix), per_partition=340_000, keys=2000)
    log = tmp_path / "processor.log"
    started = time.monotonic()
    proc = processor(broker.bootstrap, prefix, log, "--no-checkpoints")
    try:
        await wait_for(lambda: log_lines(log, "processor running"), 30, interval=0.1, what="side port")
        url = log_lines(log, "processor running")[0]["health"]
        slowest = 0.0
        restoring_seen = False
        async with aiohttp.ClientSession() as session:
            while True:
                asked = time.monotonic()
                async with session.get(url.replace("/readyz", "/healthz")) as resp:
                    assert resp.status == 200
                slowest = max(slowest, time.monotonic() - asked)
                async with session.get(url) as resp:
                    body = await resp.json()
                    restoring_seen = restoring_seen or "restoring" in body
                    if resp.status == 200:
                        break
                assert time.monotonic() - started < 60, body
                await asyncio.sleep(0.2)
        ready_s = time.monotonic() - started
        # Processing: a notification now gets its call update.
        calls, sends = traffic(seed=5, rate=5, duration=1, start_ms=wall_ms() + 200, chaos=Chaos())
        await send_to_kafka(broker.bootstrap, prefix, sends)
        expected = expected_records(calls)

        async def all_recorded() -> bool:
            return final_records(await records(broker.bootstrap, prefix)).keys() >= expected.keys()

        await wait_for(all_recorded, 60, interval=0.5, what="records after the restore")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        stop_process(proc)
    restored = log_lines(log, "partition restored")
    assert len(restored) == 3, "a partition was restored twice: the process lost the group"
    assert sum(r["changelog_records"] for r in restored) == 1_020_000
    assert log_lines(log, "restoring partition"), "no progress was logged"
    assert restoring_seen, "/readyz never said what was being restored"
    assert ready_s < 30, f"ready after {ready_s:.1f} s"
    assert slowest < 1.0, f"a health check waited {slowest:.2f} s"
    assert "Heartbeat session expired" not in log.read_text()


async def test_a_restart_replays_only_the_changelog_after_its_checkpoints(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    await provision(broker.bootstrap, prefix)
    state = tmp_path / "checkpoints"
    calls, sends = traffic(seed=41, rate=10, duration=8, start_ms=wall_ms() + 3000,
                           chaos=Chaos(duplicate=0.1))
    expected = expected_records(calls)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = processor(broker.bootstrap, prefix, logs[0], "--state-dir", str(state))
    second = None
    sender = KafkaSender(broker.bootstrap, NOTIFICATIONS.full_name(prefix))
    await sender.producer.start()
    try:
        player = asyncio.create_task(play(sends, sender, wall_ms))
        await wait_for(lambda: len(log_lines(logs[0], "partition restored")) >= 3, 60, interval=0.2,
                       what="the first process at work")

        async def a_quarter_recorded() -> bool:
            return len(await records(broker.bootstrap, prefix)) >= len(expected) // 4

        await wait_for(a_quarter_recorded, 30, interval=0.2, what="a quarter of the records")
        assert not player.done(), "the traffic ended before the restart"
        first.send_signal(signal.SIGTERM)  # graceful: commit, checkpoint, leave
        assert await asyncio.to_thread(first.wait, 30) == 0
        written = log_lines(logs[0], "partition checkpoint written")
        assert len(written) >= 3 and sum(w["entries"] for w in written) > 0
        second = processor(broker.bootstrap, prefix, logs[1], "--state-dir", str(state))
        await player

        async def all_recorded() -> bool:
            return final_records(await records(broker.bootstrap, prefix)).keys() >= expected.keys()

        await wait_for(all_recorded, 90, interval=0.5, what="every expected record")
        assert stop_process(second) == 0
    finally:
        await sender.producer.stop()
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)
    got = final_records(await records(broker.bootstrap, prefix))
    assert got == expected  # calls spanning the restart were completed from the checkpoints
    restored = log_lines(logs[1], "partition restored")[:3]
    assert {r["source"] for r in restored} == {"checkpoint"}
    changelog = len(await read_topic(broker.bootstrap, changelog_of(prefix)))
    assert sum(r["changelog_records"] for r in restored) < changelog // 4, (restored, changelog)
