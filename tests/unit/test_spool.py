"""The disk spool: durable appends, ordered reads, replay position, torn tails."""

from __future__ import annotations

from pathlib import Path

from ingest.spool import Spool, encode


def frames(n: int, start: int = 0) -> list[bytes]:
    return [encode("topic", b"acme", b'{"n":%d}' % i) for i in range(start, start + n)]


def test_records_come_back_in_order_and_replay_position_survives_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(frames(3))
    spool.append(frames(2, start=3))
    records = spool.read(0, 10)
    assert [r.value for r in records] == [b'{"n":%d}' % i for i in range(5)]
    assert {(r.topic, r.key) for r in records} == {("topic", b"acme")}
    spool.mark_replayed(records[1].end)
    spool.close()

    reopened = Spool(tmp_path)
    assert reopened.pending_bytes == reopened.size - records[1].end
    rest = reopened.read(reopened.replayed, 10)
    assert [r.value for r in rest] == [b'{"n":2}', b'{"n":3}', b'{"n":4}']
    reopened.reset()
    assert (reopened.size, reopened.pending_bytes, reopened.read(0, 10)) == (0, 0, [])


def test_a_torn_tail_is_cut_when_the_spool_is_opened(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(frames(2))
    good_size = spool.size
    spool.close()
    with open(tmp_path / "spool.log", "ab") as f:
        f.write(frames(1, start=9)[0][:-3])  # a crash in the middle of a write
    reopened = Spool(tmp_path)
    assert reopened.size == good_size
    assert [r.value for r in reopened.read(0, 10)] == [b'{"n":0}', b'{"n":1}']
    reopened.append(frames(1, start=2))
    assert [r.value for r in reopened.read(0, 10)][-1] == b'{"n":2}'


def test_values_may_contain_separators(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([encode("t", b"k", b"a\0b\0c")])
    assert spool.read(0, 1)[0].value == b"a\0b\0c"
