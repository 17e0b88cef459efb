"""``keyyo-stream ingest --workers 2``: two edge processes on one port, each with its own spool and
its own metrics port; every 200 lands on the topic once; SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from deploy.kafka_local import free_port
from deploy.topics import create_topics
from devtools.traffic import answered_incoming
from ingest.config import hash_secret
from schemas.topics import NOTIFICATIONS
from tests.integration.edge import SECRET
from tests.kafka import Broker, read_values, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_two_workers_share_the_port_and_stop_together(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    await create_topics(broker.bootstrap, prefix, partitions=3)
    config = tmp_path / "ingest.toml"
    config.write_text(f'[tenants.acme]\ntoken_sha256 = "{hash_secret(SECRET)}"\n\n'
                      '[ingest]\nspool_dir = "spool"\n')
    port, own = free_port(), free_port()
    while own + 1 == port or own == port:
        own = free_port()
    log = tmp_path / "ingest.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
            [sys.executable, "-m", "deploy.cli", "ingest", "--config", str(config), "--port", str(port),
             "--workers", "2", "--metrics-port", str(own)], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KEYYO_TOPIC_PREFIX": prefix,
                 "PYTHONUNBUFFERED": "1"})
    try:
        async with aiohttp.ClientSession() as session:
            async def both_ready() -> bool:
                for p in (own, own + 1):
                    try:
                        async with session.get(f"http://127.0.0.1:{p}/readyz") as resp:
                            if resp.status != 200:
                                return False
                    except aiohttp.ClientError:
                        return False
                return True

            await wait_for(both_ready, 60, interval=0.3, what="both workers ready")
        now = time.time_ns() // 1_000_000
        calls = [answered_incoming("33123456789", f"336{i:08d}", now - 60_000 + i * 1000)
                 for i in range(40)]
        params = [p for call in calls for p in call][:120]
        statuses = []
        # A new connection per request: the kernel picks a worker for each.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for p in params:
                async with session.get(f"http://127.0.0.1:{port}/v1/keyyo/acme/notifications",
                                       params={"key": SECRET, **p}) as resp:
                    statuses.append(resp.status)
            accepted = []
            for p in (own, own + 1):
                async with session.get(f"http://127.0.0.1:{p}/metrics") as resp:
                    text = await resp.text()
                found = re.search(r'keyyo_ingest_requests_total\{outcome="accepted"\} ([0-9.]+)', text)
                accepted.append(float(found.group(1)) if found else 0.0)
        assert statuses == [200] * len(params)
        values = await read_values(broker.bootstrap, NOTIFICATIONS.full_name(prefix))
        assert len(values) == len(params) and len({v["event_id"] for v in values}) == len(params)
        assert sum(accepted) == len(params) and min(accepted) > 0, accepted  # both took requests
        assert {d.name for d in (tmp_path / "spool").iterdir()} == {"worker-0", "worker-1"}
        pids = [int(m) for m in re.findall(r"pid (\d+)", log.read_text())]
        assert len(pids) == 2
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 30) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
