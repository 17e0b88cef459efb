"""The runtime's transactions written with the native record batch (processors/native/src/batch.rs,
what a compiled build uses) on a real broker: the broker takes them inside exactly-once
transactions, a reader sees the same records, updates and state as with aiokafka's batches, and a
new run restores the same state from the changelog they wrote."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from devtools.simulate import wall_ms
from devtools.simulator import Chaos
from processors import runtime as runtime_module
from processors.runtime import Runtime
from schemas.topics import CALL_RECORDS, CALL_UPDATES
from tests.integration.pipeline import (
    event_ids,
    provision,
    records,
    run_to_end,
    send_to_kafka,
    traffic,
    updates,
)
from tests.kafka import Broker, settled
from tests.truth import comparable, expected_records, final_records

pytestmark = pytest.mark.asyncio(loop_scope="session")

State = dict[int, dict[str, bytes]]


def recording(native: ModuleType | None, states: State) -> Callable[[Runtime], None]:
    """Runs with ``native``'s batches (None: aiokafka's); each partition's committed state, once
    given up, into ``states``."""

    def prepare(runtime: Runtime) -> None:
        runtime.native = native
        close = runtime._close

        async def closing(part: Any, flush_ms: int | None = None) -> None:
            await close(part, flush_ms)
            states[part.tp.partition] = dict(part.store.committed())

        runtime._close = closing  # type: ignore[method-assign]

    return prepare


async def test_native_batches_write_what_aiokafkas_do_and_restore(
    broker: Broker, prefix: str, native: ModuleType,
) -> None:
    await provision(broker.bootstrap, prefix)
    chaos = Chaos(duplicate=0.1, reorder=0.1)
    calls, sends = traffic(seed=41, rate=15, duration=4, start_ms=wall_ms(), chaos=chaos)
    assert await send_to_kafka(broker.bootstrap, prefix, sends) == {"200": len(sends)}
    expected = expected_records(calls)
    assert len(expected) >= 30

    runs: dict[str, State] = {}
    # "small": native batches of 1 KB, so that each transaction's outputs and changelog entries
    # span many batches (a batch refusing an entry in the middle of the changelog's dict).
    for name, module, limit in (("aiokafka", None, None), ("native", native, None), ("small", native, 1024)):
        out = f"{prefix}{name}."
        group = out + "keyyo.call-records"
        await provision(broker.bootstrap, prefix, out_prefix=out, group=group)
        runs[name] = {}
        with pytest.MonkeyPatch.context() as patch:
            if limit is not None:
                patch.setattr(runtime_module, "BATCH_BYTES", limit)
            await run_to_end(broker.bootstrap, prefix, prepare=recording(module, runs[name]), group=group,
                             output_prefix=out, mode="replay", until_idle_s=1.5,
                             flush_at_end_ms=24 * 3600_000)
        await settled(broker.bootstrap, CALL_RECORDS.full_name(out))
        await settled(broker.bootstrap, CALL_UPDATES.full_name(out))

    written = {name: await records(broker.bootstrap, f"{prefix}{name}.") for name in runs}
    changes = {name: await updates(broker.bootstrap, f"{prefix}{name}.") for name in runs}
    assert final_records(written["native"]) == expected
    assert (sorted(map(comparable, written["native"]), key=repr)
            == sorted(map(comparable, written["aiokafka"]), key=repr))
    assert sorted(changes["native"], key=repr) == sorted(changes["aiokafka"], key=repr)
    assert sorted(u["event_id"] for u in changes["native"]) == sorted(event_ids(sends))  # one each
    assert runs["native"] == runs["aiokafka"] and any(runs["native"].values())
    assert final_records(written["small"]) == expected
    assert sorted(changes["small"], key=repr) == sorted(changes["native"], key=repr)
    assert runs["small"] == runs["native"]

    # A new run of each native group, without checkpoints or new input: its state is what it
    # restores from the changelog the native batches wrote.
    for name in ("native", "small"):
        restored: State = {}
        out = f"{prefix}{name}."
        await run_to_end(broker.bootstrap, prefix, prepare=recording(None, restored),
                         group=out + "keyyo.call-records", output_prefix=out, mode="replay", until_idle_s=1.5)
        assert restored == runs[name], name
