"""The state store: staged writes, abort, per-record rollback, timers, clocks, restore."""

from __future__ import annotations

import random
import tracemalloc
from types import ModuleType

import orjson
import pytest

from processors.state import Store


def changelog(store: Store) -> list[tuple[str, bytes | None]]:
    """What the runtime would write to the changelog for the staged changes."""
    return list(store.staged().items())


def test_writes_are_staged_until_commit_and_dropped_by_abort() -> None:
    store = Store()
    store.put("a", b"1")
    assert store.get("a") == b"1" and len(store) == 0
    store.abort()
    assert store.get("a") is None
    store.put("a", b"1")
    store.commit()
    store.delete("a")
    assert store.get("a") is None and store.processor_keys() == ["a"]
    store.commit()
    assert store.processor_keys() == []


def test_the_runtime_keyspace_is_closed_to_the_processor() -> None:
    store = Store()
    with pytest.raises(ValueError, match="runtime"):
        store.put("\x00rt/time/acme", b"0")
    with pytest.raises(ValueError, match="runtime"):
        store.delete("\x00anything")


def test_rollback_step_undoes_one_records_work_only() -> None:
    store = Store()
    store.put("a", b"1")
    store.begin_step()
    store.put("b", b"2")
    store.put("a", b"changed")
    store.advance("acme", 500)
    store.wake("call", 900)
    store.rollback_step()
    assert store.get("a") == b"1" and store.get("b") is None
    assert store.time("acme") == 0 and store.wake_time("call") is None
    store.commit()
    assert store.processor_keys() == ["a"]


def test_timers_fire_once_in_their_domain_and_moves_or_cancels_are_respected() -> None:
    store = Store()
    store.domain = "acme"
    store.wake("x", 100)
    store.wake("y", 200)
    store.wake("z", 300)
    store.domain = "globex"
    store.wake("g", 50)
    store.commit()
    store.domain = "acme"
    store.wake("y", 400)  # moved
    store.unwake("z")  # cancelled
    store.commit()
    assert list(store.due("acme", 350)) == ["x"]
    store.commit()
    assert list(store.due("acme", 350)) == []  # fired once
    assert list(store.due("acme", 1000)) == ["y"]
    assert list(store.due("globex", 49)) == [] and list(store.due("globex", 50)) == ["g"]


def test_a_timer_set_again_for_the_same_time_writes_nothing() -> None:
    store = Store()
    store.domain = "acme"
    store.wake("call", 1_000)
    store.commit()
    store.wake("call", 1_000)
    assert store.staged() == {}
    store.wake("call", 2_000)
    assert list(store.staged().values()) == [b"2000"]
    store.commit()
    assert list(store.due("acme", 1_500)) == [] and list(store.due("acme", 2_000)) == ["call"]


def test_an_aborted_transaction_gives_its_due_timers_back() -> None:
    store = Store()
    store.wake("x", 100)
    store.commit()
    assert list(store.due("", 100)) == ["x"]
    store.abort()
    assert list(store.due("", 100)) == ["x"]


def test_clocks_move_forward_only_and_are_committed_like_state() -> None:
    store = Store()
    assert store.advance("acme", 1000) == 1000
    assert store.advance("acme", 500) == 1000  # the domain's time, which stays
    assert store.time("acme") == 1000 and store.time("globex") == 0
    store.abort()
    assert store.time("acme") == 0
    store.advance("acme", 1000)
    assert ("\x00rt/time/acme", b"1000") in changelog(store)
    store.commit()
    assert store.time("acme") == 1000


def test_a_clock_is_one_entry_per_transaction_and_a_rolled_back_step_gives_its_time_back() -> None:
    store = Store()
    for at in range(1000, 1100):
        store.advance("acme", at)
    assert changelog(store) == [("\x00rt/time/acme", b"1099")]
    store.begin_step()
    store.advance("acme", 5000)
    store.advance("globex", 10)
    store.rollback_step()
    assert store.time("acme") == 1099 and store.time("globex") == 0
    assert changelog(store) == [("\x00rt/time/acme", b"1099")]
    store.commit()
    store.begin_step()
    store.advance("acme", 2000)
    assert changelog(store) == [("\x00rt/time/acme", b"2000")]  # read mid-step
    store.rollback_step()
    assert store.time("acme") == 1099 and changelog(store) == []


def test_restore_then_commit_rebuilds_state_timers_and_clocks() -> None:
    first = Store()
    first.put("call", b"v1")
    first.domain = "acme"
    first.wake("call", 700)
    first.advance("acme", 600)
    entries = changelog(first)
    first.commit()
    first.delete("call")
    entries += changelog(first)
    first.commit()
    second = Store()
    for key, value in entries:  # the changelog replayed in order
        second.restore(key, value)
    assert second.processor_keys() == [] and second.time("acme") == 600
    assert second.next_wake("acme") == 700
    second.put("other", b"x")
    second.commit()
    assert list(second.due("acme", 700)) == ["call"]


def test_latest_outputs_keep_only_the_last_per_key_and_the_order_of_the_rest() -> None:
    from processors.output import Output, coalesce

    outs = [Output("stats", b"a", b"1", latest=True), Output("dl", b"x", b"dead"),
            Output("stats", b"b", b"1", latest=True), Output("stats", b"a", b"2", latest=True),
            Output("updates", b"a", b"u1"), Output("updates", b"a", b"u2"),
            Output("other", b"a", b"o", latest=True)]
    assert coalesce(outs) == [outs[1], outs[2], outs[3], outs[4], outs[5], outs[6]]
    plain = [Output("updates", b"a", b"u1"), Output("updates", b"a", b"u2")]
    assert coalesce(plain) == plain


def test_entries_put_hold_their_size_not_orjsons_hidden_capacity() -> None:
    """``orjson.dumps`` returns bytes holding ≈ 4 KB whatever their length; what the store keeps
    (staged, then committed) must cost about its length, or a million open calls cost 4 GB."""
    store = Store()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2_000):
            store.put(f"c/{i}", orjson.dumps([i, "a" * 200, None]))
        store.commit()
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / 2_000
    finally:
        tracemalloc.stop()
    assert store.get("c/7") == orjson.dumps([7, "a" * 200, None])
    assert per_entry < 600, per_entry  # ≈ 220 bytes of value, its key and the dict's slot


def _same(pure: Store, fast: Store) -> None:
    """Both stores hold the same entries in the same order, the same clocks and the same heaps,
    element for element (the heaps' order decides which timer fires first)."""
    assert list(fast.committed().items()) == list(pure.committed().items())
    assert fast._times == pure._times
    assert fast._heaps == pure._heaps


def _due_by_definition(store: Store, domain: str, now_ms: int) -> list[str]:
    """What ``store.due(domain, now_ms)`` must yield, from the committed entries alone: the keys
    of the domain's timers at or before ``now_ms`` that this transaction has not changed, by
    (time, key)."""
    prefix = f"\x00rt/wake/{domain}\x1f"
    due = sorted((int(v), k) for k, v in store.committed().items()
                 if k.startswith(prefix) and int(v) <= now_ms and k not in store._staged)
    return [k[len(prefix):] for _, k in due]


def test_the_native_commit_applies_what_the_python_one_does(native: ModuleType) -> None:
    """Random transactions (writes, deletions, timers set, moved earlier and later, cancelled and
    fired, clocks, in several domains, some aborted) through a store committing in Python and one
    committing with the native loop: after every commit they are the same store, and every
    firing is what the committed timers say, heaps aside."""
    rng = random.Random(7)
    pure, fast = Store(native=None), Store(native=native)
    domains = ["acme", "béta", "t-0042", ""]
    keys = [f"c/{d}/{i}" for d in domains for i in range(30)]
    fired = 0
    for transaction in range(400):
        for _ in range(rng.randrange(1, 40)):
            op, key, domain = rng.random(), rng.choice(keys), rng.choice(domains)
            at = 1_790_000_000_000 + rng.randrange(0, 50) * 1000  # equal times: ties go by key
            if op >= 0.9:  # fire the domain's due timers: the same keys, in the same order
                pure.domain = fast.domain = domain
                expected = _due_by_definition(pure, domain, at)
                due = list(pure.due(domain, at))
                assert due == expected and list(fast.due(domain, at)) == due
                fired += len(due)
                continue
            for store in (pure, fast):
                store.domain = domain
                if op < 0.35:
                    store.put(key, orjson.dumps({"k": key, "n": transaction}))
                elif op < 0.45:
                    store.delete(key)
                elif op < 0.75:
                    store.wake(key, at)
                elif op < 0.8:
                    store.unwake(key)
                else:
                    store.advance(domain, at)
        if rng.random() < 0.1:
            pure.abort()
            fast.abort()
        else:
            assert pure.staged() == fast.staged()
            pure.commit()
            fast.commit()
        _same(pure, fast)
    assert len(pure) > 50 and sum(len(h) for h in pure._heaps.values()) > 50 and fired > 50


def test_the_native_loop_reads_values_and_fails_as_python_does(native: ModuleType) -> None:
    """Values our code never writes (padded, signed, too long for 64 bits) are read by Python's
    ``int``; a timer key without its separator fails alike; tombstones of clocks and of entries
    that are not there."""
    entries: dict[str, bytes | None] = {
        "\x00rt/wake/a\x1fx": b"007", "\x00rt/wake/a\x1fy": b"+5", "\x00rt/wake/b\x1fz": b" 12 ",
        "\x00rt/time/a": b"-3", "\x00rt/time/b": b"123456789012345678901234", "\x00rt/time/c": b"1",
        "gone": None, "\x00rt/time/c ": None, "kept": b"v",
    }
    pure, fast = Store(native=None), Store(native=native)
    for store in (pure, fast):
        store.restore("\x00rt/time/z", b"9")
        store._staged = dict(entries)
        store._staged["\x00rt/time/z"] = None
        store.commit()
    _same(pure, fast)
    assert fast._times == {"a": -3, "b": 123456789012345678901234, "c": 1}
    for bad in (b"x1", b"", b"-"):
        for store in (Store(native=None), Store(native=native)):
            store._staged = {"\x00rt/wake/a\x1fx": bad}
            with pytest.raises(ValueError):
                store.commit()
    for store in (Store(native=None), Store(native=native)):
        store._staged = {"\x00rt/wake/no-separator": b"1"}
        with pytest.raises(ValueError):
            store.commit()


def test_a_timer_fires_once_even_when_the_heap_holds_it_twice() -> None:
    """Set to 100, moved to 200, set to 100 again: the heap holds (100, key) twice, and a restored
    changelog holds that history too. The timer fires once, also when the logic re-arms it in
    between."""
    committed, restored = Store(), Store()
    committed.domain = "d"
    for at in (100, 200, 100):
        committed.wake("k", at)
        committed.commit()
        restored.restore("\x00rt/wake/d\x1fk", str(at).encode())
    for store in (committed, restored):
        assert list(store.due("d", 150)) == ["k"]
        store.wake("k", 120)  # the logic sets it again, within the same transaction
        assert list(store.due("d", 150)) == []
        store.commit()
        assert list(store.due("d", 150)) == ["k"]  # the timer set anew, after the commit


def test_a_timer_moved_later_in_the_transaction_does_not_fire_at_its_old_time() -> None:
    store = Store()
    store.domain = "d"
    store.wake("k", 100)
    store.commit()
    store.wake("k", 500)  # an event moved it, earlier in the same transaction
    assert list(store.due("d", 150)) == []
    store.commit()
    assert list(store.due("d", 150)) == [] and list(store.due("d", 500)) == ["k"]


def test_a_timer_moved_later_keeps_its_entry_and_fires_at_its_last_time(native: ModuleType) -> None:
    """A thousand timers each moved later fifty times, in commits and in a restored changelog: the
    heaps hold one entry per timer (the first), and each timer fires once, at its last time; moved
    earlier, a timer gets an entry of its new time."""
    for native_or_not in (None, native):
        committed, restored = Store(native=native_or_not), Store(native=native_or_not)
        committed.domain = "d"
        for move in range(50):
            for i in range(1000):
                committed.wake(f"k{i}", 10_000 + 1000 * move + i)
                restored.restore(f"\x00rt/wake/d\x1fk{i}", str(10_000 + 1000 * move + i).encode())
            committed.commit()
        for store in (committed, restored):
            assert sum(len(heap) for heap in store._heaps.values()) == 1000
            assert list(store.due("d", 58_999)) == []  # each entry came up and was pushed again
            assert list(store.due("d", 59_499)) == [f"k{i}" for i in range(500)]
            store.commit()
            store.domain = "d"
            store.wake("k600", 12_000)  # moved earlier than its time (59_600)
            store.commit()
            assert list(store.due("d", 12_000)) == ["k600"]
            assert list(store.due("d", 60_000)) == [f"k{i}" for i in range(500, 1000) if i != 600]
