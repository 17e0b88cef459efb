"""Call-records benchmark: memory per open call, logic and step timing, latency, throughput.

1. Memory: calls opened (SETUP only) in a store, Python allocations per open call (tracemalloc).
2. Without Kafka: the logic alone (decode, fold, encode the update; decoding also timed apart)
   and the runtime's per-record step with the timers that close calls (``--profile``: where the
   time goes).
3. Latency: the edge and a live processor run as separate processes; notifications are sent at a
   fixed rate over HTTP; latency = call update seen on ``keyyo.call-updates.v1`` minus the moment
   the edge answered 200 (one clock: this process's), split where the processor appended the
   update; measured after ``--warmup`` seconds of traffic (a new broker's JIT compiles first).
4. Throughput: the notification topic is filled with simulated traffic; one call-records process
   (replay mode, exactly-once transactions, changelog) drains it; a raw aiokafka consumer reads
   the same topic in the same run as the baseline (ratio); a copy of the input is drained by the
   same runtime with a logic that passes each record on (the runtime's own ceiling, to tell the
   logic's cost from the runtime's). ``--state-entries N`` drains it again with N state entries
   restored first.

    python -m devtools.bench_call_records [--notifications 200000] [--rate 1000] [--seconds 15]
        [--warmup 60] [--state-entries N] [--latency-only] [--slice-ms MS]
        [--commit-interval-ms MS] [--profile] [--no-latency]

Writes JSON to ``bench-results/call-records-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from deploy import compiled as compiled_build
from deploy.kafka_local import free_port
from deploy.tail import topic_partitions
from deploy.topics import provision_processor
from devtools.bench_results import LOGIC_ROUNDS, bench_broker, keep_topics_option, logic_rounds, write_results
from devtools.simulator import Chaos, Planner, plan_traffic, schedule
from ingest.config import hash_secret
from ingest.parsing import Refusal, parse_notification
from processors.call_records import CallRecords, CallRecordsConfig
from processors.contract import Logic
from processors.observability import ProcessorMetrics
from processors.output import Output
from processors.registry import CALL_RECORDS_SPEC as SPEC
from processors.registry import ProcessorSpec
from processors.runtime import GC_THRESHOLD, Runtime
from processors.state import Store
from processors.step import Record, Step
from schemas.notification import Notification
from schemas.topics import CALL_UPDATES, NOTIFICATIONS

TENANTS = [f"tenant{i:03d}" for i in range(60)]
SECRET = "bench-secret"  # noqa: S105 - throwaway tenants of the benchmark


def _ms() -> int:
    return time.time_ns() // 1_000_000


def simulated(n: int, seed: int, start_ms: int) -> list[Notification]:
    """About ``n`` notifications of the simulator's mix, in send order."""
    rng = random.Random(seed)
    planner = Planner(TENANTS, 8, rng, time_scale=0.2)
    calls = plan_traffic(planner, rate=300, duration=n / 300 / 3.4, start_ms=start_ms, chaos=Chaos())
    out = []
    for s in schedule(calls, Chaos(), rng):
        note = parse_notification(s.tenant, list(s.params.items()), "127.0.0.1", s.due)
        if not isinstance(note, Refusal):
            out.append(note)
    return out


async def fill(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    """Produce (key, value) records, in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=512 * 1024, enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw_consume(bootstrap: str, topic: str, expected: int) -> float:
    """Records/s of a plain aiokafka consumer (group, read_committed) reading the topic."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"raw-{uuid.uuid4().hex}",
                                isolation_level="read_committed", auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    seen, started = 0, None
    try:
        while seen < expected:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            if batch and started is None:
                started = time.perf_counter()
            seen += sum(len(v) for v in batch.values())
    finally:
        await consumer.stop()
    return expected / (time.perf_counter() - (started or time.perf_counter()))


async def processor_throughput(bootstrap: str, prefix: str, expected: int,
                               spec: ProcessorSpec = SPEC, logic: Logic[Any] | None = None,
                               **overrides: Any) -> dict[str, Any]:
    """Drain the topic with one runtime of ``spec`` (replay mode, EOS; its default logic unless
    given); records/s."""
    group = f"{prefix}bench.{spec.name}"
    await provision_processor(bootstrap, spec, prefix, prefix, group)
    settings = spec.settings(bootstrap, prefix, group=group, mode="replay", until_idle_s=2.0, **overrides)
    metrics = ProcessorMetrics(group)
    runtime = Runtime(settings, logic or spec.logic(), metrics)
    # As `keyyo-stream process` does before serving: what this benchmark made (its input, the
    # simulator, earlier phases) is out of the garbage collector's sight, as a real processor has
    # no such objects to walk. (Its full collections took 0.3 s instead of 0.9 s in one acd-stats
    # drain; the throughput's difference stayed within the run-to-run noise.)
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)  # as `keyyo-stream process` sets them
    try:
        return await _drain(runtime, metrics, spec, expected)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _drain(runtime: Runtime, metrics: ProcessorMetrics, spec: ProcessorSpec,
                 expected: int) -> dict[str, Any]:
    launched = time.perf_counter()
    task = asyncio.create_task(runtime.run())
    started = None
    done_at = None
    ready_s = None
    cpu_started = cpu_s = 0.0
    while not task.done():
        processed = metrics.records_in._value.get()  # private: read the counter without scraping
        if ready_s is None and runtime.joined and all(runtime.readiness().values()):
            ready_s = time.perf_counter() - launched
        if started is None and processed > 0:
            started = (time.perf_counter(), processed)
            cpu_started = time.process_time()
        if processed >= expected and done_at is None:
            done_at = time.perf_counter()
            cpu_s = time.process_time() - cpu_started
        await asyncio.sleep(0.05)
    await task
    assert started is not None and done_at is not None, "the processor did not drain the topic"
    commits = metrics.commit_seconds._sum.get()  # private: as above
    transactions = metrics.transactions()
    seconds = done_at - started[0]
    partitions = spec.input.partitions
    restored = metrics.restored_records._value.get()  # private: as above
    return {"records_per_s": round((expected - started[1]) / seconds, 1),
            "seconds": round(seconds, 2), "commit_seconds_total": round(commits, 2),
            "process_cores": round(cpu_s / seconds, 2),
            "ready_s": round(ready_s or 0.0, 2), "restored_changelog_records": int(restored),
            "transactions": transactions,
            "ms_between_commits_per_partition": round(seconds * 1000 * partitions / max(transactions, 1), 1)}


class RuntimeOnly:
    """A logic that does almost nothing, for the runtime's own ceiling on the same input: each
    notification is written on as its update, and its first 200 bytes kept in one state entry (of
    50,000 keys), so each record costs the runtime one output and one changelog record, as the
    call-records logic's update and call do. What the real drain loses against it is the logic's."""

    def __init__(self, output_topic: str = CALL_UPDATES.name) -> None:
        self.output_topic = output_topic
        self.count = 0

    def decode(self, key: bytes | None, value: bytes | None) -> tuple[bytes, bytes]:
        return key or b"", value or b""

    def event_time_ms(self, event: tuple[bytes, bytes]) -> int:
        return 1

    def time_domain(self, event: tuple[bytes, bytes]) -> str:
        return "all"

    def on_event(self, store: Store, event: tuple[bytes, bytes], now_ms: int) -> list[Output]:
        self.count += 1
        store.put(f"c/{self.count % 50_000}", event[1][:200])
        return [Output(self.output_topic, event[0], event[1])]

    def on_timer(self, store: Store, key: str, now_ms: int) -> list[Output]:
        return []


async def runtime_only(bootstrap: str, spec: ProcessorSpec, items: list[tuple[bytes, bytes]],
                       output_topic: str, **overrides: Any) -> dict[str, Any]:
    """The drain of ``items`` by ``spec``'s runtime with :class:`RuntimeOnly` as its logic, on a
    fresh copy of the input (its own prefix and group)."""
    bare = f"bare{uuid.uuid4().hex[:6]}."
    await provision_processor(bootstrap, spec, bare, bare, f"{bare}bench.{spec.name}")
    await fill(bootstrap, spec.input.full_name(bare), items)
    print("the runtime alone on the same input (a logic that passes each record on) ...", flush=True)
    return await processor_throughput(bootstrap, bare, len(items), spec, logic=RuntimeOnly(output_topic),
                                      **overrides)


def open_calls_state(entries: int, start_ms: int) -> dict[int, dict[str, bytes]]:
    """State entries of answered calls still in progress (SETUP and CONNECT seen; their timers
    are hours away), spread over the benchmark's tenants, as each input partition would hold
    them, about ``entries`` in all (runtime clocks and timers included)."""
    logic = CallRecords(CallRecordsConfig())
    partitions = list(range(NOTIFICATIONS.partitions))
    stores: dict[int, Store] = {}
    total, i = 0, 0
    while total < entries:
        tenant = TENANTS[i % len(TENANTS)]
        partition = int(_PARTITIONER(tenant.encode(), partitions, partitions))
        store = stores.setdefault(partition, Store())
        before = len(store)
        for kind, at in (("SETUP", start_ms + i % 1000), ("CONNECT", start_ms + 2000 + i % 1000)):
            params = {"account": f"33{100 + i % 60:03d}{i % 8:06d}", "caller": f"336{i:08d}",
                      "callee": f"33{100 + i % 60:03d}{i % 8:06d}", "callref": str(10**11 + i),
                      "type": kind, "dref": f"{i:032x}", "session_id": "", "tsms": str(at)}
            note = parse_notification(tenant, list(params.items()), "127.0.0.1", at)
            assert isinstance(note, Notification)
            store.domain = tenant
            store.advance(tenant, at)
            logic.on_event(store, note, store.time(tenant))
            store.commit()
        total += len(store) - before
        i += 1
    return {p: dict(store.committed()) for p, store in stores.items()}


async def fill_changelog(bootstrap: str, topic: str, state: dict[int, dict[str, bytes]]) -> int:
    """Write the state entries to the changelog, partition by partition; return how many."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                                max_batch_size=1024 * 1024)
    await producer.start()
    count = 0
    try:
        for partition, entries in state.items():
            futures = []
            batch = producer.create_batch()
            for key, value in entries.items():
                if batch.append(key=key.encode(), value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key.encode(), value=value, timestamp=None)
                count += 1
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


_PARTITIONER = DefaultPartitioner()


def memory_per_open_call(calls: int = 50_000) -> dict[str, float]:
    """Python allocations per open call (SETUP seen, not closed) in a store."""
    logic = CallRecords(CallRecordsConfig())
    notes = []
    for i in range(calls):
        params = {"account": "33100000001", "caller": f"336{i:08d}", "callee": "33100000001",
                  "callref": str(10**11 + i), "type": "SETUP", "dref": f"{i:032x}",
                  "tsms": str(1_795_000_000_000 + i)}
        note = parse_notification(TENANTS[i % len(TENANTS)], list(params.items()), "127.0.0.1",
                                  1_795_000_000_000)
        assert isinstance(note, Notification)
        notes.append(note)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = Store()
    for n in notes:
        logic.on_event(store, n, 1_795_000_000_000)
        store.commit()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"open_calls": calls, "bytes_per_open_call": round((after - before) / calls, 1),
            "state_bytes_per_open_call": round(store.size_bytes() / calls, 1)}


def step_alone(items: list[tuple[bytes, bytes]], profile: bool = False) -> dict[str, Any]:
    """The runtime's per-record work without Kafka: the runtime's step (decode, time checks, fold,
    undo log, size checks) and the timers that close calls, a transaction per 500 records, then
    every call closed; µs per notification. With ``profile``, prints where the time goes."""
    store = Store()
    step = Step(CallRecords(CallRecordsConfig()), store, "bench", mode="replay")

    def work() -> int:
        written = 0
        for i, (key, value) in enumerate(items):
            written += len(step.record(Record("bench", 0, i, key, value), 0))
            if i % 500 == 499:
                written += len(step.timers(0, 0))
                store.commit()
        written += len(step.flush(10 * 3600_000, 0))
        store.commit()
        return written

    started = time.perf_counter()
    if profile:
        profiler = cProfile.Profile()
        written = profiler.runcall(work)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    else:
        written = work()
    seconds = time.perf_counter() - started
    return {"records": len(items), "outputs": written, "us_per_record": round(seconds / len(items) * 1e6, 2),
            "profiled": profile}


WARMUP_S = 60.0
"""Default seconds of warm-up traffic before the latency is measured: a new broker's JIT compiler
runs for about a minute (after 30 s a p99 of 323 ms was seen, after 60 s 187 ms), and its first
transactions create its internal topics."""


async def end_to_end(bootstrap: str, prefix: str, rate: float, seconds: float,
                     settings: dict[str, int] | None = None, warmup_s: float = WARMUP_S) -> dict[str, Any]:
    """p50/p99 from the edge's 200 to the call update, at ``rate`` notifications/s.

    The first ``warmup_s`` seconds of traffic warm the broker (transaction and offsets topics are
    created on first use), the processes and the connections; they are reported apart.
    """
    tmp = Path(tempfile.mkdtemp())
    config = tmp / "ingest.toml"
    config.write_text("".join(f'[tenants.{t}]\ntoken_sha256 = "{hash_secret(SECRET)}"\n' for t in TENANTS))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KEYYO_TOPIC_PREFIX": prefix}
    port = free_port()
    group = SPEC.group(prefix)
    await provision_processor(bootstrap, SPEC, prefix, prefix, group)
    cli = [sys.executable, "-m", "deploy.cli", "--log-level", "warning"]
    edge_cmd = [*cli, "ingest", "--config", str(config), "--port", str(port)]
    health = free_port()
    proc_cmd = [*cli, "process", SPEC.name, "--health-port", str(health),
                *(a for k, v in (settings or {}).items() for a in (f"--{k.replace('_', '-')}", str(v)))]
    edge = subprocess.Popen(edge_cmd, env=env)  # noqa: ASYNC220 - started once, before measuring
    proc = subprocess.Popen(proc_cmd, env=env)  # noqa: ASYNC220 - as above
    acked: dict[str, float] = {}
    seen: dict[str, float] = {}
    written: dict[str, float] = {}
    """When the processor appended the update (its record's timestamp): splits the latency."""
    sent_at: dict[str, float] = {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        topic = CALL_UPDATES.full_name(prefix)
        tps = await topic_partitions(consumer, topic)
        for _ in range(50):  # a topic just created may not be in the metadata yet
            if tps:
                break
            await asyncio.sleep(0.2)
            tps = await topic_partitions(consumer, topic)
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)

        async def watch() -> None:
            while True:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for recs in batch.values():
                    for r in recs:
                        event = orjson.loads(r.value)["event_id"]
                        seen.setdefault(event, now)
                        written.setdefault(event, r.timestamp / 1000)

        watcher = asyncio.create_task(watch())
        await _ready(f"http://127.0.0.1:{health}/readyz")
        await _ready(f"http://127.0.0.1:{port}/readyz")
        rng = random.Random(3)
        planner = Planner(TENANTS, 8, rng, time_scale=0.05)
        sample = [planner.plan(0) for _ in range(2000)]
        per_call = sum(len(c.notifications()) for c in sample) / len(sample)
        calls = plan_traffic(planner, rate=rate / per_call, duration=warmup_s + seconds,
                             start_ms=_ms() + 500, chaos=Chaos())
        sends = schedule(calls, Chaos(), rng)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:

            async def one(tenant: str, params: dict[str, str]) -> None:
                url = f"{base}/v1/keyyo/{tenant}/notifications"
                async with session.get(url, params={"key": SECRET, **params}) as resp:
                    body = await resp.json()
                    if resp.status == 200:
                        acked[body["event_id"]] = time.time()
                        sent_at[body["event_id"]] = time.time() - t0

            # This process measures: its own pauses would show as latency. The planned traffic is
            # moved out of the garbage collector's sight, and finished requests are not kept (a
            # list of every task made its full collections take 0.1-0.2 s, every few seconds).
            gc.collect()
            gc.freeze()
            tasks: set[asyncio.Task[None]] = set()
            t0 = time.time()
            for s in sends:
                wait = (s.due - _ms()) / 1000
                if wait > 0:
                    await asyncio.sleep(wait)
                task = asyncio.create_task(one(s.tenant, s.params))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*tasks)
            gc.unfreeze()
        deadline = time.time() + 20
        while time.time() < deadline and not acked.keys() <= seen.keys():  # noqa: ASYNC110 - a deadline
            await asyncio.sleep(0.2)
        watcher.cancel()
    finally:
        await consumer.stop()
        for p in (edge, proc):
            p.terminate()
            p.wait(30)
    measured = {e: t for e, t in acked.items() if sent_at[e] >= warmup_s}
    lat = sorted((seen[e] - t) * 1000 for e, t in measured.items() if e in seen)
    warmup = [(seen[e] - t) * 1000 for e, t in acked.items() if sent_at[e] < warmup_s and e in seen]
    by_second: dict[int, list[float]] = {}
    for e, t in acked.items():
        if e in seen:
            by_second.setdefault(int(sent_at[e]), []).append((seen[e] - t) * 1000)
    processed = sorted((written[e] - t) * 1000 for e, t in measured.items() if e in seen)
    committed = sorted((seen[e] - written[e]) * 1000 for e in measured if e in seen)
    return {
        "rate_target": rate, "warmup_s": warmup_s, "measured_s": seconds,
        "sent": len(measured), "updates_seen": len(lat),
        "achieved_rate": round(len(measured) / seconds, 1),
        "p50_ms": round(lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99)], 1) if lat else None,
        "max_ms": round(lat[-1], 1) if lat else None,
        "warmup_max_ms": round(max(warmup), 1) if warmup else None,
        "max_ms_by_second": {str(k): round(max(v), 1) for k, v in sorted(by_second.items())},
        "p99_ms_by_window": _p99_by_window(by_second, warmup_s),
        "all_seen": acked.keys() <= seen.keys(),
        "split": {  # the 200 -> the update appended by the processor -> seen, committed
            "to_appended_p50_ms": _pct(processed, 0.5), "to_appended_p99_ms": _pct(processed, 0.99),
            "appended_to_seen_p50_ms": _pct(committed, 0.5),
            "appended_to_seen_p99_ms": _pct(committed, 0.99)},
    }


def _p99_by_window(by_second: dict[int, list[float]], warmup_s: float, window_s: int = 5) -> list[float]:
    """p99 of each ``window_s`` seconds of the measured traffic, in order: shows whether the tail
    is steady or a few stalls."""
    windows: dict[int, list[float]] = {}
    for second, values in by_second.items():
        if second >= warmup_s:
            windows.setdefault(int((second - warmup_s) // window_s), []).extend(values)
    return [_pct(sorted(v), 0.99) or 0.0 for _, v in sorted(windows.items())]


def _pct(values: list[float], q: float) -> float | None:
    return round(values[min(int(len(values) * q), len(values) - 1)], 1) if values else None


async def _ready(url: str, within_s: float = 60.0) -> None:
    """Wait until ``url`` answers 200."""
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {within_s:.0f}s")


async def throughput(bootstrap: str, count: int, state_entries: int, overrides: dict[str, Any],
                     results: dict[str, Any]) -> None:
    """Fill the notification topic, read it with a raw consumer, drain it with one processor (and,
    with ``state_entries``, again with that much state restored first); into ``results``."""
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    # Records only: the processor runs in this process, and a list of Notification objects (each
    # tracked by the garbage collector) would cost it ≈ 30 % that no real processor pays.
    items = [(n.tenant.encode(), n.to_json()) for n in simulated(count, 1, _ms() - 3600_000)]
    gc.collect()
    print(f"filling {prefix}keyyo.notifications.v1 with {len(items)} notifications ...", flush=True)
    await provision_processor(bootstrap, SPEC, prefix, prefix, f"{prefix}bench.call-records")
    await fill(bootstrap, NOTIFICATIONS.full_name(prefix), items)
    print("raw consumer baseline ...", flush=True)
    raw = await raw_consume(bootstrap, NOTIFICATIONS.full_name(prefix), len(items))
    print("call-records processor (exactly-once) ...", flush=True)
    proc = await processor_throughput(bootstrap, prefix, len(items), **overrides)
    bare = await runtime_only(bootstrap, SPEC, items, CALL_UPDATES.name, **overrides)
    if state_entries:
        big = f"big{uuid.uuid4().hex[:6]}."
        group = f"{big}bench.call-records"
        await provision_processor(bootstrap, SPEC, big, big, group)
        print(f"building {state_entries} state entries ...", flush=True)
        state = open_calls_state(state_entries, _ms() - 3600_000)
        written = await fill_changelog(bootstrap, f"{group}.{SPEC.store}.changelog", state)
        del state
        gc.collect()
        await fill(bootstrap, NOTIFICATIONS.full_name(big), items)
        print(f"call-records processor restoring {written} entries, then the same input ...", flush=True)
        loaded = await processor_throughput(bootstrap, big, len(items), **overrides)
        results["big_state"] = {
            "state_entries": written, "processor": loaded,
            "restore_entries_per_s": round(written / max(loaded["ready_s"], 1e-3)),
            "ratio_to_fresh": round(loaded["records_per_s"] / proc["records_per_s"], 3)}
    results["throughput"] = {"notifications": len(items), "raw_consumer_per_s": round(raw, 1),
                             "processor": proc, "ratio": round(proc["records_per_s"] / raw, 3),
                             "runtime_only": bare,
                             "ratio_to_runtime_only": round(proc["records_per_s"] / bare["records_per_s"], 3)}


def report(results: dict[str, Any]) -> None:
    """Print what was measured."""
    if "big_state" in results:
        b = results["big_state"]
        print(f"\nwith {b['state_entries']} state entries: ready after {b['processor']['ready_s']} s "
              f"(≈ {b['restore_entries_per_s']} entries/s restored), then "
              f"{b['processor']['records_per_s']:.0f} notifications/s = {b['ratio_to_fresh']}x the "
              f"fresh state (target >= 0.8x; restore < 30 s)")
    if "throughput" in results:
        t = results["throughput"]
        print(f"\nthroughput: processor {t['processor']['records_per_s']:.0f} notifications/s with "
              f"exactly-once vs raw consumer {t['raw_consumer_per_s']:.0f}/s: {t['ratio']:.3f}x "
              f"(issue 10 target >= 45,000/s); a partition commits every "
              f"{t['processor']['ms_between_commits_per_partition']} ms on average; the process used "
              f"{t['processor']['process_cores']} of a core while draining")
        ro = t["runtime_only"]["records_per_s"]
        more = 1e6 / t["processor"]["records_per_s"] - 1e6 / ro
        print(f"the runtime alone (each record passed on, one state entry each), same input: {ro:.0f}/s "
              f"({1e6 / ro:.1f} µs per record); the call-records logic leaves "
              f"{t['ratio_to_runtime_only']:.3f}x of it ({more:.1f} µs per notification more)")
    if "latency" in results:
        lat = results["latency"]
        print(f"latency 200 -> call update at {lat['achieved_rate']}/s over {lat['measured_s']:.0f}s after "
              f"{lat['warmup_s']:.0f}s of warm-up, slice {results['slice_ms']} ms, commit interval "
              f"{results['commit_interval_ms']} ms: p50 {lat['p50_ms']} ms, "
              f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms (issue 10 target p99 < 250 ms; warm-up max "
              f"{lat['warmup_max_ms']} ms); every update seen: {lat['all_seen']}")
        windows = ", ".join(f"{v:.0f}" for v in lat["p99_ms_by_window"])
        print(f"  p99 of each 5 s of the measured traffic: {windows} ms")
        sp = lat["split"]
        print(f"  of which 200 -> update appended by the processor: p50 {sp['to_appended_p50_ms']} ms, p99 "
              f"{sp['to_appended_p99_ms']} ms; appended -> committed and read: p50 "
              f"{sp['appended_to_seen_p50_ms']} ms, p99 {sp['appended_to_seen_p99_ms']} ms")
    if "logic" in results:
        lg, st, mem = results["logic"], results["step"], results["memory"]
        rounds = " / ".join(f"{us}" for us in lg["rounds_us"])
        print(f"logic alone: {lg['us_per_record']} µs per notification (median of {len(lg['rounds_us'])} "
              f"rounds: {rounds}), {lg['decode_us']} µs of it decoding (issue 10 target <= 10 µs); "
              f"with the runtime's step and the timers closing calls: {st['us_per_record']} µs")
        print(f"memory: {mem['bytes_per_open_call']:.0f} bytes per open call "
              f"(state {mem['state_bytes_per_open_call']:.0f} bytes; issue 10 target < 1 KB)")


def main() -> int:
    """Run the three measurements, print them, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notifications", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="notifications/s for latency")
    parser.add_argument("--seconds", type=float, default=15.0, help="latency run length")
    parser.add_argument("--warmup", type=float, default=WARMUP_S,
                        help="seconds of traffic before the latency is measured (a new broker's JIT "
                             "compiles during its first minute)")
    parser.add_argument("--state-entries", type=int, default=0,
                        help="also drain the same input with this many state entries restored "
                             "first (answered calls in progress), against the fresh state")
    parser.add_argument("--latency-only", action="store_true", help="only the end-to-end latency")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the end-to-end latency (as devtools.bench_compiled does)")
    parser.add_argument("--slice-ms", type=int, default=None,
                        help="the processors' transaction slice (default: the processor's own)")
    parser.add_argument("--commit-interval-ms", type=int, default=None,
                        help="the processors' commit interval (default: the processor's own)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the per-record work without Kafka and print where the time goes")
    parser.add_argument("--out", default="bench-results")
    keep_topics_option(parser)
    args = parser.parse_args()
    results: dict[str, Any] = {"time": datetime.now(tz=UTC).isoformat(timespec="seconds"),
                               "compiled_modules": compiled_build.check(),
                               "slice_ms": args.slice_ms or SPEC.default_slice_ms,
                               "commit_interval_ms": (SPEC.default_commit_interval_ms
                                                      if args.commit_interval_ms is None
                                                      else args.commit_interval_ms)}
    overrides = {"slice_ms": results["slice_ms"], "commit_interval_ms": results["commit_interval_ms"]}
    if not args.latency_only:
        print("memory per open call ...", flush=True)
        results["memory"] = memory_per_open_call()
        print(f"logic alone ({LOGIC_ROUNDS} rounds), then the per-record step with its timers (no Kafka) ...",
              flush=True)
        sample = [(n.tenant.encode(), n.to_json()) for n in simulated(60_000, 2, _ms() - 3600_000)]
        results["logic"] = logic_rounds(sample, lambda: CallRecords(CallRecordsConfig()))
        results["step"] = step_alone(sample, profile=args.profile)
    with bench_broker(args.keep_topics) as bootstrap:
        # Latency first: the broker is still quiet (the throughput run leaves it compacting).
        if not args.no_latency:
            print(f"end-to-end latency at {args.rate:.0f} notifications/s ...", flush=True)
            results["latency"] = asyncio.run(end_to_end(bootstrap, f"lat{uuid.uuid4().hex[:6]}.",
                                                        args.rate, args.seconds, overrides, args.warmup))
        if not args.latency_only:
            asyncio.run(throughput(bootstrap, args.notifications, args.state_entries, overrides, results))
    report(results)
    write_results(args.out, "call-records", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
