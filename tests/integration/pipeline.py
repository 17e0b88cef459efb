"""Helpers for the call-records integration tests: processors, traffic, ground truth."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from deploy.topics import create_topics, provision_processor
from devtools.simulate import KafkaSender, wall_ms
from devtools.simulator import Chaos, PlannedCall, Planner, Send, plan_traffic, play, schedule
from ingest.parsing import parse_notification
from processors.contract import Logic
from processors.observability import ProcessorMetrics
from processors.registry import CALL_RECORDS_SPEC as SPEC
from processors.registry import ProcessorSpec
from processors.runtime import Runtime
from schemas.notification import Notification
from schemas.topics import CALL_RECORDS, CALL_UPDATES, NOTIFICATIONS
from tests.integration.edge import TENANTS
from tests.kafka import read_values

# Short clocks so a test's calls close within seconds of their last event.
FAST = {"linger": 1, "ring_timeout": 4, "max_duration": 6, "retention": 60}
FAST_ARGS = [*(arg for name, value in FAST.items() for arg in (f"--{name.replace('_', '-')}", str(value))),
             "--lateness-ms", "300"]


def group_of(prefix: str) -> str:
    return SPEC.group(prefix)


async def provision(bootstrap: str, prefix: str, out_prefix: str | None = None,
                    group: str | None = None, spec: ProcessorSpec = SPEC) -> None:
    out = prefix if out_prefix is None else out_prefix
    await create_topics(bootstrap, prefix, partitions=3)
    await provision_processor(bootstrap, spec, prefix, out, group or spec.group(out), partitions=3)


@asynccontextmanager
async def running_processor(bootstrap: str, prefix: str, logic: Logic[Any] | None = None,
                            **overrides: Any) -> AsyncIterator[Runtime]:
    """A call-records runtime in this process (live mode, fast clocks)."""
    settings = SPEC.settings(bootstrap, prefix, **{"allowed_lateness_ms": 300, **overrides})
    runtime = Runtime(settings, logic or SPEC.logic(**FAST), ProcessorMetrics(settings.group))
    task = asyncio.create_task(runtime.run())
    try:
        yield runtime
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 60)


async def run_to_end(bootstrap: str, prefix: str, prepare: Callable[[Runtime], None] | None = None,
                     **overrides: Any) -> None:
    """A call-records runtime in burst mode, until it drains its input and exits (``prepare``
    gets the runtime before it starts)."""
    settings = SPEC.settings(bootstrap, prefix, **overrides)
    runtime = Runtime(settings, SPEC.logic(**FAST), ProcessorMetrics(settings.group))
    if prepare is not None:
        prepare(runtime)
    await asyncio.wait_for(runtime.run(), 120)
    assert not runtime.failed, "the burst run failed (see its log)"


def cli_process(log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``keyyo-stream ARGS`` as a child process, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "deploy.cli", "--log-level", "info", *args],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def processor_process(bootstrap: str, prefix: str, log: Path, *extra: str,
                      any_port: bool = True, name: str = SPEC.name) -> subprocess.Popen[bytes]:
    """``keyyo-stream process NAME`` (call-records with fast clocks by default) as a child process
    (side port: any free one, or the default with ``any_port=False``)."""
    return cli_process(
        log, "process", name, "--bootstrap", bootstrap, "--prefix", prefix,
        *(["--health-port", "0"] if any_port else []),
        "--state-dir", str(log.parent / "checkpoints"),  # the test's own "host"
        *(FAST_ARGS if name == SPEC.name else []), *extra)


def stop_process(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (graceful: finish the batch, commit, leave the group); SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def traffic(seed: int, rate: float, duration: float, start_ms: int, chaos: Chaos,
            tenants: tuple[str, ...] = TENANTS,
            ) -> tuple[list[PlannedCall], list[Send]]:
    rng = random.Random(seed)
    planner = Planner(list(tenants), 5, rng, time_scale=0.05)
    calls = plan_traffic(planner, rate, duration, start_ms, chaos)
    return calls, schedule(calls, chaos, rng)


async def send_to_kafka(bootstrap: str, prefix: str, sends: list[Send]) -> dict[str, int]:
    """Play ``sends`` straight into the notification topic (no edge), at their due times."""
    sender = KafkaSender(bootstrap, NOTIFICATIONS.full_name(prefix))
    await sender.producer.start()
    try:
        return await play(sends, sender, wall_ms)
    finally:
        await sender.producer.stop()


def event_ids(sends: list[Send]) -> set[str]:
    """The event ids of the notifications in ``sends`` (a duplicate delivery has its original's)."""
    ids = set()
    for s in sends:
        n = parse_notification(s.tenant, list(s.params.items()), "x", int(s.params["tsms"]))
        assert isinstance(n, Notification)
        ids.add(n.event_id)
    return ids


async def records(bootstrap: str, prefix: str) -> list[dict[str, Any]]:
    return await read_values(bootstrap, CALL_RECORDS.full_name(prefix))


async def updates(bootstrap: str, prefix: str) -> list[dict[str, Any]]:
    return await read_values(bootstrap, CALL_UPDATES.full_name(prefix))
