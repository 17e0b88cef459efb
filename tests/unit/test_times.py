"""RFC 3339 times: the short path of a known second equals the datetime parse, rendering round-trips."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from schemas.notification import canonical_time_ms, parse_rfc3339_ms, rfc3339_ms


def by_datetime(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000 + 0.5)


def test_times_round_trip_and_equal_the_datetime_parse() -> None:
    rng = random.Random(5)
    for ms in [0, 999, 86_399_999, 86_400_000, 1_795_000_000_123] + [
            rng.randrange(0, 7_258_118_400_000) for _ in range(20_000)]:
        text = rfc3339_ms(ms)
        second = datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert text == f"{second}.{ms % 1000:03d}Z"
        assert parse_rfc3339_ms(text) == ms == by_datetime(text)
        assert parse_rfc3339_ms(text) == ms  # again: the second is known now


@pytest.mark.parametrize("text", [
    "2026-11-18T24:00:00.000Z", "2026-11-18T23:60:00.000Z", "2026-11-18T23:59:60.000Z",
    "2026-11-18T2a:00:00.000Z", "2026-11-18T\u0661\u0662:00:00.000Z", "2026-02-30T00:00:00.000Z",
])
def test_a_wrong_time_on_a_known_day_is_refused(text: str) -> None:
    parse_rfc3339_ms("2026-11-18T00:00:00.000Z")  # a second of that day is known
    with pytest.raises(ValueError):
        parse_rfc3339_ms(text)


def test_a_second_seen_before_takes_the_short_path_with_the_same_result() -> None:
    rng = random.Random(7)
    for ms in [rng.randrange(0, 7_258_118_400_000) for _ in range(5_000)]:
        text = rfc3339_ms(ms)
        parse_rfc3339_ms(text)  # the second is known from now on
        other = ms - ms % 1000 + rng.randrange(1000)  # another time in that second
        assert canonical_time_ms(rfc3339_ms(other)) == other == by_datetime(rfc3339_ms(other))


@pytest.mark.parametrize(("text", "valid"), [
    ("2026-11-18T10:00:00.0a0Z", False), ("2026-11-18T10:00:00.\u0661\u0662\u0663Z", False),
    ("2026-11-18T10:00:00.000+", False), ("2026-11-18T10:00:00.12Z", True),
    ("2026-11-18T10:00:00,000Z", True), ("2026-11-18T10:00:00.0000Z", True),
])
def test_a_second_known_lets_no_other_layout_take_the_short_path(text: str, valid: bool) -> None:
    parse_rfc3339_ms("2026-11-18T10:00:00.000Z")  # the second is known
    assert canonical_time_ms(text) is None
    if valid:  # ISO 8601 allows it: the full parse takes it
        assert parse_rfc3339_ms(text) == by_datetime(text)
    else:
        with pytest.raises(ValueError):
            parse_rfc3339_ms(text)


def test_only_times_of_the_strict_layout_are_remembered() -> None:
    week_date = "2026-W48-1T10:00:00.000Z"  # ISO 8601 allows it; RFC 3339 and the contracts do not
    assert parse_rfc3339_ms(week_date) == by_datetime(week_date)
    assert canonical_time_ms(week_date) is None
