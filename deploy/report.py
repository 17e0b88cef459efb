"""``keyyo-stream report acd``: a tenant's contact-centre figures per interval, with a total line.

Reads ``keyyo.acd-stats.v1`` from the beginning (committed records only) up to its current end,
keeps the latest revision of each (queue, interval), regroups into longer intervals when asked,
and prints them. Every row and the total are recomputed from counts and sums
(:func:`schemas.acd_stats.derived`), never by averaging averages.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from aiokafka import AIOKafkaConsumer

from deploy.tail import topic_partitions
from schemas.acd_stats import ACD_STATS_SCHEMA, COUNTS, SUMS, derived, interval_start
from schemas.notification import parse_rfc3339_ms, rfc3339_ms
from schemas.topics import ACD_STATS


class ReportError(Exception):
    """A mistake in the request or a topic that cannot be read; one line for the user."""


@dataclass
class Period:
    """What to report: tenant, queue (None: all queues together), [start, end) in UTC ms."""

    tenant: str
    queue: str | None
    start_ms: int
    end_ms: int
    zone: ZoneInfo


def parse_when(text: str, zone: ZoneInfo, end: bool) -> int:
    """``YYYY-MM-DD`` (a local day: ``--to`` includes it) or ``YYYY-MM-DDTHH:MM`` (local time)."""
    try:
        if "T" not in text and " " not in text:
            day = date.fromisoformat(text)
            local = datetime(day.year, day.month, day.day, tzinfo=zone)
            if end:
                local = datetime.combine(day + timedelta(days=1), local.time(), tzinfo=zone)
            return int(local.timestamp() * 1000)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{text!r}: expected a date YYYY-MM-DD or a local time YYYY-MM-DDTHH:MM") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return int(moment.timestamp() * 1000)


def zone_of(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ReportError(f"--timezone: unknown time zone {name!r}") from None


async def read_latest(bootstrap: str, topic: str, tenant: str, progress: bool = True) -> list[dict[str, Any]]:
    """The latest revision of each of ``tenant``'s intervals on the topic, oldest first."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    try:
        await consumer.start()
    except Exception as exc:
        raise ReportError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
    latest: dict[bytes, dict[str, Any]] = {}
    prefix = f"{tenant}|".encode()
    try:
        tps = await topic_partitions(consumer, topic)
        if not tps:
            raise ReportError(f"topic {topic} does not exist (keyyo-stream topics create)")
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        read, last_note = 0, time.monotonic()
        while True:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                break
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    read += 1
                    if r.key is None or not r.key.startswith(prefix) or r.value is None:
                        continue
                    value = orjson.loads(r.value)
                    old = latest.get(r.key)
                    if value.get("schema") == ACD_STATS_SCHEMA and (
                            old is None or value["revision"] > old["revision"]):
                        latest[r.key] = value
            if progress and time.monotonic() - last_note > 2:
                last_note = time.monotonic()
                total = sum(ends.values())
                print(f"read {read} of about {total} records...", file=sys.stderr, flush=True)
    finally:
        await consumer.stop()
    return sorted(latest.values(), key=lambda v: (v["interval_start"], v["queue"]))


def _add(into: dict[str, Any], f: dict[str, Any]) -> None:
    for name in (*COUNTS, *SUMS):
        into[name] = into.get(name, 0) + f[name]
    waits = [w for w in (into.get("max_wait_seconds"), f["max_wait_seconds"]) if w is not None]
    into["max_wait_seconds"] = max(waits) if waits else None
    into["final"] = into.get("final", True) and f["final"]
    agents = into.setdefault("agents", {})
    for a in f["agents"]:
        mine = agents.setdefault(a["line"], {"offered": 0, "answered": 0, "missed": 0, "talk_seconds": 0.0})
        for name in ("offered", "answered", "missed", "talk_seconds"):
            mine[name] += a[name]


def _finish(row: dict[str, Any], formula: str, excluded: bool) -> dict[str, Any]:
    for name in SUMS:
        row[name] = round(row[name], 3)
    row["service_level_formula"] = formula
    row["short_abandons_excluded"] = excluded
    row.update(derived(row))
    return row


def build_rows(figures: Iterable[dict[str, Any]], period: Period,
               minutes: int | None) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Rows per interval (regrouped into ``minutes`` when given), the total, and notes."""
    chosen = [f for f in figures
              if (period.queue is None or f["queue"] == period.queue)
              and period.start_ms <= parse_rfc3339_ms(f["interval_start"]) < period.end_ms]
    notes: list[str] = []
    if not chosen:
        return [], {}, notes
    stored = {f["interval_minutes"] for f in chosen}
    if minutes is not None and any(minutes % m for m in stored):
        kept = "/".join(map(str, sorted(stored)))
        raise ReportError(f"--interval {minutes}: the figures are kept per {kept} minutes and can only "
                          "be added up into multiples of that")
    formulas = {(f["service_level_formula"], f["short_abandons_excluded"]) for f in chosen}
    formula, excluded = sorted(formulas)[0]
    if len(formulas) > 1:
        notes.append(f"the intervals used several service-level settings; recomputed with {formula}")
    queues = sorted({f["queue"] for f in chosen})
    if period.queue is None and len(queues) > 1:
        notes.append(f"queues added together: {', '.join(queues)}")
    groups: dict[int, dict[str, Any]] = {}
    total: dict[str, Any] = {}
    for f in chosen:
        start = parse_rfc3339_ms(f["interval_start"])
        width = minutes or f["interval_minutes"]
        if minutes is not None:
            start = interval_start(start, period.zone, minutes)
        row = groups.setdefault(start, {"interval_start": rfc3339_ms(start), "interval_minutes": width})
        _add(row, f)
        _add(total, f)
    rows = []
    for start in sorted(groups):
        row = _finish(groups[start], formula, excluded)
        row["local_start"] = datetime.fromtimestamp(start / 1000, UTC).astimezone(period.zone).isoformat()
        rows.append(row)
    total = _finish(total, formula, excluded)
    total["interval_start"] = "total"
    return rows, total, notes


_COLUMNS = (("local_start", "interval (local)", 25), ("offered", "offered", 7), ("answered", "answ", 5),
            ("abandoned", "aband", 5), ("voicemail", "vmail", 5), ("short_abandoned", "short", 5),
            ("service_level", "SL", 5), ("asa_seconds", "ASA s", 6), ("avg_wait_seconds", "wait s", 6),
            ("max_wait_seconds", "max s", 6), ("avg_abandon_seconds", "aband s", 7),
            ("avg_talk_seconds", "talk s", 6), ("final", "final", 5))


def _cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "service_level":
        return f"{value:.0%}"
    if name == "final":
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def render(rows: list[dict[str, Any]], total: dict[str, Any], fmt: str, agents: bool) -> str:
    """The report as a table, CSV or JSON."""
    if fmt == "json":
        def plain(r: dict[str, Any]) -> dict[str, Any]:
            return {**r, "agents": [{"line": k, **v} for k, v in sorted(r.get("agents", {}).items())]}
        return orjson.dumps({"intervals": [plain(r) for r in rows], "total": plain(total)},
                            option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        out = io.StringIO()
        names = ["interval_start", "local_start", "interval_minutes", *COUNTS, "service_level",
                 "asa_seconds", "avg_wait_seconds", "max_wait_seconds", "avg_abandon_seconds",
                 "avg_talk_seconds", *SUMS, "final"]
        writer = csv.DictWriter(out, names, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in [*rows, {**total, "local_start": "total"}]:
            writer.writerow({k: str(v).lower() if isinstance(v, bool) else v for k, v in r.items()})
        return out.getvalue().rstrip("\n")
    lines = ["  ".join(title.rjust(width) if i else title.ljust(width)
                       for i, (_, title, width) in enumerate(_COLUMNS))]
    printed: list[dict[str, Any] | None] = [*rows, None, {**total, "local_start": "total"}]
    for row in printed:
        if row is None:
            lines.append("-" * len(lines[0]))
            continue
        lines.append("  ".join(_cell(name, row.get(name)).rjust(width) if i else
                               _cell(name, row.get(name)).ljust(width)
                               for i, (name, _, width) in enumerate(_COLUMNS)))
    if agents and total.get("agents"):
        lines += ["", f"{'agent line':<16}{'offered':>9}{'answered':>10}{'missed':>8}{'talk s':>10}"]
        for line, a in sorted(total["agents"].items()):
            lines.append(f"{line:<16}{a['offered']:>9}{a['answered']:>10}{a['missed']:>8}"
                         f"{a['talk_seconds']:>10.1f}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], title: str, path: str) -> None:
    """Offered, answered and abandoned per interval as bars, the service level as a line."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--plot needs matplotlib: pip install 'keyyo-stream[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["local_start"][11:16] if len(rows) <= 96 else r["local_start"][5:16] for r in rows]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(8.0, len(rows) * 0.45), 4.8))
    width = 0.27
    for i, (name, colour) in enumerate((("offered", "#4c72b0"), ("answered", "#55a868"),
                                        ("abandoned", "#c44e52"))):
        ax.bar([v + (i - 1) * width for v in x], [r[name] for r in rows], width, label=name, color=colour)
    ax.set_ylabel("calls")
    ax.set_xticks(x, labels, rotation=60, fontsize=8)
    line_ax = ax.twinx()
    line_ax.plot(x, [r["service_level"] * 100 if r["service_level"] is not None else float("nan")
                     for r in rows], color="#222222", marker="o", label="service level")
    line_ax.set_ylim(0, 105)
    line_ax.set_ylabel("service level %")
    bars, bar_labels = ax.get_legend_handles_labels()
    lines, line_labels = line_ax.get_legend_handles_labels()
    ax.legend(bars + lines, bar_labels + line_labels, loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def report(bootstrap: str, prefix: str, tenant: str, queue: str | None, start: str | None,
                 end: str | None, minutes: int | None, fmt: str, timezone: str | None,
                 plot_path: str | None, agents: bool) -> tuple[str, list[str]]:
    """The rendered report and its notes (``ReportError`` for anything the user must fix)."""
    figures = await read_latest(bootstrap, ACD_STATS.full_name(prefix), tenant)
    zone = zone_of(timezone or (figures[0]["timezone"] if figures else "Europe/Paris"))
    today = datetime.now(zone).date().isoformat()
    period = Period(tenant, queue, parse_when(start or today, zone, end=False),
                    parse_when(end or start or today, zone, end=True), zone)
    if period.end_ms <= period.start_ms:
        raise ReportError("--to is before --from")
    rows, total, notes = build_rows(figures, period, minutes)
    if not rows:
        raise ReportError(f"no figures for tenant {tenant!r}"
                          f"{f' queue {queue!r}' if queue else ''} between "
                          f"{rfc3339_ms(period.start_ms)} and {rfc3339_ms(period.end_ms)}")
    if plot_path:
        plot(rows, f"{tenant} {queue or 'all queues'}: {rows[0]['local_start'][:16]} to "
                   f"{rows[-1]['local_start'][:16]} ({zone.key})", plot_path)
        notes.append(f"plot written to {plot_path}")
    return render(rows, total, fmt, agents), notes
