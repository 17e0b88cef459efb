"""An append-only, fsync'd disk spool of records waiting for Kafka, replayed in order.

File ``spool.log`` holds framed records ``[u32 length][u32 crc32][topic \\0 key \\0 value]``;
``spool.pos`` holds the byte offset up to which records are known to be in Kafka. A torn tail
(a crash in the middle of a write, never acknowledged) is cut off when the spool is opened.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

_HEADER = struct.Struct(">II")


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """One record of the spool and where the next one starts."""

    topic: str
    key: bytes
    value: bytes
    end: int
    """Byte offset just past this record."""


def encode(topic: str, key: bytes, value: bytes) -> bytes:
    """Frame one record."""
    payload = b"\0".join((topic.encode(), key, value))
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class Spool:
    """The spool files in one folder. Blocking I/O: call from a worker thread."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / "spool.log"
        self.pos_path = folder / "spool.pos"
        self._log = open(self.log_path, "a+b")  # noqa: SIM115 - held open for the spool's life
        self.replayed = self._read_pos()
        self.size = self._cut_torn_tail()
        if self.replayed > self.size:
            self.replayed = self.size

    def _read_pos(self) -> int:
        try:
            return int(self.pos_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _cut_torn_tail(self) -> int:
        good = 0
        self._log.seek(0)
        data = self._log.read()
        while good + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, good)
            end = good + _HEADER.size + length
            if end > len(data) or zlib.crc32(data[good + _HEADER.size:end]) != crc:
                break
            good = end
        if good != len(data):
            self._log.truncate(good)
            os.fsync(self._log.fileno())
        return good

    @property
    def pending_bytes(self) -> int:
        """Bytes of records not yet known to be in Kafka."""
        return self.size - self.replayed

    def append(self, frames: list[bytes]) -> None:
        """Append framed records and fsync them: after this returns they survive a crash."""
        blob = b"".join(frames)
        self._log.seek(0, os.SEEK_END)
        self._log.write(blob)
        self._log.flush()
        os.fsync(self._log.fileno())
        self.size += len(blob)

    def read(self, start: int, max_records: int) -> list[SpooledRecord]:
        """Up to ``max_records`` records from byte offset ``start``.

        Safe while another thread appends: reads are positional (``pread``), never through the
        file position that ``append`` moves, and stop at the size of the last completed append."""
        fd, size = self._log.fileno(), self.size
        records: list[SpooledRecord] = []
        offset = start
        while len(records) < max_records and offset < size:
            length, _ = _HEADER.unpack(os.pread(fd, _HEADER.size, offset))
            payload = os.pread(fd, length, offset + _HEADER.size)
            topic, key, value = payload.split(b"\0", 2)
            offset += _HEADER.size + length
            records.append(SpooledRecord(topic.decode(), key, value, offset))
        return records

    def mark_replayed(self, offset: int) -> None:
        """Record durably that everything before ``offset`` is in Kafka."""
        self.replayed = offset
        tmp = self.pos_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(offset))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.pos_path)

    def reset(self) -> None:
        """Empty the spool once every record is replayed."""
        self._log.truncate(0)
        os.fsync(self._log.fileno())
        self.size = 0
        self.mark_replayed(0)

    def close(self) -> None:
        """Close the file."""
        self._log.close()
