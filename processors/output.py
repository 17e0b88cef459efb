"""What a processor's logic asks the runtime to write."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Output:
    """One record to write: topic base name (the runtime adds the prefix), key, value."""

    topic: str
    key: bytes
    value: bytes
    latest: bool = False
    """Only the latest value of this (topic, key) matters (a compacted topic's figures): when a
    transaction holds several, only the last one is written, as Kafka Streams' record cache does."""


def coalesce(outputs: list[Output]) -> list[Output]:
    """The outputs of one transaction as written: every ``latest`` output but the last of its
    (topic, key) left out; the order of the others kept."""
    last: dict[tuple[str, bytes], int] = {}
    for i, out in enumerate(outputs):
        if out.latest:
            last[(out.topic, out.key)] = i
    if not last or len(last) == sum(1 for out in outputs if out.latest):
        return outputs
    return [out for i, out in enumerate(outputs) if not out.latest or last[(out.topic, out.key)] == i]
