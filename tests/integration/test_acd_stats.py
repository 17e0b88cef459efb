"""ACD statistics end to end on a real broker: simulator -> ingest -> call-records -> acd-stats.

The figures must equal those computed naively from the simulator's ground truth, even though
the acd-stats process is killed with SIGKILL while records flow and a new one takes over from the
committed offsets and the changelog. A replay with a new group gives the same figures, and both
processors run side by side on one host with default options.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import pytest

from devtools.simulate import HttpSender, wall_ms
from devtools.simulator import Chaos, play
from processors.registry import ACD_STATS_SPEC
from schemas.topics import ACD_STATS
from tests.integration.edge import SECRET, TENANTS, running_edge
from tests.integration.pipeline import (
    processor_process,
    provision,
    records,
    running_processor,
    stop_process,
    traffic,
)
from tests.kafka import Broker, read_topic, settled, wait_for
from tests.truth import comparable_figures, expected_acd_figures, expected_records

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def latest_figures(bootstrap: str, topic: str) -> dict[str, dict[str, Any]]:
    """Latest revision per key; fails on a (key, revision) written twice or out of order (a
    transaction writes only its last change of a key, so revisions may skip numbers)."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in await read_topic(bootstrap, topic):
        by_key.setdefault(r.key.decode(), []).append(orjson.loads(r.value))
    for key, values in by_key.items():
        revisions = [v["revision"] for v in values]
        assert revisions == sorted(set(revisions)), (key, revisions)
    return {key: values[-1] for key, values in by_key.items()}


async def test_figures_equal_the_ground_truth_through_a_kill_and_a_replay(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    await provision(broker.bootstrap, prefix)
    await provision(broker.bootstrap, prefix, spec=ACD_STATS_SPEC)
    chaos = Chaos(duplicate=0.1, reorder=0.1)
    calls, sends = traffic(seed=31, rate=14, duration=10, start_ms=wall_ms() + 1000, chaos=chaos)
    truth = [{**r, "revision": 1, "record_id": "x"} for r in expected_records(calls).values()]
    expected = expected_acd_figures(truth)
    assert sum(f["offered"] for f in expected.values()) >= 30
    assert all(sum(f[o] for f in expected.values()) for o in ("answered", "abandoned", "voicemail"))
    topic = ACD_STATS.full_name(prefix)
    logs = [tmp_path / "acd-first.log", tmp_path / "acd-second.log"]
    first = processor_process(broker.bootstrap, prefix, logs[0], name="acd-stats")
    second = None
    try:
        async with running_edge(broker.bootstrap, prefix, create=False) as edge, \
                running_processor(broker.bootstrap, prefix):
            sender = HttpSender(str(edge.client.make_url("")), dict.fromkeys(TENANTS, SECRET))
            async with aiohttp.ClientSession() as session:
                sender.session = session
                player = asyncio.create_task(play(sends, sender, wall_ms))

                async def a_third_counted() -> bool:
                    written = await read_topic(broker.bootstrap, topic)
                    return len(written) >= sum(f["offered"] for f in expected.values()) // 3

                await wait_for(a_third_counted, 60, interval=0.3, what="acd-stats at work")
                assert not player.done(), "the traffic ended before the kill"
                first.send_signal(signal.SIGKILL)
                first.wait()
                second = processor_process(broker.bootstrap, prefix, logs[1], name="acd-stats")
                assert await player == {"200": len(sends)}

            async def all_counted() -> bool:
                got = await latest_figures(broker.bootstrap, topic)
                return {k: comparable_figures(v) for k, v in got.items()} == expected

            await wait_for(all_counted, 90, interval=0.5, what="the expected figures")
        assert stop_process(second) == 0
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)
    restores = [orjson.loads(line) for line in logs[1].read_text().splitlines()
                if '"partition restored"' in line]
    assert any(r["changelog_records"] > 0 for r in restores), restores
    await settled(broker.bootstrap, topic)  # the stopped process's last transaction included
    live = await latest_figures(broker.bootstrap, topic)

    # Replay: a new group over the same call records, into other topics, gives the same figures.
    out = prefix + "replay."
    group = out + "keyyo.acd-stats"
    await provision(broker.bootstrap, prefix, out_prefix=out, group=group, spec=ACD_STATS_SPEC)
    replay = processor_process(broker.bootstrap, prefix, tmp_path / "replay.log", "--output-prefix", out,
                               "--until-idle", "2", name="acd-stats")
    assert await asyncio.to_thread(replay.wait, 120) == 0
    await settled(broker.bootstrap, ACD_STATS.full_name(out))
    replayed = await latest_figures(broker.bootstrap, ACD_STATS.full_name(out))
    assert {k: comparable_figures(v) for k, v in replayed.items()} == expected
    # The same record order per partition gives the same revisions too.
    assert {k: v["revision"] for k, v in replayed.items()} == {k: v["revision"] for k, v in live.items()}
    # `keyyo-stream report acd` reads them back: its total is the tenant's, from counts and sums.
    tenant = next(iter(expected)).split("|")[0]
    today = datetime.now(ZoneInfo("Europe/Paris")).date()
    cmd = [sys.executable, "-m", "deploy.cli", "report", "acd", "--tenant", tenant, "--bootstrap",
           broker.bootstrap, "--prefix", prefix, "--from", str(today - timedelta(days=1)), "--to",
           str(today + timedelta(days=1)), "--format", "json", "--plot", str(tmp_path / "acd.png")]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    total = orjson.loads(done.stdout)["total"]
    mine = [f for k, f in expected.items() if k.startswith(f"{tenant}|")]
    assert (total["offered"], total["answered"], total["abandoned"]) == tuple(
        sum(f[n] for f in mine) for n in ("offered", "answered", "abandoned"))
    assert (tmp_path / "acd.png").read_bytes()[:4] == b"\x89PNG"
    # Every call record of an ACD call was counted once: nothing set aside.
    assert len({r["record_id"] for r in await records(broker.bootstrap, prefix) if r["is_acd"]}) == sum(
        f["offered"] for f in expected.values())


async def test_both_processors_run_side_by_side_with_default_options(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    """Two processes of each processor on one host, all with default options: each finds its
    default side port taken by the one before and uses the next free one."""
    await provision(broker.bootstrap, prefix)
    await provision(broker.bootstrap, prefix, spec=ACD_STATS_SPEC)
    names = ("call-records", "call-records", "acd-stats", "acd-stats")
    procs = [processor_process(broker.bootstrap, prefix, tmp_path / f"{i}.log", any_port=False, name=n)
             for i, n in enumerate(names)]
    try:
        def health_urls() -> list[str]:
            lines = [line for i in range(len(names))
                     for line in (tmp_path / f"{i}.log").read_text().splitlines()]
            return [orjson.loads(line)["health"] for line in lines if '"processor running"' in line]

        await wait_for(lambda: len(health_urls()) == len(names), 60, interval=0.3, what="all up")
        urls = health_urls()
        assert len(set(urls)) == len(names)
        async with aiohttp.ClientSession() as session:
            async def all_ready() -> bool:
                for url in urls:
                    async with session.get(url) as resp:
                        if resp.status != 200:
                            return False
                return True

            await wait_for(all_ready, 60, interval=0.5, what="every process ready")
        assert all(proc.poll() is None for proc in procs)
    finally:
        codes = [stop_process(proc) for proc in procs]
    assert codes == [0, 0, 0, 0]
