"""What a processor's logic asks the runtime to write."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Output:
    """One record to write: topic base name (the runtime adds the prefix), key, value."""

    topic: str
    key: bytes
    value: bytes
