"""``report acd`` without a broker: regrouping, totals from counts and sums, the three formats, the plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from deploy.report import Period, ReportError, build_rows, parse_when, plot, render
from tests.unit.test_acd_stats import MIN, NINE, A, B, acd, records_of, stats

PARIS = ZoneInfo("Europe/Paris")


def figures() -> list[dict]:  # type: ignore[type-arg]
    flows = [
        acd(NINE + 1 * MIN).rings(A).answers(A, after=10).hangs_up(after=100),   # 09:00 answered, 10 s
        acd(NINE + 16 * MIN).rings(A).answers(A, after=30).hangs_up(after=20),  # 09:15 answered, 30 s
        acd(NINE + 17 * MIN).rings(B).answers(B, after=2).hangs_up(after=40),   # 09:15 answered, 2 s
        acd(NINE + 31 * MIN).rings(B).hangs_up(after=12),                       # 09:30 abandoned, 12 s
    ]
    return list(stats(records_of(*flows))[1].values())


def period(start: str = "2026-11-18", end: str = "2026-11-18") -> Period:
    return Period("acme", None, parse_when(start, PARIS, False), parse_when(end, PARIS, True), PARIS)


def test_rows_and_a_total_recomputed_from_counts_and_sums() -> None:
    rows, total, _ = build_rows(figures(), period(), None)
    assert [(r["local_start"][11:16], r["offered"], r["asa_seconds"]) for r in rows] == [
        ("10:00", 1, 10.0), ("10:15", 2, 16.0), ("10:30", 1, None)]
    # ASA of the total: (10 + 30 + 2) / 3 = 14, not the mean of 10 and 16
    assert (total["offered"], total["answered"], total["abandoned"], total["asa_seconds"]) == (4, 3, 1, 14.0)
    # 2 answered within 20 s of 3, one abandon after 12 s counts against: 2 / 4
    assert total["service_level"] == 0.5 and total["max_wait_seconds"] == 30.0
    assert total["agents"][A] == {"offered": 2, "answered": 2, "missed": 0, "talk_seconds": 120.0}


def test_regrouping_into_hours_and_the_period_bounds() -> None:
    rows, _, _ = build_rows(figures(), period(), 60)
    assert [(r["local_start"], r["interval_minutes"], r["offered"], r["asa_seconds"]) for r in rows] == [
        ("2026-11-18T10:00:00+01:00", 60, 4, 14.0)]
    rows, _, _ = build_rows(figures(), period("2026-11-18T10:15", "2026-11-18T10:30"), None)
    assert [r["local_start"][11:16] for r in rows] == ["10:15"]
    assert build_rows(figures(), period("2026-11-19", "2026-11-19"), None)[0] == []


def test_formats_and_plot(tmp_path: Path) -> None:
    rows, total, _ = build_rows(figures(), period(), None)
    table = render(rows, total, "table", agents=True)
    assert table.splitlines()[0].startswith("interval (local)")
    assert any(line.startswith("total") for line in table.splitlines())
    assert "33100000001" in table
    parsed = list(csv.DictReader(io.StringIO(render(rows, total, "csv", agents=False))))
    assert [r["offered"] for r in parsed] == ["1", "2", "1", "4"] and parsed[-1]["local_start"] == "total"
    doc = orjson.loads(render(rows, total, "json", agents=False))
    assert len(doc["intervals"]) == 3 and doc["total"]["service_level"] == 0.5
    png = tmp_path / "acd.png"
    plot(rows, "acme", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_user_mistakes_are_one_line() -> None:
    with pytest.raises(ReportError, match="expected a date"):
        parse_when("18/11/2026", PARIS, False)
    with pytest.raises(ReportError, match="multiples"):
        build_rows([{**f, "interval_minutes": 60} for f in figures()], period(), 30)


def test_tail_prints_acd_figures_on_one_line() -> None:
    from deploy.tail import render as tail_line

    line = tail_line(figures()[0])
    assert line.startswith("2026-11-18T10:00:00+01:00 acme") and "offered=1" in line
    assert "sl=100%" in line and "rev=" in line and "\n" not in line
