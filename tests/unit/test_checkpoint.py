"""Partition checkpoints: written atomically, read back whole, refused when damaged or stale."""

from __future__ import annotations

import time
from pathlib import Path

from processors import checkpoint
from processors.state import Store


def a_store() -> Store:
    store = Store()
    store.domain = "acme"
    store.put("c/acme/1", b'{"call": 1}')
    store.put("k/acme/\u00e9", b"\x00\xff binary")
    store.wake("c/acme/1", 1_795_000_000_000)
    store.advance("acme", 1_794_999_000_000)
    store.commit()
    return store


def test_a_checkpoint_restores_the_same_store(tmp_path: Path) -> None:
    store = a_store()
    path = checkpoint.path_for(tmp_path, "g.state.changelog", 3)
    size = checkpoint.write(path, "g.state.changelog", 3, 1234, store.committed())
    assert size == path.stat().st_size and not list(tmp_path.glob("*.tmp*"))
    loaded, why = checkpoint.read(path, "g.state.changelog", 3, max_age_ms=60_000)
    assert loaded is not None, why
    assert loaded.offset == 1234 and loaded.entries == store.committed()
    again = Store()
    for key, value in loaded.entries.items():
        again.restore(key, value)
    assert again.time("acme") == 1_794_999_000_000
    assert again.next_wake("acme") == 1_795_000_000_000
    assert again.get("k/acme/\u00e9") == b"\x00\xff binary"


def test_damaged_stale_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    path = checkpoint.path_for(tmp_path, "g.state.changelog", 0)
    assert checkpoint.read(path, "g.state.changelog", 0, 60_000) == (None, "no checkpoint")
    checkpoint.write(path, "g.state.changelog", 0, 10, a_store().committed())
    assert checkpoint.read(path, "g.state.changelog", 1, 60_000)[0] is None
    assert checkpoint.read(path, "other.state.changelog", 0, 60_000)[0] is None
    an_hour_later = time.time_ns() // 1_000_000 + 3600_000
    loaded, why = checkpoint.read(path, "g.state.changelog", 0, max_age_ms=60_000, now_ms=an_hour_later)
    assert loaded is None and "stale" in why
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    loaded, why = checkpoint.read(path, "g.state.changelog", 0, 60_000)
    assert loaded is None and "damaged" in why
    path.write_bytes(b"")
    assert checkpoint.read(path, "g.state.changelog", 0, 60_000)[0] is None
