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
PREVIOUS = 'keyyo_ingest_previous_key_requests_total{credential="key"}'


def two_workers(config: Path, broker: Broker, prefix: str) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """``ingest --workers 2`` started (at info level): the supervisor, the shared port, the first
    worker's own port (the second's is the next one), and the log file next to ``config``."""
    port, own = free_port(), free_port()
    while own + 1 == port or own == port:
        own = free_port()
    log = config.parent / "ingest.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "--log-level", "info", "ingest", "--config", str(config),
             "--port", str(port), "--workers", "2", "--metrics-port", str(own)],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "KEYYO_TOPIC_PREFIX": prefix,
                 "PYTHONUNBUFFERED": "1"})
    return supervisor, port, own, log


async def test_two_workers_share_the_port_and_stop_together(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    await create_topics(broker.bootstrap, prefix, partitions=3)
    config = tmp_path / "ingest.toml"
    config.write_text(f'[tenants.acme]\ntoken_sha256 = "{hash_secret(SECRET)}"\n\n'
                      '[ingest]\nspool_dir = "spool"\n')
    supervisor, port, own, log = two_workers(config, broker, prefix)
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


async def test_sighup_reloads_the_tenants_of_every_worker_without_a_refused_request(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    """A key rotated and a tenant added without a restart: SIGHUP to the supervisor makes both
    workers read the tenants again while requests keep flowing (none refused); the previous key is
    accepted while listed, counted and logged, then refused once dropped; a file with a mistake
    changes nothing. No secret is logged."""
    await create_topics(broker.bootstrap, prefix, partitions=3)
    config = tmp_path / "ingest.toml"
    config.write_text(f'[tenants.acme]\ntoken_sha256 = "{hash_secret("old-key-1")}"\n')
    supervisor, port, own, log = two_workers(config, broker, prefix)
    now = time.time_ns() // 1_000_000
    params = iter([p for i in range(200) for p in answered_incoming("33123456789", f"336{i:08d}",
                                                                     now - 600_000 + i * 1000)])
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            async def metric(name: str) -> list[float]:
                found = []
                for p in (own, own + 1):
                    try:
                        async with session.get(f"http://127.0.0.1:{p}/metrics") as resp:
                            text = await resp.text()
                    except aiohttp.ClientError:
                        return []
                    m = re.search(rf"^{re.escape(name)} ([0-9.]+)$", text, re.M)
                    found.append(float(m.group(1)) if m else 0.0)
                return found

            async def send(tenant: str, key: str, n: int = 6) -> list[int]:
                statuses = []
                for _ in range(n):  # a new connection each: both workers get some
                    async with session.get(f"http://127.0.0.1:{port}/v1/keyyo/{tenant}/notifications",
                                           params={"key": key, **next(params)}) as resp:
                        statuses.append(resp.status)
                return statuses

            async def reloaded(result: str, times: int) -> bool:
                return await metric(f'keyyo_ingest_config_reloads_total{{result="{result}"}}') == [times] * 2

            await wait_for(lambda: metric(PREVIOUS), 60, interval=0.3, what="both workers up")
            assert await send("acme", "old-key-1") == [200] * 6

            # Rotation begins and a tenant is added, while acme keeps sending with its old key.
            flowing: list[int] = []
            stop = asyncio.Event()

            async def keep_sending() -> None:
                while not stop.is_set():
                    flowing.extend(await send("acme", "old-key-1", 1))

            sender = asyncio.create_task(keep_sending())
            await wait_for(lambda: len(flowing) >= 3, 30, interval=0.02, what="requests flowing")
            config.write_text(f'[tenants.acme]\ntoken_sha256 = ["{hash_secret("new-key-2")}", '
                              f'"{hash_secret("old-key-1")}"]\n'
                              f'[tenants.globex]\ntoken_sha256 = "{hash_secret("globex-key-3")}"\n')
            supervisor.send_signal(signal.SIGHUP)
            await wait_for(lambda: reloaded("applied", 1), 30, interval=0.2, what="both workers reloaded")
            after_reload = len(flowing)
            await wait_for(lambda: len(flowing) >= after_reload + 3, 30, interval=0.02,
                           what="requests flowing after the reload")
            stop.set()
            await sender
            assert flowing and set(flowing) == {200}, flowing  # nothing refused across the reload
            assert await send("acme", "new-key-2") == [200] * 6
            assert await send("globex", "globex-key-3") == [200] * 6
            counted = sum(await metric(PREVIOUS))
            assert await send("acme", "old-key-1") == [200] * 6  # still accepted, as a previous key
            assert sum(await metric(PREVIOUS)) == counted + 6

            # Rotation done: the old key is refused; the new one and globex go on.
            config.write_text(f'[tenants.acme]\ntoken_sha256 = "{hash_secret("new-key-2")}"\n'
                              f'[tenants.globex]\ntoken_sha256 = "{hash_secret("globex-key-3")}"\n')
            supervisor.send_signal(signal.SIGHUP)
            await wait_for(lambda: reloaded("applied", 2), 30, interval=0.2, what="the second reload")
            assert await send("acme", "old-key-1") == [401] * 6
            assert await send("acme", "new-key-2") == [200] * 6

            # A mistake in the file: nothing changes, each worker says why in one line.
            config.write_text('[tenants.acme]\ntoken_sha256 = "not-a-digest"\n')
            supervisor.send_signal(signal.SIGHUP)
            await wait_for(lambda: reloaded("failed", 1), 30, interval=0.2, what="the failed reload")
            assert await send("globex", "globex-key-3") == [200] * 6
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 30) == 0
        text = log.read_text()
        assert "tenant acme still sends a previous key" in text
        assert text.count("configuration not reloaded, the running one is kept") == 2
        assert '"added":["globex"]' in text
        for secret in ("old-key-1", "new-key-2", "globex-key-3"):
            assert secret not in text
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
