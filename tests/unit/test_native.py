"""The native fold of call records and the native decoding of acd-stats' input (``processors/native``,
Rust, built by `make compile`): what they do, they do byte for byte as the Python code (their
specification); what they leave to Python (no DREF, calls to merge, a call at its bounds, a state
value or a record they do not know), Python does.

Each test feeds the same records to two in-memory partitions, one with the native fold and one
without, and compares every output of every record and, at the end, every state entry.
"""

from __future__ import annotations

import dataclasses
import json
import random
from types import ModuleType, SimpleNamespace
from typing import Any

import orjson

from devtools.bench_acd_stats import simulated_records
from devtools.bench_call_records import TENANTS
from devtools.simulator import Chaos, Planner, plan_traffic, schedule
from ingest.parsing import parse_notification
from processors.acd_config import TenantAcd
from processors.acd_stats import AcdCall, AcdStatsLogic
from processors.call_records import CallRecords, CallRecordsConfig, _call_id
from processors.contract import Output
from processors.driver import Driver
from processors.output import coalesce
from processors.state import Store
from processors.step import Limits
from schemas.acd_stats import SERVICE_LEVEL_FORMULAS
from schemas.call_record import CALL_RECORD_SCHEMA
from schemas.notification import Notification, parse_rfc3339_ms, rfc3339_ms

T0 = 1_795_000_000_000


class Counting:
    """The native module as ``CallRecords`` uses it, counting what the fold did and left to Python."""

    def __init__(self, module: ModuleType, decoded_calls: int | None = None, reread: bool = False) -> None:
        self.module = module
        self.decoded_calls = decoded_calls
        self.reread = reread
        self.most_kept = 0
        self.native = 0
        self.python = 0
        self.native_timers = 0
        self.python_timers = 0

    def Fold(self, *args: Any) -> Any:
        if self.decoded_calls is not None:  # in place of CallRecordsConfig.decoded_calls, the last
            args = (*args[:-1], self.decoded_calls)
        fold, counter = self.module.Fold(*args), self
        self.fold = fold

        class Wrapped:
            def decode(self, key: bytes, value: bytes) -> Any:
                return fold.decode(key, value)

            def on_event(self, store: Any, n: Any) -> list[Output] | None:
                if counter.reread:  # a Notification, not the fold's event: it reads its attributes
                    n = dataclasses.replace(n if isinstance(n, Notification) else n.notification())
                out = fold.on_event(store, n)
                if out is None:
                    counter.python += 1
                else:
                    counter.native += 1
                counter.most_kept = max(counter.most_kept, fold.kept())
                return out  # type: ignore[no-any-return]

            def on_timer(self, store: Any, key: str, now_ms: int) -> list[Output] | None:
                out = fold.on_timer(store, key, now_ms)
                if out is None:
                    counter.python_timers += 1
                else:
                    counter.native_timers += 1
                return out  # type: ignore[no-any-return]
        return Wrapped()


def _bytes(outputs: list[Output]) -> list[tuple[str, bytes, bytes]]:
    return [(o.topic, o.key, o.rendered()) for o in outputs]


def both(records: list[tuple[bytes, bytes, int]], native: ModuleType,
         config: CallRecordsConfig | None = None, seed: dict[str, bytes] | None = None,
         limits: Limits | None = None, decoded_calls: int | None = None,
         reread: bool = False) -> tuple[Counting, Driver]:
    """Every record through a pure and a native partition; every output and the final state equal."""
    counting = Counting(native, decoded_calls, reread)
    pure = Driver(CallRecords(config, native=None), limits=limits)
    fast = Driver(CallRecords(config, native=counting), limits=limits)
    for driver in (pure, fast):
        for key, value in (seed or {}).items():
            driver.store.restore(key, value)  # as a restore from the changelog would
    for i, (key, value, ts) in enumerate(records):
        assert _bytes(fast.send(key, value, ts)) == _bytes(pure.send(key, value, ts)), f"record {i}"
    assert _bytes(fast.flush(24 * 3600_000)) == _bytes(pure.flush(24 * 3600_000))
    assert fast.store.committed() == pure.store.committed()
    return counting, pure


def traffic(n_calls_s: float, seed: int, minimal_every: int = 0,
            chaos: Chaos | None = None) -> list[tuple[bytes, bytes, int]]:
    """Simulated traffic (the simulator's mix of scenarios) as records; every ``minimal_every``-th
    call sent through Keyyo's minimal template (no DREF)."""
    rng = random.Random(seed)
    calls = plan_traffic(Planner(TENANTS, 8, rng, time_scale=0.2), rate=100, duration=n_calls_s,
                         start_ms=T0, chaos=chaos or Chaos())
    if minimal_every:
        for call in calls[::minimal_every]:
            call.minimal = True
    out = []
    for s in schedule(calls, chaos or Chaos(), rng):
        note = parse_notification(s.tenant, list(s.params.items()), "127.0.0.1", s.due)
        if isinstance(note, Notification):
            out.append((note.tenant.encode(), note.to_json(), parse_rfc3339_ms(note.event_time)))
    return out


def test_simulated_traffic_with_mishaps_gives_the_same_bytes(native: ModuleType) -> None:
    records = traffic(30, 11, minimal_every=9,
                      chaos=Chaos(duplicate=0.05, reorder=0.1, delay=0.05, drop_release=0.03))
    counting, pure = both(records, native)
    assert len(records) > 5000
    # The fold did the common case; Python did the rest (no DREF, merges), and both were seen.
    assert counting.native > 0.8 * len(records)
    assert counting.python > 0.05 * len(records)
    # Timers: the calls' closing and forgetting natively, the pairings of legs without a DREF not.
    assert counting.native_timers > 0.8 * (counting.native_timers + counting.python_timers)
    assert counting.python_timers > 0
    assert len(pure.values("keyyo.call-records.v1")) > 1000


def test_a_notification_not_made_by_decode_is_read_from_its_attributes_alike(native: ModuleType) -> None:
    """The fold reads the notification ``decode`` just made from the value it was made of; any
    other notification (here a copy of it), from its attributes: the same bytes either way."""
    records = traffic(10, 15, minimal_every=7, chaos=Chaos(duplicate=0.05, reorder=0.1))
    counting, _ = both(records, native, reread=True)
    assert counting.native > 1000 and counting.python > 0


def test_calls_at_their_bounds_are_refused_the_same_way(native: ModuleType) -> None:
    records = traffic(10, 12)
    counting, pure = both(records, native, CallRecordsConfig(max_legs=2, max_events=3))
    assert counting.python > 0
    assert any("refused: the call" in v["reason"] for v in pure.values("keyyo.dead-letters.v1"))


def test_writes_of_a_record_set_aside_are_undone_the_same_way(native: ModuleType) -> None:
    """A record whose update or call outgrows the size bound is set aside after the fold staged
    its writes: the step undoes them (the native fold's included) from the same undo log."""
    records = traffic(10, 13)
    counting, pure = both(records, native, limits=Limits(max_value_bytes=900))
    assert counting.native > 1000
    reasons = [v["reason"] for v in pure.values("keyyo.dead-letters.v1")]
    assert sum("exceeds 900 bytes" in r for r in reasons) > 20


def test_calls_are_kept_decoded_between_their_events_within_their_bound(native: ModuleType) -> None:
    """The fold keeps the calls it wrote decoded, at most ``decoded_calls`` of them, and reads a
    call's value again once it is not the object it wrote (the tests above roll steps back and
    merge calls in Python): the same bytes whether it keeps many calls, a few, or none."""
    records = traffic(10, 14, chaos=Chaos(duplicate=0.05, reorder=0.1))
    kept: dict[int | None, int] = {}
    for decoded_calls in (None, 3, 0):
        counting, _ = both(records, native, decoded_calls=decoded_calls)
        assert counting.native > 1000
        kept[decoded_calls] = counting.most_kept
    assert kept[None] > 100  # the default bound (16,384) is not reached here
    assert kept[3] == 3
    assert kept[0] == 0
    # The bound as an operator sets it (`--decoded-calls`, CallRecordsConfig.decoded_calls).
    counting, _ = both(records[:2000], native, config=CallRecordsConfig(decoded_calls=5))
    assert counting.most_kept == 5


def note(kind: str, dref: str | None, at_ms: int, **fields: Any) -> tuple[bytes, bytes, int]:
    """A notification record with the given fields (the others those of a simple incoming call)."""
    values: dict[str, Any] = {
        "event_id": f"{random.Random(f'{kind}{dref}{at_ms}{fields}').getrandbits(128):032x}",
        "tenant": "acme", "type": kind, "account": "33100000001", "caller": "33600000001",
        "callee": "33100000001", "callref": None, "dref": dref, "dref_replace": None,
        "session_id": None, "is_acd": False, "redirecting_number": None, "version": 1,
        "event_time": rfc3339_ms(at_ms), "received_at": rfc3339_ms(at_ms), "source_ip": "127.0.0.1",
        **fields,
    }
    return b"acme", Notification(**values).to_json(), at_ms


def test_identifiers_that_need_escaping_legs_linked_every_way_and_a_merge(native: ModuleType) -> None:
    t = T0
    records = [
        # Identifiers may hold any printable ASCII, quotes and backslashes included.
        note("SETUP", 'a"b\\c', t, callref='c"1\\', session_id="s\\1"),
        note("CONNECT", 'a"b\\c', t + 3000, callref='c"1\\', session_id="s\\1"),
        # A second leg by session, a third replacing the second (attended transfer), one by CALLREF.
        note("SETUP", "leg2", t + 1000, session_id="s\\1", is_acd=True),
        note("SETUP", "leg3", t + 5000, dref_replace="leg2", caller="anonymous"),
        note("SETUP", "leg4", t + 6000, callref='c"1\\', redirecting_number="33100000009"),
        # Voicemail answers (a 22-digit callee), a RELEASE before its CONNECT, an exact duplicate.
        note("CONNECT", "leg2", t + 8000, callee="3312345678901234567890"),
        note("RELEASE", "leg3", t + 9000),
        note("CONNECT", "leg3", t + 7000),
        note("RELEASE", "leg3", t + 9000),
        # Two calls of their own, then a leg in both: one call (Python merges them).
        note("SETUP", "x1", t + 20_000, session_id="S-x"),
        note("SETUP", "y1", t + 21_000, callref="C-y"),
        note("SETUP", "z1", t + 22_000, session_id="S-x", callref="C-y"),
        note("RELEASE", "x1", t + 30_000),
        note("RELEASE", "y1", t + 31_000), note("RELEASE", "z1", t + 32_000),
        # Before the call it joins was seen, and an event earlier than the leg's first.
        note("RELEASE", "late", t + 40_000), note("SETUP", "late", t + 39_000, caller=""),
    ]
    counting, pure = both(records, native)
    assert counting.native >= 12 and counting.python >= 1
    finals = pure.values("keyyo.call-records.v1")
    assert any(len(r["legs"]) == 4 for r in finals) and any(len(r["legs"]) == 3 for r in finals)


def test_a_byte_to_escape_at_any_place_of_a_string_is_written_as_orjson_writes_it(native: ModuleType) -> None:
    """Strings are scanned eight bytes at a time for the first byte to escape: each control
    character, quote and backslash, at each place of a word and of the tail, alone, twice, or
    after another, next to bytes to leave as they are (DEL, two- and four-byte characters, the
    space, the bytes on either side of a quote and of a backslash): orjson's bytes."""
    specials = [chr(c) for c in range(0x20)] + ['"', "\\"]
    neighbours = ["", "\x7f", "é", "😀", " ", "!", "#", "[", "]", "\x80"]
    texts = ["", "a", "x" * 8, "x" * 16, "é" * 9, "😀" * 5, "".join(specials), "".join(specials) * 3]
    for special in specials:
        for at in range(20):
            for pad in neighbours:
                texts.append("x" * at + special + pad)
                texts.append("x" * at + pad + special + "y" * (at % 9))
                texts.append("x" * at + special + special + pad + "y" * (19 - at))
    rng = random.Random(7)
    alphabet = specials + neighbours[1:] + list("abcXYZ019/")
    texts += ["".join(rng.choices(alphabet, k=rng.randrange(40))) for _ in range(3000)]
    for text in texts:
        assert native.json_str(text) == orjson.dumps(text), repr(text)


def test_quotes_and_backslashes_at_any_place_of_an_identifier_are_folded_alike(native: ModuleType) -> None:
    """Through the fold, with the contract's identifiers (printable ASCII): a quote or a
    backslash at each place of a DREF, a session and a callref, in the calls' state and updates."""
    records, t = [], T0
    for i, special in enumerate(['"', "\\"]):
        for at in range(18):
            text = "x" * at + special + "~" * (at % 3) + special * (at % 2) + "y" * ((i + at) % 11)
            records.append(note("SETUP", text, t, session_id=text[::-1], callref="c" + text))
            records.append(note("RELEASE", text, t + 500, session_id=text[::-1], callref="c" + text))
            t += 1000
    counting, pure = both(records, native)
    assert counting.native == len(records) and counting.python == 0
    assert pure.values("keyyo.call-updates.v1")[-1]["legs"][0]["dref"] == text


def test_state_written_in_other_forms_or_broken_is_read_as_python_reads_it(native: ModuleType) -> None:
    """Calls in the object form of earlier versions, with odd values, or unreadable: the native
    fold leaves them to Python, which reads the first, takes the odd values as they are, and sets
    a record aside for the last."""
    def key(dref: str) -> str:
        return f"c/acme/{_call_id('acme', dref)}"

    old_leg = {"dref": "old", "callref": None, "account": "33100000001", "caller": "33600000001",
               "callee": "33100000001", "setup_at": T0, "connect_at": None, "release_at": None,
               "first_at": T0}
    seed = {
        key("old"): orjson.dumps({"id": _call_id("acme", "old"), "tenant": "acme",
                                  "legs": {"old": old_leg}, "events": ["aaaaaaaaaaaa"], "closed": False,
                                  "revision": 0, "closed_by": None, "closed_at": None,
                                  "last_event": T0}),
        # A float time, a short leg, a number where a string goes: not the compact form it writes.
        key("float"): orjson.dumps([1, 0, False, None, None, T0, [], [
            ["float", None, "33100000001", "1", "2", T0 + 0.5, None, None, None, None, False, None, T0,
             False, False]]]),
        key("short"): orjson.dumps([1, 0, False, None, None, T0, [], [["short", None, "3"]]]),
        key("odd"): orjson.dumps([1, 2, 0, "release", T0, T0, ["bbbbbbbbbbbb"], [
            ["odd", 7, "33100000001", 1, "\x01\t\n\x1f\x7fé/\"\\", T0, None, None, "", "", 0, "", T0,
             0, 0]]]),
        key("broken"): b"[1, 0, fal",
        "\x00rt/wake/acme\x1f" + key("old"): str(T0 + 300_000).encode(),
        # A closed call due to be forgotten, one of whose index entries now leads to another call:
        # that entry stays, the one leading to it goes.
        key("gone"): orjson.dumps([1, 1, True, "release", T0 - 600_000, T0 - 600_000, ["cccccccccccc"], [
            ["gone", "C-mine", "33100000001", "1", "2", T0 - 700_000, None, T0 - 600_000, None, "S-other",
             False, None, T0 - 700_000, False, False]]]),
        "i/acme/c/C-mine": _call_id("acme", "gone").encode(),
        "i/acme/s/S-other": _call_id("acme", "elsewhere").encode(),
        "\x00rt/wake/acme\x1f" + key("gone"): str(T0).encode(),
    }
    records = [note(kind, dref, T0 + 1000 * i)
               for i, dref in enumerate(["old", "float", "short", "odd", "broken"])
               for kind in ("CONNECT", "RELEASE")]
    counting, pure = both(records, native, seed=seed)
    assert counting.python >= 6  # every call but the odd one is left to Python ...
    assert counting.native >= 2  # ... which the native fold reads, odd values as they are
    reasons = [v["reason"] for v in pure.values("keyyo.dead-letters.v1")]
    assert any("JSONDecodeError" in r for r in reasons)
    assert any("IndexError" in r for r in reasons)
    assert counting.native_timers >= 1
    state = pure.store.committed()
    assert key("gone") not in state and "i/acme/c/C-mine" not in state and "i/acme/s/S-other" in state


def test_integers_and_times_are_written_digit_for_digit_as_python_writes_them(native: ModuleType) -> None:
    """The native fold writes integers and times two digits at a time. A call whose leg holds an
    integer where a string goes keeps it as it is: one such call per integer (each digit count,
    both signs, the ends of a 64-bit integer), then events at times on either side of every
    carry (seconds, minutes, hours, days, months, years, a leap day), all through both folds.
    The native reader takes integers of at most 18 digits; longer ones are Python's."""
    ints = [0, 5, 9, 10, 11, 42, 99, 100, 101, 999, 1000, 1001, 12345, 99999, 100000, 1234567,
            10**12, 10**17, 10**18 - 1, 10**18, 2**63 - 1]
    ints += [-i for i in ints if i] + [-(2**63)]

    def key(dref: str) -> str:
        return f"c/acme/{_call_id('acme', dref)}"

    seed = {key(f"int{i}"): orjson.dumps([1, 0, False, None, None, T0, ["bbbbbbbbbbbb"], [
        [f"int{i}", value, "33100000001", "1", "2", T0, None, None, None, None, False, None, T0, False,
         False]]]) for i, value in enumerate(ints)}
    records = [note(kind, f"int{i}", T0 + 1000 * i)
               for i in range(len(ints)) for kind in ("CONNECT", "RELEASE")]
    times = [parse_rfc3339_ms(t) for t in (
        "2026-12-31T23:59:59.999Z", "2027-01-01T00:00:00.000Z", "2028-02-28T23:59:59.990Z",
        "2028-02-29T09:09:09.009Z", "2028-03-01T00:00:00.100Z", "2029-09-30T19:59:59.099Z",
        "2029-10-01T10:10:10.010Z", "2099-12-31T23:59:59.999Z", "2100-03-01T00:00:00.000Z")]
    records += [note(kind, f"t{i}", at + step) for i, at in enumerate(times)
                for step, kind in ((0, "SETUP"), (1, "CONNECT"), (61_001, "RELEASE"))]
    counting, pure = both(records, native, seed=seed)
    assert counting.python == 2 * sum(len(str(abs(value))) > 18 for value in ints)
    assert counting.native == len(records) - counting.python
    updates = b"".join(o.rendered() for o in pure.outputs if o.topic == "keyyo.call-updates.v1")
    assert b'"callref":-99999,' in updates and b'"callref":-999999999999999999,' in updates
    assert b'"2028-02-29T09:09:09.009Z"' in updates and b'"2100-03-01T00:01:01.001Z"' in updates


def test_state_strings_with_escapes_are_read_as_orjson_reads_them(native: ModuleType) -> None:
    """The fold reads the escapes orjson writes in a call's state (every control character, quote,
    backslash; also an escaped slash and upper-case hex); a call whose state holds any other escape
    (of a non-ASCII character or a surrogate pair, which orjson writes raw) or a broken one is left
    to Python. Either way every output and the state are Python's."""
    every = "".join(map(chr, range(0x20))) + '"\\/\x7fé€😀'

    def state(dref: str, caller: bytes) -> bytes:
        return orjson.dumps([1, 0, False, None, None, T0, ["aaaaaaaaaaaa"], [
            [dref, None, "33100000001", "CALLER", "33100000001", T0, None, None, None, None, False,
             None, T0, False, False]]]).replace(b'"CALLER"', caller)

    read = {"every": orjson.dumps(every), "other": b'"\\u001F\\/x\\u0041"'}
    left = {"nonascii": b'"\\u00e9t\\u00E9"', "pair": b'"\\ud83d\\ude00"', "bad": b'"\\u00"',
            "unknown": b'"\\x41"'}
    seed = {f"c/acme/{_call_id('acme', dref)}": state(dref, caller) for dref, caller in (read | left).items()}
    for dref, caller in (read | left).items():
        try:
            orjson.loads(caller)
        except orjson.JSONDecodeError:
            assert dref in ("bad", "unknown")
    # A CONNECT each (the state above is read), then a RELEASE of those read natively (the state the
    # fold wrote is read back).
    records = [note("CONNECT", dref, T0 + 1000 * i) for i, dref in enumerate(read | left)]
    records += [note("RELEASE", dref, T0 + 10_000 + i) for i, dref in enumerate(read)]
    counting, pure = both(records, native, seed=seed)
    assert counting.native == 2 * len(read)
    assert counting.python == len(left)
    updates = pure.values("keyyo.call-updates.v1")
    assert {u["legs"][0]["caller"] for u in updates} == {every, "\x1f/xA", "été", "😀"}


# -- decoding ----------------------------------------------------------------------------------

def _python_decode(key: bytes, value: bytes) -> Notification | str:
    try:
        return CallRecords(native=None).decode(key, value)
    except Exception as exc:  # the reason a record is set aside
        return f"{type(exc).__name__}: {exc}"


def _variants(rng: random.Random, value: bytes, more: bytes = b"") -> list[bytes]:
    """Clumsy and hostile neighbours of a canonical value: bytes replaced, dropped or added."""
    alphabet = b'0123456789abcdefAZaz+-_. :"\\{},nultrTZ\x00\x1f\x7f\xc3\xa9' + more
    out = []
    for _ in range(40):
        i = rng.randrange(len(value))
        c = alphabet[rng.randrange(len(alphabet)):][:1]
        out.append(rng.choice([value[:i] + c + value[i + 1:], value[:i] + value[i + 1:],
                               value[:i] + c + value[i:]]))
    return out


def _with(value: bytes, **fields: Any) -> bytes:
    """``value`` with fields replaced, keeping the edge's layout (orjson keeps the key order)."""
    return orjson.dumps({**orjson.loads(value), **fields})


def test_decoding_gives_python_s_notification_or_leaves_the_value_to_python(native: ModuleType) -> None:
    fold = CallRecords(native=native)._native
    rng = random.Random(5)
    base = [(k, v) for k, v, _ in traffic(5, 14, minimal_every=4)]
    cases = list(base)
    for key, value in base[:300]:
        cases.extend((key, v) for v in _variants(rng, value))
    key, value = base[0]
    edge_cases: list[dict[str, Any]] = [
        {"caller": "anonymous"}, {"caller": ""}, {"callee": "+" + "1" * 63}, {"callee": "1" * 65},
        {"callee": "anonymou"}, {"account": "+"}, {"account": "1" * 64}, {"account": ""},
        {"callref": "x" * 64}, {"callref": "x" * 65}, {"dref": "d" * 32}, {"dref": "d" * 33},
        {"dref": ""}, {"dref": 'a"b\\c'}, {"session_id": "s" * 40}, {"session_id": "s" * 41},
        {"redirecting_number": "+33"}, {"redirecting_number": "33a"}, {"version": 0}, {"version": 9999},
        {"version": 10000}, {"version": -1}, {"is_acd": True}, {"is_acd": 1}, {"type": "SETUPS"},
        {"tenant": "-acme"}, {"tenant": "a" * 64}, {"tenant": "a" * 65}, {"source_ip": " " * 64},
        {"source_ip": ""}, {"source_ip": "é"}, {"event_id": "A" * 32},
        {"event_time": "2024-02-29T23:59:59.999Z"}, {"event_time": "2023-02-29T10:00:00.000Z"},
        {"event_time": "2100-02-29T10:00:00.000Z"}, {"event_time": "2000-02-29T10:00:00.000Z"},
        {"event_time": "1969-12-31T23:59:59.999Z"}, {"event_time": "2199-12-31T23:59:59.999Z"},
        {"event_time": "2200-01-01T00:00:00.000Z"}, {"event_time": "2026-04-31T00:00:00.000Z"},
        {"event_time": "2026-01-01T24:00:00.000Z"}, {"event_time": "2026-01-01T23:59:60.000Z"},
        {"event_time": "2026-00-10T10:00:00.000Z"}, {"event_time": "2026-01-01T10:00:00.000+00:00"},
        {"received_at": "2026-13-45T99:99:99.999Z"}, {"schema": "keyyo.notification.v2"},
    ]
    cases.extend((key, _with(value, **fields)) for fields in edge_cases)
    cases += [(b"other", value), (key, value + b" "), (key, b" " + value), (key, b"")]
    natively = 0
    for key, value in cases:
        expected = _python_decode(key, value)
        got = fold.decode(key, value)
        if got is None:
            continue  # Python decodes it (the case above)
        natively += 1
        assert isinstance(expected, Notification), (value, expected)
        made = got.notification()
        assert made == expected and [type(getattr(made, f)) for f in Notification.__dataclass_fields__] == [
            type(getattr(expected, f)) for f in Notification.__dataclass_fields__], value
        assert got.notification() is made  # made once
        assert all(getattr(got, f) == getattr(made, f) for f in Notification.__dataclass_fields__)
        assert (got.tenant, got.event_ms) == (expected.tenant, parse_rfc3339_ms(expected.event_time))
    assert natively > len(base)  # every canonical value, and some of the neighbours, natively
    assert natively < len(cases) - 5000  # the broken ones left to Python


# -- decoding call records (acd-stats) ---------------------------------------------------------

def _python_call(key: bytes, value: bytes) -> AcdCall | str:
    try:
        return AcdStatsLogic(native=None).decode(key, value)
    except Exception as exc:  # the reason a record is set aside
        return f"{type(exc).__name__}: {exc}"


def _odd_values() -> list[Any]:
    return [None, True, False, 0, -1, 1, 1.5, -0.0, 864_000, 864_001, 864_000.0005, 1e-7, 0.0005, 0.0015,
            2**63, 1_000_000, 1_000_001, "", "x", "+", "anonymous", "é", "a" * 129, "1" * 65, [], {}, [{}],
            "2026-02-29T10:00:00.000Z", "2024-02-29T10:00:00.000Z", "2026-03-01T10:00:00.5Z",
            "2026-03-01T10:00:00Z", "1969-12-31T23:59:59.999Z", "2199-12-31T23:59:59.999Z",
            "2200-01-01T00:00:00.000Z", "answered", "voicemail", "missed", "no_answer", "busy"]


def test_decoding_call_records_gives_python_s_call_or_leaves_the_value_to_python(native: ModuleType) -> None:
    logic = AcdStatsLogic(native=native)
    decode = logic._native_decode
    assert decode is not None
    records = simulated_records(3000, 20, 1.0, 9, T0)
    acd = [r for r in records if b'"is_acd":true' in r[1]]
    plain = [r for r in records if b'"is_acd":false' in r[1]]
    cases = list(records)
    rng = random.Random(6)
    for key, value in acd[:150] + plain[:50]:
        cases.extend((key, v) for v in _variants(rng, value, b"[]eE.0-"))
    for key, value in acd[:3] + plain[:2]:  # every field, and every field of a leg, set to odd values
        rec = orjson.loads(value)
        for name in rec:
            cases.extend((key, orjson.dumps({**rec, name: odd})) for odd in _odd_values())
        first, *others = rec["legs"]
        for name in first:
            cases.extend((key, orjson.dumps({**rec, "legs": [{**first, name: odd}, *others]}))
                         for odd in _odd_values())
        cases.append((key, orjson.dumps({**rec, "legs": rec["legs"] * 342})))  # 1026 legs or more
        cases.append((key, orjson.dumps({k: v for k, v in rec.items() if k != "ended_at"})))
        cases.extend((tenant.encode(), orjson.dumps({**rec, "tenant": tenant}))  # keyed by their tenant
                     for tenant in ("a" * 64, "a" * 65, "-a", "a.b_c-D9", "é"))
    key, value = acd[0]
    text = value.decode()
    extra = [  # members added at the end, as raw JSON
        '"revision":2', '"revision":1.0', '"revision":1E0', '"revision":18446744073709551617', '"x":1e400',
        '"x":1e-400', '"x":00', '"x":-0', '"x":1.', '"x":.5', '"x":' + "[" * 40 + "]" * 40,
        '"x":' + "[" * 20 + "]" * 20, '"x":"\\ud800"', '"x":"tab\tin"', '"x":123456789012345678901',
    ]
    raw_cases = [text[:-1] + "," + member + "}" for member in extra] + [
        json.dumps(orjson.loads(value), indent=2), json.dumps({**orjson.loads(value), "note": "é"}),
        text.replace('"wait_seconds":', '"wait_seconds":1e2,"w":'), text + " ", " " + text, text + "x",
        "\ufeff" + text, "[" + text + "]", text.replace('"tenant":', '"tenant":"other","t":'),
    ]
    cases += [(key, raw.encode()) for raw in raw_cases] + [(key, value + b"\xff"), (b"other", value)]
    natively = 0
    for key, value in cases:
        got = decode(key, value, CALL_RECORD_SCHEMA, AcdCall)
        if got is None:
            continue  # Python decodes it
        natively += 1
        expected = _python_call(key, value)
        assert isinstance(expected, AcdCall) and got == expected, (value, got, expected)
        assert [type(getattr(got, f)) for f in AcdCall.__dataclass_fields__] == [
            type(getattr(expected, f)) for f in AcdCall.__dataclass_fields__], value
    assert all(decode(k, v, CALL_RECORD_SCHEMA, AcdCall) is not None for k, v in records)
    assert natively < len(cases) - 3000  # the broken ones left to Python
    used = []
    counting = SimpleNamespace(Figures=native.Figures, count_call=native.count_call,
                               decode_call_record=lambda *args: used.append(args) or decode(*args))
    assert AcdStatsLogic(native=counting).decode(*acd[0]) == _python_call(*acd[0])
    assert len(used) == 1  # the logic uses it


# -- rendering acd-stats' figures ---------------------------------------------------------------

def _random_interval(rng: random.Random) -> dict[str, Any]:
    """An interval's state with counts, sums, waits and agents of every size, odd lines included."""
    def ms() -> int:
        return rng.choice([0, 1, 5, 999, 1000, 1001, rng.randrange(10**6), rng.randrange(10**10), 10**12 - 1])
    lines = ["33100000001", "+33100000002", "anonymous", "", 'a"b\\c', "é", "\x01", "line\n"]
    return {
        "t": rng.choice(["tenant001", "t"]), "q": rng.choice(["default", "sales", "é"]),
        "iv": T0 - T0 % 900_000,
        "m": rng.choice([15, 30, 60]), "rev": rng.randrange(1, 10**6), "final": rng.random() < 0.5,
        "n": 3, "c": [rng.choice([0, 1, 2, 3, 7, 10**6]) for _ in range(7)], "s": [ms() for _ in range(4)],
        "mx": rng.choice([-1, 0, ms()]),
        "ag": {rng.choice(lines) + str(i): [rng.randrange(5), rng.randrange(3), ms()]
               for i in range(rng.choice([0, 1, 9, 40]))},
    }


def test_figures_are_written_with_orjson_s_bytes_or_left_to_python(native: ModuleType) -> None:
    native_logic, python_logic = AcdStatsLogic(native=native), AcdStatsLogic(native=None)
    records = simulated_records(3000, 20, 1.0, 11, T0)
    store, renders = Store(), []
    for key, value in records:  # the intervals of simulated traffic, each change of each
        call = python_logic.decode(key, value)
        store.advance(call.tenant, call.event_ms)
        store.domain = call.tenant
        renders += [out.value for out in python_logic.on_event(store, call, store.time(call.tenant))]
        store.commit()
    intervals = [r.args for r in renders]
    assert len(intervals) > 500
    rng = random.Random(12)
    tcs = [TenantAcd(service_level_formula=formula, exclude_short_abandons=exclude,
                     service_level_seconds=rng.choice([20, 20.0, 15.5]),
                     short_abandon_seconds=rng.choice([5, 0.5]),
                     timezone=rng.choice(["Europe/Paris", "America/St_Johns", "Asia/Kathmandu"]))
           for formula in SERVICE_LEVEL_FORMULAS for exclude in (True, False)]
    intervals += [(_random_interval(rng), rng.choice(tcs), T0 + rng.randrange(10**9)) for _ in range(3000)]
    odd: list[tuple[str, Any]] = [("rev", True), ("rev", 2**64), ("final", 1), ("mx", None), ("mx", 1.5),
                                  ("c", [1] * 6), ("c", [1.0] * 7), ("s", [2**53] * 4), ("s", [0.5] * 4),
                                  ("ag", {"x": [1, 2]}), ("ag", {"x": [True, 0, 0]}), ("ag", []), ("c", None),
                                  ("ag", {"x": [1, 0, 10**12]}), ("mx", 2**53 + 1), ("c", [2**41] * 7)]
    for tc in tcs:  # exact ties of Python's round: 1/32 = 0.03125 to 4 places, 2.0/32 = 0.0625 to 3
        agg, _, now = intervals[0]
        intervals.append(({**agg, "c": [32, 32, 0, 0, 0, 1, 0], "s": [2000, 2000, 0, 3000]}, tc, now))
    for name, value in odd:  # states of another shape: left to Python (which may raise)
        agg, tc, now = intervals[0]
        intervals.append(({**agg, name: value}, tc, now))
    natively = 0
    for agg, tc, now in intervals:
        try:
            expected: bytes | type = orjson.dumps(python_logic.figures(agg, tc, now))
        except Exception as exc:  # a broken state fails the same way (the message may differ)
            expected = type(exc)
        try:
            got: bytes | type = native_logic._render(agg, tc, now)
        except Exception as exc:
            got = type(exc)
        assert got == expected, (agg, tc)
        head, middle, tail = native_logic._header(agg, tc)[2]
        natively += native_logic._native_figures.render(
            head, agg, now, tc.service_level_formula, tc.exclude_short_abandons, middle, tail) is not None
    assert natively == len(intervals) - len(odd)  # all but the odd states


# -- counting ACD calls ------------------------------------------------------------------------

class CountingAcd:
    """The native module as ``AcdStatsLogic`` uses it, counting the calls it counted natively and
    those it left to Python."""

    def __init__(self, module: ModuleType) -> None:
        self.decode_call_record = module.decode_call_record
        self.Figures = module.Figures
        self._count = module.count_call
        self.native = 0
        self.python = 0

    def count_call(self, *args: Any) -> bytes | None:
        counted: bytes | None = self._count(*args)
        if counted is None:
            self.python += 1
        else:
            self.native += 1
        return counted


def _acd_both(records: list[tuple[bytes, bytes, int]], native: ModuleType,
              seed: dict[str, bytes] | None = None) -> tuple[CountingAcd, Driver]:
    """Every record through a pure and a native acd-stats partition, one transaction each, then
    every interval made final and forgotten: every output and the state equal."""
    counting = CountingAcd(native)
    pure = Driver(AcdStatsLogic(native=None))
    fast = Driver(AcdStatsLogic(native=counting))
    for driver in (pure, fast):
        for key, value in (seed or {}).items():
            driver.store.restore(key, value)
    for i, (key, value, ts) in enumerate(records):
        assert _bytes(fast.send(key, value, ts)) == _bytes(pure.send(key, value, ts)), f"record {i}"
        assert fast.store.committed() == pure.store.committed(), f"record {i}"
    assert _bytes(fast.flush(72 * 3600_000)) == _bytes(pure.flush(72 * 3600_000))
    assert fast.store.committed() == pure.store.committed()
    return counting, pure


def _restated(value: bytes, **fields: Any) -> bytes:
    record = orjson.loads(value)
    record.update(fields)
    return orjson.dumps(record)


def test_acd_calls_are_counted_natively_with_python_s_outputs_and_state(native: ModuleType) -> None:
    """Simulated call records, with restatements (same interval, another queue's number, another
    interval), duplicates, a record too late to count, and intervals already final when their
    first call arrives: the native count gives Python's outputs and state, record by record and
    in transactions of many records."""
    rng = random.Random(14)
    records = [(k, v, parse_rfc3339_ms(orjson.loads(v)["ended_at"]))
               for k, v in simulated_records(3000, 20, 1.0, 13, T0)]
    acd = [(k, v, ts) for k, v, ts in records if b'"is_acd":true' in v]
    extra = []
    for key, value, ts in rng.sample(acd, 60):
        record = orjson.loads(value)
        extra += [
            (key, value, ts + 1),  # a duplicate: already counted
            (key, _restated(value, revision=2, wait_seconds=record["wait_seconds"] + 7.5), ts + 2),
            (key, _restated(value, revision=3, callee="33199999999"), ts + 3),
            (key, _restated(value, revision=4, started_at=rfc3339_ms(ts - 3600_000)), ts + 4),
        ]
    late = orjson.loads(acd[0][1])
    late_ms = parse_rfc3339_ms(late["started_at"])
    extra += [  # a first count in an interval already final, then one closed to restatement
        (acd[0][0], _restated(acd[0][1], record_id="f" * 32, started_at=rfc3339_ms(late_ms - 20 * 60_000)),
         records[-1][2]),
        (acd[0][0], _restated(acd[0][1], record_id="e" * 32, started_at=rfc3339_ms(late_ms - 49 * 3600_000)),
         records[-1][2]),
    ]
    # Waits exactly at the service level and at the short-abandon threshold (20 s and 5 s).
    for i, (key, value, ts) in enumerate(rng.sample(acd, 40)):
        wait = (20.0, 5.0, 20, 5)[i % 4]
        extra.append((key, _restated(value, record_id=f"{i:032x}", wait_seconds=wait), ts))
    # First counts in new intervals whose end + grace the tenant's time has just reached, or not.
    tenant, quarter = orjson.loads(acd[-1][1])["tenant"], (records[-1][2] // 900_000 - 8) * 900_000
    for i, ended in enumerate((quarter + 900_000 + 120_000 - 1, quarter + 2 * 900_000 + 120_000)):
        start = ended - 120_000 - 900_000 + 60_000
        extra.append((tenant.encode(), _restated(
            acd[-1][1], record_id=f"{i + 100:032x}", started_at=rfc3339_ms(start), answered_at=None,
            ended_at=rfc3339_ms(ended), outcome="abandoned", talk_seconds=0.0,
            wait_seconds=(ended - start) / 1000), ended))
    mixed = sorted(records + extra, key=lambda r: r[2])
    counting, pure = _acd_both(mixed, native)
    assert counting.native >= len(acd) * 0.95 and counting.python == 0
    reasons = [v["reason"] for v in pure.values("keyyo.dead-letters.v1")]
    assert any("closed to restatement" in r for r in reasons)

    # Transactions of 50 records: the figures written for an interval are its last state's.
    outputs: dict[bool, list[tuple[str, bytes, bytes]]] = {}
    states, from_stored = {}, 0
    for natively in (False, True):
        logic, store, written = AcdStatsLogic(native=native if natively else None), Store(), []
        pending: list[Output] = []
        for i, (key, value, _) in enumerate(mixed):
            call = logic.decode(key, value)
            store.advance(call.tenant, call.event_ms)
            store.domain = call.tenant
            try:
                pending += logic.on_event(store, call, store.time(call.tenant))
            except Exception as exc:
                pending.append(Output("error", key, type(exc).__name__.encode()))
            if i % 50 == 49 or i == len(mixed) - 1:
                if natively:  # the figures of a native count are written natively from the stored state
                    stored = [o.value for o in pending
                              if getattr(o.value, "func", None) == logic._render_stored]
                    assert all(logic._render_natively(*f.args) is not None for f in stored)
                    from_stored += len(stored)
                written += _bytes(coalesce(pending))
                written += [("staged", k.encode(), v or b"") for k, v in store.staged().items()]
                pending = []
                store.commit()
        outputs[natively], states[natively] = written, store.committed()
    assert outputs[True] == outputs[False] and states[True] == states[False]
    assert from_stored >= len(acd) * 0.9


def test_interval_states_of_another_shape_are_counted_by_python(native: ModuleType) -> None:
    """An interval's state the native count does not expect (members missing, in another order or
    of another type; a longest wait to recompute; another tenant, queue or length; sums at the
    end of an i64) is left to Python before anything is written; an agent whose offered calls
    fall to zero leaves the interval in both."""
    key, value = next((k, v) for k, v in simulated_records(200, 1, 0.2, 15, T0) if b'"is_acd":true' in v)
    record = orjson.loads(value)
    ts = parse_rfc3339_ms(record["ended_at"])
    logic = AcdStatsLogic(native=None)
    call = logic.decode(key, value)
    tc = logic.config.tenant(call.tenant)
    iv = logic.interval_start(call.started_ms, tc)
    akey = f"a/{call.tenant}/default/{iv}"
    base = {"t": call.tenant, "q": "default", "iv": iv, "m": 15, "rev": 3, "final": False, "n": 2,
            "c": [2, 1, 1, 0, 0, 1, 0], "s": [4000, 1000, 3000, 60_000], "mx": 3000,
            "ag": {"33100000001": [2, 1, 60_000]}}
    lines = [leg[0] for leg in call.legs]
    odd: list[tuple[str, dict[str, Any] | bytes, bool]] = [
        ("as written", base, True),
        ("an agent leaves", {**base, "ag": {lines[0]: [-1, 0, 0], "33100000001": [2, 1, 60_000]}}, True),
        ("member missing", {k: v for k, v in base.items() if k != "n"}, False),
        ("members reordered", {"q": base["q"], **base}, False),
        ("extra member", {**base, "x": 1}, False),
        ("wait to recompute", {**base, "mx": None}, False),
        ("float wait", {**base, "mx": 3000.0}, False),
        ("bool count", {**base, "c": [2, 1, 1, 0, 0, 1, True]}, False),
        ("bool final", {**base, "final": 1}, False),
        ("other length", {**base, "m": 30}, False),
        ("other tenant", {**base, "t": "someone"}, False),
        ("sum at the end", {**base, "s": [2**63 - 1, 1000, 3000, 60_000]}, False),
        ("short counts", {**base, "c": [2, 1, 1]}, False),
        ("duplicate agent", orjson.dumps(base)[:-2] + b',"33100000001":[1,0,0]}}', False),
        ("escaped queue", orjson.dumps(base).replace(b'"default"', b'"def\\u0061ult"'), False),
    ]
    for name, state, natively in odd:
        raw = state if isinstance(state, bytes) else orjson.dumps(state)
        counting, _ = _acd_both([(key, value, ts)], native, seed={akey: raw})
        assert (counting.native, counting.python) == ((1, 0) if natively else (0, 1)), name
