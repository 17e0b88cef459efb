"""RFC 3339 times: the fast parse of a known day equals the datetime parse, rendering round-trips."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from schemas.notification import parse_rfc3339_ms, rfc3339_ms


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
        assert parse_rfc3339_ms(text) == ms  # again: the day is known now


@pytest.mark.parametrize("text", [
    "2026-11-18T24:00:00.000Z", "2026-11-18T23:60:00.000Z", "2026-11-18T23:59:60.000Z",
    "2026-11-18T2a:00:00.000Z", "2026-11-18T\u0661\u0662:00:00.000Z", "2026-02-30T00:00:00.000Z",
])
def test_a_day_known_does_not_let_a_wrong_time_through(text: str) -> None:
    parse_rfc3339_ms("2026-11-18T00:00:00.000Z")  # the day is known
    with pytest.raises(ValueError):
        parse_rfc3339_ms(text)
