"""Kafka as a cluster: three local brokers, one killed with SIGKILL while the edge takes load and
the call-records processor runs. Every 200 lands on the topic, the records are complete and not
duplicated, 503s (if any) come only around the leader elections, and the restarted broker catches
up. Needs the local launcher (Java and Maven): it starts a cluster of its own."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from deploy.kafka_local import LocalCluster, free_port
from devtools.simulate import HttpSender, wall_ms
from devtools.simulator import Chaos, play
from ingest.parsing import parse_notification
from schemas.notification import Notification
from schemas.topics import NOTIFICATIONS
from tests.integration.edge import SECRET, TENANTS, running_edge
from tests.integration.pipeline import provision, records, running_processor, traffic
from tests.kafka import local_launcher_available, read_values, wait_for
from tests.truth import expected_records, final_records

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.broker_control,
    pytest.mark.skipif(not local_launcher_available(), reason="needs Java and Maven"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    home = Path(tempfile.mkdtemp(prefix="keyyo-cluster-"))
    nodes = LocalCluster(home=home, port=free_port(3), brokers=3)
    nodes.start(progress=False)
    try:
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(home, ignore_errors=True)


async def in_sync(bootstrap: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return all(len(p["isr"]) == 3 for p in described["partitions"])
    finally:
        await admin.close()


async def test_one_broker_of_three_killed_under_load(cluster: LocalCluster, prefix: str) -> None:
    bootstrap = cluster.bootstrap
    await provision(bootstrap, prefix)
    topic = NOTIFICATIONS.full_name(prefix)
    calls, sends = traffic(seed=61, rate=8, duration=14, start_ms=wall_ms() + 1500, chaos=Chaos())
    expected = expected_records(calls)
    statuses: list[tuple[float, int]] = []
    killed_at = float("inf")
    victim = cluster.nodes()[1]
    async with running_edge(bootstrap, prefix, create=False, budget_s=3.0) as edge, \
            running_processor(bootstrap, prefix):
        sender = HttpSender(str(edge.client.make_url("")), dict.fromkeys(TENANTS, SECRET), retries=0)

        async def counted(tenant: str, params: dict[str, str]) -> int:
            """Send, retrying 503s as a careful sender would; every attempt's answer noted."""
            for _ in range(40):
                status = await sender(tenant, params)
                statuses.append((time.monotonic(), status))
                if status != 503:
                    return status
                await asyncio.sleep(0.5)
            return status

        async with aiohttp.ClientSession() as session:
            sender.session = session
            player = asyncio.create_task(play(sends, counted, wall_ms))
            await wait_for(lambda: len(statuses) >= len(sends) // 3, 60, interval=0.1,
                           what="a third of the traffic")
            killed_at = time.monotonic()
            victim.kill()
            assert not player.done(), "the traffic ended before the kill"
            assert await player == {"200": len(sends)}

        async def all_recorded() -> bool:
            return final_records(await records(bootstrap, prefix)).keys() >= expected.keys()

        await wait_for(all_recorded, 120, interval=1.0, what="every expected record")
        await asyncio.to_thread(cluster.start, progress=False)  # the killed broker comes back
        await wait_for(lambda: in_sync(bootstrap, topic), 120, interval=1.0,
                       what="the restarted broker back in every ISR")
    values = await read_values(bootstrap, topic)
    on_topic = Counter(v["event_id"] for v in values)
    sent = set()
    for s in sends:
        n = parse_notification(s.tenant, list(s.params.items()), "x", int(s.params["tsms"]))
        assert isinstance(n, Notification)
        sent.add(n.event_id)
    assert sent <= set(on_topic), "a 200 did not reach the topic"
    written = await records(bootstrap, prefix)
    assert final_records(written) == expected
    assert Counter((r["record_id"], r["revision"]) for r in written).most_common(1)[0][1] == 1
    # Every notification got its 200 in the end (503s retried); any 503 came after the kill, while
    # the killed broker's partitions and coordinators moved to the others.
    unavailable = [round(t - killed_at, 1) for t, status in statuses if status == 503]
    assert all(0 <= t <= 45 for t in unavailable), unavailable
    assert {status for _, status in statuses} <= {200, 503}
    print(f"503s after the kill (s): {unavailable}")
