"""A partition's key/value state with staged writes and event-time timers (no I/O).

Writes are staged until :meth:`Store.commit`; :meth:`Store.abort` drops them. The runtime writes
the staged changes to the changelog in the same transaction as the outputs and offsets, and
restores a store by replaying its changelog partition into :meth:`Store.restore`.
Timers are state too (key ``TIMER_PREFIX + key``), so they survive a restart.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

TIMER_PREFIX = "\x00t:"
_DELETED = None


class Store:
    """State of one input partition."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._staged: dict[str, bytes | None] = {}
        self._heap: list[tuple[int, str]] = []
        self._popped: list[tuple[int, str]] = []

    def get(self, key: str) -> bytes | None:
        """The value of ``key``, staged writes included."""
        if key in self._staged:
            return self._staged[key]
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        """Stage a write."""
        self._staged[key] = value

    def delete(self, key: str) -> None:
        """Stage a deletion (a tombstone in the changelog)."""
        self._staged[key] = _DELETED

    def wake(self, key: str, at_ms: int) -> None:
        """Ask to be woken for ``key`` once stream time reaches ``at_ms`` (replaces any earlier)."""
        self._staged[TIMER_PREFIX + key] = str(at_ms).encode()

    def unwake(self, key: str) -> None:
        """Cancel the timer of ``key``."""
        if self.get(TIMER_PREFIX + key) is not None:
            self.delete(TIMER_PREFIX + key)

    def wake_time(self, key: str) -> int | None:
        """When ``key``'s timer fires, if it has one."""
        raw = self.get(TIMER_PREFIX + key)
        return int(raw) if raw is not None else None

    def staged(self) -> dict[str, bytes | None]:
        """Writes since the last commit (value None = deletion), coalesced per key."""
        return self._staged

    def commit(self) -> None:
        """Make staged writes durable in memory (the runtime calls it after Kafka's commit)."""
        for key, value in self._staged.items():
            # A copy sized to its content: orjson's bytes keep a far larger hidden capacity.
            self._apply(key, None if value is None else bytes(memoryview(value)))
        self._staged = {}
        self._popped = []

    def abort(self) -> None:
        """Drop staged writes; timers taken by :meth:`due` become due again."""
        self._staged = {}
        for entry in self._popped:
            heapq.heappush(self._heap, entry)
        self._popped = []

    def restore(self, key: str, value: bytes | None) -> None:
        """Apply one changelog entry (restoration, no staging)."""
        self._apply(key, value)

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._data.pop(key, None)
        else:
            self._data[key] = value
            if key.startswith(TIMER_PREFIX):
                heapq.heappush(self._heap, (int(value), key[len(TIMER_PREFIX):]))

    def due(self, now_ms: int) -> Iterator[str]:
        """Keys whose committed timer is at or before ``now_ms``, earliest first.

        Each is yielded once; the logic re-arms the timer if it still needs one.
        """
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            at, key = heapq.heappop(heap)
            self._popped.append((at, key))
            current = self._data.get(TIMER_PREFIX + key)
            if current is None or int(current) != at:
                continue  # cancelled or moved
            self.delete(TIMER_PREFIX + key)
            yield key

    def next_wake(self) -> int | None:
        """The earliest pending timer (may be a stale one)."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._data)

    def size_bytes(self) -> int:
        """Bytes of keys and values held (an estimate of the state's size)."""
        return sum(len(k) + len(v) for k, v in self._data.items())
