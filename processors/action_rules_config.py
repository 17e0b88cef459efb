"""The action-rules processor's settings: per-tenant rules and schedules, from TOML (README,
*Outbound actions*). Pure: parsing and checking only."""

from __future__ import annotations

import hashlib
import string
import tomllib
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.actions import ACCOUNT, MAX_MESSAGE, MAX_NAME, PROFILE, normalise_phone
from schemas.notification import TENANT_ID

OUTCOMES = ("missed", "abandoned", "voicemail", "no_answer", "answered")
RULE_ACTIONS = ("sms", "call", "connect")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TEMPLATE_FIELDS = {"caller": "33612345678" + "9" * 9, "callee": "33123456789" + "9" * 9,
                   "line": "33123456789" + "9" * 9, "time": "23:59", "date": "31/12"}
"""Fields a message may use, with their longest values (to check the rendered length)."""


class RulesError(ValueError):
    """The rules file is invalid; the message says where."""


@dataclass(frozen=True)
class Rule:
    """Turns matching call records into one action each."""

    name: str
    when: frozenset[str]
    """Record outcomes that trigger it."""
    action: str
    """``sms``, ``call`` or ``connect``."""
    message: str | None = None
    from_line: str | None = None
    """The line that acts (default: the line that was called)."""
    agent: str | None = None
    """``connect``: the line called first, then put through to the caller; ``call``: the line
    that rings first (default: the line that was called)."""
    callee_name: str | None = None
    lines: frozenset[str] | None = None
    """Only calls to these lines (default: all)."""
    delay_ms: int = 0
    """Wait this long after the call ended; a callback or an answered call from the caller
    meanwhile cancels the action."""
    expires_ms: int = 2 * 3600_000
    """The action is never sent later than this after the call ended (or the end of quiet hours)."""
    sms_to_landlines: bool = False
    """Text numbers that do not look like mobiles too."""
    directions: frozenset[str] = frozenset({"inbound"})

    def render(self, values: dict[str, str]) -> str:
        """The message with the call's fields."""
        return (self.message or "").format_map(values)


@dataclass(frozen=True)
class Schedule:
    """Switch a line to a profile at a local time on given days."""

    name: str
    line: str
    profile: str
    at: time
    days: frozenset[int]
    """Weekdays, Monday = 0."""
    expires_ms: int = 3600_000
    """A switch not made within this of its time (the processor was down) is reported expired."""

    @property
    def signature(self) -> str:
        """Names its timer: a changed schedule gets a new one, an old one's timer finds nothing."""
        text = f"{self.name}|{self.line}|{self.profile}|{self.at}|{sorted(self.days)}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TenantRules:
    """One tenant's rules, schedules and safeguards."""

    timezone: str = "Europe/Paris"
    rules: tuple[Rule, ...] = ()
    schedules: tuple[Schedule, ...] = ()
    quiet_hours: tuple[time, time] | None = None
    """Local [start, end): rule actions are deferred to the end, or dropped."""
    quiet: str = "defer"
    max_actions_per_hour: int = 100
    """Rule actions per hour of stream time past which the rest are suppressed."""
    mobile_prefixes: tuple[str, ...] = ("336", "337")
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("Europe/Paris"), compare=False)


@dataclass(frozen=True)
class RulesConfig:
    """Every tenant's rules; a tenant without an entry has none."""

    tenants: dict[str, TenantRules] = field(default_factory=dict)


def _time(where: str, value: Any) -> time:
    try:
        hh, mm = str(value).split(":")
        return time(int(hh), int(mm))
    except ValueError:
        raise RulesError(f"{where}: expected a local time HH:MM, got {value!r}") from None


def _line(where: str, value: Any) -> str:
    if not isinstance(value, str) or not ACCOUNT.fullmatch(value):
        raise RulesError(f"{where}: expected a Keyyo line number (international digits), got {value!r}")
    return value


def _seconds(where: str, value: Any, default: float) -> int:
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 7 * 86400:
        raise RulesError(f"{where}: expected seconds between 0 and 604800, got {value!r}")
    return int(value * 1000)


def _check_template(where: str, message: Any) -> str:
    if not isinstance(message, str) or not message:
        raise RulesError(f"{where}.message: required for an sms rule")
    try:
        parts = list(string.Formatter().parse(message))
    except ValueError as exc:
        raise RulesError(f"{where}.message: {exc} (write {{{{ and }}}} for braces)") from None
    for _, name, spec, conversion in parts:
        if name is not None and (name not in TEMPLATE_FIELDS or spec or conversion):
            raise RulesError(f"{where}.message: unknown field {{{name}}} (use "
                             f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})")
    longest = message.format_map(TEMPLATE_FIELDS)
    if len(longest) > MAX_MESSAGE:
        raise RulesError(f"{where}.message: may render to {len(longest)} characters, more than "
                         f"{MAX_MESSAGE}")
    return message


_RULE_KEYS = {"name", "when", "action", "message", "from", "agent", "callee_name", "lines", "delay",
              "expires", "sms_to_landlines", "directions"}


def _rule(where: str, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: expected a table")
    if unknown := set(raw) - _RULE_KEYS:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not PROFILE.fullmatch(name):
        raise RulesError(f"{where}.name: required, 1 to 64 characters")
    where = f"{where} ({name})"
    when = raw.get("when")
    if not isinstance(when, list) or not when or any(w not in OUTCOMES for w in when):
        raise RulesError(f"{where}.when: a list of record outcomes among {', '.join(OUTCOMES)}")
    action = raw.get("action")
    if action not in RULE_ACTIONS:
        raise RulesError(f"{where}.action: one of {', '.join(RULE_ACTIONS)}")
    message = _check_template(where, raw.get("message")) if action == "sms" else None
    if action != "sms" and "message" in raw:
        raise RulesError(f"{where}.message: only for an sms rule")
    agent = _line(f"{where}.agent", raw["agent"]) if "agent" in raw else None
    if action == "connect" and agent is None:
        raise RulesError(f"{where}.agent: required for a connect rule (the line called first)")
    callee_name = raw.get("callee_name")
    if callee_name is not None and (not isinstance(callee_name, str) or len(callee_name) > MAX_NAME):
        raise RulesError(f"{where}.callee_name: a string of at most {MAX_NAME} characters")
    lines = raw.get("lines")
    if lines is not None:
        if not isinstance(lines, list):
            raise RulesError(f"{where}.lines: a list of line numbers")
        lines = frozenset(_line(f"{where}.lines", x) for x in lines)
    directions = raw.get("directions", ["inbound"])
    if not isinstance(directions, list) or \
            any(d not in ("inbound", "outbound", "internal") for d in directions):
        raise RulesError(f"{where}.directions: a list among inbound, outbound, internal")
    landlines = raw.get("sms_to_landlines", False)
    if not isinstance(landlines, bool):
        raise RulesError(f"{where}.sms_to_landlines: true or false")
    default_expiry = 2 * 3600 if action == "sms" else 15 * 60
    return Rule(
        name=name, when=frozenset(when), action=action, message=message,
        from_line=_line(f"{where}.from", raw["from"]) if "from" in raw else None, agent=agent,
        callee_name=callee_name, lines=lines, delay_ms=_seconds(f"{where}.delay", raw.get("delay"), 0),
        expires_ms=_seconds(f"{where}.expires", raw.get("expires"), default_expiry),
        sms_to_landlines=landlines, directions=frozenset(directions))


def _schedule(where: str, raw: Any) -> Schedule:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: expected a table")
    if unknown := set(raw) - {"name", "line", "profile", "at", "days", "expires"}:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not PROFILE.fullmatch(name):
        raise RulesError(f"{where}.name: required, 1 to 64 characters")
    profile = raw.get("profile")
    if not isinstance(profile, str) or not PROFILE.fullmatch(profile):
        raise RulesError(f"{where}.profile: the profile name, 1 to 64 characters")
    days = raw.get("days", list(DAYS))
    if not isinstance(days, list) or not days or any(d not in DAYS for d in days):
        raise RulesError(f"{where}.days: a list among {', '.join(DAYS)}")
    return Schedule(name=name, line=_line(f"{where}.line", raw.get("line")), profile=profile,
                    at=_time(f"{where}.at", raw.get("at")), days=frozenset(DAYS.index(d) for d in days),
                    expires_ms=_seconds(f"{where}.expires", raw.get("expires"), 3600))


_TENANT_KEYS = {"timezone", "rules", "schedules", "quiet_hours", "quiet", "max_actions_per_hour",
                "mobile_prefixes"}


def _tenant(where: str, raw: Any, defaults: dict[str, Any]) -> TenantRules:
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: expected a table")
    if unknown := set(raw) - _TENANT_KEYS:
        raise RulesError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    merged = {**defaults, **raw}
    tz = merged.get("timezone", "Europe/Paris")
    try:
        zone = ZoneInfo(str(tz))
    except (ZoneInfoNotFoundError, ValueError):
        raise RulesError(f"{where}.timezone: unknown time zone {tz!r}") from None
    quiet_hours = merged.get("quiet_hours")
    if quiet_hours is not None:
        if not isinstance(quiet_hours, list) or len(quiet_hours) != 2:
            raise RulesError(f'{where}.quiet_hours: ["HH:MM", "HH:MM"], local start and end')
        quiet_hours = (_time(f"{where}.quiet_hours", quiet_hours[0]),
                       _time(f"{where}.quiet_hours", quiet_hours[1]))
    quiet = merged.get("quiet", "defer")
    if quiet not in ("defer", "drop"):
        raise RulesError(f"{where}.quiet: defer or drop")
    cap = merged.get("max_actions_per_hour", 100)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise RulesError(f"{where}.max_actions_per_hour: a whole number from 0")
    prefixes = merged.get("mobile_prefixes", ["336", "337"])
    if not isinstance(prefixes, list) or any(not isinstance(p, str) or not p.isdigit() for p in prefixes):
        raise RulesError(f"{where}.mobile_prefixes: a list of digit strings")
    rules = raw.get("rules", [])
    schedules = raw.get("schedules", [])
    if not isinstance(rules, list) or not isinstance(schedules, list):
        raise RulesError(f"{where}: rules and schedules are arrays of tables ([[...rules]])")
    parsed = tuple(_rule(f"{where}.rules[{i}]", r) for i, r in enumerate(rules))
    names = [r.name for r in parsed]
    if len(set(names)) != len(names):
        raise RulesError(f"{where}.rules: two rules have the same name (it makes the action ids)")
    planned = tuple(_schedule(f"{where}.schedules[{i}]", s) for i, s in enumerate(schedules))
    return TenantRules(timezone=str(tz), rules=parsed, schedules=planned, quiet_hours=quiet_hours,
                       quiet=quiet, max_actions_per_hour=cap, mobile_prefixes=tuple(prefixes), zone=zone)


def parse_rules(data: dict[str, Any], where: str = "rules") -> RulesConfig:
    """The rules of a parsed TOML document."""
    if unknown := set(data) - {"defaults", "tenants"}:
        raise RulesError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) & {"rules", "schedules"}:
        raise RulesError(f"{where}: [defaults] takes the tenant settings, not rules or schedules")
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise RulesError(f"{where}: [tenants.<id>] tables expected")
    out = {}
    for tid, raw in tenants.items():
        if not TENANT_ID.fullmatch(tid):
            raise RulesError(f"{where}: tenant id {tid!r} must match {TENANT_ID.pattern}")
        out[tid] = _tenant(f"{where}: [tenants.{tid}]", raw, defaults)
    return RulesConfig(out)


def load_rules(path: str | Path | None) -> RulesConfig:
    """The rules file (``--rules``); without one, no tenant has rules."""
    if path is None:
        return RulesConfig()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise RulesError(f"{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path}: {exc}") from None
    return parse_rules(data, str(path))


def is_mobile(number: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a number looks like a mobile (by its international prefix)."""
    return normalise_phone(number).startswith(prefixes)
