"""Call records end to end on a real broker: simulator -> ingest -> processor -> records.

The records must equal the simulator's ground truth (ids aside), with duplicates and reordering
on; every accepted notification gives exactly one call update; a processor killed with SIGKILL
while a second copy runs loses and duplicates nothing; a replay rebuilds the same records.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from devtools.simulate import HttpSender, KafkaSender, wall_ms
from devtools.simulator import Chaos, play
from processors.observability import health_server
from processors.runtime import Runtime
from schemas.topics import CALL_RECORDS, CALL_UPDATES, DEAD_LETTERS, NOTIFICATIONS
from tests.integration.edge import SECRET, TENANTS, running_edge
from tests.integration.pipeline import (
    event_ids,
    processor_process,
    provision,
    records,
    run_to_end,
    running_processor,
    send_to_kafka,
    stop_process,
    traffic,
    updates,
)
from tests.kafka import Broker, read_values, settled, wait_for
from tests.truth import comparable, expected_records, final_records

pytestmark = pytest.mark.asyncio(loop_scope="session")
READY = {"joined": True, "restored": True, "progressing": True}


async def wait_for_records(bootstrap: str, prefix: str, expected: dict[Any, Any], within_s: float) -> None:
    """Poll the call-records topic until every expected record is there."""

    async def complete() -> bool:
        return final_records(await records(bootstrap, prefix)).keys() >= expected.keys()

    await wait_for(complete, within_s, interval=0.5, what="every expected record")


def assert_exactly_the_truth(written: list[dict[str, Any]], written_updates: list[dict[str, Any]],
                             expected: dict[Any, dict[str, Any]], sends: list[Any]) -> None:
    """Every expected record (highest revision), none twice; one call update per notification."""
    got = final_records(written)
    assert got.keys() == expected.keys()
    for match, record in expected.items():
        assert got[match] == record
    assert Counter((r["record_id"], r["revision"]) for r in written).most_common(1)[0][1] == 1
    counts = Counter(u["event_id"] for u in written_updates)
    assert set(counts) == event_ids(sends) and set(counts.values()) == {1}


async def test_records_equal_the_ground_truth_with_duplicates_and_reordering_then_replay(
    broker: Broker, prefix: str,
) -> None:
    chaos = Chaos(duplicate=0.15, reorder=0.15, delay=0.05, delay_ms=300)
    calls, sends = traffic(seed=11, rate=12, duration=6, start_ms=wall_ms() + 500, chaos=chaos)
    await provision(broker.bootstrap, prefix)
    expected = expected_records(calls)
    async with running_edge(broker.bootstrap, prefix, create=False) as edge, \
            running_processor(broker.bootstrap, prefix) as runtime:
        await wait_for(lambda: runtime.readiness() == READY, 30,
                       what="processor joined and restored")
        sender = HttpSender(str(edge.client.make_url("")), dict.fromkeys(TENANTS, SECRET))
        async with aiohttp.ClientSession() as session:
            sender.session = session
            statuses = await play(sends, sender, wall_ms)
        assert statuses == {"200": len(sends)}

        await wait_for_records(broker.bootstrap, prefix, expected, 60)
        live = await records(broker.bootstrap, prefix)
        live_updates = await updates(broker.bootstrap, prefix)
    assert len(calls) >= 40
    assert_exactly_the_truth(live, live_updates, expected, sends)

    # Replay: a fresh group over the same notifications, event time only, rebuilds the records.
    out = prefix + "replay."
    await provision(broker.bootstrap, prefix, out_prefix=out, group=out + "keyyo.call-records")
    await run_to_end(broker.bootstrap, prefix, group=out + "keyyo.call-records", output_prefix=out,
                     mode="replay", until_idle_s=1.5, flush_at_end_ms=24 * 3600_000)
    await settled(broker.bootstrap, CALL_RECORDS.full_name(out))
    replayed = await records(broker.bootstrap, out)
    by_id = {r["record_id"]: comparable(r) for r in replayed}
    live_by_id = {}
    for r in sorted(live, key=lambda r: r["revision"]):
        live_by_id[r["record_id"]] = comparable(r)
    assert by_id == live_by_id


async def test_a_processor_killed_mid_run_loses_and_duplicates_nothing(
    broker: Broker, prefix: str, tmp_path: Path,
) -> None:
    await provision(broker.bootstrap, prefix)
    chaos = Chaos(duplicate=0.1, reorder=0.1)
    calls, sends = traffic(seed=23, rate=12, duration=10, start_ms=wall_ms() + 4000, chaos=chaos)
    expected = expected_records(calls)
    first = processor_process(broker.bootstrap, prefix, tmp_path / "first.log")
    second = processor_process(broker.bootstrap, prefix, tmp_path / "second.log")
    try:
        sender = KafkaSender(broker.bootstrap, NOTIFICATIONS.full_name(prefix))
        await sender.producer.start()
        try:
            player = asyncio.create_task(play(sends, sender, wall_ms))

            async def both_working() -> bool:
                # Both processes own partitions and a third of the traffic is through.
                owners = [(tmp_path / f"{n}.log").read_text().count('"partition restored"')
                          for n in ("first", "second")]
                return min(owners) > 0 and len(await updates(broker.bootstrap, prefix)) >= len(sends) // 3

            await wait_for(both_working, 60, interval=0.5, what="both processes at work")
            assert not player.done(), "the traffic ended before the kill"
            first.send_signal(signal.SIGKILL)
            first.wait()
            assert await player == {"200": len(sends)}
        finally:
            await sender.producer.stop()

        await wait_for_records(broker.bootstrap, prefix, expected, 90)
        written = await records(broker.bootstrap, prefix)
        written_updates = await updates(broker.bootstrap, prefix)
        assert stop_process(second) == 0  # SIGTERM: commit, leave the group, exit cleanly
    finally:
        for proc in (first, second):
            stop_process(proc)
    restores = [orjson.loads(line) for line in (tmp_path / "second.log").read_text().splitlines()
                if '"partition restored"' in line]
    # The survivor took over the killed process's partitions, state restored from the changelog.
    assert any(r["changelog_records"] > 0 for r in restores), restores
    assert_exactly_the_truth(written, written_updates, expected, sends)


async def test_undecodable_input_goes_to_dead_letters_and_the_rest_flows(
    broker: Broker, prefix: str,
) -> None:
    await provision(broker.bootstrap, prefix)
    calls, sends = traffic(seed=5, rate=5, duration=1, start_ms=wall_ms(), chaos=Chaos())
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    topic = NOTIFICATIONS.full_name(prefix)
    try:
        await producer.send_and_wait(topic, b"not json", key=b"acme")
        await producer.send_and_wait(topic, orjson.dumps({"schema": "other"}), key=b"acme")
    finally:
        await producer.stop()
    sender = KafkaSender(broker.bootstrap, topic)
    await sender.producer.start()
    try:
        async with running_processor(broker.bootstrap, prefix) as runtime:
            await play(sends, sender, wall_ms)
            await wait_for(
                lambda: _all(records(broker.bootstrap, prefix), len(calls)), 60, interval=0.5,
                what="records")
            status = runtime.readiness()
    finally:
        await sender.producer.stop()
    dead = await read_values(broker.bootstrap, DEAD_LETTERS.full_name(prefix))
    assert sorted(d["value"] for d in dead) == sorted(['{"schema":"other"}', "not json"])
    assert all(d["topic"] == topic and d["reason"] for d in dead)
    assert status == READY


async def _all(coro, n: int) -> bool:  # type: ignore[no-untyped-def]
    with contextlib.suppress(Exception):
        return len(final_records(await coro)) >= n
    return False


async def test_an_aborted_transaction_leaves_no_trace(broker: Broker, prefix: str) -> None:
    await provision(broker.bootstrap, prefix)
    calls, sends = traffic(seed=31, rate=10, duration=3, start_ms=wall_ms() + 1000, chaos=Chaos())
    expected = expected_records(calls)
    failures: list[str] = []
    async with running_processor(broker.bootstrap, prefix) as runtime, \
            health_server("127.0.0.1", 0, runtime.metrics, runtime.readiness) as port:
        await wait_for(lambda: runtime.readiness() == READY, 30,
                       what="processor ready")
        # The first transaction to reach its offsets fails after its outputs and changelog
        # entries were written (and acknowledged) inside it: the abort must hide them.
        for part in runtime.parts.values():
            original = part.producer.send_offsets_to_transaction

            async def failing(offsets: Any, group: str, original: Any = original) -> Any:
                if not failures:
                    failures.append(group)
                    raise RuntimeError("injected failure after the outputs were written")
                return await original(offsets, group)

            part.producer.send_offsets_to_transaction = failing  # type: ignore[method-assign]
        await send_to_kafka(broker.bootstrap, prefix, sends)

        await wait_for_records(broker.bootstrap, prefix, expected, 60)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                ready = (resp.status, await resp.json())
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                metrics = await resp.text()
    assert failures, "the failure was never injected"
    assert ready == (200, {"ready": True, "checks": READY})
    aborts = [line for line in metrics.splitlines() if line.startswith("keyyo_processor_aborts_total")]
    assert aborts and float(aborts[0].split()[-1]) == 1.0
    assert_exactly_the_truth(await records(broker.bootstrap, prefix),
                             await updates(broker.bootstrap, prefix), expected, sends)


async def test_a_burst_runs_last_transaction_is_tried_again_when_kafka_refuses_it(
    broker: Broker, prefix: str,
) -> None:
    """The last transaction of a burst run closes the calls still open (its timers, after stream
    time is moved on): refused once, it is tried again, and no call is left without its record."""
    await provision(broker.bootstrap, prefix)
    calls, sends = traffic(seed=17, rate=10, duration=2, start_ms=wall_ms() - 600_000, chaos=Chaos())
    expected = expected_records(calls)
    await send_to_kafka(broker.bootstrap, prefix, sends)
    refused: list[int] = []

    def refuse_the_first_flush(runtime: Runtime) -> None:
        process = runtime._process

        async def once_refused(part: Any, flush_ms: int | None = None) -> None:
            if flush_ms is not None and not refused:
                commit = part.producer.commit_transaction

                async def failing() -> None:
                    part.producer.commit_transaction = commit
                    refused.append(part.tp.partition)
                    raise KafkaError("injected: the burst's last commit refused")

                part.producer.commit_transaction = failing
            await process(part, flush_ms)

        runtime._process = once_refused  # type: ignore[method-assign]

    await run_to_end(broker.bootstrap, prefix, prepare=refuse_the_first_flush, mode="replay",
                     until_idle_s=1.5, flush_at_end_ms=24 * 3600_000)
    assert refused, "the failure was never injected"
    for topic in (CALL_RECORDS, CALL_UPDATES):
        await settled(broker.bootstrap, topic.full_name(prefix))
    assert_exactly_the_truth(await records(broker.bootstrap, prefix),
                             await updates(broker.bootstrap, prefix), expected, sends)


async def test_a_commit_interval_gathers_a_trickle_into_fewer_transactions(
    broker: Broker, prefix: str,
) -> None:
    """With a commit interval, a transaction stays open taking records as they arrive: a trickle
    of notifications costs fewer transactions than notifications, and the records are exact."""
    await provision(broker.bootstrap, prefix)
    calls, sends = traffic(seed=41, rate=20, duration=3, start_ms=wall_ms() + 1000, chaos=Chaos())
    expected = expected_records(calls)
    async with running_processor(broker.bootstrap, prefix, commit_interval_ms=500) as runtime:
        await wait_for(lambda: runtime.readiness() == READY, 30, what="processor ready")
        await send_to_kafka(broker.bootstrap, prefix, sends)
        await wait_for_records(broker.bootstrap, prefix, expected, 60)
        transactions = runtime.metrics.transactions()
    assert_exactly_the_truth(await records(broker.bootstrap, prefix),
                             await updates(broker.bootstrap, prefix), expected, sends)
    # 3 partitions, at most 2 transactions a second each (≈ 20 in all; ≈ 150 committing at once).
    assert 0 < transactions < len(sends) / 5, (transactions, len(sends))  # ≈ 150 without one


async def test_keyyos_own_example_template_gives_200s_and_records(
    broker: Broker, prefix: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The guide's URL: ``?account=_ACCOUNT_&caller=_CALLER_&callee=_CALLEE_&type=_N_TYPE_``."""
    await provision(broker.bootstrap, prefix)
    line, caller = "33123456789", "33612345678"
    caplog.set_level("WARNING", logger="keyyo.ingest")
    async with running_edge(broker.bootstrap, prefix, create=False) as edge, \
            running_processor(broker.bootstrap, prefix):
        for kind, pause in (("SETUP", 0.3), ("CONNECT", 1.2), ("RELEASE", 0)):
            resp = await edge.notify({"account": line, "caller": caller, "callee": line, "type": kind})
            assert resp.status == 200
            await asyncio.sleep(pause)

        async def recorded() -> bool:
            return bool(await records(broker.bootstrap, prefix))

        await wait_for(recorded, 30, interval=0.5, what="the call's record")
        status, metrics = await edge.get("/metrics")
    assert status == 200
    (record,) = await records(broker.bootstrap, prefix)
    assert (record["outcome"], record["answered_by"], record["correlation"]) == (
        "answered", line, "approximate")
    assert record["talk_seconds"] >= 1.0 and record["legs"][0]["dref"] is None
    assert 'keyyo_ingest_incomplete_template_total{missing="dref"} 3.0' in metrics
    assert 'keyyo_ingest_incomplete_template_total{missing="tsms"} 3.0' in metrics
    warnings = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert len(warnings) == 1 and "_DREF_ and _TSMS_" in warnings[0] and "keyyo-stream url" in warnings[0]
