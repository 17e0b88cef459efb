"""Scaling benchmark: call-records throughput with 1, 2 and 3 processes of one consumer group.

The notification topic is filled once with simulated traffic (the same input for every run).
For each process count, that many ``keyyo-stream process call-records`` processes (replay mode,
exactly-once, a fresh group and output prefix each, no checkpoints) drain it; throughput is the
input records over the time from the group's first committed offset to its last, read from the
group's committed offsets every 100 ms (so joining, first restores and exiting are left out).
A raw consumer reads the same topic in the same run as the baseline.

    python -m devtools.bench_scaling [--notifications 150000] [--processes 1,2,3]

Writes JSON to ``bench-results/scaling-<time>.json``. On a 2-core machine that also runs the
broker, more processes share the same two cores: read the figures with that in mind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from deploy.topics import provision_processor
from devtools.bench_call_records import fill, raw_consume, simulated
from devtools.bench_results import bench_broker, keep_topics_option, write_results
from processors.registry import CALL_RECORDS_SPEC as SPEC
from schemas.topics import NOTIFICATIONS


async def committed(admin: AIOKafkaAdminClient, group: str) -> int:
    offsets = await admin.list_consumer_group_offsets(group)
    return sum(max(0, o.offset) for o in offsets.values())


async def run(bootstrap: str, prefix: str, processes: int, total: int) -> dict[str, Any]:
    """Drain the topic with ``processes`` processes of a new group; records/s."""
    out = f"{prefix}n{processes}."
    group = f"{out}keyyo.call-records"
    await provision_processor(bootstrap, SPEC, prefix, out, group)
    cmd = [sys.executable, "-m", "deploy.cli", "--log-level", "warning", "process", SPEC.name,
           "--bootstrap", bootstrap, "--prefix", prefix, "--output-prefix", out, "--group", group,
           "--mode", "replay", "--until-idle", "3", "--no-checkpoints", "--health-port", "0"]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # noqa: ASYNC220
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) for _ in range(processes)]
    first: tuple[float, int] | None = None
    done_at = None
    last_note = time.monotonic()
    try:
        while done_at is None:
            await asyncio.sleep(0.1)
            now, seen = time.perf_counter(), await committed(admin, group)
            if first is None and seen > 0:
                first = (now, seen)
            if seen >= total:
                done_at = now
            if time.monotonic() - last_note > 2:
                last_note = time.monotonic()
                print(f"  {processes} process(es): {seen}/{total} committed", flush=True)
            if all(p.poll() is not None for p in procs) and done_at is None:
                raise RuntimeError(f"the processes exited with {seen}/{total} committed")
    finally:
        for p in procs:
            await asyncio.to_thread(p.wait, 120)
        await admin.close()
    assert first is not None
    seconds = done_at - first[0]
    return {"processes": processes, "records_per_s": round((total - first[1]) / seconds, 1),
            "seconds": round(seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=150_000)
    parser.add_argument("--processes", default="1,2,3")
    parser.add_argument("--out", default="bench-results")
    keep_topics_option(parser)
    args = parser.parse_args()
    counts = [int(c) for c in args.processes.split(",")]
    results: dict[str, Any] = {"time": datetime.now(tz=UTC).isoformat(timespec="seconds"),
                               "machine": {"cpus": os.cpu_count()}, "runs": []}
    with bench_broker(args.keep_topics) as bootstrap:
        prefix = f"scale{uuid.uuid4().hex[:6]}."
        notes = simulated(args.notifications, 1, int(time.time() * 1000) - 3600_000)
        topic = NOTIFICATIONS.full_name(prefix)

        async def measure() -> None:
            await provision_processor(bootstrap, SPEC, prefix, prefix, f"{prefix}warm")
            print(f"filling {topic} with {len(notes)} notifications ...", flush=True)
            await fill(bootstrap, topic, [(n.tenant.encode(), n.to_json()) for n in notes])
            results["raw_consumer_per_s"] = round(await raw_consume(bootstrap, topic, len(notes)), 1)
            for n in counts:
                print(f"{n} process(es) of one group ...", flush=True)
                results["runs"].append(await run(bootstrap, prefix, n, len(notes)))

        asyncio.run(measure())
    results["notifications"] = len(notes)
    base = results["runs"][0]["records_per_s"]
    print(f"\nraw consumer: {results['raw_consumer_per_s']:.0f} records/s")
    for r in results["runs"]:
        print(f"{r['processes']} process(es): {r['records_per_s']:.0f} notifications/s "
              f"({r['records_per_s'] / base:.2f}x one process; {r['seconds']} s)")
    write_results(args.out, "scaling", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
