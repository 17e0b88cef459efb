"""Run a processor's logic in memory through the runtime's own per-record step (no broker).

The tests' counterpart of Kafka Streams' TopologyTestDriver: records in, outputs out, with a
clock the test moves. Each :meth:`Driver.send` is one committed transaction, as the runtime would
make it (the record's due timers, the record, then every due timer; ``latest`` outputs coalesced).
As in the runtime, the partition's first transaction also runs the logic's ``on_start`` (contract,
rule 7) for the known domains the partition ``owns`` (by default all: one partition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import orjson

from processors.contract import Logic
from processors.output import Output, coalesce
from processors.state import Store
from processors.step import Limits, Record, Step


class Driver:
    """One partition of a processor, in memory."""

    def __init__(self, logic: Logic[Any], *, mode: Literal["live", "replay"] = "replay",
                 allowed_lateness_ms: int = 5000, limits: Limits | None = None,
                 topic: str = "input", partition: int = 0, wall_ms: int = 0,
                 processor: str = "test", owns: Callable[[bytes], bool] = lambda key: True) -> None:
        self.wall_ms = wall_ms
        self.owns = owns
        self.starting = True
        self.store = Store()
        self.step = Step(logic, self.store, processor, mode=mode, allowed_lateness_ms=allowed_lateness_ms,
                         limits=limits, clock=lambda: self.wall_ms)
        self.topic = topic
        self.partition = partition
        self.offset = 0
        self.outputs: list[Output] = []

    def send(self, key: bytes | None, value: bytes | None, timestamp_ms: int | None = None) -> list[Output]:
        """One record, as one committed transaction; returns its outputs."""
        rec = Record(self.topic, self.partition, self.offset, key, value, timestamp_ms)
        self.offset += 1
        out = self._start()
        out.extend(self.step.record(rec, self.wall_ms))
        out.extend(self.step.timers(self.wall_ms, self.partition))
        return self._commit(out)

    def tick(self, wall_ms: int | None = None) -> list[Output]:
        """Move the wall clock (live mode) and fire what is due, as an idle partition does."""
        if wall_ms is not None:
            self.wall_ms = wall_ms
        out = self._start()
        out.extend(self.step.timers(self.wall_ms, self.partition))
        return self._commit(out)

    def flush(self, advance_ms: int) -> list[Output]:
        """Move every domain's time on by ``advance_ms``; fire timers until none is due."""
        out = self._start()
        out.extend(self.step.flush(advance_ms, self.partition))
        out = self._commit(out)
        while self.step.has_due(self.wall_ms):
            out.extend(self.tick())
        return out

    def restart(self) -> None:
        """The partition starts again with its committed state (a restart or a rebalance)."""
        self.starting = True

    def _start(self) -> list[Output]:
        return self.step.start(self.owns, self.wall_ms, self.partition) if self.starting else []

    def _commit(self, out: list[Output]) -> list[Output]:
        out = coalesce(out, self.step.unrendered(self.partition))
        self.starting = False
        self.store.commit()
        self.outputs.extend(out)
        return out

    def values(self, topic: str) -> list[Any]:
        """Decoded JSON values written so far to ``topic`` (base name)."""
        return [orjson.loads(o.rendered()) for o in self.outputs if o.topic == topic]
