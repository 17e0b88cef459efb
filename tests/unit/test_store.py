"""The state store: staged writes, abort, per-record rollback, timers, clocks, restore."""

from __future__ import annotations

import tracemalloc

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
