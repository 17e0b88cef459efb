"""The acd-stats configuration (TOML, ``--config``): defaults under ``[acd]``, per-tenant overrides
and queues under ``[acd.tenants.<id>]``. Every mistake is one clear line (:class:`AcdConfigError`).

    [acd]
    interval_minutes = 15            # 15, 30 or 60, aligned in the tenant's time zone
    timezone = "Europe/Paris"
    service_level_seconds = 20
    short_abandon_seconds = 5        # must not exceed service_level_seconds
    service_level_formula = "abandons_against"
    exclude_short_abandons = true
    grace_seconds = 120
    restate_hours = 48

    [acd.tenants.acme]
    timezone = "Europe/London"
    [[acd.tenants.acme.queues]]
    name = "sales"
    numbers = ["33100000001"]        # the record's callee or redirecting number
    agents = ["33100000011", "33100000012"]   # agent lines rung
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.acd_stats import SERVICE_LEVEL_FORMULAS
from schemas.notification import LINE_NUMBER, TENANT_ID

DEFAULT_QUEUE = "default"
_QUEUE_NAME = TENANT_ID  # queue names follow the rules of tenant ids (they share record keys)


class AcdConfigError(ValueError):
    """A configuration mistake; the message names the entry and what is wrong."""


@dataclass(frozen=True)
class Queue:
    """A named queue: the ACD calls to one of its numbers, or ringing one of its agents."""

    name: str
    numbers: frozenset[str] = frozenset()
    agents: frozenset[str] = frozenset()


@dataclass(frozen=True)
class TenantAcd:
    """The settings one tenant's figures are computed with."""

    interval_minutes: int = 15
    timezone: str = "Europe/Paris"
    service_level_seconds: float = 20.0
    short_abandon_seconds: float = 5.0
    service_level_formula: str = "abandons_against"
    exclude_short_abandons: bool = True
    grace_seconds: float = 120.0
    restate_hours: float = 48.0
    queues: tuple[Queue, ...] = ()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def interval_ms(self) -> int:
        return self.interval_minutes * 60_000

    @property
    def grace_ms(self) -> int:
        return int(self.grace_seconds * 1000)

    @property
    def restate_ms(self) -> int:
        return int(self.restate_hours * 3600_000)

    def queue_of(self, callee: str, redirecting: str | None, agent_lines: list[str]) -> str:
        """The queue of an ACD call: the first queue (in file order) holding the call's callee or
        redirecting number; else the first queue holding the line of the earliest leg rung that
        any queue lists as an agent; else ``default``."""
        if not self.queues:
            return DEFAULT_QUEUE
        for q in self.queues:
            if callee in q.numbers or (redirecting is not None and redirecting in q.numbers):
                return q.name
        for line in agent_lines:
            for q in self.queues:
                if line in q.agents:
                    return q.name
        return DEFAULT_QUEUE


@dataclass(frozen=True)
class AcdConfig:
    """Defaults and per-tenant settings."""

    defaults: TenantAcd = field(default_factory=TenantAcd)
    tenants: Mapping[str, TenantAcd] = field(default_factory=dict)

    def tenant(self, tenant: str) -> TenantAcd:
        return self.tenants.get(tenant, self.defaults)


_SCALARS: dict[str, type | tuple[type, ...]] = {
    "interval_minutes": int, "timezone": str, "service_level_seconds": (int, float),
    "short_abandon_seconds": (int, float), "service_level_formula": str,
    "exclude_short_abandons": bool, "grace_seconds": (int, float), "restate_hours": (int, float),
}


def _settings(table: Mapping[str, Any], base: TenantAcd, where: str, allow_queues: bool) -> TenantAcd:
    changes: dict[str, Any] = {}
    for name, value in table.items():
        if name in ("tenants", "queues"):
            continue
        kind = _SCALARS.get(name)
        if kind is None:
            raise AcdConfigError(f"{where}.{name}: unknown setting (known: {', '.join(_SCALARS)})")
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise AcdConfigError(f"{where}.{name}: {value!r} has the wrong type")
        changes[name] = float(table[name]) if name.endswith(("_seconds", "_hours")) else value
    s = replace(base, **changes)
    if s.interval_minutes not in (15, 30, 60):
        raise AcdConfigError(f"{where}.interval_minutes: {s.interval_minutes} is not 15, 30 or 60")
    try:
        s.zone  # noqa: B018 - validates the name
    except (ZoneInfoNotFoundError, ValueError):
        raise AcdConfigError(f"{where}.timezone: unknown time zone {s.timezone!r}") from None
    if s.service_level_formula not in SERVICE_LEVEL_FORMULAS:
        raise AcdConfigError(f"{where}.service_level_formula: {s.service_level_formula!r} is not one "
                             f"of {', '.join(SERVICE_LEVEL_FORMULAS)}")
    for name in ("service_level_seconds", "short_abandon_seconds", "grace_seconds", "restate_hours"):
        if getattr(s, name) < 0:
            raise AcdConfigError(f"{where}.{name}: must not be negative")
    if s.short_abandon_seconds > s.service_level_seconds:
        raise AcdConfigError(f"{where}.short_abandon_seconds: {s.short_abandon_seconds:g} exceeds "
                             f"service_level_seconds {s.service_level_seconds:g}")
    if "queues" in table:
        if not allow_queues:
            raise AcdConfigError(f"{where}.queues: queues are per tenant, under [acd.tenants.<id>]")
        s = replace(s, queues=_queues(table["queues"], where))
    return s


def _queues(raw: Any, where: str) -> tuple[Queue, ...]:
    if not isinstance(raw, list):
        raise AcdConfigError(f"{where}.queues: expected [[...queues]] tables")
    queues: list[Queue] = []
    for i, q in enumerate(raw):
        at = f"{where}.queues[{i}]"
        if not isinstance(q, dict):
            raise AcdConfigError(f"{at}: expected a table")
        unknown = set(q) - {"name", "numbers", "agents"}
        if unknown:
            raise AcdConfigError(f"{at}.{sorted(unknown)[0]}: unknown setting (known: name, numbers, agents)")
        name = q.get("name")
        if not isinstance(name, str) or not _QUEUE_NAME.fullmatch(name):
            raise AcdConfigError(f"{at}.name: {name!r} is not a queue name (letters, digits, _ . -)")
        if name in (x.name for x in queues) or name == DEFAULT_QUEUE:
            raise AcdConfigError(f"{at}.name: {name!r} is used twice (or is the reserved 'default')")
        lists = {}
        for key in ("numbers", "agents"):
            values = q.get(key, [])
            if not isinstance(values, list) or not all(
                    isinstance(v, str) and LINE_NUMBER.fullmatch(v) for v in values):
                raise AcdConfigError(f"{at}.{key}: expected a list of line numbers like \"33123456789\"")
            lists[key] = frozenset(values)
        if not lists["numbers"] and not lists["agents"]:
            raise AcdConfigError(f"{at}: give numbers or agents, or the queue can never match")
        queues.append(Queue(name, lists["numbers"], lists["agents"]))
    return tuple(queues)


def parse_acd_config(doc: Mapping[str, Any]) -> AcdConfig:
    """The configuration of a parsed TOML document (other top-level tables are ignored)."""
    acd = doc.get("acd", {})
    if not isinstance(acd, dict):
        raise AcdConfigError("acd: expected a table [acd]")
    defaults = _settings(acd, TenantAcd(), "acd", allow_queues=False)
    tenants_raw = acd.get("tenants", {})
    if not isinstance(tenants_raw, dict):
        raise AcdConfigError("acd.tenants: expected [acd.tenants.<id>] tables")
    tenants: dict[str, TenantAcd] = {}
    for tenant, table in tenants_raw.items():
        if not isinstance(table, dict):
            raise AcdConfigError(f"acd.tenants.{tenant}: expected a table")
        tenants[tenant] = _settings(table, defaults, f"acd.tenants.{tenant}", allow_queues=True)
    return AcdConfig(defaults, tenants)


def load_acd_config(path: str | Path | None) -> AcdConfig:
    """The configuration in ``path`` (all defaults when None)."""
    if path is None:
        return AcdConfig()
    try:
        with Path(path).open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise AcdConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise AcdConfigError(f"{path}: not valid TOML ({exc})") from None
    return parse_acd_config(doc)
