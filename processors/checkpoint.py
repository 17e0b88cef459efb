"""Local checkpoints of a partition's state: a snapshot of its committed entries and the changelog
offset they reflect, so a restart replays only the changelog's tail (as Kafka Streams does).

A checkpoint holds every committed entry of the store as of changelog offset ``offset``: every
changelog record before it is reflected, so replaying the changelog from ``offset`` (committed
records only) brings the store up to date. Replaying a record twice is harmless (each entry is the
latest value of its key), so an older checkpoint is never wrong, only slower, with one exception:
the broker forgets tombstones after the changelog's ``delete.retention.ms``, so a checkpoint older
than that could resurrect a deleted key. Such a checkpoint is stale and ignored, as is one whose
offset lies beyond the changelog's end (the topic was recreated), or a damaged file.

File: one JSON header line (version, topic, partition, offset, written_at, entries), then per
entry a 4-byte key length, a 4-byte value length, key and value, then a CRC-32 of all of it.
Written to a temporary file and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson

VERSION = 1
_LENGTHS = struct.Struct(">II")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    offset: int
    """The changelog offset the entries reflect: replay from here."""
    written_at_ms: int
    entries: dict[str, bytes]


def path_for(state_dir: Path, topic: str, partition: int) -> Path:
    """Where the checkpoint of one changelog partition lives."""
    return state_dir / f"{topic}-{partition}.checkpoint"


def write(path: Path, topic: str, partition: int, offset: int, entries: dict[str, bytes]) -> int:
    """Write a checkpoint atomically; return its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = orjson.dumps({"version": VERSION, "topic": topic, "partition": partition, "offset": offset,
                           "written_at": time.time_ns() // 1_000_000, "entries": len(entries)}) + b"\n"
    parts = [header]
    pack = _LENGTHS.pack
    for key, value in entries.items():
        raw = key.encode()
        parts.append(pack(len(raw), len(value)))
        parts.append(raw)
        parts.append(value)
    body = b"".join(parts)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(body)
        f.write(struct.pack(">I", zlib.crc32(body)))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return len(body) + 4


def read(path: Path, topic: str, partition: int, max_age_ms: int,
         now_ms: int | None = None) -> tuple[Checkpoint | None, str]:
    """The checkpoint at ``path`` if it is usable at ``now_ms`` (default: the wall clock), else
    None; and why (for the log)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "no checkpoint"
    except OSError as exc:
        return None, f"checkpoint unreadable ({exc.strerror})"
    body, crc = raw[:-4], raw[-4:]
    if len(raw) < 5 or struct.pack(">I", zlib.crc32(body)) != crc:
        return None, "checkpoint damaged (CRC mismatch)"
    newline = body.find(b"\n")
    try:
        header = orjson.loads(body[:newline])
    except orjson.JSONDecodeError:
        return None, "checkpoint damaged (header)"
    if (header.get("version"), header.get("topic"), header.get("partition")) != (VERSION, topic, partition):
        return None, "checkpoint of another version, topic or partition"
    age = (time.time_ns() // 1_000_000 if now_ms is None else now_ms) - int(header["written_at"])
    if age > max_age_ms:
        return None, f"checkpoint stale ({age // 1000} s old: tombstones may have been compacted away)"
    entries: dict[str, bytes] = {}
    pos, end, unpack = newline + 1, len(body), _LENGTHS.unpack_from
    while pos < end:
        key_len, value_len = unpack(body, pos)
        pos += 8
        key = body[pos:pos + key_len].decode()
        pos += key_len
        entries[key] = body[pos:pos + value_len]
        pos += value_len
    if len(entries) != header["entries"]:
        return None, "checkpoint damaged (entry count)"
    return Checkpoint(int(header["offset"]), int(header["written_at"]), entries), "checkpoint loaded"


def remove(path: Path) -> None:
    """Forget a checkpoint (it describes state that is about to change)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
