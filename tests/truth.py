"""Comparing call records with the simulator's ground truth."""

from __future__ import annotations

from typing import Any

from devtools.simulator import PlannedCall
from schemas.notification import parse_rfc3339_ms, rfc3339_ms


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what depends on arrival order or restatements (id, revision)."""
    return {k: v for k, v in record.items() if k not in ("record_id", "revision")}


Match = frozenset[str] | tuple[str, ...]


def match_key(record: dict[str, Any]) -> Match:
    """What identifies a call across runs: the set of its legs' DREFs; for a call notified
    without DREFs, its tenant, first line, numbers and start."""
    drefs = [leg["dref"] for leg in record["legs"]]
    if all(drefs):
        return frozenset(drefs)
    return (record["tenant"], record["legs"][0]["account"], record["caller"], record["callee"],
            record["started_at"])


def final_records(records: list[dict[str, Any]]) -> dict[Match, dict[str, Any]]:
    """Highest revision per record, keyed by :func:`match_key`."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["record_id"] not in best or r["revision"] > best[r["record_id"]]["revision"]:
            best[r["record_id"]] = r
    return {match_key(r): comparable(r) for r in best.values()}


def expected_records(calls: list[PlannedCall]) -> dict[Match, dict[str, Any]]:
    """The simulator's expected record of each call, keyed like :func:`final_records`."""
    return {match_key(record): record for record in (c.expected() for c in calls)}


def expected_acd_figures(records: list[dict[str, Any]], service_level_s: float = 20.0,
                         short_abandon_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """The ACD figures of records, computed naively from whole records (no increments, no state):
    one entry per ``tenant|default|interval_start`` of 15 minutes. Paris is a whole number of hours
    from UTC, so its quarter-hours are UTC quarter-hours."""
    out: dict[str, dict[str, Any]] = {}
    quarter = 15 * 60_000
    for r in records:
        if not r["is_acd"]:
            continue
        start = parse_rfc3339_ms(r["started_at"]) // quarter * quarter
        f = out.setdefault(f"{r['tenant']}|default|{rfc3339_ms(start)}", {
            "offered": 0, "answered": 0, "abandoned": 0, "voicemail": 0, "short_abandoned": 0,
            "answered_within_sl": 0, "abandoned_within_sl": 0, "waits": [], "talk": 0.0, "agents": {}})
        wait, outcome = r["wait_seconds"], r["outcome"]
        f["offered"] += 1
        f[outcome] += 1
        f["waits"].append(wait)
        if outcome == "answered":
            f["talk"] += r["talk_seconds"]
            f["answered_within_sl"] += wait <= service_level_s
        if outcome == "abandoned":
            f["abandoned_within_sl"] += wait <= service_level_s
            f["short_abandoned"] += wait < short_abandon_s
        for leg in r["legs"]:
            a = f["agents"].setdefault(leg["account"], {"offered": 0, "answered": 0, "talk": 0.0})
            a["offered"] += 1
            picked_up = leg["connect_at"] is not None and not (
                outcome == "voicemail" and leg["connect_at"] == r["answered_at"])
            if picked_up:
                a["answered"] += 1
                talk_ms = parse_rfc3339_ms(leg["release_at"]) - parse_rfc3339_ms(leg["connect_at"])
                a["talk"] += talk_ms / 1000
    return {key: {
        **{k: v for k, v in f.items() if k not in ("waits", "talk", "agents")},
        "max_wait_seconds": max(f["waits"]), "wait_seconds": round(sum(f["waits"]), 3),
        "talk_seconds": round(f["talk"], 3),
        "agents": [{"line": line, "offered": a["offered"], "answered": a["answered"],
                    "missed": a["offered"] - a["answered"], "talk_seconds": round(a["talk"], 3)}
                   for line, a in sorted(f["agents"].items())],
    } for key, f in out.items()}


def comparable_figures(value: dict[str, Any]) -> dict[str, Any]:
    """The fields of an acd-stats value that :func:`expected_acd_figures` computes."""
    keys = ("offered", "answered", "abandoned", "voicemail", "short_abandoned", "answered_within_sl",
            "abandoned_within_sl", "max_wait_seconds", "wait_seconds", "talk_seconds")
    return {**{k: value[k] for k in keys},
            "agents": [{**a, "talk_seconds": round(a["talk_seconds"], 3)} for a in value["agents"]]}
