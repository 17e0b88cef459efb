"""``keyyo-stream status`` against the real broker: missing topics, a group that never ran, a
drained group, a running one, and a changelog that would lose its state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from deploy.status import Status, collect
from deploy.topics import set_configs
from devtools.simulator import Chaos
from tests.integration.pipeline import provision, run_to_end, running_processor, send_to_kafka, traffic
from tests.kafka import Broker, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


def cli_status(bootstrap: str, prefix: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--bootstrap", bootstrap,
                           "--prefix", prefix, *extra], capture_output=True, text=True, timeout=60,
                          env={**os.environ}, check=False)


def group(status: Status, name: str) -> dict[str, object]:
    return next(vars(g) for g in status.groups if g.name == name)


async def test_status_follows_the_pipeline(broker: Broker, prefix: str) -> None:
    bootstrap = broker.bootstrap
    records_group, changelog = f"{prefix}keyyo.call-records", f"{prefix}keyyo.call-records.state.changelog"

    # Nothing created yet: every declared topic is a problem, exit 1, each with what to do.
    before = await asyncio.to_thread(cli_status, bootstrap, prefix)
    assert before.returncode == 1, before.stderr
    missing = f"topic {prefix}keyyo.notifications.v1 is missing: run `keyyo-stream topics create`"
    assert missing in before.stdout
    assert "8 problem(s)" in before.stdout

    # Topics created and notifications written, no processor run yet: the group would start at the
    # beginning, so everything in the topic is its lag; its changelog does not exist yet (no problem).
    await provision(bootstrap, prefix)
    _, sends = traffic(seed=5, rate=8, duration=2, start_ms=time.time_ns() // 1_000_000, chaos=Chaos())
    await send_to_kafka(bootstrap, prefix, sends)
    fresh = await collect(bootstrap, prefix)
    assert fresh.problems == []
    g = group(fresh, records_group)
    assert (g["lag"], g["committed"], g["members"]) == (len(sends), False, 0)
    assert next(t for t in fresh.topics if t.name == changelog).partitions == 3  # provision made it

    # Drained by a burst run: nothing behind, offsets committed, the changelog compacted.
    await run_to_end(bootstrap, prefix, mode="replay", until_idle_s=1.0)
    drained = await collect(bootstrap, prefix)
    g = group(drained, records_group)
    assert (g["lag"], g["committed"], g["members"]) == (0, True, 0)
    assert g["state"] == "Empty"
    log = next(t for t in drained.topics if t.name == changelog)
    assert (log.partitions, log.cleanup_policy) == (3, "compact")

    # A running process is a member of a stable group; new input shows as its lag or is consumed.
    async with running_processor(bootstrap, prefix) as runtime:
        await wait_for(lambda: runtime.joined and not runtime.restoring, 30, what="processor ready")

        async def member_seen() -> bool:
            g = group(await collect(bootstrap, prefix), records_group)
            return g["state"] == "Stable" and g["members"] == 1

        await wait_for(member_seen, 30, interval=0.5, what="the running process as a member")

    # A changelog that is not compacted would lose state: a problem, named with what to do, exit 1;
    # --format json says the same.
    await set_configs(bootstrap, changelog, {"cleanup.policy": "delete"})
    broken = await asyncio.to_thread(cli_status, bootstrap, prefix, "--format", "json")
    assert broken.returncode == 1
    data = json.loads(broken.stdout)
    assert [p for p in data["problems"] if changelog in p] == [
        f"changelog {changelog} is not compacted (cleanup.policy=delete): its state would expire; "
        "`process call-records` sets it at start, or set cleanup.policy=compact"]
    assert next(x for x in data["groups"] if x["name"] == records_group)["lag"] == 0


async def test_status_says_in_one_line_when_kafka_does_not_answer() -> None:
    result = await asyncio.to_thread(cli_status, "127.0.0.1:1", "")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: Kafka at 127.0.0.1:1 did not answer")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


async def test_status_refuses_an_unknown_stage_in_one_line() -> None:
    result = await asyncio.to_thread(cli_status, "127.0.0.1:1", "", "--group", "billing=x")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --group 'billing=x': expected NAME=GROUP, NAME one of "
                                     "call-records, acd-stats, action-rules, execute-actions")
