"""Comparing call records with the simulator's ground truth."""

from __future__ import annotations

from typing import Any

from devtools.simulator import PlannedCall


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what depends on arrival order or restatements (id, revision)."""
    return {k: v for k, v in record.items() if k not in ("record_id", "revision")}


def final_records(records: list[dict[str, Any]]) -> dict[frozenset[str], dict[str, Any]]:
    """Highest revision per record, keyed by the set of its legs' DREFs."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["record_id"] not in best or r["revision"] > best[r["record_id"]]["revision"]:
            best[r["record_id"]] = r
    return {frozenset(leg["dref"] for leg in r["legs"]): comparable(r) for r in best.values()}


def expected_records(calls: list[PlannedCall]) -> dict[frozenset[str], dict[str, Any]]:
    """The simulator's expected record of each call, keyed like :func:`final_records`."""
    return {frozenset(leg.dref for leg in c.legs): c.expected() for c in calls}
