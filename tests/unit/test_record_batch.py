"""The native record batch (processors/native/src/batch.rs) the runtime writes its transactions
with when the native module is built: byte for byte what aiokafka's own builder makes of the same
records, times and producer state, read back by aiokafka's reader, and bounded as aiokafka's is."""

from __future__ import annotations

import random
import time
from types import ModuleType

import pytest
from aiokafka.record._crecords.cutil import crc32c_cython
from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from processors.output import Output

SIZES = [0, 1, 63, 64, 127, 128, 420, 8191, 8192, 70_000]
"""Value lengths on both sides of each varint's byte boundary."""


def records(seed: int, count: int) -> list[tuple[bytes | None, bytes | None, int]]:
    rng = random.Random(seed)
    start = 1_790_000_000_000 + rng.randrange(10**6)
    out: list[tuple[bytes | None, bytes | None, int]] = []
    for i in range(count):
        key = None if i % 17 == 5 else f"tenant-{rng.randrange(100):04d}/{rng.getrandbits(64):x}".encode()
        value = None if i % 11 == 3 else rng.randbytes(rng.choice(SIZES))
        out.append((key, value, start + rng.randrange(-5, 5000)))  # times need not be in order
    return out


def aiokafka_bytes(recs: list[tuple[bytes | None, bytes | None, int]], transactional: bool,
                   state: tuple[int, int, int] | None) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=transactional,
                                        producer_id=-1, producer_epoch=-1, base_sequence=0,
                                        batch_size=1 << 30)
    for offset, (key, value, ts) in enumerate(recs):
        assert builder.append(offset, timestamp=ts, key=key, value=value, headers=[]) is not None
    if state is not None:
        builder.set_producer_state(*state)
    return bytes(builder.build())


def native_bytes(native: ModuleType, recs: list[tuple[bytes | None, bytes | None, int]],
                 transactional: bool, state: tuple[int, int, int] | None) -> bytes:
    batch = native.RecordBatch(1 << 30, transactional)
    for key, value, ts in recs:
        assert batch.add(key, value, ts)
    if state is not None:
        batch._set_producer_state(*state)
    built: bytes = batch._build()
    return built


def test_bytes_equal_aiokafkas(native: ModuleType) -> None:
    for seed in range(12):
        recs = records(seed, 1 + seed * 9)
        for transactional in (True, False):
            for state in (None, (4242, 3, 1_000_000 + seed)):
                ours = native_bytes(native, recs, transactional, state)
                assert ours == aiokafka_bytes(recs, transactional, state), (seed, transactional, state)


def test_aiokafka_reads_it_back(native: ModuleType) -> None:
    recs = records(99, 300)
    batch = DefaultRecordBatch(native_bytes(native, recs, True, (77, 1, 5)))
    assert batch.validate_crc()
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (77, 1, 5)
    assert batch.is_transactional and not batch.is_control_batch
    assert batch.first_timestamp == recs[0][2] and batch.max_timestamp == max(r[2] for r in recs)
    read = [(r.offset, r.key, r.value, r.timestamp, r.headers) for r in batch]
    assert read == [(i, k, v, ts, []) for i, (k, v, ts) in enumerate(recs)]


def test_a_record_without_a_time_gets_the_wall_clock(native: ModuleType) -> None:
    before = time.time_ns() // 1_000_000
    batch = native.RecordBatch(4096, True)
    assert batch.add(b"k", b"v") and batch.add(b"k2", None)
    after = time.time_ns() // 1_000_000
    stamps = [r.timestamp for r in DefaultRecordBatch(batch._build())]
    assert len(stamps) == 2 and all(before <= ts <= after for ts in stamps)


def test_limit_and_closing(native: ModuleType) -> None:
    batch = native.RecordBatch(1000, True)
    assert batch.add(b"k", b"x" * 5000)  # a first record always fits (the broker judges it)
    assert not batch.closed()
    assert not batch.add(b"k", b"x")  # past the limit: refused, and the batch takes no more
    assert batch.closed() and batch.record_count() == 1
    small = native.RecordBatch(1000, True)
    count = 0
    while small.add(b"key", b"y" * 100):
        count += 1
    assert count == small.record_count() and 1000 - 120 < small.size() <= 1000
    assert small.append(timestamp=None, key=b"k", value=b"v", headers=[]) is None  # aiokafka's own appends


def test_built_once(native: ModuleType) -> None:
    batch = native.RecordBatch(4096, True)
    assert batch.add(b"k", b"v", 1)
    first = batch._build()
    assert batch.closed() and not batch.add(b"k", b"v", 2)
    batch._set_producer_state(1, 1, 1)  # too late: a retry sends the same bytes
    assert batch._build() is first


def test_crc32c_matches_aiokafkas_both_ways(native: ModuleType) -> None:
    rng = random.Random(7)
    for size in (0, 1, 7, 8, 9, 15, 16, 17, 61, 1000, 65_537):
        data = rng.randbytes(size)
        expected = crc32c_cython(data)
        assert native.crc32c_of(data) == expected, size
        assert native.crc32c_of(data, portable=True) == expected, size
    assert native.crc32c_of(b"123456789") == 0xE3069283  # the standard check value


def test_add_entries_is_add_of_each_entry(native: ModuleType) -> None:
    """A dict of entries appended in one call: the same bytes as ``add`` of each, str keys encoded
    as UTF-8, tombstones kept; a batch that refuses an entry says which one, and a later call
    starts where it is told."""
    rng = random.Random(3)
    entries: dict[str | bytes, bytes | None] = {}
    for i in range(400):
        key: str | bytes = f"c/tenant-{i % 7}/{rng.getrandbits(64):x}é" if i % 3 else f"i/{i}".encode()
        entries[key] = None if i % 13 == 4 else rng.randbytes(rng.choice(SIZES[:8]))
    ts = 1_795_000_000_000
    whole = native.RecordBatch(1 << 30, True)
    assert whole.add_entries(entries, timestamp_ms=ts) == len(entries)
    one_by_one = native.RecordBatch(1 << 30, True)
    for key, value in entries.items():
        assert one_by_one.add(key.encode() if isinstance(key, str) else key, value, ts)
    assert whole._build() == one_by_one._build()

    pieces, done = [], 0
    while done < len(entries):
        batch = native.RecordBatch(50_000, True)
        taken = batch.add_entries(entries, done, timestamp_ms=ts)
        assert done < taken <= len(entries) and batch.record_count() == taken - done
        assert taken == len(entries) or batch.closed()  # refused one: it takes no more
        pieces.append(batch._build())
        done = taken
    assert len(pieces) > 3
    read = [(r.key, r.value) for piece in pieces for r in DefaultRecordBatch(piece)]
    assert read == [(k.encode() if isinstance(k, str) else k, v) for k, v in entries.items()]


def test_add_entries_refuses_what_is_not_bytes(native: ModuleType) -> None:
    batch = native.RecordBatch(4096, True)
    for bad in ({"k": "not bytes"}, {1: b"v"}):
        with pytest.raises(TypeError):
            batch.add_entries(bad)


def test_add_outputs_appends_what_it_knows_where_to_put(native: ModuleType) -> None:
    """The runtime's outputs appended natively: each to the open batch of its topic and key's
    partition, the same bytes as ``add`` of each, counted per base topic; it stops, and says
    where, at the first output Python must write itself."""
    ts = 1_795_000_000_000
    rng = random.Random(5)
    keys = [f"tenant-{i:03d}".encode() for i in range(20)]
    outputs = [Output("updates" if i % 5 else "records", rng.choice(keys),
                      rng.randbytes(rng.choice(SIZES[:8]))) for i in range(300)]
    targets = {"updates": "p.updates", "records": "p.records"}
    key_partition = {(full, key): int(key[-1:]) % 3 for full in targets.values() for key in keys}
    ours = {(full, p): native.RecordBatch(1 << 30, True) for full in targets.values() for p in range(3)}
    written: dict[str, int] = {}
    assert native.add_outputs(outputs, 0, targets, key_partition, ours, written, ts) == len(outputs)
    theirs = {where: native.RecordBatch(1 << 30, True) for where in ours}
    for out in outputs:
        full = targets[out.topic]
        assert theirs[(full, key_partition[(full, out.key)])].add(out.key, out.value, ts)
    assert {w: b._build() for w, b in ours.items()} == {w: b._build() for w, b in theirs.items()}
    assert written == {"updates": 240, "records": 60}

    def stops_at(position: int, outs: list[Output]) -> None:
        batches = {w: native.RecordBatch(1 << 30, True) for w in ours}
        counted: dict[str, int] = {}
        assert native.add_outputs(outs, 0, targets, key_partition, batches, counted, ts) == position
        assert sum(counted.values()) == position  # the ones before it, each counted once
        assert native.add_outputs(outs, position + 1, targets, key_partition, batches, counted,
                                  ts) == len(outs)  # and it goes on after it

    first = outputs[:10]
    stops_at(3, [*first[:3], Output("elsewhere", keys[0], b"v"), *first[3:]])  # a topic not known yet
    stops_at(4, [*first[:4], Output("updates", b"new-key", b"v"), *first[4:]])  # a key not known yet
    stops_at(5, [*first[:5], Output("updates", keys[0], lambda: b"v", True), *first[5:]])  # to render

    def batch_of(out: Output) -> tuple[str, int]:
        return targets[out.topic], key_partition[(targets[out.topic], out.key)]

    some = {w: native.RecordBatch(1 << 30, True) for w in ours}
    del some[batch_of(first[4])]  # no open batch for it (nor for any output sharing it)
    position = next(i for i, o in enumerate(first) if batch_of(o) not in some)
    assert native.add_outputs(first, 0, targets, key_partition, some, {}, ts) == position <= 4
    full = {w: native.RecordBatch(1 << 30, True) for w in ours}
    full[batch_of(first[0])] = native.RecordBatch(10, True)
    assert full[batch_of(first[0])].add(b"k", b"x" * 20, ts)  # past its limit: the next is refused
    assert native.add_outputs(first, 0, targets, key_partition, full, {}, ts) == 0
